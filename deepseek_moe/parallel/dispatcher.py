"""`AllToAllDispatcher`: the expert-parallel implementation of the dispatcher seam.

Shapes: T local tokens, D model dim, K top-k, E global routed experts, W ranks in the EP group,
L = E / W local experts, P (token, destination rank) pairs this rank sends, R pairs it
receives, N token copies its local experts compute on (x_ND).

Rank w of the EP group owns global experts [w*L, (w+1)*L).

A token is sent ONCE to each rank that holds at least one of its experts (not once per copy):
with top-6 routing a token usually has several experts on the same rank, and device-limited
routing (M ranks per token) then bounds the rows a token costs to M, which is the point of
DeepSeek-V2's device limit. The receiver expands a row into the copies for its local experts,
and weights and sums them before sending ONE row back. Per MoE layer call:

dispatch(x_TD, ids_TK, weights_TK):
1. which EP ranks each token reaches; pair and copy counts per destination rank;
2. exchange the counts (even all-to-all): pairs per rank and copies per (rank, local expert),
   so the receiver learns its experts' copy counts in the same exchange; one host sync
   (`.tolist()`) per layer, and `counts_L` reaches the experts as a device tensor; then the pairs:
   for each destination rank w (ascending) the tokens t (ascending) that have an expert there,
   their copies' gates (`w_PK`, 0 for copies elsewhere) and local expert ids (`local_PK`, -1
   for copies elsewhere);
3. ONE uneven all-to-all of packed rows [x | gates | local ids] in x's dtype (differentiable:
   the gradient of the rows and of the gates comes back in one exchange too). The ids ride as
   floats only when x's dtype holds every local id exactly (`ids_fit_in`: bf16 up to 256 local
   experts); otherwise they take a separate int64 exchange. Gates in x's dtype lose nothing:
   the receiver multiplies them into expert outputs of that dtype anyway;
4. receiver: expand the R rows into copies and sort them stably by local expert
   -> x_ND grouped contiguously by local expert, `counts_L` copies per local expert.
combine(y_ND):
5. receiver: y_RD[r] = sum of its copies' outputs times their gates (index_add);
6. reverse all-to-all of y_RD; sender: y_TD = sum over the pairs of each token (index_add).
   Steps 5 and 6 accumulate in fp32 and the partial sums travel in fp32 (bf16/fp16 runs), so
   the output is the fp32 sum rounded ONCE, as with EP=1 (tests/parallel/test_dispatcher.py:
   identical to EP=1 in bf16); the price is 4 instead of 2 bytes per element of the combine
   exchange (and of its gradient).
Dropped copies (id -1) are in no pair; a token with every copy dropped gets 0.
Collectives per layer: 3 in forward (counts, packed rows, outputs), 2 in backward. Each is a
point where the ranks wait for each other, so fewer of them is less time lost to skew.

All exchanges of floats are autograd Functions (`parallel.all_to_all`), so gradients reach x_TD,
the expert weights and the gates. Every rank calls every collective once per layer call
whatever its counts: a rank (or an expert) with zero rows sends/receives empty splits and never
skips a collective, which keeps an unlucky rank from hanging the group.

Statistics (accumulated until `pop_stats()` over forwards run with autograd on: evaluation under
no_grad counts in none; the trainer reduces/logs them):
- `ranks_per_token`: distinct destination EP ranks per token (<= M with device-limited routing);
- `a2a_bytes`: bytes this rank sent to OTHER ranks in forward dispatch + combine (packed rows
  with gates and local ids, fp32 partial sums; the backward moves the same bytes again);
  self-sends are not counted;
- `copy_bytes`: what a dispatcher sending one row per token COPY would have sent (comparison).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from deepseek_moe.model.dispatch import count_ids, gather_rows
from deepseek_moe.model.moe import check_ep_rank
from deepseek_moe.parallel.all_to_all import all_to_all, exchange_counts

__all__ = ["AllToAllDispatcher", "EPContext", "ids_fit_in"]


def ids_fit_in(dtype: torch.dtype, num_local_experts: int) -> bool:
    """Whether every local expert id (and -1) is an exactly representable `dtype` value.

    Floats hold every integer up to 2 / eps exactly (bf16: 256, fp16: 2048, fp32: 2**24)."""
    return dtype.is_floating_point and num_local_experts <= round(2 / torch.finfo(dtype).eps)


def _combine_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the combine accumulates and sends its partial sums in (see `combine`)."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


@dataclass
class EPContext:
    num_tokens: int
    top_k: int
    pair_t_P: torch.Tensor
    """Token index of each sent row (rows grouped by destination rank)."""
    w_N: torch.Tensor
    """Gate of each row of x_ND (x's dtype), received with the rows; differentiable."""
    send_splits: list[int]
    """Rows sent to each EP rank in dispatch (= rows received back in combine)."""
    recv_splits: list[int]
    """Rows received from each EP rank in dispatch."""
    copy_slot_N: torch.Tensor
    """For each row of x_ND: its flat slot r*K + k among the received rows' copies."""


class AllToAllDispatcher:
    """Dispatcher over an EP process group (see module docstring).

    Args:
        group: the EP process group (None = default group, i.e. EP over the whole world).
        num_experts: E, global routed experts of the layer (checked on every call).
    """

    def __init__(self, group: Optional[dist.ProcessGroup], num_experts: int) -> None:
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        check_ep_rank(self.rank, self.world, num_experts)
        self.num_experts = num_experts
        self.num_local_experts = num_experts // self.world
        self.reset_stats()

    # ---- stats ---------------------------------------------------------------------------
    def reset_stats(self) -> None:
        self._tokens = 0
        self._ranks_sum = 0
        self._a2a_bytes = 0
        self._copy_bytes = 0
        self._calls = 0

    def pop_stats(self, reset: bool = True) -> dict[str, float]:
        """{"ranks_per_token": mean over tokens seen, "a2a_bytes" / "copy_bytes": totals since
        the last reset (see module docstring), "a2a_calls": layer forwards since the last
        reset}. Local to this rank."""
        out = {
            "ranks_per_token": self._ranks_sum / max(self._tokens, 1),
            "a2a_bytes": float(self._a2a_bytes),
            "copy_bytes": float(self._copy_bytes),
            "a2a_calls": float(self._calls),
        }
        if reset:
            self.reset_stats()
        return out

    # ---- protocol ------------------------------------------------------------------------
    def dispatch(
        self,
        x_TD: torch.Tensor,
        ids_TK: torch.Tensor,
        weights_TK: torch.Tensor,
        num_experts: int,
        counts_E: Optional[torch.Tensor] = None,
        *,
        may_drop: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, EPContext]:
        """See the module docstring. `may_drop` changes nothing here: the one host read of the
        exchanged counts (step 2) sizes every split, dropped copies or not."""
        if num_experts != self.num_experts:
            raise ValueError(
                f"AllToAllDispatcher was built for {self.num_experts} experts, called with {num_experts}"
            )
        T, K = ids_TK.shape
        D = x_TD.shape[-1]
        W, L = self.world, self.num_local_experts
        # 1. which ranks each token goes to
        kept_TK = ids_TK >= 0
        dest_TK = torch.where(
            kept_TK, torch.div(ids_TK, L, rounding_mode="floor"), torch.full_like(ids_TK, W)
        )  # W = "nowhere" for dropped copies
        hit_TW = torch.zeros(T, W + 1, dtype=torch.bool, device=ids_TK.device)
        hit_TW.scatter_(1, dest_TK, True)
        hit_TW = hit_TW[:, :W]
        # 2. pair counts per rank and copy counts per (rank, local expert); after the exchange
        # this rank also knows its own experts' copy counts, so one host sync serves the whole
        # layer and the experts get `counts_L` as a device tensor. (No boolean indexing or
        # nonzero elsewhere: on GPUs each of those would be another sync.)
        send_W = hit_TW.sum(0)
        if counts_E is None:  # else the layer counted them (once per forward)
            key_TK = torch.where(kept_TK, ids_TK, torch.full_like(ids_TK, W * L))
            counts_E = count_ids(key_TK, W * L + 1)[: W * L]
        copies_WL = counts_E.view(W, L)
        recv_W1L = exchange_counts(
            torch.cat([send_W.unsqueeze(1), copies_WL], dim=1).reshape(-1), self.group
        ).view(W, 1 + L)
        counts_L = recv_W1L[:, 1:].sum(0)
        counts = torch.cat([send_W, copies_WL.sum(1), recv_W1L[:, 0], recv_W1L[:, 1:].sum(1)]).tolist()
        send_splits, copies_sent = counts[:W], counts[W : 2 * W]
        recv_splits, copies_recv = counts[2 * W : 3 * W], counts[3 * W :]
        # (destination rank, token) pairs sorted by rank then token: the first P positions of a
        # stable sort that puts the hits first
        flat_hit = hit_TW.t().reshape(-1)
        pair_idx_P = torch.argsort((~flat_hit).to(torch.uint8), stable=True)[: sum(send_splits)]
        pair_w_P = torch.div(pair_idx_P, T, rounding_mode="floor")
        pair_t_P = pair_idx_P - pair_w_P * T
        mask_PK = dest_TK[pair_t_P] == pair_w_P.unsqueeze(1)
        local_PK = torch.where(
            mask_PK,
            ids_TK[pair_t_P] - pair_w_P.unsqueeze(1) * L,
            torch.full_like(mask_PK, -1, dtype=ids_TK.dtype),
        )
        # masked_fill with a Python number: a 0-d CPU tensor in torch.where would be copied to
        # the GPU (a blocking host-to-device transfer) on every call
        w_PK = weights_TK.index_select(0, pair_t_P).masked_fill(~mask_PK, 0.0)
        # 3. one exchange for the rows, their gates and (when exact in x's dtype) their local ids
        parts = [gather_rows(x_TD, pair_t_P), w_PK.to(x_TD.dtype)]
        packed_ids = ids_fit_in(x_TD.dtype, L)
        if packed_ids:
            parts.append(local_PK.to(x_TD.dtype))
        else:
            local_RK = all_to_all(local_PK, recv_splits, send_splits, self.group)
        packed_R = all_to_all(torch.cat(parts, dim=1), recv_splits, send_splits, self.group)
        x_RD, w_RK = packed_R[:, :D], packed_R[:, D : D + K]
        if packed_ids:
            local_RK = packed_R[:, D + K :].detach().round().long()
        # 4. expand received rows into copies, grouped by local expert (stable)
        local_N = local_RK.reshape(-1)
        key_N = torch.where(local_N >= 0, local_N, torch.full_like(local_N, L))
        copy_slot_N = torch.argsort(key_N, stable=True)[: sum(copies_recv)]
        x_ND = gather_rows(x_RD, torch.div(copy_slot_N, K, rounding_mode="floor"))
        w_N = w_RK.reshape(-1).index_select(0, copy_slot_N)

        ctx = EPContext(T, K, pair_t_P, w_N, send_splits, recv_splits, copy_slot_N)
        if not torch.is_grad_enabled():  # evaluation (no_grad) is not training traffic
            return x_ND, counts_L, ctx
        # statistics from the host-side counts only (no extra device sync)
        me = self.rank
        elem = x_TD.element_size()
        row = D * elem
        sent_row = row + K * elem + (K * elem if packed_ids else K * 8)
        remote_sent = sum(send_splits) - send_splits[me]
        remote_recv = sum(recv_splits) - recv_splits[me]
        self._calls += 1
        self._tokens += T
        self._ranks_sum += sum(send_splits)
        # dispatch: a packed row per sent pair; combine: one output row per received pair
        self._a2a_bytes += remote_sent * sent_row + remote_recv * D * _combine_dtype(x_TD.dtype).itemsize
        # a one-row-per-copy dispatcher: remote copies out, remote copies' outputs back
        self._copy_bytes += (sum(copies_sent) - copies_sent[me] + sum(copies_recv) - copies_recv[me]) * row
        return x_ND, counts_L, ctx

    def combine(self, y_ND: torch.Tensor, ctx: EPContext) -> torch.Tensor:
        # NOTE: the weighted sum runs in fp32 end to end (the partial sums travel in fp32) and is
        # rounded to y's dtype once, as EP=1's batched product does. In bf16, index_add in y's
        # dtype would round after every add, in an order that is nondeterministic on GPUs.
        acc = _combine_dtype(y_ND.dtype)
        # 5. weighted sum of each received row's copies
        row_N = torch.div(ctx.copy_slot_N, ctx.top_k, rounding_mode="floor")
        y_RD = torch.zeros(sum(ctx.recv_splits), y_ND.shape[-1], dtype=acc, device=y_ND.device).index_add(
            0, row_N, y_ND.to(acc) * ctx.w_N.to(acc).unsqueeze(1)
        )
        # 6. one row back per pair; sum the pairs of each token
        y_PD = all_to_all(y_RD, ctx.send_splits, ctx.recv_splits, self.group)
        y_TD = torch.zeros(ctx.num_tokens, y_PD.shape[-1], dtype=acc, device=y_PD.device)
        return y_TD.index_add(0, ctx.pair_t_P, y_PD).to(y_ND.dtype)
