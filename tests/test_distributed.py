"""Small collectives of ddp_mnist.parallel.collectives on a real 2-process gloo group."""

from __future__ import annotations

import datetime
import json
import sys

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import ROOT, free_port

TIMEOUT_S = 30  # a rank left waiting would fail only after this (and with another message)


def _worker(rank: int, port: int, out_dir: str) -> None:
    sys.path.insert(0, str(ROOT))
    from ddp_mnist.parallel.collectives import run_on_main

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=TIMEOUT_S),
    )
    outcome = {"result": run_on_main(lambda: rank + 42)}  # rank 0's result, on every rank
    try:

        def fails_with_an_unusual_type():
            raise KeyError("no such field")

        run_on_main(fails_with_an_unusual_type)
        outcome["raised"] = None
    except Exception as e:  # noqa: BLE001 - what each rank got is the result
        outcome.update(raised=type(e).__name__, message=str(e))
    finally:
        dist.destroy_process_group()
    with open(f"{out_dir}/rank-{rank}.json", "w") as f:
        json.dump(outcome, f)


@pytest.mark.process
def test_any_error_on_rank_0_reaches_every_rank(tmp_path):
    """Rank 0's result reaches every rank; so does its error. run_on_main passed on only some exception types:
    a KeyError on rank 0 left rank 1 waiting in the broadcast until the collective timeout."""
    mp.start_processes(_worker, args=(free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    rank0 = json.loads((tmp_path / "rank-0.json").read_text())
    rank1 = json.loads((tmp_path / "rank-1.json").read_text())
    assert rank0 == {"result": 42, "raised": "KeyError", "message": "'no such field'"}
    assert rank1 == {"result": 42, "raised": "MainRankError", "message": "rank 0 failed: KeyError: 'no such field'"}


def report(beat: int, phase: str = "train epoch 1 step 30", error: str | None = None) -> dict:
    return {"phase": phase, "error": error, "beat": beat, "time": 0.0}


def test_watchdog_blames_a_silent_peer_only_after_the_timeout_and_never_a_clean_exit():
    from ddp_mnist.parallel.env import DistEnv
    from ddp_mnist.parallel.watchdog import RankReports

    lines: list[str] = []
    env = DistEnv(rank=0, world_size=4, local_world_size=4, launcher="torchrun")
    watchdog = RankReports(env, interval=0.5, timeout_s=6.0, on_lost=lines.append)
    limit = 6.0 + RankReports.WATCHDOG_MARGIN_S
    # rank 1 goes silent at t=0; rank 2 keeps beating; rank 3 left cleanly (its last report says so).
    for now, beat in [(0.0, 1), (limit / 2, 2), (limit, 3)]:
        watchdog.watch({1: report(1), 2: report(beat), 3: report(1, "exited")}, now)
    assert lines == []  # silent for exactly the limit: not yet
    watchdog.watch({1: report(1), 2: report(4), 3: report(1, "exited")}, limit + 0.5)
    assert lines == [
        f"ddp-mnist: rank 0 ends (watchdog, --timeout-s 6): rank 1 stopped answering; its last "
        f"report ({limit + 0.5:.0f} s ago): train epoch 1 step 30; this rank was in: starting"
    ]
    # A peer that failed (its error published) and went silent is named with its error.
    failed = RankReports(env, interval=0.5, timeout_s=6.0, on_lost=lines.append)
    for now in (0.0, limit + 1):
        failed.watch({1: report(7, "evaluate after step 30", "RuntimeError: boom")}, now)
    assert lines[-1].startswith(
        "ddp-mnist: rank 0 ends (watchdog, --timeout-s 6): rank 1 failed during "
        "evaluate after step 30: RuntimeError: boom"
    )
