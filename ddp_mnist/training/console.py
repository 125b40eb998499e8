"""What rank 0 prints about a training job: its first line, the progress bar, a line per epoch, the last line.
Other ranks print only warnings and errors (train.setup_logging)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ddp_mnist import __version__
from ddp_mnist.config.train_config import TrainConfig
from ddp_mnist.training.evaluation import format_accuracy
from ddp_mnist.training.stragglers import slow_text

if TYPE_CHECKING:
    from ddp_mnist.training.trainer import Trainer

log = logging.getLogger("ddp_mnist")


def log_start(trainer: Trainer) -> None:
    cfg, env = trainer.cfg, trainer.env
    log.info(
        "ddp-mnist %s: %s/%s, world size %d (%s), %s, %s, %s data, global batch %d (%d per rank), "
        "%d epochs of %d steps -> %s",
        __version__,
        cfg.model,
        cfg.recipe,
        env.world_size,
        env.launcher,
        trainer.device,
        trainer.settings.precision,
        trainer.settings.data_path,
        cfg.batch_size,
        trainer.rank_batch,
        cfg.epochs,
        cfg.steps_per_epoch,
        trainer.run.path,
    )


def progress_bar(cfg: TrainConfig, epoch: int, start: int, is_main: bool):
    """Rank 0's bar, on stderr: by default only on a terminal (a batch job's log would fill with redrawn bars)."""
    from tqdm import tqdm

    interactive = sys.stderr.isatty()
    show = is_main and (cfg.progress if cfg.progress is not None else interactive)
    return tqdm(
        total=cfg.steps_per_epoch,
        initial=start,
        desc=f"epoch {epoch + 1}/{cfg.epochs}",
        unit="step",
        leave=False,
        dynamic_ncols=True,
        mininterval=0.2 if interactive else 30,
        disable=not show,
    )


def log_step_line(step: int, steps: int, loss: float, lr: float) -> None:
    """--step-lines: one line every --log-every steps (for logs, where no progress bar is drawn)."""
    log.info("step %d/%d  loss %.4f  lr %.2e", step, steps, loss, lr)


def log_epoch(epoch: int, epochs: int, row: dict[str, Any]) -> None:
    """The end of epoch `epoch` (0-based), from its metrics.jsonl row."""
    test = f"test acc {format_accuracy(row['test_accuracy'])}" if "test_accuracy" in row else "(no eval)"
    slow = f"  slow: {slow_text(row['slow_ranks'])}" if row.get("slow_ranks") else ""
    log.info(
        "epoch %d/%d  loss %.4f  %s  %s samples/s  %.2f s%s",
        epoch + 1,
        epochs,
        row["train_loss"],
        test,
        f"{row['samples_per_second']:,.0f}",
        row["epoch_seconds"],
        slow,
    )


def log_done(results: dict[str, Any], skipped_steps: int, steps: int, results_file: Path) -> None:
    if skipped_steps:
        log.info(
            "fp16: the gradient scaler skipped %d of %d steps (gradients overflowed; the scale was lowered)",
            skipped_steps,
            steps,
        )
    log.info(
        "done: test accuracy %s, %.1f s training, %s samples/s -> %s",
        format_accuracy(results["test_accuracy"]),
        results["train_seconds"],
        f"{results['samples_per_second']:,.0f}",
        results_file,
    )
