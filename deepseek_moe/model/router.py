"""Top-k router: fp32 affinities -> (device-limited) top-k -> gates.

Shapes: T tokens, D model dim, E routed experts, K top-k, G groups (devices).

Rules (DeepSeekMoE arXiv 2401.06066, DeepSeek-V2 arXiv 2405.04434, DeepSeek-V3 arXiv 2412.19437):
- s_TE = softmax(x W^T) (DeepSeekMoE, V2) or sigmoid(x W^T) (V3), computed in fp32.
- Selection uses s + b where b is the V3 selection-only bias (zero unless bias_update_rate > 0);
  the gates use the unbiased s gathered at the selected ids.
- Device-limited routing (V2 sec. 2.2.2): group g = experts [g*E/G, (g+1)*E/G); group score =
  max selection score of its experts; keep the top M groups; top-K inside them. This is HF
  deepseek_v2 `group_limited_greedy`. We use the V2 max rule also for sigmoid/V3-style configs
  (HF V3 scores a group by its top-2 sum): the paper we follow for routing limits is V2, and
  one rule keeps "groups = EP ranks" simple to reason about. With M = G it is plain top-k.
- Gates: g = s at the selected ids; renormalised to sum 1 if norm_topk_prob (V3; DeepSeekMoE
  does NOT renormalise); then multiplied by routed_scaling_factor (V2).
- Analysis only (DeepSeekMoE Fig. 4, redundancy among routed experts): `skip_top=R` removes,
  per token, the R experts with the highest selection score (s + b) and takes the top-K of the
  rest, i.e. ranks R..R+K-1; gates are still those experts' own s (then the rules above).
  Under device-limited routing the R experts are set to -inf BEFORE the group scores, so the
  groups are chosen among what is left. R = 0 (default) runs the plain code path. Set it on a
  model with `DeepSeekMoEForCausalLM.disable_top_experts(R)`; training never uses it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from deepseek_moe.config.model import MoEConfig
from deepseek_moe.model.buffers import KeepBufferDtype


@dataclass
class RouterOutput:
    logits_TE: torch.Tensor
    """fp32 router logits (noise included in training if router_noise_std > 0)."""
    scores_TE: torch.Tensor
    """fp32 affinities s (softmax or sigmoid of the logits); these carry the router gradient."""
    ids_TK: torch.Tensor
    """int64 selected global expert ids, best first."""
    weights_TK: torch.Tensor
    """fp32 gates for the selected experts."""


def device_limited_topk(
    select_TE: torch.Tensor, *, top_k: int, n_groups: int, topk_groups: int
) -> torch.Tensor:
    """ids_TK of the top_k experts among the topk_groups best groups (group score = max).

    With topk_groups == n_groups it is exactly torch.topk(select_TE, top_k).
    """
    if topk_groups >= n_groups:
        return torch.topk(select_TE, top_k, dim=-1).indices
    T, E = select_TE.shape
    group_TGe = select_TE.view(T, n_groups, E // n_groups)
    group_TG = group_TGe.max(dim=-1).values
    keep_TM = torch.topk(group_TG, topk_groups, dim=-1).indices
    keep_TG = torch.zeros_like(group_TG, dtype=torch.bool).scatter_(1, keep_TM, True)
    masked_TE = select_TE.masked_fill(~keep_TG.repeat_interleave(E // n_groups, dim=1), float("-inf"))
    return torch.topk(masked_TE, top_k, dim=-1).indices


def route(
    logits_TE: torch.Tensor,
    *,
    top_k: int,
    n_groups: int = 1,
    topk_groups: int = 1,
    scoring_func: str = "softmax",
    norm_topk_prob: bool = False,
    routed_scaling_factor: float = 1.0,
    bias_E: Optional[torch.Tensor] = None,
    skip_top: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pure routing rule. logits_TE (fp32) -> (scores_TE, ids_TK, weights_TK).

    `skip_top` R > 0 (analysis): the R best experts of each token are excluded before the
    (device-limited) top-k, see the module docstring; `check_skip_top` says which R fit."""
    if scoring_func == "softmax":
        scores_TE = logits_TE.softmax(dim=-1)
    elif scoring_func == "sigmoid":
        scores_TE = logits_TE.sigmoid()
    else:
        raise ValueError(f"scoring_func={scoring_func!r} must be 'softmax' or 'sigmoid'.")
    with torch.no_grad():
        # NOTE: the bias only changes which experts are selected, never the gate values.
        select_TE = scores_TE if bias_E is None else scores_TE + bias_E
        if skip_top:
            best_TR = torch.topk(select_TE, skip_top, dim=-1).indices
            select_TE = select_TE.scatter(1, best_TR, float("-inf"))
        ids_TK = device_limited_topk(select_TE, top_k=top_k, n_groups=n_groups, topk_groups=topk_groups)
    weights_TK = scores_TE.gather(1, ids_TK)
    if norm_topk_prob:
        weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
    if routed_scaling_factor != 1.0:
        weights_TK = weights_TK * routed_scaling_factor
    return scores_TE, ids_TK, weights_TK


def check_skip_top(skip_top: int, cfg: MoEConfig) -> None:
    """ValueError unless `skip_top` experts can be excluded per token and top_k still chosen
    among the rest: R + top_k <= the experts of the topk_groups groups a token may reach (all
    E without device-limited routing; the R may all fall in the kept groups)."""
    reachable = cfg.n_routed_experts // cfg.n_groups * min(cfg.topk_groups, cfg.n_groups)
    if skip_top < 0 or skip_top + cfg.top_k > reachable:
        limit = "" if reachable == cfg.n_routed_experts else f" of the {cfg.topk_groups} kept groups"
        raise ValueError(
            f"disabling the top {skip_top} experts needs 0 <= {skip_top} and {skip_top} + "
            f"top_k={cfg.top_k} <= {reachable} routed experts{limit}; use at most "
            f"{reachable - cfg.top_k}"
        )


class Router(KeepBufferDtype):
    """The `gate` of an MoE layer: weight [E, D] (HF key `mlp.gate.weight`).

    Buffers:
    - `e_score_correction_bias` [E] fp32 (persistent, HF V3 name): V3 selection bias.
    - `pending_load_E` [E] fp32 (not persistent): token copies per expert selected since the
      last `update_bias()`, added by `record_load` (the MoE layer hands it the per-expert
      counts it computed once for the forward) when bias_update_rate > 0. Under DP/EP
      `update_bias(reduce_sum)` first sums it over the ranks with the collective it is given.
    Both stay fp32 when the module is cast to bf16 (see buffers.py).

    `skip_top` (attribute, default 0): the analysis knob of `route` (exclude each token's R
    best experts); set through `DeepSeekMoEForCausalLM.disable_top_experts`, never by training.
    """

    _keep_dtype_buffers = ("e_score_correction_bias", "pending_load_E")

    def __init__(self, dim: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, dim))
        E = cfg.n_routed_experts
        self.register_buffer("e_score_correction_bias", torch.zeros(E, dtype=torch.float32))
        self.register_buffer("pending_load_E", torch.zeros(E, dtype=torch.float32), persistent=False)
        self.skip_top = 0

    def forward(self, x_TD: torch.Tensor) -> RouterOutput:
        cfg = self.cfg
        # NOTE: router math in fp32 (softmax over many experts and top-k ties are precision
        # sensitive), whatever the activation dtype.
        logits_TE = F.linear(x_TD.float(), self.weight.float())
        if self.training and cfg.router_noise_std > 0:
            logits_TE = logits_TE + torch.randn_like(logits_TE) * cfg.router_noise_std
        use_bias = cfg.bias_update_rate > 0
        scores_TE, ids_TK, weights_TK = route(
            logits_TE,
            top_k=cfg.top_k,
            n_groups=cfg.n_groups,
            topk_groups=cfg.topk_groups,
            scoring_func=cfg.scoring_func,
            norm_topk_prob=cfg.norm_topk_prob,
            routed_scaling_factor=cfg.routed_scaling_factor,
            bias_E=self.e_score_correction_bias if use_bias else None,
            skip_top=self.skip_top,
        )
        return RouterOutput(logits_TE, scores_TE, ids_TK, weights_TK)

    @torch.no_grad()
    def record_load(self, counts_E: torch.Tensor) -> None:
        """Add one training forward's selections per expert (`count_ids(ids_TK, E)`) to the V3
        bias loads; no-op when the bias is off. The caller decides what counts (training
        forwards, not their activation-checkpointing recompute, not evaluation)."""
        if self.cfg.bias_update_rate > 0:
            self.pending_load_E += counts_E.to(self.pending_load_E.dtype)

    @torch.no_grad()
    def update_bias(self, reduce_sum: Optional[Callable[[list[torch.Tensor]], None]] = None) -> None:
        """V3 aux-free update: b -= rate * sign(load - mean(load)); then clear the loads.

        Call once per optimizer step, outside backward, on every rank. `reduce_sum` (in place,
        e.g. `deepseek_moe.train.distributed.reduce_sum_`) first sums the loads over the
        data-parallel ranks, so every rank applies the same update to its copy of the bias; the
        router never calls torch.distributed itself. No-op if off or nothing accumulated.
        """
        rate = self.cfg.bias_update_rate
        load = self.pending_load_E
        if rate > 0 and reduce_sum is not None:
            reduce_sum([load])
        if rate > 0 and load.sum() > 0:
            self.e_score_correction_bias -= rate * torch.sign(load - load.mean())
        load.zero_()
