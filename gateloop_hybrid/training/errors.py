"""What stops a run, as exceptions that the command lines print as one line each.

``TrainError`` is the base: ``ConfigError`` and ``DataError`` for what is wrong before a run starts
(exit code 2), ``CheckpointError``, ``OutputError`` and ``DivergedError`` for what goes wrong after
(exit code 1). Under torchrun an error may be marked as met by every rank alike
(``every_rank``): the command line then prints it once, from rank 0.
"""

from __future__ import annotations

import errno
import os


class TrainError(Exception):
    """A run that cannot start or cannot go on. The command line prints the message as one line."""

    exit_code = 1


class ConfigError(TrainError, ValueError):
    """A flag out of range, or flags that contradict each other, the checkpoint or the other ranks."""

    exit_code = 2


class DataError(TrainError):
    """The data file is missing, unreadable, empty, not a regular file, too short for the flags,
    or not the data a resumed checkpoint was trained on."""

    exit_code = 2


class CheckpointError(TrainError):
    """A checkpoint that cannot be read (damaged, altered, not train.py's) or written."""


class OutputError(TrainError):
    """The output folder or the metrics file cannot be written, or the disk is too full."""


class DivergedError(TrainError):
    """The training loss became nan or inf; the weights are not saved over the last checkpoint."""


def every_rank(e: TrainError, origin: int | None = None) -> TrainError:
    """Mark an error that every rank raises alike: the command line prints it on rank 0 only.
    ``origin``: the rank that met it, when the others only learnt of it (printed with the line)."""
    e.every_rank = True
    if origin is not None:
        e.origin = origin
    return e


def os_reason(e: OSError) -> str:
    """A few words for why a file operation failed: "disk full", "read-only file system", ..."""
    words = {
        errno.ENOSPC: "disk full (no space left on device)",
        errno.EDQUOT: "disk quota exceeded",
        errno.EROFS: "read-only file system",
        errno.EACCES: "permission denied",
        errno.EPERM: "operation not permitted",
        errno.EFBIG: "file too large for this file system or process limit",
        errno.EIO: "input/output error",
        errno.ENOENT: "no such file or folder",
        errno.ENOTDIR: "a path component is not a folder",
        errno.EISDIR: "is a folder",
        errno.EEXIST: "a file is in the way (the path needs a folder there)",
    }
    return words.get(e.errno) or e.strerror or str(e) or type(e).__name__


def env_rank(env=os.environ) -> int | None:
    """This process's RANK as torchrun set it, or None when it is unset or not a number."""
    try:
        return int(env["RANK"])
    except (KeyError, ValueError):
        return None
