"""Which device and backend a rank uses, and the device's clock and streams."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

import torch

from ddp_mnist.errors import ConfigError
from ddp_mnist.parallel.env import DistEnv


def pick_device(requested: str, env: DistEnv) -> torch.device:
    """This rank's CUDA device (`gpu_index`), or the CPU. Fails fast on impossible requests."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    index = gpu_index(env, torch.cuda.device_count())
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def gpu_index(env: DistEnv, visible: int) -> int:
    """Which of the `visible` GPUs this rank uses. Exactly one visible (SLURM `--gpus-per-task`, a per-rank
    CUDA_VISIBLE_DEVICES, or one GPU that several gloo ranks share): cuda:0, whatever the local rank.
    Several visible: the local rank's, which must exist."""
    if visible == 1:
        return 0
    if env.local_rank >= visible:
        raise ConfigError(
            f"local rank {env.local_rank} needs GPU {env.local_rank} but only {visible} GPU(s) are "
            f"visible on this node; start at most {visible} processes per node, or give each rank "
            f"its own GPU (SLURM --gpus-per-task=1, or one CUDA_VISIBLE_DEVICES per rank)"
        )
    return env.local_rank


def gpu_identity(device: torch.device) -> str:
    """The physical GPU behind `device`, the same string in every process that uses it."""
    return f"{socket.gethostname()}/{torch.cuda.get_device_properties(device).uuid}"


def shared_gpus(identities: dict[int, str]) -> list[list[int]]:
    """Groups of ranks (two or more) that use the same physical GPU."""
    by_gpu: dict[str, list[int]] = {}
    for rank, gpu in sorted(identities.items()):
        by_gpu.setdefault(gpu, []).append(rank)
    return [ranks for ranks in by_gpu.values() if len(ranks) > 1]


def pick_backend(requested: str, device: torch.device) -> str:
    if requested == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if requested == "nccl" and device.type != "cuda":
        raise ConfigError(
            "--backend nccl needs a CUDA GPU but this process runs on the CPU; use --backend gloo (or auto)"
        )
    return requested


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a host-device sync; nothing to wait for on the CPU): before reading
    a clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def side_stream(planned: bool, device: torch.device) -> torch.cuda.Stream | None:
    """The stream DDP is built in and warm-up runs on when a capture is planned."""
    return torch.cuda.Stream(device) if planned else None


@contextlib.contextmanager
def on_stream(stream: torch.cuda.Stream | None) -> Iterator[None]:
    """Run the block on `stream` (no-op for None); then the current stream waits for what the block queued
    there (DDP broadcasts rank 0's weights on it) before anything else runs."""
    if stream is None:
        yield
        return
    with torch.cuda.stream(stream):
        yield
    torch.cuda.current_stream(stream.device).wait_stream(stream)
