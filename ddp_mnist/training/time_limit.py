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
import math
import os
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from ddp_mnist.errors import ConfigError
from ddp_mnist.parallel.collectives import is_main_rank, run_on_main
from ddp_mnist.parallel.env import slurm_job_spec

if TYPE_CHECKING:
    from ddp_mnist.artifacts.checkpoint import Checkpointer
    from ddp_mnist.config.train_config import TrainConfig
    from ddp_mnist.training.signals import StopSignals

log = logging.getLogger("ddp_mnist")

END_TIME_ENV = "DDP_MNIST_END_TIME"


NO_LIMIT = ("NONE", "UNLIMITED")  # squeue's EndTime of a job without a time limit


RECENT_CHECKS = 50  # the next interval between stop checks is estimated as the longest of the last 50


SQUEUE_TIMEOUT_S = 30.0  # at most; half of --timeout-s when that is shorter (the other ranks wait meanwhile)


LATE_MARKER = "late-start"  # RUN/late-start: the attempt before this one started too late to train


class EndTime(NamedTuple):
    at: float | None
    """When the job must be over, in Unix seconds; None: no end is known."""
    source: str
    """Where it came from, or why there is none."""
    unreadable: bool = False
    """A SLURM job whose end could not be read (no `squeue` in a container, ...): the log says so."""
    start: float | None = None
    """When this attempt of the SLURM job started, in Unix seconds; None: not known."""


def job_end_time(environ: Mapping[str, str], timeout_s: float = SQUEUE_TIMEOUT_S) -> EndTime:
    """When this job must be over."""
    text = environ.get(END_TIME_ENV)
    if text:
        return EndTime(injected_end(text), END_TIME_ENV)
    job = slurm_job_spec(environ)
    if job is None:
        return EndTime(None, "not a SLURM job")
    # Unix seconds, whatever the user's SLURM_TIME_FORMAT, and no local time to convert (no daylight-saving hour
    # read twice); %l: the limit itself, UNLIMITED for none.
    command = ["squeue", "--noheader", "--jobs", job, "--format", "%S %e %l"]
    try:
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env={**environ, "SLURM_TIME_FORMAT": "%s"},
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return EndTime(None, f"`{' '.join(command)}` failed: {e}", unreadable=True)
    shown = done.stdout.strip()
    started, ends, limit = (shown.split() + ["", "", ""])[:3]
    if ends in NO_LIMIT or limit in NO_LIMIT:
        return EndTime(None, "the SLURM job has no time limit")
    try:
        start, end = float(started), float(ends)
    except ValueError:
        why = (done.stderr or shown).strip() or "nothing"
        return EndTime(None, f"`{' '.join(command)}` gave no start and end time ({why!r})", unreadable=True)
    return EndTime(end, f"SLURM job {job}", start=start)


def injected_end(text: str) -> float:
    """$DDP_MNIST_END_TIME as Unix seconds, or a clear error."""
    try:
        end = float(text)
    except ValueError:
        end = math.nan
    if not math.isfinite(end) or not 0 < end < 1e11:
        raise ConfigError(
            f"{END_TIME_ENV}={text!r} is not a time in Unix seconds: set it to e.g. $(date -d '+2 hours' +%s),"
            " or unset it"
        )
    return end


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
        self.start_gap: float | None = None  # up to the attempt's first stop check: start-up, not an interval
        self.last_check = time.monotonic()
        self.first_step_seen = False

    @classmethod
    def of_job(
        cls,
        cfg: TrainConfig,
        run_path: Path,
        signals: StopSignals,
        checkpointer: Checkpointer,
        environ: Mapping[str, str] = os.environ,
    ) -> TimeLimit:
        """Every rank calls it (a collective): rank 0 reads the end time and says it; a job with no time left to
        train is a clear error on every rank, an attempt that started too late is `late` on every rank."""
        end, late = run_on_main(read_end, cfg, run_path, environ) if cfg.watch_time_limit else (None, False)
        return cls(end if is_main_rank() else None, cfg.time_limit_margin_s, signals, checkpointer, late)

    def due(self, step: int, every: int, pause_at: int | None = None) -> bool:
        """Whether the stop check comes after this step: after the attempt's first step (its start-up may have
        eaten the time), then every `every` steps, after each step of a late attempt, and at `--pause-at-step`
        (a paused job ends at the signal that ended its pause). Every rank asks at every step and gets the same
        answer (rank 0 decided `late` for all)."""
        first, self.first_step_seen = not self.first_step_seen, True
        return first or self.late or step % every == 0 or step == pause_at

    def check(self) -> None:
        """At a stop check: when the next interval, a checkpoint and the margin no longer fit before the end,
        request the stop (signals.py), taken up by every rank at this very check."""
        now = time.monotonic()
        gap, self.last_check = now - self.last_check, now
        if self.start_gap is None:
            self.start_gap = gap  # the estimate of the next interval only until one is measured
        else:
            self.gaps.append(gap)
        if self.end is None or self.signals.pending:
            return
        left = self.end - time.time()
        needed = max(self.gaps or [self.start_gap]) + self.checkpointer.longest_save_s + self.margin_s
        if left < needed:
            self.signals.request(
                "the time limit",
                f"the job's time limit is near ({left:.0f} s left; the next stop check, a checkpoint and the"
                f" margin need {needed:.0f} s)",
            )


def read_end(cfg: TrainConfig, run_path: Path, environ: Mapping[str, str]) -> tuple[float | None, bool]:
    """Rank 0: the job's end time (None: none known), said in one line, and whether this attempt started too late
    to train (it requeues after its first step). A ConfigError when the job's whole time limit is within the
    margin, or when the attempt before was late too: requeueing would not help."""
    end, source, unreadable, start = job_end_time(environ, min(SQUEUE_TIMEOUT_S, cfg.timeout_s / 2))
    if end is None:
        if unreadable:
            log.warning(
                "ddp-mnist: the job's time limit is not watched: %s; ask SLURM for a warning signal instead"
                " (sbatch --signal=%s@120)",
                source,
                cfg.requeue_signal,
            )
        return None, False
    margin, left = cfg.time_limit_margin_s, end - time.time()
    ends = datetime.datetime.fromtimestamp(end).isoformat(sep=" ", timespec="seconds")
    marker = run_path / LATE_MARKER
    if left > margin:
        marker.unlink(missing_ok=True)
        log.info(
            "time limit: the job ends at %s (%s, in %.0f s): it checkpoints and requeues at the latest %g s before"
            " then",
            ends,
            source,
            left,
            margin,
        )
        return end, False
    if start is None or end - start <= margin:
        raise ConfigError(
            f"the job ends in {left:.0f} s ({source}), within --time-limit-margin-s {margin:g}: no time to train;"
            " give the job more time (sbatch --time), a smaller margin, or --no-watch-time-limit"
        )
    return end, late_attempt(marker, ends, source, left, time.time() - start, end - start)


def late_attempt(marker: Path, ends: str, source: str, left: float, started_s: float, limit_s: float) -> bool:
    """An attempt whose start-up ate its time: it requeues after one step, once; a second late attempt in a row
    would requeue for ever (a start-up longer than the limit less the margin), so it is a clear error."""
    if marker.exists():
        raise ConfigError(
            f"two attempts in a row started too late to train: this one {started_s:.0f} s after its start, of a"
            f" {limit_s:.0f} s time limit ({source}); give the job more time (sbatch --time) or a smaller"
            " --time-limit-margin-s"
        )
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"{source}: started {started_s:.0f} s before its first step, {left:.0f} s left\n")
    log.warning(
        "time limit: the job ends at %s (%s, in %.0f s): this attempt started %.0f s ago, too late to train;"
        " it checkpoints after its first step and requeues",
        ends,
        source,
        left,
        started_s,
    )
    return True
