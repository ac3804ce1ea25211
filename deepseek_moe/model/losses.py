"""Load-balance losses as pure keyword-only functions (DeepSeekMoE arXiv 2401.06066 eq. 12-17,
communication balance from DeepSeek-V2 arXiv 2405.04434 eq. 32-34, the sequence-wise variant
from DeepSeek-V3 arXiv 2412.19437).

Shapes: T tokens, E routed experts, K top-k, G device groups (D in the paper), M groups a
token may reach, B sequences of S tokens.

- `probs_TE` are the affinities s_{i,t} that carry the router gradient. For softmax scoring
  they are the softmax; for sigmoid scoring (V3) the caller passes s / sum_j s_j (V3 eq. 19).
- `ids_TK` are the SELECTED experts (before any capacity dropping): f_i counts selections. The
  expert and device losses also take those counts (`counts_E`) from a caller that has them.
- The statistics are over the tokens given, i.e. the local micro-batch on this rank (what the
  paper computes per device). Each function returns alpha * loss as a scalar tensor.
"""

from __future__ import annotations

from typing import Optional

import torch

from deepseek_moe.model.dispatch import count_ids


def expert_counts(ids_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Selections per expert, [E] float (no gradient)."""
    return count_ids(ids_TK, num_experts).to(torch.float32)


def _counts(ids_TK: torch.Tensor, num_experts: int, counts_E: Optional[torch.Tensor]) -> torch.Tensor:
    return expert_counts(ids_TK, num_experts) if counts_E is None else counts_E.to(torch.float32)


def expert_balance_loss(
    *, probs_TE: torch.Tensor, ids_TK: torch.Tensor, alpha: float, counts_E: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """alpha * sum_i f_i P_i, f_i = E/(K T) * #selections of i, P_i = mean_t s_{i,t}.

    Equals alpha when routing is perfectly balanced and probs are uniform. `counts_E`: the
    selections per expert when the caller has counted them (`count_ids(ids_TK, E)`).
    """
    T, E = probs_TE.shape
    K = ids_TK.shape[1]
    f_E = _counts(ids_TK, E, counts_E) * (E / (K * T))
    P_E = probs_TE.mean(dim=0)
    return alpha * (f_E * P_E).sum()


def seq_expert_balance_loss(*, probs_BSE: torch.Tensor, ids_BSK: torch.Tensor, alpha: float) -> torch.Tensor:
    """The expert-level loss computed per sequence and averaged over the B sequences."""
    B, S, E = probs_BSE.shape
    K = ids_BSK.shape[-1]
    counts_BE = torch.zeros(B, E, dtype=torch.float32, device=probs_BSE.device)
    counts_BE.scatter_add_(
        1, ids_BSK.reshape(B, S * K), torch.ones(B, S * K, dtype=torch.float32, device=probs_BSE.device)
    )
    f_BE = counts_BE * (E / (K * S))
    P_BE = probs_BSE.mean(dim=1)
    return alpha * (f_BE * P_BE).sum(dim=1).mean()


def device_balance_loss(
    *,
    probs_TE: torch.Tensor,
    ids_TK: torch.Tensor,
    n_groups: int,
    alpha: float,
    counts_E: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """alpha * sum_d f'_d P'_d, f'_d = mean of f_j over group d, P'_d = sum of P_j over group d."""
    T, E = probs_TE.shape
    K = ids_TK.shape[1]
    f_E = _counts(ids_TK, E, counts_E) * (E / (K * T))
    P_E = probs_TE.mean(dim=0)
    f_G = f_E.view(n_groups, -1).mean(dim=1)
    P_G = P_E.view(n_groups, -1).sum(dim=1)
    return alpha * (f_G * P_G).sum()


def groups_reached(ids_TK: torch.Tensor, num_experts: int, n_groups: int) -> torch.Tensor:
    """[T, G] bool: token t sends at least one copy to group (device) g."""
    T = ids_TK.shape[0]
    group_TK = torch.div(ids_TK, num_experts // n_groups, rounding_mode="floor")
    return torch.zeros(T, n_groups, dtype=torch.bool, device=ids_TK.device).scatter_(1, group_TK, True)


def comm_balance_loss(
    *, probs_TE: torch.Tensor, ids_TK: torch.Tensor, n_groups: int, topk_groups: int, alpha: float
) -> torch.Tensor:
    """alpha * sum_d f''_d P''_d, f''_d = G/(M T) * #tokens sent to d, P''_d = sum_{j in d} P_j."""
    T, E = probs_TE.shape
    sent_G = groups_reached(ids_TK, E, n_groups).sum(dim=0).to(torch.float32)
    f_G = sent_G * (n_groups / (topk_groups * T))
    P_G = probs_TE.mean(dim=0).view(n_groups, -1).sum(dim=1)
    return alpha * (f_G * P_G).sum()


def router_z_loss(*, logits_TE: torch.Tensor, coef: float) -> torch.Tensor:
    """coef * mean_t logsumexp(logits_t)^2 (ST-MoE), computed in fp32."""
    return coef * torch.logsumexp(logits_TE.float(), dim=-1).pow(2).mean()
