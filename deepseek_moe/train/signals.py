"""Preemption: SIGTERM / SIGUSR1 ask the trainer to finish the current step, save and exit 0.

The handler only sets a flag; the trainer polls it once per optimizer step (and all-reduces it,
so one signalled rank is enough for every rank to stop at the same step). SLURM sends SIGTERM
(or the signal given with `--signal`) before killing a job; the deepspeed launcher forwards
SIGTERM to its children.
"""

from __future__ import annotations

import signal
import threading


class PreemptionFlag:
    """Installs handlers for `signals` in the main thread; `requested` becomes True on delivery."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGUSR1)) -> None:
        self.requested = False
        self.signum: int | None = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 (signal API)
        self.requested = True
        self.signum = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
