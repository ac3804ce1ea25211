"""Print one JSON object describing a model preset, without allocating its weights.

    python -m deepseek_moe.summary model=deepseek_moe_16b
    python -m deepseek_moe.summary model=deepseek_moe_tiny model.moe.top_k=2 seq_len=128
    python -m deepseek_moe.summary model=deepseek_moe_16b world_size=64 ep_size=8 \
        zero_stage=1 micro_batch=1 seq_len=4096 precision=bf16 activation_checkpointing=full \
        loss_chunk_tokens=2048

`model=NAME` selects `conf/model/NAME.yaml` (or a path to a yaml); `model.<field>=value`
overrides fields; `seq_len=` sets the sequence length for FLOPs and memory (default
max_seq_len). The model is built on the meta device, so even the 145B preset answers in
seconds; the parameter count is taken from the built model and cross-checked against
`ModelConfig.num_params()`.

`memory_plan` (per GPU; see deepseek_moe/memory_plan.py for what is counted) uses
`ep_size` (1), `world_size` (= ep_size), `zero_stage` (1), `micro_batch` (1), `precision`
(bf16), `activation_checkpointing` (none), `grad_accum_steps` (1) and `loss_chunk_tokens` (0 = the
LM head's full logits; N > 0 = the head and loss N tokens at a time, as trainer.loss_chunk_tokens).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
from omegaconf import OmegaConf

from deepseek_moe.config.compose import CONF_DIR, compose, register
from deepseek_moe.config.model import ModelConfig
from deepseek_moe.errors import ConfigError, report_user_errors
from deepseek_moe.memory_plan import memory_plan

_PLAN_INT_ARGS = (
    "ep_size",
    "world_size",
    "zero_stage",
    "micro_batch",
    "grad_accum_steps",
    "loss_chunk_tokens",
)
MODEL_DIR = CONF_DIR / "model"


def load_model_config(name: str, overrides: Sequence[str] = ()) -> ModelConfig:
    """The model group of the training config with `model=<name>` (a preset in conf/model/, or
    a yaml path) and dotted overrides ("moe.top_k=2"), validated, as the dataclass."""
    path = Path(name)
    if path.suffix not in (".yaml", ".yml"):
        path = MODEL_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in MODEL_DIR.glob("*.yaml"))
        raise ConfigError(f"no model preset {name!r} ({path}); known presets: {known}")
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from deepseek_moe.train.cli import register_schema

    register_schema()
    if path.parent != MODEL_DIR:  # a yaml of the user's: offered to Hydra as one more preset
        name = f"_file_{path.stem}"
        register(name, OmegaConf.load(path), group="model")
    try:
        composed = compose("config", [f"model={name}", *(f"model.{o}" for o in overrides)])
        cfg = OmegaConf.to_object(composed.model)
    except (HydraException, OmegaConfBaseException, ValueError) as err:  # misspelt field, type, a check
        cause = err
        while not isinstance(cause, ValueError) and cause.__cause__ is not None:
            cause = cause.__cause__
        raise ConfigError(
            f"{cause}; the fields are those of ModelConfig (deepseek_moe/config/model.py)"
        ) from None
    assert isinstance(cfg, ModelConfig)
    return cfg


def summarize(
    cfg: ModelConfig, seq_len: int | None = None, plan: dict[str, Any] | None = None
) -> dict[str, Any]:
    """`plan`: keyword arguments of `memory_plan` (seq_len comes from `seq_len`)."""
    from deepseek_moe.model.transformer import DeepSeekMoEForCausalLM

    with torch.device("meta"):
        model = DeepSeekMoEForCausalLM(cfg)
    total = sum(p.numel() for p in model.parameters())
    if total != cfg.num_params():
        raise AssertionError(
            f"built model has {total} params, ModelConfig.num_params() says "
            f"{cfg.num_params()}: the analytic count is out of date"
        )
    S = cfg.max_seq_len if seq_len is None else seq_len
    layers = ["moe" if cfg.is_moe_layer(i) else "dense" for i in range(cfg.num_layers)]
    out: dict[str, Any] = {
        "total_params": total,
        "active_params": cfg.num_active_params(),
        "total_params_b": round(total / 1e9, 4),
        "active_params_b": round(cfg.num_active_params() / 1e9, 4),
        "embedding_params": cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_embeddings else 2),
        "seq_len": S,
        "flops_per_token": cfg.flops_per_token(S),
        "layout": layers,
        "num_dense_layers": layers.count("dense"),
        "num_moe_layers": layers.count("moe"),
    }
    plan = dict(plan or {})
    plan.setdefault("world_size", plan.get("ep_size", 1))
    out["memory_plan"] = memory_plan(cfg, seq_len=S, **plan)
    if cfg.moe is not None:
        m = cfg.moe
        out["experts"] = {
            "routed": m.n_routed_experts,
            "shared": m.n_shared_experts,
            "top_k": m.top_k,
            "expert_width": m.moe_intermediate_size,
            "groups": m.n_groups,
            "topk_groups": m.topk_groups,
        }
    return out


def main(argv: Sequence[str]) -> None:
    name, seq_len, overrides, plan = None, None, [], {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise ConfigError(f"expected key=value arguments, got {arg!r} (e.g. model=deepseek_moe_16b)")
        if key == "model":
            name = value
        elif key == "seq_len":
            if not value.isdigit():
                raise ConfigError(f"seq_len={value!r} must be a positive integer")
            seq_len = int(value)
        elif key.startswith("model."):
            overrides.append(f"{key[len('model.') :]}={value}")
        elif key in _PLAN_INT_ARGS:
            if not value.isdigit():
                raise ConfigError(f"{key}={value!r} must be a non-negative integer")
            plan[key] = int(value)
        elif key in ("precision", "activation_checkpointing"):
            plan[key] = value
        else:
            raise ConfigError(
                f"unknown argument {key!r}: use model=NAME, model.<field>=V, seq_len=N, "
                f"{'=N, '.join(_PLAN_INT_ARGS)}=N, precision=bf16|fp32, "
                "activation_checkpointing=none|full"
            )
    if name is None:
        raise ConfigError("usage: python -m deepseek_moe.summary model=NAME [model.<field>=V] [seq_len=N]")
    print(json.dumps(summarize(load_model_config(name, overrides), seq_len, plan)))


if __name__ == "__main__":
    report_user_errors(main, sys.argv[1:])
