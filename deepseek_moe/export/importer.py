"""`model.init_from=DIR`: start a new run from a Hugging Face model directory's weights.

    check_init_from(run_cfg)          # after the vocab is known: config.json must match ours
    load_init_from(model, model_cfg)  # after parallelize_moe, before deepspeed.initialize

DIR is in either export format (`model_type` "deepseek" or "qwen2_moe" in config.json), e.g.
DeepSeek's published deepseek-moe-16b-base. With `vocab_from_tokenizer` the model's vocab size
is the checkpoint's (its tokenizer padding rule may differ from ours); every other field that
shapes the weights or the function must already be equal, or ConfigError names each one.
The weights are cast to the model's dtype; each rank reads the non-expert tensors and only its
own routed experts, so any EP size works.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from deepseek_moe.config.model import MOE_PARAMETER_FIELDS, PARAMETER_FIELDS, ModelConfig
from deepseek_moe.errors import ConfigError, ExportError
from deepseek_moe.export import deepseek, hf_dir, qwen2_moe

_LAYOUTS = {deepseek.MODEL_TYPE: deepseek, qwen2_moe.MODEL_TYPE: qwen2_moe}
# Parameter shapes, plus the fields that change the function the same parameters compute.
_COMPARED = (*PARAMETER_FIELDS, "rope_theta", "rms_norm_eps")
_COMPARED_MOE = (
    *MOE_PARAMETER_FIELDS,
    "top_k",
    "norm_topk_prob",
    "routed_scaling_factor",
    "scoring_func",
)


def read_model_config(model_dir: str | Path) -> tuple[Any, dict[str, Any]]:
    """(layout module, our ModelConfig field values) of a model directory."""
    try:
        config = hf_dir.read_config(Path(model_dir))
    except ExportError as err:
        raise ConfigError(str(err)) from err
    kind = config.get("model_type")
    if kind not in _LAYOUTS:
        raise ConfigError(
            f"model.init_from={model_dir}: config.json model_type={kind!r} is not "
            f"one of {sorted(_LAYOUTS)}; export it with python -m deepseek_moe.export"
        )
    try:
        return _LAYOUTS[kind], _LAYOUTS[kind].model_config_fields(config)
    except ExportError as err:
        raise ConfigError(f"model.init_from={model_dir}: {err}") from err


def config_differences(cfg: ModelConfig, fields: dict[str, Any]) -> list[str]:
    """`model.<field>=<ours> (checkpoint: <theirs>)` for every field that differs."""
    diffs = [
        f"model.{k}={getattr(cfg, k)!r} (checkpoint: {fields[k]!r})"
        for k in _COMPARED
        if getattr(cfg, k) != fields[k]
        and not (k == "first_k_dense" and cfg.moe is None and fields["moe"] is None)
    ]
    theirs = fields["moe"]
    if (cfg.moe is None) != (theirs is None):
        diffs.append(
            f"model.moe={'null' if cfg.moe is None else 'set'} (checkpoint: "
            f"{'dense' if theirs is None else 'MoE'})"
        )
    elif theirs is not None:
        diffs += [
            f"model.moe.{k}={getattr(cfg.moe, k)!r} (checkpoint: {theirs[k]!r})"
            for k in _COMPARED_MOE
            if k in theirs and getattr(cfg.moe, k) != theirs[k]
        ]
    return diffs


def check_init_from(run_cfg) -> None:
    """Take the checkpoint's vocab size (when the tokenizer sets ours) and require the rest of
    `run_cfg.model` to match DIR/config.json."""
    cfg = run_cfg.model
    _, fields = read_model_config(cfg.init_from)
    if run_cfg.vocab_from_tokenizer:
        cfg.vocab_size = fields["vocab_size"]
    diffs = config_differences(cfg, fields)
    if diffs:
        raise ConfigError(
            f"model.init_from={cfg.init_from} does not match this model config: "
            + "; ".join(diffs)
            + ". Set these model.* values to the checkpoint's"
        )


_ROUTED_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.")


def init_weights(
    model_dir: str | Path, cfg: ModelConfig, experts: Optional[dict[int, range]] = None
) -> dict[str, torch.Tensor]:
    """Our HF-layout weights (global expert ids) from a model directory. `experts`: layer ->
    the global expert ids to read (default all); routed experts of both layouts are named
    `model.layers.{L}.mlp.experts.{e}.*`, so the others are skipped unread."""

    def keep(key: str) -> bool:
        m = _ROUTED_EXPERT.match(key)
        return experts is None or m is None or int(m[2]) in experts.get(int(m[1]), ())

    layout, _ = read_model_config(model_dir)
    return layout.from_tensors(hf_dir.read_safetensors(Path(model_dir), keep), cfg)


@torch.no_grad()
def load_init_from(model: nn.Module, cfg: ModelConfig) -> None:
    """Load `cfg.init_from` into `model` (any EP size; not collective). Each rank reads the
    non-expert tensors and only its own routed experts."""
    from deepseek_moe.model.moe import MoELayer
    from deepseek_moe.checkpoint.keys import load_consolidated_state_dict

    own = {
        m.layer_idx: range(m.local_expert_offset, m.local_expert_offset + m.num_local_experts)
        for m in model.modules()
        if isinstance(m, MoELayer)
    }
    try:
        load_consolidated_state_dict(model, init_weights(cfg.init_from, cfg, own))
    except ExportError as err:
        raise ConfigError(f"model.init_from={cfg.init_from}: {err}") from err
    except (KeyError, RuntimeError) as err:
        raise ConfigError(
            f"model.init_from={cfg.init_from}: its tensors do not fit this model ({err})"
        ) from err
