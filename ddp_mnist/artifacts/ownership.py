"""One owner per run folder (docs/design.md, Run folder): `RUN/owner.json`, created atomically by the job that
trains there and removed when it ends.

A second job that wants the folder (a fresh start, `--resume`) is refused in one line naming the owner. The
owner is the job, not a process: a torchrun restart or a SLURM requeue of the same job takes the folder over
(same job id, and this start is a restart). A lock left behind by a dead job is taken over with a warning: its
process is gone from this host (or its pid now belongs to another process), or its SLURM job has ended. A lock
whose owner cannot be checked from here (another host, no SLURM) is never taken: the message says how to
release it by hand.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ddp_mnist.errors import ConfigError
from ddp_mnist.files import resource_error

log = logging.getLogger("ddp_mnist")

OWNER = "owner.json"


@dataclass(frozen=True)
class Owner:
    host: str
    pid: int
    pid_started: str  # the process's start time on its host (/proc): tells a reused pid from the owner
    job: dict[str, str] = field(default_factory=dict)  # DistEnv.job_ids: SLURM job id, torchrun rendezvous id
    since: str = ""

    @classmethod
    def this_process(cls, job_ids: dict[str, str]) -> Owner:
        pid = os.getpid()
        return cls(socket.gethostname(), pid, _started(pid), dict(job_ids), time.strftime("%Y-%m-%d %H:%M:%S"))

    def describe(self) -> str:
        job = ", ".join(f"{key} {value}" for key, value in self.job.items()) or "a job without a launcher id"
        return f"{job} on {self.host} (pid {self.pid}, since {self.since})"

    def same_job(self, job_ids: dict[str, str]) -> bool:
        return any(self.job.get(key) == value for key, value in job_ids.items())

    def gone(self) -> bool:
        """Whether the owner has certainly ended: its process is gone from this host, or its SLURM job ended."""
        if self.host == socket.gethostname():
            now = _started(self.pid)
            return now == "" or now != self.pid_started  # no such process, or another one under its pid
        job = self.job.get("slurm_job_id")
        return job is not None and _slurm_job_ended(job)


def take(folder: Path, job_ids: dict[str, str], restarted: bool) -> None:
    """Make this job the owner of `folder` (rank 0, before anything is written there). `restarted`: this start
    is a restart or requeue (JobRound.restarted): only then does the same job id mean the same job."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(
            f"run folder {folder} cannot be written ({e.strerror}); choose another --run-dir or fix its permissions"
        ) from None
    me = Owner.this_process(job_ids)
    for _ in range(3):  # another job may take or release the folder meanwhile: look again
        if _create(folder / OWNER, me):
            return
        try:
            owner = read_owner(folder / OWNER)
        except FileNotFoundError:  # released meanwhile: try to create it again
            continue
        if owner is None:
            why = "its owner.json is damaged (a crash while it was written)"
        elif restarted and (owner.same_job(job_ids) or owner.job == job_ids == {}):
            # The same job, restarted or requeued: its own folder. Without launcher ids (torchrun without
            # --rdzv-id) a restart still is one: the job's earlier round held the folder until it was restarted.
            why = None
        elif owner.gone():
            why = f"its owner ended without releasing it ({owner.describe()})"
        else:
            raise ConfigError(
                f"run folder {folder} is in use by {owner.describe()}; wait for that job to end or choose another "
                f"--run-dir (if it has ended, delete {folder / OWNER})"
            )
        if why:
            log.warning("taking over run folder %s: %s", folder, why)
        _release_stale(folder / OWNER, owner)
    raise ConfigError(f"run folder {folder} changed owners while this job tried to take it; start it again")


def release(folder: Path) -> None:
    """Remove owner.json if this process owns it (rank 0, when the job ends: done, stopped or failed)."""
    path = Path(folder) / OWNER
    owner = read_owner(path)
    if owner is not None and owner.host == socket.gethostname() and owner.pid == os.getpid():
        path.unlink(missing_ok=True)


def read_owner(path: Path) -> Owner | None:
    """The owner recorded in `path`; None when it is damaged (a cut write) or not ours to read."""
    try:
        data: Any = json.loads(path.read_bytes().decode())
        return Owner(
            str(data["host"]), int(data["pid"]), str(data["pid_started"]), dict(data["job"]), str(data["since"])
        )
    except FileNotFoundError:
        raise
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return None


def _create(path: Path, owner: Owner) -> bool:
    """Create `path` holding `owner`, atomically: False when it exists (O_EXCL; O_NOFOLLOW: never a link)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    except FileExistsError:
        return False
    except OSError as e:
        raise ConfigError(f"run folder {path.parent} cannot be written ({e.strerror}); choose another --run-dir") from e
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(owner), f)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:  # a full disk: no half-written lock is left behind
        path.unlink(missing_ok=True)
        raise resource_error(e, path) or e from None
    return True


def _release_stale(path: Path, seen: Owner | None) -> None:
    """Remove the lock that was read as `seen`, unless another job replaced it meanwhile."""
    try:
        if read_owner(path) == seen:
            path.unlink()
    except FileNotFoundError:
        pass


def _started(pid: int) -> str:
    """The start time of process `pid` (clock ticks since boot, /proc/PID/stat field 22); "" when there is no
    such process. Without /proc (not Linux): "alive" for a live process, which cannot tell a reused pid."""
    if not Path("/proc/self/stat").exists():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return ""
        except PermissionError:
            pass  # alive, another user's
        return "alive"
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def _slurm_job_ended(job: str) -> bool:
    """Whether SLURM says job `job` is no longer pending or running (False when SLURM cannot be asked)."""
    if shutil.which("squeue") is None:
        return False
    try:
        done = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    if done.returncode != 0:
        return "Invalid job id" in done.stderr  # a job SLURM no longer knows
    return done.stdout.strip() not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED")
