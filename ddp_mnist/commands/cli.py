"""The `ddp-mnist` command: train (every launcher ends here), evaluate, export, predict, report, status, doctor,
scale, bench."""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys

from ddp_mnist.commands.arguments import HelpFormatter, add_train_arguments, config_from_args, examples
from ddp_mnist.parallel.env import DistEnv, slurm_job_spec

MAIN_EXAMPLES = examples(
    "ddp-mnist train --help                 # every option, by group",
    "DDP_MNIST_DATA=/path/to/data ddp-mnist train --model cnn",
    "ddp-mnist evaluate runs/latest",
)


TRAIN_DESCRIPTION = """\
Train and evaluate one job, under any launcher (one process, torchrun, accelerate, SLURM). The run
folder (--run-dir) holds the resolved config, metrics, checkpoints, results.json and logs."""


TRAIN_EXAMPLES = examples(
    "ddp-mnist train --model cnn --run-dir runs/cnn",
    "ddp-mnist train --recipe tutorial --max-steps 100 --no-progress --run-dir runs/quick",
    "torchrun --standalone --nproc_per_node=4 -m ddp_mnist train --expected-world-size 4",
    "ddp-mnist train --run-dir runs/cnn --model cnn --resume      # continue a stopped job",
    "ddp-mnist train --wandb --wandb-project mnist --wandb-tags mlp,fast",
)


def add_train_command(p: argparse.ArgumentParser) -> None:
    p.description, p.epilog = TRAIN_DESCRIPTION, TRAIN_EXAMPLES
    add_train_arguments(p)
    p.set_defaults(func=train_command)


# The commands: name -> (its line in `ddp-mnist --help`, the module:function that adds its arguments). The
# modules are imported only for the command that runs (or for all, to show every command's help): `train` does
# not import what evaluate, scale or bench use.
COMMANDS = {
    "train": ("train and evaluate (under any launcher)", "cli:add_train_command"),
    "evaluate": ("test accuracy of a checkpoint or run folder (under any launcher)", "evaluate:add_evaluate_arguments"),
    "export": ("write a run's model as model.safetensors + model.json", "export:add_export_arguments"),
    "predict": ("the digit in PNG or JPEG images (white on black, like MNIST)", "predict:add_predict_arguments"),
    "report": ("draw a run's curves per epoch into a PNG", "report:add_report_arguments"),
    "status": (
        "where each rank of a job is, from its heartbeat files (during or after it)",
        "status:add_status_arguments",
    ),
    "doctor": (
        "find the bad node or link before a job starts (under the job's launcher)",
        "doctor:add_doctor_arguments",
    ),
    "scale": ("run the same training over several world sizes", "scale:add_scale_arguments"),
    "bench": ("benchmark the tutorial loop against the fast paths", "bench:add_bench_arguments"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or with `only` the arguments of that one command (the others are listed,
    without their arguments: parsing `only`'s command line needs nothing else)."""
    parser = argparse.ArgumentParser(
        prog="ddp-mnist", description=__doc__, epilog=MAIN_EXAMPLES, formatter_class=HelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (summary, where) in COMMANDS.items():
        command = sub.add_parser(name, help=summary, formatter_class=HelpFormatter)
        if only is None or name == only:
            module, function = where.split(":")
            getattr(importlib.import_module(f"ddp_mnist.commands.{module}"), function)(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs a command. Its clear errors (they say what is wrong and how to fix it) end it with one line and
    status 2; any other error also names the rank. Both go into torchrun's error file, whose failure
    summary then names them."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv[0] if argv and argv[0] in COMMANDS else None).parse_args(argv)
    from ddp_mnist.errors import CLEAR_ERRORS
    from ddp_mnist.parallel.env import DistEnv
    from ddp_mnist.parallel.watchdog import record_error

    try:
        return args.func(args)
    except CLEAR_ERRORS as e:
        print(f"ddp-mnist: error: {e}", file=sys.stderr)
        record_error(e)
        return 2
    except Exception as e:  # noqa: BLE001 - a distributed failure: say which rank and what, not only a traceback
        print(f"ddp-mnist: rank {DistEnv.from_environ().rank} failed: {type(e).__name__}: {e}", file=sys.stderr)
        record_error(e)
        raise


def train_command(args: argparse.Namespace) -> int:
    from ddp_mnist.training.train import TrainingStopped, run_training

    try:
        run_training(config_from_args(args))
        return 0
    except TrainingStopped as stop:
        return after_stop(stop)


# Set by slurm/lib.sh: the batch script reads the run folder and requeues the job itself.
SCRIPT_REQUEUES = "DDP_MNIST_SCRIPT_REQUEUES"


def after_stop(stop) -> int:
    """A stop signal was handled and a checkpoint written. Under SLURM, the warning signal means: requeue me.

    Under the batch scripts in slurm/, the ranks have left a marker in the run folder and exit 0: the batch
    shell requeues the job (it outlives the ranks, and runs outside any container, where `scontrol` exists),
    and a zero exit keeps torchrun from printing a failure for a clean stop. Launched any other way under
    SLURM, rank 0 asks for the requeue itself.
    """
    from ddp_mnist.training.signals import EXIT_PREEMPTED

    job = slurm_job_spec(os.environ)
    if not (stop.requeue and job):
        return EXIT_PREEMPTED
    if os.environ.get(SCRIPT_REQUEUES) == "1":
        return 0
    if DistEnv.from_environ().is_main:
        try:
            outcome = requeue_outcome(subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True))
        except OSError as e:  # e.g. inside a container without SLURM's commands
            outcome = f"failed: {e.strerror}: scontrol (run the batch scripts in slurm/, which requeue from outside)"
        print(f"ddp-mnist: requeue of SLURM job {job}: {outcome}", flush=True)
    return EXIT_PREEMPTED


def requeue_outcome(done: subprocess.CompletedProcess) -> str:
    """What `scontrol requeue` did, in words. SLURM ends a requeued job's processes, scontrol among them when it
    has not exited yet: ended by a signal, it did request the requeue (the job is being requeued)."""
    if done.returncode == 0:
        return "requested"
    if done.returncode < 0:
        return f"requested (scontrol was ended by signal {-done.returncode}, as SLURM ends a requeued job's processes)"
    return f"failed (scontrol exited {done.returncode}): {done.stderr.strip() or 'it printed no reason'}"
