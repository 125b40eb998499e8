"""Experiment tracking: Weights & Biases on rank 0, or nothing. Tracking never breaks training.

One W&B run per training job, created by rank 0 only. Its id is kept in the run folder (tracker.json,
with the last step logged) and in every checkpoint, so a resumed or requeued job logs into the same run
and its step counter continues where it stopped (W&B drops rows whose step goes backwards).
`wandb` is imported only when --wandb is given.

What happens when something is missing or goes wrong:
- --wandb but wandb is not installed: ConfigError on every rank before any work (exit 2).
- online mode asked for (or left to the default) but no API key or no route to the server: offline
  mode with a warning, instead of an error or a 30 s hang per run. Sync later with `wandb sync`.
- wandb.init fails online: one retry offline; if offline fails too: ConfigError at start (exit 2).
- any W&B error later (e.g. its helper process killed by a job-wide SIGTERM): one warning, tracking
  stops for this job, training goes on.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import netrc
import os
import socket
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ddp_mnist.artifacts.tensorboard import TensorBoardTracker, check_tensorboard
from ddp_mnist.config.train_config import TrainConfig
from ddp_mnist.errors import ConfigError
from ddp_mnist.files import write_json_atomic

log = logging.getLogger("ddp_mnist")


# wandb's helper process writes the run's .wandb file in batches, every 15 s by default. A SLURM
# preemption or scancel signals every process of the job, that helper too, and whatever it has not
# written yet is lost: flush more often, so at most this many seconds of metrics can be lost.
FLUSH_SECONDS = 2.0


PROBE_SECONDS = 3.0  # how long to wait for a TCP connection to the W&B server before going offline


NOT_ONLINE = ("offline", "dryrun", "disabled")  # dryrun: wandb's old name for offline


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
        saved = _read_json(state_file)
        # Continue after the last step logged to this run, which may be later than the checkpoint's.
        next_step = int(saved.get("last_step", -1)) + 1 if run_id and saved.get("run_id") == run_id else 0
        self.state_file = state_file
        self.run = init_run(
            mode=cfg.wandb_mode,
            run_id=run_id,
            job_type="train",
            project=cfg.wandb_project or os.environ.get("WANDB_PROJECT") or "ddp-mnist",
            entity=cfg.wandb_entity,
            group=cfg.wandb_group,
            name=cfg.wandb_name,
            tags=cfg.wandb_tags or None,
            # The run folder is the unit of work; $WANDB_DIR, when set, wins (wandb reads it itself).
            dir=None if os.environ.get("WANDB_DIR") else str(state_file.parent),
            config={**cfg.to_dict(), **facts},
        )
        self.run_id = self.run.id
        # Where the run went, for tools that read the run folder (the scaling report joins this group).
        self.where = {"project": self.run.project, "entity": self.run.entity or None, "group": self.run.group or None}
        self.step = max(next_step, int(getattr(self.run, "starting_step", 0) or 0))  # online resume knows it too
        # Charts against the training step and the epoch, not W&B's own row counter.
        for axis, metrics in (("train/global_step", "train/*"), ("epoch/epoch", "epoch/*")):
            self.run.define_metric(axis)
            self.run.define_metric(metrics, step_metric=axis)
        self._save_state()
        log.info(
            "W&B run %s (%s)%s",
            self.run_id,
            "offline" if self.run.offline else "online",
            f", continuing at step {self.step}" if self.step else "",
        )

    def log(self, metrics: dict[str, Any]) -> None:
        if self.run is None:
            return
        try:
            self.run.log(metrics, step=self.step, commit=True)  # commit: written now, not at the next step
        except Exception as e:  # noqa: BLE001 - tracking must never stop training
            return self._give_up("log", e)
        self.step += 1
        self._save_state()

    def summary(self, values: dict[str, Any]) -> None:
        if self.run is None:
            return
        try:
            self.run.summary.update(
                {k: v for k, v in values.items() if v is None or isinstance(v, (bool, int, float, str))}
            )
        except Exception as e:  # noqa: BLE001
            self._give_up("summary", e)

    def finish(self, exit_code: int = 0, preempting: bool = False) -> None:
        if self.run is None:
            return
        try:
            if preempting:
                self.run.mark_preempting()  # W&B shows the run as preempted, to be resumed, not crashed
            self.run.finish(exit_code=exit_code)
        except Exception as e:  # noqa: BLE001
            self._give_up("finish", e)
        self.run = None

    def _give_up(self, what: str, error: Exception) -> None:
        log.warning(
            "W&B %s failed (%s: %s); W&B logging is off for the rest of this job, training goes on. "
            "The run id %s is kept: a resumed job logs into it again.",
            what,
            type(error).__name__,
            error,
            self.run_id,
        )
        self.run = None
        _teardown()  # also unregisters wandb's exit hook, which would print a traceback at exit

    def _save_state(self) -> None:
        write_json_atomic(self.state_file, {"run_id": self.run_id, "last_step": self.step - 1, **self.where})


def make_tracker(
    cfg: TrainConfig,
    is_main: bool,
    facts: Callable[[], dict[str, Any]],
    state_file: Path,
    run_id: str | None,
    resuming: bool,
    start_step: int = 0,
) -> NullTracker:
    """Rank 0's trackers: with --wandb a W&B run (the checkpoint's, else, for a job requeued before its first
    checkpoint, the one in tracker.json, else a new one); with --tensorboard RUN/tensorboard/ (tensorboard.py);
    both together when both are asked for. Everyone else gets a no-op."""
    trackers: list[Any] = []
    disabled = (cfg.wandb_mode or os.environ.get("WANDB_MODE", "")).lower() == "disabled"
    if cfg.wandb and is_main and not disabled:
        if run_id is None and resuming:
            run_id = _read_json(state_file).get("run_id")
        trackers.append(WandbTracker(cfg, facts(), state_file, run_id))
    if cfg.tensorboard and is_main:
        trackers.append(TensorBoardTracker(state_file.parent, cfg.to_dict(), start_step, resuming))
    return trackers[0] if len(trackers) == 1 else Trackers(trackers) if trackers else NullTracker()


class Trackers(NullTracker):
    """Several trackers as one (W&B and TensorBoard): each call goes to each; the run id is W&B's."""

    def __init__(self, trackers: list[Any]) -> None:
        self.trackers = trackers
        self.run_id = next((t.run_id for t in trackers if t.run_id), None)
        self.run = next((t.run for t in trackers if getattr(t, "run", None) is not None), None)  # W&B's (profiler)

    def log(self, metrics: dict[str, Any]) -> None:
        for tracker in self.trackers:
            tracker.log(metrics)

    def summary(self, values: dict[str, Any]) -> None:
        for tracker in self.trackers:
            tracker.summary(values)

    def finish(self, exit_code: int = 0, preempting: bool = False) -> None:
        for tracker in self.trackers:
            tracker.finish(exit_code=exit_code, preempting=preempting)


def check_tracking(cfg: TrainConfig) -> None:
    """Every rank, before any work: --wandb needs wandb installed, --tensorboard tensorboard. Fails the same way
    on every rank."""
    if cfg.tensorboard:
        check_tensorboard()
    if not cfg.wandb:
        return
    try:
        found = importlib.util.find_spec("wandb") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise ConfigError(_MISSING)


_MISSING = (
    "--wandb was asked for but wandb is not installed; `pip install wandb` "
    "(or pip install 'ddp-mnist[wandb]'), or drop --wandb"
)


def import_wandb():
    try:
        import wandb
    except ImportError as e:
        raise ConfigError(f"{_MISSING} ({type(e).__name__}: {e})") from None
    return wandb


def _teardown() -> None:
    import wandb

    # SystemExit too: wandb.teardown() calls sys.exit() when its helper process ended with an error code.
    with contextlib.suppress(Exception, SystemExit):
        wandb.teardown()


def init_run(*, mode: str | None, run_id: str | None = None, **kwargs):
    """wandb.init that does not hang or fail for want of a network: see the module docstring."""
    wandb = import_wandb()
    mode = resolve_mode(mode)
    try:
        return _init(wandb, mode, run_id, kwargs)
    except Exception as e:  # noqa: BLE001 - wandb raises many kinds (UsageError, CommError, timeouts)
        if (mode or os.environ.get("WANDB_MODE", "")).lower() in NOT_ONLINE:
            raise ConfigError(
                f"W&B could not start a run ({type(e).__name__}: {e}); check WANDB_DIR is writable, or drop --wandb"
            ) from None
        log.warning(
            "W&B could not start an online run (%s: %s); logging offline instead. Sync later with `wandb sync`.",
            type(e).__name__,
            e,
        )
    _teardown()  # forget the half-started online session before starting an offline one
    try:
        return _init(wandb, "offline", run_id, kwargs)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(
            f"W&B could not start a run, online or offline ({type(e).__name__}: {e}); drop --wandb or fix the W&B setup"
        ) from None


def _init(wandb, mode: str | None, run_id: str | None, kwargs: dict[str, Any]):
    return wandb.init(
        mode=mode,
        id=run_id,
        resume="allow" if run_id else None,
        settings=_settings(wandb),
        allow_val_change=True,
        **kwargs,
    )


def _settings(wandb):
    try:
        return wandb.Settings(x_transaction_log_flush_interval=FLUSH_SECONDS)
    except Exception:  # noqa: BLE001 - a private setting: other wandb versions may not know it
        return wandb.Settings()


def resolve_mode(explicit: str | None) -> str | None:
    """The user's choice wins (flag, then WANDB_MODE; None lets wandb read WANDB_MODE itself). Online,
    asked for or by default, only when it can work: without an API key or a route to the server,
    offline (sync later), instead of an error or a 30 s hang."""
    requested = (explicit or os.environ.get("WANDB_MODE") or "online").lower()
    if requested in NOT_ONLINE:
        return explicit
    problem = why_not_online()
    if problem:
        log.warning(
            "W&B: %s; logging offline. Upload later with `wandb sync` on the run's offline-run-* "
            "folder (under the run folder's wandb/, or $WANDB_DIR/wandb/).",
            problem,
        )
        return "offline"
    return explicit


def why_not_online() -> str | None:
    url = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    host = url.hostname or "api.wandb.ai"
    if not (os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE") or _netrc_has(host)):
        return f"no API key for {host} (set WANDB_API_KEY or run `wandb login`)"
    target = _proxy_for(url.scheme) or (host, url.port or (443 if url.scheme == "https" else 80))
    if not _reachable(*target):
        return f"{target[0]}:{target[1]} is not reachable within {PROBE_SECONDS:.0f} s"
    return None


def _netrc_has(host: str) -> bool:
    path = os.environ.get("NETRC") or str(Path.home() / ".netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _proxy_for(scheme: str) -> tuple[str, int] | None:
    proxy = os.environ.get(f"{scheme}_proxy") or os.environ.get(f"{scheme.upper()}_PROXY")
    if not proxy:
        return None
    parsed = urlparse(proxy if "://" in proxy else f"http://{proxy}")
    return (parsed.hostname, parsed.port or 80) if parsed.hostname else None


def _reachable(host: str, port: int) -> bool:
    """A TCP connection within PROBE_SECONDS, name lookup included (a thread: getaddrinfo has no timeout)."""
    ok = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=PROBE_SECONDS).close()
            ok.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(PROBE_SECONDS + 0.5)
    return bool(ok)


def environment_facts(env, backend: str, precision: str, device) -> dict[str, Any]:
    """Where and how the job runs: logged with the config so runs can be compared later. `*_resolved`:
    what `auto` became (the config keeps what was asked for)."""
    import torch
    import torch.distributed as dist

    return {
        "world_size": env.world_size,
        "nodes": max(1, env.world_size // max(1, env.local_world_size)),
        "backend_resolved": backend if dist.is_initialized() else "none",
        "precision_resolved": precision,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "git_commit": git_commit(),
        "slurm_job_id": env.slurm_job_id,
        "launcher": env.launcher,
        "hostname": socket.gethostname(),
    }


def git_commit() -> str | None:
    """The commit of this package's checkout; None when installed from a wheel or git is missing."""
    package = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--show-toplevel", "HEAD"], cwd=package, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.split()
    # Only a checkout of this project: not an unrelated repository that happens to hold site-packages.
    if out.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() != package.parent:
        return None
    return lines[1]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
