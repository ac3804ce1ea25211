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

How ZeRO-1/2 store the masters: per data-parallel rank r,
`[bf16_]zero_pp_rank_{r}_mp_rank_00_optim_states.pt` holds `optimizer_state_dict` with
`single_partition_of_fp32_groups` (per param group, this rank's slice of the group's flat fp32
buffer; expert groups are partitioned over the expert-data-parallel group) and
`param_slice_mappings` (per group, parameter name -> (start, numel) of its piece in that slice).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from deepseek_moe.config.train import RunConfig
from deepseek_moe.errors import ExportError
from deepseek_moe.train import checkpoint as ckpt

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
        raise ExportError(f"{path} not found: export needs the run directory the trainer wrote "
                          "(it holds config.yaml next to checkpoints/); pass that directory or "
                          "a checkpoint inside it")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.load(path))
        return OmegaConf.to_object(merged)
    except (OmegaConfBaseException, ValueError) as err:
        raise ExportError(f"{path} is not a valid run config ({err}); was it written by another "
                          "version of this framework?") from err


def find_source(path: str | os.PathLike) -> Source:
    """Resolve a run directory (newest complete checkpoint) or a checkpoint tag directory."""
    path = Path(path).expanduser().absolute()
    if (path / "mp_rank_00_model_states.pt").is_file():
        tag_dir, run_dir = path, path.parent.parent
        if not (tag_dir / ckpt.COMPLETE).is_file():
            raise ExportError(f"{tag_dir} has no {ckpt.COMPLETE} marker: the save did not finish. "
                              "Export an older checkpoint, or the run directory (newest complete)")
    elif (path / "checkpoints").is_dir() or (path / _RUN_CONFIG).is_file():
        found = ckpt.latest_complete(path / "checkpoints")
        if found is None:
            raise ExportError(f"{path} holds no complete checkpoint under checkpoints/; train "
                              "until one is saved, or pass a checkpoint directory")
        tag_dir, run_dir = found[1], path
    else:
        raise ExportError(f"{path} is neither a run directory (config.yaml, checkpoints/) nor a "
                          "checkpoint (mp_rank_00_model_states.pt); pass one of those")
    return Source(tag_dir=tag_dir, run_dir=run_dir, run_cfg=load_run_config(run_dir))


# ---- fp32 master weights ----------------------------------------------------------------------

_OPTIM_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")
# the stacked expert parameters of one EP rank (model/experts.py): [L, 2H, D] and [L, D, H]
_LOCAL_EXPERTS = re.compile(r"^(?P<layer>.*)\.experts\.deepspeed_moe\.experts\.deepspeed_experts\."
                            r"(?P<proj>gate_up_proj|down_proj)$")


def fp32_master_weights(tag_dir: Path, *, ep_size: int, num_experts: int,
                        shapes: dict[str, torch.Size]) -> Optional[dict[str, torch.Tensor]]:
    """HF-keyed fp32 masters of every trainable parameter, or None when the checkpoint has none.

    `shapes`: HF key -> shape (from the model states). Each rank's file maps every parameter
    name to the fragment of its flat fp32 partition that holds a slice of that parameter
    (`param_slice_mappings`); a parameter's slices, in rank order, are its flattened values.
    Expert parameters carry LOCAL names and are partitioned over the expert-data-parallel group
    (ranks with the same EP rank, `rank % ep_size`: EP groups are consecutive ranks), so they
    are renamed to global expert ids before the slices are joined.
    """
    files = sorted((int(m[1]), tag_dir / name) for name in os.listdir(tag_dir)
                   if (m := _OPTIM_FILE.match(name)))
    if not files:
        return None
    local_experts = num_experts // ep_size
    pieces: dict[str, list[torch.Tensor]] = {}
    for rank, path in files:
        osd = torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        flat_groups = osd.get("single_partition_of_fp32_groups")
        mappings = osd.get("param_slice_mappings")
        if flat_groups is None or mappings is None:
            return None  # not a ZeRO / bf16 optimizer: the module weights are the masters
        for flat, mapping in zip(flat_groups, mappings):
            for name, frag in mapping.items():
                m = _LOCAL_EXPERTS.match(name)
                if m:  # joined per EP rank, split into global expert ids below
                    name = (m["layer"], rank % ep_size, m["proj"])
                piece = flat.narrow(0, frag.start, frag.numel)
                pieces.setdefault(name, []).append(piece.float())
    pieces = _experts_to_hf(pieces, local_experts, shapes)
    unknown = sorted(set(pieces) - set(shapes))
    if unknown:
        # NOTE: the names are the model's parameter names; if the expert parameter layout
        # changes, `_LOCAL_EXPERTS` must follow it. Until then the bf16 weights are exported.
        log.warning("export: the fp32 master copies in %s name parameters that are not model "
                    "weights (e.g. %s); writing the model states' own dtype instead",
                    tag_dir, unknown[:2])
        return None
    out = {}
    for name, parts in pieces.items():
        flat = torch.cat(parts)
        if flat.numel() != shapes[name].numel():
            raise ExportError(f"{tag_dir}: the fp32 slices of {name} hold {flat.numel()} values, "
                              f"its shape {tuple(shapes[name])} needs {shapes[name].numel()}")
        out[name] = flat.view(shapes[name]).clone()
    return out


def _experts_to_hf(pieces: dict, local_experts: int, shapes: dict[str, torch.Size]
                   ) -> dict[str, list[torch.Tensor]]:
    """Stacked expert slices keyed (layer, ep_rank) -> per-expert HF keys with global ids."""
    from deepseek_moe.model.experts import per_expert_tensors

    stacks: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
    out: dict[str, list[torch.Tensor]] = {}
    for name, parts in pieces.items():
        if isinstance(name, str):
            out[name] = parts
            continue
        (layer, ep_rank), proj = name[:2], name[2]
        stacks.setdefault((layer, ep_rank), {})[proj] = torch.cat(parts)
    for (layer, ep_rank), flat in stacks.items():
        down_DH = shapes[f"{layer}.experts.0.down_proj.weight"]
        D, H = down_DH
        gate_up = flat["gate_up_proj"].view(local_experts, 2 * H, D)
        down = flat["down_proj"].view(local_experts, D, H)
        for key, tensor in per_expert_tensors(gate_up, down, ep_rank * local_experts).items():
            out[f"{layer}.experts.{key}"] = [tensor.reshape(-1)]
    return out


def read_weights(src: Source) -> tuple[dict[str, torch.Tensor], torch.dtype]:
    """The checkpoint's HF-layout weights (global expert ids) and the dtype they are in.

    Low-precision model states are replaced by the optimizer's fp32 masters where present."""
    from deepseek_moe.parallel.checkpoint import consolidate_deepspeed_checkpoint

    weights = consolidate_deepspeed_checkpoint(str(src.tag_dir))
    low = {k for k, v in weights.items() if v.dtype in (torch.bfloat16, torch.float16)}
    if low:
        moe = src.run_cfg.model.moe
        masters = fp32_master_weights(
            src.tag_dir, ep_size=src.run_cfg.parallel.ep_size,
            num_experts=moe.n_routed_experts if moe is not None else 1,
            shapes={k: v.shape for k, v in weights.items()})
        if masters is not None:
            weights.update(masters)
    # the parameters' dtype (the fp32 selection-bias buffer is not exported)
    dtypes = {v.dtype for k, v in weights.items()
              if v.is_floating_point() and not k.endswith("e_score_correction_bias")}
    dtype = max(dtypes, key=lambda d: torch.finfo(d).bits)
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}, dtype
