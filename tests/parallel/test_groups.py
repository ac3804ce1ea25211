"""EP / EDP group layout and ep_size validation."""

import pytest

from deepseek_moe.config.model import MoEConfig
from deepseek_moe.parallel.groups import ensure_ep_groups, get_ep_rank, validate_ep_size
from tests.distributed import run_distributed


def _idempotent(rank, world):
    first = ensure_ep_groups(2)
    again = ensure_ep_groups(2)  # must not create (or hang creating) groups twice
    return first[0] is again[0] and first[1] is again[1] and get_ep_rank(2) == rank


def test_ensure_ep_groups_is_idempotent():
    # the 4-rank layout ({0,1},{2,3} / {0,2},{1,3}) is checked in test_ep_equivalence.py
    assert run_distributed(_idempotent, 2) == [True, True]


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


def test_zero0_with_clipping_rejected_under_ep():
    with pytest.raises(ValueError, match="zero_stage=1 or 2"):
        validate_ep_size(2, 2, _moe(), zero_stage=0, grad_clip=1.0)
    validate_ep_size(2, 2, _moe(), zero_stage=0, grad_clip=0.0)  # no clipping: fine
    validate_ep_size(1, 2, _moe(), zero_stage=0, grad_clip=1.0)  # no EP: fine
    validate_ep_size(2, 2, _moe(), zero_stage=1, grad_clip=1.0)


def test_validate_ep_size_ok():
    validate_ep_size(2, 4, _moe(n_groups=4, topk_groups=2))
    # no device limit (topk_groups == n_groups): n_groups need not map onto ranks
    validate_ep_size(4, 4, _moe(n_groups=1, topk_groups=1))
    validate_ep_size(1, 3, None)
