"""MNIST in memory and in batches: the two ways of feeding it to the ranks, and the evaluation shards.

Both data paths follow the DistributedSampler rule (docs/design.md, Sampler rule): each epoch draws one
permutation from (seed, epoch); rank r takes every world_size-th index starting at r, and the partial last
global batch is dropped. So the union of the ranks' batches at step k is the 1-rank batch at step k.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

MEAN, STD = 0.1307, 0.3081  # of the training images scaled to [0, 1]: --normalize standard


# ---------------------------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------------------------
@dataclass
class MnistSplit:
    """One split as tensors: images uint8 [N, 28, 28], labels int64 [N]."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device) -> MnistSplit:
        return MnistSplit(self.images.to(device), self.labels.to(device))


def load_split(root: Path, train: bool) -> MnistSplit:
    """Read one split's IDX files (already checked by prepare_mnist): the same tensors as torchvision's
    MNIST, without importing torchvision, which costs every process about 2 s of start-up."""
    raw = root / "MNIST" / "raw"
    prefix = "train" if train else "t10k"
    images = _read_idx(raw / f"{prefix}-images-idx3-ubyte", header_len=16).view(-1, 28, 28)
    labels = _read_idx(raw / f"{prefix}-labels-idx1-ubyte", header_len=8).long()
    return MnistSplit(images, labels)


def _read_idx(path: Path, header_len: int) -> torch.Tensor:
    """The uint8 payload of an IDX file (bytearray: torch.frombuffer wants a writable buffer)."""
    return torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8, offset=header_len)


def to_input(images: torch.Tensor, normalize: str) -> torch.Tensor:
    """uint8 images -> float model input. Fused into the step, on whatever device the images are."""
    x = images.div(255.0)  # uint8 / float -> float32 in one kernel (same values as .float().div_(255))
    if normalize == "standard":
        x = x.sub_(MEAN).div_(STD)
    return x.unsqueeze(1)  # [B, 1, 28, 28]; the MLP flattens it


# ---------------------------------------------------------------------------------------------
# The DataLoader path
# ---------------------------------------------------------------------------------------------
class BatchedMnist(Dataset):
    """Map-style dataset that also fetches a whole batch at once (`__getitems__`).

    The DataLoader calls `__getitems__` with the sampler's indices for one batch, so a batch costs
    one tensor gather instead of per-image Python and PIL work: same samples, no per-sample overhead.
    """

    def __init__(self, split: MnistSplit):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int):
        return self.split.images[index], self.split.labels[index]

    def __getitems__(self, indices: list[int]):
        idx = torch.as_tensor(indices)
        return self.split.images[idx], self.split.labels[idx]


def keep_batch(batch):
    """collate_fn for a dataset that already returns whole batches."""
    return batch


class ResumableDistributedSampler(DistributedSampler):
    """torch's DistributedSampler that can start part-way into an epoch (for mid-epoch resume)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.start_index = 0

    def set_position(self, epoch: int, start_index: int) -> None:
        self.set_epoch(epoch)
        self.start_index = start_index

    def __iter__(self):
        return iter(list(super().__iter__())[self.start_index :])

    def __len__(self) -> int:
        return self.num_samples - self.start_index


class LoaderBatches:
    """DataLoader over a DistributedSampler: this rank's batches of one epoch."""

    def __init__(
        self,
        split: MnistSplit,
        rank: int,
        world_size: int,
        rank_batch: int,
        seed: int,
        device: torch.device,
        num_workers: int = 0,
    ):
        self.sampler = ResumableDistributedSampler(
            BatchedMnist(split), num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self.rank_batch = rank_batch
        self.device = device
        self.loader = DataLoader(
            BatchedMnist(split),
            batch_size=rank_batch,
            sampler=self.sampler,
            drop_last=True,
            collate_fn=keep_batch,
            num_workers=num_workers,
            pin_memory=device.type == "cuda",
            persistent_workers=num_workers > 0,
        )

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.sampler.set_position(epoch, start_step * self.rank_batch)  # set_epoch: a new permutation
        for images, labels in self.loader:
            yield (images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True))


# ---------------------------------------------------------------------------------------------
# The device-resident path
# ---------------------------------------------------------------------------------------------
def rank_indices(n: int, seed: int, epoch: int, rank: int, world_size: int) -> torch.Tensor:
    """This rank's sample order for one epoch, exactly as DistributedSampler(shuffle, drop_last) makes it."""
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    permutation = torch.randperm(n, generator=g)
    total = (n // world_size) * world_size
    return permutation[:total][rank::world_size]


class ResidentBatches:
    """The whole training set held on the device once (uint8); batches are gathered there."""

    def __init__(self, split: MnistSplit, rank: int, world_size: int, rank_batch: int, seed: int, device: torch.device):
        self.split = split.to(device)
        self.rank, self.world_size, self.rank_batch, self.seed = rank, world_size, rank_batch, seed
        self.device = device

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = rank_indices(len(self.split), self.seed, epoch, self.rank, self.world_size)
        steps = len(order) // self.rank_batch
        order = order[: steps * self.rank_batch].to(self.device, non_blocking=True).view(steps, self.rank_batch)
        for step in range(start_step, steps):
            idx = order[step]
            yield self.split.images.index_select(0, idx), self.split.labels.index_select(0, idx)


def make_batches(
    kind: str,
    split: MnistSplit,
    rank: int,
    world_size: int,
    rank_batch: int,
    seed: int,
    device: torch.device,
    num_workers: int = 0,
):
    if kind == "resident":
        return ResidentBatches(split, rank, world_size, rank_batch, seed, device)
    return LoaderBatches(split, rank, world_size, rank_batch, seed, device, num_workers)


def eval_shard(split: MnistSplit, rank: int, world_size: int) -> MnistSplit:
    """Every world_size-th test image from `rank`: each image on exactly one rank, no padding."""
    return MnistSplit(split.images[rank::world_size], split.labels[rank::world_size])
