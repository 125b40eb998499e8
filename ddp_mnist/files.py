"""Safe writes in folders other people may share (a run folder, a data folder).

Every file is written to a temporary file with a unique, unpredictable name (`tempfile.mkstemp`, which
creates it with O_EXCL), then renamed over the target: a rename replaces a planted symlink instead of
writing through it, and a reader never sees half a file. Files that are opened in place (an append-only
log, a lock) are opened with O_NOFOLLOW.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from ddp_mnist.errors import ResourceError

# What ran out, for the errors a full or closed file system gives, and how to go on.
RESOURCE_HINTS = {
    errno.ENOSPC: "free space on that file system, then start the job again with --resume",
    errno.EDQUOT: "free space within your quota, then start the job again with --resume",
    errno.EROFS: "the file system is mounted read-only; choose a --run-dir on a writable one",
    errno.EFBIG: "the file system does not take a file this large; choose another --run-dir",
}


def resource_error(error: OSError, path: Path) -> ResourceError | None:
    """`error` said as what ran out, naming `path` ("No space left on device (RUN/checkpoints/...)"); None
    when it is not a resource error."""
    hint = RESOURCE_HINTS.get(error.errno or 0)
    return ResourceError(f"{error.strerror} ({path}): {hint}") if hint else None


def atomic_write(
    path: Path, write: Callable[[IO[bytes]], Any], durable: bool = True, before_rename: Callable[[], None] | None = None
) -> None:
    """Write `path` through `write(f)` on a unique temporary file beside it, then rename it into place.
    `durable`: fsync the file before the rename (and the folder after it), so a crash keeps old or new.
    `before_rename`: called with the temporary file complete (fault injection, parallel/faults.py)."""
    try:
        fd, tmp = _temporary(path)
    except OSError as e:
        raise resource_error(e, path) or e from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
    except OSError as e:  # the old file, if any, is untouched: only the temporary one goes
        Path(tmp).unlink(missing_ok=True)
        raise resource_error(e, path) or e from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def copy_atomic(src: IO[bytes], path: Path, durable: bool = False) -> None:
    """Write what an open binary stream holds to `path`, atomically (a file, a decompressing reader...)."""
    atomic_write(path, lambda f: shutil.copyfileobj(src, f, 1 << 22), durable=durable)


def write_text_atomic(path: Path, text: str, durable: bool = False) -> None:
    atomic_write(path, lambda f: f.write(text.encode()), durable=durable)


def write_json_atomic(path: Path, data: Any, durable: bool = False) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n", durable=durable)


def _temporary(path: Path) -> tuple[int, str]:
    # The name starts with "." and ends with ".tmp": cleanup code finds what a killed writer left.
    return tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)


def open_for_append(path: Path) -> int:
    """A file descriptor appending to `path` (created if needed); O_NOFOLLOW: a symlink planted at `path` is an
    error (ELOOP), not a redirect."""
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)


def append_line(path: Path, line: str) -> None:
    """Append one line and fsync, never through a symlink (open_for_append). A line that cannot be written whole
    (a full disk) is cut off again: the file ends where it ended before."""
    fd = open_for_append(path)
    size = os.fstat(fd).st_size
    try:
        with os.fdopen(fd, "ab") as f:
            f.write((line + "\n").encode())
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        with contextlib.suppress(OSError):
            os.truncate(path, size)
        raise resource_error(e, path) or e from None


def check_writable(folder: Path) -> None:
    """Create and remove a uniquely named file in `folder`; raises OSError when it cannot be written."""
    fd, probe = _temporary(folder / "write-test")
    os.close(fd)
    os.unlink(probe)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive flock on `path`, created if needed, never truncated, never through a symlink."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_digest(path: Path, algorithm: str) -> str:
    """The hex digest of a file's bytes (`md5`, `sha256`, ...), read in chunks of 4 MiB."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()
