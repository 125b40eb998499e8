"""What the run-time diagnostics cost: the heartbeat files (--heartbeat-s) and the slow-rank measurement
(--slow-rank-threshold), on the tutorial recipe, 1 epoch, at 1 and 2 ranks.

Runs with them off and on alternate (off, on, off, on, ...), so that a machine that speeds up or slows down
during the benchmark shifts both alike; the table shows the median samples/s of each (results.json, steady
state) and the ratio. It also times the per-step work the slow-rank measurement adds (the gradient hooks, two
clock reads, the wait accounting) on the real model, against the step's own time.

    python3 benchmarks/diagnostics_cost.py [--repeats 3] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OFF = ("--heartbeat-s", "0", "--slow-rank-threshold", "0")
ON = ("--heartbeat-s", "5", "--slow-rank-threshold", "0.2")  # the defaults


def one_run(world_size: int, flags: tuple[str, ...], folder: Path, port: int) -> float:
    run = folder / f"run-{time.monotonic_ns()}"
    train = ["-m", "ddp_mnist", "train", "--recipe", "tutorial", "--epochs", "1", "--no-progress"]
    train += ["--run-dir", str(run)]
    if world_size == 1:
        cmd = [sys.executable, *train, *flags]
    else:
        launcher = ["-m", "torch.distributed.run", f"--nproc_per_node={world_size}", f"--master_port={port}"]
        cmd = [sys.executable, *launcher, *train, *flags]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return json.loads((run / "results.json").read_text())["samples_per_second"]


def per_step_cost(block: int = 500, blocks: int = 20) -> tuple[float, float]:
    """Seconds a step of the tutorial's MLP takes in this process, without and with the work clock's hooks and
    calls, in alternating blocks after a warm-up; the median block of each. At batch 1, so that the few
    microseconds the clock adds are not lost in the noise of a full step: the difference is what the slow-rank
    measurement adds to every step, at any batch."""
    import torch
    from torch import nn

    from ddp_mnist.model import build_model
    from ddp_mnist.training.stragglers import WorkClock

    x, y = torch.randn(1, 784), torch.randint(0, 10, (1,))
    loss_fn = nn.CrossEntropyLoss()

    def setup(with_clock: bool):
        torch.manual_seed(0)
        model = build_model("mlp")
        return model, torch.optim.SGD(model.parameters(), lr=0.01), WorkClock(100, model) if with_clock else None

    def run(model, opt, clock, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            if clock is not None:
                clock.backward_done()
                with clock.waiting():
                    pass
            opt.step()
            if clock is not None:
                clock.tick()
        return (time.perf_counter() - start) / steps

    bare, clocked = setup(False), setup(True)
    run(*bare, block)  # warm-up: allocations, caches, the CPU's clock
    run(*clocked, block)
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(blocks):
        times[0].append(run(*bare, block))
        times[1].append(run(*clocked, block))
    return statistics.median(times[0]), statistics.median(times[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each setting per world size")
    parser.add_argument("--data-dir", help="MNIST's folder (default: as `ddp-mnist train` finds it)")
    args = parser.parse_args()
    if args.data_dir:
        os.environ["DDP_MNIST_DATA"] = args.data_dir
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for world_size in (1, 2):
            off, on = [], []
            for i in range(args.repeats):
                off.append(one_run(world_size, OFF, Path(tmp), 29400 + i))
                on.append(one_run(world_size, ON, Path(tmp), 29450 + i))
                pair = f"off {off[-1]:,.0f}, on {on[-1]:,.0f} samples/s"
                print(f"world size {world_size}, pair {i + 1}: {pair}", flush=True)
            rows.append((world_size, statistics.median(off), statistics.median(on), off, on))
    bare, clocked = per_step_cost()
    print("\n| world size | diagnostics off, samples/s | on (the defaults) | on / off | runs (off; on) |")
    print("| --- | --- | --- | --- | --- |")
    for ws, off_median, on_median, off, on in rows:
        runs = f"{', '.join(f'{v:,.0f}' for v in off)}; {', '.join(f'{v:,.0f}' for v in on)}"
        print(f"| {ws} | {off_median:,.0f} | {on_median:,.0f} | {on_median / off_median:.3f} | {runs} |")
    added = clocked - bare
    print(
        f"\nthe work clock per step (MLP, batch 1): {bare * 1e6:.0f} us bare, {clocked * 1e6:.0f} us with it: "
        f"{added * 1e6:+.1f} us"
    )
    for ws, off_median, _, _, _ in rows:
        step = 100 / off_median  # the tutorial's global batch of 100
        print(f"world size {ws}: a tutorial step takes {step * 1e3:.2f} ms; the clock adds {added / step:+.2%} of it")


if __name__ == "__main__":
    main()
