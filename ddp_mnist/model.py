"""The networks. No batch norm or dropout: both would make N ranks train differently from 1 rank
(per-rank batch statistics, per-rank random masks), and world-size invariance is a design invariant."""

from __future__ import annotations

import torch
from torch import nn

INPUT_SHAPE = (1, 28, 28)  # what every network takes: one channel, 28x28, a grayscale MNIST digit


MLP_PARAMETERS = 523_326  # 784*500+500 + 500*256+256 + 256*10+10
TRAIN_FLOPS_PER_SAMPLE = {"mlp": 2_351_360, "cnn": 67_552_256}
"""Forward + backward FLOPs per image (profiling.flops_per_sample counts them; a test checks these agree)."""


class TutorialMLP(nn.Module):
    """The tutorial's fully connected net, exactly: 784 -> 500 -> 256 -> 10 with ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(28 * 28, 500)
        self.fc2 = nn.Linear(500, 256)
        self.fc3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


class SmallCNN(nn.Module):
    """Two 5x5 conv + max-pool stages, then two fully connected layers (LeNet-like, ~0.85 M parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 28 -> 14
            nn.Conv2d(32, 64, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 14 -> 7
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64 * 7 * 7, 256), nn.ReLU(), nn.Linear(256, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def build_model(name: str) -> nn.Module:
    if name == "mlp":
        return TutorialMLP()
    if name == "cnn":
        return SmallCNN()
    raise ValueError(f"unknown model {name!r}; choose mlp or cnn")


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto`: bf16 on a CUDA GPU that supports it, else fp32 (bf16 autocast on the CPU is slower)."""
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a resolved precision (None: fp32, no autocast)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
