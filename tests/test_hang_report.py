"""A hang's evidence (training/hang_report.py) and the stall dump (rank_files.StallDump), without processes:
two ranks' reports share one real TCPStore in this process. The files real hung jobs leave (a rank stuck in
Python, stopped, killed) are checked in test_faults.py."""

from __future__ import annotations

import datetime
import threading
import time
from pathlib import Path

import pytest
import torch.distributed as dist
from ranks import free_port

from ddp_mnist.parallel.env import DistEnv
from ddp_mnist.parallel.watchdog import RankReports
from ddp_mnist.training.hang_report import HangEvidence, roll_call, thread_stacks
from ddp_mnist.training.rank_files import StallDump

NOW = 1_800_000_000.0


def report(phase: str, moves: int, age_s: float = 0.2, error: str | None = None) -> dict:
    return {"phase": phase, "moves": moves, "error": error, "beat": 9, "time": NOW - age_s}


def evidence(tmp_path: Path, world_size: int = 3) -> HangEvidence:
    env = DistEnv(rank=0, world_size=world_size, local_world_size=world_size, launcher="torchrun")
    return HangEvidence(tmp_path, env, RankReports(env), heartbeat_s=5.0)


def test_roll_call_names_the_silent_rank_then_the_one_behind(tmp_path):
    folder = tmp_path / "logs" / "hang-x"
    folder.mkdir(parents=True)
    (folder / "rank-0.txt").write_text("stacks")
    beats = {r: {"rank": r, "step": 30, "written": NOW - 1.0} for r in range(3)}
    waiting = report("stop check after step 30", 95, error="RuntimeError: Timed out waiting 4000ms")
    stuck = report("after step 30", 94)
    lines = roll_call(
        {0: waiting, 1: stuck, 2: report("stop check after step 30", 95)}, beats, evidence(tmp_path), folder, NOW
    )
    assert lines[0].startswith(
        "rank 0: stop check after step 30, report 0.2 s ago, heartbeat 1.0 s ago (step 30), error:"
    )
    assert lines[0].endswith("rank-0.txt")
    assert lines[1] == "rank 1: after step 30, report 0.2 s ago, heartbeat 1.0 s ago (step 30), no stacks"
    assert lines[-1] == "behind: rank 1: after step 30 (the others are further on and wait for it)"

    stopped = report("after step 30", 94, age_s=6.0)  # its reporting thread stopped: SIGSTOP, SIGKILL
    lines = roll_call({0: waiting, 1: stopped, 2: report("x", 95)}, beats, evidence(tmp_path), folder, NOW)
    assert lines[1].endswith(", no stacks, SILENT")
    assert lines[-1] == "silent: rank 1 (stopped or dead); the others wait for it"

    same = report("stop check after step 30", 95)
    assert roll_call({0: same, 1: same, 2: same}, beats, evidence(tmp_path), folder, NOW)[-1] == (
        "every rank answers and is at the same point: a collective that did not finish"
    )
    # Without the store's reports (it died with its host), stale heartbeat files mark the silent ranks.
    beats[2]["written"] = NOW - 60
    assert roll_call({}, beats, evidence(tmp_path), folder, NOW)[-1] == (
        "silent: rank 2 (stopped or dead); the others wait for it"
    )


def test_thread_stacks_show_where_each_thread_is():
    parked = threading.Event()
    thread = threading.Thread(target=parked.wait, name="parked-here", daemon=True)
    thread.start()
    try:
        text = thread_stacks()
    finally:
        parked.set()
    assert text.startswith("thread MainThread (most recent call last):")
    assert "in test_thread_stacks_show_where_each_thread_is" in text
    assert "thread parked-here (most recent call last):" in text.split("in test_thread_stacks")[1]


def test_the_first_rank_to_find_a_hang_names_the_folder_and_the_others_answer(tmp_path):
    """Rank 1 finds the hang; rank 0's reporting thread sees the folder at its next beat and writes its stacks
    there; rank 1's roll call waits for them. A later finding (rank 0's own timeout) adds nothing."""
    port = free_port()
    master = dist.TCPStore("127.0.0.1", port, is_master=True, timeout=datetime.timedelta(seconds=10))
    ranks = []
    for rank in (0, 1):
        env = DistEnv(rank=rank, world_size=2, local_world_size=2, launcher="torchrun", master_port=port)
        reports = RankReports(env, interval=0.1)
        reports.phase = "after step 30"
        if rank == 1:  # one phase further: it waits in the stop check for rank 0
            reports.phase = "stop check after step 30"
        reports.attach_evidence(HangEvidence(tmp_path, env, reports, heartbeat_s=5.0).give)
        reports.start("round-0/")
        ranks.append(reports)
    try:
        ranks[1].hang("found by rank 1: Timed out")
        folder = next((tmp_path / "logs").glob("hang-*"))
        assert sorted(p.name for p in folder.iterdir()) == ["rank-0.txt", "rank-1.txt", "roll-call.txt"]
        text = (folder / "roll-call.txt").read_text().splitlines()
        assert text[0] == "found by rank 1: Timed out"
        assert text[-1] == "behind: rank 0: after step 30 (the others are further on and wait for it)"
        assert (folder / "rank-0.txt").read_text().startswith("rank 0, ")
        ranks[0].hang("found by rank 0: Timed out")  # the same hang, seen late: no second folder, no rewrite
        assert len(list((tmp_path / "logs").glob("hang-*"))) == 1
    finally:
        for reports in ranks:
            reports.__exit__(None, None, None)
        del master


def test_stall_dump_writes_every_thread_when_no_step_comes(tmp_path):
    out = tmp_path / "rank-0.log"
    with open(out, "w") as file:
        stall = StallDump(0.3, file)
        try:
            stall.step(7)
            deadline = time.monotonic() + 30
            while "Timeout" not in out.read_text():  # an event: faulthandler's thread writes the file
                if time.monotonic() > deadline:
                    pytest.fail(f"no stall dump in {out}")
                time.sleep(0.05)
        finally:
            stall.cancel()
    assert "test_stall_dump_writes_every_thread_when_no_step_comes" in out.read_text()


def test_nccl_flight_recorder_dumps_into_the_run_folder(tmp_path):
    """On NCCL the Flight Recorder is on, its dumps in RUN/logs/flight-recorder/; a variable the user set is kept.
    (The dumps themselves need a GPU: not checked yet, docs/faults.md.)"""
    from ddp_mnist.config.train_config import TrainConfig
    from ddp_mnist.training.train import flight_recorder_env

    env = flight_recorder_env(TrainConfig(run_dir=str(tmp_path / "run")), {"TORCH_NCCL_DUMP_ON_TIMEOUT": "0"})
    prefix = f"{tmp_path}/run/logs/flight-recorder-rank_"
    assert env == {
        "TORCH_FR_BUFFER_SIZE": "2000",
        "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000",
        "TORCH_FR_DUMP_TEMP_FILE": prefix,
        "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": prefix,
    }
    assert not (tmp_path / "run").exists()  # nothing written before the job owns its folder
