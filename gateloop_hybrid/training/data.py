"""The data: reading a file of bytes (raw, gzip or zip), splitting it into training and validation
text, the seeded sampler of training windows, and the file's fingerprint that a checkpoint records.

The fingerprint is cheap for any size: the file's path, its size and a sha256 over a few sampled
blocks (the first and last 4 KiB and 16 blocks of 4 KiB at fixed fractions of the file), so a
resume notices another file or an edited one before it reads a byte of training data, and the
ranks of a torchrun launch notice that they were given different files.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import stat
import zipfile
import zlib
from pathlib import Path

import torch

from .config import ENWIK8_HELP
from .errors import DataError, os_reason

ENWIK8_TRAIN, ENWIK8_VAL = 90_000_000, 5_000_000  # the seed's split of enwik8
DEFAULT_DATA = ("data/enwik8.gz", "data/enwik8.zip", "data/enwik8")
FINGERPRINT_BLOCK = 4096
FINGERPRINT_BLOCKS = 16  # besides the first and the last


def read_bytes(path: str | os.PathLike) -> tuple[bytes, str]:
    """The file's bytes, decompressed when it is gzip (.gz, dictzip .dz) or a zip archive.

    Returns (data, name) where name is the file or zip member name without compression suffix.
    Raises DataError, naming the file, when it cannot be read or decompressed.
    """
    path = Path(path)
    name = path.name
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic[:2] == b"\x1f\x8b":
            with gzip.open(path, "rb") as f:
                data = f.read()
            for suffix in (".gz", ".dz"):
                name = name.removesuffix(suffix)
        elif magic == b"PK\x03\x04":
            with zipfile.ZipFile(path) as z:
                members = [m for m in z.infolist() if not m.is_dir()]
                if len(members) != 1:
                    raise DataError(f"--data {path} holds {len(members)} files; pass a zip with exactly "
                                    f"one (e.g. enwik8.zip), or unpack it and pass the file")
                data = z.read(members[0])
                name = Path(members[0].filename).name
        else:
            data = path.read_bytes()
    except (gzip.BadGzipFile, EOFError, zlib.error, zipfile.BadZipFile, zipfile.LargeZipFile,
            NotImplementedError) as e:
        raise DataError(f"--data {path}: cannot decompress it ({type(e).__name__}: {e}); "
                        f"the file is damaged or truncated") from None
    except OSError as e:
        raise DataError(f"--data {path}: cannot read it ({os_reason(e)})") from None
    return data, name


def split_data(data: bytes, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) uint8 tensors: enwik8 gets the seed's 90M/5M split, other files 90:5 in proportion."""
    if not data:
        raise DataError(f"the data ({name}) is empty")
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    if name == "enwik8" and len(buf) >= ENWIK8_TRAIN + ENWIK8_VAL:
        return buf[:ENWIK8_TRAIN], buf[ENWIK8_TRAIN:ENWIK8_TRAIN + ENWIK8_VAL]
    n_train = len(buf) * 90 // 95
    return buf[:n_train], buf[n_train:]


def file_kind(mode: int) -> str:
    """What a file that is not a regular file is, in a few words."""
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"))
    return next((what for test, what in kinds if test(mode)), "not a regular file")


def resolve_data_path(data: str | None) -> Path:
    """The data file for --data (or the default enwik8 locations); DataError, saying what the path
    is, when it is not a regular file that exists (a folder, a device such as /dev/zero, a FIFO)
    or is empty."""
    if data is None:
        for candidate in DEFAULT_DATA:
            if Path(candidate).is_file():
                return Path(candidate)
        raise DataError(f"no training data (no --data given and no data/enwik8.gz). {ENWIK8_HELP}")
    path = Path(data)
    try:
        info = path.stat()
    except FileNotFoundError:
        why = "a broken symbolic link" if path.is_symlink() else "no such file"
        raise DataError(f"--data {data}: {why}. {ENWIK8_HELP}") from None
    except OSError as e:
        raise DataError(f"--data {data}: cannot read it ({os_reason(e)})") from None
    if stat.S_ISDIR(info.st_mode):
        raise DataError(f"--data {data} is a folder; pass a file")
    if not stat.S_ISREG(info.st_mode):
        raise DataError(f"--data {data} is {file_kind(info.st_mode)}, not a regular file; pass a file of bytes")
    if info.st_size == 0:
        raise DataError(f"--data {data} is empty (0 bytes)")
    return path


def fingerprint(path: str | os.PathLike) -> dict:
    """{"path", "size", "sha256"}: the file's absolute path, its size in bytes, and a sha256 over its
    size and sampled blocks (the whole file when it is shorter than the blocks), read in a few ms
    whatever the file's size. DataError when it cannot be read."""
    path = Path(path)
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            h.update(b"size %d:" % size)
            if size <= (FINGERPRINT_BLOCKS + 2) * FINGERPRINT_BLOCK:
                h.update(f.read())
            else:
                last = size - FINGERPRINT_BLOCK
                offsets = [0, *(last * (i + 1) // (FINGERPRINT_BLOCKS + 1) for i in range(FINGERPRINT_BLOCKS)), last]
                for offset in offsets:
                    f.seek(offset)
                    h.update(f.read(FINGERPRINT_BLOCK))
    except OSError as e:
        raise DataError(f"--data {path}: cannot read it ({os_reason(e)})") from None
    return dict(path=str(path.resolve()), size=size, sha256=h.hexdigest())


def same_data(a: dict, b: dict) -> bool:
    """Whether two fingerprints are of the same bytes (wherever the files lie)."""
    return (a.get("size"), a.get("sha256")) == (b.get("size"), b.get("sha256"))


def size_and_hash(fp: dict) -> str:
    """A fingerprint's size and the start of its hash, in a few words."""
    return f"{fp.get('size'):,} bytes, sampled sha256 {str(fp.get('sha256'))[:12]}"


def describe_fingerprint(fp: dict) -> str:
    """A fingerprint in a few words: path, size and the start of its hash."""
    return f"{fp.get('path')} ({size_and_hash(fp)})"


class Sampler:
    """Random windows of seq_len + 1 bytes, drawn from a seeded torch.Generator.

    Its state (one tensor) goes into the checkpoint, so a resumed run sees the same batches.

    With several ranks, every rank draws the same global micro-batch of batch_size x world_size
    windows from the same stream and keeps rows rank x batch_size to (rank + 1) x batch_size. So
    N ranks of batch_size B see the batches of one process with batch_size N x B (the same
    losses), and a run can go on with any split of those N x B rows over ranks. One rank draws
    exactly what it always did.
    """

    def __init__(self, data: torch.Tensor, seq_len: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1):
        if len(data) < seq_len + 2:
            raise DataError(f"a split of {len(data)} bytes is too short for --seq-len {seq_len}")
        self.data, self.seq_len, self.batch_size = data, seq_len, batch_size
        self.rows = slice(rank * batch_size, (rank + 1) * batch_size)
        self.global_batch = batch_size * world_size
        self.generator = torch.Generator().manual_seed(seed)
        self.window = torch.arange(seq_len + 1)

    def next(self) -> torch.Tensor:
        """(batch_size, seq_len + 1) int64 token ids: this rank's rows of the global micro-batch."""
        starts = torch.randint(0, len(self.data) - self.seq_len - 1, (self.global_batch,), generator=self.generator)
        return self.data[starts[self.rows, None] + self.window].long()

    def state(self) -> torch.Tensor:
        return self.generator.get_state()

    def set_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)


def load_splits(cfg, state: dict | None, data_path: Path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(train, val, warnings) from --data: read, split, and checked against the flags and, on a
    resume, against the split sizes the checkpoint recorded (a warning instead of a DataError
    with --allow-data-change)."""
    data, name = read_bytes(data_path)
    if not data:
        after = " after decompression" if name != data_path.name else ""
        raise DataError(f"--data {data_path} is empty (0 bytes{after})")
    train_data, val_data = split_data(data, name)
    warnings = []
    if state is not None and list(state["data_len"]) != [len(train_data), len(val_data)]:
        what = (f"--data {data_path} splits into {len(train_data)}/{len(val_data)} bytes, "
                f"the checkpoint's data into {state['data_len'][0]}/{state['data_len'][1]}")
        if not cfg.allow_data_change:
            raise DataError(f"--resume: {what}; pass --allow-data-change to train on it anyway")
        warnings.append(f"--allow-data-change: {what}")
    for split, n in (("validation", len(val_data)), ("training", len(train_data))):
        if n < max(cfg.seq_len, cfg.prime_len) + 2:
            raise DataError(f"--data {data_path}: its {split} split has {n} bytes; --seq-len {cfg.seq_len} and "
                            f"--prime-len {cfg.prime_len} need at least {max(cfg.seq_len, cfg.prime_len) + 2}")
    return train_data, val_data, warnings


def decode(ids) -> str:
    """Token ids (bytes) -> text; invalid UTF-8 becomes U+FFFD."""
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def printable(text: str) -> str:
    """Text safe for a terminal: control characters other than newline and tab become U+FFFD."""
    return "".join(c if c.isprintable() or c in "\n\t" else "\ufffd" for c in text)
