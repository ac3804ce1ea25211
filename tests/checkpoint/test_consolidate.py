"""`consolidate_deepspeed_checkpoint` on hand-made DeepSpeed-style files (no engine needed;
the real EP=2 checkpoint round trip is in test_deepspeed_moe.py)."""

import pytest
import torch

from deepseek_moe.errors import CheckpointError
from deepseek_moe.checkpoint.consolidate import consolidate_deepspeed_checkpoint, main

PFX = "model.layers.1.mlp.experts.deepspeed_moe.experts.deepspeed_experts"


def _write(tag_dir, experts):
    torch.save({"module": {"model.norm.weight": torch.ones(2)}}, tag_dir / "mp_rank_00_model_states.pt")
    for (layer, e), keys in experts.items():
        torch.save(
            {k: torch.full((1,), float(e)) for k in keys},
            tag_dir / f"layer_{layer}_expert_{e}_mp_rank_00_model_states.pt",
        )


def test_renames_global_expert_keys(tmp_path):
    _write(tmp_path, {(0, e): [f"{PFX}.{e}.up_proj.weight"] for e in range(3)})
    sd = consolidate_deepspeed_checkpoint(str(tmp_path))
    assert sorted(sd) == [
        "model.layers.1.mlp.experts.0.up_proj.weight",
        "model.layers.1.mlp.experts.1.up_proj.weight",
        "model.layers.1.mlp.experts.2.up_proj.weight",
        "model.norm.weight",
    ]
    assert sd["model.layers.1.mlp.experts.2.up_proj.weight"].item() == 2.0
    # a rank that holds experts 1 and 2 of MoE layer 0 reads only their files
    mine = consolidate_deepspeed_checkpoint(str(tmp_path), {(0, 1), (0, 2), (1, 0)})
    assert sorted(mine) == [
        "model.layers.1.mlp.experts.1.up_proj.weight",
        "model.layers.1.mlp.experts.2.up_proj.weight",
        "model.norm.weight",
    ]
    out = tmp_path / "model.pt"
    main([str(tmp_path), "--out", str(out)])
    assert torch.load(out).keys() == sd.keys()


def test_errors(tmp_path):
    with pytest.raises(CheckpointError, match="tag directory"):
        consolidate_deepspeed_checkpoint(str(tmp_path))
    _write(tmp_path, {(0, 1): [f"{PFX}.1.up_proj.weight"], (1, 1): [f"{PFX}.1.up_proj.weight"]})
    with pytest.raises(ValueError, match="appears twice"):
        consolidate_deepspeed_checkpoint(str(tmp_path))
