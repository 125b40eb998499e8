"""W&B tracking, checked in the offline files that real training jobs write (no network, no API key).

The .wandb files are read with wandb's own record protobufs (the LevelDB-log framing described in
shared/notes/wandb-offline.md), and once with `wandb leet inspect`, the reader wandb ships.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from conftest import ROOT, base_env, ddp_mnist, results, run_cmd, train_cmd

pytestmark = pytest.mark.process  # every test here starts processes (docs/testing.md)

# 2 epochs of 100 steps: fast, and two per-epoch evaluations to compare.
TINY = ("--recipe", "tutorial", "--epochs", "2", "--batch-size", "600", "--log-every", "20")


def wandb_env(tmp: Path, data_dir: Path, **extra: str) -> dict[str, str]:
    """Offline W&B in a private folder, whatever the machine's W&B settings are."""
    env = {k: v for k, v in base_env(data_dir).items() if not k.startswith("WANDB_")}
    env.update(
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        WANDB_DIR=str(tmp / "wandb"),
        WANDB_CACHE_DIR=str(tmp / "wandb-cache"),
        WANDB_CONFIG_DIR=str(tmp / "wandb-config"),
        **extra,
    )
    (tmp / "wandb").mkdir(exist_ok=True)
    return env


# ---------------------------------------------------------------------- reading offline runs back
@dataclass
class OfflineRun:
    folder: Path
    run_id: str = ""
    project: str = ""
    name: str = ""
    group: str = ""
    job_type: str = ""
    config: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)  # each row with "_step"
    summary: dict = field(default_factory=dict)
    exit_code: int | None = None  # None: no exit record (the run did not finish)
    preempting: bool = False

    @property
    def steps(self) -> list[int]:
        return [row["_step"] for row in self.history]

    def rows(self, key: str) -> list:
        return [row[key] for row in self.history if key in row]


def offline_runs(wandb_dir: Path) -> list[OfflineRun]:
    """Every offline run under wandb_dir, oldest first (folder names start with the time)."""
    return [read_run(d) for d in sorted(wandb_dir.glob("wandb/offline-run-*"))]


def read_run(folder: Path) -> OfflineRun:
    run = OfflineRun(folder)
    (path,) = folder.glob("*.wandb")
    for rec in wandb_records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run.run_id, run.project, run.name = rec.run.run_id, rec.run.project, rec.run.display_name
            run.group, run.job_type = rec.run.run_group, rec.run.job_type
            run.config.update(_items(rec.run.config.update))
        elif kind == "config":
            run.config.update(_items(rec.config.update))
        elif kind == "history":
            run.history.append({**_items(rec.history.item), "_step": rec.history.step.num})
        elif kind == "summary":
            run.summary.update(_items(rec.summary.update))
        elif kind == "exit":
            run.exit_code = rec.exit.exit_code
        elif kind == "preempting":
            run.preempting = True
    return run


def _items(items) -> dict:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


def wandb_records(path: Path) -> list:
    """Records of a .wandb file: a 7-byte header, then 32 KiB blocks of (crc, length, type) chunks."""
    from wandb.proto import wandb_internal_pb2

    block, head = 32768, 7
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a .wandb file"
    pos, parts, records = 7, [], []
    while pos + head <= len(data):
        if block - pos % block < head:  # too little room left for a chunk header: padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack_from("<IHB", data, pos)
        if kind == 0:  # zero fill at the end of a block
            pos += block - pos % block
            continue
        if pos + head + length > len(data):  # a chunk still being written (the run is live): stop here
            break
        parts.append(data[pos + head : pos + head + length])
        pos += head + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            records.append(record)
            parts = []
    return records


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def tracker_state(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "tracker.json").read_text())
    except (OSError, ValueError):
        return {}


def newest_checkpoint(run_dir: Path) -> dict:
    newest = sorted((run_dir / "checkpoints").glob("step-*.pt"))[-1]
    return torch.load(newest, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------- tests
def test_two_rank_job_logs_one_offline_run(tmp_path, data_dir):
    env = wandb_env(tmp_path, data_dir, WANDB_RUN_GROUP="group-from-env", WANDB_PROJECT="project-from-env")
    run_dir = tmp_path / "run"
    ddp_mnist(
        2,
        *(
            "train",
            "--no-progress",
            "--run-dir",
            str(run_dir),
            *TINY,
            "--wandb",
            "--wandb-tags",
            "ci,offline",
            "--wandb-project",
            "project-from-flag",
            "--wandb-name",
            "two-ranks",
        ),
        env=env,
    )

    # Exactly one W&B run for the job, from rank 0, in WANDB_DIR (not in the run folder).
    assert len(list((tmp_path / "wandb").rglob("*.wandb"))) == 1
    assert not (run_dir / "wandb").exists()
    (run,) = offline_runs(tmp_path / "wandb")
    res, metrics = results(run_dir), read_metrics(run_dir)
    assert run.exit_code == 0
    # Flags win over wandb's environment variables; unset flags leave those to wandb.
    assert (run.project, run.name, run.group) == ("project-from-flag", "two-ranks", "group-from-env")
    assert run.run_id == res["tracker_run_id"] == tracker_state(run_dir)["run_id"]
    assert newest_checkpoint(run_dir)["tracker_run_id"] == run.run_id

    # Config: the resolved config and the environment facts.
    assert run.config["world_size"] == 2 and run.config["batch_size"] == 600 and run.config["lr"] == 0.01
    assert run.config["backend_resolved"] == "gloo" and run.config["device_name"] == "cpu"
    assert run.config["torch_version"] == torch.__version__ and "git_commit" in run.config

    # History: one row per logged step, steps 0, 1, 2, ...; train rows every 20 steps, one row per epoch.
    assert run.steps == list(range(len(run.history))) and run.steps[-1] == tracker_state(run_dir)["last_step"]
    assert run.rows("train/global_step") == list(range(20, 201, 20))
    assert all(lr == 0.01 for lr in run.rows("train/lr")) and len(run.rows("train/loss")) == 10
    assert run.rows("epoch/test_accuracy") == [m["test_accuracy"] for m in metrics]
    assert run.rows("epoch/test_accuracy")[-1] == res["test_accuracy"]
    assert run.rows("epoch/samples_per_second_per_rank") == [m["samples_per_second_per_rank"] for m in metrics]
    assert all(t > 0 for t in run.rows("epoch/epoch_seconds"))

    # Summary: the final results.
    for key in ("test_accuracy", "train_seconds", "steady_samples_per_second", "world_size"):
        assert run.summary[key] == res[key], key
    assert run.summary["reached_target"] is False and res["time_to_target_seconds"] is None

    # The same file through wandb's own reader.
    inspect = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--summary", "--json", str(run.folder)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert inspect.returncode == 0, inspect.stderr
    seen = json.loads(inspect.stdout)
    assert (seen["run_id"], seen["exit_code"], seen["step"]) == (run.run_id, 0, run.steps[-1])
    assert seen["config"]["world_size"] == 2 and seen["summary"]["test_accuracy"] == res["test_accuracy"]
    assert sorted(seen["tags"]) == ["ci", "offline"]


def test_stopped_and_resumed_job_continues_the_same_run(tmp_path, data_dir):
    """Attempt 1 ends with a job-wide SIGTERM, as SLURM sends on scancel or preemption: the trainer and
    wandb's helper process both get it. Attempt 2 resumes, then gets a SIGTERM of its own (a requeue).
    One W&B run id throughout; steps strictly increasing across both attempts."""
    env = wandb_env(tmp_path, data_dir)
    run_dir = tmp_path / "run"
    # Long enough never to end on its own before the test stops it.
    cmd = train_cmd(
        1,
        "--run-dir",
        str(run_dir),
        "--recipe",
        "tutorial",
        "--epochs",
        "10",
        "--batch-size",
        "600",
        "--log-every",
        "10",
        "--wandb",
    )

    # Attempt 1: wandb-core dies; training is unaffected: it checkpoints and exits 75, with one warning.
    # (Killed after its first flush, FLUSH_SECONDS in: before that, its file would hold nothing yet.)
    out = stop_when_logged(cmd, env, run_dir, rows=4, also_wandb_core=True)
    assert out.returncode == 75, out.stdout[-3000:] + out.stderr[-3000:]
    assert "W&B log failed" in out.stdout or "W&B finish failed" in out.stdout
    assert "Traceback" not in out.stderr
    logged_1 = tracker_state(run_dir)["last_step"]
    (first,) = offline_runs(tmp_path / "wandb")
    assert newest_checkpoint(run_dir)["tracker_run_id"] == first.run_id

    # Attempt 2: --resume logs into the same run, after the last step attempt 1 logged. On SIGTERM it
    # checkpoints, marks the run as preempting and finishes it with exit code 75: nothing is lost.
    out = stop_when_logged(cmd + ["--resume"], env, run_dir, rows=logged_1 + 5, also_wandb_core=False)
    assert out.returncode == 75, out.stdout[-3000:] + out.stderr[-3000:]
    logged_2 = tracker_state(run_dir)["last_step"]
    first, second = offline_runs(tmp_path / "wandb")
    assert first.run_id == second.run_id == newest_checkpoint(run_dir)["tracker_run_id"]
    assert second.exit_code == 75 and second.preempting
    assert second.steps == list(range(logged_1 + 1, logged_2 + 1)), "every row of attempt 2 is in its file"
    # The killed helper can only have lost its last unflushed rows; steps never go backwards.
    assert set(first.steps) <= set(range(logged_1 + 1))
    steps = first.steps + second.steps
    assert steps == sorted(set(steps))


def stop_when_logged(cmd, env, run_dir: Path, rows: int, also_wandb_core: bool) -> subprocess.CompletedProcess:
    """Start a job, wait until tracker.json says it has logged `rows` W&B rows, then SIGTERM it."""
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120

    def ready() -> bool:
        if tracker_state(run_dir).get("last_step", -1) + 1 < rows:
            return False
        # Killing wandb-core: only once its file holds a logged row (its first flush has happened).
        return not also_wandb_core or any(flushed_history(f) for f in Path(env["WANDB_DIR"]).rglob("*.wandb"))

    while not ready():
        assert proc.poll() is None, f"the job ended before it could be stopped: {proc.communicate()}"
        assert time.monotonic() < deadline, "the job logged too little in 120 s"
        time.sleep(0.05)
    if also_wandb_core:
        helpers = children(proc.pid, "wandb-core")
        assert helpers, "wandb-core is not running under the trainer"
        for pid in helpers:
            os.kill(pid, signal.SIGTERM)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def flushed_history(path: Path) -> bool:
    """Whether a live run's .wandb file already holds a history row (read as it is now, mid-write)."""
    try:
        return any(rec.WhichOneof("record_type") == "history" for rec in wandb_records(path))
    except (OSError, AssertionError):  # not created, or its header not written yet
        return False


def children(parent: int, name: str) -> list[int]:
    """Ids of the processes called `name` whose parent is `parent` (from /proc: no ps or pgrep needed)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # the process has just ended
            continue
        comm, rest = text[text.index("(") + 1 : text.rindex(")")], text[text.rindex(")") + 2 :].split()
        if comm == name[:15] and int(rest[1]) == parent:  # rest: state, ppid, ...; comm is cut to 15 chars
            found.append(int(stat.parent.name))
    return found


SHIM = '''
import importlib.abc, os, sys

class NoWandb(importlib.abc.MetaPathFinder):
    """As if wandb were not installed; every attempt to import it is written down."""
    def find_spec(self, name, path=None, target=None):
        if name == "wandb" or name.startswith("wandb."):
            with open(os.environ["WANDB_IMPORT_LOG"], "a") as f:
                f.write(name + "\\n")
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoWandb())
'''


def test_without_wandb_training_works_and_never_imports_it(tmp_path, data_dir):
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(SHIM)
    attempts = tmp_path / "wandb-imports.txt"
    env = base_env(data_dir, PYTHONPATH=f"{shim}{os.pathsep}{ROOT}", WANDB_IMPORT_LOG=str(attempts))
    # The shim works: wandb cannot be imported under it.
    blocked = subprocess.run([sys.executable, "-c", "import wandb"], env=env, capture_output=True, text=True)
    assert blocked.returncode != 0 and "No module named 'wandb'" in blocked.stderr
    attempts.unlink()

    # Tracking off: the job runs to the end and nothing ever tries to import wandb.
    run_cmd(train_cmd(1, "--run-dir", str(tmp_path / "run"), *TINY, "--max-steps", "30"), env)
    assert results(tmp_path / "run")["tracker_run_id"] is None
    assert not attempts.exists(), f"something imported wandb: {attempts.read_text()}"

    # --wandb: one clear error at start, exit 2, nothing trained.
    out = run_cmd(train_cmd(1, "--run-dir", str(tmp_path / "run2"), *TINY, "--wandb"), env, check=False)
    assert out.returncode == 2, out.stderr
    assert "ddp-mnist: error: --wandb was asked for but wandb is not installed" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "run2" / "results.json").exists()


def online_job_with_a_broken_server(tmp_path: Path, data_dir: Path, server: socket.socket, **extra: str):
    """A --wandb job left to wandb's default (online), with a (dummy) API key and the W&B server at
    `server`'s address. Returns the process and its run folder."""
    host, port = server.getsockname()
    env = wandb_env(
        tmp_path,
        data_dir,
        WANDB_API_KEY="0123456789abcdef0123456789abcdef01234567",  # dummy
        WANDB_BASE_URL=f"http://{host}:{port}",
        **extra,
    )
    del env["WANDB_MODE"]  # nothing here asks for offline
    run_dir = tmp_path / "run"
    args = ("--no-progress", "--run-dir", str(run_dir), *TINY, "--max-steps", "40", "--wandb")
    return ddp_mnist(1, "train", *args, env=env), run_dir


def check_trained_and_logged_offline(out: subprocess.CompletedProcess, run_dir: Path, wandb_dir: Path) -> None:
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    res = results(run_dir)
    assert res["steps"] == 40 and res["test_samples"] == 10_000  # training went on
    (run,) = offline_runs(wandb_dir)
    assert run.run_id == res["tracker_run_id"] and run.exit_code == 0
    assert run.rows("train/global_step") == [20, 40]
    assert run.summary["test_accuracy"] == res["test_accuracy"]


def test_unreachable_server_falls_back_to_offline_and_trains(tmp_path, data_dir):
    """No route to the W&B server (a refused connection): the job warns, logs offline instead, trains to
    the end and leaves an offline run to sync later, without trying wandb's online start at all."""
    with socket.socket() as closed:  # bound, never listening: a connection to it is refused at once
        closed.bind(("127.0.0.1", 0))
        out, run_dir = online_job_with_a_broken_server(tmp_path, data_dir, closed)
        port = closed.getsockname()[1]
    assert f"W&B: 127.0.0.1:{port} is not reachable" in out.stdout and "logging offline" in out.stdout, out.stdout
    assert "could not start an online run" not in out.stdout
    check_trained_and_logged_offline(out, run_dir, tmp_path / "wandb")


class Outage(BaseHTTPRequestHandler):
    """A W&B server that is up but failing: 503 to every request."""

    def do_GET(self) -> None:
        self.send_error(503)

    do_POST = do_GET

    def log_message(self, *args) -> None:
        pass


def test_failing_server_falls_back_to_offline_and_trains(tmp_path, data_dir):
    """The server answers, with errors: the reachability probe passes, wandb's online start gives up
    (after WANDB_INIT_TIMEOUT, shortened here), and the job retries offline once."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), Outage)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        out, run_dir = online_job_with_a_broken_server(tmp_path, data_dir, server.socket, WANDB_INIT_TIMEOUT="3")
    finally:
        server.shutdown()
        server.server_close()
    assert "W&B could not start an online run" in out.stdout and "logging offline instead" in out.stdout, out.stdout
    assert "is not reachable" not in out.stdout  # this fallback, not the probe's
    check_trained_and_logged_offline(out, run_dir, tmp_path / "wandb")
