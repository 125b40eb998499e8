"""Stop signals as flags (design.md): a handler only records the signal; the train loop acts on it
at a step boundary, after the ranks agree."""

from __future__ import annotations

import signal
import threading

# SIGUSR1: SLURM's warning before preemption or the time limit -> checkpoint, then requeue.
# SIGTERM/SIGINT: the job is being stopped (scancel, scontrol requeue, torchrun) -> checkpoint, exit.
REQUEUE_SIGNALS = (signal.SIGUSR1,)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again"; the job stopped cleanly with a checkpoint


class StopSignals:
    """Context manager: installs flag-setting handlers and restores the previous ones on exit."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:  # nothing heavy here: just remember it
        if self.received is None:
            self.received = signum

    @property
    def pending(self) -> bool:
        return self.received is not None

    @property
    def wants_requeue(self) -> bool:
        return self.received in REQUEUE_SIGNALS

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else ""

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
