"""Checkpoints: the run directory's files, DeepSpeed shards to weights, resharding on resume.

- `manager.py`      `CheckpointManager`: the protocol the trainer calls (save, verify, newest
                    intact checkpoint, resume as saved or resharded)
- `files.py`        checkpoint directory rules: tags, atomic writes, COMPLETE manifests with
                    CRC-32, damaged checkpoints set aside, pruning, per-rank trainer state paths
- `keys.py`         state-dict key names: local expert ids under EP <-> global expert ids;
                    `consolidated_state_dict` / `load_consolidated_state_dict` at any EP size
- `consolidate.py`  a DeepSpeed tag directory -> one HF-layout state dict (CLI:
                    `python -m deepseek_moe.checkpoint.consolidate TAG_DIR --out model.pt`)
- `zero_shards.py`  per-parameter fp32 master weights and Adam moments out of ZeRO-1/2 and bf16
                    optimizer shards, global expert ids (for export and resharding)
- `reshard.py`      resume a checkpoint written with another world size / EP size / ZeRO stage
"""
