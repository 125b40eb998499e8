"""What the loop measures: training time, the epoch's loss (checked: NaN or infinite ends the job) and
throughput (Meter), and the recent per-step losses, kept on the device until they are read (LossWindow).
Host-device syncs are marked `SYNC`."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ddp_mnist.errors import NonFiniteLossError
from ddp_mnist.parallel.collectives import all_reduce
from ddp_mnist.parallel.device import synchronize
from ddp_mnist.training.state import ADDED_LATER, NOT_SAVED, SavedFields


@dataclass
class Meter(SavedFields):
    """Only time spent in training steps counts: the loop opens a window before its steps and closes it
    (one SYNC) before it evaluates, checkpoints or stops. The totals are checkpoint entries (state.py);
    the steady-state clock is this process's own: it starts after the process's first `warmup_steps`
    steps (start-up, allocator, caches, graph capture), on every start and restart."""

    device: torch.device = field(metadata=NOT_SAVED)
    warmup_steps: int = field(metadata=NOT_SAVED)
    train_seconds: float = 0.0
    time_to_target: float | None = None  # train_seconds when the test accuracy first reached the target
    epoch_loss_sum: float = 0.0  # this epoch's per-step losses, summed over steps and ranks
    epoch_seconds: float = 0.0
    skipped_steps: int = 0  # fp16: steps the gradient scaler skipped (the gradients overflowed)
    steady_seconds: float = field(default=0.0, metadata=ADDED_LATER)
    steady_steps: int = field(default=0, metadata=ADDED_LATER)
    steps_this_process: int = field(default=0, metadata=NOT_SAVED)
    steady_since: float | None = field(default=None, metadata=NOT_SAVED)
    window_started: float = field(default=0.0, metadata=NOT_SAVED)

    def sync_clock(self) -> float:
        synchronize(self.device)  # SYNC: read the clock only after the GPU has finished the work
        return time.perf_counter()

    def open_window(self) -> None:
        self.window_started = time.perf_counter()

    def close_window(self) -> None:
        """Add the time since open_window to the totals (and to steady_seconds once steady)."""
        now = self.sync_clock()
        elapsed = now - self.window_started
        if self.steady_since is not None:
            self.steady_seconds += now - max(self.window_started, self.steady_since)
        self.epoch_seconds += elapsed
        self.train_seconds += elapsed

    def count_step(self) -> None:
        self.steps_this_process += 1
        if self.steady_since is not None:
            self.steady_steps += 1
        elif self.steps_this_process == self.warmup_steps:
            self.steady_since = self.sync_clock()

    def add_losses(self, window: LossWindow, fp16: bool, epoch: int) -> tuple[float, int]:
        """Read the window's losses (one SYNC) and agree across ranks on the first NaN or infinite one (an
        error naming its step); add them to the epoch's sum. Returns their sum over ranks and this rank's count."""
        first_step, values = window.drain()
        bad = [first_step + i + 1 for i, v in enumerate(values) if not math.isfinite(v)]
        if fp16 and len(bad) < len(values):
            bad = []  # fp16: the gradient scaler skips overflowing steps (counted in skipped_steps)
        # One all-reduce: the sum of losses, and the earliest bad step as a max of its negation.
        total, worst = all_reduce(
            [sum(v for v in values if math.isfinite(v)), -float(bad[0]) if bad else -math.inf],
            self.device,
            ops=("sum", "max"),
        )
        if math.isfinite(worst):
            raise NonFiniteLossError(
                f"the training loss became NaN or infinite at step {int(-worst)} (epoch {epoch + 1}); "
                f"lower --lr, use --grad-clip, or change --precision"
            )
        self.epoch_loss_sum += total
        return total, len(values)

    def note_accuracy(self, accuracy: float, target: float) -> None:
        if self.time_to_target is None and accuracy >= target:
            self.time_to_target = self.train_seconds

    def start_epoch(self) -> None:
        self.epoch_loss_sum, self.epoch_seconds = 0.0, 0.0

    # Throughput, in samples per second.
    def epoch_throughput(self, samples: int) -> float:
        return samples / max(self.epoch_seconds, 1e-9)

    def throughput(self, samples: int) -> float:
        return samples / max(self.train_seconds, 1e-9)

    def steady_throughput(self, batch_size: int) -> float | None:
        if self.steady_steps and self.steady_seconds > 0:
            return self.steady_steps * batch_size / self.steady_seconds
        return None

    def epoch_metrics(
        self,
        epoch: int,
        global_step: int,
        steps: int,
        batch_size: int,
        world_size: int,
        lr: float,
        test: dict[str, float],
    ) -> dict[str, Any]:
        """One line of metrics.jsonl (and of the tracker's epoch/ charts) at the end of epoch `epoch` (0-based),
        after its `steps` steps."""
        global_sps = self.epoch_throughput(steps * batch_size)
        row = {
            "epoch": epoch + 1,
            "global_step": global_step,
            "train_loss": self.epoch_loss_sum / max(steps * world_size, 1),  # already summed over ranks
            "epoch_seconds": self.epoch_seconds,
            "train_seconds": self.train_seconds,
            "samples_per_second": global_sps,
            "samples_per_second_per_rank": global_sps / world_size,
            "lr": lr,
            **test,
        }
        if self.device.type == "cuda":
            row["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        return row


class LossWindow:
    """The last few per-step losses, kept on the device and read (one SYNC) only when checked."""

    def __init__(self, size: int, device: torch.device):
        self.buffer = torch.zeros(size, device=device)
        self.count, self.first_step = 0, 0

    @property
    def full(self) -> bool:
        return self.count == len(self.buffer)

    def add(self, loss: torch.Tensor, step: int) -> None:
        if self.count == 0:
            self.first_step = step
        self.buffer[self.count] = loss  # a device-side copy, no sync
        self.count += 1

    def drain(self) -> tuple[int, list[float]]:
        values = self.buffer[: self.count].tolist() if self.count else []  # SYNC
        self.count = 0
        return self.first_step, values
