"""Checkpoints: one file, <out-dir>/checkpoint.pt, replaced atomically (written to a temporary file,
fsync'd, then renamed over the old one), holding only tensors and plain Python values so that
``torch.load(..., weights_only=True)`` opens it without running code from it, plus a sha256 of
those contents that ``load_checkpoint`` verifies, and the RNG states a resume needs.

Contents: format, step, config (TrainConfig as a dict), model, optimizer, rng, tokens_seen,
train_time_s, log_window, data_len (the split sizes), world_size (under torchrun), data_fingerprint
(see ``data.fingerprint``; absent from checkpoints written before it was recorded), checksum.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import math
import os
import random
import warnings
from pathlib import Path

import torch

from .errors import CheckpointError, os_reason

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = "gateloop_hybrid.train/2"  # /2 adds the content checksum
OLD_CHECKPOINT_FORMATS = ("gateloop_hybrid.train/1",)  # read, with a warning that nothing is verified
CHECKPOINT_KEYS = ("format", "step", "config", "model", "optimizer", "rng", "tokens_seen", "train_time_s",
                   "log_window", "data_len")


def digest(obj, h) -> None:
    """Feed obj (tensors, dicts, lists, tuples and plain values, nested) into the hash h, with
    types, shapes and lengths, so that no two different contents give the same byte stream."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(obj.shape)}:".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        h.update(b"D%d:" % len(obj))
        for k in sorted(obj, key=lambda k: (type(k).__name__, repr(k))):
            digest(k, h)
            digest(obj[k], h)
    elif isinstance(obj, (list, tuple)):
        h.update(b"%s%d:" % (type(obj).__name__.encode(), len(obj)))
        for v in obj:
            digest(v, h)
    elif obj is None or isinstance(obj, (bool, int, float, str)):
        text = repr(obj).encode()
        h.update(b"%s%d:%s" % (type(obj).__name__.encode(), len(text), text))
    else:
        raise TypeError(f"checkpoint content of type {type(obj).__name__} is not supported")


def content_checksum(state: dict) -> str:
    """sha256 of everything in state except its "checksum" entry."""
    h = hashlib.sha256()
    digest({k: v for k, v in state.items() if k != "checksum"}, h)
    return "sha256:" + h.hexdigest()


def write_all(f, data) -> None:
    """Write data to the open file f (looked up at each write, so that tests can fail or die in it)."""
    f.write(data)


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    """Write state, with its content checksum, to path atomically: a temporary file beside it,
    fsync, rename, fsync the folder.

    A crash, kill or Ctrl-C at any point leaves either the old checkpoint or the new one, whole.
    The file is serialised in memory first, so that a failed write is an OSError with its errno
    (not torch's "unexpected pos"); it is raised as CheckpointError, in one line saying why (disk
    full, read-only, ...), with the old checkpoint untouched.
    """
    path = Path(path)
    state = dict(state, checksum=None)
    state["checksum"] = content_checksum(state)
    buf = io.BytesIO()
    torch.save(state, buf)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        with open(tmp, "wb") as f:
            write_all(f, buf.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise CheckpointError(f"cannot write the checkpoint {path}: {os_reason(e)}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def load_error_reason(e: BaseException) -> str:
    """Why torch.load failed, in a few words that never advise loading with weights_only=False."""
    text = (str(e).strip().splitlines() or [""])[0]
    if "weights_only" in str(e) or "Unpickl" in type(e).__name__:
        # torch's advice here is to load with weights_only=False, which would run code from the
        # file: never to be followed for a file that fails to load
        return "it does not read as tensors and plain values, all that train.py writes: damaged, or holding code"
    if "PytorchStreamReader" in text or "zip archive" in text or "inline_container" in text:
        return "truncated, or its zip structure is damaged"
    text = text.split(". ")[0][:100]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Open a checkpoint without running code from it (weights_only=True), and verify it.

    Raises CheckpointError, naming the file, when it is missing, cannot be read, was altered
    after it was written (its content checksum differs), was not written by train.py, or holds
    an entry of the wrong kind (a config that is not a dict, a step that is not a count, ...).
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM, errno.EIO, errno.ENOENT, errno.EISDIR):
            raise CheckpointError(f"cannot read the checkpoint {path}: {os_reason(e)}") from None
        raise CheckpointError(f"{path} is damaged or is not a checkpoint written by train.py "
                              f"(truncated, or its zip structure is damaged); it cannot be used") from None
    except MemoryError:
        raise CheckpointError(f"{path} is damaged (it asks for more memory than there is); "
                              f"it cannot be used") from None
    except Exception as e:  # noqa: BLE001 - zip, pickle, EOF, key errors: all mean a damaged file
        raise CheckpointError(f"{path} is damaged or is not a checkpoint written by train.py "
                              f"({load_error_reason(e)}); it cannot be used") from None
    fmt = state.get("format") if isinstance(state, dict) else None
    if fmt not in (CHECKPOINT_FORMAT, *OLD_CHECKPOINT_FORMATS):
        raise CheckpointError(f"{path} is not a checkpoint written by train.py")
    if fmt == CHECKPOINT_FORMAT:
        try:
            actual = content_checksum(state)
        except TypeError:
            actual = None
        if state.get("checksum") != actual:
            raise CheckpointError(f"{path} is damaged: its contents do not match the checksum written with "
                                  f"them (a changed byte, or a partial copy); it cannot be used")
    else:
        warnings.warn(f"{path} was written before checkpoints carried a checksum: its contents are not verified",
                      stacklevel=2)
    missing = [k for k in CHECKPOINT_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}; it is not a checkpoint train.py can use")
    wrong = malformed_entries(state)
    if wrong:
        raise CheckpointError(f"{path} holds {'; '.join(wrong)}; it is not a checkpoint train.py can use")
    return state


def malformed_entries(state: dict) -> list[str]:
    """What in a checkpoint's state is not of the kind train.py writes, in a few words each."""
    def count(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    checks = [
        ("step", count, "a step that is not a whole number >= 0"),
        ("config", lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v), "a config that is not a dict"),
        ("model", lambda v: isinstance(v, dict), "model weights that are not a dict"),
        ("optimizer", lambda v: isinstance(v, dict), "an optimiser state that is not a dict"),
        ("rng", lambda v: isinstance(v, dict), "RNG states that are not a dict"),
        ("tokens_seen", count, "a token count that is not a whole number >= 0"),
        ("train_time_s", lambda v: number(v) and v >= 0, "a training time that is not a number of seconds"),
        ("log_window", lambda v: isinstance(v, dict) and all(number(x) for x in v.values()),
         "a log window that is not a dict of numbers"),
        ("data_len", lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and all(count(n) for n in v),
         "split sizes that are not two whole numbers"),
        ("world_size", lambda v: count(v) and v >= 1, "a world_size that is not a whole number >= 1"),
        ("data_fingerprint", lambda v: isinstance(v, dict) and count(v.get("size")) and isinstance(v.get("sha256"), str),
         "a data fingerprint that is not a dict with a size and a sha256"),
    ]
    return [f"{what} ({key}: {short(state[key])})" for key, ok, what in checks if key in state and not ok(state[key])]


def short(value) -> str:
    """A value in at most 40 characters, for an error message (a container of many or large
    entries by its kind and length, without printing them)."""
    plain = (int, float, str, bool, type(None))
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, (list, tuple, dict)):
        entries = list(value.values()) if isinstance(value, dict) else list(value)
        if len(entries) > 8 or not all(isinstance(v, plain) for v in entries):
            return f"a {type(value).__name__} of {len(entries)} entries"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def rng_state(sampler, rank_device: torch.device | None = None) -> dict:
    """The RNG states a resume needs. ``rank_device``: the device of a rank of a torchrun launch,
    which saves its own GPU's generator only (asking for every GPU's would open a CUDA context on
    each). Every rank seeds its generators alike and training draws nothing from them but the
    data sampler's, which is the same on every rank: rank 0's states stand for all."""
    py_version, py_state, py_gauss = random.getstate()
    rng = dict(
        torch=torch.get_rng_state(),
        python=torch.tensor(py_state, dtype=torch.int64),
        python_version=py_version,
        python_gauss=py_gauss,
        data=sampler.state(),
    )
    if rank_device is not None:
        if rank_device.type == "cuda":
            rng["cuda"] = [torch.cuda.get_rng_state(rank_device)]
    elif torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def set_rng_state(rng: dict, sampler, rank_device: torch.device | None = None) -> None:
    """Put back the states ``rng_state`` saved (on a rank, its own GPU's from the first one saved)."""
    torch.set_rng_state(rng["torch"])
    random.setstate((rng["python_version"], tuple(rng["python"].tolist()), rng["python_gauss"]))
    sampler.set_state(rng["data"])
    if "cuda" in rng and torch.cuda.is_available():
        if rank_device is not None:
            if rank_device.type == "cuda" and len(rng["cuda"]):
                torch.cuda.set_rng_state(rng["cuda"][0], rank_device)
            return
        states = rng["cuda"][: torch.cuda.device_count()]
        for i, s in enumerate(states):
            torch.cuda.set_rng_state(s, i)
