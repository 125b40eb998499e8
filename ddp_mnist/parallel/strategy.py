"""Data parallelism: the one place that wraps the model and optimizer for the ranks, and gives the
checkpoint their FULL state, whatever the strategy.

- `ddp`: DistributedDataParallel (bucket size, static graph, gradients as bucket views) with an optional
  communication hook: fp16/bf16 compression (stateless) or PowerSGD (state: each rank's error feedback,
  the warm-start Q, its step counter and RNG, saved per parameter as plain tensors and numbers, so that
  `torch.load(weights_only=True)` reads them and DDP's bucket layout does not matter).
- `zero1`: DDP + ZeroRedundancyOptimizer, each rank keeping the optimizer state of its share of the
  parameters. Its state_dict is consolidated on rank 0: the ordinary optimizer state_dict, loadable at
  any world size.
- `fsdp`: FSDP2 (`fully_shard` per layer, then the root). Model and optimizer states are gathered FULL
  (torch.distributed.checkpoint.state_dict) and the optimizer's converted to parameter indices, so the
  checkpoint's `model` and `optimizer` look like DDP's: any strategy, any world size can resume it.

Without a process group (one process, no launcher) every strategy is the plain model and optimizer.

FSDP2's forward all-gathers parameters, so evaluation (evaluation.evaluate, exact: every test image on one
rank) is a collective there: every rank must make the same number of forward passes. The shards of the
10,000 test images differ by at most one image and are evaluated in chunks of EVAL_CHUNK = 2,000: two
shards never fall on either side of a multiple of 2,000, so the counts agree at every world size.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ddp_mnist.config.train_config import TrainConfig
from ddp_mnist.optim import load_optimizer_state_in_place
from ddp_mnist.parallel.collectives import broadcast_from_main, gather_to_main, is_main_rank
from ddp_mnist.parallel.device import on_stream
from ddp_mnist.parallel.fsdp import full_fsdp_state, load_full_fsdp_state, shard_model
from ddp_mnist.parallel.powersgd import PowerSGD

log = logging.getLogger("ddp_mnist")


def capture_blocker_of(cfg: TrainConfig, distributed: bool) -> str | None:
    """Why this strategy's step cannot be captured as a CUDA graph (capture.py), or None. Without a process
    group (`distributed` False) there is no strategy or hook (Strategy.name is `none`): nothing blocks."""
    if not distributed:
        return None
    if cfg.strategy == "zero1":
        return (
            "--strategy zero1: ZeroRedundancyOptimizer broadcasts each rank's updated parameters with "
            "host-side bookkeeping every step; it is not captured"
        )
    if cfg.strategy == "fsdp":
        return "--strategy fsdp: FSDP2's all-gathers and reduce-scatters are driven by host-side state; not captured"
    if cfg.comm_hook == "powersgd":
        return (
            "--comm-hook powersgd decides on the host every step (its step counter, which tensors to "
            "compress, a fresh random Q): it cannot be captured"
        )
    if cfg.comm_hook != "none":
        return f"--comm-hook {cfg.comm_hook}: communication hooks are not verified under CUDA-graph capture"
    if cfg.static_graph or cfg.gradient_as_bucket_view:
        return "--static-graph / --gradient-as-bucket-view are not verified under CUDA-graph capture"
    return None


class Strategy:
    """Owns the wrapped model (what the step runs), the optimizer, and any communication-hook state.

    Build it, then hand it the optimizer built on `model.parameters()` (after `wrap_model`: FSDP's
    parameters are sharded DTensors) through `wrap_optimizer`.
    """

    def __init__(self, cfg: TrainConfig, device: torch.device):
        self.cfg, self.device = cfg, device
        self.distributed = dist.is_initialized()
        self.name = cfg.strategy if self.distributed else "none"
        self.model: nn.Module | None = None  # the unwrapped model (FSDP2 shards it in place)
        self.ddp: DDP | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.powersgd: PowerSGD | None = None

    # ------------------------------------------------------------------ building
    def wrap_model(self, model: nn.Module, stream: torch.cuda.Stream | None = None) -> nn.Module:
        """The module the training step calls: DDP around `model`, or `model` itself (sharded in place by
        FSDP2, or plain without a process group)."""
        self.model = model
        if not self.distributed:
            if self.cfg.strategy != "ddp" or self.cfg.comm_hook != "none":
                log.info(
                    "one process without a process group: --strategy %s / --comm-hook %s do not apply",
                    self.cfg.strategy,
                    self.cfg.comm_hook,
                )
            return model
        if self.cfg.strategy == "fsdp":
            return shard_model(model, self.device)
        with on_stream(stream):  # a captured DDP step needs DDP built in a side stream
            self.ddp = DDP(
                model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                bucket_cap_mb=self.cfg.bucket_cap_mb,
                static_graph=self.cfg.static_graph,
                gradient_as_bucket_view=self.cfg.gradient_as_bucket_view,
            )
        self.register_hook()
        return self.ddp

    def register_hook(self) -> None:
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        hook = self.cfg.comm_hook
        if hook == "fp16":
            self.ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
        elif hook == "bf16":
            self.ddp.register_comm_hook(None, default_hooks.bf16_compress_hook)
        elif hook == "powersgd":
            self.powersgd = PowerSGD(self.model, self.cfg.powersgd_rank, self.cfg.powersgd_start_step, self.cfg.seed)
            self.ddp.register_comm_hook(self.powersgd.state, self.powersgd.hook)
        if hook != "none":
            log.info(
                "DDP communication hook: %s%s",
                hook,
                f" (rank {self.cfg.powersgd_rank}, compressing from step {self.cfg.powersgd_start_step + 1})"
                if hook == "powersgd"
                else "",
            )

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """zero1: the same optimizer class and settings, its state split over the ranks."""
        if self.name == "zero1":
            from torch.distributed.optim import ZeroRedundancyOptimizer

            accepted = inspect.signature(type(optimizer).__init__).parameters
            settings = {k: v for k, v in optimizer.defaults.items() if k in accepted}
            optimizer = ZeroRedundancyOptimizer(self.model.parameters(), optimizer_class=type(optimizer), **settings)
        self.optimizer = optimizer
        return optimizer

    def make_scaler(self, enabled: bool) -> torch.amp.GradScaler:
        """fp16's gradient scaler. FSDP's gradients are shards: its scaler agrees on overflow across ranks."""
        if self.name == "fsdp":
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            return ShardedGradScaler(self.device.type, enabled=enabled)
        return torch.amp.GradScaler(self.device.type, enabled=enabled)

    @contextlib.contextmanager
    def no_sync(self, sync: bool) -> Iterator[None]:
        """Gradient accumulation: inner micro-batches (sync=False) skip the gradient all-reduce / reduce-scatter."""
        if sync or not self.distributed:
            yield
        elif self.ddp is not None:
            with self.ddp.no_sync():
                yield
        else:  # FSDP2
            self.model.set_requires_gradient_sync(False)  # type: ignore[operator]  # an FSDPModule's method
            try:
                yield
            finally:
                self.model.set_requires_gradient_sync(True)  # type: ignore[operator]

    # ------------------------------------------------------------------ full state for the checkpoint
    def state_dict(self) -> dict[str, Any]:
        """Collective (every rank calls it). On rank 0: the unwrapped model's ordinary state_dict, the
        ordinary (parameter-index) optimizer state_dict, and each rank's hook state; elsewhere: {}."""
        main = is_main_rank()
        if self.name == "fsdp":
            model, optimizer = full_fsdp_state(self.model, self.optimizer)
        else:
            if self.name == "zero1":
                self.optimizer.consolidate_state_dict(to=0)  # type: ignore[union-attr]  # collective
            model = self.model.state_dict() if main else None
            optimizer = self.optimizer.state_dict() if main else None
        hooks = gather_to_main(self.hook_state())  # collective
        return {"model": model, "optimizer": optimizer, "comm_hook": hooks} if main else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Every rank loads the full state; each takes its own share."""
        if self.name == "fsdp":
            load_full_fsdp_state(self.model, self.optimizer, state["model"], state["optimizer"])
        else:
            self.model.load_state_dict(state["model"])
            if self.name == "zero1":
                self.optimizer.load_state_dict(state["optimizer"])
            else:
                load_optimizer_state_in_place(self.optimizer, state["optimizer"])
        self.load_hook_state(state.get("comm_hook"))

    def hook_state(self) -> dict[str, Any] | None:
        return self.powersgd.state_dict() if self.powersgd is not None else None

    def load_hook_state(self, per_rank: list | None) -> None:
        """PowerSGD's error feedback is each rank's own: it carries over only at the same world size."""
        if self.powersgd is None:
            return
        mine = per_rank[dist.get_rank()] if per_rank and len(per_rank) == dist.get_world_size() else None
        if mine is None or mine.get("hook") != "powersgd" or mine.get("rank") != self.cfg.powersgd_rank:
            log.warning(
                "the checkpoint holds no PowerSGD state for rank %d at world size %d; PowerSGD starts "
                "afresh, its error feedback empty",
                self.cfg.powersgd_rank,
                dist.get_world_size(),
            )
            return
        self.powersgd.load_state_dict(mine, self.device)

    # ------------------------------------------------------------------ reporting
    def memory_bytes(self) -> dict[str, int]:
        """Bytes this rank holds: parameters, gradients, optimizer state (FSDP: its local shards)."""
        inner = getattr(self.optimizer, "optim", self.optimizer)  # ZeRO keeps its shard's state in .optim
        return {
            "param": sum(_bytes(p) for p in self.model.parameters()),
            "grad": sum(_bytes(p.grad) for p in self.model.parameters() if p.grad is not None),
            "optimizer": sum(_bytes(v) for s in inner.state.values() for v in s.values() if torch.is_tensor(v)),
        }

    def report(self) -> dict[str, Any]:
        """results.json's keys for the strategy (collective: every rank calls it, every rank gets them).
        `*_bytes_per_rank`: the mean over the ranks (all the ranks' bytes / world size), so a split over N
        ranks shows as 1/N; `memory_bytes_by_rank` lists each rank's."""
        ranks = broadcast_from_main(gather_to_main(self.memory_bytes()))
        out: dict[str, Any] = {
            "strategy": self.cfg.strategy,
            "strategy_resolved": self.name,
            "comm_hook": self.cfg.comm_hook,
            "bucket_cap_mb": self.cfg.bucket_cap_mb,
            "static_graph": self.cfg.static_graph,
            "gradient_as_bucket_view": self.cfg.gradient_as_bucket_view,
            "powersgd_rank": self.cfg.powersgd_rank,
            "powersgd_start_step": self.cfg.powersgd_start_step,
            "memory_bytes_by_rank": {k: [r[k] for r in ranks] for k in ("param", "grad", "optimizer")},
        }
        for key in ("param", "grad", "optimizer"):
            out[f"{key}_bytes_per_rank"] = sum(r[key] for r in ranks) / len(ranks)
        if self.powersgd is not None:
            s = self.powersgd.state
            out["powersgd_iterations"] = s.iter
            out["powersgd_numel_before_compression"] = s.total_numel_before_compression
            out["powersgd_numel_after_compression"] = s.total_numel_after_compression
            if s.total_numel_after_compression:
                log.info(
                    "PowerSGD: compressed the gradients %.0fx (%d of %d elements all-reduced) from step %d to step %d",
                    s.total_numel_before_compression / s.total_numel_after_compression,
                    s.total_numel_after_compression,
                    s.total_numel_before_compression,
                    s.start_powerSGD_iter + 1,
                    s.iter,
                )
        return out


def _bytes(tensor: torch.Tensor) -> int:
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor  # a DTensor: this rank's shard
    return local.numel() * local.element_size()
