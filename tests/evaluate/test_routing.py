"""Routing statistics of evaluated tokens against a hand count on a hand-made router."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from deepseek_moe.config.model import MoEConfig
from deepseek_moe.evaluate.routing import RoutingCounts
from deepseek_moe.model.moe import MoELayer

# Affinities of 5 tokens over 6 experts; the top 2 of each, by hand: {0,1}, {1,2}, {3,0}, {0,1},
# and the last token ({5,4}) is padding, which must not count.
PROBS = [
    [0.50, 0.20, 0.10, 0.10, 0.05, 0.05],
    [0.10, 0.60, 0.15, 0.08, 0.04, 0.03],
    [0.30, 0.05, 0.05, 0.40, 0.10, 0.10],
    [0.45, 0.35, 0.05, 0.05, 0.05, 0.05],
    [0.02, 0.03, 0.04, 0.05, 0.06, 0.80],
]


class _OneLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = MoELayer(6, MoEConfig(n_routed_experts=6, n_shared_experts=0, top_k=2), layer_idx=3)
        with torch.no_grad():
            self.layer.gate.weight.copy_(torch.eye(6))  # logits = the token vector
        self.ep_size = 1

    def moe_layers(self):
        yield self.layer


def test_routing_stats_against_a_hand_count():
    model = _OneLayer().eval()
    counts = RoutingCounts(model)
    counts.valid_tokens = 4
    with torch.no_grad():
        model.layer(torch.tensor(PROBS).log())
    (got,) = counts.metrics(torch.device("cpu"))
    # expert 0: tokens 0, 2, 3; expert 1: 0, 1, 3; expert 2: 1; expert 3: 2; 4 and 5: none
    assert got["layer"] == 3 and got["tokens"] == 4
    assert got["load"] == pytest.approx([3 / 8, 3 / 8, 1 / 8, 1 / 8, 0, 0])
    assert got["dead_experts"] == [4, 5]
    assert got["load_imbalance"] == pytest.approx(3 / 8 * 6)
    assert (got["max_expert_frac"], got["min_expert_frac"]) == pytest.approx((3 / 8, 0.0))
    entropy = sum(-sum(p * math.log(p) for p in row) for row in PROBS[:4]) / 4
    assert got["router_entropy"] == pytest.approx(entropy, rel=1e-5)
    # the layer's own (training) statistics saw nothing
    assert model.layer.stats.counters.sum() == 0
    counts.remove()
    model.layer(torch.tensor(PROBS).log())
    assert counts.metrics(torch.device("cpu"))[0]["tokens"] == 4  # hooks removed
