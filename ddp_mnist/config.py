"""Training configuration: one typed dataclass, recipes, and validation with clear errors.

A recipe fills in the hyper-parameters the user did not set; explicit flags always win.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .files import write_json_atomic
from .signals import REQUEUE_SIGNAL_CHOICES

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


class ConfigError(ValueError):
    """A configuration value is wrong. The message says which and how to fix it."""


# The sections of TrainConfig and of `ddp-mnist train --help`, in order, each with the line its help shows.
GROUPS: dict[str, str] = {
    "model and recipe": "What is trained, and for how long. The recipe fills in every value shown as "
                        "`default: recipe`; a flag given explicitly always wins, also 0.",
    "optimization": "The optimizer, its schedule and the loss.",
    "precision and speed": "How fast a step runs: number format, where the data lives, the CUDA-graph step. They "
                           "change the numbers only by rounding (precision).",
    "data": "Where MNIST is, and how it is read and scaled.",
    "distributed": ("Devices, the process group, what the launcher must have started, how the ranks share the model"
                    " (ddp, zero1, fsdp) and DDP's communication knobs."),
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


def option(default: Any = dataclasses.MISSING, help: str = "", *, group: str, choices: tuple[str, ...] = (),
           shown: str | None = None, **kwargs: Any) -> Any:
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


@dataclass
class TrainConfig:
    """Everything that defines one training job. Saved as `config.json` in the run folder.

    The fields are flat (`cfg.batch_size`; config.json's keys are the flags' names) and sorted into
    sections, the groups of `ddp-mnist train --help` (GROUPS; each field's group is its metadata):
    - model and recipe: the network, the hyper-parameter recipe, how long to train, the global batch, the seed;
    - optimization: the optimizer, learning rate and schedule, loss, clipping, gradient accumulation;
    - precision and speed: number format, data path and the CUDA-graph step (same training, faster);
    - data: where MNIST is, DataLoader workers, input scaling;
    - distributed: device, process-group backend and timeout, expected world size, SLURM's requeue signal;
    - run folder and checkpoints: the run folder, resuming, how often to checkpoint and how many to keep;
    - tracking: evaluation, target accuracy, logging, progress bar, Weights & Biases;
    - advanced: knobs for tests and benchmarks.
    A field whose default is None is filled in by `resolved()`: from the recipe (`default: recipe` in
    the help), or from its own rule (the help says which).
    """

    # ------------------------------------------------------------------ model and recipe
    model: str = option("mlp", "Network: `mlp` (the tutorial's 784-500-256-10 ReLU net) or `cnn` (a small conv net).",
                        group="model and recipe", choices=MODELS)
    recipe: str = option(
        "fast",
        "Hyper-parameter preset: `tutorial` (as written: SGD lr 0.01, batch 100, 10 epochs, fp32) or `fast`.",
        group="model and recipe", choices=RECIPES)
    epochs: int | None = option(None, "Passes over the 60,000 training images.", group="model and recipe",
                                shown=RECIPE)
    max_steps: int | None = option(
        None,
        "Stop after this many optimizer steps in total (for tests and quick checks).",
        group="model and recipe", shown="no limit")
    batch_size: int | None = option(
        None,
        "GLOBAL batch per optimizer step; each of the N ranks takes batch_size / N.",
        group="model and recipe", shown=RECIPE)
    seed: int = option(
        0,
        "Seeds the model init and every epoch's permutation. Same seed + global batch = same training.",
        group="model and recipe")

    # ------------------------------------------------------------------ optimization
    optimizer: str | None = option(None, "`sgd` or `adamw`.", group="optimization", choices=OPTIMIZERS,
                                   shown=RECIPE)
    lr: float | None = option(None, "Peak learning rate.", group="optimization", shown=RECIPE)
    momentum: float | None = option(None, "SGD momentum (0 = plain SGD, as in the tutorial).",
                                    group="optimization", shown=RECIPE)
    weight_decay: float | None = option(None, "Decoupled weight decay.", group="optimization", shown=RECIPE)
    schedule: str | None = option(None, "Learning-rate schedule: `constant` or `onecycle` (per step).",
                                  group="optimization", choices=SCHEDULES, shown=RECIPE)
    label_smoothing: float | None = option(None, "CrossEntropyLoss label smoothing.", group="optimization",
                                           shown=RECIPE)
    grad_clip: float = option(
        0.0,
        "Clip the global gradient norm to this value (0 = off). With fp16, gradients are unscaled first.",
        group="optimization")
    grad_accum: int = option(1, "Micro-batches per optimizer step; inner steps skip DDP's all-reduce (`no_sync`).",
                             group="optimization")

    # ------------------------------------------------------------------ precision and speed
    precision: str | None = option(
        None,
        "`fp32`, `bf16` (autocast), `fp16` (autocast + gradient scaler) or `auto` (bf16 on CUDA, fp32 on CPU,"
        " where bf16 autocast is slower than fp32).",
        group="precision and speed", choices=PRECISIONS, shown=RECIPE)
    data_path: str = option(
        "auto",
        "`loader` (DataLoader + DistributedSampler), `resident` (whole set on the device) or `auto` (resident"
        " on CUDA, where the loader is the bottleneck; loader on CPU).",
        group="precision and speed", choices=DATA_PATHS)
    cuda_graph: str = option(
        "auto",
        "Capture the training step as one CUDA graph, replayed every step: `auto` (on CUDA with the resident"
        " path), `on` (say so when it cannot), `off`.",
        group="precision and speed", choices=CUDA_GRAPH_MODES)

    # ------------------------------------------------------------------ data
    data_dir: str | None = option(
        None, "Folder holding `MNIST/raw/`.", group="data",
        shown=DATA_DIR_SHOWN)
    download: bool = option(
        False,
        "Download MNIST with torchvision into the data folder (--data-dir, $DDP_MNIST_DATA, else ./data) when"
        " it lacks the files (needs network access). Off: nothing touches the network.", group="data")
    num_workers: int = option(0, "DataLoader worker processes per rank (loader path only).", group="data")
    normalize: str | None = option(
        None,
        "Input scaling: `unit` (pixels / 255, like ToTensor) or `standard` (MNIST mean/std).",
        group="data", choices=NORMALIZATIONS, shown=RECIPE)

    # ------------------------------------------------------------------ distributed
    device: str = option("auto", "`auto` (CUDA when available), `cpu` or `cuda`.", group="distributed",
                         choices=DEVICES)
    backend: str = option("auto", "Process-group backend: `auto` (nccl with CUDA, gloo on CPU), `gloo` or `nccl`.",
                          group="distributed", choices=BACKENDS)
    timeout_s: float = option(
        300.0,
        "Collective timeout in seconds: a rank that waits longer on the others fails with an error.",
        group="distributed")
    expected_world_size: int | None = option(
        None,
        "Fail if the launcher started a different number of processes (catches silent mis-launches).",
        group="distributed", shown="any")
    requeue_signal: str = option(
        "USR1",
        "The warning signal that means: checkpoint, then requeue the SLURM job (SLURM's `--signal`). `USR1` or"
        " `USR2` (where NCCL or the site owns USR1); the batch scripts in slurm/ pass $REQUEUE_SIGNAL here.",
        group="distributed", choices=REQUEUE_SIGNAL_CHOICES)
    strategy: str = option(
        "ddp",
        "How the ranks share the model: `ddp` (DistributedDataParallel: every rank holds everything), `zero1`"
        " (DDP + ZeroRedundancyOptimizer: optimizer state split over the ranks) or `fsdp` (FSDP2 fully_shard per"
        " layer: parameters, gradients and optimizer state split). Checkpoints hold the full state for each.",
        group="distributed", choices=STRATEGIES)
    comm_hook: str = option(
        "none",
        "DDP communication hook (ddp, zero1): `none` (all-reduce fp32 gradients), `fp16` / `bf16` (compress"
        " gradients to 16 bits for the all-reduce) or `powersgd` (low-rank compression with error feedback).",
        group="distributed", choices=COMM_HOOKS)
    powersgd_rank: int = option(
        4,
        "PowerSGD's matrix approximation rank (--comm-hook powersgd). The fast recipe on 2 ranks, compressing"
        " from step 101: 98.4% with rank 4, 97.1% with torch's default rank 1.", group="distributed")
    powersgd_start_step: int = option(
        100,
        "Optimizer steps of plain all-reduce before PowerSGD starts compressing (--comm-hook powersgd; at least"
        " 2; torch's default of 1,000 is past the fast recipe's last step).", group="distributed")
    bucket_cap_mb: float = option(25.0, "DDP gradient bucket size in MiB (DDP's bucket_cap_mb).", group="distributed")
    static_graph: bool = option(
        False, "Tell DDP the set of used parameters never changes (DDP's static_graph).", group="distributed")
    gradient_as_bucket_view: bool = option(
        False, "Gradients are views into DDP's all-reduce buckets (saves one gradient copy per rank).",
        group="distributed")

    # ------------------------------------------------------------------ run folder and checkpoints
    run_dir: str | None = option(
        None,
        "The run folder: config, metrics, checkpoints, results, logs. A named folder is never overwritten.",
        group="run folder and checkpoints", shown="a new runs/<date>-<time>-<model>-<recipe>, linked as runs/latest")
    resume: bool = option(
        False,
        "Continue a run from its newest good checkpoint (start fresh if it has none), with the settings in its"
        " config.json: no flag needs retyping; flags given again may change what does not alter the training"
        " (e.g. --max-steps, --checkpoint-every, --data-dir). `--resume` alone: the run in --run-dir, else"
        " runs/latest; `--resume RUN`: that run folder (or a checkpoint in it).",
        group="run folder and checkpoints")
    checkpoint_every: int = option(0, "Also checkpoint every N optimizer steps (0 = only at the end of each epoch).",
                                   group="run folder and checkpoints")
    keep_checkpoints: int = option(3, "How many checkpoints to keep in the run folder (older ones are deleted).",
                                   group="run folder and checkpoints")

    # ------------------------------------------------------------------ tracking
    eval_every: int = option(1, "Evaluate on the test set every N epochs (the last epoch is always evaluated).",
                             group="tracking")
    target_accuracy: float | None = option(
        None,
        "Report the training time at which test accuracy first reached this percentage.",
        group="tracking", shown=TARGET_ACCURACY_SHOWN)
    log_every: int = option(50, "Log train loss and learning rate every N steps (to W&B and the progress bar).",
                            group="tracking")
    progress: bool = option(
        True,
        "Show a progress bar on rank 0 (when stderr is not a terminal, e.g. a log file, it is redrawn at most"
        " every 30 s; `--no-progress` turns it off).",
        group="tracking")
    wandb: bool = option(False, "Log to Weights & Biases (rank 0 only). Needs `pip install wandb`.",
                         group="tracking")
    wandb_project: str | None = option(None, "W&B project.", group="tracking",
                                       shown="$WANDB_PROJECT, else ddp-mnist")
    wandb_entity: str | None = option(None, "W&B entity.", group="tracking",
                                      shown="$WANDB_ENTITY, else your default entity")
    wandb_group: str | None = option(None, "W&B group, e.g. one scaling sweep.", group="tracking",
                                     shown="$WANDB_RUN_GROUP, else none")
    wandb_name: str | None = option(None, "W&B run name.", group="tracking", shown="W&B's")
    wandb_tags: list[str] = option(help="W&B tags, comma-separated.", default_factory=list, group="tracking",
                                   shown="none")
    wandb_mode: str | None = option(
        None, "`online`, `offline` or `disabled`.", group="tracking", choices=WANDB_MODES,
        shown="$WANDB_MODE; offline when there is no API key or network")
    profile: int = option(
        0,
        "Profile this many training steps on rank 0 (after 2 warm-up steps) with torch.profiler: trace.json in"
        " the run folder (Chrome/Perfetto; also a W&B file), a summary of all-reduce against compute in"
        " results.json. 0: off.", group="tracking")
    peak_tflops: float | None = option(
        None,
        "The device's peak TFLOP/s, for MFU (achieved / peak) in results.json.", group="tracking",
        shown="known GPUs' dense bf16 peak (H100/H200 989, A100 312, ...); no MFU on a CPU")

    # ------------------------------------------------------------------ advanced
    throughput_warmup_steps: int = option(
        20,
        "Steps at the start of each process left out of `steady_samples_per_second` (results.json): they "
        "include start-up costs (allocator, caches, data workers, CUDA graph capture).",
        group="advanced")
    stop_check_every: int | None = option(
        None,
        "Agree across ranks on pending stop signals every N steps (one tiny all-reduce and a host sync).",
        group="advanced", shown="every step on the CPU, every 50 steps on CUDA, where a sync per step would "
                                "stall the GPU")
    pause_at_step: int | None = option(
        None,
        "Testing: at this step, wait until a stop signal arrives (so a test can signal a job mid-training"
        " without racing it).",
        group="advanced", shown="never")

    # ------------------------------------------------------------------ resolution
    def resolved(self) -> "TrainConfig":
        """A copy with every None filled from the recipe, validated."""
        cfg = dataclasses.replace(self, wandb_tags=list(self.wandb_tags))
        if cfg.recipe not in RECIPES:
            raise ConfigError(f"--recipe {cfg.recipe!r} is unknown; choose one of {', '.join(RECIPES)}")
        if cfg.model not in MODELS:
            raise ConfigError(f"--model {cfg.model!r} is unknown; choose one of {', '.join(MODELS)}")
        for name, value in recipe_values(cfg.recipe, cfg.model).items():
            if getattr(cfg, name) is None:
                setattr(cfg, name, value)
        if cfg.target_accuracy is None:
            cfg.target_accuracy = TARGET_ACCURACY[cfg.model]
        cfg.validate()
        return cfg

    def validate(self) -> None:
        for f in dataclasses.fields(self):  # the allowed values are each field's metadata (`choices`)
            value = getattr(self, f.name)
            own_rule = value is None and f.metadata["shown"] != RECIPE  # e.g. --wandb-mode unset: $WANDB_MODE
            if f.metadata["choices"] and not own_rule:
                _choice(f.name.replace("_", "-"), value, f.metadata["choices"])
        _positive("bucket-cap-mb", self.bucket_cap_mb)
        _positive("powersgd-rank", self.powersgd_rank)
        if not isinstance(self.powersgd_start_step, int) or self.powersgd_start_step < 2:
            # PowerSGD's error feedback and warm start need at least one plain all-reduce before compressing.
            raise ConfigError(f"--powersgd-start-step must be an integer >= 2, got {self.powersgd_start_step!r}")
        if self.strategy == "fsdp" and self.comm_hook != "none":
            raise ConfigError(f"--comm-hook {self.comm_hook} is a DDP communication hook and does not apply to "
                              f"--strategy fsdp (FSDP reduce-scatters its own gradients); use --comm-hook none, "
                              f"or --strategy ddp or zero1")
        _positive("epochs", self.epochs)
        _positive("batch-size", self.batch_size)
        _positive("grad-accum", self.grad_accum)
        _positive("keep-checkpoints", self.keep_checkpoints)
        _positive("eval-every", self.eval_every)
        _positive("log-every", self.log_every)
        _positive("throughput-warmup-steps", self.throughput_warmup_steps)
        if self.stop_check_every is not None:
            _positive("stop-check-every", self.stop_check_every)
        _positive("timeout-s", self.timeout_s)
        if self.pause_at_step is not None:
            _positive("pause-at-step", self.pause_at_step)
        if self.max_steps is not None:
            _positive("max-steps", self.max_steps)
        if self.expected_world_size is not None:
            _positive("expected-world-size", self.expected_world_size)
        if not (0 < self.lr < math.inf):
            raise ConfigError(f"--lr must be a positive number, got {self.lr}")
        for name in ("momentum", "label_smoothing"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"--{name.replace('_', '-')} must be in [0, 1), got {value}")
        for name in ("weight_decay", "grad_clip"):
            if not 0 <= getattr(self, name) < math.inf:  # also rejects nan
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.checkpoint_every < 0:
            raise ConfigError(f"--checkpoint-every must be >= 0 (0 = per epoch only), got {self.checkpoint_every}")
        if self.num_workers < 0:
            raise ConfigError(f"--num-workers must be >= 0, got {self.num_workers}")
        if not 0.0 < self.target_accuracy <= 100.0:
            raise ConfigError(f"--target-accuracy is a percentage in (0, 100], got {self.target_accuracy}")
        if self.batch_size > TRAIN_SAMPLES:
            raise ConfigError(f"--batch-size {self.batch_size} is larger than the {TRAIN_SAMPLES:,} training images")
        if self.batch_size % self.grad_accum:
            raise ConfigError(
                f"--batch-size {self.batch_size} is not divisible by --grad-accum {self.grad_accum}")
        if self.profile < 0:
            raise ConfigError(f"--profile must be >= 0 (0 = off), got {self.profile}")
        if self.peak_tflops is not None:
            _positive("peak-tflops", self.peak_tflops)

    def check_world_size(self, world_size: int) -> None:
        """The global batch must split evenly over the ranks (and their micro-batches)."""
        if self.expected_world_size is not None and world_size != self.expected_world_size:
            raise ConfigError(
                f"the launcher started {world_size} process(es) but --expected-world-size is "
                f"{self.expected_world_size}; check the launcher's process count")
        if world_size > TRAIN_SAMPLES:
            raise ConfigError(f"world size {world_size} is larger than the {TRAIN_SAMPLES:,} training images")
        per_step = world_size * self.grad_accum
        if self.batch_size % per_step:
            fits = [b for b in range(per_step, 4 * self.batch_size, per_step) if b >= self.batch_size][:1]
            hint = f" (e.g. --batch-size {fits[0]})" if fits else ""
            raise ConfigError(
                f"--batch-size {self.batch_size} is the GLOBAL batch and must be divisible by world size "
                f"{world_size} x grad-accum {self.grad_accum} = {per_step}; pick a multiple of {per_step}{hint}")

    @property
    def steps_per_epoch(self) -> int:
        """Full global batches per epoch: the partial last batch is dropped, at every world size."""
        return TRAIN_SAMPLES // self.batch_size

    @property
    def total_steps(self) -> int:
        steps = self.steps_per_epoch * self.epochs
        return min(steps, self.max_steps) if self.max_steps else steps

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """A config from its dict (config.json, a checkpoint's `config`); keys renamed since then still read."""
        values = current_keys(values)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}; this config was written by another version")
        return cls(**values)

    def save(self, path: Path) -> None:
        write_json_atomic(path, self.to_dict(), durable=True)


# Keys that must match for a checkpoint to continue this job: they change what the trajectory is.
TRAJECTORY_KEYS = ("model", "epochs", "batch_size", "lr", "optimizer", "momentum", "weight_decay",
                   "schedule", "label_smoothing", "normalize", "precision", "grad_clip", "grad_accum", "seed")


def fields_by_group() -> dict[str, list[dataclasses.Field]]:
    """TrainConfig's fields in their sections (GROUPS order), as `--help` shows them."""
    groups: dict[str, list[dataclasses.Field]] = {name: [] for name in GROUPS}
    for f in dataclasses.fields(TrainConfig):
        groups[f.metadata["group"]].append(f)
    return groups


def trajectory_changes(saved: dict[str, Any], current: dict[str, Any], saved_as: str) -> list[str]:
    """What `current` changes of the trajectory `saved` was on, one line per key; empty: it may continue it.
    The one rule for resuming (the run's config.json, a checkpoint's config). `saved_as` names `saved`.
    More epochs are allowed under a constant schedule only: onecycle's steps span the run's epochs."""
    changes = []
    for key in TRAJECTORY_KEYS:
        old, new = saved.get(key), current.get(key)
        if old == new:
            continue
        change = f"{key}: {old!r} in {saved_as}, {new!r} now"
        if key == "epochs" and isinstance(old, int) and isinstance(new, int):
            if new < old:
                change += " (fewer epochs than the run: stop earlier with --max-steps instead)"
            elif saved.get("schedule") == current.get("schedule") == "constant":
                continue  # a constant learning rate simply goes on
            else:
                change += (f" (the {saved.get('schedule')} schedule spans the run's {old} epochs and its learning"
                           f" rate already decays to its end there; only a constant schedule can be extended)")
        changes.append(change)
    return changes


def field_docs() -> dict[str, str]:
    """Each TrainConfig field's help text (its metadata), `%` escaped for argparse."""
    return {f.name: f.metadata["help"].replace("%", "%%") for f in dataclasses.fields(TrainConfig)}


def recipe_values(recipe: str, model: str) -> dict[str, Any]:
    """The hyper-parameters a recipe stands for."""
    if recipe == "tutorial":
        # The beginner tutorial, as written: plain SGD, lr 0.01, batch 100, 10 epochs, ToTensor scaling.
        return dict(epochs=10, batch_size=100, lr=0.01, optimizer="sgd", momentum=0.0, weight_decay=0.0,
                    schedule="constant", label_smoothing=0.0, normalize="unit", precision="fp32")
    if model == "mlp":
        # AdamW + one-cycle: 98.6% on the MLP in 6 epochs (CPU, 1 rank; 8 epochs: 98.7%, 5: 98.5%).
        return dict(epochs=6, batch_size=512, lr=3e-3, optimizer="adamw", momentum=0.0, weight_decay=0.05,
                    schedule="onecycle", label_smoothing=0.1, normalize="standard", precision="auto")
    # The same for the CNN: 99.46% in 4 epochs (CPU, 1 rank; 99.37% after epoch 2).
    return dict(epochs=4, batch_size=256, lr=3e-3, optimizer="adamw", momentum=0.0, weight_decay=0.05,
                schedule="onecycle", label_smoothing=0.1, normalize="standard", precision="auto")


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"--{name} {value!r} is not valid; choose one of {', '.join(allowed)}")


def _positive(name: str, value: Any) -> None:
    # math.isfinite: argparse turns "inf" and "nan" into floats, and neither is a usable size or timeout.
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"--{name} must be a positive number, got {value!r}")
