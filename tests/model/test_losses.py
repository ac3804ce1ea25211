"""Balance losses against hand-computed values (formulas in the reference doc)."""

import math

import pytest
import torch

from deepseek_moe.model import losses

PROBS = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.2, 0.1, 0.3, 0.4]])  # P = [.15, .15, .3, .4]
IDS = torch.tensor([[3, 2], [3, 1]])  # counts [0, 1, 1, 2]


def test_expert_balance_hand_computed():
    # f = E/(K T) * counts = [0, 1, 1, 2]; sum f P = 0.15 + 0.3 + 0.8 = 1.25
    out = losses.expert_balance_loss(probs_TE=PROBS, ids_TK=IDS, alpha=0.1)
    torch.testing.assert_close(out, torch.tensor(0.125))


def test_expert_balance_equals_alpha_when_balanced():
    probs = torch.full((8, 4), 0.25)
    ids = torch.tensor([[0, 1], [2, 3]] * 4)
    out = losses.expert_balance_loss(probs_TE=probs, ids_TK=ids, alpha=0.01)
    torch.testing.assert_close(out, torch.tensor(0.01))


def test_expert_balance_gradient_is_f_over_T():
    probs = PROBS.clone().requires_grad_(True)
    losses.expert_balance_loss(probs_TE=probs, ids_TK=IDS, alpha=1.0).backward()
    f = torch.tensor([0.0, 1.0, 1.0, 2.0])
    torch.testing.assert_close(probs.grad, (f / 2).expand(2, 4))


def test_seq_expert_balance_hand_computed():
    # Sequence 0: f = 4/2*[0,0,1,1], P = [.1,.2,.3,.4] -> 1.4; sequence 1: f = [0,2,0,2] -> 1.0.
    out = losses.seq_expert_balance_loss(probs_BSE=PROBS.view(2, 1, 4), ids_BSK=IDS.view(2, 1, 2), alpha=1.0)
    torch.testing.assert_close(out, torch.tensor(1.2))
    # One sequence holding every token = the batch-level loss.
    whole = losses.seq_expert_balance_loss(
        probs_BSE=PROBS.view(1, 2, 4), ids_BSK=IDS.view(1, 2, 2), alpha=1.0
    )
    torch.testing.assert_close(whole, torch.tensor(1.25))


def test_device_balance_hand_computed():
    # Groups {0,1}, {2,3}: f' = [0.5, 1.5], P' = [0.3, 0.7] -> 0.15 + 1.05 = 1.2
    out = losses.device_balance_loss(probs_TE=PROBS, ids_TK=IDS, n_groups=2, alpha=0.5)
    torch.testing.assert_close(out, torch.tensor(0.6))


def test_comm_balance_hand_computed():
    # Token 0 reaches group 1 only, token 1 reaches groups 0 and 1: sent = [1, 2].
    # f'' = G/(M T) * sent = [1, 2]; P'' = [0.3, 0.7] -> 0.3 + 1.4 = 1.7
    out = losses.comm_balance_loss(probs_TE=PROBS, ids_TK=IDS, n_groups=2, topk_groups=1, alpha=1.0)
    torch.testing.assert_close(out, torch.tensor(1.7))


def test_z_loss_hand_computed():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    out = losses.router_z_loss(logits_TE=logits, coef=0.1)
    expected = 0.1 * (math.log(2.0) ** 2 + math.log(4.0) ** 2) / 2
    torch.testing.assert_close(out, torch.tensor(expected))


def test_losses_are_keyword_only():
    with pytest.raises(TypeError):
        losses.expert_balance_loss(PROBS, IDS, 0.1)  # type: ignore[misc]
