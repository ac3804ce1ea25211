"""Expert-parallel (EP) and expert-data-parallel (EDP) process groups, via DeepSpeed.

The world of W ranks is data-parallel for everything except routed experts. With `ep_size = P`
(DeepSpeed's "E + D" layout, `use_data_before_expert_parallel_=False`):

    EP  groups: consecutive ranks  [0..P-1], [P..2P-1], ...   tokens move by all-to-all here;
                rank r of an EP group owns routed experts [r*E/P, (r+1)*E/P)
    EDP groups: strided ranks      [i, i+P, i+2P, ...]         gradients of the same experts
                are averaged here (DeepSpeed divides by the full DP world size, so the expert
                gradient is the same average over the global batch as a dense gradient)
    DP  group : all W ranks                                      attention, embeddings, router,
                                                                 shared experts

W=4, P=2: EP {0,1} {2,3}; EDP {0,2} {1,3}. Consecutive EP ranks keep the all-to-all inside a
node when P <= GPUs per node.

We create the groups through `deepspeed.utils.groups` (not our own `new_group` calls) because
the engine and the ZeRO optimizer look them up there by name (`"ep_size_<P>"`): expert-gradient
reduction, ZeRO partitioning of expert param groups, expert checkpoint file numbering.
"""

from __future__ import annotations

from typing import Optional

import torch.distributed as dist

from deepseek_moe.errors import ConfigError

__all__ = [
    "expert_group_name",
    "validate_ep_size",
    "ensure_ep_groups",
    "get_ep_group",
    "get_edp_group",
    "get_ep_rank",
]


def expert_group_name(ep_size: int) -> str:
    """DeepSpeed's name for the groups of EP size `ep_size` (also each expert param's `group_name`)."""
    return f"ep_size_{ep_size}"


def validate_ep_size(
    ep_size: int,
    world_size: int,
    moe,
    *,
    zero_stage: Optional[int] = None,
    grad_clip: float = 0.0,
) -> None:
    """Raise ValueError unless `ep_size` fits the world and the MoE config (`MoEConfig`).

    - `ep_size` must divide the world size (EP groups tile the data-parallel world);
    - `n_routed_experts % ep_size == 0` (every rank holds the same number of experts);
    - device-limited routing (`topk_groups < n_groups`) is about EP ranks, so the routing groups
      must map onto ranks: `n_groups % ep_size == 0` (each rank holds n_groups/ep_size groups).
    - the device-level and communication balance losses (`device_aux_alpha`, `comm_aux_alpha`)
      are about EP ranks: with ep_size > 1 they need `n_groups == ep_size` (ConfigError).
    - pass `zero_stage` and `grad_clip` too: DeepSpeed's ZeRO-0 fp32 clipping averages each
      rank's LOCAL grad norm, which under EP > 1 sees only that rank's experts, so the clip is
      wrong; ZeRO-1/2 count every expert once (tested), hence EP > 1 with clipping needs them.
    """
    if ep_size < 1:
        raise ValueError(f"parallel.ep_size={ep_size} must be >= 1")
    if world_size % ep_size != 0:
        raise ValueError(
            f"parallel.ep_size={ep_size} must divide the world size {world_size} (number of "
            f"processes); launch a multiple of {ep_size} processes or set parallel.ep_size to a "
            f"divisor of {world_size}"
        )
    if moe is None:
        if ep_size > 1:
            raise ValueError(f"parallel.ep_size={ep_size} needs an MoE model, but model.moe is null")
        return
    E = moe.n_routed_experts
    if E % ep_size != 0:
        raise ValueError(
            f"model.moe.n_routed_experts={E} is not divisible by parallel.ep_size={ep_size}; "
            "every EP rank must hold the same number of experts"
        )
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
        raise ValueError(
            f"device-limited routing (model.moe.topk_groups={moe.topk_groups} < "
            f"n_groups={moe.n_groups}) needs model.moe.n_groups divisible by "
            f"parallel.ep_size={ep_size} so that routing groups are EP ranks; set "
            f"n_groups={ep_size} (one group per rank)"
        )
    if ep_size > 1 and zero_stage == 0 and grad_clip > 0:
        raise ValueError(
            f"parallel.zero_stage=0 with parallel.ep_size={ep_size} and gradient clipping "
            f"(optim.grad_clip={grad_clip}): DeepSpeed's stage-0 clipping averages per-rank grad "
            "norms that each see only that rank's experts, so the clip would be wrong; use "
            "parallel.zero_stage=1 or 2 (or disable clipping)"
        )


def _ensure_deepspeed_comm() -> None:
    import deepspeed.comm as ds_dist

    if not ds_dist.is_initialized():
        if not dist.is_initialized():
            raise RuntimeError(
                "expert parallelism needs torch.distributed: call deepspeed.init_distributed() "
                "(or torch.distributed.init_process_group) before parallelize_moe"
            )
        # Wraps the existing default process group; creates nothing new.
        import deepspeed

        deepspeed.init_distributed(dist_backend=dist.get_backend())


def ensure_ep_groups(ep_size: int) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """Create (once; collective: every rank must call it) and return (EP group, EDP group)."""
    _ensure_deepspeed_comm()
    from deepspeed.utils import groups

    world = dist.get_world_size()
    if world % ep_size != 0:
        raise ValueError(f"parallel.ep_size={ep_size} must divide the world size {world}")
    name = expert_group_name(ep_size)
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size, use_data_before_expert_parallel_=False)
    return get_ep_group(ep_size), get_edp_group(ep_size)


def get_ep_group(ep_size: int) -> dist.ProcessGroup:
    from deepspeed.utils import groups

    return groups._get_expert_parallel_group(expert_group_name(ep_size))


def get_edp_group(ep_size: int) -> dist.ProcessGroup:
    from deepspeed.utils import groups

    return groups._get_expert_data_parallel_group(expert_group_name(ep_size))


def get_ep_rank(ep_size: int) -> int:
    """This rank's index inside its EP group (= which slice of experts it owns)."""
    return dist.get_rank(group=get_ep_group(ep_size))
