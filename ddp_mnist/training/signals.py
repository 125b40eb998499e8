"""Stop signals as flags (docs/design.md, Signals): a handler only records the signal; the train loop acts on it
at a step boundary, after the ranks agree.

One exception, for a person at the keyboard: a SECOND SIGINT or SIGTERM that comes at least
REPEAT_WINDOW_S after the first ends the process at once (start-up, a download, a hung collective:
places where no step boundary comes). It is acted on by a thread woken through the signal wakeup fd,
so it works while the main thread is blocked in C code. The same signal twice within the window is
one request: SLURM signals every process of a step and torchrun forwards the signal too.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

# SIGTERM/SIGINT: the job is being stopped (scancel, scontrol requeue, torchrun, Ctrl-C): checkpoint, exit.
ABORTABLE = (signal.SIGTERM, signal.SIGINT)


REPEAT_WINDOW_S = 2.0  # a repeat sooner than this is the same request, not an abort


EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again"; the job stopped cleanly with a checkpoint


def requeue_signal(name: str) -> signal.Signals:
    """`USR1` -> signal.SIGUSR1 (the spelling of SLURM's `--signal` and of `--requeue-signal`)."""
    return signal.Signals["SIG" + name]


class StopSignals:
    """Context manager: installs flag-setting handlers and restores the previous ones on exit."""

    def __init__(self, requeue: str = "USR1", talk: bool = True) -> None:
        self.requeue_signal = requeue_signal(requeue)
        self.talk = talk  # rank 0 says that a stop was requested; the others stay quiet
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        self._first_abortable: float | None = None
        self._wakeup: tuple[int, int] | None = None
        self._previous_wakeup = -1
        self._thread: threading.Thread | None = None

    def _handle(self, signum, frame) -> None:  # nothing heavy here: just remember it
        if self.received is None:
            self.received = signum

    @property
    def pending(self) -> bool:
        return self.received is not None

    @property
    def wants_requeue(self) -> bool:
        return self.received == self.requeue_signal

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else ""

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in (*ABORTABLE, self.requeue_signal):
            self._previous[sig] = signal.signal(sig, self._handle)
        read, write = os.pipe()
        os.set_blocking(write, False)
        self._wakeup = (read, write)
        self._previous_wakeup = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        self._thread = threading.Thread(target=self._watch, name="ddp-mnist-signals", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self._wakeup is not None:
            read, write = self._wakeup
            signal.set_wakeup_fd(self._previous_wakeup)
            os.write(write, b"\0")  # wakes the thread up: 0 is no signal, it means "stop watching"
            self._thread.join()
            os.close(read)
            os.close(write)
            self._wakeup = None

    # ------------------------------------------------------------------ the second-signal abort
    def _watch(self) -> None:
        """Reads the signal numbers the C-level handler writes, as they arrive (not when the main thread
        gets to run Python code again)."""
        read = self._wakeup[0]
        while True:
            for signum in os.read(read, 64):
                if signum == 0:
                    return
                if signum in ABORTABLE:
                    self._abortable(signal.Signals(signum), time.monotonic())

    def _abortable(self, sig: signal.Signals, now: float) -> None:
        if self._first_abortable is None:
            self._first_abortable = now
            if self.talk:
                self._say(
                    f"{sig.name} received: stopping at the next step with a checkpoint "
                    f"(send {sig.name} again to stop at once, without one)"
                )
        elif now - self._first_abortable >= REPEAT_WINDOW_S:
            self._say(f"{sig.name} received again: stopping now, without a checkpoint")
            os._exit(128 + sig)  # nothing else: the main thread may be stuck in a collective or a download

    @staticmethod
    def _say(message: str) -> None:
        os.write(2, f"ddp-mnist: {message}\n".encode())


class TrainingStopped(Exception):
    """A stop signal was acted on: a checkpoint was written and the job should end (or requeue)."""

    def __init__(self, signal_name: str, requeue: bool, checkpoint):
        super().__init__(f"stopped by {signal_name} after writing {checkpoint}")
        self.signal_name, self.requeue, self.checkpoint = signal_name, requeue, checkpoint
