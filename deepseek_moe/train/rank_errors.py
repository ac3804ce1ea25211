"""User errors under a multi-process launch: every rank stops together, one rank reports.

Call these at points every rank reaches together. If any rank holds an error, all stop: the
lowest failing rank raises its error (a user error is then one line, see `deepseek_moe.errors`),
the others raise `ReportedByAnotherRank` (exit status 1, nothing printed), and no rank is left
waiting in a collective that the failing one never reaches.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from deepseek_moe.errors import ReportedByAnotherRank
from deepseek_moe.train.distributed import DistInfo, lowest_rank_with


def fail_together(
    dist: DistInfo, error: Optional[BaseException], cleanup: Optional[Callable[[], None]] = None
) -> None:
    """Call on every rank at the same point; a no-op when no rank holds an error. Otherwise
    rank 0 runs `cleanup` and every rank raises (its own error, or ReportedByAnotherRank)."""
    reporter = lowest_rank_with(error is not None, dist.device)
    if reporter is None:
        return
    if cleanup is not None and dist.is_main:
        cleanup()
    if reporter == dist.rank:
        raise error
    raise ReportedByAnotherRank(f"rank {reporter} reports the error")


def on_all_ranks(dist: DistInfo, fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) on every rank; an error on any rank stops every rank (`fail_together`)."""
    result, error = None, None
    try:
        result = fn(*args)
    except Exception as err:  # noqa: BLE001 - re-raised by fail_together on its rank
        error = err
    fail_together(dist, error)
    return result
