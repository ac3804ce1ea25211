"""Where an export reads from: a run directory or one checkpoint, its model config, its weights.

    src = find_source("runs/tiny")                  # newest complete checkpoint of the run
    src = find_source("runs/tiny/checkpoints/step_00000100")
    weights, dtype = read_weights(src.tag_dir)      # HF-layout tensors, global expert ids

The model config is the run's resolved `config.yaml` (written by the trainer at start, vocab
included), so a checkpoint directory must stay inside its run directory. Weights come from
`consolidate_deepspeed_checkpoint` (the same files at every EP size). When the model states are
bf16/fp16 and the optimizer holds fp32 master copies in ZeRO-1/2 shards, the masters replace
them: `read_weights` returns float32 then. Otherwise (an fp32 run; ZeRO-0, whose DeepSpeed
optimizer files keep the fp32 copies without parameter names) the model states are returned in
their own dtype, and that is the dtype the export writes and reports.

How ZeRO-1/2 store the masters: `deepseek_moe/checkpoint/zero_shards.py`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from deepseek_moe.checkpoint import files as ckpt
from deepseek_moe.config.train import RunConfig
from deepseek_moe.errors import ExportError

_RUN_CONFIG = "config.yaml"
log = logging.getLogger("deepseek_moe.export")


@dataclass
class Source:
    """One checkpoint and the run that wrote it."""

    tag_dir: Path
    """DeepSpeed tag directory (holds mp_rank_00_model_states.pt)."""
    run_dir: Path
    """The run directory holding `config.yaml` and `checkpoints/`."""
    run_cfg: RunConfig
    """The run's resolved configuration."""


def load_run_config(run_dir: Path) -> RunConfig:
    """The resolved `RunConfig` the trainer wrote to `<run_dir>/config.yaml`."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    path = run_dir / _RUN_CONFIG
    if not path.is_file():
        raise ExportError(
            f"{path} not found: export needs the run directory the trainer wrote "
            "(it holds config.yaml next to checkpoints/); pass that directory or "
            "a checkpoint inside it"
        )
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.load(path))
        return OmegaConf.to_object(merged)
    except (OmegaConfBaseException, ValueError) as err:
        raise ExportError(
            f"{path} is not a valid run config ({err}); was it written by another version of this framework?"
        ) from err


def find_source(path: str | os.PathLike) -> Source:
    """Resolve a run directory (newest complete checkpoint) or a checkpoint tag directory."""
    path = Path(path).expanduser().absolute()
    if (path / "mp_rank_00_model_states.pt").is_file():
        tag_dir, run_dir = path, path.parent.parent
        if not (tag_dir / ckpt.COMPLETE).is_file():
            raise ExportError(
                f"{tag_dir} has no {ckpt.COMPLETE} marker: the save did not finish. "
                "Export an older checkpoint, or the run directory (newest complete)"
            )
    elif (path / "checkpoints").is_dir() or (path / _RUN_CONFIG).is_file():
        found = ckpt.latest_complete(path / "checkpoints")
        if found is None:
            raise ExportError(
                f"{path} holds no complete checkpoint under checkpoints/; train "
                "until one is saved, or pass a checkpoint directory"
            )
        tag_dir, run_dir = found[1], path
    else:
        raise ExportError(
            f"{path} is neither a run directory (config.yaml, checkpoints/) nor a "
            "checkpoint (mp_rank_00_model_states.pt); pass one of those"
        )
    return Source(tag_dir=tag_dir, run_dir=run_dir, run_cfg=load_run_config(run_dir))


# ---- fp32 master weights ----------------------------------------------------------------------


def fp32_master_weights(
    tag_dir: Path, *, ep_size: int, num_experts: int, shapes: dict[str, torch.Size]
) -> Optional[dict[str, torch.Tensor]]:
    """HF-keyed fp32 masters of every trainable parameter, or None when the checkpoint has none.

    `shapes`: HF key -> shape (from the model states). The shards are read by
    `checkpoint.zero_shards.ZeroShards`, which joins each parameter's slices and returns expert
    stacks with global expert ids; the stacks are split into per-expert HF keys here.
    """
    from deepseek_moe.checkpoint.keys import STACKED_EXPERT_PARAM
    from deepseek_moe.checkpoint.zero_shards import ZeroShards
    from deepseek_moe.model.experts import per_expert_tensors

    shards = ZeroShards.open(tag_dir, ep_size=ep_size)
    if shards is None:
        return None
    out: dict[str, torch.Tensor] = {}
    stacks: dict[str, dict[str, torch.Tensor]] = {}
    for name in shards.names():
        m = STACKED_EXPERT_PARAM.match(name)
        if m:
            stacks.setdefault(m["layer"], {})[m["proj"]] = shards.read(name, "fp32")
            continue
        if name not in shapes:
            # NOTE: the names are the model's parameter names; if the expert parameter layout
            # changes, `STACKED_EXPERT_PARAM` must follow it. Until then the bf16 weights are
            # exported.
            log.warning(
                "export: the fp32 master copies in %s name parameters that are not model "
                "weights (e.g. %s); writing the model states' own dtype instead",
                tag_dir,
                name,
            )
            return None
        out[name] = _shaped(tag_dir, name, shards.read(name, "fp32"), shapes[name])
    for layer, flat in stacks.items():
        D, H = shapes[f"{layer}.experts.0.down_proj.weight"]
        gate_up = _shaped(tag_dir, layer, flat["gate_up_proj"], torch.Size((num_experts, 2 * H, D)))
        down = _shaped(tag_dir, layer, flat["down_proj"], torch.Size((num_experts, D, H)))
        for key, tensor in per_expert_tensors(gate_up, down, 0).items():
            out[f"{layer}.experts.{key}"] = tensor.clone()
    return out


def _shaped(tag_dir: Path, name: str, flat: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if flat.numel() != shape.numel():
        raise ExportError(
            f"{tag_dir}: the fp32 slices of {name} hold {flat.numel()} values, "
            f"its shape {tuple(shape)} needs {shape.numel()}"
        )
    return flat.view(shape)


def read_weights(src: Source) -> tuple[dict[str, torch.Tensor], torch.dtype]:
    """The checkpoint's HF-layout weights (global expert ids) and the dtype they are in.

    Low-precision model states are replaced by the optimizer's fp32 masters where present."""
    from deepseek_moe.checkpoint.consolidate import consolidate_deepspeed_checkpoint

    weights = consolidate_deepspeed_checkpoint(str(src.tag_dir))
    low = {k for k, v in weights.items() if v.dtype in (torch.bfloat16, torch.float16)}
    if low:
        moe = src.run_cfg.model.moe
        masters = fp32_master_weights(
            src.tag_dir,
            ep_size=src.run_cfg.parallel.ep_size,
            num_experts=moe.n_routed_experts if moe is not None else 1,
            shapes={k: v.shape for k, v in weights.items()},
        )
        if masters is not None:
            weights.update(masters)
    # the parameters' dtype (the fp32 selection-bias buffer is not exported)
    dtypes = {
        v.dtype
        for k, v in weights.items()
        if v.is_floating_point() and not k.endswith("e_score_correction_bias")
    }
    dtype = max(dtypes, key=lambda d: torch.finfo(d).bits)
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}, dtype
