"""Trained models leave the framework: Hugging Face model directories, and back.

    python -m deepseek_moe.export runs/tiny --out hf/tiny                     # --format deepseek
    python -m deepseek_moe.export runs/tiny --out hf/tiny-qwen --format qwen2_moe
    python train.py model.init_from=hf/tiny run_dir=runs/tiny-continued       # import

Modules: `source` (which checkpoint, its config, its weights incl. fp32 masters), `deepseek`
and `qwen2_moe` (the two layouts, both directions), `refusals` (what a layout cannot
represent), `tokenizer` (our tokenizer as Hugging Face files), `hf_dir` (safetensors shards,
index, staged writes), `importer` (`model.init_from`), `__main__` (the CLI).
"""

from deepseek_moe.export.exporter import FORMATS, export

__all__ = ["FORMATS", "export"]
