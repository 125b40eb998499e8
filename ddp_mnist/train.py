"""The training job: one entry point for every launcher.

Reads top to bottom: set up (environment, device, process group, data, model, optimizer), resume,
then epochs of steps, evaluation, metrics and checkpoints. Host-device syncs are marked `SYNC`.
"""

from __future__ import annotations

import functools
import logging
import os
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
from .distributed import (DistEnv, RankReports, any_rank, gather_to_main,
                          job_round, pick_backend, pick_device, process_group, run_on_main)
from .evaluation import evaluate, format_accuracy
from .faults import fault_point
from .meter import LossWindow, Meter, NonFiniteLossError
from .model import autocast_dtype, build_model, resolve_precision
from .optim import build_optimizer, build_scheduler, current_lr
from .profiling import StepProfiler, hardware_efficiency
from .run_dir import RunDir, finished_run, place_run
from .signals import EXIT_PREEMPTED, StopSignals
from .state import TrainState, rng_state, set_rng_state
from .strategy import Strategy, capture_blocker_of
from .tracking import check_tracking, environment_facts, make_tracker

log = logging.getLogger("ddp_mnist")


class TrainingStopped(Exception):
    """A stop signal was acted on: a checkpoint was written and the job should end (or requeue)."""

    def __init__(self, signal_name: str, requeue: bool, checkpoint):
        super().__init__(f"stopped by {signal_name} after writing {checkpoint}")
        self.signal_name, self.requeue, self.checkpoint = signal_name, requeue, checkpoint


# Errors that explain themselves (exit status 2); any other error may come from a failed peer.
CLEAR_ERRORS = (ConfigError, DataError, CheckpointError, NonFiniteLossError)


def run_training(cfg: TrainConfig) -> dict[str, Any]:
    """The `train` entry point shared by every launcher. Returns results.json's contents."""
    env = DistEnv.from_environ()
    setup_logging(env)
    cfg = cfg.resolved()
    if cfg.resume and cfg.run_dir and (done := finished_run(cfg)) is not None:
        return done  # every rank reads the same results.json: all exit 0 together
    cfg.check_world_size(env.world_size)
    check_tracking(cfg)  # every rank, before any work: --wandb without wandb fails here
    device = pick_device(cfg.device, env)
    backend = pick_backend(cfg.backend, device)
    if backend == "nccl" and why_not_capture(cfg, device, backend) is None:
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


def open_run(cfg: TrainConfig, env: DistEnv) -> tuple[RunDir, bool]:
    """The run folder, prepared by rank 0, and whether this start resumes the job in it. Without --run-dir: a new
    runs/<date>-<time>-<model>-<recipe>, or a restarted job's own folder (rank 0 decides, every rank gets it)."""
    if cfg.run_dir is None:
        cfg.run_dir = run_on_main(place_run, cfg.model, cfg.recipe, env.job_ids(), job_round(env).restarted)
    run = RunDir(cfg.run_dir)
    resuming = cfg.resume or continues_job(run, env)
    run_on_main(run.prepare, cfg, resuming, env.job_ids())
    return run, resuming


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


def why_not_capture(cfg: TrainConfig, device: torch.device, backend: str | None) -> str | None:
    """Why the step will not be captured as a CUDA graph (capture.py); None when it will be.
    `backend`: the process group's, or None without one."""
    return capture_blocker(cfg.cuda_graph, device, resolve_precision(cfg.precision, device), cfg.optimizer, cfg.schedule,
                           cfg.grad_accum, resolve_data_path(cfg, device), backend,
                           capture_blocker_of(cfg, distributed=backend is not None))


def resolve_stop_check_every(cfg: TrainConfig, device: torch.device) -> int:
    """Each check is a tiny all-reduce read on the host: on CUDA that stalls the queue of queued steps."""
    return cfg.stop_check_every or (50 if device.type == "cuda" else 1)


class Trainer:
    """The loop. Owns the model, optimizer, scheduler and scaler; its position and scores are a TrainState
    (state.py), its clocks and totals a Meter (meter.py). `state_dict` captures all of it."""

    def __init__(self, cfg: TrainConfig, env: DistEnv, device: torch.device, backend: str, signals: StopSignals,
                 reports: RankReports | None = None):
        self.cfg, self.env, self.device, self.backend, self.signals = cfg, env, device, backend, signals
        self.reports = reports or RankReports(env)  # `phase`: what this rank is doing, for the others' errors
        self.precision = resolve_precision(cfg.precision, device)
        self.data_path = resolve_data_path(cfg, device)

        # Data first: every rank checks the files, so bad data fails before the run folder is touched.
        self.reports.phase = "loading data"
        root = prepare_mnist(cfg.data_dir, cfg.download)
        self.run, self.resuming = open_run(cfg, env)
        self.checkpointer = Checkpointer(self.run.checkpoints, cfg.keep_checkpoints, env.is_main)

        # This rank's share of the training batches; the test set is split without padding.
        self.rank_batch = cfg.batch_size // env.world_size
        self.batches = make_batches(self.data_path, load_split(root, train=True), env.rank, env.world_size,
                                    self.rank_batch, cfg.seed, device, cfg.num_workers)
        self.test = eval_shard(load_split(root, train=False), env.rank, env.world_size).to(device)

        # Model: the same seed on every rank gives the same initial weights (DDP also broadcasts rank 0's).
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg.model).to(device)
        self.capture_blocker = why_not_capture(cfg, device, backend if dist.is_initialized() else None)
        self.side_stream = side_stream(self.capture_blocker is None, device)
        # DDP with its hook and knobs, ZeRO-1 or FSDP2 (strategy.py): `wrapped` is what the step calls.
        self.strategy = Strategy(cfg, device)
        self.wrapped = self.strategy.wrap_model(self.model, self.side_stream)  # DDP is built in the side stream
        self.optimizer = self.strategy.wrap_optimizer(build_optimizer(cfg, self.model, device))
        self.scheduler = build_scheduler(cfg, self.optimizer)
        self.scaler = self.strategy.make_scaler(enabled=self.precision == "fp16")
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        self.autocast_dtype = autocast_dtype(self.precision)
        self.stop_check_every = resolve_stop_check_every(cfg, device)
        self.step_fn = self.train_step  # or the captured step, chosen in fit() once the state is loaded
        self.capture_seconds: float | None = None
        torch.manual_seed(cfg.seed + env.rank)  # per-rank stream for anything random from here on

        # Position, scores, clocks and totals: all part of the checkpoint.
        self.state = TrainState()
        self.meter = Meter(device, cfg.throughput_warmup_steps)

    # ------------------------------------------------------------------ the job
    def fit(self) -> dict[str, Any]:
        self.resume()
        facts = functools.partial(environment_facts, self.env, self.backend, self.precision, self.device)
        self.tracker = make_tracker(self.cfg, self.env.is_main, facts, self.run.tracker, self.state.tracker_run_id,
                                    self.resuming)
        # Kept even if this attempt has no --wandb: a later attempt with it continues the same W&B run.
        self.state.tracker_run_id = self.tracker.run_id or self.state.tracker_run_id
        self.profiler = StepProfiler(self.cfg.profile, self.run.path, self.env.is_main, self.device, self.tracker)
        exit_code, preempting = 1, False
        try:
            log_start(self)
            # After resume: the graph is captured with the loaded state, and says in one line which step runs.
            self.step_fn, self.capture_seconds = choose_step(
                self.train_step, self.capture_blocker, self.cfg.cuda_graph, self.model, self.optimizer,
                self.side_stream, self.rank_batch, self.device, self.env.is_main)
            while self.state.epoch < self.cfg.epochs and not self.reached_max_steps():
                self.train_epoch()
                if self.state.step_in_epoch == self.cfg.steps_per_epoch:
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
        return self.cfg.max_steps is not None and self.state.global_step >= self.cfg.max_steps

    def train_epoch(self) -> None:
        """Steps from the current position to the end of the epoch (or a stop)."""
        cfg, st = self.cfg, self.state
        self.wrapped.train()
        progress = progress_bar(cfg, st.epoch, st.step_in_epoch, show=self.env.is_main and cfg.progress)
        window = LossWindow(cfg.log_every, self.device)
        self.meter.open_window()
        for images, labels in self.batches.epoch(st.epoch, st.step_in_epoch):
            self.reports.phase = f"train epoch {st.epoch + 1} step {st.global_step + 1}"
            loss = self.step_fn(images, labels)
            self.scheduler.step()
            window.add(loss, st.global_step)
            st.step_in_epoch += 1
            st.global_step += 1
            self.meter.count_step()  # SYNC once per process, when the steady-state clock starts
            self.profiler.step()  # --profile: a no-op when off
            fault_point("step", st.global_step, self.env.rank, before=self.reports.publish)  # tests only
            progress.update(1)
            if window.full:
                self.check_losses(window, progress)  # SYNC: every --log-every steps
            if st.global_step == cfg.pause_at_step:
                self.wait_for_stop_signal()
            # SYNC: a tiny all-reduce read on the host, every stop_check_every steps.
            if st.global_step % self.stop_check_every == 0 and any_rank(self.signals.pending, self.device):
                self.stop(window)
            # The last step of an epoch or of the run is saved by end_epoch/finish: saving a step twice would
            # replace its good checkpoint, and a crash in between could leave none.
            if (cfg.checkpoint_every and st.global_step % cfg.checkpoint_every == 0
                    and st.step_in_epoch < cfg.steps_per_epoch and not self.reached_max_steps()):
                self.close_window(window)
                self.save_checkpoint()
                self.meter.open_window()  # after the save: train_seconds leave checkpoints out
            if self.reached_max_steps():
                break
        self.close_window(window)
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
            self.meter.skipped_steps += int(self.scaler.get_scale() < scale)
        else:
            self.optimizer.step()
        return total

    # ------------------------------------------------------------------ health, logging, stopping
    def check_losses(self, window: LossWindow, progress=None) -> None:
        """Read the recent losses (one SYNC), stop on a NaN or infinite one, log their mean."""
        total, count = self.meter.add_losses(window, self.precision == "fp16", self.state.epoch)
        if not count or progress is None:
            return
        mean = total / (count * self.env.world_size)
        lr = current_lr(self.optimizer)
        progress.set_postfix(loss=f"{mean:.4f}", lr=f"{lr:.2e}", refresh=False)
        self.tracker.log({"train/loss": mean, "train/lr": lr, "train/epoch": self.state.epoch + 1,
                          "train/global_step": self.state.global_step})

    def close_window(self, window: LossWindow) -> None:
        """Account the steps since the window opened: their time (SYNC), and their losses (checked)."""
        self.meter.close_window()
        self.check_losses(window)

    def stop(self, window: LossWindow) -> None:
        """Every rank got here at the same step: checkpoint, then end the job cleanly.
        Requeue when ANY rank got the warning signal (SLURM may signal some ranks before others)."""
        name = self.signals.name or "a stop signal on another rank"
        requeue = any_rank(self.signals.wants_requeue, self.device)
        log.info("%s received: checkpointing at step %d, then %s", name, self.state.global_step,
                 "requeueing" if requeue else "stopping")
        self.close_window(window)
        path = self.save_checkpoint()
        if requeue and self.env.slurm_job_id:
            # Before any rank exits (run_on_main: every rank waits for it): a rank that exits early can get
            # the others killed (srun --kill-on-bad-exit), and the batch script requeues from this file.
            run_on_main(self.run.mark_requeue, f"{name} at step {self.state.global_step}")
        raise TrainingStopped(name, requeue, path)

    def wait_for_stop_signal(self) -> None:
        """--pause-at-step (tests): every rank waits at this step until a stop signal reaches one of them."""
        log.info("paused at step %d until a stop signal arrives", self.state.global_step)
        while not any_rank(self.signals.pending, self.device):
            time.sleep(0.05)

    # ------------------------------------------------------------------ epochs and evaluation
    def end_epoch(self) -> None:
        st = self.state
        test = self.evaluate() if self.should_evaluate() else {}
        row = epoch_metrics(self, test)
        if self.env.is_main:
            self.run.append_metrics(row)
        self.tracker.log({f"epoch/{k}": v for k, v in row.items()})
        log.info("epoch %d/%d  loss %.4f  %s  %s samples/s  %.2f s", st.epoch + 1, self.cfg.epochs, row["train_loss"],
                 f"test acc {format_accuracy(test['test_accuracy'])}" if test else "(no eval)",
                 f"{row['samples_per_second']:,.0f}", row["epoch_seconds"])
        st.epoch, st.step_in_epoch = st.epoch + 1, 0
        self.meter.start_epoch()
        self.save_checkpoint()

    def should_evaluate(self) -> bool:
        return self.state.epoch + 1 == self.cfg.epochs or (self.state.epoch + 1) % self.cfg.eval_every == 0

    def evaluate(self) -> dict[str, float]:
        """Exact: each test image is on exactly one rank (evaluation.py). Every evaluation counts towards
        the time to --target-accuracy."""
        st = self.state
        self.reports.phase = f"evaluate after step {st.global_step}"
        st.last_test = evaluate(self.model, self.test, self.cfg.normalize, self.device, self.autocast_dtype)
        st.last_test_step = st.global_step
        self.meter.note_accuracy(st.last_test["test_accuracy"], self.cfg.target_accuracy)
        return st.last_test

    def finish(self) -> dict[str, Any]:
        st, meter = self.state, self.meter
        # The final weights are always evaluated: --max-steps can end the run mid-epoch, or at the end of
        # an epoch that --eval-every skipped (results.json would otherwise report an older accuracy).
        if not st.scored:
            self.evaluate()
            self.save_checkpoint()
        results = job_results(self)
        if self.env.is_main:
            self.run.write_results(results)
        self.tracker.summary({**results, "reached_target": meter.time_to_target is not None})
        if meter.skipped_steps:
            log.info("fp16: the gradient scaler skipped %d of %d steps (gradients overflowed; the scale was lowered)",
                     meter.skipped_steps, st.global_step)
        log.info("done: test accuracy %s, %.1f s training, %s samples/s -> %s", format_accuracy(results["test_accuracy"]),
                 results["train_seconds"], f"{results['samples_per_second']:,.0f}", self.run.results)
        return results

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self, rng: list, parallel: dict[str, Any]) -> dict[str, Any]:
        """`parallel`: the strategy's full model, optimizer and hook states (Strategy.state_dict); its `model` is
        the unwrapped model's state_dict (tools outside the package read it). The TrainState's and the Meter's
        entries sit beside them at the top level, with every rank's RNG state."""
        return {
            **parallel,
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            **self.state.state_dict(), **self.meter.state_dict(), "rng": rng, "config": self.cfg.to_dict(),
        }

    def load_state_dict(self, checkpoint: dict[str, Any]) -> None:
        self.strategy.load_state_dict(checkpoint)  # model, optimizer, communication-hook state
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.scaler.load_state_dict(checkpoint["scaler"])
        self.state.load_state_dict(checkpoint)
        self.meter.load_state_dict(checkpoint)
        rng = checkpoint["rng"]
        if len(rng) == self.env.world_size:
            set_rng_state(rng[self.env.rank])
        else:
            log.warning("checkpoint was written at world size %d, now %d: per-rank random states are reseeded",
                        len(rng), self.env.world_size)

    def save_checkpoint(self):
        """Weights evaluated at this step that beat the best accuracy so far also become best.pt."""
        self.reports.phase = f"checkpoint at step {self.state.global_step}"
        best = self.state.record_best()
        rng = gather_to_main(rng_state())  # collective: every rank calls it
        parallel = self.strategy.state_dict()  # collective: full states on rank 0
        checkpoint = self.state_dict(rng, parallel) if self.env.is_main else {}
        return self.checkpointer.save(checkpoint, self.state.global_step, best=best)

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
            self.run.trim_metrics(self.state.epoch)
        if path is None:
            log.info("--resume: no checkpoint in %s yet, starting from the beginning", self.run.checkpoints)
        else:
            log.info("resumed from %s: epoch %d, step %d of %d", path, self.state.epoch + 1,
                     self.state.step_in_epoch, self.cfg.steps_per_epoch)

def log_start(trainer: Trainer) -> None:
    cfg, env = trainer.cfg, trainer.env
    log.info("ddp-mnist %s: %s/%s, world size %d (%s), %s, %s, %s data, global batch %d (%d per rank), "
             "%d epochs of %d steps -> %s", __version__, cfg.model, cfg.recipe, env.world_size, env.launcher,
             trainer.device, trainer.precision, trainer.data_path, cfg.batch_size, trainer.rank_batch, cfg.epochs,
             cfg.steps_per_epoch, trainer.run.path)


def progress_bar(cfg: TrainConfig, epoch: int, start: int, show: bool):
    from tqdm import tqdm

    interactive = sys.stderr.isatty()
    return tqdm(total=cfg.steps_per_epoch, initial=start, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step",
                leave=False, dynamic_ncols=True, mininterval=0.2 if interactive else 30, disable=not show)


def epoch_metrics(trainer: Trainer, test: dict[str, float]) -> dict[str, Any]:
    """One line of metrics.jsonl (and of the tracker's epoch/ charts), at the end of an epoch."""
    cfg, env, st, meter = trainer.cfg, trainer.env, trainer.state, trainer.meter
    steps = st.step_in_epoch
    global_sps = meter.epoch_throughput(steps * cfg.batch_size)
    row = {"epoch": st.epoch + 1, "global_step": st.global_step,
           "train_loss": meter.epoch_loss_sum / max(steps * env.world_size, 1),  # already summed over ranks
           "epoch_seconds": meter.epoch_seconds, "train_seconds": meter.train_seconds,
           "samples_per_second": global_sps, "samples_per_second_per_rank": global_sps / env.world_size,
           "lr": current_lr(trainer.optimizer), **test}
    if trainer.device.type == "cuda":
        row["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated(trainer.device) / 2**20
    return row


def job_results(trainer: Trainer) -> dict[str, Any]:
    """results.json: a public contract (design.md): add keys, never rename them."""
    cfg, env, st, meter = trainer.cfg, trainer.env, trainer.state, trainer.meter
    results = {
        **st.last_test,
        "world_size": env.world_size, "batch_size": cfg.batch_size, "epochs": cfg.epochs,
        "steps": st.global_step, "train_seconds": meter.train_seconds,
        "samples_per_second": meter.throughput(st.global_step * cfg.batch_size),
        "time_to_target_seconds": meter.time_to_target, "target_accuracy": cfg.target_accuracy,
        "model": cfg.model, "recipe": cfg.recipe, "precision": trainer.precision,
        "backend": trainer.backend if dist.is_initialized() else "none", "device": str(trainer.device),
        "data_path": trainer.data_path, "seed": cfg.seed, "skipped_steps": meter.skipped_steps,
        "restarts": job_round(env).restarts, "tracker_run_id": st.tracker_run_id,
        "steady_samples_per_second": meter.steady_throughput(cfg.batch_size),
        "steady_steps": meter.steady_steps, "throughput_warmup_steps": cfg.throughput_warmup_steps,
        "nodes": max(1, env.world_size // max(1, env.local_world_size)),
        "captured_step": trainer.capture_seconds is not None, "capture_seconds": trainer.capture_seconds,
        "ddp_mnist_version": __version__, "torch_version": torch.__version__,
        **trainer.strategy.report(),  # collective: strategy, hook, memory bytes per rank
    }
    # profiling.py: the --profile summary, FLOPs per sample, achieved FLOP/s and MFU.
    return {**results, "profile": trainer.profiler.summary(), **hardware_efficiency(
        cfg.model, results["steady_samples_per_second"], env.world_size, trainer.device, cfg.peak_tflops)}


__all__ = ["run_training", "Trainer", "TrainingStopped", "NonFiniteLossError", "ConfigError"]
