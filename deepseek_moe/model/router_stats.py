"""Per-layer router statistics, accumulated in buffers during training forwards.

The module accumulates; the trainer reads (and, under DP/EP, may all-reduce the buffers with
SUM before reading) and logs. `compute_metrics(reset=True)` returns plain floats.
"""

from __future__ import annotations

import torch

from deepseek_moe.model.buffers import KeepBufferDtype
from deepseek_moe.model.losses import groups_reached


class RouterStats(KeepBufferDtype):
    """Buffers (fp64, not persistent):
    - tokens_per_expert_E: selections per global expert (before capacity dropping)
    - counters [6]: tokens, entropy_sum, dropped_copies, total_copies, groups_sum, ranks_sum
      (groups = the n_groups routing groups, ranks = EP ranks: distinct ones reached per token)
    """

    _keep_dtype_buffers = ("tokens_per_expert_E", "counters")

    def __init__(self, num_experts: int, n_groups: int, num_ranks: int) -> None:
        super().__init__()
        self.num_experts, self.n_groups, self.num_ranks = num_experts, n_groups, num_ranks
        self.register_buffer(
            "tokens_per_expert_E", torch.zeros(num_experts, dtype=torch.float64), persistent=False
        )
        self.register_buffer("counters", torch.zeros(6, dtype=torch.float64), persistent=False)

    @torch.no_grad()
    def update(
        self, *, probs_TE: torch.Tensor, ids_TK: torch.Tensor, kept_TK: torch.Tensor, counts_E: torch.Tensor
    ) -> None:
        """probs_TE: normalised affinities; ids_TK: selected experts; kept_TK: bool not dropped;
        counts_E: selections per expert (`losses.expert_counts(ids_TK, E)`)."""
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
                (~kept_TK).sum().float(),
                torch.full((), float(ids_TK.numel()), device=entropy.device),
                groups,
                ranks,
            ]
        ).to(self.counters)

    @torch.no_grad()
    def compute_metrics(self, reset: bool = True) -> dict[str, float]:
        load = self.tokens_per_expert_E
        tokens, entropy, dropped, copies, groups, ranks = self.counters.tolist()
        out: dict[str, float] = {}
        if tokens > 0:
            out = {
                "load_imbalance": float(load.max() / load.mean()),
                "router_entropy": entropy / tokens,
                "dropped_frac": dropped / copies,
                "ranks_per_token": ranks / tokens,
                "groups_per_token": groups / tokens,
                "max_expert_frac": float(load.max() / load.sum()),
                "min_expert_frac": float(load.min() / load.sum()),
            }
        if reset:
            self.reset()
        return out

    def reset(self) -> None:
        self.tokens_per_expert_E.zero_()
        self.counters.zero_()
