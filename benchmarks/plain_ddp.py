"""The baseline: the tutorial recipe as a plain DDP script in the style of pytorch/examples.

    torchrun --nproc-per-node 2 benchmarks/plain_ddp.py --data-dir /path/holding/MNIST/raw [--max-steps N]

torchvision MNIST + ToTensor, a DataLoader with a DistributedSampler, DDP(model), SGD lr 0.01, global batch 100
(100 / world size per rank), one epoch: nothing else (no checkpoints, no evaluation, no logging). It depends on
torch and torchvision only, not on ddp_mnist. Rank 0 prints one JSON line: the training loop's seconds (from the
first batch to the last step, after a barrier) and its samples/s.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler


# The tutorial's MLP, as ddp_mnist.model.TutorialMLP, written out: the baseline imports nothing of ddp_mnist.
class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(28 * 28, 500)
        self.fc2 = nn.Linear(500, 256)
        self.fc3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--data-dir", default=os.environ.get("DDP_MNIST_DATA", "data"))
    parser.add_argument("--batch-size", type=int, default=100, help="global batch")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=None)
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    dataset = torchvision.datasets.MNIST(args.data_dir, train=True, transform=torchvision.transforms.ToTensor())
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(dataset, batch_size=args.batch_size // world, sampler=sampler)
    model = DDP(Net())
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)

    dist.barrier()
    started, steps = time.perf_counter(), 0
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        for images, labels in loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(images), labels)
            loss.backward()
            optimizer.step()
            steps += 1
            if args.max_steps is not None and steps >= args.max_steps:
                break
    dist.barrier()
    seconds = time.perf_counter() - started
    if rank == 0:
        samples = steps * args.batch_size
        print(json.dumps({"loop_seconds": seconds, "steps": steps, "samples_per_second": samples / seconds}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
