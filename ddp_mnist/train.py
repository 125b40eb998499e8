"""The training job: one entry point for every launcher.

Reads top to bottom: set up (environment, device, process group, data, model, optimizer), resume,
then epochs of steps, evaluation, metrics and checkpoints. Host-device syncs are marked `SYNC`.
"""

from __future__ import annotations

import logging
import math
import os
import random
import sys
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from . import __version__
from .capture import capture_blocker, choose_step, side_stream
from .checkpoint import CheckpointError, Checkpointer, load
from .config import ConfigError, TrainConfig
from .data import DataError, eval_shard, load_split, make_batches, prepare_mnist, to_input
from .distributed import (DistEnv, RankReports, all_reduce, any_rank, gather_to_main,
                          job_round, pick_backend, pick_device, process_group, run_on_main)
from .evaluation import evaluate
from .faults import fault_point
from .model import autocast_dtype, build_model, resolve_precision
from .run_dir import RunDir
from .signals import EXIT_PREEMPTED, StopSignals
from .strategy import Strategy, capture_blocker_of
from .tracking import check_tracking, environment_facts, make_tracker

log = logging.getLogger("ddp_mnist")


class TrainingStopped(Exception):
    """A stop signal was acted on: a checkpoint was written and the job should end (or requeue)."""

    def __init__(self, signal_name: str, requeue: bool, checkpoint):
        super().__init__(f"stopped by {signal_name} after writing {checkpoint}")
        self.signal_name, self.requeue, self.checkpoint = signal_name, requeue, checkpoint


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite: training cannot continue meaningfully."""


# Errors that explain themselves (exit status 2); any other error may come from a failed peer.
CLEAR_ERRORS = (ConfigError, DataError, CheckpointError, NonFiniteLossError)


def run_training(cfg: TrainConfig) -> dict[str, Any]:
    """The `train` entry point shared by every launcher. Returns results.json's contents."""
    env = DistEnv.from_environ()
    setup_logging(env)
    cfg = cfg.resolved()
    cfg.check_world_size(env.world_size)
    check_tracking(cfg)  # every rank, before any work: --wandb without wandb fails here
    device = pick_device(cfg.device, env)
    backend = pick_backend(cfg.backend, device)
    if backend == "nccl" and capture_plan(cfg, device, backend) is None:
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0")  # needed to capture NCCL calls
    with StopSignals(cfg.requeue_signal, talk=env.is_main) as signals, process_group(env, backend, device, cfg.timeout_s), \
            RankReports(env, timeout_s=cfg.timeout_s) as reports:
        try:
            return Trainer(cfg, env, device, backend, signals, reports).fit()
        except TrainingStopped:
            raise
        except Exception as error:
            # Tell the other ranks why this one stops; if a collective failed because of a peer, name it.
            peer_error = reports.explain(error, blame_peers=not isinstance(error, CLEAR_ERRORS))
            if peer_error is None:
                raise
            raise peer_error from error


def setup_logging(env: DistEnv) -> None:
    """Rank 0 talks; other ranks print only warnings and errors, tagged with their rank."""
    logging.basicConfig(stream=sys.stdout, force=True,
                        level=logging.INFO if env.is_main else logging.WARNING,
                        format="%(message)s" if env.is_main else f"[rank {env.rank}] %(levelname)s: %(message)s")


def continues_job(run: RunDir, env: DistEnv) -> bool:
    """Resume without --resume: this start is an elastic restart or a requeue of the job whose checkpoint is in
    the run folder. Rank 0 decides and every rank gets its answer (nodes can disagree on their restart counts)."""
    def decide() -> bool:
        return run.has_checkpoint() and (job_round(env).restarted or run.same_job(env.job_ids()))
    return run_on_main(decide)


def resolve_data_path(cfg: TrainConfig, device: torch.device) -> str:
    if cfg.data_path != "auto":
        return cfg.data_path
    return "resident" if device.type == "cuda" else "loader"  # on CUDA the per-batch loader is the bottleneck


def capture_plan(cfg: TrainConfig, device: torch.device, backend: str | None) -> str | None:
    """Why the step will not be captured as a CUDA graph (capture.py); None when it will be.
    `backend`: the process group's, or None without one."""
    return capture_blocker(cfg.compile, device, resolve_precision(cfg.precision, device), cfg.optimizer, cfg.schedule,
                           cfg.grad_accum, resolve_data_path(cfg, device), backend, capture_blocker_of(cfg))


def resolve_stop_check_every(cfg: TrainConfig, device: torch.device) -> int:
    """Each check is a tiny all-reduce read on the host: on CUDA that stalls the queue of queued steps."""
    return cfg.stop_check_every or (50 if device.type == "cuda" else 1)


class Trainer:
    """Owns the model, optimizer, scheduler, scaler and position; `state_dict` captures all of it."""

    def __init__(self, cfg: TrainConfig, env: DistEnv, device: torch.device, backend: str, signals: StopSignals,
                 reports: RankReports | None = None):
        self.cfg, self.env, self.device, self.backend, self.signals = cfg, env, device, backend, signals
        self.reports = reports or RankReports(env)  # `phase`: what this rank is doing, for the others' errors
        self.precision = resolve_precision(cfg.precision, device)
        self.data_path = resolve_data_path(cfg, device)

        # Data first: every rank checks the files, so bad data fails before the run folder is touched.
        self.reports.phase = "loading data"
        root = prepare_mnist(cfg.data_dir)
        self.run = RunDir(cfg.run_dir)
        self.resuming = cfg.resume or continues_job(self.run, env)
        run_on_main(self.run.prepare, cfg, self.resuming, env.job_ids())
        self.checkpointer = Checkpointer(self.run.checkpoints, cfg.keep_checkpoints, env.is_main)

        # This rank's share of the training batches; the test set is split without padding.
        self.rank_batch = cfg.batch_size // env.world_size
        self.batches = make_batches(self.data_path, load_split(root, train=True), env.rank, env.world_size,
                                    self.rank_batch, cfg.seed, device, cfg.num_workers)
        self.test = eval_shard(load_split(root, train=False), env.rank, env.world_size).to(device)

        # Model: the same seed on every rank gives the same initial weights (DDP also broadcasts rank 0's).
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg.model).to(device)
        self.capture_blocker = capture_plan(cfg, device, backend if dist.is_initialized() else None)
        self.side_stream = side_stream(self.capture_blocker is None, device)
        # DDP (with its hook), ZeRO-1 or FSDP2 (strategy.py): `wrapped` is what the step calls.
        self.strategy = Strategy(cfg, device)
        self.wrapped = self.strategy.wrap_model(self.model, self.side_stream)
        self.ddp = self.strategy.ddp
        if self.side_stream is not None:  # DDP broadcast rank 0's weights on that stream: wait for them
            torch.cuda.current_stream(device).wait_stream(self.side_stream)
        self.optimizer = self.strategy.wrap_optimizer(build_optimizer(cfg, self.model, device))
        self.scheduler = build_scheduler(cfg, self.optimizer)
        self.scaler = self.strategy.make_scaler(enabled=self.precision == "fp16")
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        self.autocast_dtype = autocast_dtype(self.precision)
        self.stop_check_every = resolve_stop_check_every(cfg, device)
        self.step = self.train_step  # or the captured step, chosen in fit() once the state is loaded
        self.capture_seconds: float | None = None
        torch.manual_seed(cfg.seed + env.rank)  # per-rank stream for anything random from here on

        # Position and running totals: all part of the checkpoint.
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.train_seconds, self.time_to_target = 0.0, None
        self.epoch_loss_sum, self.epoch_seconds = 0.0, 0.0
        self.skipped_steps = 0
        # Steady-state throughput: training time after each process's first throughput_warmup_steps steps.
        self.steady_seconds, self.steady_steps = 0.0, 0
        self.steady_since: float | None = None
        self.steps_this_process = 0
        self.tracker_run_id: str | None = None
        self.last_test: dict[str, float] = {}
        self.last_test_step: int | None = None  # the global step whose weights last_test scored
        self.best_accuracy: float | None = None  # best test accuracy so far: its weights are best.pt

    # ------------------------------------------------------------------ the job
    def fit(self) -> dict[str, Any]:
        self.resume()
        self.tracker = make_tracker(self.cfg, self.env.is_main, self.facts, self.run.tracker, self.tracker_run_id,
                                    self.resuming)
        self.tracker_run_id = self.tracker.run_id or self.tracker_run_id  # kept even if this attempt has no --wandb
        exit_code, preempting = 1, False
        try:
            self.log_start()
            # After resume: the graph is captured with the loaded state, and says in one line which step runs.
            self.step, self.capture_seconds = choose_step(
                self.train_step, self.capture_blocker, self.cfg.compile, self.model, self.optimizer,
                self.side_stream, self.rank_batch, self.device, self.env.is_main)
            while self.epoch < self.cfg.epochs and not self.reached_max_steps():
                self.train_epoch()
                if self.step_in_epoch == self.cfg.steps_per_epoch:
                    self.end_epoch()
            results = self.finish()
            exit_code = 0
            return results
        except TrainingStopped:
            exit_code, preempting = EXIT_PREEMPTED, True
            raise
        finally:
            self.tracker.finish(exit_code=exit_code, preempting=preempting)

    def reached_max_steps(self) -> bool:
        return self.cfg.max_steps is not None and self.global_step >= self.cfg.max_steps

    def train_epoch(self) -> None:
        """Steps from the current position to the end of the epoch (or a stop)."""
        cfg = self.cfg
        self.wrapped.train()
        progress = self.progress_bar(self.step_in_epoch)
        window = LossWindow(cfg.log_every, self.device)
        started = time.perf_counter()
        for images, labels in self.batches.epoch(self.epoch, self.step_in_epoch):
            self.reports.phase = f"train epoch {self.epoch + 1} step {self.global_step + 1}"
            loss = self.step(images, labels)
            self.scheduler.step()
            window.add(loss, self.global_step)
            self.step_in_epoch += 1
            self.global_step += 1
            self.count_steady_step()
            fault_point("step", self.global_step, self.env.rank, before=self.reports.publish)  # tests only
            progress.update(1)
            if window.full:
                self.check_losses(window, progress)
            if self.global_step == cfg.pause_at_step:
                self.wait_for_stop_signal()
            if self.global_step % self.stop_check_every == 0 and any_rank(self.signals.pending, self.device):
                self.stop(window, started)
            # The last step of an epoch or of the run is saved by end_epoch/finish: saving a step twice would
            # replace its good checkpoint, and a crash in between could leave none.
            if (cfg.checkpoint_every and self.global_step % cfg.checkpoint_every == 0
                    and self.step_in_epoch < cfg.steps_per_epoch and not self.reached_max_steps()):
                self.close_window(window, started)
                started = time.perf_counter()
                self.save_checkpoint()
            if self.reached_max_steps():
                break
        self.close_window(window, started)
        progress.close()

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One optimizer step on this rank's share of the global batch; returns the loss (on device)."""
        self.optimizer.zero_grad(set_to_none=True)
        chunks = list(zip(images.chunk(self.cfg.grad_accum), labels.chunk(self.cfg.grad_accum)))
        total = None
        for i, (x, y) in enumerate(chunks):
            last = i == len(chunks) - 1
            # Inner micro-batches skip the all-reduce; the last one all-reduces the summed gradients.
            with self.strategy.no_sync(sync=last):
                with torch.autocast(self.device.type, dtype=self.autocast_dtype,
                                    enabled=self.autocast_dtype is not None):
                    logits = self.wrapped(to_input(x, self.cfg.normalize))
                    loss = self.loss_fn(logits.float(), y)
                    if len(chunks) > 1:  # the summed micro-batch gradients are then the batch's mean
                        loss = loss / len(chunks)
                self.scaler.scale(loss).backward()
            total = loss.detach() if total is None else total + loss.detach()  # no extra kernels for 1 chunk
        if self.cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the fp16-scaled ones
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        if self.scaler.is_enabled():
            scale = self.scaler.get_scale()  # SYNC (fp16 only): a drop in scale means the step was skipped
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.skipped_steps += int(self.scaler.get_scale() < scale)
        else:
            self.optimizer.step()
        return total

    # ------------------------------------------------------------------ health, logging, stopping
    def check_losses(self, window: "LossWindow", progress=None) -> None:
        """Read the recent losses (one SYNC), agree across ranks on the first bad step, log the mean."""
        first_step, values = window.drain()
        bad = [first_step + i + 1 for i, v in enumerate(values) if not math.isfinite(v)]
        if self.precision == "fp16" and len(bad) < len(values):
            bad = []  # fp16: the gradient scaler skips overflowing steps (counted in skipped_steps)
        # One all-reduce: the sum of losses, and the earliest bad step as a max of its negation.
        total, worst = all_reduce(
            [sum(v for v in values if math.isfinite(v)), -float(bad[0]) if bad else -math.inf],
            self.device, ops=("sum", "max"))
        if math.isfinite(worst):
            raise NonFiniteLossError(
                f"the training loss became NaN or infinite at step {int(-worst)} (epoch {self.epoch + 1}); "
                f"lower --lr, use --grad-clip, or change --precision")
        self.epoch_loss_sum += total
        if not values or progress is None:
            return
        mean = total / (len(values) * self.env.world_size)
        lr = current_lr(self.optimizer)
        progress.set_postfix(loss=f"{mean:.4f}", lr=f"{lr:.2e}", refresh=False)
        self.tracker.log({"train/loss": mean, "train/lr": lr, "train/epoch": self.epoch + 1,
                          "train/global_step": self.global_step})

    def close_window(self, window: "LossWindow", started: float) -> None:
        """Account the steps since `started`: their time, and their losses (checked)."""
        now = self.sync_clock()
        elapsed = now - started
        if self.steady_since is not None:
            self.steady_seconds += now - max(started, self.steady_since)
        self.epoch_seconds += elapsed
        self.train_seconds += elapsed
        self.check_losses(window)

    def sync_clock(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()  # SYNC: read the clock only after the GPU has finished the work
        return time.perf_counter()

    def count_steady_step(self) -> None:
        """Steady state starts after this process's first steps (start-up, allocator, caches, graph capture):
        close_window adds the time since then to steady_seconds."""
        self.steps_this_process += 1
        if self.steady_since is not None:
            self.steady_steps += 1
        elif self.steps_this_process == self.cfg.throughput_warmup_steps:
            self.steady_since = self.sync_clock()

    def stop(self, window: "LossWindow", started: float) -> None:
        """Every rank got here at the same step: checkpoint, then end the job cleanly.
        Requeue when ANY rank got the warning signal (SLURM may signal some ranks before others)."""
        name = self.signals.name or "a stop signal on another rank"
        requeue = any_rank(self.signals.wants_requeue, self.device)
        log.info("%s received: checkpointing at step %d, then %s", name, self.global_step,
                 "requeueing" if requeue else "stopping")
        self.close_window(window, started)
        path = self.save_checkpoint()
        if requeue and self.env.slurm_job_id:
            # Before any rank exits (run_on_main: every rank waits for it): a rank that exits early can get
            # the others killed (srun --kill-on-bad-exit), and the batch script requeues from this file.
            run_on_main(self.run.mark_requeue, f"{name} at step {self.global_step}")
        raise TrainingStopped(name, requeue, path)

    def wait_for_stop_signal(self) -> None:
        """--pause-at-step (tests): every rank waits at this step until a stop signal reaches one of them."""
        log.info("paused at step %d until a stop signal arrives", self.global_step)
        while not any_rank(self.signals.pending, self.device):
            time.sleep(0.05)

    def progress_bar(self, start: int):
        from tqdm import tqdm

        interactive = sys.stderr.isatty()
        return tqdm(total=self.cfg.steps_per_epoch, initial=start, desc=f"epoch {self.epoch + 1}/{self.cfg.epochs}",
                    unit="step", leave=False, dynamic_ncols=True, mininterval=0.2 if interactive else 30,
                    disable=not (self.env.is_main and self.cfg.progress))

    # ------------------------------------------------------------------ epochs and evaluation
    def end_epoch(self) -> None:
        test = self.evaluate() if self.should_evaluate() else {}
        steps = self.step_in_epoch
        global_sps = steps * self.cfg.batch_size / max(self.epoch_seconds, 1e-9)
        train_loss = self.epoch_loss_sum / max(steps * self.env.world_size, 1)  # already summed over ranks
        row = {"epoch": self.epoch + 1, "global_step": self.global_step, "train_loss": train_loss,
               "epoch_seconds": self.epoch_seconds, "train_seconds": self.train_seconds,
               "samples_per_second": global_sps, "samples_per_second_per_rank": global_sps / self.env.world_size,
               "lr": current_lr(self.optimizer), **test}
        if self.device.type == "cuda":
            row["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        if test and self.time_to_target is None and test["test_accuracy"] >= self.cfg.target_accuracy:
            self.time_to_target = self.train_seconds
        if self.env.is_main:
            self.run.append_metrics(row)
        self.tracker.log({f"epoch/{k}": v for k, v in row.items()})
        log.info("epoch %d/%d  loss %.4f  %s  %s samples/s  %.2f s", self.epoch + 1, self.cfg.epochs, train_loss,
                 f"test acc {test['test_accuracy']:.2f}%" if test else "(no eval)", f"{global_sps:,.0f}",
                 self.epoch_seconds)
        self.epoch, self.step_in_epoch = self.epoch + 1, 0
        self.epoch_loss_sum, self.epoch_seconds = 0.0, 0.0
        self.save_checkpoint()

    def should_evaluate(self) -> bool:
        return self.epoch + 1 == self.cfg.epochs or (self.epoch + 1) % self.cfg.eval_every == 0

    def evaluate(self) -> dict[str, float]:
        """Exact: each test image is on exactly one rank (evaluation.py)."""
        self.reports.phase = f"evaluate after step {self.global_step}"
        self.last_test = evaluate(self.model, self.test, self.cfg.normalize, self.device, self.autocast_dtype)
        self.last_test_step = self.global_step
        return self.last_test

    def finish(self) -> dict[str, Any]:
        # The final weights are always evaluated: --max-steps can end the run mid-epoch, or at the end of
        # an epoch that --eval-every skipped (results.json would otherwise report an older accuracy).
        if self.last_test_step != self.global_step:
            self.evaluate()
            if self.time_to_target is None and self.last_test["test_accuracy"] >= self.cfg.target_accuracy:
                self.time_to_target = self.train_seconds
            self.save_checkpoint()
        results = self.results()
        if self.env.is_main:
            self.run.write_results(results)
        self.tracker.summary({**results, "reached_target": self.time_to_target is not None})
        if self.skipped_steps:
            log.info("fp16: the gradient scaler skipped %d of %d steps (gradients overflowed; the scale was lowered)",
                     self.skipped_steps, self.global_step)
        log.info("done: test accuracy %.2f%%, %.1f s training, %s samples/s -> %s", results["test_accuracy"],
                 results["train_seconds"], f"{results['samples_per_second']:,.0f}", self.run.results)
        return results

    def results(self) -> dict[str, Any]:
        """results.json: a public contract (design.md): add keys, never rename them."""
        samples = self.global_step * self.cfg.batch_size
        return {
            **self.last_test,
            "world_size": self.env.world_size, "batch_size": self.cfg.batch_size, "epochs": self.cfg.epochs,
            "steps": self.global_step, "train_seconds": self.train_seconds,
            "samples_per_second": samples / max(self.train_seconds, 1e-9),
            "time_to_target_seconds": self.time_to_target, "target_accuracy": self.cfg.target_accuracy,
            "model": self.cfg.model, "recipe": self.cfg.recipe, "precision": self.precision,
            "backend": self.backend if dist.is_initialized() else "none", "device": str(self.device),
            "data_path": self.data_path, "seed": self.cfg.seed, "skipped_steps": self.skipped_steps,
            "restarts": job_round(self.env).restarts, "tracker_run_id": self.tracker_run_id,
            "steady_samples_per_second": self.steady_steps * self.cfg.batch_size / self.steady_seconds
            if self.steady_steps and self.steady_seconds > 0 else None,
            "steady_steps": self.steady_steps, "throughput_warmup_steps": self.cfg.throughput_warmup_steps,
            "nodes": max(1, self.env.world_size // max(1, self.env.local_world_size)),
            "captured_step": self.capture_seconds is not None, "capture_seconds": self.capture_seconds,
            "ddp_mnist_version": __version__, "torch_version": torch.__version__,
            **self.strategy.report(),  # collective: strategy, hook, memory bytes per rank
        }

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self, rng: list, parallel: dict[str, Any]) -> dict[str, Any]:
        """`parallel`: the strategy's full model, optimizer and hook states (Strategy.state_dict)."""
        return {
            **parallel,
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
            "train_seconds": self.train_seconds, "time_to_target": self.time_to_target,
            "epoch_loss_sum": self.epoch_loss_sum, "epoch_seconds": self.epoch_seconds,
            "skipped_steps": self.skipped_steps, "last_test": self.last_test,
            "last_test_step": self.last_test_step, "best_accuracy": self.best_accuracy,
            "rng": rng, "config": self.cfg.to_dict(), "tracker_run_id": self.tracker_run_id,
            "steady_seconds": self.steady_seconds, "steady_steps": self.steady_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.strategy.load_state_dict(state)  # model, optimizer, communication-hook state
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        for key in ("epoch", "step_in_epoch", "global_step", "train_seconds", "time_to_target",
                    "epoch_loss_sum", "epoch_seconds", "skipped_steps", "last_test", "tracker_run_id"):
            setattr(self, key, state[key])
        self.steady_seconds = state.get("steady_seconds", 0.0)  # .get: checkpoints older than these keys
        self.steady_steps = state.get("steady_steps", 0)
        self.last_test_step = state.get("last_test_step")
        self.best_accuracy = state.get("best_accuracy")
        if len(state["rng"]) == self.env.world_size:
            set_rng_state(state["rng"][self.env.rank])
        else:
            log.warning("checkpoint was written at world size %d, now %d: per-rank random states are reseeded",
                        len(state["rng"]), self.env.world_size)

    def save_checkpoint(self):
        """Weights evaluated at this step that beat the best accuracy so far also become best.pt."""
        self.reports.phase = f"checkpoint at step {self.global_step}"
        scored = self.last_test_step == self.global_step
        best = scored and (self.best_accuracy is None or self.last_test["test_accuracy"] > self.best_accuracy)
        if best:
            self.best_accuracy = self.last_test["test_accuracy"]
        rng = gather_to_main(rng_state())  # collective: every rank calls it
        parallel = self.strategy.state_dict()  # collective: full states on rank 0
        state = self.state_dict(rng, parallel) if self.env.is_main else {}
        return self.checkpointer.save(state, self.global_step, best=best)

    def resume(self) -> None:
        if not self.resuming:
            return
        self.reports.phase = "choosing and loading a checkpoint"
        path = self.checkpointer.choose(self.cfg.to_dict())
        if path is not None:
            try:
                self.load_state_dict(load(path, self.device))
            except (KeyError, RuntimeError, ValueError) as e:
                raise CheckpointError(f"checkpoint {path} does not fit this job ({type(e).__name__}: {e}); "
                                      f"use a new --run-dir to start another job") from None
        if self.env.is_main:  # only now: a resume that fails leaves the run folder as it was
            self.cfg.save(self.run.config)
            self.run.trim_metrics(self.epoch)
        if path is None:
            log.info("--resume: no checkpoint in %s yet, starting from the beginning", self.run.checkpoints)
        else:
            log.info("resumed from %s: epoch %d, step %d of %d", path, self.epoch + 1, self.step_in_epoch,
                     self.cfg.steps_per_epoch)

    # ------------------------------------------------------------------ reporting
    def facts(self) -> dict[str, Any]:
        return environment_facts(self.env, self.backend, self.precision, self.device)

    def log_start(self) -> None:
        cfg = self.cfg
        log.info("ddp-mnist %s: %s/%s, world size %d (%s), %s, %s, %s data, global batch %d (%d per rank), "
                 "%d epochs of %d steps -> %s", __version__, cfg.model, cfg.recipe, self.env.world_size,
                 self.env.launcher, self.device, self.precision, self.data_path, cfg.batch_size, self.rank_batch,
                 cfg.epochs, cfg.steps_per_epoch, self.run.path)


def build_optimizer(cfg: TrainConfig, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if device.type == "cuda":
        # capturable + a tensor lr (filled in place by the scheduler): the step can be captured as a CUDA
        # graph, and the eager step runs the very same arithmetic, so both train identically.
        return torch.optim.AdamW(model.parameters(), lr=torch.tensor(cfg.lr, device=device),
                                 weight_decay=cfg.weight_decay, fused=True, capturable=True)
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer):
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=cfg.steps_per_epoch * cfg.epochs,
                                                   pct_start=0.25, div_factor=10.0, final_div_factor=100.0,
                                                   cycle_momentum=False)  # a captured step bakes momentum in
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


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


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    lr = optimizer.param_groups[0]["lr"]
    return lr.item() if torch.is_tensor(lr) else float(lr)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


__all__ = ["run_training", "Trainer", "TrainingStopped", "NonFiniteLossError", "ConfigError"]
