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

import torch.distributed as dist

from deepseek_moe.config.parallel import check_ep_world

__all__ = [
    "expert_group_name",
    "ensure_ep_groups",
    "get_ep_group",
    "get_edp_group",
    "get_ep_rank",
]


def expert_group_name(ep_size: int) -> str:
    """DeepSpeed's name for the groups of EP size `ep_size` (also each expert param's `group_name`)."""
    return f"ep_size_{ep_size}"


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

    check_ep_world(ep_size, dist.get_world_size())
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
