"""The DeepSeekMoE FFN: router -> dispatcher -> routed experts -> + shared experts.

Shapes: B batch, S sequence, T = B*S local tokens, D model dim, H expert hidden, E global routed
experts, K top-k, N token copies on this rank, L local experts.

Interface (stable; the EP helper and the trainer build on it):

    layer = MoELayer(dim, moe_cfg, layer_idx=L, ep_rank=0, ep_size=1)
    y_BSD, aux = layer(x_BSD)       # also accepts x_TD (treated as one sequence)

- `aux: dict[str, Tensor]` holds the ALPHA-SCALED balance losses enabled in the config, keys
  "expert_balance" (per-sequence when seq_aux), "device_balance", "comm_balance", "z_loss".
  Empty dict if all are off. The model sums them over layers into `aux_loss`.
- Submodules / state-dict keys (HF layout): `gate.weight` [E, D] (+ buffer
  `gate.e_score_correction_bias` [E]), `experts.<l>.{gate,up,down}_proj.weight` for the
  L = E / ep_size LOCAL experts (l is local; global id = local_expert_offset + l; stored
  stacked as `experts.gate_up_proj` / `experts.down_proj`, see experts.py),
  `shared_experts.{gate,up,down}_proj.weight` (one fused SwiGLU of width n_shared * H; absent
  when n_shared_experts = 0).
- `self.dispatcher` (`LocalDispatcher` until `apply_ep`) is the parallelism seam; see
  `dispatch.py`. Expert parallelism is something the layer does to itself:
  `layer.apply_ep(ep_rank=r, ep_size=P, make_dispatcher=...)` keeps rank r's L = E/P experts,
  installs the (all-to-all) dispatcher and makes the statistics count EP ranks; the model's
  `apply_ep` calls it on every MoE layer (deepseek_moe/parallel/expert_parallel.py is the caller).
- The router sees all E experts on every rank (gate weight replicated); routing is computed on
  the local tokens only. Device-limited routing groups = `moe_cfg.n_groups` contiguous expert
  blocks; under EP choose n_groups = ep_size so groups are ranks.
- Capacity (capacity_factor not None, training only): capacity C = ceil(cf * T * K / E) copies
  per expert over the local T tokens; the lowest-affinity copies of an overfull expert get id -1
  before dispatch (the dispatcher skips them; their output is 0). Balance losses and load stats
  use the selections BEFORE dropping (that is what the router chose).
- Tokens per expert are counted ONCE per forward (`count_ids(ids_TK, E)`, the selections
  before dropping) and that histogram is handed to whoever needs it: the dispatcher (the kept
  copies: the same counts, capped at the capacity when there is one), the expert and device
  balance losses, the V3 bias loads and the statistics.
- Statistics for logging accumulate in `self.stats` (training forwards that build a graph, i.e.
  not under `model.eval()` nor `torch.no_grad()`, and not the activation-checkpointing replay):
  `self.stats.compute_metrics(reset=True)`, or reduced over ranks by the trainer.
  `self.last_counts_E` keeps the selections per expert of the last forward (int64, this rank's
  local tokens).
- The router accumulates loads for the V3 bias (`gate.record_load`, same forwards as the
  statistics) and applies them in `self.gate.update_bias()` (the model's
  `update_router_bias()` calls it on every MoE layer).
- `self.experts` is a `RoutedExperts` as built; `apply_ep(wrap_experts=...)` may dress it for a
  training engine (DeepSpeed's MoE marker), keeping its forward contract. `routed_experts` is
  the `RoutedExperts` either way.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import nn

from deepseek_moe.config.model import MoEConfig
from deepseek_moe.config.parallel import check_ep_experts
from deepseek_moe.model import losses
from deepseek_moe.model.dispatch import Dispatcher, LocalDispatcher, count_ids
from deepseek_moe.model.experts import RoutedExperts
from deepseek_moe.model.ffn import SwiGLU
from deepseek_moe.model.router import Router
from deepseek_moe.model.router_stats import RouterStats


def check_ep_rank(ep_rank: int, ep_size: int, num_experts: int) -> None:
    """ValueError unless EP rank `ep_rank` of `ep_size` can hold an equal share of the experts
    (the share itself is the config rule `check_ep_experts`, a ConfigError)."""
    check_ep_experts(ep_size, num_experts)
    if not 0 <= ep_rank < ep_size:
        raise ValueError(f"ep_rank={ep_rank} must be in [0, ep_size={ep_size}).")


def capacity_mask(
    ids_TK: torch.Tensor,
    affinity_TK: torch.Tensor,
    *,
    num_experts: int,
    capacity: int,
    counts_E: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """kept_TK bool: per expert, keep the `capacity` highest-affinity copies (ties: lower t*K+k).
    Then the kept copies per expert are `counts_E.clamp(max=capacity)`.

    Pure function; no Python loop over tokens or experts. `counts_E`: `count_ids(ids_TK, E)`
    when the caller has it.
    """
    ids_N = ids_TK.reshape(-1)
    aff_N = affinity_TK.reshape(-1)
    by_aff = torch.argsort(aff_N, descending=True, stable=True)
    order = by_aff[torch.argsort(ids_N[by_aff], stable=True)]  # by expert, then affinity desc
    if counts_E is None:
        counts_E = count_ids(ids_N, num_experts)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    pos_sorted = torch.arange(ids_N.numel(), device=ids_N.device) - starts_E[ids_N[order]]
    kept_N = torch.empty_like(ids_N, dtype=torch.bool)
    kept_N[order] = pos_sorted < capacity
    return kept_N.view_as(ids_TK)


class MoELayer(nn.Module):
    def __init__(
        self,
        dim: int,
        cfg: MoEConfig,
        *,
        layer_idx: int = 0,
        ep_rank: int = 0,
        ep_size: int = 1,
    ) -> None:
        super().__init__()
        E = cfg.n_routed_experts
        check_ep_rank(ep_rank, ep_size, E)
        self.cfg, self.dim, self.layer_idx = cfg, dim, layer_idx
        self.num_experts = E
        self.num_local_experts = E // ep_size
        self.local_expert_offset = ep_rank * self.num_local_experts
        self.gate = Router(dim, cfg)
        self.dispatcher: Dispatcher = LocalDispatcher()
        self.experts: nn.Module = RoutedExperts(
            self.num_local_experts, dim, cfg.moe_intermediate_size, impl=cfg.experts_impl
        )
        self.shared_experts = (
            SwiGLU(dim, cfg.n_shared_experts * cfg.moe_intermediate_size)
            if cfg.n_shared_experts > 0
            else None
        )
        self.stats = RouterStats(E, cfg.n_groups, ep_size)
        self.last_counts_E: Optional[torch.Tensor] = None

    @property
    def routed_experts(self) -> RoutedExperts:
        """The routed experts, whether or not `apply_ep` dressed them for an engine."""
        return getattr(self.experts, "local_experts", self.experts)

    def apply_ep(
        self,
        *,
        ep_rank: int,
        ep_size: int,
        make_dispatcher: Callable[[], Dispatcher],
        wrap_experts: Optional[Callable[[RoutedExperts], nn.Module]] = None,
    ) -> None:
        """Become EP rank `ep_rank` of `ep_size`: keep the routed experts
        [ep_rank*L, (ep_rank+1)*L) (L = E/ep_size), send tokens through `make_dispatcher()` (an
        all-to-all dispatcher when ep_size > 1) and count EP ranks per token in the statistics.

        The layer holds either all E experts (every rank built the full layer from one seed,
        so EP=P starts from the EP=1 weights) or already exactly this rank's (built with the
        same ep_rank/ep_size). `wrap_experts` dresses the kept `RoutedExperts` for a training
        engine; the wrapper keeps its forward and exposes it as `.local_experts`."""
        E = self.num_experts
        check_ep_rank(ep_rank, ep_size, E)
        L = E // ep_size
        experts = self.experts
        if not isinstance(experts, RoutedExperts):
            raise ValueError(f"MoELayer {self.layer_idx} is already parallelized (apply_ep was called)")
        if len(experts) == E:
            experts.keep_experts(ep_rank * L, (ep_rank + 1) * L)
        elif len(experts) != L or self.local_expert_offset != ep_rank * L:
            raise ValueError(
                f"MoELayer {self.layer_idx} holds {len(experts)} experts from offset "
                f"{self.local_expert_offset}; expected all {E}, or the {L} experts of EP rank "
                f"{ep_rank} (offset {ep_rank * L}). Build it with ep_rank={ep_rank}, ep_size={ep_size}"
            )
        self.num_local_experts = L
        self.local_expert_offset = ep_rank * L
        self.experts = experts if wrap_experts is None else wrap_experts(experts)
        self.dispatcher = make_dispatcher()
        self.stats.num_ranks = ep_size

    def forward(self, x: torch.Tensor, replay: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """x_BSD (or x_TD) -> (y of the same shape, alpha-scaled aux losses).

        `replay=True` (the backward recompute under activation checkpointing) computes the same
        outputs but records nothing: statistics, bias loads and last counts were recorded by
        the first forward."""
        cfg, E = self.cfg, self.num_experts
        if self.num_local_experts != E and isinstance(self.dispatcher, LocalDispatcher):
            raise RuntimeError(
                f"MoELayer {self.layer_idx} holds {self.num_local_experts} of {E} experts "
                "(ep_size > 1) but uses LocalDispatcher: assign an all-to-all dispatcher."
            )
        shape = x.shape
        B, S = (1, shape[0]) if x.dim() == 2 else (shape[0], shape[1])
        x_TD = x.reshape(-1, shape[-1])
        T = x_TD.shape[0]

        r = self.gate(x_TD)
        # NOTE: the one per-expert histogram of this forward (selections before dropping).
        counts_E = count_ids(r.ids_TK, E)
        ids_TK, kept_E = r.ids_TK, counts_E
        may_drop = cfg.capacity_factor is not None and self.training
        if may_drop:
            capacity = math.ceil(cfg.capacity_factor * T * cfg.top_k / E)
            with torch.no_grad():
                kept_TK = capacity_mask(
                    ids_TK, r.scores_TE.gather(1, ids_TK), num_experts=E, capacity=capacity, counts_E=counts_E
                )
            ids_TK = torch.where(kept_TK, ids_TK, torch.full_like(ids_TK, -1))
            kept_E = counts_E.clamp(max=capacity)  # capacity_mask keeps min(count, capacity)

        x_ND, counts_L, ctx = self.dispatcher.dispatch(
            x_TD, ids_TK, r.weights_TK, E, counts_E=kept_E, may_drop=may_drop
        )
        y_ND = self.experts(x_ND, counts_L)
        y_TD = self.dispatcher.combine(y_ND, ctx)
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_experts(x_TD)

        probs_TE = r.scores_TE
        if cfg.scoring_func == "sigmoid":  # V3: normalise sigmoid affinities for the losses
            probs_TE = probs_TE / (probs_TE.sum(dim=-1, keepdim=True) + 1e-20)
        aux = self._aux_losses(r.logits_TE, probs_TE, r.ids_TK, counts_E, B, S)
        if replay:
            return y_TD.view(shape), aux
        self.last_counts_E = counts_E
        # Training forwards only: evaluation (eval mode or no_grad) counts in neither the V3
        # bias loads nor the statistics.
        if self.training and torch.is_grad_enabled():
            self.gate.record_load(counts_E)
            if self.stats.enabled:
                self.stats.update(
                    probs_TE=probs_TE.detach(), ids_TK=r.ids_TK, counts_E=counts_E, kept_E=kept_E
                )
        return y_TD.view(shape), aux

    def _aux_losses(self, logits_TE, probs_TE, ids_TK, counts_E, B: int, S: int) -> dict[str, torch.Tensor]:
        cfg, E = self.cfg, self.num_experts
        aux: dict[str, torch.Tensor] = {}
        if cfg.aux_loss_alpha > 0:
            if cfg.seq_aux:
                aux["expert_balance"] = losses.seq_expert_balance_loss(
                    probs_BSE=probs_TE.view(B, S, E), ids_BSK=ids_TK.view(B, S, -1), alpha=cfg.aux_loss_alpha
                )
            else:
                aux["expert_balance"] = losses.expert_balance_loss(
                    probs_TE=probs_TE, ids_TK=ids_TK, alpha=cfg.aux_loss_alpha, counts_E=counts_E
                )
        if cfg.device_aux_alpha > 0 and cfg.n_groups > 1:
            aux["device_balance"] = losses.device_balance_loss(
                probs_TE=probs_TE,
                ids_TK=ids_TK,
                n_groups=cfg.n_groups,
                alpha=cfg.device_aux_alpha,
                counts_E=counts_E,
            )
        if cfg.comm_aux_alpha > 0 and cfg.n_groups > 1:
            aux["comm_balance"] = losses.comm_balance_loss(
                probs_TE=probs_TE,
                ids_TK=ids_TK,
                n_groups=cfg.n_groups,
                topk_groups=cfg.topk_groups,
                alpha=cfg.comm_aux_alpha,
            )
        if cfg.z_loss_coef > 0:
            aux["z_loss"] = losses.router_z_loss(logits_TE=logits_TE, coef=cfg.z_loss_coef)
        return aux
