"""Ending a process from a helper thread, for when its main thread may be blocked for good in C code (a store's
handshake, a collective, a host read) and no exception could reach it: the last resort of the join deadline,
the watchdog and the stop signals."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from typing import NoReturn


def end_process(line: str, status: int) -> NoReturn:
    """Say LINE on stderr and end the process at once with STATUS, without unwinding the main thread."""
    os.write(2, (line + "\n").encode())
    os._exit(status)


@contextlib.contextmanager
def deadline(seconds: float, line: str, status: int) -> Iterator[None]:
    """Ends the process with LINE and STATUS unless the block is over within SECONDS."""
    timer = threading.Timer(seconds, end_process, args=(line, status))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
