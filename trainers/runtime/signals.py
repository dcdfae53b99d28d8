"""Preemption signals: remember that one arrived; the loop acts on it at a step boundary."""
from __future__ import annotations

import signal

# Exit code meaning "checkpointed after a preemption signal, requeue me" (EX_TEMPFAIL).
REQUEUE_EXIT_CODE = 75


class StopRequest:
    """Installs handlers for SIGTERM and SIGUSR1 that only set a flag.

    Stopping inside a handler would leave the other ranks waiting in a collective; instead all
    ranks agree on the flag (any_rank) at the next step boundary, checkpoint, then exit.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
