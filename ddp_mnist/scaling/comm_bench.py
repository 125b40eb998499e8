"""The scaling model's measurements, taken inside the ranks of a job at one world size (scale.py runs
it under torchrun after each training run):

- compute: `steps` timed training steps (this rank's batches from the run's data path, forward, backward,
  optimizer step) with NO communication, run by every rank at the same time, so that ranks sharing
  cores slow each other exactly as in training. One time per per-rank batch in --rank-batches; the step
  waits for the slowest rank, so the report keeps the maximum over ranks (and each rank's);
- communication (world size > 1): the process group's own all-reduce of float32 messages from
  --min-bytes to --max-bytes (x2 each), and of the model's gradient size, reported as nccl-tests does:
  time (the slowest rank's), algorithm bandwidth bytes / time, bus bandwidth algbw x 2(N-1)/N.

    torchrun --nproc-per-node 2 -m ddp_mnist.scaling.comm_bench --run-dir RUN_ROOT/ws2 [--rank-batches 300]

The job's settings (model, data path, precision, device, backend, seed) come from the run folder's
config.json; rank 0 writes RUN_DIR/comm_bench.json.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ddp_mnist.artifacts.config_sources import read_settings
from ddp_mnist.artifacts.run_dir import RunDir
from ddp_mnist.config.train_config import TrainConfig
from ddp_mnist.data.batches import MnistSplit, load_split, make_batches, to_input
from ddp_mnist.data.raw_files import prepare_mnist
from ddp_mnist.errors import ConfigError
from ddp_mnist.files import write_json_atomic
from ddp_mnist.model import autocast_dtype, build_model
from ddp_mnist.optim import build_optimizer
from ddp_mnist.parallel.collectives import barrier
from ddp_mnist.parallel.device import synchronize
from ddp_mnist.parallel.env import DistEnv
from ddp_mnist.parallel.fsdp import fsdp_units
from ddp_mnist.parallel.process_group import process_group
from ddp_mnist.scaling.perf_model import CONTROL_BYTES, algbw, busbw, lowrank_elements, step_messages
from ddp_mnist.training.settings import RunSettings

log = logging.getLogger("ddp_mnist")


BENCH_FILE = "comm_bench.json"


MIN_BYTES, MAX_BYTES = 4 * 2**10, 64 * 2**20  # 4 KB .. 64 MB, as nccl-tests' usual range


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m ddp_mnist.scaling.comm_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--run-dir", required=True, help="the run folder: its config.json sets the job; the report goes there"
    )
    p.add_argument(
        "--rank-batches",
        type=lambda s: [int(b) for b in s.split(",") if b],
        default=None,
        help="per-rank batches to time compute at (default: the run's batch_size / world size)",
    )
    p.add_argument("--steps", type=int, default=50, help="timed compute steps per batch (after 5 warm-up steps)")
    p.add_argument("--min-bytes", type=int, default=MIN_BYTES, help="smallest all-reduce message (default 4 KiB)")
    p.add_argument("--max-bytes", type=int, default=MAX_BYTES, help="largest all-reduce message (default 64 MiB)")
    p.add_argument("--out", default=None, help=f"the report (default: RUN_DIR/{BENCH_FILE})")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    env = DistEnv.from_environ()
    logging.basicConfig(stream=sys.stdout, level=logging.INFO if env.is_main else logging.WARNING, format="%(message)s")
    run_dir = Path(args.run_dir)
    try:  # the run's settings, read as `--resume` reads them
        cfg = TrainConfig(**read_settings(RunDir(run_dir).config)).resolved()
    except ConfigError as e:
        print(f"comm_bench: error: {e}; run `ddp-mnist train --run-dir {run_dir}` first", file=sys.stderr)
        return 2
    settings = RunSettings.for_launch(cfg, env)  # as `ddp-mnist train` resolves them
    with process_group(env, settings.backend, settings.device, cfg.timeout_s):
        report = measure(cfg, env, settings, args)
    report["backend"] = settings.backend if env.world_size > 1 else "none"
    if env.is_main:
        out = Path(args.out) if args.out else run_dir / BENCH_FILE
        write_json_atomic(out, report)
        log.info("comm_bench: %s", out)
    return 0


def measure(cfg: TrainConfig, env: DistEnv, settings: RunSettings, args: argparse.Namespace) -> dict[str, Any]:
    device = settings.device
    model = build_model(cfg.model).to(device)
    gradient_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    rank_batches = args.rank_batches or [cfg.batch_size // env.world_size]
    split = load_split(prepare_mnist(cfg.data_dir), train=True)  # checked and read once for every batch size
    compute = [time_compute(cfg, env, settings, split, b, args.steps) for b in rank_batches]
    # Per step: the stop-signal check, and the loss check's two (sum, max) every log_every steps.
    control = 1 / settings.stop_check_every + 2 / cfg.log_every
    lowrank = None
    if cfg.comm_hook == "powersgd":
        elements = lowrank_elements([tuple(p.shape) for p in model.parameters()], cfg.powersgd_rank)
        lowrank = (4.0 * elements[0], 4.0 * elements[1], 4.0 * elements[2])
    units = [sum(4.0 * p.numel() for p in m.parameters(recurse=False)) for m in fsdp_units(model)]
    messages = step_messages(
        gradient_bytes,
        cfg.bucket_cap_mb,
        cfg.comm_hook,
        cfg.strategy,
        lowrank_bytes=lowrank,
        control=control,
        unit_bytes=units,
    )
    sizes = message_sizes(args.min_bytes, args.max_bytes, [int(b) for b, _ in messages])
    allreduce = [time_all_reduce(n, env.world_size, device) for n in sizes] if env.world_size > 1 else []
    return {
        "world_size": env.world_size,
        "device": str(device),
        "model": cfg.model,
        "threads_per_rank": torch.get_num_threads(),
        "cores": usable_cores(),
        "gradient_bytes": gradient_bytes,
        "bucket_cap_mb": cfg.bucket_cap_mb,
        "strategy": cfg.strategy,
        "comm_hook": cfg.comm_hook,
        "control_allreduces_per_step": control,
        "messages": messages,
        "compute": compute,
        "allreduce": allreduce,
    }


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def message_sizes(low: int, high: int, extra: list[int]) -> list[int]:
    """low, 2 low, 4 low ... high, and the step's own messages (the gradient's buckets, the control
    messages, ...), as multiples of 4 bytes (float32 elements)."""
    if not 4 <= low <= high:
        raise ConfigError(f"all-reduce sizes: need 4 <= --min-bytes <= --max-bytes, got {low} and {high}")
    sizes, n = set(), low
    while n <= high:
        sizes.add(n // 4 * 4)
        n *= 2
    return sorted(sizes | {max(4, b // 4 * 4) for b in extra} | {CONTROL_BYTES})


def slowest(seconds: float, device: torch.device) -> list[float]:
    """Every rank's time (a step waits for the slowest one)."""
    if not dist.is_initialized():
        return [seconds]
    out = [torch.zeros(1, dtype=torch.float64, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(out, torch.tensor([seconds], dtype=torch.float64, device=device))
    return [t.item() for t in out]


def time_compute(
    cfg: TrainConfig,
    env: DistEnv,
    settings: RunSettings,
    split: MnistSplit,
    rank_batch: int,
    steps: int,
    warmup: int = 5,
) -> dict[str, Any]:
    """Seconds per training step on this rank's share, without DDP (no all-reduce): data, forward,
    backward, optimizer step (the same optimizer as training: fused AdamW on CUDA, ...). Every rank starts
    together (a barrier) and runs at the same time."""
    device = settings.device
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model).to(device)
    optimizer = build_optimizer(cfg, model, device)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    dtype = autocast_dtype(settings.precision)
    batches = make_batches(
        settings.data_path, split, env.rank, env.world_size, rank_batch, cfg.seed, device, cfg.num_workers
    )

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = loss_fn(model(to_input(images, cfg.normalize)).float(), labels)
        loss.backward()
        optimizer.step()

    stream = iter(batches.epoch(0))
    for _ in range(warmup):
        step(*next(stream))
    synchronize(device)
    barrier()
    cpu = device.type == "cpu"
    started = time.perf_counter()
    ticks, done = [started], 0  # each step's end, on the CPU only (on a GPU reading the clock needs a sync)
    for images, labels in stream:
        step(images, labels)
        done += 1
        if cpu:
            ticks.append(time.perf_counter())
        if done == steps:
            break
    synchronize(device)
    per_rank = slowest((time.perf_counter() - started) / max(done, 1), device)
    return {
        "rank_batch": rank_batch,
        "steps": done,
        "seconds": max(per_rank),
        "seconds_by_rank": per_rank,
        "seconds_slowest_each_step": slowest_each_step(ticks, device) if cpu else None,
    }


def slowest_each_step(ticks: list[float], device: torch.device) -> float:
    """The mean over steps of the slowest rank's step time: in training every step waits for the slowest
    rank, so ranks slowed at different moments (shared cores, other jobs) cost more than their means say."""
    times = torch.tensor([b - a for a, b in zip(ticks, ticks[1:])], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(times, op=dist.ReduceOp.MAX)
    return times.mean().item()


def time_all_reduce(
    nbytes: int, world_size: int, device: torch.device, iterations: int | None = None
) -> dict[str, Any]:
    """The slowest rank's mean time of one all-reduce (sum) of nbytes of float32, after 2 warm-up calls;
    `iterations` timed calls (default: fewer for larger messages)."""
    tensor = torch.ones(max(nbytes // 4, 1), dtype=torch.float32, device=device)
    if iterations is None:
        iterations = 20 if nbytes <= 2**20 else 10 if nbytes <= 16 * 2**20 else 4
    for _ in range(2):
        dist.all_reduce(tensor)
    synchronize(device)
    dist.barrier()
    started = time.perf_counter()
    for _ in range(iterations):
        dist.all_reduce(tensor)
    synchronize(device)
    seconds = max(slowest((time.perf_counter() - started) / iterations, device))
    bandwidth = algbw(nbytes, seconds)
    return {
        "bytes": nbytes,
        "seconds": seconds,
        "algbw_GBps": bandwidth / 1e9,
        "busbw_GBps": busbw(bandwidth, world_size) / 1e9,
        "iterations": iterations,
    }


if __name__ == "__main__":
    sys.exit(main())
