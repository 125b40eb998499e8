"""The training step as one CUDA graph: one replay per optimizer step instead of ~60 kernel launches.

On a GPU the MLP's step needs microseconds of arithmetic but about 1.5 ms of launches from Python;
captured once and replayed, a step is one launch. What a valid capture needs, and what keeps it
training exactly like the eager step (found on an H100; docs/speed.md):

- Nothing in the step may read a value on the host. AdamW is built with `capturable=True` and a tensor
  learning rate that the scheduler fills in place (optim.build_optimizer); SGD reads a tensor lr on
  the host, so it keeps a float lr, which the graph bakes in: only a constant schedule can be
  captured. The fp16 gradient scaler reads its scale on the host: fp16 stays eager.
- DDP: the wrapper is built inside a side stream, 11 eager steps run on that stream before capture,
  and TORCH_NCCL_ASYNC_ERROR_HANDLING=0 is set before the process group starts (PyTorch's CUDA-graph
  notes); gloo collectives cannot be captured.
- The warm-up steps move the parameters and create or move the optimizer state. Both are copied first
  and restored after capture, in place, because the graph holds their addresses. So a captured run and
  an eager run from the same seed follow the same trajectory.
- The graph reads fixed input buffers: each step copies its batch into them, then replays.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
from torch import nn

from ddp_mnist.parallel.collectives import any_rank

log = logging.getLogger("ddp_mnist")


WARMUP_STEPS = 11
"""Eager steps before capture: DDP's reducer needs 11 (PyTorch's CUDA-graph notes), the rest needs 1."""


Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def capture_blocker(
    cuda_graph: str,
    device: torch.device,
    precision: str,
    optimizer: str,
    schedule: str,
    grad_accum: int,
    data_path: str,
    distributed_backend: str | None,
    strategy_blocker: str | None = None,
) -> str | None:
    """Why the step will not be captured, in words for the log; None when it will be.

    `distributed_backend` is the process group's backend, or None when there is no process group.
    `strategy_blocker`: what the data-parallel strategy or its communication hook rules out (strategy.py).
    """
    if cuda_graph == "off":
        return "--cuda-graph off"
    if device.type != "cuda":
        return "CUDA graphs need a GPU and this run is on the CPU"
    if cuda_graph == "auto" and data_path != "resident":
        return "--cuda-graph auto captures only with --data-path resident (the DataLoader is the bottleneck here)"
    if precision == "fp16":
        return "fp16's gradient scaler reads its scale on the host every step; use --precision bf16"
    if optimizer == "sgd" and schedule != "constant":
        return (
            "SGD bakes its float learning rate into the graph, so its schedule must be constant; "
            "use --optimizer adamw or --schedule constant"
        )
    if grad_accum > 1:
        return "--grad-accum > 1 (micro-batches with DDP's no_sync) is not captured"
    if strategy_blocker is not None:
        return strategy_blocker
    if distributed_backend not in (None, "nccl"):
        return f"{distributed_backend} collectives cannot be captured in a CUDA graph; use --backend nccl"
    return None


class Snapshot:
    """Copies of the parameters, buffers and optimizer state; `restore` writes them back in place."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.tensors = [(t, t.detach().clone()) for t in [*model.parameters(), *model.buffers()]]
        self.state = {p: {k: v.clone() for k, v in s.items() if torch.is_tensor(v)} for p, s in optimizer.state.items()}

    @torch.no_grad()
    def restore(self) -> None:
        for tensor, saved in self.tensors:
            tensor.copy_(saved)
        for param, state in self.optimizer.state.items():
            saved_state = self.state.get(param, {})
            for key, value in state.items():
                if not torch.is_tensor(value):
                    continue
                if key in saved_state:
                    value.copy_(saved_state[key])
                else:
                    # State the warm-up created: zero is its fresh value (AdamW's step and moments), or acts
                    # like it (SGD's momentum buffer: 0 * momentum + grad == the first step's clone of grad).
                    value.zero_()


class CapturedStep:
    """`step(images, labels)` captured once as a CUDA graph; calling it copies the batch in and replays.

    Returns the step's loss tensor (the same tensor every call, overwritten by each replay).
    """

    def __init__(
        self,
        step: Step,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        stream: torch.cuda.Stream,
        rank_batch: int,
        device: torch.device,
    ):
        self.images = torch.zeros((rank_batch, 28, 28), dtype=torch.uint8, device=device)
        self.labels = torch.zeros(rank_batch, dtype=torch.int64, device=device)
        self.graph = torch.cuda.CUDAGraph()
        snapshot = Snapshot(model, optimizer)
        current = torch.cuda.current_stream(device)
        try:
            stream.wait_stream(current)
            with torch.cuda.stream(stream):
                for _ in range(WARMUP_STEPS):
                    step(self.images, self.labels)
            current.wait_stream(stream)
            with torch.cuda.graph(self.graph):  # records the kernels; nothing runs, nothing changes
                self.loss = step(self.images, self.labels)
        finally:
            current.wait_stream(stream)  # the restore runs after every warm-up kernel
            snapshot.restore()  # also after a failed capture: the eager fallback starts from the same state

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.images.copy_(images, non_blocking=True)
        self.labels.copy_(labels, non_blocking=True)
        self.graph.replay()
        return self.loss


def choose_step(
    eager: Step,
    blocker: str | None,
    cuda_graph: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    stream: torch.cuda.Stream | None,
    rank_batch: int,
    device: torch.device,
    is_main: bool,
) -> tuple[Step, float | None]:
    """The step to train with: captured when possible, else eager, said in ONE log line (rank 0).

    Returns (step, capture seconds or None). Every rank takes the same decision: a capture that fails on
    any rank makes all ranks train eagerly, so their collectives still match.
    """
    if blocker is None:
        started = time.perf_counter()
        try:
            captured: CapturedStep | None = CapturedStep(eager, model, optimizer, stream, rank_batch, device)
            error = None
        except Exception as e:  # noqa: BLE001 - any capture failure means: train eagerly, and say why
            captured, error = None, f"{type(e).__name__}: {e}".splitlines()[0][:300]
        if any_rank(captured is None, device):  # collective: every rank calls it, and all agree
            blocker = f"capture failed ({error})" if error else "capture failed on another rank"
        else:
            seconds = time.perf_counter() - started
            if is_main:
                log.info(
                    "training step: one CUDA graph replay per step (captured in %.2f s after %d warm-up "
                    "steps; parameters and optimizer state restored)",
                    seconds,
                    WARMUP_STEPS,
                )
            return captured, seconds
    if is_main:
        if cuda_graph == "on":
            log.warning("--cuda-graph on: training step not captured as a CUDA graph, training eagerly: %s", blocker)
        else:
            log.info("training step: eager (%s)", blocker)
    return eager, None
