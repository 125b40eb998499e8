"""What a TrainConfig may hold: each value in its range, the combinations that can run, the batch that fits a
world size, and which changes would change the trajectory of a run being resumed."""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import TYPE_CHECKING, Any

from ddp_mnist.config.options import RECIPE, TRAIN_SAMPLES
from ddp_mnist.errors import ConfigError

if TYPE_CHECKING:
    from ddp_mnist.config.train_config import TrainConfig

# The range of every number a user can give (inclusive), checked with the config (validate) before any work,
# whether the number came from a flag, a config file or code. Wide enough for any real job, narrow enough
# that no value overflows what it is passed to (a C++ int64, a timedelta, numpy's 32-bit seed, an allocation).
STEPS = 10**9  # more optimizer steps than any MNIST run takes
RANGES: dict[str, tuple[float, float]] = {
    "epochs": (1, 100_000),
    "max_steps": (1, STEPS),
    "batch_size": (1, TRAIN_SAMPLES),
    "seed": (0, 2**32 - 1),  # numpy's RandomState (PowerSGD's) takes 32 bits
    "lr": (0, 1e6),
    "momentum": (0, 1),
    "weight_decay": (0, 1e6),
    "label_smoothing": (0, 1),
    "grad_clip": (0, 1e9),
    "grad_accum": (1, TRAIN_SAMPLES),
    "num_workers": (0, 256),
    "timeout_s": (0, 10**7),  # about 115 days; datetime.timedelta overflows near 1e14
    "expected_world_size": (1, 1_000_000),
    "time_limit_margin_s": (0, 10**7),
    "powersgd_rank": (1, 10_000),
    "powersgd_start_step": (2, STEPS),
    "bucket_cap_mb": (0, 1e6),  # DDP turns it into bytes in a C++ int64
    "checkpoint_every": (0, STEPS),
    "keep_checkpoints": (1, 1_000_000),
    "eval_every": (1, 100_000),
    "target_accuracy": (0, 100),
    "log_every": (1, 1_000_000),  # each loss window holds log_every losses on the device
    "profile": (0, 1_000_000),
    "peak_tflops": (0, 1e9),
    "throughput_warmup_steps": (1, STEPS),
    "stop_check_every": (1, 1_000_000),
    "heartbeat_s": (0, 86_400),
    "slow_rank_threshold": (0, 100),
    "slow_rank_seconds": (0, 10**7),
    "pause_at_step": (1, STEPS),
}


def check_range(name: str, value: Any, integer: bool) -> None:
    """`value` is a finite number (an integer when `integer`) within RANGES[name]; else a ConfigError naming the
    flag, its range and the value."""
    problem = out_of_range(value, *RANGES[name], integer=integer)
    if problem:
        raise ConfigError(f"--{name.replace('_', '-')} {problem}, got {value!r}")


def out_of_range(value: Any, low: float, high: float, integer: bool) -> str | None:
    """What is wrong with `value` as a finite number (an integer when `integer`) from `low` to `high`, inclusive:
    "must be an integer from 0 to 4,294,967,295"; None when it fits. The one range rule of configs and flags."""
    number = isinstance(value, int) if integer else isinstance(value, (int, float))
    if number and not isinstance(value, bool) and math.isfinite(value) and low <= value <= high:
        return None
    return f"must be {'an integer' if integer else 'a number'} from {shown_bound(low)} to {shown_bound(high)}"


def shown_bound(bound: float) -> str:
    """1e6 as 1,000,000 and 2**32 - 1 as 4,294,967,295, as a user would type them; 1e-06 as it is."""
    return f"{int(bound):,}" if float(bound).is_integer() and abs(bound) < 1e16 else f"{bound:g}"


def validate(cfg: TrainConfig) -> None:
    """Every value in its range, and the combinations that can run; the error says which and how to fix it."""
    for f in dataclasses.fields(cfg):  # the allowed values are each field's metadata (`choices`)
        value = getattr(cfg, f.name)
        own_rule = value is None and f.metadata["shown"] != RECIPE  # e.g. --wandb-mode unset: $WANDB_MODE
        if f.metadata["choices"] and not own_rule:
            _choice(f.name.replace("_", "-"), value, f.metadata["choices"])
    _positive("bucket-cap-mb", cfg.bucket_cap_mb)
    _positive("powersgd-rank", cfg.powersgd_rank)
    if not isinstance(cfg.powersgd_start_step, int) or cfg.powersgd_start_step < 2:
        # PowerSGD's error feedback and warm start need at least one plain all-reduce before compressing.
        raise ConfigError(f"--powersgd-start-step must be an integer >= 2, got {cfg.powersgd_start_step!r}")
    if cfg.strategy == "fsdp" and cfg.comm_hook != "none":
        raise ConfigError(
            f"--comm-hook {cfg.comm_hook} is a DDP communication hook and does not apply to "
            f"--strategy fsdp (FSDP reduce-scatters its own gradients); use --comm-hook none, "
            f"or --strategy ddp or zero1"
        )
    _positive("epochs", cfg.epochs)
    _positive("batch-size", cfg.batch_size)
    _positive("grad-accum", cfg.grad_accum)
    _positive("keep-checkpoints", cfg.keep_checkpoints)
    _positive("eval-every", cfg.eval_every)
    _positive("log-every", cfg.log_every)
    _positive("throughput-warmup-steps", cfg.throughput_warmup_steps)
    if cfg.stop_check_every is not None:
        _positive("stop-check-every", cfg.stop_check_every)
    _positive("timeout-s", cfg.timeout_s)
    if cfg.pause_at_step is not None:
        _positive("pause-at-step", cfg.pause_at_step)
    if cfg.max_steps is not None:
        _positive("max-steps", cfg.max_steps)
    if cfg.expected_world_size is not None:
        _positive("expected-world-size", cfg.expected_world_size)
    if not (0 < cfg.lr < math.inf):
        raise ConfigError(f"--lr must be a positive number, got {cfg.lr}")
    for name in ("momentum", "label_smoothing"):
        value = getattr(cfg, name)
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"--{name.replace('_', '-')} must be in [0, 1), got {value}")
    for name in ("weight_decay", "grad_clip"):
        if not 0 <= getattr(cfg, name) < math.inf:  # also rejects nan
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if cfg.checkpoint_every < 0:
        raise ConfigError(f"--checkpoint-every must be >= 0 (0 = per epoch only), got {cfg.checkpoint_every}")
    if cfg.num_workers < 0:
        raise ConfigError(f"--num-workers must be >= 0, got {cfg.num_workers}")
    if not 0.0 < cfg.target_accuracy <= 100.0:
        raise ConfigError(f"--target-accuracy is a percentage in (0, 100], got {cfg.target_accuracy}")
    if cfg.batch_size > TRAIN_SAMPLES:
        raise ConfigError(f"--batch-size {cfg.batch_size} is larger than the {TRAIN_SAMPLES:,} training images")
    if cfg.batch_size % cfg.grad_accum:
        raise ConfigError(f"--batch-size {cfg.batch_size} is not divisible by --grad-accum {cfg.grad_accum}")
    if cfg.profile < 0:
        raise ConfigError(f"--profile must be >= 0 (0 = off), got {cfg.profile}")
    if cfg.peak_tflops is not None:
        _positive("peak-tflops", cfg.peak_tflops)
    _check_ranges(cfg)  # after the checks above: theirs are the more specific messages


def check_world_size(cfg: TrainConfig, world_size: int) -> None:
    """The global batch must split evenly over the ranks (and their micro-batches)."""
    if cfg.expected_world_size is not None and world_size != cfg.expected_world_size:
        raise ConfigError(
            f"the launcher started {world_size} process(es) but --expected-world-size is "
            f"{cfg.expected_world_size}; check the launcher's process count"
        )
    if world_size > TRAIN_SAMPLES:
        raise ConfigError(f"world size {world_size} is larger than the {TRAIN_SAMPLES:,} training images")
    per_step = world_size * cfg.grad_accum
    if cfg.batch_size % per_step:
        fits = [b for b in range(per_step, 4 * cfg.batch_size, per_step) if b >= cfg.batch_size][:1]
        hint = f" (e.g. --batch-size {fits[0]})" if fits else ""
        raise ConfigError(
            f"--batch-size {cfg.batch_size} is the GLOBAL batch and must be divisible by world size "
            f"{world_size} x grad-accum {cfg.grad_accum} = {per_step}; pick a multiple of {per_step}{hint}"
        )


# Keys that must match for a checkpoint to continue this job: they change what the trajectory is.
TRAJECTORY_KEYS = (
    "model",
    "epochs",
    "batch_size",
    "lr",
    "optimizer",
    "momentum",
    "weight_decay",
    "schedule",
    "label_smoothing",
    "normalize",
    "precision",
    "grad_clip",
    "grad_accum",
    "seed",
)


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
                change += (
                    f" (the {saved.get('schedule')} schedule spans the run's {old} epochs and its learning"
                    f" rate already decays to its end there; only a constant schedule can be extended)"
                )
        changes.append(change)
    return changes


def _check_ranges(cfg: TrainConfig) -> None:
    hints = typing.get_type_hints(type(cfg))
    for name in RANGES:
        value = getattr(cfg, name)
        if value is not None:  # None: the recipe's value, or the field's own rule (no limit, no pause)
            check_range(name, value, integer=int in typing.get_args(hints[name]) or hints[name] is int)


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"--{name} {value!r} is not valid; choose one of {', '.join(allowed)}")


def _positive(name: str, value: Any) -> None:
    # math.isfinite: argparse turns "inf" and "nan" into floats, and neither is a usable size or timeout.
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"--{name} must be a positive number, got {value!r}")


# Settings a rank may hold for itself: where it reads the data, how it shows progress, what rank 0 tells W&B.
# Every other setting defines the job: the ranks must agree on it (training/train.py checks at start-up).
PER_RANK_KEYS = (
    "data_dir",
    "download",
    "num_workers",
    "progress",
    "step_lines",
    "wandb",
    "wandb_project",
    "wandb_entity",
    "wandb_group",
    "wandb_name",
    "wandb_tags",
    "wandb_mode",
)


def job_settings(cfg: TrainConfig) -> dict[str, Any]:
    """The settings that define the job (resolved), as plain JSON values."""
    return {key: value for key, value in cfg.to_dict().items() if key not in PER_RANK_KEYS}


def rank_differences(per_rank: list[dict[str, Any]]) -> list[str]:
    """Where the ranks' job settings differ, one line per setting: `--lr: 0.01 on rank 0, 2; 0.02 on rank 1`."""
    lines = []
    for key in per_rank[0]:
        ranks_by_value: dict[str, list[int]] = {}
        for rank, settings in enumerate(per_rank):
            ranks_by_value.setdefault(repr(settings.get(key)), []).append(rank)
        if len(ranks_by_value) > 1:
            shown = "; ".join(
                f"{value} on rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks[:8]))}"
                + (f" and {len(ranks) - 8} more" if len(ranks) > 8 else "")
                for value, ranks in ranks_by_value.items()
            )
            lines.append(f"--{key.replace('_', '-')}: {shown}")
    return lines
