"""The training loop: `Trainer` owns the model, optimizer, scheduler and scaler, and runs epochs of steps,
evaluation, metrics and checkpoints. Reads top to bottom; host-device syncs are marked `SYNC`."""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

import torch
from torch import nn

from ddp_mnist.artifacts.checkpoint import Checkpointer
from ddp_mnist.artifacts.ownership import release
from ddp_mnist.artifacts.run_dir import open_run
from ddp_mnist.artifacts.tracking import environment_facts, make_tracker
from ddp_mnist.config.train_config import TrainConfig
from ddp_mnist.data.batches import eval_shard, load_split, make_batches, to_input
from ddp_mnist.data.raw_files import prepare_mnist
from ddp_mnist.model import autocast_dtype, build_model
from ddp_mnist.optim import build_optimizer, build_scheduler, current_lr
from ddp_mnist.parallel.collectives import any_rank, gather_to_main, run_on_main
from ddp_mnist.parallel.device import side_stream
from ddp_mnist.parallel.env import DistEnv
from ddp_mnist.parallel.faults import fault_point
from ddp_mnist.parallel.strategy import Strategy
from ddp_mnist.parallel.watchdog import RankReports
from ddp_mnist.training.capture import Step, choose_step
from ddp_mnist.training.console import log_done, log_epoch, log_start, progress_bar
from ddp_mnist.training.evaluation import evaluate
from ddp_mnist.training.hang_report import HangEvidence
from ddp_mnist.training.meter import LossWindow, Meter
from ddp_mnist.training.profiling import StepProfiler
from ddp_mnist.training.rank_files import rank_files, where_the_rank_is
from ddp_mnist.training.results import job_results
from ddp_mnist.training.settings import RunSettings
from ddp_mnist.training.signals import EXIT_PREEMPTED, StopSignals, TrainingStopped
from ddp_mnist.training.state import TrainState, rng_state, set_rng_state
from ddp_mnist.training.step_log import StepLog
from ddp_mnist.training.stragglers import SlowRanks, WorkClock, tracker_values
from ddp_mnist.training.time_limit import TimeLimit

log = logging.getLogger("ddp_mnist")


class Trainer:
    """The loop. Owns the model, optimizer, scheduler and scaler; its position and scores are a TrainState
    (state.py), its clocks and totals a Meter (meter.py). `state_dict` captures all of it."""

    def __init__(
        self,
        cfg: TrainConfig,
        env: DistEnv,
        settings: RunSettings,
        signals: StopSignals,
        reports: RankReports | None = None,
    ):
        self.cfg, self.env, self.settings, self.signals = cfg, env, settings, signals
        self.device = device = settings.device
        self.reports = reports or RankReports(env)  # `phase`: what this rank is doing, for the others' errors

        # Data first: every rank checks the files, so bad data fails before the run folder is touched.
        self.reports.phase = "loading data"
        root = prepare_mnist(cfg.data_dir, cfg.download)
        self.run, self.resuming = open_run(cfg, env)
        self.checkpointer = Checkpointer(self.run.checkpoints, cfg.keep_checkpoints, env.is_main, cfg.checkpoint_every)

        # This rank's share of the training batches; the test set is split without padding.
        self.rank_batch = cfg.batch_size // env.world_size
        self.batches = make_batches(
            settings.data_path,
            load_split(root, train=True),
            env.rank,
            env.world_size,
            self.rank_batch,
            cfg.seed,
            device,
            cfg.num_workers,
        )
        self.test = eval_shard(load_split(root, train=False), env.rank, env.world_size).to(device)

        # Model: the same seed on every rank gives the same initial weights (DDP also broadcasts rank 0's).
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg.model).to(device)
        self.side_stream = side_stream(settings.capture_blocker is None, device)
        # DDP with its hook and knobs, ZeRO-1 or FSDP2 (strategy.py): `wrapped` is what the step calls.
        self.strategy = Strategy(cfg, device)
        self.wrapped = self.strategy.wrap_model(self.model, self.side_stream)  # DDP is built in the side stream
        self.optimizer = self.strategy.wrap_optimizer(build_optimizer(cfg, self.model, device))
        self.scheduler = build_scheduler(cfg, self.optimizer)
        self.scaler = self.strategy.make_scaler(enabled=settings.precision == "fp16")
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        self.autocast_dtype = autocast_dtype(settings.precision)
        self.step_fn: Step = self.train_step  # or the captured step, chosen in fit() once the state is loaded
        self.capture_seconds: float | None = None
        torch.manual_seed(cfg.seed + env.rank)  # per-rank stream for anything random from here on

        # Position, scores, clocks and totals: all part of the checkpoint.
        self.state = TrainState()
        self.meter = Meter(device, cfg.throughput_warmup_steps)
        self.clock = WorkClock(self.rank_batch, self.model)  # the pace, and this rank's own work (host time)
        self.slow_ranks = SlowRanks(cfg.slow_rank_threshold, cfg.slow_rank_seconds)

    # ------------------------------------------------------------------ the job
    def fit(self) -> dict[str, Any]:
        """The job, from its checkpoint (if any) to its end or a stop; the run folder is released however it ends
        (ownership.py). Each rank's log and heartbeat start once it has loaded (a refused one changes nothing)."""
        try:
            self.resume()
            # If the job hangs: every rank's stacks and a roll call in RUN/logs/hang-<time>-rank<N>/ (hang_report.py).
            self.reports.attach_evidence(HangEvidence(self.run.path, self.env, self.reports, self.cfg.heartbeat_s).give)
            with rank_files(self.run.path, self.env, self.cfg.heartbeat_s, self.heartbeat_record, self.cfg.timeout_s):
                return self.train_to_the_end()
        finally:
            if self.env.is_main:
                release(self.run.path)

    def train_to_the_end(self) -> dict[str, Any]:
        facts = functools.partial(
            environment_facts, self.env, self.settings.backend, self.settings.precision, self.device
        )
        tracker_run, step = self.state.tracker_run_id, self.state.global_step
        self.tracker = make_tracker(
            self.cfg, self.env.is_main, facts, self.run.tracker, tracker_run, self.resuming, step
        )
        self.step_log = StepLog(self)  # every --log-every steps: trackers, steps.jsonl, --step-lines
        # Kept even if this attempt has no --wandb: a later attempt with it continues the same W&B run.
        self.state.tracker_run_id = self.tracker.run_id or self.state.tracker_run_id
        self.profiler = StepProfiler(self.cfg.profile, self.run.path, self.env.is_main, self.device, self.tracker)
        self.time_limit = TimeLimit.of_job(self.cfg, self.run.path, self.signals, self.checkpointer)
        exit_code, preempting = 1, False
        try:
            log_start(self)
            # After resume: the graph is captured with the loaded state, and says in one line which step runs.
            self.step_fn, self.capture_seconds = choose_step(
                self.train_step,
                self.settings.capture_blocker,
                self.cfg.cuda_graph,
                self.model,
                self.optimizer,
                self.side_stream,
                self.rank_batch,
                self.device,
                self.env.is_main,
            )
            while self.state.epoch < self.cfg.epochs and not self.reached_max_steps():
                self.train_epoch()
                if self.state.step_in_epoch == self.cfg.steps_per_epoch:
                    self.end_epoch()
            self.signals.settled()  # no step boundary comes any more
            results = self.finish()
            exit_code = 0
            return results
        except TrainingStopped:
            exit_code, preempting = EXIT_PREEMPTED, True
            raise
        finally:
            self.tracker.finish(exit_code=exit_code, preempting=preempting)

    def heartbeat_record(self) -> dict[str, Any]:  # read by the heartbeat's thread: plain attributes, no sync
        st, phase, slow = self.state, self.reports.phase, self.slow_ranks.named  # slow: rank 0's verdict
        return where_the_rank_is(st, self.cfg.epochs, phase, self.clock, self.device, slow)

    def reached_max_steps(self) -> bool:
        return self.cfg.max_steps is not None and self.state.global_step >= self.cfg.max_steps

    def train_epoch(self) -> None:
        """Steps from the current position to the end of the epoch (or a stop)."""
        cfg, st = self.cfg, self.state
        self.wrapped.train()
        progress = progress_bar(cfg, st.epoch, st.step_in_epoch, self.env.is_main)
        window = LossWindow(cfg.log_every, self.device)
        self.meter.open_window()
        self.clock.restart()
        for images, labels in self.batches.epoch(st.epoch, st.step_in_epoch):
            self.reports.phase = f"train epoch {st.epoch + 1} step {st.global_step + 1}"
            loss = self.step_fn(images, labels)
            self.scheduler.step()
            window.add(loss, st.global_step)
            st.step_in_epoch += 1
            st.global_step += 1
            self.clock.tick()
            self.signals.stepping()  # a stop from now on waits for a step boundary, which checkpoints
            self.meter.count_step()  # SYNC once per process, when the steady-state clock starts
            self.profiler.step()  # --profile: a no-op when off
            self.after_step()  # test hooks: an injected fault, --pause-at-step
            progress.update(1)
            if window.full:  # every --log-every steps
                self.check_losses(window, progress)  # SYNC
            if self.stop_requested():  # SYNC every stop_check_every steps
                self.stop(window)
            ends_epoch = st.step_in_epoch == cfg.steps_per_epoch
            if self.checkpointer.should_save(st.global_step, ends_epoch, ends_run=self.reached_max_steps()):
                self.close_window(window)
                self.save_checkpoint()
                self.meter.open_window()  # after the save: train_seconds leave checkpoints out
                self.clock.restart()
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
                with torch.autocast(
                    self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None
                ):
                    logits = self.wrapped(to_input(x, self.cfg.normalize))
                    loss = self.loss_fn(logits.float(), y)
                    if len(chunks) > 1:  # the summed micro-batch gradients are then the batch's mean
                        loss = loss / len(chunks)
                self.scaler.scale(loss).backward()
            total = loss.detach() if total is None else total + loss.detach()  # no extra kernels for 1 chunk
        self.clock.backward_done()  # from the last gradient to here, DDP waited for the others' all-reduce
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
        self.reports.phase = f"loss check after step {self.state.global_step}"
        with self.clock.waiting():  # an all-reduce: waiting for the others is not this rank's work
            total, count = self.meter.add_losses(window, self.settings.precision == "fp16", self.state.epoch)
        if not count or progress is None:
            return
        mean = total / (count * self.env.world_size)
        lr = current_lr(self.optimizer)
        self.step_log.report(mean, lr, self.state.epoch, self.state.global_step, self.tracker, progress)

    def close_window(self, window: LossWindow) -> None:
        """Account the steps since the window opened: their time (SYNC), and their losses (checked)."""
        self.meter.close_window()
        self.check_losses(window)

    def stop(self, window: LossWindow) -> None:
        """Every rank got here at the same step: checkpoint, then end the job cleanly.
        Requeue when ANY rank got the warning signal (SLURM may signal some ranks before others)."""
        self.signals.settled()  # taken up: the checkpoint may take longer than the stop's grace period
        name = self.signals.name or "a stop signal on another rank"
        requeue = any_rank(self.signals.wants_requeue, self.device)
        then = "requeueing" if requeue and self.env.slurm_job_id else "stopping"  # else exit 75: "try again"
        log.info("%s: checkpointing at step %d, then %s", self.signals.cause, self.state.global_step, then)
        self.close_window(window)
        path = self.save_checkpoint()
        if requeue and self.env.slurm_job_id:
            # Before any rank exits (run_on_main: every rank waits for it): a rank that exits early can get
            # the others killed (srun --kill-on-bad-exit), and the batch script requeues from this file.
            run_on_main(self.run.mark_requeue, f"{name} at step {self.state.global_step}")
        raise TrainingStopped(name, requeue, path)

    def stop_requested(self) -> bool:
        """Whether any rank got a stop signal, asked every stop_check_every steps (a tiny all-reduce read on the
        host: a SYNC); every rank asks at the same steps and gets the same answer. Rank 0 also requests the stop
        when the job's end is near (time_limit.py)."""
        if not self.time_limit.due(self.state.global_step, self.settings.stop_check_every, self.cfg.pause_at_step):
            return False
        self.reports.phase = f"stop check after step {self.state.global_step}"
        self.time_limit.check()
        with self.clock.waiting():
            return any_rank(self.signals.pending, self.device)

    def after_step(self) -> None:
        """The test hooks after each optimizer step (docs/design.md, Test hooks): a fault injected with
        DDP_MNIST_FAULT (nothing unless set), and --pause-at-step."""
        self.reports.phase = f"after step {self.state.global_step}"
        fault_point("step", self.state.global_step, self.env.rank, self.reports.publish, self.clock.step_work_s)
        if self.state.global_step == self.cfg.pause_at_step:
            self.wait_for_stop_signal()

    def wait_for_stop_signal(self) -> None:
        """--pause-at-step (tests): every rank waits at this step until a stop signal reaches one of them."""
        log.info("paused at step %d until a stop signal arrives", self.state.global_step)
        while not any_rank(self.signals.pending, self.device):
            time.sleep(0.05)

    # ------------------------------------------------------------------ epochs and evaluation
    def end_epoch(self) -> None:
        st = self.state
        ranks = self.slow_ranks.measure(self.clock.take(), self.meter.epoch_seconds)  # collective: the slow named
        test = self.evaluate() if self.should_evaluate() else {}
        row = (
            self.meter.epoch_metrics(
                st.epoch,
                st.global_step,
                st.step_in_epoch,
                self.cfg.batch_size,
                self.env.world_size,
                current_lr(self.optimizer),
                test,
            )
            | ranks
        )
        if self.env.is_main:
            self.run.append_metrics(row)
        self.tracker.log({f"epoch/{k}": v for k, v in tracker_values(row).items()})
        log_epoch(st.epoch, self.cfg.epochs, row)
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
        results = job_results(self)  # results.py
        if self.env.is_main:
            self.run.write_results(results)
        self.tracker.summary({**results, "reached_target": meter.time_to_target is not None})
        log_done(results, meter.skipped_steps, st.global_step, self.run.results)
        return results

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self, rng: list, parallel: dict[str, Any]) -> dict[str, Any]:
        """`parallel`: the strategy's full model, optimizer and hook states (Strategy.state_dict); its `model` is
        the unwrapped model's state_dict (tools outside the package read it). The TrainState's and the Meter's
        entries sit beside them at the top level, with every rank's RNG state."""
        return {
            **parallel,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            **self.state.state_dict(),
            **self.meter.state_dict(),
            "rng": rng,
            "config": self.cfg.to_dict(),
        }

    def load_state_dict(self, checkpoint: dict[str, Any]) -> None:
        self.strategy.load_state_dict(checkpoint)  # model, optimizer, communication-hook state
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.scaler.load_state_dict(checkpoint["scaler"])
        self.state.load_state_dict(checkpoint)
        self.meter.load_state_dict(checkpoint)
        self.state.check_position(self.cfg.steps_per_epoch, self.cfg.epochs)
        rng = checkpoint["rng"]
        if len(rng) == self.env.world_size:
            set_rng_state(rng[self.env.rank])
        else:
            log.warning(
                "checkpoint was written at world size %d, now %d: per-rank random states are reseeded",
                len(rng),
                self.env.world_size,
            )

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
        path = self.checkpointer.restore(self.cfg.to_dict(), self.device, self.load_state_dict)
        if self.env.is_main:  # only now: a resume that fails leaves the run folder as it was
            self.run.trim_metrics(self.state.epoch)  # first: damaged metrics stop the resume before any write
            self.run.trim_steps(self.state.global_step)
            self.cfg.save(self.run.config)
        if path is None:
            log.info("--resume: no checkpoint in %s yet, starting from the beginning", self.run.checkpoints)
        else:
            st, steps = self.state, self.cfg.steps_per_epoch
            log.info("resumed from %s: epoch %d, step %d of %d", path, st.epoch + 1, st.step_in_epoch, steps)
