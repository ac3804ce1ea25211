"""Errors caused by the user's input or files (config, data, tokenizer, checkpoints, exports).

Raise one of these when the user can fix the cause: the message is one line naming what was
expected, what was found and what to change. Entry points run through `report_user_errors`,
which prints `<kind>: <message>` on stderr and exits with status 1, without a traceback
(`DSMOE_TRACEBACK=1` in the environment shows it). Anything else is a programming error and
keeps its traceback.

Under a multi-process launch the ranks that detect the same error agree on one reporter (the
lowest such rank, see `train/rank_errors.py`); the others raise `ReportedByAnotherRank`, which
exits with status 1 and prints nothing, so a user error is one line, not one per rank. Before the
process group exists (config errors, the same on every rank) rank 0 reports.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable

TRACEBACK_ENV = "DSMOE_TRACEBACK"
"""Set to 1 to get the traceback of a user error instead of its one line."""


class UserError(Exception):
    """Base class: a problem with the user's input that the message tells them how to fix."""

    kind = "Error"

    def one_line(self) -> str:
        """`<kind>: <message>` on a single line (newlines folded), as printed on stderr."""
        text = " ".join(str(self).split())
        return f"{self.kind}: {text}"


# Data and checkpoint errors are also ValueErrors: a bad value in the user's files, and callers
# that catch ValueError (as for config values) keep working.
class ConfigError(UserError, ValueError):
    kind = "Config error"


class DataError(UserError, ValueError):
    kind = "Data error"


class CheckpointError(UserError, ValueError):
    kind = "Checkpoint error"


class ExportError(UserError):
    kind = "Export error"


class ReportError(UserError):
    kind = "Report error"


class EvaluateError(UserError):
    kind = "Evaluate error"


class ReportedByAnotherRank(UserError):
    """This rank stops because of a user error that another rank reports (one line per job)."""

    kind = "Stopped"


def traceback_requested() -> bool:
    return os.environ.get(TRACEBACK_ENV, "") not in ("", "0")


def config_error_from_hydra(err: Exception, hint: str) -> ConfigError:
    """Hydra's composition error (misspelt key, wrong type, unknown preset) as one ConfigError.
    Hydra's own report spans several lines; its text and its cause (OmegaConf's reason) already
    name the key, the type or the available presets; `hint` says where to look up the rest."""
    parts, cause = [str(err)], err.__cause__
    while cause is not None:
        parts.append(str(cause))
        cause = cause.__cause__
    text = " ".join(" ".join(parts).split()).split(" Config search path:")[0]
    return ConfigError(text if "Available options" in text else f"{text}; {hint}")


_QUIET_EXIT_DELAY_S = 2.0
"""How long a rank that leaves the report to another waits before exiting: launchers stop every
process once one exits, and the reporter must have printed its line by then."""


def _reported_elsewhere(err: UserError) -> bool:
    """True when another rank prints this error: the ranks agreed so, or no process group exists
    yet (config composition and checks, which every rank runs alike) and this is not rank 0."""
    if isinstance(err, ReportedByAnotherRank):
        return True
    torch = sys.modules.get("torch")  # not imported: no process group either
    grouped = torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized()
    return not grouped and os.environ.get("RANK", "0") != "0"


def report_user_errors(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run an entry point; a UserError ends it with one line on stderr and exit status 1."""
    try:
        return fn(*args, **kwargs)
    except UserError as err:
        if traceback_requested():
            raise
        if _reported_elsewhere(err):
            time.sleep(_QUIET_EXIT_DELAY_S)
        else:
            print(err.one_line(), file=sys.stderr, flush=True)
        raise SystemExit(1) from None
