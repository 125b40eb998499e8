"""Exact distributed evaluation, shared by training and `ddp-mnist evaluate`.

Each test image sits on exactly one rank (`data.eval_shard`, no padding): every rank counts a 10x10
confusion matrix (true digit x predicted digit) and a loss sum over its shard, and one all-reduce adds them
up, so a checkpoint gets the same counts at any world size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ddp_mnist.artifacts.trained import CLASSES, load_trained
from ddp_mnist.config.options import TEST_SAMPLES
from ddp_mnist.data.batches import MnistSplit, eval_shard, load_split, to_input
from ddp_mnist.data.raw_files import prepare_mnist
from ddp_mnist.model import autocast_dtype, resolve_precision
from ddp_mnist.parallel.collectives import all_reduce_sum
from ddp_mnist.parallel.device import pick_backend, pick_device
from ddp_mnist.parallel.env import DistEnv
from ddp_mnist.parallel.process_group import process_group

EVAL_CHUNK = 2000  # images per forward pass: bounds activation memory, the result does not depend on it


EVAL_FILE = "eval.json"  # `ddp-mnist evaluate` writes its result here, in the run folder


def format_accuracy(percent: float) -> str:
    """A test accuracy as the log, `evaluate` and the report print it (`98.52%`); results.json keeps the number."""
    return f"{percent:.2f}%"


@dataclass
class Evaluation:
    """One pass over the whole test set, summed over the ranks."""

    confusion: list[list[int]]
    """confusion[t][p]: test images of digit t that the model called p."""
    loss_sum: float

    @property
    def samples(self) -> int:
        return sum(map(sum, self.confusion))

    @property
    def correct(self) -> int:
        return sum(self.confusion[d][d] for d in range(len(self.confusion)))

    def summary(self) -> dict[str, Any]:
        """The numbers training logs, writes to metrics.jsonl and results.json (public keys: never renamed)."""
        return {
            "test_accuracy": 100.0 * self.correct / self.samples,
            "test_loss": self.loss_sum / self.samples,
            "test_samples": self.samples,
            "test_correct": self.correct,
        }


@torch.no_grad()
def evaluate_counts(
    model: nn.Module, shard: MnistSplit, normalize: str, device: torch.device, dtype: torch.dtype | None = None
) -> Evaluation:
    """The confusion matrix and loss over the whole test set; every rank calls it with its own shard."""
    was_training = model.training
    model.eval()
    classes = len(CLASSES)
    confusion = torch.zeros(classes * classes, dtype=torch.int64, device=device)
    loss = torch.zeros((), dtype=torch.float64, device=device)
    for start in range(0, len(shard), EVAL_CHUNK):
        x, y = shard.images[start : start + EVAL_CHUNK], shard.labels[start : start + EVAL_CHUNK]
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(to_input(x, normalize)).float()
        loss += nn.functional.cross_entropy(logits, y, reduction="sum").double()
        confusion += torch.bincount(y * classes + logits.argmax(1), minlength=classes * classes)
    # One copy to the host and one all-reduce for the 10x10 counts and the loss sum (float64: counts up to
    # 10,000 are exact).  SYNC
    *counts, loss_sum = all_reduce_sum(torch.cat([confusion.double(), loss.reshape(1)]).tolist(), device)
    model.train(was_training)
    result = Evaluation([[int(c) for c in counts[t * classes : (t + 1) * classes]] for t in range(classes)], loss_sum)
    if result.samples != TEST_SAMPLES:
        raise RuntimeError(f"evaluation counted {result.samples} test images, expected {TEST_SAMPLES}")
    return result


def evaluate(
    model: nn.Module, shard: MnistSplit, normalize: str, device: torch.device, dtype: torch.dtype | None = None
) -> dict[str, Any]:
    """Accuracy and mean loss over the whole test set (training's evaluation); every rank calls it."""
    return evaluate_counts(model, shard, normalize, device, dtype).summary()


# ------------------------------------------------------------------------------ `ddp-mnist evaluate`
def evaluate_checkpoint(
    source: str | Path,
    data_dir: str | None = None,
    device: str = "auto",
    backend: str = "auto",
    timeout_s: float = 300.0,
) -> dict[str, Any]:
    """Evaluate a checkpoint, a run folder's newest good checkpoint or an export, under any launcher."""
    env = DistEnv.from_environ()
    dev = pick_device(device, env)
    root = prepare_mnist(data_dir)
    with process_group(env, pick_backend(backend, dev), dev, timeout_s):
        trained = load_trained(source, dev)
        precision = resolve_precision(trained.settings.precision, dev)
        shard = eval_shard(load_split(root, train=False), env.rank, env.world_size).to(dev)
        result = evaluate_counts(trained.model, shard, trained.settings.normalize, dev, autocast_dtype(precision))
    return {
        **result.summary(),
        "confusion_matrix": result.confusion,
        "checkpoint": str(trained.path),
        "global_step": trained.settings.global_step,
        "model": trained.settings.model,
        "normalize": trained.settings.normalize,
        "precision": precision,
        "world_size": env.world_size,
        "device": str(dev),
        "run_dir": str(trained.run_dir) if trained.run_dir else None,
    }


def format_confusion(confusion: list[list[int]]) -> str:
    """The matrix as a table: one row per true digit, one column per predicted digit."""
    width = max(5, *(len(str(c)) + 1 for row in confusion for c in row))
    lines = [
        "confusion matrix (rows: true digit, columns: predicted digit)",
        "true" + "".join(f"{p:>{width}}" for p in range(len(confusion))),
    ]
    lines += [f"{t:>4}" + "".join(f"{c:>{width}}" for c in row) for t, row in enumerate(confusion)]
    return "\n".join(lines)
