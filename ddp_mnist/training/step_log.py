"""What the loop reports every --log-every steps, when its loss window is read (that read is the window's one
host sync, so the timing below adds none): the mean loss, the learning rate, samples/s over the window (the
steps' wall time, evaluations and checkpoints between them left out), achieved TFLOP/s and MFU where the peak
is known. To the trackers (W&B, TensorBoard), the progress bar, `RUN/steps.jsonl` (rank 0; metrics.jsonl keeps
one line per epoch) and, with --step-lines, the console.
"""

from __future__ import annotations

from typing import Any

from ddp_mnist.artifacts.run_dir import RunDir
from ddp_mnist.training.console import log_step_line
from ddp_mnist.training.profiling import achieved_flops, model_flops, peak_tflops


class StepLog:
    def __init__(self, trainer: Any) -> None:
        cfg, self.env = trainer.cfg, trainer.env
        self.run: RunDir = trainer.run
        self.clock = trainer.clock  # rank_files.StepClock: busy_s, the steps' time
        self.batch, self.total_steps, self.step_lines = cfg.batch_size, cfg.total_steps, cfg.step_lines
        self.flops = model_flops(cfg.model)  # by name: never the (wrapped) training model
        self.peak = peak_tflops(trainer.device, cfg.peak_tflops)
        self._mark = (self.clock.busy_s, trainer.state.global_step)  # the previous report's

    def report(self, mean_loss: float, lr: float, epoch: int, global_step: int, tracker, progress) -> None:
        busy, rate = self.clock.busy_s, None
        if global_step > self._mark[1] and busy > self._mark[0]:
            rate = (global_step - self._mark[1]) * self.batch / (busy - self._mark[0])
        self._mark = (busy, global_step)
        speed = achieved_flops(self.flops, rate, self.env.world_size, self.peak)
        row: dict[str, Any] = {
            "global_step": global_step,
            "epoch": epoch + 1,
            "loss": mean_loss,
            "lr": lr,
            "samples_per_second": rate,
            "achieved_tflops": speed["achieved_tflops"],
            "mfu": speed.get("mfu"),
        }
        if self.env.is_main:
            self.run.append_step(row)
        tracker.log({f"train/{key}": value for key, value in row.items() if value is not None})
        progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", refresh=False)
        if self.step_lines:
            log_step_line(global_step, self.total_steps, mean_loss, lr)
