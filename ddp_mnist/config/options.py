"""The vocabulary of TrainConfig: the allowed values of its choices, its help groups, the recipes, and
`option()`, which declares a field with its help and group as data."""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any

MODELS = ("mlp", "cnn")


RECIPES = ("tutorial", "fast")


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


OPTIMIZERS = ("sgd", "adamw")


SCHEDULES = ("constant", "onecycle")


DATA_PATHS = ("auto", "loader", "resident")


BACKENDS = ("auto", "gloo", "nccl")


DEVICES = ("auto", "cpu", "cuda")


NORMALIZATIONS = ("unit", "standard")


CUDA_GRAPH_MODES = ("auto", "on", "off")


WANDB_MODES = ("online", "offline", "disabled")


STRATEGIES = ("ddp", "zero1", "fsdp")


COMM_HOOKS = ("none", "fp16", "bf16", "powersgd")


# --target-accuracy's default per model (percent), for training and for ddp-mnist bench.
TARGET_ACCURACY = {"mlp": 98.0, "cnn": 99.0}


TARGET_ACCURACY_SHOWN = ", ".join(f"{accuracy} for {model}" for model, accuracy in TARGET_ACCURACY.items())


# Where MNIST is read from when --data-dir is not given (data.find_data_root), as every command's help says it.
DATA_DIR_SHOWN = "$DDP_MNIST_DATA, else ./data when it holds MNIST, else the copy shipped inside the package"


TRAIN_SAMPLES = 60_000


TEST_SAMPLES = 10_000


# The sections of TrainConfig and of `ddp-mnist train --help`, in order, each with the line its help shows.
GROUPS: dict[str, str] = {
    "model and recipe": "What is trained, and for how long. The recipe fills in every value shown as "
    "`default: recipe`; a flag given explicitly always wins, also 0.",
    "optimization": "The optimizer, its schedule and the loss.",
    "precision and speed": "How fast a step runs: number format, where the data lives, the CUDA-graph step. They "
    "change the numbers only by rounding (precision).",
    "data": "Where MNIST is, and how it is read and scaled.",
    "distributed": (
        "Devices, the process group, what the launcher must have started, how the ranks share the model"
        " (ddp, zero1, fsdp) and DDP's communication knobs."
    ),
    "run folder and checkpoints": "Where the job lives, and how it is saved and continued.",
    "tracking": "What is measured and reported: evaluation, logs, the progress bar, Weights & Biases.",
    "advanced": "Knobs for tests and benchmarks; the defaults suit every training run.",
}


RECIPE = "recipe"
"""The `shown` default of a field that the recipe fills in when it is not given."""


# Keys renamed since an earlier release: old config.json files, checkpoints and flags still read.
RENAMED_KEYS = {"compile": "cuda_graph"}


def current_keys(values: dict[str, Any]) -> dict[str, Any]:
    """Settings with keys renamed since an earlier release under their new names (a new key wins)."""
    values = dict(values)
    for old, new in RENAMED_KEYS.items():
        if old in values:
            values.setdefault(new, values.pop(old))
    return values


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    group: str,
    choices: tuple[str, ...] = (),
    shown: str | None = None,
    **kwargs: Any,
) -> Any:
    """A TrainConfig field with its help text, its group and its allowed values, held as data (the field's
    metadata): `--help`, validation, the docs and the code read the same text, also in an install without
    .py sources.

    `shown` is what `--help` names as the default where the value itself would not say it: every field
    whose default is None says what None means (`RECIPE`, an environment variable, ...).
    """
    if group not in GROUPS:
        raise ValueError(f"group {group!r} is not one of {list(GROUPS)}")
    if default is None and not shown:
        raise ValueError("a field whose default is None must say what None means (shown=...)")
    metadata = {"help": " ".join(help.split()), "group": group, "choices": tuple(choices), "shown": shown}
    return field(default=default, metadata=metadata, **kwargs)


def recipe_values(recipe: str, model: str) -> dict[str, Any]:
    """The hyper-parameters a recipe stands for."""
    if recipe == "tutorial":
        # The beginner tutorial, as written: plain SGD, lr 0.01, batch 100, 10 epochs, ToTensor scaling.
        return dict(
            epochs=10,
            batch_size=100,
            lr=0.01,
            optimizer="sgd",
            momentum=0.0,
            weight_decay=0.0,
            schedule="constant",
            label_smoothing=0.0,
            normalize="unit",
            precision="fp32",
        )
    if model == "mlp":
        # AdamW + one-cycle: 98.6% on the MLP in 6 epochs (CPU, 1 rank; 8 epochs: 98.7%, 5: 98.5%).
        return dict(
            epochs=6,
            batch_size=512,
            lr=3e-3,
            optimizer="adamw",
            momentum=0.0,
            weight_decay=0.05,
            schedule="onecycle",
            label_smoothing=0.1,
            normalize="standard",
            precision="auto",
        )
    # The same for the CNN: 99.46% in 4 epochs (CPU, 1 rank; 99.37% after epoch 2).
    return dict(
        epochs=4,
        batch_size=256,
        lr=3e-3,
        optimizer="adamw",
        momentum=0.0,
        weight_decay=0.05,
        schedule="onecycle",
        label_smoothing=0.1,
        normalize="standard",
        precision="auto",
    )


# The warning before preemption or the time limit (SLURM's `--signal`): checkpoint, then requeue.
# USR1 by default; USR2 where NCCL or the site owns USR1 (`--requeue-signal`, REQUEUE_SIGNAL in slurm/).
REQUEUE_SIGNAL_CHOICES = ("USR1", "USR2")
