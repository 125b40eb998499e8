"""The job's time limit, watched by rank 0 (docs/design.md, Signals).

A SLURM job submitted without a warning signal (`sbatch --signal`) would lose everything since its last
checkpoint when its time runs out: SLURM ends it (TIMEOUT) in the middle of a step. So at each stop check rank
0 asks whether the next stop-check interval, a checkpoint and a margin (`--time-limit-margin-s`) still fit
before the job's end time. When they do not, it requests a stop, which every rank takes up at the same step
through the stop check's own all-reduce (no extra sync), and the job checkpoints and requeues exactly as on
the warning signal: under the batch scripts in slurm/ through their requeue marker, elsewhere rank 0 asks
SLURM itself (commands/cli.py: after_stop).

The end time comes from `$DDP_MNIST_END_TIME` (Unix seconds: another scheduler, or the tests), else, under
SLURM, from `squeue` (the job's StartTime and EndTime), read once per attempt: a requeued job starts again and
reads its new end. One `squeue` per job, by rank 0, not one per rank.

An attempt that reaches its first step too near its end (a start slowed by a busy node) still has time for one
step and a checkpoint: it requeues at its first stop check. Only a job whose whole time limit is within the
margin is an error: requeueing could never help it.
"""

from __future__ import annotations

import collections
import datetime
import logging
import os
import subprocess
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, NamedTuple

from ddp_mnist.errors import ConfigError
from ddp_mnist.parallel.collectives import run_on_main
from ddp_mnist.parallel.env import slurm_job_spec

if TYPE_CHECKING:
    from ddp_mnist.artifacts.checkpoint import Checkpointer
    from ddp_mnist.config.train_config import TrainConfig
    from ddp_mnist.training.signals import StopSignals

log = logging.getLogger("ddp_mnist")

END_TIME_ENV = "DDP_MNIST_END_TIME"


NO_LIMIT = ("NONE", "UNLIMITED")  # squeue's EndTime of a job without a time limit


RECENT_CHECKS = 50  # the next interval between stop checks is estimated as the longest of the last 50


SQUEUE_TIMEOUT_S = 30.0


class EndTime(NamedTuple):
    at: float | None
    """When the job must be over, in Unix seconds; None: no end is known."""
    source: str
    """Where it came from, or why there is none."""
    unreadable: bool = False
    """A SLURM job whose end could not be read (no `squeue` in a container, ...): the log says so."""
    start: float | None = None
    """When this attempt of the SLURM job started, in Unix seconds; None: not known."""


def job_end_time(environ: Mapping[str, str]) -> EndTime:
    """When this job must be over."""
    text = environ.get(END_TIME_ENV)
    if text:
        try:
            return EndTime(float(text), END_TIME_ENV)
        except ValueError:
            raise ConfigError(
                f"{END_TIME_ENV}={text!r} is not a time in Unix seconds: set it to e.g. $(date -d '+2 hours' +%s),"
                " or unset it"
            ) from None
    job = slurm_job_spec(environ)
    if job is None:
        return EndTime(None, "not a SLURM job")
    command = ["squeue", "--noheader", "--jobs", job, "--format", "%S %e"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=SQUEUE_TIMEOUT_S, env=dict(environ))
    except (OSError, subprocess.TimeoutExpired) as e:
        return EndTime(None, f"`{' '.join(command)}` failed: {e}", unreadable=True)
    shown = done.stdout.strip()
    started, _, ends = shown.partition(" ")
    if ends in NO_LIMIT:
        return EndTime(None, "the SLURM job has no time limit")
    try:  # squeue prints local times
        start, end = (datetime.datetime.fromisoformat(t).timestamp() for t in (started, ends))
    except ValueError:
        why = (done.stderr or shown).strip() or "nothing"
        return EndTime(None, f"`{' '.join(command)}` gave no start and end time ({why!r})", unreadable=True)
    return EndTime(end, f"SLURM job {job}", start=start)


class TimeLimit:
    """Rank 0's watch on the job's end time. `check()` at every stop check; on the other ranks, and without an
    end time, it does nothing."""

    def __init__(
        self,
        end: float | None,
        margin_s: float,
        signals: StopSignals,
        checkpointer: Checkpointer,
        late: bool = False,
    ):
        self.end, self.margin_s, self.late = end, margin_s, late
        self.signals, self.checkpointer = signals, checkpointer
        self.gaps: collections.deque[float] = collections.deque(maxlen=RECENT_CHECKS)
        self.last_check = time.monotonic()

    @classmethod
    def of_job(
        cls,
        cfg: TrainConfig,
        is_main: bool,
        signals: StopSignals,
        checkpointer: Checkpointer,
        environ: Mapping[str, str] = os.environ,
    ) -> TimeLimit:
        """Every rank calls it (a collective): rank 0 reads the end time and says it; a job with no time left to
        train is a clear error on every rank, an attempt that started too late is `late` on every rank."""
        end, late = run_on_main(read_end, cfg, environ) if cfg.watch_time_limit else (None, False)
        return cls(end if is_main else None, cfg.time_limit_margin_s, signals, checkpointer, late)

    def due(self, step: int, every: int) -> bool:
        """Whether the stop check comes after this step: every `every` steps, and after each step of a late
        attempt (rank 0 decided it, so every rank checks at the same steps)."""
        return self.late or step % every == 0

    def check(self) -> None:
        """At a stop check: when the next interval, a checkpoint and the margin no longer fit before the end,
        request the stop (signals.py), taken up by every rank at this very check."""
        now = time.monotonic()
        self.gaps.append(now - self.last_check)
        self.last_check = now
        if self.end is None or self.signals.pending:
            return
        left = self.end - time.time()
        needed = max(self.gaps) + self.checkpointer.longest_save_s + self.margin_s
        if left < needed:
            self.signals.request(
                "the time limit",
                f"the job's time limit is near ({left:.0f} s left; the next stop check, a checkpoint and the"
                f" margin need {needed:.0f} s)",
            )


def read_end(cfg: TrainConfig, environ: Mapping[str, str]) -> tuple[float | None, bool]:
    """Rank 0: the job's end time (None: none known), said in one line, and whether this attempt started too late
    to train (it requeues after its first step). A ConfigError when the job's whole time limit is within the
    margin: requeueing could never help it."""
    end, source, unreadable, start = job_end_time(environ)
    if end is None:
        if unreadable:
            log.warning(
                "ddp-mnist: the job's time limit is not watched: %s; ask SLURM for a warning signal instead"
                " (sbatch --signal=%s@120)",
                source,
                cfg.requeue_signal,
            )
        return None, False
    left, ends = end - time.time(), datetime.datetime.fromtimestamp(end).isoformat(sep=" ", timespec="seconds")
    if left <= cfg.time_limit_margin_s and start is not None and end - start > cfg.time_limit_margin_s:
        log.warning(
            "time limit: the job ends at %s (%s, in %.0f s): this attempt started %.0f s ago, too late to train;"
            " it checkpoints after its first step and requeues",
            ends,
            source,
            left,
            time.time() - start,
        )
        return end, True
    if left <= cfg.time_limit_margin_s:
        raise ConfigError(
            f"the job ends in {left:.0f} s ({source}), within --time-limit-margin-s {cfg.time_limit_margin_s:g}:"
            " no time to train; give the job more time (sbatch --time), a smaller margin, or"
            " --no-watch-time-limit"
        )
    log.info(
        "time limit: the job ends at %s (%s, in %.0f s): it checkpoints and requeues %g s before then",
        ends,
        source,
        left,
        cfg.time_limit_margin_s,
    )
    return end, False
