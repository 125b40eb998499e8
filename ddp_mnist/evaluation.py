"""Exact distributed evaluation, shared by training and `ddp-mnist evaluate`.

Each test image sits on exactly one rank (`data.eval_shard`, no padding): every rank sums (correct,
loss, count) over its shard and one all-reduce adds them up, so a checkpoint gets the same count of
correct answers at any world size.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .arguments import examples
from .checkpoint import CheckpointError, Checkpointer, load
from .config import TEST_SAMPLES, ConfigError
from .data import DataError, MnistSplit, eval_shard, load_split, prepare_mnist, to_input
from .files import write_json_atomic
from .distributed import DistEnv, all_reduce_sum, record_error, pick_backend, pick_device, process_group
from .model import autocast_dtype, build_model, resolve_precision
from .run_dir import RunDir

log = logging.getLogger("ddp_mnist")

EVAL_CHUNK = 2000  # images per forward pass: bounds activation memory, the result does not depend on it


@torch.no_grad()
def evaluate(model: nn.Module, shard: MnistSplit, normalize: str, device: torch.device,
             dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Accuracy and mean loss over the whole test set; every rank calls it with its own shard."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.float64, device=device)
    loss = torch.zeros((), dtype=torch.float64, device=device)
    for start in range(0, len(shard), EVAL_CHUNK):
        x, y = shard.images[start:start + EVAL_CHUNK], shard.labels[start:start + EVAL_CHUNK]
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(to_input(x, normalize)).float()
        loss += nn.functional.cross_entropy(logits, y, reduction="sum").double()
        correct += (logits.argmax(1) == y).sum()
    correct_sum, loss_sum, count = all_reduce_sum([correct.item(), loss.item(), len(shard)], device)  # SYNC
    model.train(was_training)
    if int(count) != TEST_SAMPLES:
        raise RuntimeError(f"evaluation counted {int(count)} test images, expected {TEST_SAMPLES}")
    return {"test_accuracy": 100.0 * correct_sum / count, "test_loss": loss_sum / count,
            "test_samples": int(count), "test_correct": int(correct_sum)}


# ------------------------------------------------------------------------------ `ddp-mnist evaluate`
def evaluate_checkpoint(source: str | Path, data_dir: str | None = None, device: str = "auto",
                        backend: str = "auto", timeout_s: float = 300.0) -> dict[str, Any]:
    """Evaluate a checkpoint file, or a run folder's newest good checkpoint, under any launcher."""
    env = DistEnv.from_environ()
    dev = pick_device(device, env)
    root = prepare_mnist(data_dir)
    with process_group(env, pick_backend(backend, dev), dev, timeout_s):
        path = _checkpoint_path(Path(source), env.is_main)
        state = load(path, dev)
        config = state.get("config") or {}
        try:
            model = build_model(config["model"]).to(dev)
            model.load_state_dict(state["model"])
            normalize, precision = config["normalize"], resolve_precision(config["precision"], dev)
        except (KeyError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"{path} is not a ddp-mnist checkpoint ({type(e).__name__}: {e})") from None
        shard = eval_shard(load_split(root, train=False), env.rank, env.world_size).to(dev)
        result = evaluate(model, shard, normalize, dev, autocast_dtype(precision))
    return {**result, "checkpoint": str(path), "global_step": state.get("global_step"),
            "model": config["model"], "precision": precision, "world_size": env.world_size, "device": str(dev)}


def _checkpoint_path(source: Path, is_main: bool) -> Path:
    if source.is_file():
        return source
    if not source.is_dir():
        raise CheckpointError(f"{source} is neither a checkpoint file nor a run folder")
    run = RunDir(source)
    if not run.config.exists():
        raise CheckpointError(f"{source} is not a run folder (no config.json); pass a run folder or a .pt file")
    path = Checkpointer(run.checkpoints, keep=1, is_main=is_main).choose(json.loads(run.config.read_text()))
    if path is None:
        raise CheckpointError(f"run folder {source} holds no checkpoint yet")
    return path


def add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("The test accuracy and loss of a checkpoint, or of a run folder's newest good checkpoint, "
                     "under any launcher: each of the 10,000 test images is evaluated on exactly one rank.")
    p.epilog = examples("ddp-mnist evaluate runs/latest",
                        "ddp-mnist evaluate runs/latest/checkpoints/best.pt --out score.json",
                        "torchrun --standalone --nproc_per_node=2 -m ddp_mnist evaluate runs/latest")
    p.add_argument("checkpoint", help="a checkpoint (.pt) or a run folder (its newest good checkpoint)")
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help="folder holding MNIST/raw/ (default: $DDP_MNIST_DATA, else ./data)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="`auto`: CUDA when available")
    p.add_argument("--backend", choices=("auto", "gloo", "nccl"), default="auto",
                   help="process-group backend; `auto`: nccl with CUDA, gloo on CPU")
    p.add_argument("--timeout-s", type=float, default=300.0, metavar="X", help="collective timeout in seconds")
    p.add_argument("--out", default=None, metavar="FILE", help="also write the result as JSON to FILE")
    p.set_defaults(func=evaluate_command)


def evaluate_command(args: argparse.Namespace) -> int:
    try:
        result = evaluate_checkpoint(args.checkpoint, args.data_dir, args.device, args.backend, args.timeout_s)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"ddp-mnist: error: {e}", file=sys.stderr)
        record_error(e)
        return 2
    if DistEnv.from_environ().is_main:
        print(f"test accuracy {result['test_accuracy']:.2f}% ({result['test_correct']}/{result['test_samples']}), "
              f"loss {result['test_loss']:.4f}: {result['checkpoint']} (step {result['global_step']}), "
              f"world size {result['world_size']}", flush=True)
        if args.out:
            write_json_atomic(Path(args.out), result)
    return 0
