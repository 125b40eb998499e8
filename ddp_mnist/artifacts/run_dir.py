"""The run folder: the unit of work (docs/design.md, Run folder). Rank 0 writes; every file has one owner here."""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
from datetime import datetime
from pathlib import Path
from typing import Any

from ddp_mnist.artifacts.checkpoint import check_folder, step_files
from ddp_mnist.artifacts.ownership import release, take
from ddp_mnist.config.options import current_keys
from ddp_mnist.config.train_config import TrainConfig
from ddp_mnist.errors import CheckpointError, ConfigError, first_line
from ddp_mnist.files import append_line, check_writable, write_json_atomic, write_text_atomic
from ddp_mnist.parallel.collectives import run_on_main
from ddp_mnist.parallel.env import DistEnv
from ddp_mnist.parallel.process_group import job_round

log = logging.getLogger("ddp_mnist")


RUNS = Path("runs")  # where runs started without --run-dir go, under the current folder


LATEST = RUNS / "latest"  # a symbolic link to the newest of them


CHECKPOINTS = "checkpoints"  # RUN/checkpoints/ holds a run's checkpoints (checkpoint.py)


class RunDir:
    """Paths and writers for one training job's folder."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config = self.path / "config.json"
        self.metrics = self.path / "metrics.jsonl"
        self.steps = self.path / "steps.jsonl"  # a line every --log-every steps (training/step_log.py)
        self.results = self.path / "results.json"
        self.checkpoints = self.path / CHECKPOINTS
        self.tracker = self.path / "tracker.json"
        # Left by rank 0 when the ranks stopped for a requeue; slurm/lib.sh reads it (REQUEUE_MARKER there).
        self.requeue = self.path / "requeue-requested"
        self.job = self.path / "job.json"

    def prepare(self, cfg: TrainConfig, resuming: bool, job_ids: dict[str, str] | None = None) -> None:
        """Create the folder (rank 0). A finished or started job is never overwritten silently.
        `job_ids`: the launchers' names for this job (DistEnv.job_ids), recorded for `same_job`."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            check_writable(self.path)
        except OSError as e:
            raise ConfigError(
                f"run folder {self.path} cannot be written ({e.strerror}); choose another "
                f"--run-dir or fix its permissions"
            ) from None
        try:
            check_folder(self.checkpoints)
        except CheckpointError as e:
            raise ConfigError(str(e)) from None
        if not resuming and (self.results.exists() or self.has_checkpoint()):
            raise ConfigError(
                f"run folder {self.path} already holds a training job; pass --resume to continue "
                f"it, or choose a new --run-dir (nothing was overwritten)"
            )
        if not resuming and (foreign := self.foreign_run_files()):
            raise ConfigError(
                f"run folder {self.path} holds {' and '.join(foreign)}, which ddp-mnist did not write; choose "
                f"another --run-dir (nothing was changed)"
            )
        if not resuming:  # what is left is ddp-mnist's own: a start that ended before its first checkpoint
            self.metrics.unlink(missing_ok=True)
            cfg.save(self.config)  # a resumed job's config is saved once its checkpoint has loaded (Trainer.resume)
        if job_ids:  # only now: a job refused above must not pass later for the one whose checkpoints are here
            write_json_atomic(self.job, job_ids, durable=True)

    def has_checkpoint(self) -> bool:
        """Whether checkpoints/ holds a step checkpoint of ours (or what is left of one): other files do not count."""
        return self.checkpoints.is_dir() and bool(step_files(self.checkpoints) or step_files(self.checkpoints, ".json"))

    def foreign_run_files(self) -> list[str]:
        """The run files here (config.json, metrics.jsonl) that ddp-mnist did not write: a fresh start would
        overwrite or delete them. Any other file in the folder is left alone and does not count."""
        foreign = []
        if self.config.exists() and not _is_run_config(self.config):
            foreign.append(self.config.name)
        if self.metrics.exists():
            try:
                read_metrics(self.path)
            except ConfigError:
                foreign.append(self.metrics.name)
        return foreign

    def same_job(self, job_ids: dict[str, str]) -> bool:
        """Whether the job that last trained in this folder had one of these names (a SLURM job id, a torchrun
        rendezvous id): this start is then a requeue or a restart of it. An unreadable record names no job."""
        try:
            recorded = json.loads(self.job.read_text())
        except (OSError, ValueError):
            return False
        return isinstance(recorded, dict) and any(recorded.get(key) == value for key, value in job_ids.items())

    def append_metrics(self, row: dict[str, Any]) -> None:
        append_line(self.metrics, json.dumps(row))

    def trim_metrics(self, last_epoch: int) -> None:
        """On resume, drop metric rows past the checkpoint (they are about to be recomputed), and a last line
        cut by a crash or a full disk (read_metrics warns)."""
        if not self.metrics.exists():
            return
        keep = [r for r in read_metrics(self.path) if r["epoch"] <= last_epoch]
        write_text_atomic(self.metrics, "".join(json.dumps(r) + "\n" for r in keep), durable=True)

    def append_step(self, row: dict[str, Any]) -> None:
        append_line(self.steps, json.dumps(row))

    def trim_steps(self, last_step: int) -> None:
        """On resume, drop the step lines past the checkpoint (they are about to be logged again), and any line
        that is not a step line (a last line cut by a crash): steps.jsonl is a log, never read by a job."""
        if not self.steps.exists():
            return
        keep = [line for line in self.steps.read_bytes().splitlines() if _step_of(line, last_step)]
        write_text_atomic(self.steps, "".join(line.decode() + "\n" for line in keep), durable=True)

    def mark_requeue(self, reason: str) -> None:
        write_text_atomic(self.requeue, reason + "\n", durable=True)  # like every file here: never through a symlink

    def write_results(self, results: dict[str, Any]) -> None:
        write_json_atomic(self.results, results, durable=True)


def place_run(
    model: str, recipe: str, job_ids: dict[str, str], restarted: bool, root: Path = RUNS, now: datetime | None = None
) -> str:
    """The folder of a run started without --run-dir (rank 0 decides, every rank gets it: Trainer).

    A new start gets a new folder, root/<date>-<time>-<model>-<recipe>, and root/latest links to it. A restart
    or a requeue (`restarted`) returns to its job's folder: the newest one whose job.json names this job
    (`job_ids`: SLURM job id, torchrun rendezvous id); a launcher that names no job falls back on the folder
    root/latest links to. Only restarts look: a new start never takes over a folder, even one whose job.json
    holds a reused id (the multi-node script derives its default id from its command line)."""
    if restarted:
        found = job_folder(root, job_ids) if job_ids else _latest(root)
        if found is not None:
            return str(found)
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    folder = new_folder(root, f"{stamp}-{model}-{recipe}")
    link_latest(folder)
    return str(folder)


def job_folder(root: Path, job_ids: dict[str, str]) -> Path | None:
    """The newest folder under root whose job.json names one of `job_ids` (names sort by start time)."""
    mine = [
        p.parent
        for p in sorted(root.glob("*/job.json"))
        if not p.parent.is_symlink() and RunDir(p.parent).same_job(job_ids)
    ]
    return mine[-1] if mine else None


def _latest(root: Path) -> Path | None:
    link = root / LATEST.name
    return root / os.readlink(link) if link.is_symlink() else None


def new_folder(root: Path, name: str) -> Path:
    """root/name, created here and now (never one that exists): two runs started in the same second get
    name, name-2, name-3, ..."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create {root} for the run folder ({e.strerror}); pass --run-dir") from None
    for n in itertools.count(1):
        folder = root / (name if n == 1 else f"{name}-{n}")
        try:
            folder.mkdir()  # exclusive: the one start that creates it owns it
            return folder
        except FileExistsError:
            continue
        except OSError as e:
            raise ConfigError(f"cannot create run folder {folder} ({e.strerror}); pass --run-dir") from None
    raise AssertionError("unreachable")


def link_latest(folder: Path) -> None:
    """Point folder.parent/latest at `folder`, atomically (a new link renamed over the old one): a reader
    sees the old run or the new one, never no link."""
    link = folder.parent / LATEST.name
    temporary = folder.parent / f".latest-{os.getpid()}.tmp"
    try:
        temporary.unlink(missing_ok=True)
        os.symlink(folder.name, temporary)  # relative: the runs folder may be moved as a whole
        os.replace(temporary, link)
    except OSError as e:  # e.g. `latest` is a real folder, written by an older version
        temporary.unlink(missing_ok=True)
        log.warning("could not point %s at %s (%s); name the run with --resume %s", link, folder, e.strerror, folder)


def _is_run_config(path: Path) -> bool:
    """Whether `path` holds a TrainConfig's settings, as ddp-mnist writes config.json."""
    try:
        values = json.loads(path.read_bytes().decode())
    except (OSError, ValueError, RecursionError):
        return False
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    return isinstance(values, dict) and "model" in values and set(current_keys(values)) <= fields


def read_results(run_dir: str | Path) -> dict[str, Any]:
    """results.json, a JSON object; anything else (missing, cut, not UTF-8, another shape) is a ConfigError
    naming the file."""
    path = RunDir(run_dir).results
    try:
        results = json.loads(path.read_bytes().decode())
    except OSError as e:
        raise ConfigError(f"{path} cannot be read ({e.strerror})") from None
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ConfigError(f"{path} is damaged ({first_line(e)}); train the run again to rewrite it") from None
    if not isinstance(results, dict):
        raise ConfigError(f"{path} is damaged (a JSON {type(results).__name__}, not an object)")
    return results


def finished_run(cfg: TrainConfig) -> dict[str, Any] | None:
    """A resumed run (cfg resolved) that already trained its last step: says so (rank 0's log) and returns its
    results.json; None when there is training left."""
    try:
        done = read_results(cfg.run_dir)
    except ConfigError:  # none, or damaged: the run is not known to be finished, and training rewrites it
        return None
    if not (isinstance(done, dict) and isinstance(done.get("steps"), int) and done["steps"] >= cfg.total_steps):
        return None
    accuracy = done.get("test_accuracy")
    log.info(
        "run %s has already finished: %d steps%s (%s). Nothing to resume; to train further, raise "
        "--max-steps, or --epochs under a constant schedule.",
        cfg.run_dir,
        done["steps"],
        f", test accuracy {accuracy:.2f}%" if isinstance(accuracy, (int, float)) else "",
        RunDir(cfg.run_dir).results,
    )
    return done


def _step_of(line: bytes, last_step: int) -> bool:
    """Whether a steps.jsonl line is a step line at or before `last_step`."""
    try:
        row = json.loads(line)
    except ValueError:
        return False
    step = row.get("global_step") if isinstance(row, dict) else None
    return isinstance(step, int) and not isinstance(step, bool) and step <= last_step


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """metrics.jsonl's rows: JSON objects with an integer `epoch`. A last line cut short (a crash or a full disk
    while it was appended) is dropped with a warning; damage anywhere else is a ConfigError naming the file and
    the line (the rows after it cannot be trusted to be in order)."""
    path = RunDir(run_dir).metrics
    try:
        lines = path.read_bytes().splitlines()
    except OSError as e:
        raise ConfigError(f"{path} cannot be read ({e.strerror})") from None
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        row = _metrics_row(line)
        if row is not None:
            rows.append(row)
        elif number == len(lines):
            log.warning("%s: its last line is cut short (a crash or a full disk while it was written); dropped", path)
        else:
            raise ConfigError(
                f"{path} line {number} is damaged (not a JSON object with an integer epoch); remove that line "
                f"(or the file) to go on"
            )
    return rows


def _metrics_row(line: bytes) -> dict[str, Any] | None:
    try:
        row = json.loads(line.decode())
    except (ValueError, RecursionError):
        return None
    epoch = row.get("epoch") if isinstance(row, dict) else None
    return row if isinstance(epoch, int) and not isinstance(epoch, bool) else None


def open_run(cfg: TrainConfig, env: DistEnv) -> tuple[RunDir, bool]:
    """The run folder, taken by this job (ownership.py) and prepared by rank 0, and whether this start resumes the
    job in it. Without --run-dir: a new runs/<date>-<time>-<model>-<recipe>, or a restarted job's own folder (rank
    0 decides, every rank gets it). The job releases the folder when it ends (Trainer.fit)."""
    if cfg.run_dir is None:
        cfg.run_dir = run_on_main(place_run, cfg.model, cfg.recipe, env.job_ids(), job_round(env).restarted)
    run = RunDir(cfg.run_dir)
    run_on_main(take, run.path, env.job_ids(), job_round(env).restarted)  # before anything is written there
    try:
        resuming = cfg.resume or continues_job(run, env)
        run_on_main(run.prepare, cfg, resuming, env.job_ids())
    except BaseException:
        if env.is_main:  # refused: the folder is left as it was found
            release(run.path)
        raise
    return run, resuming


def continues_job(run: RunDir, env: DistEnv) -> bool:
    """Resume without --resume: this start is an elastic restart or a requeue of the job whose checkpoint is in
    the run folder. Rank 0 decides and every rank gets its answer (nodes can disagree on their restart counts)."""

    def decide() -> bool:
        return run.has_checkpoint() and (job_round(env).restarted or run.same_job(env.job_ids()))

    return run_on_main(decide)
