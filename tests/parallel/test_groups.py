"""EP / EDP group layout (the ep_size rules: tests/config/test_parallel.py)."""

import pytest
import torch

from deepseek_moe.parallel.groups import ensure_ep_groups, get_ep_rank
from deepseek_moe.testing.distributed import run_distributed


def _idempotent(rank, world):
    first = ensure_ep_groups(2)
    again = ensure_ep_groups(2)  # must not create (or hang creating) groups twice
    return first[0] is again[0] and first[1] is again[1] and get_ep_rank(2) == rank


def test_ensure_ep_groups_is_idempotent():
    # the 4-rank layout ({0,1},{2,3} / {0,2},{1,3}) is checked in test_ep_equivalence.py
    assert run_distributed(_idempotent, 2) == [True, True]


def test_device_loss_over_virtual_groups_misses_idle_ranks():
    """Why the groups must be the ranks. EP=4 over 8 experts (2 per rank); every token picks
    experts 0 and 4 (ranks 0 and 2; ranks 1 and 3 idle), affinity 0.5 each. Hand computation:
    f_0 = f_4 = E/(K T) * T = 4. Over 2 virtual groups of 4 experts: f' = (1, 1), P' = (0.5, 0.5)
    -> 1.0, the balanced value. Over the 4 ranks: f' = (2, 0, 2, 0), P' = (0.5, 0, 0.5, 0) -> 2.0,
    while a balanced routing scores 1.0 there too."""
    from deepseek_moe.model.losses import device_balance_loss

    T, E = 6, 8
    probs = torch.zeros(T, E)
    probs[:, [0, 4]] = 0.5
    ids = torch.tensor([[0, 4]] * T)
    assert device_balance_loss(probs_TE=probs, ids_TK=ids, n_groups=2, alpha=1.0).item() == pytest.approx(1.0)
    assert device_balance_loss(probs_TE=probs, ids_TK=ids, n_groups=4, alpha=1.0).item() == pytest.approx(2.0)
    balanced_ids = torch.tensor([[2 * t % E, (2 * t + 1) % E] for t in range(4)])  # every expert once
    uniform = torch.full((4, E), 1 / E)
    assert device_balance_loss(
        probs_TE=uniform, ids_TK=balanced_ids, n_groups=4, alpha=1.0
    ).item() == pytest.approx(1.0)
