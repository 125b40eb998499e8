"""MNIST on disk: where its four files are (the --data-dir rule), checked, decompressed or downloaded."""

from __future__ import annotations

import gzip
import json
import os
import socket
import struct
from pathlib import Path

from ddp_mnist.errors import DataError
from ddp_mnist.files import copy_atomic, file_digest, file_lock, write_json_atomic

DATA_ENV = "DDP_MNIST_DATA"
"""The one setting that says where the data is (a folder holding MNIST/raw/)."""


EMBEDDED_DATA = Path(__file__).resolve().parent.parent / "mnist"
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
            raise DataError(
                f"{raw}/{split}-images-idx3-ubyte holds {images} images but "
                f"{split}-labels-idx1-ubyte holds {labels} labels; replace both files with the "
                f"official ones"
            )
    stamp = _cache_root() / VERIFIED_FILE
    verified = _read_verified(stamp)
    known = dict(verified)
    for name, expected in RAW_FILES.items():
        key, facts = _identity(raw / name)
        if verified.get(key) == [*facts, expected]:
            continue  # this very file (same inode, size, mtime and ctime) matched its MD5 before
        if file_digest(raw / name, "md5") != expected:
            raise DataError(
                f"{raw / name} is corrupt (MD5 differs from the official file); delete it and "
                f"put the official {name}.gz in {raw}"
            )
        verified[key] = [*facts, expected]
    if verified != known:
        try:
            stamp.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(stamp, verified)
        except OSError:
            pass  # a read-only cache: the next start checks the MD5s again


VERIFIED_FILE = "verified-files.json"
"""In the cache folder: the files whose MD5 matched, each with what identifies that version of it (a changed
file, even one rewritten with the same size and an old mtime, gets a new ctime and is checked again)."""


def _identity(path: Path) -> tuple[str, list[int]]:
    st = path.stat()
    return str(path.resolve()), [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _read_verified(stamp: Path) -> dict[str, list]:
    """The stamp's entries; a missing or damaged stamp is an empty one (every file is checked)."""
    try:
        data = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, list)} if isinstance(data, dict) else {}


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
        raise DataError(
            f"{path} is not an IDX {'image' if is_images else 'label'} file (magic number "
            f"{magic}, expected {expected_magic}); replace it with the official file"
        )
    item = 1
    if is_images:
        rows, cols = struct.unpack(">II", header[8:16])
        item = rows * cols
        if (rows, cols) != (28, 28):
            raise DataError(f"{path} holds {rows}x{cols} images, not 28x28; replace it with the official file")
    size, expected = path.stat().st_size, header_len + count * item
    if size != expected:
        raise DataError(
            f"{path} is truncated or padded: {size:,} bytes, its header says {expected:,}; "
            f"replace it with the official file"
        )
    return count


def _decompress(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:  # ranks may do this at once: each writes its own temporary file, the rename is atomic
        with gzip.open(src, "rb") as fin:
            copy_atomic(fin, dst)  # type: ignore[arg-type]  # a GzipFile reads bytes
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
    except Exception as e:  # noqa: BLE001 - torchvision wraps network errors in several types
        tried = ", ".join(MNIST.mirrors)  # named here: torchvision's own message names them in some versions only
        raise DataError(f"{_missing_message(root)}\n(download failed from {tried}: {type(e).__name__}: {e})") from None
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
        return (
            f"MNIST not found: the copy shipped with ddp-mnist lacks {', '.join(missing)} in {raw} (a broken "
            f"install): reinstall ddp-mnist, or pass --data-dir DIR, or --download to fetch it into ./data."
        )
    return f"MNIST not found: {raw} lacks {', '.join(missing)}. {_missing_hint(root)}"


def _missing_hint(root: Path) -> str:
    return (
        f"Put the four official files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        f"t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) in DIR/MNIST/raw/ and pass --data-dir DIR "
        f"or set {DATA_ENV}=DIR; or pass --download to fetch them into {root} (needs network access); or "
        f"leave --data-dir and {DATA_ENV} unset to use the copy shipped with ddp-mnist."
    )
