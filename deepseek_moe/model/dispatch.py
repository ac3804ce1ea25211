"""The dispatcher seam: how token copies reach the routed experts and come back.

Shapes: T local tokens, D model dim, K top-k, N token copies handled by THIS rank's experts,
E global routed experts, L local experts (E without expert parallelism).

Contract (`MoELayer` calls exactly this; the EP helper's `AllToAllDispatcher` in
`deepseek_moe/parallel/` implements the same protocol):

    x_ND, counts_L, ctx = dispatcher.dispatch(x_TD, ids_TK, weights_TK, num_experts, may_drop=...)
    y_ND = experts(x_ND, counts_L)          # same row order as x_ND
    y_TD = dispatcher.combine(y_ND, ctx)

- `ids_TK` (int64) holds GLOBAL expert ids in [0, num_experts), or -1 for a DROPPED copy
  (capacity overflow; the layer marks drops before dispatch). Dispatchers must not send or
  compute dropped copies; they contribute exactly 0 to y_TD. Without capacity (the default,
  dropless) there is no -1, and the layer says so with `may_drop=False`: then the local
  dispatcher needs no host read at all (with drops it reads the kept count once).
- `x_ND` holds the copies for this rank's local experts, grouped contiguously by local expert
  in ascending order (local expert l = global expert local_expert_offset + l); within an expert
  the order is unspecified (LocalDispatcher: ascending token-copy index t*K+k, i.e. stable).
- `counts_L` is an int64 CPU-or-device tensor of copies per local expert (sum = N), including
  zeros: experts with no tokens still get an empty slice and must still run (so every expert
  parameter stays in the autograd graph: DeepSpeed/ZeRO and DDP expect every grad).
- `combine` is the inverse permutation of dispatch followed by the weighted sum over the K
  copies of each token: y_TD[t] = sum_k weights_TK[t, k] * y(copy t,k) (0 for dropped copies).
  `weights_TK` is fp32 from the router; the sum is done in y's dtype. Gradients flow to y_ND
  and to weights_TK (the router learns through the gates). The gates are given to `dispatch`
  (not `combine`) so an all-to-all dispatcher can send them in the same exchange as the rows.
- `counts_E` (optional, int64 [num_experts]): the kept copies per global expert, when the caller
  has counted them already (`MoELayer` counts once per forward and hands the histogram to the
  dispatcher, the balance losses, the V3 bias and the statistics); a dispatcher counts itself
  when it is None.
- Nothing here touches torch.distributed; `LocalDispatcher` is the single-process case.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol

import torch


class Dispatcher(Protocol):
    def dispatch(
        self,
        x_TD: torch.Tensor,
        ids_TK: torch.Tensor,
        weights_TK: torch.Tensor,
        num_experts: int,
        counts_E: Optional[torch.Tensor] = None,
        *,
        may_drop: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, Any]: ...

    def combine(self, y_ND: torch.Tensor, ctx: Any) -> torch.Tensor: ...


@dataclass
class LocalContext:
    order_N: torch.Tensor
    """Flat copy index (t*K + k) of each row of x_ND."""
    num_tokens: int
    top_k: int
    weights_TK: torch.Tensor
    """The router gates (fp32), applied in combine."""


def count_ids(ids: torch.Tensor, size: int) -> torch.Tensor:
    """int64 [size]: how often each value in [0, size) occurs in `ids` (every value must be in
    range). Like `torch.bincount(ids, minlength=size)` without its host sync: on CUDA bincount
    reads max (and min) of `ids` on the host to size its output; here the size is known."""
    ids = ids.reshape(-1)
    return torch.zeros(size, dtype=torch.int64, device=ids.device).scatter_add_(
        0, ids, torch.ones_like(ids, dtype=torch.int64)
    )


def sort_by_expert(
    ids_TK: torch.Tensor, num_experts: int, counts_E: Optional[torch.Tensor] = None, may_drop: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(order_N, counts_E): kept copy indices sorted stably by expert id, and copies per expert.

    Dropped copies (id -1) are excluded from both. `counts_E`: the kept copies per expert when
    the caller has counted them already (then they are not counted again). `may_drop=False`
    promises there are no dropped copies: then nothing is read on the host (N = T*K).
    """
    ids_N = ids_TK.reshape(-1)
    if not may_drop:
        counts_E = count_ids(ids_N, num_experts) if counts_E is None else counts_E
        return torch.argsort(ids_N, stable=True), counts_E
    # Dropped copies get the sentinel id num_experts so a stable sort puts them last.
    key_N = torch.where(ids_N >= 0, ids_N, torch.full_like(ids_N, num_experts))
    order = torch.argsort(key_N, stable=True)
    if counts_E is None:
        counts_E = count_ids(key_N, num_experts + 1)[:num_experts]
    # the one host read (no boolean indexing: on a GPU that would be a second sync)
    n_kept = int(counts_E.sum())
    return order[:n_kept], counts_E


def gather_rows(x_TD: torch.Tensor, src_N: torch.Tensor) -> torch.Tensor:
    """x_TD[src_N] (rows may repeat); gradients of repeated rows are summed.

    NOTE: `index_select`, not `x_TD[src_N]`: its backward is `index_add_`, which runs in
    parallel on CPU, where advanced indexing's backward is a serial
    `index_put_(accumulate=True)`."""
    return x_TD.index_select(0, src_N)


class LocalDispatcher:
    """Single-process dispatcher: a stable sort by expert, a gather and a scatter-back."""

    def dispatch(
        self,
        x_TD: torch.Tensor,
        ids_TK: torch.Tensor,
        weights_TK: torch.Tensor,
        num_experts: int,
        counts_E: Optional[torch.Tensor] = None,
        *,
        may_drop: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, LocalContext]:
        T, K = ids_TK.shape
        order_N, counts_E = sort_by_expert(ids_TK, num_experts, counts_E, may_drop)
        x_ND = gather_rows(x_TD, order_N // K)
        return x_ND, counts_E, LocalContext(order_N, T, K, weights_TK)

    def combine(self, y_ND: torch.Tensor, ctx: LocalContext) -> torch.Tensor:
        T, K, weights_TK = ctx.num_tokens, ctx.top_k, ctx.weights_TK
        D = y_ND.shape[-1]
        # Scatter back to copy slots (dropped slots stay 0), then a [T,1,K] x [T,K,D] bmm.
        y_TKD = y_ND.new_zeros(T * K, D).index_copy(0, ctx.order_N, y_ND).view(T, K, D)
        return torch.bmm(weights_TK.to(y_ND.dtype).unsqueeze(1), y_TKD).squeeze(1)
