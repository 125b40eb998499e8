"""Stop signals as flags (docs/design.md, Signals): a handler only records the signal; the train loop acts on it
at a step boundary, after the ranks agree, and writes a checkpoint.

Every stop signal acts within seconds, also where no step boundary comes. A thread woken through the signal
wakeup fd (so it runs while the main thread is blocked in C code: the rendezvous, a collective) ends the
process itself when:
- the signal came before the loop's first step (start-up, the rendezvous, capture, the first step): nothing
  trained yet is lost, so it ends at once with EXIT_PREEMPTED (under SLURM, rank 0 first leaves the requeue
  marker for the warning signal);
- no step boundary took the request up within STOP_GRACE_S (a hung collective, a stuck rank);
- a person at the keyboard sends a SECOND SIGINT or SIGTERM at least REPEAT_WINDOW_S after the first.
The same signal twice within the window is one request: SLURM signals every process of a step and torchrun
forwards the signal too.
"""

from __future__ import annotations

import os
import select
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from ddp_mnist.parallel.deadline import end_process

# SIGTERM/SIGINT: the job is being stopped (scancel, scontrol requeue, torchrun, Ctrl-C): checkpoint, exit.
ABORTABLE = (signal.SIGTERM, signal.SIGINT)


REPEAT_WINDOW_S = 2.0  # a repeat sooner than this is the same request, not an abort


EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again"; the job stopped cleanly with a checkpoint


STOP_GRACE_S = 10.0  # a stop request no step boundary took up within this long ends the process


def requeue_signal(name: str) -> signal.Signals:
    """`USR1` -> signal.SIGUSR1 (the spelling of SLURM's `--signal` and of `--requeue-signal`)."""
    return signal.Signals["SIG" + name]


class StopSignals:
    """Context manager: installs flag-setting handlers and restores the previous ones on exit."""

    def __init__(
        self,
        requeue: str = "USR1",
        talk: bool = True,
        grace_s: float = STOP_GRACE_S,
        on_abort: Callable[[signal.Signals], None] | None = None,
    ) -> None:
        self.requeue_signal = requeue_signal(requeue)
        self.talk = talk  # rank 0 says that a stop was requested; the others stay quiet
        self.grace_s = grace_s
        self.on_abort = on_abort  # what the process does before this thread ends it (train.py: the requeue marker)
        self.received: int | None = None
        self.reason: tuple[str, str] | None = None  # a stop the loop requested itself (request): its name, and why
        self._stepping = False  # the loop made a step: a stop waits for a step boundary (up to grace_s)
        self._settled = False  # the loop took the stop up, or made its last step: no grace deadline
        self._first_stop: float | None = None
        self._last_step = 0.0  # when the loop last made a step (monotonic): the grace runs from the later of the two
        self._previous: dict[int, Any] = {}
        self._first_abortable: float | None = None
        self._wakeup: tuple[int, int] | None = None
        self._previous_wakeup = -1
        self._thread: threading.Thread | None = None

    def _handle(self, signum, frame) -> None:  # nothing heavy here: just remember it
        if self.received is None:
            self.received = signum

    def stepping(self) -> None:
        """The loop made a step: from now on a stop waits for a step boundary (up to grace_s), which writes a
        checkpoint."""
        self._stepping = True
        self._last_step = time.monotonic()

    def settled(self) -> None:
        """The loop took the stop up (it is checkpointing) or made its last step: no step boundary is due, and
        only a repeated signal ends the process from here on."""
        self._settled = True

    def request(self, name: str, why: str) -> None:
        """A stop the loop decided on itself (time_limit.py: the job's end is near), taken up like the warning
        signal: a checkpoint, then the requeue. `name` names it in the requeue marker, `why` in the log."""
        if self.received is None:
            self.received, self.reason = self.requeue_signal, (name, why)

    @property
    def pending(self) -> bool:
        return self.received is not None

    @property
    def wants_requeue(self) -> bool:
        return self.received == self.requeue_signal

    @property
    def name(self) -> str:
        if self.reason:
            return self.reason[0]
        return signal.Signals(self.received).name if self.received else ""

    @property
    def cause(self) -> str:
        """What stops the job, for the log: `SIGUSR1 received`, or why the loop requested the stop."""
        return self.reason[1] if self.reason else f"{self.name or 'a stop signal on another rank'} received"

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

    def __exit__(self, exc_type, *exc) -> None:
        # After a clean stop the process is on its way out with the stop's status: a launcher that stops the rest
        # of the group once a first worker exits 75 (torchrun: SIGTERM) must not kill a rank still finishing its
        # own stop (W&B, the run folder's release, the group's teardown). Its signal is recorded, not obeyed.
        if not (exc_type is not None and issubclass(exc_type, TrainingStopped)):
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

    # ------------------------------------------------------------------ acting where no step boundary comes
    def _watch(self) -> None:
        """Reads the signal numbers the C-level handler writes, as they arrive (not when the main thread
        gets to run Python code again), and keeps the grace deadline of a stop request."""
        read = self._wakeup[0]
        while True:
            if not select.select([read], [], [], self._wait_s())[0]:
                self._grace_over()
                continue
            for signum in os.read(read, 64):
                if signum == 0:
                    return
                self._arrived(signum, time.monotonic())

    def _deadline(self) -> float | None:
        """When a stop that no step boundary took up ends the process: STOP_GRACE_S after the signal or after the
        loop's latest step, whichever is later (a loop still making steps reaches its stop check)."""
        if self._first_stop is None or self._settled:
            return None
        return max(self._first_stop, self._last_step) + self.grace_s

    def _wait_s(self) -> float | None:
        deadline = self._deadline()
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    def _arrived(self, signum: int, now: float) -> None:
        if signum not in (*ABORTABLE, self.requeue_signal):
            return
        sig = signal.Signals(signum)
        if self.received is None:
            self.received = sig  # also when the main thread is blocked and its handler cannot run
        if not self._stepping and not self._settled:
            self._stop_before_the_first_step(sig)
        if self._first_stop is None:
            self._first_stop = now
        if sig in ABORTABLE:
            self._abortable(sig, now)

    def _stop_before_the_first_step(self, sig: signal.Signals) -> None:
        self._end(
            sig,
            f"ddp-mnist: {sig.name} received before the first step: stopping now (no step has run, so nothing "
            f"is lost; --resume continues from the last checkpoint, if any)",
            EXIT_PREEMPTED,
        )

    def _grace_over(self) -> None:
        deadline = self._deadline()
        if deadline is None or time.monotonic() < deadline:
            return
        sig = signal.Signals(self.received)
        self._end(
            sig,
            f"ddp-mnist: {sig.name} received and no step boundary came within {self.grace_s:g} s (a stuck rank or "
            f"collective?): stopping now, without a checkpoint",
            128 + sig,
        )

    def _end(self, sig: signal.Signals, line: str, status: int) -> None:
        """End the process from this thread, after `on_abort` (which must not keep it from ending)."""
        try:
            if self.on_abort is not None:
                self.on_abort(sig)
        except Exception as e:  # noqa: BLE001 - e.g. a full disk for the requeue marker: still end, and say it
            self._say(f"before stopping: {type(e).__name__}: {e}")
        end_process(line, status)

    def _abortable(self, sig: signal.Signals, now: float) -> None:
        if self._first_abortable is None:
            self._first_abortable = now
            if self.talk and not self._settled:  # settled: the stop is already under way
                self._say(
                    f"{sig.name} received: stopping at the next step with a checkpoint "
                    f"(send {sig.name} again to stop at once, without one)"
                )
        elif now - self._first_abortable >= REPEAT_WINDOW_S:
            end_process(f"ddp-mnist: {sig.name} received again: stopping now, without a checkpoint", 128 + sig)

    @staticmethod
    def _say(message: str) -> None:
        os.write(2, f"ddp-mnist: {message}\n".encode())


class TrainingStopped(Exception):
    """A stop signal was acted on: a checkpoint was written and the job should end (or requeue)."""

    def __init__(self, signal_name: str, requeue: bool, checkpoint):
        super().__init__(f"stopped by {signal_name} after writing {checkpoint}")
        self.signal_name, self.requeue, self.checkpoint = signal_name, requeue, checkpoint
