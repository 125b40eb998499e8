"""The errors that explain themselves, in one place, and the tuple of them that ends a command with one
line and status 2 (commands/cli.py). Every other error may come from a failed peer and names its rank."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is wrong. The message says which and how to fix it."""


class DataError(RuntimeError):
    """The data is missing or damaged. The message names the file and says how to fix it."""


class CheckpointError(RuntimeError):
    """No usable checkpoint, or one that does not belong to this job. Names the file."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite: training cannot continue meaningfully."""


class ResourceError(RuntimeError):
    """A file could not be written because something ran out or is closed: space, quota, a read-only file
    system. Says what, names the file, and says how to go on; what was on disk before is intact."""


class MainRankError(RuntimeError):
    """Rank 0 failed in work it did for every rank (`run_on_main`); raised on the other ranks."""


class PeerError(RuntimeError):
    """A collective failed because another rank died, stalled or failed. Says which rank and what it was doing."""


def first_line(error: BaseException) -> str:
    """An error's message as one line, for messages that name the file (torch.load's errors run to a page)."""
    return (str(error).strip().splitlines() or [""])[0]


# Errors that explain themselves (exit status 2); any other error may come from a failed peer.
CLEAR_ERRORS = (ConfigError, DataError, CheckpointError, NonFiniteLossError, ResourceError)
