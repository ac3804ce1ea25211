"""`AllToAllDispatcher`: the expert-parallel implementation of the dispatcher seam.

Shapes: T local tokens, D model dim, K top-k, E global routed experts, W ranks in the EP group,
L = E / W local experts, N copies sent by this rank (kept copies of its T*K),
R copies received by this rank (N_D below: what the local experts compute on).

Rank w of the EP group owns global experts [w*L, (w+1)*L). Dispatch, per MoE layer call:
1. sort this rank's kept token copies by global expert id (stable). Experts are contiguous per
   rank, so this is also "by destination rank, then by local expert"; `counts_E` is copies per
   global expert (block w = what goes to rank w's L experts);
2. exchange `counts_E` with an even all-to-all: we learn, for every source rank, how many copies
   it sends to each of OUR local experts (`recv_WL`);
3. one host sync (`.tolist()`) for the split sizes, then the uneven all-to-all of the rows;
4. what arrived is ordered (source rank, local expert); a stable permutation regroups it as
   (local expert, source rank), which is the contiguous-by-local-expert layout `experts` wants.
Combine runs 4 -> 3 -> 1 backwards (inverse permutation, reverse all-to-all, scatter back to
copy slots) and takes the gate-weighted sum over the K copies, exactly as `LocalDispatcher`.

Both all-to-alls are autograd Functions (`parallel.all_to_all`), so gradients reach x_TD, the
expert weights and the gates. Every rank calls both collectives once per layer call whatever its
counts: a rank (or an expert) with zero copies sends/receives empty splits and never skips a
collective, which is what keeps an unlucky rank from hanging the group.

Statistics (accumulated until `pop_stats()`; the trainer reduces/logs them):
- `ranks_per_token`: distinct destination EP ranks per token (<= M with device-limited routing);
- `a2a_bytes`: bytes this rank sent to OTHER ranks in forward dispatch + combine (the backward
  moves the same amount again); self-sends are local copies and not counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from deepseek_moe.model.dispatch import LocalContext, LocalDispatcher, sort_by_expert
from deepseek_moe.parallel.all_to_all import all_to_all, exchange_counts

__all__ = ["AllToAllDispatcher", "EPContext", "ranks_per_token"]


@dataclass
class EPContext:
    local: LocalContext
    """Copy-slot order of the rows this rank sent (for the final scatter + weighted sum)."""
    input_splits: list[int]
    """Rows sent to each EP rank in dispatch (= rows received back in combine)."""
    output_splits: list[int]
    """Rows received from each EP rank in dispatch."""
    regroup_R: torch.Tensor
    """x_ND = received[regroup_R]: (source rank, local expert) order -> local-expert order."""


def ranks_per_token(ids_TK: torch.Tensor, experts_per_rank: int) -> torch.Tensor:
    """Distinct destination ranks of each token, `[T]` int64 (dropped copies, id -1, excluded)."""
    if ids_TK.numel() == 0:
        return torch.zeros(ids_TK.shape[0], dtype=torch.long, device=ids_TK.device)
    rank_TK = torch.where(ids_TK >= 0, ids_TK // experts_per_rank, torch.full_like(ids_TK, -1))
    rank_TK = rank_TK.sort(dim=1).values
    new_TK = torch.ones_like(rank_TK, dtype=torch.bool)
    new_TK[:, 1:] = rank_TK[:, 1:] != rank_TK[:, :-1]
    return (new_TK & (rank_TK >= 0)).sum(dim=1)


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
        if num_experts % self.world != 0:
            raise ValueError(
                f"AllToAllDispatcher: {num_experts} routed experts cannot be split over an EP "
                f"group of {self.world} ranks; choose parallel.ep_size dividing n_routed_experts"
            )
        self.num_experts = num_experts
        self.num_local_experts = num_experts // self.world
        self.reset_stats()

    # ---- stats ---------------------------------------------------------------------------
    def reset_stats(self) -> None:
        self._tokens = 0
        self._ranks_sum = 0
        self._a2a_bytes = 0
        self._calls = 0

    def pop_stats(self, reset: bool = True) -> dict[str, float]:
        """{"ranks_per_token": mean over tokens seen, "a2a_bytes": total since last reset,
        "a2a_calls": layer forwards since last reset}. Local to this rank."""
        out = {
            "ranks_per_token": self._ranks_sum / max(self._tokens, 1),
            "a2a_bytes": float(self._a2a_bytes),
            "a2a_calls": float(self._calls),
        }
        if reset:
            self.reset_stats()
        return out

    # ---- protocol ------------------------------------------------------------------------
    def dispatch(
        self, x_TD: torch.Tensor, ids_TK: torch.Tensor, num_experts: int
    ) -> tuple[torch.Tensor, torch.Tensor, EPContext]:
        if num_experts != self.num_experts:
            raise ValueError(
                f"AllToAllDispatcher was built for {self.num_experts} experts, called with "
                f"{num_experts}"
            )
        T, K = ids_TK.shape
        W, L = self.world, self.num_local_experts
        # 1. local sort by global expert = by (destination rank, local expert)
        order_N, counts_E = sort_by_expert(ids_TK, num_experts)
        x_send_ND = x_TD[order_N // K]
        # 2. counts exchange: recv_WL[w, l] = copies rank w sends to our local expert l
        recv_WL = exchange_counts(counts_E, self.group).view(W, L)
        # 3. one host sync for both split lists
        splits = torch.stack([counts_E.view(W, L).sum(1), recv_WL.sum(1)]).tolist()
        input_splits, output_splits = splits[0], splits[1]
        x_recv_RD = all_to_all(x_send_ND, output_splits, input_splits, self.group)
        # 4. (source rank, local expert) -> (local expert, source rank), stable
        expert_R = torch.arange(L, device=recv_WL.device).repeat(W).repeat_interleave(recv_WL.reshape(-1))
        regroup_R = torch.argsort(expert_R, stable=True).to(x_recv_RD.device)
        x_ND = x_recv_RD[regroup_R]
        counts_L = recv_WL.sum(0)

        with torch.no_grad():
            self._calls += 1
            self._tokens += T
            self._ranks_sum += int(ranks_per_token(ids_TK, L).sum())
            remote_rows = sum(input_splits) - input_splits[self.rank]
            # dispatch sends remote_rows rows; combine sends back what we received from others
            remote_rows += sum(output_splits) - output_splits[self.rank]
            self._a2a_bytes += remote_rows * x_TD.shape[-1] * x_TD.element_size()

        ctx = EPContext(LocalContext(order_N, T, K), input_splits, output_splits, regroup_R)
        return x_ND, counts_L, ctx

    def combine(self, y_ND: torch.Tensor, weights_TK: torch.Tensor, ctx: EPContext) -> torch.Tensor:
        # 4^-1: back to (source rank, local expert) order
        y_recv_RD = y_ND.new_zeros(y_ND.shape).index_copy(0, ctx.regroup_R, y_ND)
        # 3^-1: reverse exchange (we send back exactly what we received)
        y_send_ND = all_to_all(y_recv_RD, ctx.input_splits, ctx.output_splits, self.group)
        # 1^-1 + weighted sum over K: identical to the single-process dispatcher
        return LocalDispatcher().combine(y_send_ND, weights_TK, ctx.local)
