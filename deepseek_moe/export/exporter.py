"""`export(source, out, fmt)`: one checkpoint -> one Hugging Face model directory.

Steps: 1) find the checkpoint and the run's config (`source.find_source`); 2) refuse what the
format cannot represent (`refusals`); 3) read the weights (fp32 masters where the checkpoint has
them); 4) map them to the format's tensors; 5) write shards, index, config.json,
generation_config.json and the tokenizer into a temp directory and rename it to `out`.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType
from typing import Optional

from deepseek_moe.data.meta import load_meta, resolve_out_dir
from deepseek_moe.errors import ExportError
from deepseek_moe.export import deepseek, hf_dir, qwen2_moe
from deepseek_moe.export.refusals import Accept, check_representable
from deepseek_moe.export.source import find_source, read_weights
from deepseek_moe.export.tokenizer import special_ids, write_tokenizer

FORMATS: dict[str, ModuleType] = {"deepseek": deepseek, "qwen2_moe": qwen2_moe}


def export(
    source: str | os.PathLike,
    out: str | os.PathLike,
    fmt: str = "deepseek",
    *,
    accept: Optional[Accept] = None,
    data_dir: Optional[str | os.PathLike] = None,
    force: bool = False,
) -> dict:
    """Export `source` (run dir or checkpoint) to `out`; returns a summary dict.

    `data_dir`: the prepared data directory whose tokenizer to write (default: the run's
    `data.out_dir`, resolved against the current directory like the trainer does)."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r} is not one of {sorted(FORMATS)}")
    layout = FORMATS[fmt]
    src = find_source(source)
    cfg = src.run_cfg.model
    accepted = check_representable(cfg, fmt, accept or Accept(), head_dim_free=layout.HEAD_DIM_FREE)
    data = Path(data_dir) if data_dir is not None else resolve_out_dir(src.run_cfg.data)
    try:
        meta = load_meta(data)
    except (FileNotFoundError, ValueError) as err:
        raise ExportError(
            f"the run's tokenizer was not found ({err}); pass --data-dir with the "
            "prepared data directory the run trained on"
        ) from err
    ids = special_ids(meta)
    out = Path(out).absolute()
    with hf_dir.staged_dir(out, force=force) as tmp:  # checks --out before the weights are read
        weights, dtype = read_weights(src)
        tensors = layout.to_tensors(weights, cfg)
        shards = hf_dir.write_safetensors(tmp, tensors)
        hf_dir.write_json(tmp / "config.json", layout.config_json(cfg, dtype=dtype, special_ids=ids))
        generation = {
            "do_sample": False,
            **{f"{k}_token_id": ids[k] for k in ("bos", "eos", "pad") if k in ids},
        }
        hf_dir.write_json(tmp / "generation_config.json", generation)
        write_tokenizer(meta, tmp)
    return {
        "out": str(out),
        "format": fmt,
        "checkpoint": str(src.tag_dir),
        "dtype": str(dtype).removeprefix("torch."),
        "tensors": len(tensors),
        "shards": len(shards),
        "accepted_changes": accepted,
    }
