"""Small collectives of ddp_mnist.distributed on a real 2-process gloo group."""

from __future__ import annotations

import datetime
import json
import sys

import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import ROOT, free_port

TIMEOUT_S = 30  # a rank left waiting would fail only after this (and with another message)


def _worker(rank: int, port: int, out_dir: str) -> None:
    sys.path.insert(0, str(ROOT))
    from ddp_mnist.distributed import run_on_main

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        def fails_with_an_unusual_type():
            raise KeyError("no such field")

        run_on_main(fails_with_an_unusual_type)
        outcome = {"raised": None}
    except Exception as e:  # noqa: BLE001 - what each rank got is the result
        outcome = {"raised": type(e).__name__, "message": str(e)}
    finally:
        dist.destroy_process_group()
    with open(f"{out_dir}/rank-{rank}.json", "w") as f:
        json.dump(outcome, f)


def test_any_error_on_rank_0_reaches_every_rank(tmp_path):
    """run_on_main passed on only some exception types: a KeyError on rank 0 left rank 1 waiting in the
    broadcast until the collective timeout."""
    mp.start_processes(_worker, args=(free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    rank0 = json.loads((tmp_path / "rank-0.json").read_text())
    rank1 = json.loads((tmp_path / "rank-1.json").read_text())
    assert rank0 == {"raised": "KeyError", "message": "'no such field'"}
    assert rank1 == {"raised": "MainRankError", "message": "rank 0 failed: KeyError: 'no such field'"}
