"""Where a step's time goes and how much of the hardware it uses.

- `flops_per_sample`: the model's FLOPs per training sample, counted once by torch.utils.flop_counter
  over one forward and backward (matrix multiplies and convolutions; elementwise ops are not counted,
  as in torchtitan). For the MLP that is forward 2 x weights + backward 4 x weights per sample, less the
  first layer's input gradient, which autograd never computes (the images need no gradient).
- `hardware_efficiency`: achieved FLOP/s from the steady throughput, and MFU (achieved per rank / the
  device's peak) when the peak is known (--peak-tflops, or PEAK_TFLOPS for known GPUs).
- `StepProfiler`: --profile STEPS: a torch.profiler trace of a few training steps on rank 0, written to
  the run folder as Chrome/Perfetto JSON (trace.json; open it in https://ui.perfetto.dev), with a short
  summary of time in all-reduce against compute (results.json's `profile`).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ddp_mnist.model import INPUT_SHAPE, TRAIN_FLOPS_PER_SAMPLE, build_model

log = logging.getLogger("ddp_mnist")


TRACE_FILE = "trace.json"


# Dense bf16 tensor-core peak per GPU (TFLOP/s), as torchtitan's MFU uses it. Matched in this order against
# torch.cuda.get_device_name(): the more specific names first.
PEAK_TFLOPS = (
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10", 125.0),
    ("V100", 125.0),
    ("MI300X", 1307.0),
)


def model_flops(name: str) -> float:
    """FLOPs per training sample of a model by name: the counted table (model.py), else counted now on a fresh
    copy, whose init must not move the run's RNG (exact resume)."""
    known = TRAIN_FLOPS_PER_SAMPLE.get(name)
    if known is not None:
        return float(known)
    with torch.random.fork_rng(devices=[]):
        return flops_per_sample(build_model(name))


def flops_per_sample(model: nn.Module, batch: int = 2) -> float:
    """FLOPs of one forward + backward per sample, counted on a CPU copy (the model is left untouched)."""
    from torch.utils.flop_counter import FlopCounterMode

    probe = copy.deepcopy(model).float().cpu()
    x = torch.zeros(batch, *INPUT_SHAPE)
    counter = FlopCounterMode(display=False)
    with counter:
        probe(x).float().sum().backward()
    return counter.get_total_flops() / batch


def peak_tflops(device: torch.device, explicit: float | None = None) -> float | None:
    """--peak-tflops, else the known peak of this GPU, else None (a CPU has no entry)."""
    if explicit is not None:
        return explicit
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)


def hardware_efficiency(
    model: str,
    samples_per_second: float | None,
    world_size: int,
    device: torch.device,
    explicit_peak: float | None = None,
) -> dict[str, Any]:
    """results.json's keys: flops_per_sample, achieved TFLOP/s (all ranks and per rank), peak and MFU.
    `model`: the network's name; its FLOPs are counted on a fresh copy (never on the training model,
    which a strategy may have wrapped or sharded)."""
    return achieved_flops(model_flops(model), samples_per_second, world_size, peak_tflops(device, explicit_peak))


def achieved_flops(
    flops: float | None, samples_per_second: float | None, world_size: int, peak: float | None
) -> dict[str, Any]:
    """Achieved TFLOP/s (all ranks and per rank) from FLOPs per sample and a throughput; MFU = per rank / peak."""
    achieved = flops * samples_per_second / 1e12 if flops and samples_per_second else None
    per_rank = achieved / world_size if achieved is not None else None
    return {
        "flops_per_sample": flops,
        "achieved_tflops": achieved,
        "achieved_tflops_per_rank": per_rank,
        "peak_tflops": peak,
        "mfu": per_rank / peak if per_rank is not None and peak else None,
    }


# ---------------------------------------------------------------------- the profiler
def is_all_reduce(name: str) -> bool:
    """The collective itself, on its own thread or stream: gloo:all_reduce, nccl:all_reduce, NCCL kernels.
    (c10d::allreduce_ is only the call that enqueues it.)"""
    lower = name.lower()
    return lower.startswith(("gloo:all_reduce", "nccl:all_reduce", "ncclkernel_allreduce", "nccldevkernel_allreduce"))


def summarize(profile: torch.profiler.profile, steps: int, device: torch.device) -> dict[str, Any]:
    """Per profiled step: wall time, time with an all-reduce in flight (it includes waiting for the slowest
    rank), and compute (operators' own time: host ops on the CPU, kernels on a GPU, all-reduce excluded)."""
    events = profile.key_averages()
    cuda = device.type == "cuda"

    def counted(e) -> bool:  # on a GPU the kernels only (their ops' device time would count them twice)
        return getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA if cuda else True

    def own_time(e) -> float:  # microseconds
        return getattr(e, "self_device_time_total", 0.0) if cuda else e.self_cpu_time_total

    step_us = sum(e.cpu_time_total for e in events if e.key.startswith("ProfilerStep"))
    # The collective's own span (on its thread, or its kernel on the GPU), waiting for peers included.
    comm_us = sum((own_time(e) if cuda else e.cpu_time_total) for e in events if is_all_reduce(e.key) and counted(e))
    compute_us = sum(
        own_time(e) for e in events if not is_all_reduce(e.key) and counted(e) and (cuda or e.key.startswith("aten::"))
    )
    step_s = step_us / 1e6 / steps
    return {
        "steps": steps,
        "step_seconds": step_s,
        "all_reduce_seconds": comm_us / 1e6 / steps,
        "compute_seconds": compute_us / 1e6 / steps,
        "all_reduce_fraction": comm_us / step_us if step_us else None,
        "compute_fraction": compute_us / step_us if step_us else None,
        "trace": TRACE_FILE,
    }


class StepProfiler:
    """torch.profiler over `steps` training steps on rank 0, after one step skipped and one of warm-up.
    The train loop calls step() after every step and summary() at the end; off (steps 0, or not rank 0),
    both cost nothing."""

    def __init__(self, steps: int, run_path: Path, active: bool, device: torch.device, tracker=None):
        self.steps, self.path, self.device, self.tracker = steps, Path(run_path) / TRACE_FILE, device, tracker
        self.result: dict[str, Any] | None = None
        self.profile = None
        if steps and active:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profile = torch.profiler.profile(
                activities=activities,
                schedule=torch.profiler.schedule(wait=1, warmup=1, active=steps, repeat=1),
                on_trace_ready=self._write,
            )
            self.profile.start()

    def step(self) -> None:
        if self.profile is not None:
            self.profile.step()

    def summary(self) -> dict[str, Any] | None:
        """Stops the profiler (a run shorter than the profile writes what it recorded) and returns the
        summary; None when off or when the run ended before any profiled step."""
        if self.profile is not None:
            self.profile.stop()
            self.profile = None
            if self.result is None:
                log.warning(
                    "--profile %d: the run ended before a step was profiled (the first 2 steps are warm-up)", self.steps
                )
        return self.result

    def _write(self, profile: torch.profiler.profile) -> None:
        recorded = sum(1 for e in profile.events() if e.name.startswith("ProfilerStep")) or self.steps
        profile.export_chrome_trace(str(self.path))
        self.result = summarize(profile, recorded, self.device)
        log.info(
            "profile of %d step(s): %.2f ms/step, all-reduce %.2f ms (%.0f%%), compute %.2f ms -> %s",
            recorded,
            1e3 * self.result["step_seconds"],
            1e3 * self.result["all_reduce_seconds"],
            100 * (self.result["all_reduce_fraction"] or 0),
            1e3 * self.result["compute_seconds"],
            self.path,
        )
        run = getattr(self.tracker, "run", None)  # W&B: the trace as a file of the run
        if run is not None:
            try:
                run.save(str(self.path), base_path=str(self.path.parent), policy="now")
            except Exception as e:  # noqa: BLE001 - tracking never stops training
                log.warning("W&B: could not save %s (%s: %s)", self.path, type(e).__name__, e)
