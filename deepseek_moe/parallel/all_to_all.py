"""Differentiable all-to-all with uneven splits (the token exchange of expert parallelism).

Rank r sends `input_splits[j]` rows of `x` (consecutive, in rank order) to rank j and receives
`output_splits[j]` rows from rank j. The backward of that exchange is the same exchange with the
splits swapped: the gradient of every row travels back to the rank that sent it.

Shapes: rows are token copies, `x_ND` with N = sum(input_splits); the result is `[sum(output_splits), D]`.

NOTE: both splits are Python lists, so the counts must be on the host before the exchange. That
sync is inherent to a dropless uneven all-to-all (the receive buffer size depends on it); the
dispatcher does one `.tolist()` per layer after the count exchange.

Every rank of the group must call `all_to_all` (and run the backward) the same number of times,
also when it sends or receives nothing: empty splits are fine, skipping the call is a hang.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

__all__ = ["all_to_all", "exchange_counts"]


def _group_size(group: Optional[dist.ProcessGroup]) -> int:
    if not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def _exchange(
    x: torch.Tensor,
    output_splits: list[int],
    input_splits: list[int],
    group: Optional[dist.ProcessGroup],
) -> torch.Tensor:
    out = x.new_empty((sum(output_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(
        out,
        x.contiguous(),
        output_split_sizes=output_splits,
        input_split_sizes=input_splits,
        group=group,
    )
    return out


class _AllToAll(torch.autograd.Function):
    """Forward: uneven all-to-all. Backward: the reverse uneven all-to-all."""

    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group):  # type: ignore[override]
        ctx.output_splits = output_splits
        ctx.input_splits = input_splits
        ctx.group = group
        return _exchange(x, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        # NOTE: grad_out may be an expanded / non-contiguous view (e.g. from `.sum()`):
        # `_exchange` makes it contiguous before handing it to the backend.
        grad_in = _exchange(grad_out, ctx.input_splits, ctx.output_splits, ctx.group)
        return grad_in, None, None, None


def _check_splits(x: torch.Tensor, output_splits, input_splits, world: int) -> None:
    if len(input_splits) != world or len(output_splits) != world:
        raise ValueError(
            f"all_to_all: expected {world} input and output splits (one per rank of the group), "
            f"got {len(input_splits)} and {len(output_splits)}"
        )
    if sum(input_splits) != x.shape[0]:
        raise ValueError(
            f"all_to_all: input_splits sum to {sum(input_splits)} but x has {x.shape[0]} rows; "
            "the splits must partition the rows of x"
        )


def all_to_all(
    x: torch.Tensor,
    output_splits: list[int],
    input_splits: list[int],
    group: Optional[dist.ProcessGroup] = None,
) -> torch.Tensor:
    """Send `x[sum(input_splits[:j]) : sum(input_splits[:j+1])]` to rank j of `group`.

    Args:
        x: `[N, ...]` rows sorted by destination rank.
        output_splits: rows to receive from each rank (length = group size).
        input_splits: rows to send to each rank (length = group size).
        group: process group (None = default group).

    Returns:
        `[sum(output_splits), ...]`, rows from rank 0 first, then rank 1, ... Differentiable.
    """
    world = _group_size(group)
    output_splits = [int(s) for s in output_splits]
    input_splits = [int(s) for s in input_splits]
    _check_splits(x, output_splits, input_splits, world)
    if world == 1:
        # No communication; keep the autograd graph trivial.
        return x
    return _AllToAll.apply(x, output_splits, input_splits, group)


def exchange_counts(send_counts: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Even all-to-all of int64 counts: rank r's `send_counts` is `[W * C]` (C counts for each of
    the W ranks); returns `[W * C]` where block j holds the C counts rank j sent to this rank.

    Not differentiable (counts are integers)."""
    world = _group_size(group)
    if send_counts.dim() != 1 or send_counts.numel() % world != 0:
        raise ValueError(
            f"exchange_counts: expected a 1-D tensor with a multiple of {world} (group size) "
            f"entries, got shape {tuple(send_counts.shape)}"
        )
    if world == 1:
        return send_counts.clone()
    out = torch.empty_like(send_counts)
    dist.all_to_all_single(out, send_counts.contiguous(), group=group)
    return out
