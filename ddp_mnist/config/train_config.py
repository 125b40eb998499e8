"""Training configuration: one typed dataclass, each field with its help, group and allowed values.

A recipe (options.py) fills in the hyper-parameters the user did not set; explicit flags always win. The
checks with clear errors are validation.py's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ddp_mnist.config.options import (
    BACKENDS,
    COMM_HOOKS,
    CUDA_GRAPH_MODES,
    DATA_DIR_SHOWN,
    DATA_PATHS,
    DEVICES,
    MODELS,
    NORMALIZATIONS,
    OPTIMIZERS,
    PRECISIONS,
    RECIPE,
    RECIPES,
    REQUEUE_SIGNAL_CHOICES,
    SCHEDULES,
    STRATEGIES,
    TARGET_ACCURACY,
    TARGET_ACCURACY_SHOWN,
    TRAIN_SAMPLES,
    WANDB_MODES,
    current_keys,
    option,
    recipe_values,
)
from ddp_mnist.config.validation import check_world_size, validate
from ddp_mnist.errors import ConfigError
from ddp_mnist.files import write_json_atomic


@dataclass
class TrainConfig:
    """Everything that defines one training job. Saved as `config.json` in the run folder.

    The fields are flat (`cfg.batch_size`; config.json's keys are the flags' names) and sorted into
    sections, the groups of `ddp-mnist train --help` (GROUPS; each field's group is its metadata):
    model and recipe (network, recipe, length, global batch, seed, determinism); optimization; precision and
    speed (number format, data path, CUDA-graph step); data; distributed (device, backend, timeouts, SLURM's
    signal); run folder and checkpoints; tracking (evaluation, logging, heartbeats, slow ranks, W&B); advanced
    (knobs for tests and benchmarks).
    A field whose default is None is filled in by `resolved()`: from the recipe (`default: recipe` in
    the help), or from its own rule (the help says which).
    """

    # ------------------------------------------------------------------ model and recipe
    model: str = option(
        "mlp",
        "Network: `mlp` (the tutorial's 784-500-256-10 ReLU net) or `cnn` (a small conv net).",
        group="model and recipe",
        choices=MODELS,
    )
    recipe: str = option(
        "fast",
        "Hyper-parameter preset: `tutorial` (as written: SGD lr 0.01, batch 100, 10 epochs, fp32) or `fast`.",
        group="model and recipe",
        choices=RECIPES,
    )
    epochs: int | None = option(None, "Passes over the 60,000 training images.", group="model and recipe", shown=RECIPE)
    max_steps: int | None = option(
        None,
        "Stop after this many optimizer steps in total (for tests and quick checks).",
        group="model and recipe",
        shown="no limit",
    )
    batch_size: int | None = option(
        None,
        "GLOBAL batch per optimizer step; each of the N ranks takes batch_size / N.",
        group="model and recipe",
        shown=RECIPE,
    )
    seed: int = option(
        0,
        "Seeds the model init and every epoch's permutation. Same seed + global batch = same training.",
        group="model and recipe",
    )
    deterministic: bool = option(
        False,
        "Deterministic kernels everywhere (cuDNN, cuBLAS, oneDNN): bit-identical runs on a GPU too; an operation"
        " with no deterministic version is an error naming it. The CPU path is deterministic without it.",
        group="model and recipe",
    )

    # ------------------------------------------------------------------ optimization
    optimizer: str | None = option(None, "`sgd` or `adamw`.", group="optimization", choices=OPTIMIZERS, shown=RECIPE)
    lr: float | None = option(None, "Peak learning rate.", group="optimization", shown=RECIPE)
    momentum: float | None = option(
        None, "SGD momentum (0 = plain SGD, as in the tutorial).", group="optimization", shown=RECIPE
    )
    weight_decay: float | None = option(None, "Decoupled weight decay.", group="optimization", shown=RECIPE)
    schedule: str | None = option(
        None,
        "Learning-rate schedule: `constant` or `onecycle` (per step).",
        group="optimization",
        choices=SCHEDULES,
        shown=RECIPE,
    )
    label_smoothing: float | None = option(
        None, "CrossEntropyLoss label smoothing.", group="optimization", shown=RECIPE
    )
    grad_clip: float = option(
        0.0,
        "Clip the global gradient norm to this value (0 = off). With fp16, gradients are unscaled first.",
        group="optimization",
    )
    grad_accum: int = option(
        1, "Micro-batches per optimizer step; inner steps skip DDP's all-reduce (`no_sync`).", group="optimization"
    )

    # ------------------------------------------------------------------ precision and speed
    precision: str | None = option(
        None,
        "`fp32`, `bf16` (autocast), `fp16` (autocast + gradient scaler) or `auto` (bf16 on CUDA, fp32 on CPU,"
        " where bf16 autocast is slower than fp32).",
        group="precision and speed",
        choices=PRECISIONS,
        shown=RECIPE,
    )
    data_path: str = option(
        "auto",
        "`loader` (DataLoader + DistributedSampler), `resident` (whole set on the device) or `auto` (resident:"
        " the same batches; the loader is the bottleneck on CUDA and costs up to 13% of a bf16 step on a CPU).",
        group="precision and speed",
        choices=DATA_PATHS,
    )
    cuda_graph: str = option(
        "auto",
        "Capture the training step as one CUDA graph, replayed every step: `auto` (on CUDA with the resident"
        " path), `on` (say so when it cannot), `off`.",
        group="precision and speed",
        choices=CUDA_GRAPH_MODES,
    )

    # ------------------------------------------------------------------ data
    data_dir: str | None = option(None, "Folder holding `MNIST/raw/`.", group="data", shown=DATA_DIR_SHOWN)
    download: bool = option(
        False,
        "Download MNIST with torchvision into the data folder (--data-dir, $DDP_MNIST_DATA, else ./data) when"
        " it lacks the files (needs network access). Off: nothing touches the network.",
        group="data",
    )
    num_workers: int = option(0, "DataLoader worker processes per rank (loader path only).", group="data")
    normalize: str | None = option(
        None,
        "Input scaling: `unit` (pixels / 255, like ToTensor) or `standard` (MNIST mean/std).",
        group="data",
        choices=NORMALIZATIONS,
        shown=RECIPE,
    )

    # ------------------------------------------------------------------ distributed
    device: str = option("auto", "`auto` (CUDA when available), `cpu` or `cuda`.", group="distributed", choices=DEVICES)
    backend: str = option(
        "auto",
        "Process-group backend: `auto` (nccl with CUDA, gloo on CPU), `gloo` or `nccl`.",
        group="distributed",
        choices=BACKENDS,
    )
    timeout_s: float = option(
        300.0,
        "Collective timeout in seconds: a rank that waits longer on the others fails with an error.",
        group="distributed",
    )
    expected_world_size: int | None = option(
        None,
        "Fail if the launcher started a different number of processes (catches silent mis-launches).",
        group="distributed",
        shown="any",
    )
    watch_time_limit: bool = option(
        True,
        "Watch the job's end time (SLURM's, or $DDP_MNIST_END_TIME in Unix seconds): checkpoint and requeue before"
        " it, as on the warning signal, also when the job was submitted without one (sbatch --signal).",
        group="distributed",
    )
    time_limit_margin_s: float = option(
        60.0, "Seconds left before the job's end when the time-limit checkpoint is written.", group="distributed"
    )
    requeue_signal: str = option(
        "USR1",
        "The warning signal that means: checkpoint, then requeue the SLURM job (SLURM's `--signal`). `USR1` or"
        " `USR2` (where NCCL or the site owns USR1); the batch scripts in slurm/ pass $REQUEUE_SIGNAL here.",
        group="distributed",
        choices=REQUEUE_SIGNAL_CHOICES,
    )
    strategy: str = option(
        "ddp",
        "How the ranks share the model: `ddp` (DistributedDataParallel: every rank holds everything), `zero1`"
        " (DDP + ZeroRedundancyOptimizer: optimizer state split over the ranks) or `fsdp` (FSDP2 fully_shard per"
        " layer: parameters, gradients and optimizer state split). Checkpoints hold the full state for each.",
        group="distributed",
        choices=STRATEGIES,
    )
    comm_hook: str = option(
        "none",
        "DDP communication hook (ddp, zero1): `none` (all-reduce fp32 gradients), `fp16` / `bf16` (compress"
        " gradients to 16 bits for the all-reduce) or `powersgd` (low-rank compression with error feedback).",
        group="distributed",
        choices=COMM_HOOKS,
    )
    powersgd_rank: int = option(
        4,
        "PowerSGD's matrix approximation rank (--comm-hook powersgd). The fast recipe on 2 ranks, compressing"
        " from step 101: 98.4% with rank 4, 97.1% with torch's default rank 1.",
        group="distributed",
    )
    powersgd_start_step: int = option(
        100,
        "Optimizer steps of plain all-reduce before PowerSGD starts compressing (--comm-hook powersgd; at least"
        " 2; torch's default of 1,000 is past the fast recipe's last step).",
        group="distributed",
    )
    bucket_cap_mb: float = option(25.0, "DDP gradient bucket size in MiB (DDP's bucket_cap_mb).", group="distributed")
    static_graph: bool = option(
        False, "Tell DDP the set of used parameters never changes (DDP's static_graph).", group="distributed"
    )
    gradient_as_bucket_view: bool = option(
        False,
        "Gradients are views into DDP's all-reduce buckets (saves one gradient copy per rank).",
        group="distributed",
    )

    # ------------------------------------------------------------------ run folder and checkpoints
    run_dir: str | None = option(
        None,
        "The run folder: config, metrics, checkpoints, results, logs. A named folder is never overwritten.",
        group="run folder and checkpoints",
        shown="a new runs/<date>-<time>-<model>-<recipe>, linked as runs/latest",
    )
    resume: bool = option(
        False,
        "Continue a run from its newest good checkpoint (start fresh if it has none), with the settings in its"
        " config.json: no flag needs retyping; flags given again may change what does not alter the training"
        " (e.g. --max-steps, --checkpoint-every, --data-dir). `--resume` alone: the run in --run-dir, else"
        " runs/latest; `--resume RUN`: that run folder (or a checkpoint in it).",
        group="run folder and checkpoints",
    )
    checkpoint_every: int = option(
        0,
        "Also checkpoint every N optimizer steps (0 = only at the end of each epoch).",
        group="run folder and checkpoints",
    )
    keep_checkpoints: int = option(
        3,
        "How many checkpoints to keep in the run folder (older ones are deleted).",
        group="run folder and checkpoints",
    )

    # ------------------------------------------------------------------ tracking
    eval_every: int = option(
        1, "Evaluate on the test set every N epochs (the last epoch is always evaluated).", group="tracking"
    )
    target_accuracy: float | None = option(
        None,
        "Report the training time at which test accuracy first reached this percentage.",
        group="tracking",
        shown=TARGET_ACCURACY_SHOWN,
    )
    log_every: int = option(50, "Log the loss and lr every N steps (W&B, bar, --step-lines).", group="tracking")
    heartbeat_s: float = option(
        5.0,
        "Rewrite this rank's heartbeat file, RUN/ranks/rank-N.json (step, phase, pace; read by `ddp-mnist"
        " status`), every S seconds; 0 writes none.",
        group="tracking",
    )
    slow_rank_threshold: float = option(
        0.2,
        "Name a rank whose own work per step (its waits left out) is over this fraction above the others' median"
        " in two epochs in a row (epoch line, metrics.jsonl, W&B, `ddp-mnist status`); 0: off.",
        group="tracking",
    )
    slow_rank_seconds: float = option(
        30.0,
        "Name a slow rank only after this many seconds of training in a row over the threshold (not a burst).",
        group="tracking",
    )
    progress: bool | None = option(
        None,
        "Rank 0's progress bar. Default: on a terminal only; into a log file (a batch job's) the epoch lines"
        " and --step-lines say how far it is. `--progress` draws it anyway (every 30 s), `--no-progress` never.",
        group="tracking",
        shown="on a terminal",
    )
    step_lines: bool = option(False, "Print a line every --log-every steps: step, loss, lr.", group="tracking")
    wandb: bool = option(False, "Log to Weights & Biases (rank 0 only). Needs `pip install wandb`.", group="tracking")
    tensorboard: bool = option(False, "Log the same to RUN/tensorboard/ (rank 0). Needs tensorboard.", group="tracking")
    wandb_project: str | None = option(None, "W&B project.", group="tracking", shown="$WANDB_PROJECT, else ddp-mnist")
    wandb_entity: str | None = option(
        None, "W&B entity.", group="tracking", shown="$WANDB_ENTITY, else your default entity"
    )
    wandb_group: str | None = option(
        None, "W&B group, e.g. one scaling sweep.", group="tracking", shown="$WANDB_RUN_GROUP, else none"
    )
    wandb_name: str | None = option(None, "W&B run name.", group="tracking", shown="W&B's")
    wandb_tags: list[str] = option(
        help="W&B tags, comma-separated.", default_factory=list, group="tracking", shown="none"
    )
    wandb_mode: str | None = option(
        None,
        "`online`, `offline` or `disabled`.",
        group="tracking",
        choices=WANDB_MODES,
        shown="$WANDB_MODE; offline when there is no API key or network",
    )
    profile: int = option(
        0,
        "Profile this many training steps on rank 0 (after 2 warm-up steps) with torch.profiler: trace.json in"
        " the run folder (Chrome/Perfetto; also a W&B file), a summary of all-reduce against compute in"
        " results.json. 0: off.",
        group="tracking",
    )
    peak_tflops: float | None = option(
        None,
        "The device's peak TFLOP/s, for MFU (achieved / peak) in results.json.",
        group="tracking",
        shown="known GPUs' dense bf16 peak (H100/H200 989, A100 312, ...); no MFU on a CPU",
    )

    # ------------------------------------------------------------------ advanced
    throughput_warmup_steps: int = option(
        20,
        "Steps at the start of each process left out of `steady_samples_per_second` (results.json): they "
        "include start-up costs (allocator, caches, data workers, CUDA graph capture).",
        group="advanced",
    )
    stop_check_every: int | None = option(
        None,
        "Agree across ranks on pending stop signals every N steps (one tiny all-reduce and a host sync).",
        group="advanced",
        shown="about every 0.1 s of steps on the CPU (from the step's FLOPs: 21 steps for the MLP at batch 100), "
        "every 50 steps on CUDA, where a sync per step would stall the GPU",
    )
    pause_at_step: int | None = option(
        None,
        "Testing: at this step, wait until a stop signal arrives (so a test can signal a job mid-training"
        " without racing it).",
        group="advanced",
        shown="never",
    )

    # ------------------------------------------------------------------ resolution
    def resolved(self) -> TrainConfig:
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
        validate(self)  # validation.py

    def check_world_size(self, world_size: int) -> None:
        """The global batch must split evenly over the ranks (and their micro-batches)."""
        check_world_size(self, world_size)

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
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """A config from its dict (config.json, a checkpoint's `config`); keys renamed since then still read."""
        values = current_keys(values)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}; this config was written by another version")
        return cls(**values)

    def save(self, path: Path) -> None:
        write_json_atomic(path, self.to_dict(), durable=True)
