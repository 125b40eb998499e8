"""The optimizer and the learning-rate schedule: built here, once, for every strategy and both steps
(eager and captured as a CUDA graph, capture.py)."""

from __future__ import annotations

import torch
from torch import nn

from .config import TrainConfig


def build_optimizer(cfg: TrainConfig, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if device.type == "cuda":
        # capturable + a tensor lr (filled in place by the scheduler): the step can be captured as a CUDA
        # graph, and the eager step runs the very same arithmetic, so both train identically.
        return torch.optim.AdamW(model.parameters(), lr=torch.tensor(cfg.lr, device=device),
                                 weight_decay=cfg.weight_decay, fused=True, capturable=True)
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer):
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=cfg.steps_per_epoch * cfg.epochs,
                                                   pct_start=0.25, div_factor=10.0, final_div_factor=100.0,
                                                   cycle_momentum=False)  # a captured step bakes momentum in
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    lr = optimizer.param_groups[0]["lr"]
    return lr.item() if torch.is_tensor(lr) else float(lr)  # SYNC on CUDA (a tensor lr)
