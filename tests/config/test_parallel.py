"""The expert-parallel rules (deepseek_moe/config/parallel.py)."""

import pytest

from deepseek_moe.config.model import MoEConfig
from deepseek_moe.config.parallel import validate_ep_size


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


def test_device_and_comm_losses_need_groups_equal_to_ep_ranks():
    from deepseek_moe.errors import ConfigError

    with pytest.raises(
        ConfigError,
        match=r"model.moe.device_aux_alpha and model.moe.comm_aux_alpha "
        r".*n_groups=2.*ep_size=4.*Set model.moe.n_groups=4",
    ):
        validate_ep_size(4, 4, _moe(n_groups=2, device_aux_alpha=0.01, comm_aux_alpha=0.01))
    validate_ep_size(4, 4, _moe(n_groups=4, topk_groups=2, device_aux_alpha=0.01, comm_aux_alpha=0.01))
    validate_ep_size(4, 4, _moe(n_groups=2, topk_groups=2))  # no device-level loss, no limit
    validate_ep_size(1, 4, _moe(n_groups=2, device_aux_alpha=0.01))  # no EP: groups are virtual
