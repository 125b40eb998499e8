"""The optimizer and the learning-rate schedule: built here, once, for every strategy and both steps
(eager and captured as a CUDA graph, capture.py)."""

from __future__ import annotations

import torch
from torch import nn

from ddp_mnist.config.train_config import TrainConfig


def build_optimizer(cfg: TrainConfig, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if device.type == "cuda":
        # capturable + a tensor lr (filled in place by the scheduler): the step can be captured as a CUDA
        # graph, and the eager step runs the very same arithmetic, so both train identically.
        return torch.optim.AdamW(
            model.parameters(),
            lr=torch.tensor(cfg.lr, device=device),
            weight_decay=cfg.weight_decay,
            fused=True,
            capturable=True,
        )
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer):
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=cfg.lr,
            total_steps=cfg.steps_per_epoch * cfg.epochs,
            pct_start=0.25,
            div_factor=10.0,
            final_div_factor=100.0,
            cycle_momentum=False,
        )  # a captured step bakes momentum in
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    lr = optimizer.param_groups[0]["lr"]
    return lr.item() if torch.is_tensor(lr) else float(lr)  # SYNC on CUDA (a tensor lr)


def load_optimizer_state_in_place(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """`optimizer.load_state_dict`, keeping the tensors and settings this optimizer was built with.

    `load_state_dict` replaces the state tensors and the param groups (their `lr` and flags such as
    `capturable`) with the checkpoint's. A captured graph reads the tensors it was captured with, and this
    run's settings (a tensor lr on CUDA, a float lr on the CPU) must stay as built: copy the values in.
    """
    kept_groups = [dict(group) for group in optimizer.param_groups]
    kept_state = {p: dict(s) for p, s in optimizer.state.items()}
    optimizer.load_state_dict(state)
    with torch.no_grad():
        for group, kept in zip(optimizer.param_groups, kept_groups):
            for key in ("capturable", "fused", "foreach", "differentiable"):
                if key in kept:
                    group[key] = kept[key]
            if torch.is_tensor(kept["lr"]):
                kept["lr"].fill_(float(group["lr"]))
                group["lr"] = kept["lr"]
            else:
                group["lr"] = float(group["lr"])
            for param in group["params"]:
                loaded = optimizer.state.get(param, {})
                for key, value in loaded.items():
                    old = kept_state.get(param, {}).get(key)
                    if torch.is_tensor(old) and torch.is_tensor(value):
                        loaded[key] = old.copy_(value)
                    elif key == "step" and torch.is_tensor(value) and (group.get("capturable") or group.get("fused")):
                        loaded[key] = value.to(param.device, torch.float32)  # these keep `step` on the device
