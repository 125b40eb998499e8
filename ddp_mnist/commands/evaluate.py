"""`ddp-mnist evaluate`: the test accuracy of a checkpoint or run folder, under any launcher."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ddp_mnist.commands.arguments import add_rank_arguments, bounded, examples
from ddp_mnist.config.validation import RANGES
from ddp_mnist.files import write_json_atomic
from ddp_mnist.parallel.env import DistEnv
from ddp_mnist.training.evaluation import EVAL_FILE, evaluate_checkpoint, format_accuracy, format_confusion


def add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "The test accuracy, loss and confusion matrix of a checkpoint, of a run folder's newest good "
        "checkpoint or of an exported model, under any launcher: each of the 10,000 test images is "
        f"evaluated on exactly one rank. The result is also written to RUN/{EVAL_FILE} when the weights "
        "belong to a run folder."
    )
    p.epilog = examples(
        "ddp-mnist evaluate runs/latest",
        "ddp-mnist evaluate runs/latest/checkpoints/best.pt --out score.json",
        "ddp-mnist evaluate runs/latest/model.safetensors",
        "torchrun --standalone --nproc_per_node=2 -m ddp_mnist evaluate runs/latest",
    )
    p.add_argument(
        "checkpoint",
        help="a checkpoint (.pt), a run folder (its newest good checkpoint) or an exported model.safetensors",
    )
    add_rank_arguments(p)  # --data-dir, --device, --backend: as `train` reads them
    p.add_argument(
        "--timeout-s",
        type=bounded(float, *RANGES["timeout_s"]),
        default=300.0,
        metavar="X",
        help="collective timeout in seconds",
    )
    p.add_argument("--out", default=None, metavar="FILE", help="also write the result as JSON to FILE")
    p.set_defaults(func=evaluate_command)


def evaluate_command(args: argparse.Namespace) -> int:
    result = evaluate_checkpoint(args.checkpoint, args.data_dir, args.device, args.backend, args.timeout_s)
    if not DistEnv.from_environ().is_main:
        return 0
    print(
        f"test accuracy {format_accuracy(result['test_accuracy'])} "
        f"({result['test_correct']}/{result['test_samples']}), loss {result['test_loss']:.4f}: "
        f"{result['checkpoint']} (step {result['global_step']}), world size {result['world_size']}",
        flush=True,
    )
    print(format_confusion(result["confusion_matrix"]), flush=True)
    targets = [Path(args.out)] if args.out else []
    if result["run_dir"]:
        targets.append(Path(result["run_dir"]) / EVAL_FILE)
    for path in targets:
        try:
            write_json_atomic(path, result)
            print(f"-> {path}", flush=True)
        except OSError as e:  # e.g. someone else's run folder: the result is printed above all the same
            print(
                f"ddp-mnist: warning: cannot write {path} ({e.strerror}); pass --out FILE to keep the result elsewhere",
                file=sys.stderr,
            )
    return 0
