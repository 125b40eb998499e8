"""The slow rank, named while the job runs (docs/debugging.md).

DDP's all-reduce evens out the ranks' step times: a fast rank waits for the slow one inside the collective, so
every rank's step takes as long as the slowest's. What differs is the work a rank does between two waits.
`WorkClock` measures it on each rank, on the host and without a sync: the step's wall time minus the time the
rank spent waiting for the others (from its last gradient being ready to the end of backward, where DDP waits
for the all-reduce; and inside the loop's own small collectives). Wall time, so a rank that an overloaded node
deschedules is as slow as one that computes more.

`SlowRanks` gathers every rank's median step once an epoch (one small collective) and, on rank 0, names a rank more
than `--slow-rank-threshold` above the median of the others in two consecutive epochs that together last at least
`--slow-rank-seconds` of training (one slow epoch, or a burst of load from another job, is noise).
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Iterator
from typing import Any

from torch import nn

from ddp_mnist.parallel.collectives import gather_to_main
from ddp_mnist.training.rank_files import StepClock


class WorkClock(StepClock):
    """The heartbeat's StepClock, plus this rank's own work per step: the steps' time minus its waits. A hook on
    each parameter notes when its gradient is ready (a clock read a parameter and step: no sync)."""

    def __init__(self, samples_per_step: int, model: nn.Module) -> None:
        super().__init__(samples_per_step)
        self._ready: float | None = None  # when this step's last gradient was ready
        self._waited = 0.0  # this window's waits
        self._waited_before = 0.0  # _waited at the previous tick
        self._works: list[float] = []  # this window's steps' own work
        self.step_work_s: float | None = None  # the last step's own work (the test fault `slow` scales it)
        self._seen_grads = False  # a captured CUDA graph runs no hooks: then nothing is measured
        for param in model.parameters():
            if param.requires_grad:
                param.register_post_accumulate_grad_hook(self._grad_ready)

    def _grad_ready(self, _param: nn.Parameter) -> None:
        self._ready = time.perf_counter()

    def backward_done(self) -> None:
        """After backward: from the last gradient to here, DDP waited for the all-reduce (for the others)."""
        if self._ready is not None:
            self._waited += time.perf_counter() - self._ready
            self._ready, self._seen_grads = None, True

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        """Around one of the loop's collectives: the time in it is a wait, not this rank's work."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._waited += time.perf_counter() - start

    def tick(self) -> None:
        super().tick()
        self.step_work_s = (self.last_step_s or 0.0) - (self._waited - self._waited_before)
        self._waited_before = self._waited
        self._works.append(max(self.step_work_s, 0.0))

    def restart(self) -> None:
        """After work between steps: waits since the last step (a checkpoint's, an evaluation's) are not a step's."""
        super().restart()
        self._waited = self._waited_before

    def take(self) -> float | None:
        """This rank's own work in its median step (seconds) since the last take; None when nothing was measured.
        The median: a burst of load from outside, a few steps long, is noise, not a slow rank (one slowed for
        most of its steps shows). Waits after the last step (the epoch's last loss check) belong to no step."""
        works, self._works = self._works, []
        self._waited = self._waited_before = 0.0
        measured, self._seen_grads = self._seen_grads, False
        return statistics.median(works) if works and measured else None


class SlowRanks:
    """Rank 0's verdict, once an epoch, on every rank's own work per step (WorkClock.take)."""

    def __init__(self, threshold: float, min_seconds: float = 0.0) -> None:
        self.threshold = threshold  # 0: off
        self.min_seconds = min_seconds
        self.named: dict[int, float] = {}  # the latest verdict: rank -> its excess over the median
        self._over_for: dict[int, tuple[int, float]] = {}  # rank -> (epochs, seconds) over the threshold in a row

    def measure(self, work_s: float | None, seconds: float) -> dict[str, Any]:
        """Collective (every rank calls it, when on), after `seconds` of training since the last measure. Returns
        the epoch row's entries on rank 0: each rank's work in ms per step, and the ranks named slow with their
        excess over the others' median (a fraction)."""
        if not self.threshold:
            return {}
        gathered = gather_to_main(work_s)
        if gathered is None or len(gathered) < 2:  # not rank 0, or nobody to compare with
            return {}
        named = self.verdict_of(gathered, seconds)
        return {
            "work_ms_per_step": [round(v * 1000, 4) if v is not None else None for v in gathered],
            "slow_ranks": {str(rank): round(excess, 4) for rank, excess in named.items()},
        }

    def verdict_of(self, work_s: list[float | None], seconds: float) -> dict[int, float]:
        """The ranks over the threshold in this measurement (which covers `seconds` of training) and in the ones
        before it, at least two in a row lasting at least `min_seconds` together, with their excess now. On a
        machine shared with other jobs, one rank can be descheduled for a few seconds: a slow node stays slow."""
        values = {rank: v for rank, v in enumerate(work_s) if v is not None and math.isfinite(v)}
        excess = {}
        if len(values) == len(work_s):  # a rank that measured nothing (no hooks ran): no verdict this time
            for rank, v in values.items():
                median = _median_of_others(values, rank)
                if median > 0:
                    excess[rank] = v / median - 1
        over = {rank for rank, e in excess.items() if e > self.threshold}
        before, self._over_for = self._over_for, {}
        for rank in over:  # a rank back under the threshold starts again from nothing
            epochs, total = before.get(rank, (0, 0.0))
            self._over_for[rank] = (epochs + 1, total + seconds)
        self.named = {
            rank: round(excess[rank], 4)
            for rank, (epochs, total) in sorted(self._over_for.items())
            if epochs >= 2 and total >= self.min_seconds
        }
        return self.named


def _median_of_others(values: dict[int, float], rank: int) -> float:
    """The median of the other ranks' values: at 2 ranks, the median of both would halve a slow rank's excess."""
    return statistics.median(v for r, v in values.items() if r != rank)


def slow_text(named: dict[Any, float]) -> str:
    """`rank 1 (+48%)`, for the epoch line and `ddp-mnist status`."""
    return ", ".join(f"rank {rank} ({excess:+.0%})" for rank, excess in named.items())


def tracker_values(row: dict[str, Any]) -> dict[str, Any]:
    """An epoch row as scalars for the trackers: per-rank values under their own keys."""
    out = {k: v for k, v in row.items() if k not in ("work_ms_per_step", "slow_ranks")}
    for rank, ms in enumerate(row.get("work_ms_per_step", [])):
        out[f"work_ms_per_step/rank_{rank}"] = ms
    if "slow_ranks" in row:
        out["slow_ranks"] = len(row["slow_ranks"])
    return out
