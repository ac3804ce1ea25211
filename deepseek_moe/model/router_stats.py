"""Per-layer router statistics, accumulated in buffers during training forwards.

The module accumulates; the trainer reduces (one all-reduce of every layer's buffers, one
device-to-host transfer, on logging steps only: `deepseek_moe/train/moe_health.py`) and logs.
`compute_metrics(reset=True)` is the single-process reading: one transfer of the layer's buffers,
then `router_metrics_from` on the host.
"""

from __future__ import annotations

from typing import Sequence

import torch

from deepseek_moe.model.buffers import KeepBufferDtype
from deepseek_moe.model.losses import groups_reached

COUNTERS = ("tokens", "entropy_sum", "dropped_copies", "total_copies", "groups_sum", "ranks_sum")
"""The fields of `RouterStats.counters`, in order."""


def router_metrics_from(load_E: Sequence[float], counters: Sequence[float]) -> dict[str, float]:
    """Ratios of a layer's accumulated buffers (host values; empty when no token was counted):
    `load_imbalance` (max/mean tokens per expert), `router_entropy` (mean per token),
    `dropped_frac`, `ranks_per_token`, `groups_per_token`, `max_expert_frac`, `min_expert_frac`.

    Pure: the trainer passes buffers summed over ranks, so the ratios are the global batch's."""
    tokens, entropy, dropped, copies, groups, ranks = (float(c) for c in counters)
    if tokens <= 0:
        return {}
    load = [float(v) for v in load_E]
    total = sum(load)
    return {
        "load_imbalance": max(load) * len(load) / total,
        "router_entropy": entropy / tokens,
        "dropped_frac": dropped / copies,
        "ranks_per_token": ranks / tokens,
        "groups_per_token": groups / tokens,
        "max_expert_frac": max(load) / total,
        "min_expert_frac": min(load) / total,
    }


class RouterStats(KeepBufferDtype):
    """Buffers (fp64, not persistent):
    - tokens_per_expert_E: selections per global expert (before capacity dropping)
    - counters [6]: tokens, entropy_sum, dropped_copies, total_copies, groups_sum, ranks_sum
      (groups = the n_groups routing groups, ranks = EP ranks: distinct ones reached per token)

    `enabled` (default True): the MoE layer updates the buffers only while it is set
    (`health.expert_stats=false` turns it off for a run).
    """

    _keep_dtype_buffers = ("tokens_per_expert_E", "counters")

    def __init__(self, num_experts: int, n_groups: int, num_ranks: int) -> None:
        super().__init__()
        self.num_experts, self.n_groups, self.num_ranks = num_experts, n_groups, num_ranks
        self.enabled = True
        self.register_buffer(
            "tokens_per_expert_E", torch.zeros(num_experts, dtype=torch.float64), persistent=False
        )
        self.register_buffer("counters", torch.zeros(len(COUNTERS), dtype=torch.float64), persistent=False)

    @torch.no_grad()
    def update(
        self, *, probs_TE: torch.Tensor, ids_TK: torch.Tensor, counts_E: torch.Tensor, kept_E: torch.Tensor
    ) -> None:
        """probs_TE: normalised affinities; ids_TK: selected experts; counts_E: selections per
        expert (the layer's one `count_ids(ids_TK, E)` of the forward); kept_E: those not
        dropped by capacity (= counts_E when dropless)."""
        T, E = probs_TE.shape
        self.tokens_per_expert_E += counts_E.double()
        entropy = torch.special.entr(probs_TE.float()).sum()  # -sum p log p, 0 log 0 = 0
        # distinct groups / EP ranks each token reached, summed over tokens
        groups = groups_reached(ids_TK, E, self.n_groups).sum().float()
        ranks = groups_reached(ids_TK, E, self.num_ranks).sum().float()
        # No host sync: everything stays a tensor on the buffers' device.
        self.counters += torch.stack(
            [
                # torch.full, not torch.tensor: a blocking host-to-device copy would sync on CUDA
                torch.full((), float(T), device=entropy.device),
                entropy,
                (counts_E - kept_E).sum().float(),
                torch.full((), float(ids_TK.numel()), device=entropy.device),
                groups,
                ranks,
            ]
        ).to(self.counters)

    @torch.no_grad()
    def compute_metrics(self, reset: bool = True) -> dict[str, float]:
        """`router_metrics_from` this layer's buffers (this process's counts only), read with
        one device-to-host transfer."""
        E = self.num_experts
        values = torch.cat([self.tokens_per_expert_E, self.counters]).tolist()
        out = router_metrics_from(values[:E], values[E:])
        if reset:
            self.reset()
        return out

    def reset(self) -> None:
        self.tokens_per_expert_E.zero_()
        self.counters.zero_()
