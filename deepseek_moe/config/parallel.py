"""Expert-parallel rules that depend on the world size and the MoE config.

Pure checks (no torch.distributed), each rule in one function here: `RunConfig.check_world`
runs them before a run starts; the EP code (deepseek_moe/parallel/, `MoELayer`'s expert split)
and the memory plan run the same functions on what they are given. Every violation is a
ConfigError naming the keys and the fix.
"""

from __future__ import annotations

from typing import Optional

from deepseek_moe.config.model import MoEConfig
from deepseek_moe.errors import ConfigError

__all__ = ["check_ep_experts", "check_ep_world", "validate_ep_size"]


def _check_ep_positive(ep_size: int) -> None:
    if ep_size < 1:
        raise ConfigError(f"parallel.ep_size={ep_size} must be >= 1")


def check_ep_world(ep_size: int, world_size: int) -> None:
    """ConfigError unless `ep_size` >= 1 divides the world size (EP groups tile the world)."""
    _check_ep_positive(ep_size)
    if world_size % ep_size != 0:
        raise ConfigError(
            f"parallel.ep_size={ep_size} must divide the world size {world_size} (number of "
            f"processes); launch a multiple of {ep_size} processes or set parallel.ep_size to a "
            f"divisor of {world_size}"
        )


def check_ep_experts(ep_size: int, n_routed_experts: int) -> None:
    """ConfigError unless `ep_size` >= 1 divides the routed experts (every EP rank holds the
    same number of experts)."""
    _check_ep_positive(ep_size)
    if n_routed_experts % ep_size != 0:
        raise ConfigError(
            f"model.moe.n_routed_experts={n_routed_experts} is not divisible by "
            f"parallel.ep_size={ep_size}; every EP rank must hold the same number of experts"
        )


def validate_ep_size(
    ep_size: int,
    world_size: int,
    moe: Optional[MoEConfig],
    *,
    zero_stage: Optional[int] = None,
    grad_clip: float = 0.0,
) -> None:
    """ConfigError unless `ep_size` fits the world and the MoE config (`MoEConfig`).

    - `ep_size` must divide the world size (EP groups tile the data-parallel world);
    - `n_routed_experts % ep_size == 0` (every rank holds the same number of experts);
    - device-limited routing (`topk_groups < n_groups`) is about EP ranks, so the routing groups
      must map onto ranks: `n_groups % ep_size == 0` (each rank holds n_groups/ep_size groups).
    - the device-level and communication balance losses (`device_aux_alpha`, `comm_aux_alpha`)
      are about EP ranks: with ep_size > 1 they need `n_groups == ep_size`.
    - pass `zero_stage` and `grad_clip` too: DeepSpeed's ZeRO-0 fp32 clipping averages each
      rank's LOCAL grad norm, which under EP > 1 sees only that rank's experts, so the clip is
      wrong; ZeRO-1/2 count every expert once (tested), hence EP > 1 with clipping needs them.
    """
    check_ep_world(ep_size, world_size)
    if moe is None:
        if ep_size > 1:
            raise ConfigError(f"parallel.ep_size={ep_size} needs an MoE model, but model.moe is null")
        return
    check_ep_experts(ep_size, moe.n_routed_experts)
    balance = [k for k in ("device_aux_alpha", "comm_aux_alpha") if getattr(moe, k) > 0]
    if ep_size > 1 and balance and moe.n_groups != ep_size:
        # The device/communication losses balance load over the n_groups expert blocks; they
        # balance the devices only when those blocks ARE the EP ranks. With other n_groups a
        # routing that idles whole ranks can score as well as a balanced one.
        keys = " and ".join(f"model.moe.{k}" for k in balance)
        raise ConfigError(
            f"{keys} balance load over model.moe.n_groups={moe.n_groups} expert groups, but "
            f"parallel.ep_size={ep_size}: the groups must be the EP ranks. Set "
            f"model.moe.n_groups={ep_size} (and model.moe.topk_groups <= {ep_size}), or set "
            f"{' and '.join(f'model.moe.{k}=0' for k in balance)}"
        )
    if moe.topk_groups < moe.n_groups and moe.n_groups % ep_size != 0:
        raise ConfigError(
            f"device-limited routing (model.moe.topk_groups={moe.topk_groups} < "
            f"n_groups={moe.n_groups}) needs model.moe.n_groups divisible by "
            f"parallel.ep_size={ep_size} so that routing groups are EP ranks; set "
            f"n_groups={ep_size} (one group per rank)"
        )
    if ep_size > 1 and zero_stage == 0 and grad_clip > 0:
        raise ConfigError(
            f"parallel.zero_stage=0 with parallel.ep_size={ep_size} and gradient clipping "
            f"(optim.grad_clip={grad_clip}): DeepSpeed's stage-0 clipping averages per-rank grad "
            "norms that each see only that rank's experts, so the clip would be wrong; use "
            "parallel.zero_stage=1 or 2 (or disable clipping)"
        )
