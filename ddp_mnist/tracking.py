"""Experiment tracking: Weights & Biases on rank 0, or nothing. Tracking never breaks training.

One W&B run per training job: created by rank 0 only; its id is kept in the run folder and in every
checkpoint, so a resumed or requeued job logs into the same run with its step counter continuing.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .config import ConfigError, TrainConfig

log = logging.getLogger("ddp_mnist")


class NullTracker:
    """Tracking off (or not rank 0): every call is a no-op."""

    run_id: str | None = None

    def log(self, metrics: dict[str, Any]) -> None:
        pass

    def summary(self, values: dict[str, Any]) -> None:
        pass

    def finish(self, exit_code: int = 0, preempting: bool = False) -> None:
        pass


class WandbTracker(NullTracker):
    """A W&B run whose step counter only moves forward, across resumes too."""

    def __init__(self, cfg: TrainConfig, facts: dict[str, Any], state_file: Path, run_id: str | None):
        wandb = import_wandb()
        saved = _read_json(state_file)
        run_id = run_id or saved.get("run_id")
        self.state_file = state_file
        self.step = int(saved.get("last_step", -1)) + 1 if run_id and saved.get("run_id") == run_id else 0
        mode = resolve_mode(cfg.wandb_mode)
        self.run = wandb.init(
            project=cfg.wandb_project or os.environ.get("WANDB_PROJECT") or "ddp-mnist",
            entity=cfg.wandb_entity, group=cfg.wandb_group, name=cfg.wandb_name, tags=cfg.wandb_tags or None,
            mode=mode, id=run_id, resume="allow" if run_id else None, dir=str(state_file.parent),
            config={**cfg.to_dict(), **facts}, allow_val_change=True)
        self.run_id = self.run.id
        self._save_state()
        log.info("W&B run %s (%s mode)%s", self.run_id, mode or os.environ.get("WANDB_MODE", "online"),
                 f", resuming at step {self.step}" if self.step else "")

    def log(self, metrics: dict[str, Any]) -> None:
        self.run.log(metrics, step=self.step)
        self.step += 1
        self._save_state()

    def summary(self, values: dict[str, Any]) -> None:
        self.run.summary.update(values)

    def finish(self, exit_code: int = 0, preempting: bool = False) -> None:
        if preempting:
            self.run.mark_preempting()  # W&B shows the run as preempted, to be resumed, not crashed
        self.run.finish(exit_code=exit_code)

    def _save_state(self) -> None:
        tmp = self.state_file.with_name(".tracker.json.tmp")
        tmp.write_text(json.dumps({"run_id": self.run_id, "last_step": self.step - 1}))
        os.replace(tmp, self.state_file)


def make_tracker(cfg: TrainConfig, is_main: bool, facts: dict[str, Any], state_file: Path,
                 run_id: str | None) -> NullTracker:
    if not (cfg.wandb and is_main):
        return NullTracker()
    return WandbTracker(cfg, facts, state_file, run_id)


def import_wandb():
    try:
        import wandb
    except ImportError:
        raise ConfigError("--wandb was asked for but wandb is not installed; `pip install wandb` "
                          "(or pip install 'ddp-mnist[wandb]'), or drop --wandb") from None
    return wandb


def resolve_mode(explicit: str | None) -> str | None:
    """The user's choice wins (flag, then WANDB_MODE). Otherwise online only when it can work:
    no API key, or no route to the W&B server, means offline (instead of an error or a 30 s hang)."""
    if explicit:
        return explicit
    if os.environ.get("WANDB_MODE"):
        return None  # wandb reads it itself
    if not _has_api_key():
        log.warning("W&B: no API key found (WANDB_API_KEY or `wandb login`); logging offline. "
                    "Sync later with `wandb sync`.")
        return "offline"
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError:
        log.warning("W&B: %s is not reachable; logging offline. Sync later with `wandb sync`.", host)
        return "offline"
    return None


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text() or bool(os.environ.get("WANDB_BASE_URL"))
    except OSError:
        return False


def environment_facts(env, backend: str, precision: str, device) -> dict[str, Any]:
    import torch

    return {
        "world_size": env.world_size,
        "nodes": max(1, env.world_size // max(1, env.local_world_size)),
        "backend": backend,
        "precision_resolved": precision,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch_version": torch.__version__,
        "git_commit": git_commit(),
        "slurm_job_id": env.slurm_job_id,
        "launcher": env.launcher,
    }


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
