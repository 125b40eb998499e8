"""MNIST on disk, checked; and the two ways of feeding it to the ranks.

Both data paths follow the DistributedSampler rule (design.md): each epoch draws one permutation
from (seed, epoch); rank r takes every world_size-th index starting at r, and the partial last
global batch is dropped. So the union of the ranks' batches at step k is the 1-rank batch at step k.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .files import copy_atomic, file_lock

DATA_ENV = "DDP_MNIST_DATA"
"""The one setting that says where the data is (a folder holding MNIST/raw/)."""

EMBEDDED_DATA = Path(__file__).resolve().parent / "mnist"
"""The four official .gz files shipped inside the package (MNIST by Yann LeCun, Corinna Cortes and
Christopher J.C. Burges, CC BY-SA 3.0): training works offline with no data folder at all."""

# MD5 of the decompressed official files (identical whatever the .gz compression).
RAW_FILES = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049
MEAN, STD = 0.1307, 0.3081


class DataError(RuntimeError):
    """The data is missing or damaged. The message names the file and says how to fix it."""


# ---------------------------------------------------------------------------------------------
# Finding, decompressing and checking the files
# ---------------------------------------------------------------------------------------------
def find_data_root(explicit: str | None, download: bool = False) -> Path:
    """The folder holding `MNIST/raw/` to read: `--data-dir`, else $DDP_MNIST_DATA, else ./data when it
    holds MNIST (or a download into it is asked for), else the copy shipped inside the package."""
    chosen = explicit or os.environ.get(DATA_ENV)
    if chosen:
        return Path(chosen).expanduser()
    local = Path("data")
    if download or _holds_mnist(local / "MNIST" / "raw"):
        return local
    return EMBEDDED_DATA


def prepare_mnist(data_dir: str | None, download: bool = False) -> Path:
    """Return a root whose `MNIST/raw/` holds the four checked, decompressed files.

    Uses decompressed files when present, else decompresses the `.gz` files (into the data folder, or
    into a cache folder when it is read-only or is the copy inside the package), else, with `download`,
    downloads them with torchvision. Without `download` nothing touches the network.
    """
    root = find_data_root(data_dir, download)
    raw = root / "MNIST" / "raw"
    if root.exists() and not os.access(root, os.R_OK | os.X_OK):
        raise DataError(f"data folder {root} is not readable; fix its permissions or point --data-dir elsewhere")
    if not _holds_mnist(raw):
        if not download:
            raise DataError(_missing_message(root))
        _download(root)
    complete = all((raw / name).exists() for name in RAW_FILES)
    # The package's own copy (also when named by --data-dir) is decompressed into the cache: site-packages
    # may be read-only, and a checkout stays clean.
    in_place = complete or (root.resolve() != EMBEDDED_DATA and _writable(raw))
    target_root = root if in_place else _cache_root()
    for name in RAW_FILES:
        target = target_root / "MNIST" / "raw" / name
        if not (raw / name).exists() and not target.exists():
            _decompress(raw / f"{name}.gz", target)
    if target_root != root:
        for name in RAW_FILES:  # decompressed files that sat beside the .gz ones are used as they are
            if (raw / name).exists():
                _link_or_copy(raw / name, target_root / "MNIST" / "raw" / name)
    check_raw_files(target_root / "MNIST" / "raw")
    return target_root


def _holds_mnist(raw: Path) -> bool:
    """Every file is there, decompressed or as .gz (checked later, whichever it is)."""
    return not _missing_files(raw)


def _missing_files(raw: Path) -> list[str]:
    """The files that are neither decompressed nor .gz in `raw`."""
    return [name for name in RAW_FILES if not (raw / name).exists() and not (raw / f"{name}.gz").exists()]


def check_raw_files(raw: Path) -> None:
    """Structure first (precise messages for wrong or cut files), then the MD5 of each file."""
    counts = {}
    for name in RAW_FILES:
        counts[name] = _check_idx(raw / name)
    for split in ("train", "t10k"):
        images, labels = counts[f"{split}-images-idx3-ubyte"], counts[f"{split}-labels-idx1-ubyte"]
        if images != labels:
            raise DataError(f"{raw}/{split}-images-idx3-ubyte holds {images} images but "
                            f"{split}-labels-idx1-ubyte holds {labels} labels; replace both files with the "
                            f"official ones")
    for name, expected in RAW_FILES.items():
        if _md5(raw / name) != expected:
            raise DataError(f"{raw / name} is corrupt (MD5 differs from the official file); delete it and "
                            f"put the official {name}.gz in {raw}")


def _check_idx(path: Path) -> int:
    """Check an IDX file's header and size; return its item count."""
    is_images = "images" in path.name
    expected_magic, header_len = (IMAGE_MAGIC, 16) if is_images else (LABEL_MAGIC, 8)
    try:
        with open(path, "rb") as f:
            header = f.read(header_len)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}; fix its permissions or replace it") from None
    if len(header) < header_len:
        raise DataError(f"{path} is truncated ({len(header)} bytes, shorter than its header); replace it")
    magic, count = struct.unpack(">II", header[:8])
    if magic != expected_magic:
        raise DataError(f"{path} is not an IDX {'image' if is_images else 'label'} file (magic number "
                        f"{magic}, expected {expected_magic}); replace it with the official file")
    item = 1
    if is_images:
        rows, cols = struct.unpack(">II", header[8:16])
        item = rows * cols
        if (rows, cols) != (28, 28):
            raise DataError(f"{path} holds {rows}x{cols} images, not 28x28; replace it with the official file")
    size, expected = path.stat().st_size, header_len + count * item
    if size != expected:
        raise DataError(f"{path} is truncated or padded: {size:,} bytes, its header says {expected:,}; "
                        f"replace it with the official file")
    return count


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _decompress(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:  # ranks may do this at once: each writes its own temporary file, the rename is atomic
        with gzip.open(src, "rb") as fin:
            copy_atomic(fin, dst)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"cannot decompress {src}: {e}; replace it with the official file") from None


def _link_or_copy(src: Path, dst: Path) -> None:
    if dst.exists():
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(src, "rb") as fin:
        copy_atomic(fin, dst)


def _writable(folder: Path) -> bool:
    """Writable, and not marked read-only (root passes os.access even on a folder marked r-x)."""
    return folder.exists() and os.access(folder, os.W_OK) and bool(folder.stat().st_mode & 0o222)


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ddp-mnist"


def _download(root: Path) -> None:
    """Download with torchvision (which also checks the .gz MD5); one process per node at a time."""
    from torchvision.datasets import MNIST

    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create data folder {root}: {e.strerror}; {_missing_hint(root)}") from None
    raw = root / "MNIST" / "raw"
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(20)  # no network should fail in seconds, not hang
    try:
        with file_lock(root / ".download.lock"):
            if all((raw / n).exists() for n in RAW_FILES):
                return
            placed = {n for n in RAW_FILES if (raw / f"{n}.gz").exists()}  # the user's own files: kept
            try:
                for split in (True, False):
                    MNIST(str(root), train=split, download=True)
            except Exception:
                _discard_failed_downloads(raw, keep=placed)
                raise
    except Exception as e:  # torchvision wraps network errors in several types
        raise DataError(f"{_missing_message(root)}\n(download failed: {type(e).__name__}: {e})") from None
    finally:
        socket.setdefaulttimeout(old_timeout)


def _discard_failed_downloads(raw: Path, keep: set[str]) -> None:
    """torchvision extracts each .gz as soon as its MD5 check passes, and leaves a damaged or cut-off
    download in place: a downloaded .gz without its extracted file is one of those. Removed, so the
    error names it as missing and the next attempt downloads it again instead of decompressing it."""
    for name in RAW_FILES:
        if name not in keep and not (raw / name).exists():
            (raw / f"{name}.gz").unlink(missing_ok=True)


def _missing_message(root: Path) -> str:
    raw = root / "MNIST" / "raw"
    missing = [name + ".gz" for name in _missing_files(raw)]
    if root.resolve() == EMBEDDED_DATA:
        return (f"MNIST not found: the copy shipped with ddp-mnist lacks {', '.join(missing)} in {raw} (a broken "
                f"install): reinstall ddp-mnist, or pass --data-dir DIR, or --download to fetch it into ./data.")
    return f"MNIST not found: {raw} lacks {', '.join(missing)}. {_missing_hint(root)}"


def _missing_hint(root: Path) -> str:
    return (f"Put the four official files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
            f"t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) in DIR/MNIST/raw/ and pass --data-dir DIR "
            f"or set {DATA_ENV}=DIR; or pass --download to fetch them into {root} (needs network access); or "
            f"leave --data-dir and {DATA_ENV} unset to use the copy shipped with ddp-mnist.")


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

    def to(self, device: torch.device) -> "MnistSplit":
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
        return iter(list(super().__iter__())[self.start_index:])

    def __len__(self) -> int:
        return self.num_samples - self.start_index


class LoaderBatches:
    """DataLoader over a DistributedSampler: this rank's batches of one epoch."""

    def __init__(self, split: MnistSplit, rank: int, world_size: int, rank_batch: int, seed: int,
                 device: torch.device, num_workers: int = 0):
        self.sampler = ResumableDistributedSampler(BatchedMnist(split), num_replicas=world_size, rank=rank,
                                                   shuffle=True, seed=seed, drop_last=True)
        self.rank_batch = rank_batch
        self.device = device
        self.loader = DataLoader(BatchedMnist(split), batch_size=rank_batch, sampler=self.sampler,
                                 drop_last=True, collate_fn=keep_batch, num_workers=num_workers,
                                 pin_memory=device.type == "cuda", persistent_workers=num_workers > 0)

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

    def __init__(self, split: MnistSplit, rank: int, world_size: int, rank_batch: int, seed: int,
                 device: torch.device):
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


def make_batches(kind: str, split: MnistSplit, rank: int, world_size: int, rank_batch: int, seed: int,
                 device: torch.device, num_workers: int = 0):
    if kind == "resident":
        return ResidentBatches(split, rank, world_size, rank_batch, seed, device)
    return LoaderBatches(split, rank, world_size, rank_batch, seed, device, num_workers)


def eval_shard(split: MnistSplit, rank: int, world_size: int) -> MnistSplit:
    """Every world_size-th test image from `rank`: each image on exactly one rank, no padding."""
    return MnistSplit(split.images[rank::world_size], split.labels[rank::world_size])
