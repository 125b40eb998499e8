"""Each rank's own files in the run folder (docs/design.md, Run folder), for finding out what a big job did:

- `RUN/logs/rank-N.log`: everything the package logs on rank N, every level, each line timestamped and
  tagged with the rank, its node and local rank (the console is unchanged). A restart or requeue appends,
  after a line naming its round.
- `RUN/ranks/rank-N.json`: rank N's heartbeat, rewritten atomically every `--heartbeat-s` seconds by a daemon
  thread (so it goes on while the main thread waits in a collective): step, epoch, phase, the last step's
  time, samples/s, peak CUDA memory, and when it was written. `ddp-mnist status` reads them.
- the stall dump: when no step has come for `stall_s` seconds (a rank stuck in Python or in C code, in or out
  of a collective), faulthandler's own thread writes the stack of each thread into the rank's log.

Only rank N writes rank N's files; they hold no checkpoint state and are never read back by a job.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from ddp_mnist.errors import ConfigError, first_line
from ddp_mnist.files import open_for_append, resource_error, write_json_atomic
from ddp_mnist.parallel.env import DistEnv
from ddp_mnist.parallel.process_group import job_round
from ddp_mnist.training.state import TrainState

log = logging.getLogger("ddp_mnist")

LOGS, RANKS = "logs", "ranks"


def rank_log_path(run: Path, rank: int) -> Path:
    return run / LOGS / f"rank-{rank}.log"


def heartbeat_path(run: Path, rank: int) -> Path:
    return run / RANKS / f"rank-{rank}.json"


@contextlib.contextmanager
def rank_files(
    run: Path, env: DistEnv, heartbeat_s: float, snapshot: Callable[[], dict[str, Any]], stall_s: float
) -> Iterator[None]:
    """This rank's log and heartbeat (and stall dump), kept while the block runs; the log names the job's round."""
    job = job_round(env)
    with RankLog(run, env, f"round {job.generation}, restarts {job.restarts}") as rank_log:
        with Heartbeat(run, env, heartbeat_s, snapshot, StallDump(stall_s + heartbeat_s, rank_log.stream)):
            yield


class RankLog:
    """Context manager: while it is open, every record of the package's logger also goes to this rank's log
    file (opened with O_NOFOLLOW and O_APPEND: a planted symlink is refused, a restart appends)."""

    def __init__(self, run: Path, env: DistEnv, round_text: str) -> None:
        self.path, self.env, self.round_text = rank_log_path(run, env.rank), env, round_text
        self.handler: logging.StreamHandler | None = None
        self._level = logging.NOTSET

    def __enter__(self) -> RankLog:
        try:
            self.path.parent.mkdir(exist_ok=True)
            fd = open_for_append(self.path)
        except OSError as e:  # a planted symlink (ELOOP), a full disk, a read-only copy of the folder
            raise resource_error(e, self.path) or ConfigError(
                f"rank log {self.path} cannot be written ({e.strerror}); fix the run folder or choose another --run-dir"
            ) from None
        self.handler = logging.StreamHandler(open(fd, "a", buffering=1, encoding="utf-8"))  # noqa: SIM115
        where = f"rank {self.env.rank} (node {self.env.node}, local rank {self.env.local_rank})"
        self.handler.setFormatter(logging.Formatter(f"%(asctime)s {where} %(levelname)s: %(message)s"))
        self.stream = self.handler.stream
        package = logging.getLogger("ddp_mnist")
        self._level = package.level
        package.setLevel(logging.DEBUG)  # all levels into the file; the console handler keeps its own level
        package.addHandler(self.handler)
        log.debug("start: %s, world size %d", self.round_text, self.env.world_size)
        return self

    def __exit__(self, *exc) -> None:
        package = logging.getLogger("ddp_mnist")
        package.removeHandler(self.handler)
        package.setLevel(self._level)
        self.handler.close()
        self.handler.stream.close()  # StreamHandler leaves its stream open: this one is ours


class Heartbeat:
    """Context manager: a daemon thread rewrites this rank's heartbeat file every `every_s` seconds (and once
    at the start and at the end) from `snapshot()`, the loop's plain attributes: no collective, no sync."""

    def __init__(
        self,
        run: Path,
        env: DistEnv,
        every_s: float,
        snapshot: Callable[[], dict[str, Any]],
        stall: StallDump | None = None,
    ) -> None:
        self.path, self.env, self.every_s, self.snapshot = heartbeat_path(run, env.rank), env, every_s, snapshot
        self.stall = stall  # re-armed at each beat that finds a new step
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Heartbeat:
        if self.every_s > 0:
            try:
                self.path.parent.mkdir(exist_ok=True)
            except OSError as e:  # a diagnosis aid: the job goes on without it, and says so
                log.warning("no heartbeat file: %s cannot be created (%s)", self.path.parent, e.strerror)
                return self
            self._write_and_watch()
            self._thread = threading.Thread(target=self._beat, name="ddp-mnist-heartbeat", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()  # its last write must not come after the final one
            self.write(ended="done" if exc_type is None else exc_type.__name__)
            if self.stall is not None:
                self.stall.cancel()

    def _beat(self) -> None:
        while not self._stop.wait(self.every_s):
            self._write_and_watch()

    def _write_and_watch(self) -> None:
        record = self.write()
        if self.stall is not None and record is not None:
            self.stall.step(record["step"])

    def write(self, ended: str | None = None) -> dict[str, Any] | None:
        """ENDED: how the job ended on this rank (`done`, or the exception that ended it); None while it runs.
        Returns what it wrote (None when it could not)."""
        try:
            record = {
                "rank": self.env.rank,
                "local_rank": self.env.local_rank,
                "node": self.env.node,
                "pid": os.getpid(),
                **self.snapshot(),
                "ended": ended,
                "written": time.time(),
            }
            write_json_atomic(self.path, record)
            return record
        except Exception as e:  # noqa: BLE001 - a diagnosis aid (a full disk, a snapshot mid-change): never the job's end
            log.debug("heartbeat %s not written: %s", self.path, e)
            return None


class StallDump:
    """faulthandler's timer, armed again whenever the step moved: when no step comes for `after_s` seconds, its
    own C thread writes every thread's stack into `file` (this rank's log). It needs no GIL, so it also shows a
    rank stuck in C code that holds it, which no Python thread of the rank could dump."""

    def __init__(self, after_s: float, file) -> None:
        self.after_s, self.file = after_s, file
        self._step: int | None = None

    def step(self, step: int) -> None:
        if step != self._step:
            self._step = step
            faulthandler.dump_traceback_later(self.after_s, repeat=False, file=self.file)

    def cancel(self) -> None:
        faulthandler.cancel_dump_traceback_later()


class StepClock:
    """The host's view of the loop's pace, for the heartbeat: the last step's wall time and the samples per
    second since the previous heartbeat. Plain attribute writes from the loop, read by the heartbeat thread."""

    def __init__(self, samples_per_step: int) -> None:
        self.samples_per_step = samples_per_step
        self.last_step_s: float | None = None
        self.busy_s = 0.0  # the steps' time so far, evaluations and checkpoints between them left out
        self._last = time.perf_counter()
        self._steps = 0
        self._mark = (time.perf_counter(), 0)

    def tick(self) -> None:
        now = time.perf_counter()
        self.last_step_s, self._last = now - self._last, now
        self.busy_s += self.last_step_s
        self._steps += 1

    def restart(self) -> None:
        """After work between steps (evaluation, a checkpoint): the next step's time starts now."""
        self._last = time.perf_counter()

    def samples_per_s(self) -> float | None:
        now, steps = time.perf_counter(), self._steps
        since, steps_then = self._mark
        self._mark = (now, steps)
        return (steps - steps_then) * self.samples_per_step / (now - since) if steps > steps_then else None


def read_heartbeats(run: Path) -> tuple[dict[int, dict[str, Any]], list[str]]:
    """Each rank's heartbeat, and one line per file that could not be read (damaged, cut, another shape)."""
    beats, problems = {}, []
    for path in sorted((run / RANKS).glob("rank-*.json")):
        try:
            beat = json.loads(path.read_bytes().decode())
            if not _is_heartbeat(beat):
                raise ValueError("not a heartbeat")
        except (OSError, ValueError, RecursionError) as e:
            problems.append(f"{path}: unreadable ({first_line(e)})")
            continue
        beats[beat["rank"]] = beat
    return beats, problems


def _is_heartbeat(beat: Any) -> bool:
    """The keys status relies on, of the right types (a file is read as it is: cut, edited, or another shape)."""
    return (
        isinstance(beat, dict)
        and all(isinstance(beat.get(key), int) and not isinstance(beat.get(key), bool) for key in ("rank", "step"))
        and isinstance(beat.get("written"), float)
        and math.isfinite(beat["written"])
    )


def where_the_rank_is(
    state: TrainState, epochs: int, phase: str, clock: StepClock, device: torch.device, slow_ranks: dict[int, float]
) -> dict[str, Any]:
    """The loop's part of a heartbeat: position, phase, pace, peak CUDA memory, and the ranks named slow (rank 0's
    verdict, stragglers.py; empty on the other ranks). Plain reads, no sync."""
    return {
        "step": state.global_step,
        "epoch": min(state.epoch + 1, epochs),
        "phase": phase,
        "last_step_s": clock.last_step_s,
        "samples_per_s": clock.samples_per_s(),
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "slow_ranks": dict(slow_ranks),
    }
