"""Fault injection for the test suite: a process stops or dies at an exact moment, so that fault tests
wait on events instead of racing the training with sleeps.

`DDP_MNIST_FAULT="ACTION:POINT=N[:rank=R]"`
  ACTION  `stop` (the process sends itself SIGSTOP: a stalled rank), `kill` (SIGKILL: a dead one) or
          `hang` (the main thread blocks for good while the rest of the process lives on, like a rank
          stuck in a host read that no collective timeout covers), or `slow=F` (from step N on, after each
          step, the rank sleeps F times its own work in the step, its waits for the others left out: a rank
          whose work takes 1 + F times as long; steps only), or `pace=S` (from step N on, after each step, the
          rank sleeps S seconds: a job slow enough to meet its time limit; steps only, on EVERY attempt);
  POINT   `step=N`: right after optimizer step N (the rank's report says so first);
          `save-pt=N`: inside the save of checkpoint N, its .pt written to a temporary file, not yet renamed;
          `save-json=N`: the .pt of checkpoint N renamed into place, its JSON not yet written;
  rank    only that global rank (default: every rank that reaches the point).
It acts on the first attempt only (no SLURM requeue or torchrun restart yet), so a restarted job runs
through; `pace` alone acts on every attempt (it is the job's speed, not a fault). Unset (always, outside
tests): nothing happens, at the cost of a cached call and one comparison.
"""

from __future__ import annotations

import collections
import functools
import os
import signal
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

FAULT_ENV = "DDP_MNIST_FAULT"


ACTIONS = {"stop": signal.SIGSTOP, "kill": signal.SIGKILL, "hang": None, "slow": None, "pace": None}


EVERY_STEP = ("slow", "pace")  # the actions that act after every step from step N on (the others: once, at N)


POINTS = ("step", "save-pt", "save-json")


@dataclass(frozen=True)
class Fault:
    action: str
    point: str
    at: int
    rank: int | None = None
    fraction: float = 0.0  # `slow=F`, `pace=S`

    @classmethod
    def parse(cls, text: str) -> Fault:
        try:
            action, where, *rest = text.split(":")
            action, _, fraction = action.partition("=")
            point, at = where.split("=")
            rank = int(rest[0].removeprefix("rank=")) if rest else None
            fault = cls(action, point, int(at), rank, float(fraction or 0))
        except ValueError:
            fault = None
        slow_ok = fault is not None and (
            fault.action not in EVERY_STEP or (fault.point == "step" and fault.fraction > 0)
        )
        if fault is None or fault.action not in ACTIONS or fault.point not in POINTS or not slow_ok:
            raise ValueError(
                f"{FAULT_ENV}={text!r} is not ACTION:POINT=N[:rank=R] with ACTION in "
                f"{'/'.join(ACTIONS)} (slow=F or pace=S with F, S > 0, at step=N only) and POINT in {'/'.join(POINTS)}"
            )
        return fault


def _from_environ() -> Fault | None:
    text = os.environ.get(FAULT_ENV)
    if not text:
        return None
    from ddp_mnist.parallel.env import DistEnv

    fault = Fault.parse(text)
    return fault if fault.action == "pace" or DistEnv.from_environ().restart_count == 0 else None


@functools.cache
def active_fault() -> Fault | None:
    """The fault this process injects, read from the environment once, at the first injection point (not at
    import: a process forked from one that imported the package reads its own environment)."""
    return _from_environ()


def fault_point(
    point: str, at: int, rank: int, before: Callable[[], None] | None = None, work_s: float | None = None
) -> None:
    """Called at each injection point; acts only when DDP_MNIST_FAULT names this point, number and rank.
    `work_s`: at a step, the rank's own work in it (the `slow` fault scales it)."""
    fault = active_fault()
    if fault is None or fault.point != point or fault.rank not in (None, rank):
        return
    if fault.action in EVERY_STEP:
        if at >= fault.at and fault.action == "pace":
            time.sleep(fault.fraction)
        elif at >= fault.at and work_s is not None:
            _slow_down(fault.fraction, work_s)
        return
    if fault.at != at:
        return
    if before is not None:
        before()
    os.write(2, f"ddp-mnist: test fault: {fault.action} at {point} {at} on rank {rank}\n".encode())  # tests wait on it
    if fault.action == "hang":
        threading.Event().wait()  # forever: signals still run their (flag-only) handlers, nothing returns
    os.kill(os.getpid(), ACTIONS[fault.action])


_slept = [0.0]  # `slow`: the previous step's sleep (it counts in the next step's work: left out)
_recent_work: collections.deque[float] = collections.deque(maxlen=9)  # `slow`: the last steps' own work


def _slow_down(fraction: float, work_s: float) -> None:
    """Sleep `fraction` times this rank's usual own work per step (the median of its last few steps)."""
    _recent_work.append(max(work_s - _slept[0], 0.0))
    _slept[0] = fraction * statistics.median(_recent_work)
    time.sleep(_slept[0])
