"""The `ddp-mnist` command: train (every launcher ends here), evaluate, scale, bench."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import subprocess
import sys
from typing import get_type_hints

from .config import ConfigError, TrainConfig, field_docs
from .config_sources import add_source_arguments, compose_config, given_values

log = logging.getLogger("ddp_mnist")



def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, named after it."""
    hints = get_type_hints(TrainConfig)
    docs = field_docs()  # the help is each field's docstring: one text, in config.py
    add_source_arguments(parser)  # --config FILE and --resume [RUN]: where the settings come from
    for f in dataclasses.fields(TrainConfig):
        if f.name == "resume":
            continue  # added above
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=docs[f.name])
        elif f.name == "wandb_tags":
            parser.add_argument(flag, type=lambda s: [t for t in s.split(",") if t], default=None, help=docs[f.name])
        else:
            base = next(t for t in (int, float, str) if t in getattr(kind, "__args__", (kind,)))
            parser.add_argument(flag, type=base, default=None, help=docs[f.name])


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """recipe < the resumed run's config.json < --config FILE < the flags given (config_sources.py)."""
    return compose_config(given_values(args), getattr(args, "config", None))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddp-mnist", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train and evaluate (under any launcher)")
    add_train_arguments(train)
    from .evaluation import add_evaluate_arguments
    add_evaluate_arguments(sub.add_parser("evaluate", help="test accuracy of a checkpoint or run folder (under any launcher)"))
    from .scale import add_scale_arguments
    add_scale_arguments(sub.add_parser("scale", help="run the same training over several world sizes"))
    from .bench import add_bench_arguments
    add_bench_arguments(sub.add_parser("bench", help="benchmark the tutorial loop against the fast paths"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "train":
        return train_command(args)
    try:
        return args.func(args)
    except Exception as e:
        from .distributed import record_error
        record_error(e)
        raise


def train_command(args: argparse.Namespace) -> int:
    from .checkpoint import CheckpointError
    from .data import DataError
    from .distributed import record_error
    from .train import NonFiniteLossError, TrainingStopped, run_training

    try:
        run_training(config_from_args(args))
        return 0
    except TrainingStopped as stop:
        return after_stop(stop)
    except (ConfigError, DataError, CheckpointError, NonFiniteLossError) as e:
        print(f"ddp-mnist: error: {e}", file=sys.stderr)
        record_error(e)  # torchrun's failure summary then names this error
        return 2
    except Exception as e:  # noqa: BLE001 - a distributed failure: say which rank and what, not only a traceback
        rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
        print(f"ddp-mnist: rank {rank} failed: {type(e).__name__}: {e}", file=sys.stderr)
        record_error(e)
        raise


# Set by slurm/lib.sh: the batch script reads the run folder and requeues the job itself.
SCRIPT_REQUEUES = "DDP_MNIST_SCRIPT_REQUEUES"


def after_stop(stop) -> int:
    """A stop signal was handled and a checkpoint written. Under SLURM, the warning signal means: requeue me.

    Under the batch scripts in slurm/, the ranks have left a marker in the run folder and exit 0: the batch
    shell requeues the job (it outlives the ranks, and runs outside any container, where `scontrol` exists),
    and a zero exit keeps torchrun from printing a failure for a clean stop. Launched any other way under
    SLURM, rank 0 asks for the requeue itself.
    """
    from .signals import EXIT_PREEMPTED

    job = os.environ.get("SLURM_JOB_ID")
    if not (stop.requeue and job):
        return EXIT_PREEMPTED
    if os.environ.get(SCRIPT_REQUEUES) == "1":
        return 0
    if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0":
        try:
            done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            outcome = "requested" if done.returncode == 0 else "failed: " + done.stderr.strip()
        except OSError as e:  # e.g. inside a container without SLURM's commands
            outcome = f"failed: {e.strerror}: scontrol (run the batch scripts in slurm/, which requeue from outside)"
        print(f"ddp-mnist: requeue of SLURM job {job}: {outcome}", flush=True)
    return EXIT_PREEMPTED
