"""The beginner tutorial's training loop, as written: the baseline that `ddp-mnist bench` compares against.

torchvision's MNIST with `ToTensor`, a `DataLoader(batch_size=100, shuffle=True)`, the tutorial's MLP,
`CrossEntropyLoss` and `SGD(lr=0.01)`, one process, no DDP. Nothing here is tuned: each sample goes
through PIL and `ToTensor` in Python, which is what makes this loop slow on a GPU (the GPU waits for
the DataLoader). The only additions are measurement: the clock is read after synchronising the device,
and the test set is evaluated after each epoch (not timed) to find the time to a target accuracy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ddp_mnist.data.raw_files import prepare_mnist
from ddp_mnist.model import build_model
from ddp_mnist.parallel.device import synchronize

BATCH_SIZE = 100


LEARNING_RATE = 0.01


@dataclass
class TutorialResult:
    epochs: int
    steps: int
    train_seconds: float
    """Time spent in training steps (device synchronised before reading the clock); evaluation excluded."""
    samples_per_second: float
    epoch_seconds: list[float] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)
    """Test accuracy (%) after each epoch (or after the last step when stopped by max_steps)."""
    time_to_target: float | None = None
    """Training seconds until the test accuracy first reached the target; None if it never did."""


def run_tutorial(
    data_dir: str | None,
    device: torch.device,
    model_name: str = "mlp",
    epochs: int = 10,
    max_steps: int | None = None,
    target_accuracy: float = 98.0,
    seed: int = 0,
    evaluate_each_epoch: bool = True,
) -> TutorialResult:
    """Train as the tutorial does; `max_steps` ends early (quick checks and warm-up runs, which need no
    evaluation: `evaluate_each_epoch=False`)."""
    import torchvision
    import torchvision.transforms as transforms

    root = str(prepare_mnist(data_dir))
    torch.manual_seed(seed)
    train_dataset = torchvision.datasets.MNIST(root=root, train=True, transform=transforms.ToTensor(), download=False)
    test_dataset = torchvision.datasets.MNIST(root=root, train=False, transform=transforms.ToTensor(), download=False)
    train_loader = torch.utils.data.DataLoader(dataset=train_dataset, batch_size=BATCH_SIZE, shuffle=True)
    test_loader = torch.utils.data.DataLoader(dataset=test_dataset, batch_size=BATCH_SIZE, shuffle=False)

    model = build_model(model_name).to(device)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    flatten = model_name == "mlp"  # the tutorial reshapes images to 784-vectors for its MLP

    result = TutorialResult(epochs=0, steps=0, train_seconds=0.0, samples_per_second=0.0)
    losses = []
    for epoch in range(epochs):
        synchronize(device)
        started = time.perf_counter()
        for i, (images, labels) in enumerate(train_loader):
            images = images.reshape(-1, 28 * 28).to(device) if flatten else images.to(device)
            labels = labels.to(device)

            outputs = model(images)
            loss = criterion(outputs, labels)

            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

            result.steps += 1
            if (i + 1) % 100 == 0:
                losses.append(loss.item())  # the tutorial prints this: a host sync every 100 steps
            if max_steps is not None and result.steps >= max_steps:
                break
        synchronize(device)
        seconds = time.perf_counter() - started
        result.epoch_seconds.append(seconds)
        result.train_seconds += seconds
        result.epochs = epoch + 1
        if evaluate_each_epoch:
            result.test_accuracy.append(evaluate(model, test_loader, device, flatten))
            if result.time_to_target is None and result.test_accuracy[-1] >= target_accuracy:
                result.time_to_target = result.train_seconds
        if max_steps is not None and result.steps >= max_steps:
            break
    result.samples_per_second = result.steps * BATCH_SIZE / max(result.train_seconds, 1e-9)
    return result


@torch.no_grad()
def evaluate(model: nn.Module, test_loader, device: torch.device, flatten: bool) -> float:
    """The tutorial's test loop: accuracy (%) over the 10,000 test images."""
    correct, total = 0, 0
    for images, labels in test_loader:
        images = images.reshape(-1, 28 * 28).to(device) if flatten else images.to(device)
        labels = labels.to(device)
        outputs = model(images)
        _, predicted = torch.max(outputs.data, 1)
        total += labels.size(0)
        correct += (predicted == labels).sum().item()
    return 100.0 * correct / total
