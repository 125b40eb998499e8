"""Where a training step's time goes: fetching the batch (three ways) against the step's arithmetic.

    python benchmarks/step_breakdown.py [--recipe tutorial] [--steps 100] [--device cpu]

Times, per step and best of --repeat interleaved rounds (robust on a machine shared with other jobs):
  fetch: tutorial DataLoader   torchvision MNIST + ToTensor + DataLoader(batch, shuffle), as the tutorial
  fetch: loader path           this package's DataLoader path (DistributedSampler, batched __getitems__)
  fetch: resident path         one index_select on the device-resident uint8 set
  step only                    the trainer's eager step on a batch already fetched
  loader path + step / resident path + step
The resident path can only beat the loader path by the difference of their fetch times.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
import torchvision
import torchvision.transforms as transforms

from ddp_mnist.config.train_config import TrainConfig
from ddp_mnist.data.raw_files import prepare_mnist
from ddp_mnist.parallel.device import pick_device, synchronize
from ddp_mnist.parallel.env import DistEnv
from ddp_mnist.training.settings import RunSettings
from ddp_mnist.training.signals import StopSignals
from ddp_mnist.training.trainer import Trainer


def per_step(fn, steps: int, device: torch.device) -> float:
    started = time.perf_counter()
    fn(steps)
    synchronize(device)
    return (time.perf_counter() - started) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="tutorial", choices=("tutorial", "fast"))
    p.add_argument("--model", default="mlp", choices=("mlp", "cnn"))
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = p.parse_args()
    device = pick_device(args.device, DistEnv())
    trainers = {}
    for path in ("loader", "resident"):
        cfg = TrainConfig(
            model=args.model,
            recipe=args.recipe,
            data_path=path,
            cuda_graph="off",
            progress=False,
            device=args.device,
            run_dir=tempfile.mkdtemp(prefix="breakdown-"),
        ).resolved()
        trainers[path] = Trainer(cfg, DistEnv(), RunSettings.here(cfg, device), StopSignals())
    batch = trainers["loader"].cfg.batch_size
    tutorial = torch.utils.data.DataLoader(
        torchvision.datasets.MNIST(str(prepare_mnist(None)), train=True, transform=transforms.ToTensor()),
        batch_size=batch,
        shuffle=True,
    )

    def fetch(batches):
        return lambda n: [b for b, _ in zip(batches(), range(n))]

    def fetch_and_step(trainer):
        return lambda n: [
            trainer.train_step(x.to(device), y.to(device)) for (x, y), _ in zip(trainer.batches.epoch(1), range(n))
        ]

    def step_only(n):
        x, y = next(trainers["resident"].batches.epoch(2))
        for _ in range(n):
            trainers["resident"].train_step(x, y)

    cases = {
        "fetch: tutorial DataLoader": fetch(lambda: iter(tutorial)),
        "fetch: loader path": fetch(lambda: trainers["loader"].batches.epoch(0)),
        "fetch: resident path": fetch(lambda: trainers["resident"].batches.epoch(0)),
        "step only": step_only,
        "loader path + step": fetch_and_step(trainers["loader"]),
        "resident path + step": fetch_and_step(trainers["resident"]),
    }
    best = {name: float("inf") for name in cases}
    for _ in range(args.repeat):
        for name, fn in cases.items():
            best[name] = min(best[name], per_step(fn, args.steps, device))
    print(
        f"{args.model}/{args.recipe}, batch {batch}, {device}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}; best of {args.repeat} x {args.steps} steps"
    )
    for name, seconds in best.items():
        print(f"  {name:28s} {seconds * 1e3:8.3f} ms/step  {batch / seconds:12,.0f} samples/s")


if __name__ == "__main__":
    main()
