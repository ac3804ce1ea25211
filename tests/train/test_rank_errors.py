"""fail_together / on_all_ranks: one rank reports a user error, every rank stops, none hangs."""

from __future__ import annotations

import pytest
import torch

from deepseek_moe.errors import DataError, ReportedByAnotherRank
from deepseek_moe.testing.distributed import run_distributed
from deepseek_moe.train.distributed import DistInfo
from deepseek_moe.train.rank_errors import fail_together, on_all_ranks


def _dist(rank: int, world_size: int) -> DistInfo:
    return DistInfo(rank=rank, world_size=world_size, local_rank=rank, device=torch.device("cpu"))


def _outcomes(rank, world_size):
    dist, outcome, cleaned = _dist(rank, world_size), [], []
    for failing in ({1}, {0, 1}, set()):
        try:
            error = DataError(f"bad on rank {rank}") if rank in failing else None
            fail_together(dist, error, cleanup=lambda: cleaned.append(rank))
            outcome.append("ok")
        except ReportedByAnotherRank:
            outcome.append("silent")
        except DataError as err:
            outcome.append(str(err))

    def fails_on_rank_1():
        if rank == 1:
            raise DataError("from on_all_ranks")
        return rank

    try:
        on_all_ranks(dist, fails_on_rank_1)
    except (DataError, ReportedByAnotherRank) as err:
        outcome.append(type(err).__name__)
    outcome.append(on_all_ranks(dist, lambda: rank * 10))
    return outcome, cleaned


def test_ranks_agree_on_one_reporter():
    results = run_distributed(_outcomes, 2, timeout=120)
    assert results[0] == (["silent", "bad on rank 0", "ok", "ReportedByAnotherRank", 0], [0, 0])
    assert results[1] == (["bad on rank 1", "silent", "ok", "DataError", 10], [])


def test_one_process_raises_its_own_error():
    dist = _dist(0, 1)
    fail_together(dist, None)
    with pytest.raises(DataError, match="mine"):
        fail_together(dist, DataError("mine"))
    assert on_all_ranks(dist, lambda a, b: a + b, 2, 3) == 5
