"""The `ddp-mnist` command: train (every launcher ends here), scale, bench."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import subprocess
import sys
from typing import get_type_hints

from .config import ConfigError, TrainConfig

log = logging.getLogger("ddp_mnist")

# Flags whose help comes from the field docstrings would need source parsing; short help lives here.
HELP = {
    "model": "mlp (the tutorial's net) or cnn", "recipe": "tutorial (as written) or fast (default)",
    "epochs": "epochs (default: the recipe's)", "batch_size": "GLOBAL batch; each of N ranks takes batch/N",
    "lr": "peak learning rate", "optimizer": "sgd or adamw", "momentum": "SGD momentum",
    "weight_decay": "weight decay", "schedule": "constant or onecycle", "label_smoothing": "label smoothing",
    "normalize": "unit (x/255) or standard (mean/std)", "precision": "auto, fp32, bf16 or fp16",
    "grad_clip": "clip the gradient norm (0: off)", "grad_accum": "micro-batches per step (inner ones skip the all-reduce)",
    "seed": "seed of the init and of every epoch's permutation", "data_dir": "folder holding MNIST/raw/ "
    "(default: $DDP_MNIST_DATA, else ./data)", "data_path": "auto, loader or resident",
    "num_workers": "DataLoader workers per rank", "compile": "capture the step as a CUDA graph: auto, on, off",
    "run_dir": "the run folder", "resume": "continue the job in --run-dir from its newest good checkpoint",
    "checkpoint_every": "also checkpoint every N steps (0: per epoch only)",
    "keep_checkpoints": "checkpoints to keep", "eval_every": "evaluate every N epochs",
    "target_accuracy": "report time to this test accuracy (%%)", "log_every": "log the train loss every N steps",
    "throughput_warmup_steps": "steps excluded from the steady-state throughput",
    "stop_check_every": "check for stop signals every N steps", "backend": "auto, gloo or nccl",
    "device": "auto, cpu or cuda", "timeout_s": "collective timeout in seconds",
    "expected_world_size": "fail unless the launcher started this many processes",
    "progress": "show a progress bar", "max_steps": "stop after N steps in total", "wandb": "log to W&B",
    "wandb_project": "W&B project", "wandb_entity": "W&B entity", "wandb_group": "W&B group",
    "wandb_name": "W&B run name", "wandb_tags": "W&B tags (comma-separated)",
    "wandb_mode": "online, offline or disabled",
}


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, named after it."""
    hints = get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=HELP[f.name])
        elif f.name == "wandb_tags":
            parser.add_argument(flag, type=lambda s: [t for t in s.split(",") if t], default=None, help=HELP[f.name])
        else:
            base = next(t for t in (int, float, str) if t in getattr(kind, "__args__", (kind,)))
            parser.add_argument(flag, type=base, default=None, help=HELP[f.name])


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
             if getattr(args, f.name, None) is not None}
    return TrainConfig(**given)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddp-mnist", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train and evaluate (under any launcher)")
    add_train_arguments(train)
    from .scale import add_scale_arguments
    add_scale_arguments(sub.add_parser("scale", help="run the same training over several world sizes"))
    from .bench import add_bench_arguments
    add_bench_arguments(sub.add_parser("bench", help="benchmark the tutorial loop against the fast paths"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "train":
        return train_command(args)
    return args.func(args)


def train_command(args: argparse.Namespace) -> int:
    from .checkpoint import CheckpointError
    from .data import DataError
    from .train import NonFiniteLossError, TrainingStopped, run_training

    try:
        run_training(config_from_args(args))
        return 0
    except TrainingStopped as stop:
        return after_stop(stop)
    except (ConfigError, DataError, CheckpointError, NonFiniteLossError) as e:
        print(f"ddp-mnist: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - a distributed failure: say which rank and what, not only a traceback
        rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
        print(f"ddp-mnist: rank {rank} failed: {type(e).__name__}: {e}", file=sys.stderr)
        raise


def after_stop(stop) -> int:
    """A stop signal was handled and a checkpoint written. Under SLURM, SIGUSR1 means: requeue me."""
    from .signals import EXIT_PREEMPTED

    job = os.environ.get("SLURM_JOB_ID")
    rank0 = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"
    if stop.requeue and job and rank0:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        print(f"ddp-mnist: requeue of SLURM job {job}: "
              f"{'requested' if done.returncode == 0 else 'failed: ' + done.stderr.strip()}", flush=True)
    return EXIT_PREEMPTED
