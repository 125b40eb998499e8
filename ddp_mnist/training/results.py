"""results.json, the job's summary: a public contract (docs/design.md, Run folder): add keys, never rename them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ddp_mnist import __version__
from ddp_mnist.parallel.process_group import job_round
from ddp_mnist.training.profiling import hardware_efficiency

if TYPE_CHECKING:
    from ddp_mnist.training.trainer import Trainer


def job_results(trainer: Trainer) -> dict[str, Any]:
    """What the finished job writes into results.json (every rank computes it; rank 0 writes it)."""
    cfg, env, st, meter = trainer.cfg, trainer.env, trainer.state, trainer.meter
    results = {
        **st.last_test,
        "world_size": env.world_size,
        "batch_size": cfg.batch_size,
        "epochs": cfg.epochs,
        "steps": st.global_step,
        "train_seconds": meter.train_seconds,
        "samples_per_second": meter.throughput(st.global_step * cfg.batch_size),
        "time_to_target_seconds": meter.time_to_target,
        "target_accuracy": cfg.target_accuracy,
        "model": cfg.model,
        "recipe": cfg.recipe,
        "precision": trainer.settings.precision,
        "backend": trainer.settings.group_backend,
        "device": str(trainer.device),
        "data_path": trainer.settings.data_path,
        "seed": cfg.seed,
        "deterministic": cfg.deterministic,
        "skipped_steps": meter.skipped_steps,
        "restarts": job_round(env).restarts,
        "tracker_run_id": st.tracker_run_id,
        "steady_samples_per_second": meter.steady_throughput(cfg.batch_size),
        "steady_steps": meter.steady_steps,
        "throughput_warmup_steps": cfg.throughput_warmup_steps,
        "nodes": max(1, env.world_size // max(1, env.local_world_size)),
        "captured_step": trainer.capture_seconds is not None,
        "capture_seconds": trainer.capture_seconds,
        "ddp_mnist_version": __version__,
        "torch_version": torch.__version__,
        **trainer.strategy.report(),  # collective: strategy, hook, memory bytes per rank
    }
    # profiling.py: the --profile summary, FLOPs per sample, achieved FLOP/s and MFU.
    return {
        **results,
        "profile": trainer.profiler.summary(),
        **hardware_efficiency(
            cfg.model, results["steady_samples_per_second"], env.world_size, trainer.device, cfg.peak_tflops
        ),
    }
