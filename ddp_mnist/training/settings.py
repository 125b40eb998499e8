"""The run's resolved settings: what each "auto" became on this machine, decided once.

Training (train.py, trainer.py), `ddp-mnist bench` (bench.py) and the all-reduce benchmark
(scaling/comm_bench.py) all take them from `RunSettings.resolve`, so they cannot disagree on the device,
the backend, the precision, the data path, whether the step is captured, or how often the stop check runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ddp_mnist.config.train_config import TrainConfig
from ddp_mnist.model import resolve_precision
from ddp_mnist.parallel.device import pick_backend, pick_device
from ddp_mnist.parallel.env import DistEnv
from ddp_mnist.parallel.strategy import capture_blocker_of
from ddp_mnist.training.capture import capture_blocker
from ddp_mnist.training.profiling import model_flops

STOP_CHECK_S = 0.1
"""On the CPU, about this many seconds of steps between stop checks (at CPU_FLOPS; a slower CPU stretches it)."""
CPU_FLOPS = 50e9
"""An assumed, conservative training rate of one CPU rank (FLOP/s): a Zen 4/5 or Xeon core pair does 70-300."""


def cpu_stop_check_every(cfg: TrainConfig) -> int:
    """Steps in about STOP_CHECK_S on a CPU: the global batch's training FLOPs at CPU_FLOPS. Deterministic from
    the config alone, so every rank checks at the same steps; the global batch (not the rank's share) keeps the
    interval at or under STOP_CHECK_S at any world size. The MLP: 21 steps at batch 100, 4 at 512; the CNN: 1."""
    return max(1, int(STOP_CHECK_S * CPU_FLOPS / (model_flops(cfg.model) * cfg.batch_size)))


@dataclass(frozen=True)
class RunSettings:
    device: torch.device
    """Where this rank computes (`--device auto`: its GPU under a launcher, else the CPU)."""
    backend: str
    """The process group's backend (gloo or nccl; named also when there is no group, as the W&B facts show it)."""
    grouped: bool
    """Whether this process is in a process group (not when it runs alone, without a launcher)."""
    precision: str
    """fp32, bf16 or fp16 (`--precision auto`: bf16 where the GPU computes it, else fp32)."""
    data_path: str
    """loader or resident (`--data-path auto`: resident; the same batches, without the DataLoader's per-batch
    work: on CUDA the loader is the bottleneck, on a CPU it costs up to 13% of a bf16 step)."""
    capture_blocker: str | None
    """Why the step is not captured as a CUDA graph, in words for the log; None when it is (capture.py)."""
    stop_check_every: int
    """Steps between stop-signal checks: each is a tiny all-reduce read on the host, which on CUDA stalls the
    queue of queued steps (every 50 steps there), and on the CPU costs gloo's latency, ~0.6 ms, against a step
    of a few ms (about every 0.1 s of steps there: `cpu_stop_check_every`)."""

    @classmethod
    def resolve(cls, cfg: TrainConfig, device: torch.device, backend: str, grouped: bool) -> RunSettings:
        precision = resolve_precision(cfg.precision, device)
        data_path = cfg.data_path if cfg.data_path != "auto" else "resident"
        blocker = capture_blocker(
            cfg.cuda_graph,
            device,
            precision,
            cfg.optimizer,
            cfg.schedule,
            cfg.grad_accum,
            data_path,
            backend if grouped else None,
            capture_blocker_of(cfg, distributed=grouped),
        )
        stop_check_every = cfg.stop_check_every or (50 if device.type == "cuda" else cpu_stop_check_every(cfg))
        return cls(device, backend, grouped, precision, data_path, blocker, stop_check_every)

    @classmethod
    def for_launch(cls, cfg: TrainConfig, env: DistEnv) -> RunSettings:
        """The settings of this process under its launcher: its device, and the group it will join (if any)."""
        device = pick_device(cfg.device, env)
        return cls.resolve(cfg, device, pick_backend(cfg.backend, device), grouped=env.distributed)

    @property
    def group_backend(self) -> str:
        """The backend as results.json names it: "none" without a process group."""
        return self.backend if self.grouped else "none"

    @classmethod
    def here(cls, cfg: TrainConfig, device: torch.device) -> RunSettings:
        """The settings of a run inside this process, in the process group it is in, if any (`ddp-mnist bench`,
        benchmarks/, tests)."""
        grouped = dist.is_initialized()
        return cls.resolve(cfg, device, dist.get_backend() if grouped else "none", grouped)
