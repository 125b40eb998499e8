"""The training job: one entry point for every launcher (`run_training`).

It reads the launcher's environment, resolves the run's settings (settings.py), installs the stop signals,
joins the process group and starts the rank reports, then hands over to the loop (trainer.py). A failure that
a peer caused is reported as that peer's.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import signal
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ddp_mnist.artifacts.run_dir import RunDir, finished_run
from ddp_mnist.artifacts.tracking import check_tracking
from ddp_mnist.config.train_config import TrainConfig
from ddp_mnist.config.validation import job_settings, rank_differences
from ddp_mnist.errors import CLEAR_ERRORS, ConfigError
from ddp_mnist.parallel.collectives import gather_to_main, run_on_main
from ddp_mnist.parallel.env import DistEnv, slurm_job_spec
from ddp_mnist.parallel.process_group import process_group
from ddp_mnist.parallel.watchdog import RankReports
from ddp_mnist.training.determinism import explain_nondeterministic, make_deterministic
from ddp_mnist.training.settings import RunSettings
from ddp_mnist.training.signals import StopSignals, TrainingStopped, requeue_signal
from ddp_mnist.training.trainer import Trainer

log = logging.getLogger("ddp_mnist")


def run_training(cfg: TrainConfig) -> dict[str, Any]:
    """The `train` entry point shared by every launcher. Returns results.json's contents."""
    env = DistEnv.from_environ()
    setup_logging(env)
    cfg = cfg.resolved()
    if cfg.resume and cfg.run_dir and (done := finished_run(cfg)) is not None:
        return done  # every rank reads the same results.json: all exit 0 together
    cfg.check_world_size(env.world_size)
    if cfg.deterministic:
        make_deterministic()  # before CUDA starts: cuBLAS reads its workspace setting once
    check_tracking(cfg)  # every rank, before any work: --wandb without wandb fails here
    settings = RunSettings.for_launch(cfg, env)
    if settings.grouped and settings.backend == "nccl" and settings.capture_blocker is None:
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0")  # needed to capture NCCL calls
    if settings.grouped and settings.backend == "nccl":
        os.environ.update(flight_recorder_env(cfg, os.environ))  # read when the NCCL process group starts
    with (
        StopSignals(cfg.requeue_signal, talk=env.is_main, on_abort=requeue_marker(cfg, env)) as signals,
        process_group(env, settings.backend, settings.device, cfg.timeout_s),
        RankReports(env, timeout_s=cfg.timeout_s) as reports,
    ):
        try:
            check_ranks_agree(cfg)
            return Trainer(cfg, env, settings, signals, reports).fit()
        except TrainingStopped:
            raise
        except Exception as error:
            if cfg.deterministic and (clear := explain_nondeterministic(error)) is not None:
                raise clear from None
            # Tell the other ranks why this one stops; if a collective failed because of a peer, name it.
            peer_error = reports.explain(error, blame_peers=not isinstance(error, CLEAR_ERRORS))
            if peer_error is not None or (env.world_size > 1 and is_timeout(error)):
                reports.hang(f"found by rank {env.rank}: {peer_error or error}")  # RUN/logs/hang-<time>-rank<N>/
            if peer_error is None:
                raise
            raise peer_error from error


def flight_recorder_env(cfg: TrainConfig, environ: Mapping[str, str]) -> dict[str, str]:
    """NCCL's Flight Recorder on, its dumps (one per rank, on a collective timeout) into RUN/logs/ as
    flight-recorder-rank_N (the folder exists by then: each rank's log is there). Without --run-dir the run folder
    is chosen only after the group starts: `runs/flight-recorder/JOB-rank_N`. Read them with PyTorch's own tool
    (docs/debugging.md). A variable the user set is kept."""
    if cfg.run_dir:
        prefix = Path(cfg.run_dir).absolute() / "logs" / "flight-recorder-rank_"
    else:
        job = slurm_job_spec(environ) or environ.get("TORCHELASTIC_RUN_ID") or "job"
        prefix = Path("runs", "flight-recorder").absolute() / f"{job}-rank_"
        with contextlib.suppress(OSError):  # outside any run folder; a diagnosis aid: only the dumps are lost
            prefix.parent.mkdir(parents=True, exist_ok=True)
    wanted = {
        "TORCH_FR_BUFFER_SIZE": "2000",  # the last 2,000 collectives of each rank
        "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000",  # the same, by the name older PyTorch versions read
        "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
        "TORCH_FR_DUMP_TEMP_FILE": str(prefix),
        "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": str(prefix),
    }
    return {name: value for name, value in wanted.items() if name not in environ}


def is_timeout(error: BaseException) -> bool:
    """A collective or store that timed out (gloo: "Timed out waiting ...", NCCL's watchdog: "... timeout")."""
    return isinstance(error, RuntimeError) and re.search(r"timed? ?out", str(error), re.IGNORECASE) is not None


def requeue_marker(cfg: TrainConfig, env: DistEnv) -> Callable[[signal.Signals], None]:
    """What the signal thread does before it ends the process (signals.py: before the first step, or a stop no
    step boundary took up): under SLURM, rank 0 leaves the requeue marker for the warning signal, as the loop's
    stop does, so that the batch script requeues the job, which resumes from its last checkpoint."""

    def mark(sig: signal.Signals) -> None:
        run = RunDir(cfg.run_dir) if cfg.run_dir else None
        if sig == requeue_signal(cfg.requeue_signal) and env.is_main and env.slurm_job_id and run and run.path.is_dir():
            run.mark_requeue(f"{sig.name} (no checkpoint written on this stop)")

    return mark


def setup_logging(env: DistEnv) -> None:
    """Rank 0 talks; other ranks print only warnings and errors, tagged with their rank."""
    level = logging.INFO if env.is_main else logging.WARNING
    logging.basicConfig(
        stream=sys.stdout,
        force=True,
        level=level,
        format="%(message)s" if env.is_main else f"[rank {env.rank}] %(levelname)s: %(message)s",
    )
    for handler in logging.getLogger().handlers:  # the console's own level: the rank's log file takes every level
        handler.setLevel(level)


def check_ranks_agree(cfg: TrainConfig) -> None:
    """Every rank was launched with the same job: one hash of its settings compared right after the group forms
    (ranks with different --lr would train silently to a result results.json misreports; a different
    --max-steps ends in a C++ abort). On a mismatch every rank ends with one line naming the settings and the
    ranks (exit 2), before any step."""
    settings = job_settings(cfg)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()
    digests = gather_to_main(digest)  # collective: every rank calls it
    if run_on_main(lambda: len(set(digests or [])) <= 1):
        return
    everyone = gather_to_main(settings)  # collective: only when they differ

    def refuse() -> None:
        raise ConfigError(
            "the ranks were launched with different settings: "
            + " | ".join(rank_differences(everyone or []))
            + "; launch every rank with the same flags and config file"
        )

    run_on_main(refuse)
