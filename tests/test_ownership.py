"""One owner per run folder (issue "Nothing of the user's lost", rule 1): `RUN/owner.json` is taken atomically
before anything is written there; a second job is refused in one line naming the owner; a restart or requeue of
the same job takes it over; a dead job's lock is taken over; the job releases it when it ends."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket

import pytest
from conftest import base_env, ddp_mnist
from test_signals import Proc

from ddp_mnist.artifacts.ownership import OWNER, Owner, read_owner, release, take
from ddp_mnist.errors import ConfigError
from ddp_mnist.training.signals import EXIT_PREEMPTED

SLURM_JOB = {"slurm_job_id": "4242"}


def plant(folder, **changes) -> Owner:
    """An owner.json as another job would have left it: this process's, with `changes`."""
    folder.mkdir(parents=True, exist_ok=True)
    owner = Owner(**{**Owner.this_process(SLURM_JOB).__dict__, **changes})
    (folder / OWNER).write_text(json.dumps(owner.__dict__))
    return owner


def test_a_second_job_is_refused_naming_the_owner(tmp_path):
    take(tmp_path / "run", {}, restarted=False)
    owner = read_owner(tmp_path / "run" / OWNER)
    assert (owner.host, owner.pid) == (socket.gethostname(), os.getpid())
    with pytest.raises(ConfigError, match=rf"is in use by a job without a launcher id on .* \(pid {os.getpid()},"):
        take(tmp_path / "run", {}, restarted=False)
    release(tmp_path / "run")
    assert not (tmp_path / "run" / OWNER).exists()
    take(tmp_path / "run", {}, restarted=False)  # released: the next job takes it


def test_the_same_job_restarted_or_requeued_takes_its_folder_over(tmp_path):
    plant(tmp_path)
    take(tmp_path, SLURM_JOB, restarted=True)  # a requeue of job 4242: its own folder
    with pytest.raises(ConfigError, match="slurm_job_id 4242"):
        take(tmp_path, SLURM_JOB, restarted=False)  # a NEW job reusing the id (a fresh start) is another job
    with pytest.raises(ConfigError, match="in use"):
        take(tmp_path, {"slurm_job_id": "99"}, restarted=True)  # another job's restart
    plant(tmp_path / "no-ids", job={})
    take(tmp_path / "no-ids", {}, restarted=True)  # torchrun without --rdzv-id restarted its workers


@pytest.mark.parametrize(
    "left_by",
    [dict(pid=2**22 + 12345, pid_started="12345"), dict(pid_started="1")],
    ids=["its-process-is-gone", "its-pid-was-reused"],
)
def test_a_dead_jobs_lock_is_taken_over_with_a_warning(tmp_path, caplog, left_by):
    plant(tmp_path, **left_by)
    with caplog.at_level(logging.WARNING, logger="ddp_mnist"):
        take(tmp_path, {}, restarted=False)
    assert "its owner ended without releasing it" in caplog.text
    assert read_owner(tmp_path / OWNER).pid == os.getpid()


def test_a_damaged_lock_is_taken_over_and_another_hosts_is_not(tmp_path, caplog):
    (tmp_path / OWNER).write_bytes(b'{"host": "n')  # a crash while it was written
    with caplog.at_level(logging.WARNING, logger="ddp_mnist"):
        take(tmp_path, {}, restarted=False)
    assert "owner.json is damaged" in caplog.text
    plant(tmp_path / "other", host="node-that-is-not-here", job={})  # nothing says from here that it ended
    with pytest.raises(ConfigError, match=r"on node-that-is-not-here .*\(if it has ended, delete .*owner\.json\)"):
        take(tmp_path / "other", {}, restarted=False)


def test_release_removes_only_its_own_lock(tmp_path):
    planted = plant(tmp_path, pid=1)
    release(tmp_path)
    assert read_owner(tmp_path / OWNER) == planted


@pytest.mark.process
def test_two_trains_on_one_folder_the_second_is_refused_and_changes_nothing(data_dir, tmp_path):
    """The reported case: two `ddp-mnist train --run-dir SAME` both ran and printed "done"; the folder kept one
    job's results and metrics.jsonl interleaved both. `--resume` of a running job did the same."""
    run = tmp_path / "run"
    env = base_env(data_dir)
    first = Proc(["--run-dir", str(run), "--recipe", "tutorial", "--max-steps", "50", "--pause-at-step", "5"], env)
    try:
        first.wait_for("paused at step 5")
        before = {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file()}
        for extra in ([], ["--resume"]):
            second = ddp_mnist(1, "train", "--run-dir", str(run), "--recipe", "tutorial", *extra, env=env, check=False)
            assert second.returncode == 2, second.stderr
            assert f"run folder {run} is in use by a job without a launcher id" in second.stderr
            assert "Traceback" not in second.stderr
        assert {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
        first.popen.send_signal(signal.SIGTERM)
        rc, out = first.finish()
    finally:
        first.kill()
    assert rc == EXIT_PREEMPTED, out
    assert not (run / OWNER).exists()  # released when the job ended
