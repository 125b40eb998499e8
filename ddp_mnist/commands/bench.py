"""`ddp-mnist bench`: the tutorial loop as written against the Trainer's fast paths (training/bench.py
measures)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ddp_mnist.commands.arguments import bounded, examples
from ddp_mnist.config.options import (
    DATA_DIR_SHOWN,
    DEVICES,
    MODELS,
    RECIPES,
    TARGET_ACCURACY_SHOWN,
)
from ddp_mnist.config.validation import RANGES, STEPS
from ddp_mnist.errors import ConfigError
from ddp_mnist.files import write_text_atomic
from ddp_mnist.parallel.device import pick_device
from ddp_mnist.parallel.env import DistEnv
from ddp_mnist.training.bench import Report, Settings, run_bench


# ---------------------------------------------------------------------------------------------- CLI
def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Time the tutorial's loop and this package's data paths and captured step, in one process, "
        "and print a table (samples/s, s/epoch, s to target accuracy, DDP overhead)."
    )
    p.epilog = examples(
        "ddp-mnist bench --quick                        # a smoke run",
        "ddp-mnist bench --models mlp --device cpu --repeat 3",
        "DDP_MNIST_DATA=/path/to/data ddp-mnist bench --out bench-gpu.md --out bench-gpu.json",
    )
    p.add_argument(
        "--models",
        type=_names(MODELS),
        default=list(MODELS),
        metavar="NAME,...",
        help=f"comma-separated, from {','.join(MODELS)}",
    )
    p.add_argument(
        "--recipes",
        type=_names(RECIPES),
        default=list(RECIPES),
        metavar="NAME,...",
        help=f"comma-separated trainer recipes, from {','.join(RECIPES)}",
    )
    p.add_argument(
        "--epochs",
        type=bounded(int, *RANGES["epochs"]),
        default=None,
        metavar="N",
        help="trainer epochs (default: recipe)",
    )
    p.add_argument(
        "--slow-epochs",
        type=bounded(int, *RANGES["epochs"]),
        default=1,
        metavar="N",
        help="epochs of the slow baselines: the tutorial loop and the loader path",
    )
    p.add_argument(
        "--max-steps",
        type=bounded(int, *RANGES["max_steps"]),
        default=None,
        metavar="N",
        help="stop every timed run after N steps (default: no limit)",
    )
    p.add_argument(
        "--warmup-steps",
        type=bounded(int, 0, STEPS),
        default=20,
        metavar="N",
        help="steps of the untimed warm-up run per variant",
    )
    p.add_argument(
        "--repeat",
        type=bounded(int, 1, 1000),
        default=1,
        metavar="N",
        help="time each variant N times and keep the fastest run (for machines shared with other jobs)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: 1 epoch, --max-steps 20, --warmup-steps 2 (numbers are not meaningful)",
    )
    p.add_argument(
        "--target-accuracy",
        type=bounded(float, *RANGES["target_accuracy"]),
        default=None,
        metavar="X",
        help=f"the test accuracy (%%) that 's to target' refers to (default: {TARGET_ACCURACY_SHOWN})",
    )
    p.add_argument("--device", choices=DEVICES, default="auto", help="`auto`: CUDA when available")
    p.add_argument(
        "--data-dir", default=None, metavar="DIR", help=f"folder holding MNIST/raw/ (default: {DATA_DIR_SHOWN})"
    )
    p.add_argument("--seed", type=bounded(int, *RANGES["seed"]), default=0, metavar="N", help="seed of every run")
    p.add_argument(
        "--out",
        action="append",
        default=[],
        metavar="PATH",
        help="also write the table to PATH: JSON for *.json, else Markdown (repeat for both)",
    )
    p.set_defaults(func=bench_command)


def _names(allowed: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        wrong = [n for n in names if n not in allowed]
        if not names or wrong:
            raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(allowed)} (comma-separated)")
        return names

    return parse


def bench_command(args: argparse.Namespace) -> int:
    if args.quick:
        args.epochs, args.slow_epochs = 1, 1
        args.max_steps = args.max_steps or 20
        args.warmup_steps = min(args.warmup_steps, 2)
    for name in ("epochs", "slow_epochs", "max_steps", "repeat"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            print(f"ddp-mnist bench: error: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    settings = Settings(
        models=args.models,
        recipes=args.recipes,
        epochs=args.epochs,
        slow_epochs=args.slow_epochs,
        max_steps=args.max_steps,
        warmup_steps=max(args.warmup_steps, 0),
        repeat=args.repeat,
        data_dir=args.data_dir,
        seed=args.seed,
        target_accuracy=args.target_accuracy,
    )
    outs = [Path(out) for out in args.out]
    try:
        device = pick_device(args.device, DistEnv())
        # The files are rewritten after every row: a run stopped half-way leaves the rows it measured.
        report = run_bench(settings, device, on_row=lambda partial: write_report(partial, outs))
    except ConfigError as e:
        print(f"ddp-mnist bench: error: {e}", file=sys.stderr)
        return 2
    print(report.markdown(), end="")
    write_report(report, outs)
    for out in outs:
        print(f"written: {out}")
    return 0


def write_report(report: Report, outs: list[Path]) -> None:
    """The table as JSON (*.json) or Markdown (anything else), each file replaced whole (never half-written)."""
    for out in outs:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out, report.to_json() + "\n" if out.suffix == ".json" else report.markdown())
