"""Resource errors say what ran out (issue "Nothing of the user's lost", rule 6): "No space left on device
(FILE)" or "Read-only file system (FILE)", exit 2; what was on disk before stays intact, and the next start
resumes. On a real, small file system: a tmpfs mounted for the test (as root, as CI runs)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
from conftest import base_env, ddp_mnist, results

from ddp_mnist.artifacts.checkpoint import Checkpointer, load
from ddp_mnist.errors import ResourceError
from ddp_mnist.files import append_line, write_json_atomic

pytestmark = pytest.mark.process  # mount and umount are processes (docs/testing.md)


def mount(folder, options: str) -> None:
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True, text=True)
    if done.returncode:
        message = f"cannot mount a small tmpfs here ({done.stderr.strip()}): run the tests as root"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB file system: room for one checkpoint of the MLP (2 MiB), not two."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    mount(disk, "size=3m")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk, leave: int = 0) -> None:
    """Fill the file system, leaving about `leave` bytes free."""
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with open(disk / "filler", "wb") as f:
        f.write(b"\0" * max(free - leave, 0))


def state(step: int, numbers: int) -> dict:
    return {"epoch": 0, "step_in_epoch": step, "config": {}, "model": {"w": torch.ones(numbers)}}


def test_a_checkpoint_that_does_not_fit_says_no_space_and_keeps_the_last_one(small_disk):
    """The reported case: a full disk during a save reported torch's "enforce fail" without saying "no space"."""
    folder = small_disk / "checkpoints"
    writer = Checkpointer(folder, keep=3, is_main=True)
    first = writer.save(state(1, 1000), 1)
    fill(small_disk, leave=100_000)
    with pytest.raises(ResourceError, match=r"No space left on device \(.*step-00000002\.pt\): free space"):
        writer.save(state(2, 250_000), 2)  # 1 MB
    assert sorted(p.name for p in folder.iterdir()) == ["step-00000001.json", "step-00000001.pt"]  # no leftovers
    assert torch.equal(load(first)["model"]["w"], torch.ones(1000))
    (small_disk / "filler").unlink()
    writer.save(state(2, 250_000), 2)  # space again: the job goes on
    assert Checkpointer(folder, keep=3, is_main=True).choose({}) == folder / "step-00000002.pt"


def test_a_line_that_does_not_fit_is_not_left_half_written(small_disk):
    """The reported case: a full disk while a line was appended to metrics.jsonl left half a line."""
    metrics = small_disk / "metrics.jsonl"
    append_line(metrics, json.dumps({"epoch": 1}))
    before = metrics.read_bytes()
    fill(small_disk)
    with pytest.raises(ResourceError, match=r"No space left on device \(.*metrics\.jsonl\)"):
        append_line(metrics, json.dumps({"epoch": 2, "notes": "x" * 100_000}))
    assert metrics.read_bytes() == before
    config = small_disk / "config.json"
    with pytest.raises(ResourceError, match=r"No space left on device \(.*config\.json\)"):
        write_json_atomic(config, {"lr": 0.01, "notes": "x" * 100_000})
    assert not config.exists()


def test_a_read_only_file_system_says_so(small_disk):
    (small_disk / "config.json").write_text("{}")
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    with pytest.raises(ResourceError, match=r"Read-only file system \(.*config\.json\): the file system is mounted"):
        write_json_atomic(small_disk / "config.json", {"lr": 0.1})
    assert (small_disk / "config.json").read_text() == "{}"


def test_training_on_a_full_disk_stops_in_one_line_and_resumes_when_there_is_room(small_disk, data_dir):
    run = small_disk / "run"
    job = ("--run-dir", str(run), "--recipe", "tutorial", "--max-steps", "60", "--checkpoint-every", "20")
    full = ddp_mnist(1, "train", "--no-progress", *job, env=base_env(data_dir), check=False)
    assert full.returncode == 2, full.stdout + full.stderr
    assert "No space left on device (" in full.stderr and "step-00000040.pt" in full.stderr, full.stderr
    assert "Traceback" not in full.stderr and "enforce fail" not in full.stderr
    subprocess.run(["mount", "-o", "remount,size=32m", str(small_disk)], check=True)
    resumed = ddp_mnist(1, "train", "--no-progress", *job, "--resume", env=base_env(data_dir))
    assert "resumed from" in resumed.stdout and "step-00000020.pt" in resumed.stdout
    assert results(run)["steps"] == 60
