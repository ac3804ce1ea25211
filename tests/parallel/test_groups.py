"""EP / EDP group layout and ep_size validation."""

import pytest
import torch.distributed as dist

from deepseek_moe.config.model import MoEConfig

from deepseek_moe.parallel.groups import ensure_ep_groups, get_ep_rank, validate_ep_size
from tests.distributed import run_distributed


def _group_ranks(rank, world, ep_size):
    ep, edp = ensure_ep_groups(ep_size)
    ensure_ep_groups(ep_size)  # idempotent: must not create groups twice
    return {
        "ep": dist.get_process_group_ranks(ep),
        "edp": dist.get_process_group_ranks(edp),
        "ep_rank": get_ep_rank(ep_size),
    }


def test_group_layout_world4_ep2():
    out = run_distributed(_group_ranks, 4, 2)
    # hand layout: EP groups are consecutive ranks, EDP groups strided
    assert [o["ep"] for o in out] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [o["edp"] for o in out] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [o["ep_rank"] for o in out] == [0, 1, 0, 1]


def _moe(**kw):
    return MoEConfig(**{"n_routed_experts": 8, "top_k": 2, **kw})


@pytest.mark.parametrize(
    "ep_size, world, moe, match",
    [
        (2, 3, _moe(), "must divide the world size 3"),
        (4, 4, _moe(n_routed_experts=6), "n_routed_experts=6 is not divisible"),
        (4, 4, _moe(n_groups=2, topk_groups=1), "n_groups divisible"),
        (0, 4, _moe(), ">= 1"),
        (2, 2, None, "needs an MoE model"),
    ],
)
def test_validate_ep_size_errors(ep_size, world, moe, match):
    with pytest.raises(ValueError, match=match):
        validate_ep_size(ep_size, world, moe)


def test_validate_ep_size_ok():
    validate_ep_size(2, 4, _moe(n_groups=4, topk_groups=2))
    # no device limit (topk_groups == n_groups): n_groups need not map onto ranks
    validate_ep_size(4, 4, _moe(n_groups=1, topk_groups=1))
    validate_ep_size(1, 3, None)
