"""`--precision bf16` against a bare bf16 step: the same model, batch and optimizer, no framework.

    python benchmarks/bf16_step.py [--recipe tutorial] [--steps 200] [--repeat 5] [--batch N]

The bare step is what a hand-written loop does: float inputs made once, then zero_grad, forward and loss
under torch.autocast("cpu", torch.bfloat16), backward, optimizer.step(). Autocast keeps fp32 master weights,
as `--precision bf16` does, so both compute the same numbers: this is the fair "bare" step (a model cast to
bf16 would train differently, with bf16 weights and updates). Rows, per step, best of --repeat interleaved
rounds: the bare step, the Trainer's step (ddp-mnist's train_step on a resident batch: the uint8 -> float
conversion in the step, the work clock's hooks), and the Trainer's step with its batch fetched from the
resident set; in bf16 and fp32. It says whether this CPU has native bf16 (AVX512-BF16 or AMX).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from ddp_mnist.config.train_config import TrainConfig
from ddp_mnist.data.batches import to_input
from ddp_mnist.model import build_model
from ddp_mnist.optim import build_optimizer
from ddp_mnist.parallel.env import DistEnv
from ddp_mnist.training.settings import RunSettings
from ddp_mnist.training.signals import StopSignals
from ddp_mnist.training.trainer import Trainer


def native_bf16() -> str:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return "unknown"
    found = [name for name in ("avx512_bf16", "amx_bf16") if name in flags]
    return ", ".join(found) if found else "no (bf16 is emulated)"


def bare_step(cfg: TrainConfig, x: torch.Tensor, y: torch.Tensor, precision: str):
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model)
    optimizer = build_optimizer(cfg, model, torch.device("cpu"))  # the recipe's optimizer, as the Trainer builds it
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    inputs = to_input(x, cfg.normalize)  # made once, outside the timed steps

    def run(n: int) -> None:
        for _ in range(n):
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = loss_fn(model(inputs), y)
            loss.backward()
            optimizer.step()

    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="tutorial", choices=("tutorial", "fast"))
    p.add_argument("--batch", type=int, default=None, help="default: the recipe's")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    cases = {}
    for precision in ("bf16", "fp32"):
        extra = {"batch_size": args.batch} if args.batch else {}
        cfg = TrainConfig(
            recipe=args.recipe,
            precision=precision,
            data_path="resident",
            device="cpu",
            progress=False,
            run_dir=tempfile.mkdtemp(prefix="bf16-step-"),
            **extra,
        ).resolved()
        trainer = Trainer(cfg, DistEnv(), RunSettings.here(cfg, torch.device("cpu")), StopSignals())
        x, y = next(trainer.batches.epoch(0))

        def ours(n: int, trainer=trainer, x=x, y=y) -> None:
            for _ in range(n):
                trainer.train_step(x, y)

        def ours_fetched(n: int, trainer=trainer) -> None:
            done, epoch = 0, 1
            while done < n:  # across epochs: one has fewer than n batches at batch 512 (117)
                for xb, yb in trainer.batches.epoch(epoch):
                    trainer.train_step(xb, yb)
                    done += 1
                    if done == n:
                        break
                epoch += 1

        cases[f"bare step, {precision}"] = bare_step(cfg, x, y, precision)
        cases[f"ddp-mnist step, {precision}"] = ours
        cases[f"ddp-mnist fetch + step, {precision}"] = ours_fetched
    batch = cfg.batch_size
    best = {name: float("inf") for name in cases}
    for fn in cases.values():
        fn(20)  # warm-up: oneDNN's kernels for these shapes
    for _ in range(args.repeat):
        for name, fn in cases.items():
            started = time.perf_counter()
            fn(args.steps)
            best[name] = min(best[name], (time.perf_counter() - started) / args.steps)
    print(
        f"{args.recipe} recipe, batch {batch}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"native bf16: {native_bf16()}; best of {args.repeat} x {args.steps} steps"
    )
    for name, seconds in best.items():
        bare = best[f"bare step, {name.rsplit(', ', 1)[1]}"]
        print(
            f"  {name:32s} {seconds * 1e3:7.3f} ms/step {batch / seconds:10,.0f} samples/s"
            f" {bare / seconds:6.1%} of bare"
        )
    print(f"  bf16 / fp32, bare: {best['bare step, fp32'] / best['bare step, bf16']:.2f}x")


if __name__ == "__main__":
    main()
