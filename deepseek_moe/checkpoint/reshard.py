"""Resume a checkpoint written with another world size, EP size or ZeRO stage (1 <-> 2).

    change = layout_change(saved_state, world_size=4, ep_size=4, zero_stage=2)
    if change:                                     # "world 2 -> 4, ep 2 -> 4, zero 1 -> 2"
        check_reshardable(saved_state, tag_dir, zero_stage=2)  # before any work
        load_resharded(engine, model, tag_dir, saved_ep_size=2)
    else:
        engine.load_checkpoint(...)                # DeepSpeed's own load, same layout

`load_resharded` runs after `deepspeed.initialize` built the engine for the NEW layout. It reads
the old checkpoint and fills the new engine's state; it writes nothing (the next save writes
the new layout through the usual temp-dir + COMPLETE path, so an interrupted resume leaves the
old checkpoint as it was and nothing that looks complete):

1. model weights and buffers (the V3 router bias): the DeepSpeed model files hold every expert
   under its global id, one file each, at any EP size (`consolidate.py`); each rank reads the
   non-expert file and the files of the experts it owns;
2. fp32 master weights, exp_avg, exp_avg_sq: for every parameter piece this rank's optimizer
   partition holds (DeepSpeed's `_hp_mapping`: where the piece lies in the parameter and in the
   flat partition), the same values are read from the old shards (`zero_shards.py`: global
   expert ids, only the overlapping slices are read) and copied into the partition and into the
   torch optimizer's state of it; Adam's step count is set on every group;
3. LR scheduler state, and the optimizer groups' current LR from it; the engine's step and
   sample counters.

Why not DeepSpeed's universal checkpoints: they need a conversion pass that writes a second
copy of the optimizer state, and their MoE support (`autoep_universal.py`) is for DeepSpeed's
AutoEP layers, not for our stacked `[L, 2H, D]` expert parameters whose first dimension changes
with the EP size. Reading the shards directly needs neither.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from deepseek_moe.config.model import MOE_PARAMETER_FIELDS, PARAMETER_FIELDS
from deepseek_moe.errors import CheckpointError

_LAYOUT = (("world_size", "world"), ("ep_size", "ep"), ("zero_stage", "zero"))


def layout_change(saved: dict[str, Any], *, world_size: int, ep_size: int, zero_stage: int) -> Optional[str]:
    """ "world 2 -> 4, ep 2 -> 4, zero 1 -> 2" (the values that changed), or None when the
    checkpoint was written with this layout. States written before a value was recorded count
    as unchanged for it."""
    now = {"world_size": world_size, "ep_size": ep_size, "zero_stage": zero_stage}
    changed = [
        f"{label} {saved[key]} -> {now[key]}"
        for key, label in _LAYOUT
        if key in saved and saved[key] != now[key]
    ]
    return ", ".join(changed) or None


def architecture(model_cfg) -> dict[str, Any]:
    """{"model.<field>": value} of the fields that define the parameters (saved with every
    checkpoint, compared at resume by `check_same_model`)."""
    out = {f"model.{k}": getattr(model_cfg, k) for k in PARAMETER_FIELDS}
    moe = model_cfg.moe
    out["model.moe"] = None if moe is None else "on"
    if moe is not None:
        out.update({f"model.moe.{k}": getattr(moe, k) for k in MOE_PARAMETER_FIELDS})
    return out


def check_same_model(saved: dict[str, Any], model_cfg, where: Path) -> None:
    """CheckpointError naming every parameter-defining model field that differs from the
    checkpoint's (states saved before it was recorded are not checked here)."""
    if "architecture" not in saved:
        return
    now = architecture(model_cfg)
    diffs = [
        f"{key}={saved['architecture'].get(key)} (this launch: {now[key]})"
        for key in now
        if saved["architecture"].get(key) != now[key]
    ]
    if diffs:
        raise CheckpointError(
            f"{where} holds another model: {', '.join(diffs)}; a run resumes only into the model "
            "it was started with. Relaunch with the saved values, or use a new run_dir"
        )


def check_reshardable(saved: dict[str, Any], where: Path, *, zero_stage: int, precision: str) -> None:
    """CheckpointError when a checkpoint with another layout cannot be resharded: ZeRO-0 on
    either side (its optimizer files have no parameter names), another precision, or a state
    written before the layout was recorded."""
    if "ep_size" not in saved or "zero_stage" not in saved:
        raise CheckpointError(
            f"{where} was saved before checkpoints recorded their EP size and ZeRO stage, so it "
            "cannot be resharded; relaunch with the world size, parallel.ep_size and "
            "parallel.zero_stage it was saved with"
        )
    old_stage = saved["zero_stage"]
    if old_stage == 0 or zero_stage == 0:
        raise CheckpointError(
            f"{where} was saved with parallel.zero_stage={old_stage}; this launch uses "
            f"{zero_stage} and another world/EP layout. Resharding needs ZeRO stage 1 or 2 on both "
            f"sides: relaunch with the saved layout (world size {saved.get('world_size')}, "
            f"parallel.ep_size={saved['ep_size']}, parallel.zero_stage={old_stage})"
        )
    if saved.get("precision", precision) != precision:
        raise CheckpointError(
            f"{where} was saved with trainer.precision={saved['precision']}, this launch uses "
            f"{precision}; relaunch with trainer.precision={saved['precision']}"
        )


def load_resharded(engine, model: nn.Module, tag_dir: Path, *, saved_ep_size: int) -> None:
    """Fill a freshly built engine (any world size, EP size, ZeRO stage 1/2) from `tag_dir`.
    Not collective: every rank reads what it holds. Steps in the module docstring."""
    # Imported here: the checks above run without DeepSpeed (the key formats import it).
    from deepseek_moe.checkpoint.consolidate import consolidate_deepspeed_checkpoint
    from deepseek_moe.checkpoint.keys import (
        STACKED_EXPERT_PARAM,
        _layer_offsets,
        load_consolidated_state_dict,
    )
    from deepseek_moe.checkpoint.zero_shards import ZeroShards

    # 1. weights and buffers; of the experts only this rank's files, by global id
    offsets = _layer_offsets(model)  # MoE layers in module order, as DeepSpeed numbers them
    mine = {
        (m, offset + l)
        for m, (layer, offset) in enumerate(offsets.items())
        for l in range(model.get_submodule(layer).num_local_experts)
    }
    load_consolidated_state_dict(model, consolidate_deepspeed_checkpoint(str(tag_dir), mine))
    # 2. fp32 masters and Adam moments, piece by piece
    shards = ZeroShards.open(tag_dir, ep_size=saved_ep_size)
    if shards is None or shards.step is None or not shards.has("exp_avg"):
        raise CheckpointError(
            f"{tag_dir} holds no ZeRO-1/2 optimizer state with parameter names; "
            "relaunch with the layout it was saved with"
        )
    optimizer = engine.optimizer
    flat_partitions = _flat_partitions(optimizer)
    base = optimizer.optimizer  # the torch AdamW over one flat partition per group
    for group, flat in zip(base.param_groups, flat_partitions, strict=True):
        assert group["params"][0] is flat
        # where torch.optim.AdamW keeps the step: on the device for fused/capturable, else CPU
        on_device = group.get("fused") or group.get("capturable")
        step = torch.tensor(shards.step, dtype=torch.float32, device=flat.device if on_device else "cpu")
        base.state[flat] = {
            "step": step,
            "exp_avg": torch.zeros_like(flat),
            "exp_avg_sq": torch.zeros_like(flat),
        }
    # NOTE: DeepSpeed links each parameter piece to its slice of the optimizer state lazily,
    # on the first step; link now so that the pieces below can be written through it.
    optimizer._lazy_init_hp_params_optimizer_state()
    names = set(shards.names())
    for name, param in model.named_parameters():
        if name not in names:
            raise CheckpointError(
                f"{tag_dir} has no optimizer state for parameter {name}; the "
                "model differs from the one that wrote it"
            )
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is None:  # no piece of this parameter in this rank's partition
            continue
        first = 0
        m = STACKED_EXPERT_PARAM.match(name)
        if m:  # this rank's experts start at expert `offset` of the global stack
            first = offsets[m["layer"]] * (param.numel() // param.shape[0])
        where = mapping.lp_fragment_address
        for state in ("fp32", "exp_avg", "exp_avg_sq"):
            target = mapping.hp_fragment if state == "fp32" else mapping.get_optim_state_fragment(state)
            values = shards.read(name, state, first + where.start, where.numel)
            target.data.copy_(values.view_as(target))
    # 3. schedule and counters
    model_states = torch.load(
        tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False, mmap=True
    )
    scheduler = engine.lr_scheduler
    saved_sched = model_states["lr_scheduler"]
    if len(saved_sched["base_lrs"]) != len(base.param_groups):
        raise CheckpointError(
            f"{tag_dir}: the LR schedule has {len(saved_sched['base_lrs'])} "
            f"param groups, this model {len(base.param_groups)}"
        )
    scheduler.load_state_dict(saved_sched)
    for group, lr in zip(base.param_groups, scheduler.get_last_lr(), strict=True):
        group["lr"] = lr
    engine.global_steps = model_states["global_steps"]
    engine.global_samples = model_states["global_samples"]
    engine.skipped_steps = model_states["skipped_steps"]


def _flat_partitions(optimizer) -> list[torch.Tensor]:
    """This rank's fp32 flat partition per param group (ZeRO-1/2 or DeepSpeed's BF16 optimizer)."""
    for attr in ("single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
        if hasattr(optimizer, attr):
            return list(getattr(optimizer, attr))
    raise CheckpointError(
        f"resharding needs ZeRO stage 1 or 2 (DeepSpeed optimizer "
        f"{type(optimizer).__name__}); use parallel.zero_stage=1 or 2"
    )
