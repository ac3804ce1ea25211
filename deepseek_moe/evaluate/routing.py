"""Per-layer routing statistics of the evaluated tokens (`--routing-stats`).

    counts = RoutingCounts(model)          # forward hooks on every MoE layer's router
    counts.valid_tokens = n                # before each forward: the first n tokens count
    model(...)
    counts.metrics(device)                 # summed over ranks: one dict per MoE layer
    counts.remove()

Each layer gets its own `RouterStats` (the training statistics' buffers and ratios,
`router_metrics_from`), filled from the router's output of every evaluation forward. The
layer's own `stats` (training forwards only) are not touched. Padding rows of a batch sit at
its end, so "the first n tokens" excludes them.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from deepseek_moe.model.dispatch import count_ids
from deepseek_moe.model.router_stats import COUNTERS, RouterStats, router_metrics_from
from deepseek_moe.train.distributed import reduce_sum_


class RoutingCounts:
    """Selections per expert, router entropy and groups/ranks reached, per MoE layer."""

    def __init__(self, model: nn.Module) -> None:
        self.valid_tokens: Optional[int] = None
        """Tokens at the head of the next forward's batch that count (None: all)."""
        self.stats: dict[int, RouterStats] = {}
        self._handles = []
        for layer in model.moe_layers():
            E, cfg = layer.num_experts, layer.cfg
            param = layer.gate.weight
            self.stats[layer.layer_idx] = RouterStats(E, cfg.n_groups, model.ep_size).to(param.device)
            self._handles.append(
                layer.gate.register_forward_hook(self._hook(layer.layer_idx, cfg.scoring_func))
            )

    def _hook(self, layer_idx: int, scoring_func: str):
        @torch.no_grad()
        def record(_router, _inputs, out) -> None:
            T = out.ids_TK.shape[0] if self.valid_tokens is None else self.valid_tokens
            if T == 0:
                return
            ids_TK, probs_TE = out.ids_TK[:T], out.scores_TE[:T]
            if scoring_func == "sigmoid":  # as the MoE layer's statistics: normalised affinities
                probs_TE = probs_TE / (probs_TE.sum(dim=-1, keepdim=True) + 1e-20)
            stats = self.stats[layer_idx]
            counts_E = count_ids(ids_TK, stats.num_experts)
            stats.update(probs_TE=probs_TE, ids_TK=ids_TK, counts_E=counts_E, kept_E=counts_E)

        return record

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def metrics(self, device: torch.device) -> list[dict[str, Any]]:
        """One dict per MoE layer, the buffers summed over ranks (one all-reduce): `layer`,
        `load` (fraction of the selections per expert), `load_imbalance` (max/mean),
        `dead_experts` (ids never selected), `router_entropy` (mean per token), `max_expert_frac`,
        `min_expert_frac`, `groups_per_token`, `ranks_per_token`, `tokens`."""
        layers = sorted(self.stats)
        buffers = [
            torch.cat([self.stats[i].tokens_per_expert_E, self.stats[i].counters]).to(device) for i in layers
        ]
        reduce_sum_(buffers)
        out = []
        for i, values in zip(layers, buffers):
            values = values.tolist()
            E = self.stats[i].num_experts
            load, counters = values[:E], values[E:]
            ratios = router_metrics_from(load, counters)
            total = sum(load)
            out.append(
                {
                    "layer": i,
                    "tokens": int(counters[COUNTERS.index("tokens")]),
                    "load": [v / total if total else 0.0 for v in load],
                    "load_imbalance": ratios.get("load_imbalance"),
                    "dead_experts": [e for e, v in enumerate(load) if v == 0],
                    "router_entropy": ratios.get("router_entropy"),
                    "max_expert_frac": ratios.get("max_expert_frac"),
                    "min_expert_frac": ratios.get("min_expert_frac"),
                    "groups_per_token": ratios.get("groups_per_token"),
                    "ranks_per_token": ratios.get("ranks_per_token"),
                }
            )
        return out
