"""Each rank's own files (training/rank_files.py) and `ddp-mnist status`, which reads them. No process: the
files a real 2-rank job leaves are checked in test_core.py (test_every_rank_leaves_its_log_and_heartbeat)."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import pytest

from ddp_mnist.commands.cli import main
from ddp_mnist.commands.status import status_lines
from ddp_mnist.errors import ConfigError
from ddp_mnist.parallel.env import DistEnv
from ddp_mnist.training.rank_files import Heartbeat, RankLog, StepClock, heartbeat_path, rank_log_path

NOW = 1_800_000_000.0


def beat(rank: int, step: int, age_s: float, node: str = "n1", ended: str | None = None) -> dict:
    return {
        "rank": rank,
        "local_rank": rank % 4,
        "node": node,
        "step": step,
        "epoch": 1,
        "phase": f"train epoch 1 step {step + 1}",
        "last_step_s": 0.0085,
        "samples_per_s": 5882.0,
        "peak_memory_bytes": None,
        "ended": ended,
        "written": NOW - age_s,
    }


def run_folder(tmp_path: Path, beats: list[dict], timeout_s: float = 60) -> Path:
    run = tmp_path / "run"
    (run / "ranks").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"model": "mlp", "timeout_s": timeout_s}))
    for b in beats:
        heartbeat_path(run, b["rank"]).write_text(json.dumps(b))
    return run


def test_status_names_the_rank_behind_and_the_silent_one(tmp_path):
    run = run_folder(tmp_path, [beat(0, 120, 2), beat(1, 97, 75), beat(2, 120, 3, ended="done")])
    lines = status_lines(run, now=NOW)
    assert lines[0] == f"{run}: 3 rank(s), newest step 120, heartbeats older than 60 s are silent"
    assert lines[1] == (
        "rank 0 (node n1, local rank 0): running, step 120, train epoch 1 step 121, 8.5 ms/step, "
        "5,882 samples/s; heartbeat 2 s ago"
    )
    assert lines[2].startswith("rank 1 (node n1, local rank 1): SILENT, step 97,")
    assert lines[3].startswith("rank 2 (node n1, local rank 2): ended (done), step 120,")
    assert lines[4:] == [
        "furthest behind: rank 1 at step 97 (23 behind)",
        "silent: rank 1 (no heartbeat for over 60 s)",
    ]


def test_a_big_job_is_shown_per_node_with_its_outliers(tmp_path):
    beats = [beat(r, 500, 1, node=f"n{r // 8}") for r in range(32)]
    beats[13] = beat(13, 480, 1, node="n1")
    run = run_folder(tmp_path, beats, timeout_s=300)
    lines = status_lines(run, now=NOW)
    assert lines[1:5] == [
        "node n0: 8 rank(s), steps 500..500, oldest heartbeat 1 s ago",
        "node n1: 8 rank(s), steps 480..500, oldest heartbeat 1 s ago",
        "node n2: 8 rank(s), steps 500..500, oldest heartbeat 1 s ago",
        "node n3: 8 rank(s), steps 500..500, oldest heartbeat 1 s ago",
    ]
    assert lines[5].startswith("rank 13 (node n1, local rank 1): running, step 480")
    assert lines[6:] == ["furthest behind: rank 13 at step 480 (20 behind)"]


def test_a_damaged_heartbeat_is_named_and_the_rest_still_shown(tmp_path, capsys):
    run = run_folder(tmp_path, [beat(0, 10, 1)])
    (run / "ranks" / "rank-1.json").write_text('{"rank": 1, "st')  # cut by a crash of the node
    (run / "ranks" / "rank-2.json").write_text(json.dumps({**beat(2, 10, 1), "written": None}))  # edited by hand
    (run / "ranks" / "rank-3.json").write_text(json.dumps({**beat(3, 10, 1), "samples_per_s": 10**400}))
    assert main(["status", str(run)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].startswith("rank 0 (node n1, local rank 0): running, step 10")
    assert out[2].startswith("rank 3 (node n1, local rank 3): running, step 10, train epoch 1 step 11, 8.5 ms/step;")
    assert out[-2].startswith(f"{run / 'ranks' / 'rank-1.json'}: unreadable (")
    assert out[-1] == f"{run / 'ranks' / 'rank-2.json'}: unreadable (not a heartbeat)"


def test_status_of_a_folder_without_heartbeats_and_of_no_folder(tmp_path, capsys):
    assert main(["status", str(tmp_path)]) == 0
    assert "no heartbeat files" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="is not a folder"):
        status_lines(tmp_path / "missing")


def test_the_heartbeat_is_rewritten_by_its_thread_and_says_how_the_job_ended(tmp_path):
    env = DistEnv(rank=1, local_rank=1, world_size=2)
    calls = []

    def snapshot() -> dict:
        calls.append(1)
        return {"step": len(calls), "phase": "train"}

    with Heartbeat(tmp_path, env, every_s=0.01, snapshot=snapshot):
        first = json.loads(heartbeat_path(tmp_path, 1).read_text())
        assert (first["rank"], first["local_rank"], first["step"], first["ended"]) == (1, 1, 1, None)
        # The thread's rewrites: an event on the file, bounded in time (2000 polls ran out on a busy machine).
        deadline = time.monotonic() + 60
        while json.loads(heartbeat_path(tmp_path, 1).read_text())["step"] <= 2:
            if time.monotonic() > deadline:
                pytest.fail("the heartbeat was not rewritten in 60 s")
            time.sleep(0.001)
    last = json.loads(heartbeat_path(tmp_path, 1).read_text())
    assert last["ended"] == "done" and last["pid"] == os.getpid()
    with pytest.raises(RuntimeError), Heartbeat(tmp_path, env, every_s=60, snapshot=snapshot):
        raise RuntimeError("boom")
    assert json.loads(heartbeat_path(tmp_path, 1).read_text())["ended"] == "RuntimeError"


def test_the_rank_log_takes_every_level_and_appends_per_start(tmp_path):
    env = DistEnv(rank=3, local_rank=1, world_size=4)
    package = logging.getLogger("ddp_mnist")
    for start in (1, 2):
        with RankLog(tmp_path, env, f"round {start}, restarts {start - 1}"):
            package.debug("a detail")
            package.warning("a warning")
    lines = rank_log_path(tmp_path, 3).read_text().splitlines()
    assert len(lines) == 6 and all(" rank 3 (node " in line and ", local rank 1) " in line for line in lines)
    assert [line.split(") ", 1)[1] for line in lines[:3]] == [
        "DEBUG: start: round 1, restarts 0, world size 4",
        "DEBUG: a detail",
        "WARNING: a warning",
    ]
    assert "DEBUG: start: round 2, restarts 1, world size 4" in lines[3]
    assert package.level == logging.NOTSET and not any(isinstance(h, logging.StreamHandler) for h in package.handlers)


def test_a_symlink_planted_as_the_rank_log_is_refused(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's file\n")
    (tmp_path / "logs").mkdir()
    rank_log_path(tmp_path, 0).symlink_to(victim)
    with pytest.raises(ConfigError, match="rank-0.log cannot be written"), RankLog(tmp_path, DistEnv(), "round 1"):
        pass
    assert victim.read_text() == "the user's file\n"


def test_the_step_clock_reports_the_pace_since_the_last_heartbeat():
    clock = StepClock(samples_per_step=50)
    assert clock.samples_per_s() is None  # no step yet
    for _ in range(3):
        clock.tick()
    assert clock.last_step_s is not None and clock.last_step_s >= 0
    assert clock.samples_per_s() > 0
    assert clock.samples_per_s() is None  # nothing new since
