"""Character-level language modelling with the GateLoop Transformer, in the enwik8 format.

Bytes are tokens (256 of them). Train, validate in bits per character, sample with the cached
incremental decoding, and checkpoint so that a run can be resumed exactly:

    python train.py --data enwik8.zip                      # GateLoop, the seed's sizes
    python train.py --data enwik8.zip --attention          # softmax-attention baseline
    python train.py --data enwik8.zip --resume             # continue <out-dir>/checkpoint.pt
    python train.py --preset demo                          # a small model on CPU in about a minute
    python sample.py --checkpoint runs/gateloop/checkpoint.pt --prompt "The "

`python train.py --help` lists every training flag; `python sample.py --help` the sampling ones
(`python train.py sample ...` is the same as `python sample.py ...`).

Checkpoints are one file, <out-dir>/checkpoint.pt, replaced atomically (written to a temporary
file, fsync'd, then renamed over the old one), holding only tensors and plain Python values so
that `torch.load(..., weights_only=True)` opens it without running code from it, plus a
checksum of those contents that `load_checkpoint` verifies.
Metrics go to <out-dir>/metrics.jsonl, one JSON object per line (see `_Metrics`).

Everything that stops a run is a `TrainError` (`ConfigError` and `DataError` for what is wrong
before it starts, `CheckpointError`, `OutputError`, `DivergedError` after); `main` prints it as
one line and exits with its `exit_code` (2 for a bad flag or bad data, 1 otherwise).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import gzip
import hashlib
import io
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
import types
import typing
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

NUM_TOKENS = 256  # bytes
CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = "gateloop_hybrid.train/2"  # /2 adds the content checksum
OLD_CHECKPOINT_FORMATS = ("gateloop_hybrid.train/1",)  # read, with a warning that nothing is verified
ENWIK8_TRAIN, ENWIK8_VAL = 90_000_000, 5_000_000  # the seed's split of enwik8
DEFAULT_DATA = ("data/enwik8.gz", "data/enwik8.zip", "data/enwik8")
ENWIK8_HELP = (
    "enwik8 is the Hutter Prize data set: the first 10^8 bytes of an English Wikipedia XML dump, "
    "http://mattmahoney.net/dc/enwik8.zip. train.py never downloads anything: fetch the file "
    "yourself and pass it with --data PATH (raw, .gz or .zip), or put it at data/enwik8.gz. "
    "Any other file works too, read as bytes."
)


class TrainError(Exception):
    """A run that cannot start or cannot go on. main() prints the message as one line."""

    exit_code = 1


class ConfigError(TrainError, ValueError):
    """A flag out of range, or flags that contradict each other or the checkpoint."""

    exit_code = 2


class DataError(TrainError):
    """The data file is missing, unreadable, empty or too short for the flags."""

    exit_code = 2


class CheckpointError(TrainError):
    """A checkpoint that cannot be read (damaged, altered, not train.py's) or written."""


class OutputError(TrainError):
    """The output folder or the metrics file cannot be written, or the disk is too full."""


class DivergedError(TrainError):
    """The training loss became nan or inf; the weights are not saved over the last checkpoint."""


def _opt(default, help, metavar=None):
    """A config field that is also a command-line flag; `help` is its --help text."""
    return field(default=default, metadata=dict(help=help, metavar=metavar))


@dataclass
class TrainConfig:
    """Everything a run depends on. Each field is the flag --field-name (underscores as dashes).

    Stored in the checkpoint as a plain dict. On --resume the checkpoint's values are used, and
    only the flags given on the command line override them; the ones in RESUME_FIXED may not change.
    """

    # data and files
    data: str | None = _opt(
        None, "file of bytes to model: raw, .gz or .zip (default: data/enwik8.gz). A file named "
              "enwik8 gets the seed's split, the first 90M bytes to train and the next 5M to validate; "
              "any other file a 90:5 split in proportion", metavar="PATH")
    out_dir: str | None = _opt(
        None, "folder for checkpoint.pt and metrics.jsonl (default: runs/gateloop, or runs/attention "
              "with --attention)", metavar="DIR")
    resume: bool = _opt(
        False, "continue from <out-dir>/checkpoint.pt: same model, optimiser, step, RNG and data-sampler "
               "state, so the next losses equal those of an uninterrupted run")
    metrics: str | None = _opt(
        None, "JSONL metrics file (default: <out-dir>/metrics.jsonl; appended to on --resume)", metavar="PATH")
    tensorboard: bool = _opt(False, "also log to TensorBoard in <out-dir>/tb (needs the tensorboard package)")
    wandb: bool = _opt(False, "also log to Weights & Biases (needs the wandb package and a login)")
    wandb_project: str = _opt("gateloop_hybrid", "wandb project name", metavar="NAME")
    preset: str | None = _opt(
        None, "start from a named set of flag values; flags typed as well win. "
              "demo: a 0.4M-parameter GateLoop model on tests/data/devils_dictionary.txt, on the CPU, "
              "in about a minute, ending with a sample (out-dir runs/demo)", metavar="NAME")
    threads: int | None = _opt(
        None, "CPU threads for torch (torch.set_num_threads). Default: OMP_NUM_THREADS when set, "
              "else the cores not busy now (available cores minus the 1-minute load average, at least 1): "
              "on a loaded machine torch's default of every core made steps 5-10x slower than 1 thread")

    # model (the seed's sizes)
    dim: int = _opt(512, "model width")
    depth: int = _opt(6, "number of layers (one token mixer and one feed-forward each)")
    gate_loop_heads: int | None = _opt(512, "GateLoop heads, each with its own complex gate (512 = dim: one a channel)")
    attention: bool = _opt(False, "train the softmax-attention baseline instead (uses --heads, --dim-head)")
    heads: int = _opt(8, "attention heads (with --attention)")
    dim_head: int = _opt(64, "width of one attention head (with --attention)")
    ff_mult: int = _opt(4, "feed-forward width as a multiple of --dim")
    scan_backend: str = _opt(
        "auto", "GateLoop scan backend: auto, loop, torch, heinsen, jax or pallas (auto picks the fastest "
                "one installed; see gateloop_hybrid.scan)", metavar="NAME")
    checkpoint_scan: bool = _opt(
        True, "recompute the GateLoop scan in backward instead of storing its states (the seed's "
              "checkpoint_gate_looped_attn; default on). With one feature per head (--gate-loop-heads = "
              "--dim) the states are as small as one activation, and --no-checkpoint-scan saves a "
              "forward scan per layer: on an H200 with the fused kernels, 2-5%% faster steps for 14%% more "
              "peak memory at --seq-len 4096 (benchmarks/model_speed.py --no-recompute); about 15%% on CPU")
    main_thread_backward: bool = _opt(
        False, "run backward on the calling thread (torch.autograd.set_multithreading_enabled(False) "
               "around it) instead of torch's per-device autograd worker thread. Saves a thread "
               "hand-off per backward: 1.36 -> 1.02 ms for a bridged complex64 scan fwd+bwd at "
               "4x4096x1024 on an H200; a GateLoop step at --seq-len 256 took 106 instead of 132 ms there, "
               "none faster at 4096 (benchmarks/lab/step_profile.py --backward-thread both)")

    # optimisation (the seed's values)
    seq_len: int = _opt(256, "training sequence length in bytes")
    batch_size: int = _opt(
        4, "sequences per micro-batch, on each rank under torchrun: an optimiser step sees "
           "--batch-size x --grad-accum x ranks sequences")
    grad_accum: int = _opt(4, "micro-batches accumulated into one optimiser step")
    lr: float = _opt(1e-4, "Adam learning rate (constant)")
    clip: float = _opt(0.5, "clip the gradient norm to this; 0 disables")
    max_steps: int = _opt(100_000, "stop after this many optimiser steps in all")
    time_budget: float | None = _opt(
        None, "stop after this many seconds of this invocation, then validate, checkpoint and exit "
              "(for a timed comparison)")
    seed: int = _opt(0, "seed for the initial weights, the data sampler and the samples")

    # evaluation, sampling, checkpoints, logging
    val_every: int = _opt(100, "validate every N steps, and at the end; 0: only at the end")
    val_batches: int = _opt(4, "micro-batches per validation, the same ones every time")
    sample_every: int = _opt(500, "print a sample every N steps, continuing a validation prime; 0: never")
    prime_len: int = _opt(128, "bytes of validation text that prime each sample")
    gen_len: int = _opt(256, "bytes generated per sample")
    temperature: float = _opt(1.0, "sampling temperature; 0 picks the most likely byte")
    top_k: int | None = _opt(None, "sample from the k most likely bytes only")
    ckpt_every: int = _opt(500, "checkpoint every N steps, and at the end; 0: only at the end")
    log_every: int = _opt(10, "write a train record (mean loss, tokens/s, peak memory) every N steps")
    device: str = _opt("auto", "torch device: auto (cuda when available), cpu, cuda, cuda:1, ...", metavar="DEVICE")
    bf16: bool | None = _opt(
        None, "bf16 autocast (default: on for CUDA, off for CPU); the scan accumulates in float32 either way")
    compile: str | None = _opt(
        None, "torch.compile the training forward and backward: 'default', or 'reduce-overhead' (CUDA graphs, "
              "CUDA only; the fastest mode for both models on an H200, see benchmarks/model_speed.py). "
              "Validation and samples run uncompiled", metavar="MODE")
    framework: str = _opt(
        "torch", "torch, or jax: the same model, optimiser, data stream and checkpoints, with the model and "
                 "its training step in pure JAX (gateloop_hybrid.jax; needs the jax extra). With jax, --bf16 "
                 "computes in bfloat16 with float32 weights, --scan-backend is auto (= jax), jax or pallas, and "
                 "--device names JAX's device", metavar="NAME")
    fsdp: bool = _opt(
        False, "under torchrun, shard the weights, gradients and optimiser state across the ranks with FSDP2 "
               "(torch.distributed.fsdp.fully_shard) instead of replicating them (DistributedDataParallel)")

    def model_kwargs(self) -> dict:
        kw = dict(dim=self.dim, num_tokens=NUM_TOKENS, depth=self.depth, ff_mult=self.ff_mult,
                  use_gate_looped_attn=not self.attention)
        if self.attention:
            kw.update(heads=self.heads, dim_head=self.dim_head)
        else:
            kw.update(gate_loop_heads=self.gate_loop_heads, scan_backend=self.scan_backend,
                      checkpoint_gate_looped_attn=self.checkpoint_scan)
        return kw


# Flags that a resumed run must keep: they define the model, the data stream or the RNG. (On a
# different number of ranks --batch-size may change so that --batch-size x ranks stays the same.)
RESUME_FIXED = ("dim", "depth", "gate_loop_heads", "attention", "heads", "dim_head", "ff_mult",
                "seq_len", "batch_size", "seed")
# Never taken from a checkpoint: they say what to do now, not what the run is. (out_dir is
# where the checkpoint was found; metrics follow it unless --metrics is given again.)
NOT_RESUMED = ("resume", "out_dir", "metrics", "threads", "preset", "compile", "fsdp")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

FRAMEWORKS = ("torch", "jax")
JAX_SCAN_BACKENDS = ("auto", "jax", "pallas")  # gateloop_hybrid.jax's

DEMO_TEXT = Path(__file__).resolve().parent / "tests" / "data" / "devils_dictionary.txt"
# Named flag sets for --preset; flags typed on the command line override them.
PRESETS = {
    "demo": dict(
        data=str(DEMO_TEXT), out_dir=str(Path("runs") / "demo"), device="cpu", scan_backend="torch",
        dim=128, depth=2, gate_loop_heads=None, ff_mult=2, seq_len=128, batch_size=16, grad_accum=1,
        lr=3e-3, clip=0.5, max_steps=450, val_every=150, val_batches=4, sample_every=450,
        prime_len=64, gen_len=300, temperature=0.8, ckpt_every=150, log_every=25,
    ),
}


# ----------------------------------------------------------------------------------------------
# command line


def _unoptional(tp):
    """int | None -> int; other types unchanged."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _none_or(tp):
    def parse(s: str):
        return None if s.lower() == "none" else tp(s)
    parse.__name__ = tp.__name__
    return parse


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is reported in one line (not the whole usage), with exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_train_parser(with_defaults: bool = True) -> argparse.ArgumentParser:
    """The training flags, one per TrainConfig field. with_defaults=False leaves every default
    out of the parsed namespace, which tells the flags that were typed from those that were not."""
    p = OneLineParser(
        prog="train.py",
        description="Train a byte-level GateLoop Transformer (or the softmax-attention baseline) on "
                    "enwik8 or any file, with validation in bits per character, samples, metrics and "
                    "resumable checkpoints. " + ENWIK8_HELP,
        epilog="Sampling from a checkpoint: python sample.py --checkpoint PATH --prompt TEXT "
               "(see python sample.py --help; python train.py sample ... is the same).",
    )
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        tp = hints[f.name]
        base = _unoptional(tp)
        help = f.metadata["help"]
        if "default" not in help and f.default is not None and f.default is not False:
            help += f" (default: {f.default})"
        kw = dict(help=help, default=f.default if with_defaults else argparse.SUPPRESS)
        if base is bool and f.default is False:
            p.add_argument(flag, action="store_true", **kw)
        elif base is bool:  # tri-state: on, off, or decided at run time
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        else:
            metavar = f.metadata["metavar"] or {int: "N", float: "X"}.get(base, "STR")
            p.add_argument(flag, type=_none_or(base) if base is not tp else base, metavar=metavar, **kw)
    return p


def parse_train_args(argv) -> tuple[TrainConfig, set[str]]:
    """The config from argv, and the names of the flags given explicitly (they win on --resume)."""
    args = build_train_parser().parse_args(argv)
    given = set(vars(build_train_parser(with_defaults=False).parse_args(argv)))
    return TrainConfig(**vars(args)), given


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_config(cfg: TrainConfig) -> None:
    """Raise ConfigError, naming the flag, for any value out of range or flags that contradict.

    Run before anything is read or written, and again on the config a resume merges.
    """
    def need(ok: bool, name: str, what: str):
        if not ok:
            raise ConfigError(f"{_flag(name)} {getattr(cfg, name)}: {what}")

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    def is_num(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    at_least = dict(dim=1, depth=1, heads=1, dim_head=1, ff_mult=1, seq_len=1, batch_size=1, grad_accum=1,
                    max_steps=0, seed=0, val_every=0, val_batches=1, sample_every=0, prime_len=1, gen_len=0,
                    ckpt_every=0, log_every=1)
    for name, low in at_least.items():
        need(is_int(getattr(cfg, name)) and getattr(cfg, name) >= low, name, f"must be an integer >= {low}")
    need(cfg.seed < 2**63, "seed", "must be below 2**63")
    for name in ("gate_loop_heads", "top_k", "threads"):
        value = getattr(cfg, name)
        need(value is None or (is_int(value) and value >= 1), name, "must be an integer >= 1 (or none)")
    need(is_num(cfg.lr) and cfg.lr > 0, "lr", "must be a finite number > 0")
    need(is_num(cfg.clip) and cfg.clip >= 0, "clip", "must be a finite number >= 0 (0 disables clipping)")
    need(is_num(cfg.temperature) and cfg.temperature >= 0, "temperature", "must be a finite number >= 0")
    need(cfg.time_budget is None or (is_num(cfg.time_budget) and cfg.time_budget >= 0),
         "time_budget", "must be a finite number of seconds >= 0")
    if not cfg.attention and cfg.gate_loop_heads is not None:
        need(cfg.dim % cfg.gate_loop_heads == 0, "gate_loop_heads",
             f"must divide --dim {cfg.dim} (none: one gate per feature, --dim heads)")
    need(cfg.preset is None or cfg.preset in PRESETS, "preset", f"unknown; choose one of {', '.join(PRESETS)}")
    need(cfg.compile is None or cfg.compile in COMPILE_MODES, "compile",
         f"unknown mode; choose one of {', '.join(COMPILE_MODES)}")
    need(cfg.framework in FRAMEWORKS, "framework", f"choose one of {', '.join(FRAMEWORKS)}")
    if cfg.framework == "jax":
        need(cfg.attention or cfg.scan_backend in JAX_SCAN_BACKENDS, "scan_backend",
             f"not a scan of --framework jax; choose one of {', '.join(JAX_SCAN_BACKENDS)}")
        need(not cfg.main_thread_backward, "main_thread_backward", "torch's autograd setting; not with --framework jax")
        need(cfg.compile is None, "compile", "torch.compile is for --framework torch (the JAX step is jitted)")
        need(not cfg.fsdp, "fsdp", "FSDP2 shards torch modules; --framework jax trains in one process")
    for name in ("out_dir", "metrics", "data"):
        need(getattr(cfg, name) is None or getattr(cfg, name) != "", name, "must not be empty")


def apply_preset(cfg: TrainConfig, given: set[str]) -> TrainConfig:
    """cfg with the --preset's values for every flag not typed on the command line."""
    if cfg.preset is None:
        return cfg
    if cfg.preset not in PRESETS:
        raise ConfigError(f"--preset {cfg.preset}: unknown; choose one of {', '.join(PRESETS)}")
    values = {k: v for k, v in PRESETS[cfg.preset].items() if k not in given}
    return dataclasses.replace(cfg, **values)


def check_device(name: str) -> torch.device:
    """The torch device for --device, or ConfigError when this machine has no such device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"--device {name}: not a torch device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        try:
            torch.empty(1, device=device)
        except Exception:  # noqa: BLE001 - any backend's failure means the same thing here
            raise ConfigError(f"--device {name}: not available on this machine") from None
    return device


def default_threads() -> int:
    """Threads for torch on the CPU when --threads is not given: the cores not busy right now."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):
        busy = 0.0
    return max(1, min(cores, int(cores - busy + 0.5)))


def set_threads(cfg: TrainConfig, device: torch.device) -> int:
    """Apply --threads (or the default) to torch on the CPU; returns the number in use."""
    if device.type == "cpu":
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        elif not os.environ.get("OMP_NUM_THREADS"):
            torch.set_num_threads(default_threads())
    return torch.get_num_threads()


# ----------------------------------------------------------------------------------------------
# data


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


def resolve_data_path(data: str | None) -> Path:
    if data is not None:
        path = Path(data)
        if path.is_dir():
            raise DataError(f"--data {data} is a folder; pass a file")
        if not path.is_file():
            raise DataError(f"--data {data}: no such file. {ENWIK8_HELP}")
        return path
    for candidate in DEFAULT_DATA:
        if Path(candidate).is_file():
            return Path(candidate)
    raise DataError(f"no training data (no --data given and no data/enwik8.gz). {ENWIK8_HELP}")


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
        self._window = torch.arange(seq_len + 1)

    def next(self) -> torch.Tensor:
        """(batch_size, seq_len + 1) int64 token ids: this rank's rows of the global micro-batch."""
        starts = torch.randint(0, len(self.data) - self.seq_len - 1, (self.global_batch,), generator=self.generator)
        return self.data[starts[self.rows, None] + self._window].long()

    def state(self) -> torch.Tensor:
        return self.generator.get_state()

    def set_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)


def decode(ids) -> str:
    """Token ids (bytes) -> text; invalid UTF-8 becomes U+FFFD."""
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def printable(text: str) -> str:
    """Text safe for a terminal: control characters other than newline and tab become U+FFFD."""
    return "".join(c if c.isprintable() or c in "\n\t" else "\ufffd" for c in text)


# ----------------------------------------------------------------------------------------------
# model and sampling


def build_model(model_kwargs: dict) -> torch.nn.Module:
    """The package's Transformer from plain keyword arguments (those of TrainConfig.model_kwargs)."""
    from gateloop_hybrid import Transformer  # here, so that --help and data errors need only torch

    return Transformer(**model_kwargs)


def resolved_scan_backend(cfg: TrainConfig, device: torch.device) -> str | None:
    """The scan backend a GateLoop model will use on `device` ("auto" resolved); None for attention."""
    if cfg.attention:
        return None
    from gateloop_hybrid.scan import resolve_backend

    try:
        return resolve_backend(cfg.scan_backend, device)
    except (ValueError, ImportError) as e:
        raise ConfigError(f"--scan-backend {cfg.scan_backend}: {e}") from None


@contextlib.contextmanager
def _seeded_rng(device: torch.device, seed: int):
    """Run the body with torch's global RNG (CPU, and the model's GPU) seeded with `seed`, and put
    the previous state back afterwards: samples neither depend on nor disturb the training stream."""
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


# ----------------------------------------------------------------------------------------------
# checkpoints


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


def _digest(obj, h) -> None:
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
            _digest(k, h)
            _digest(obj[k], h)
    elif isinstance(obj, (list, tuple)):
        h.update(b"%s%d:" % (type(obj).__name__.encode(), len(obj)))
        for v in obj:
            _digest(v, h)
    elif obj is None or isinstance(obj, (bool, int, float, str)):
        text = repr(obj).encode()
        h.update(b"%s%d:%s" % (type(obj).__name__.encode(), len(text), text))
    else:
        raise TypeError(f"checkpoint content of type {type(obj).__name__} is not supported")


def content_checksum(state: dict) -> str:
    """sha256 of everything in state except its "checksum" entry."""
    h = hashlib.sha256()
    _digest({k: v for k, v in state.items() if k != "checksum"}, h)
    return "sha256:" + h.hexdigest()


def _write_all(f, data) -> None:
    """Write data to the open file f (a seam for tests that fail or die mid-write)."""
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
            _write_all(f, buf.getbuffer())
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


CHECKPOINT_KEYS = ("format", "step", "config", "model", "optimizer", "rng", "tokens_seen", "train_time_s",
                   "log_window", "data_len")


def _load_error_reason(e: BaseException) -> str:
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
    after it was written (its content checksum differs), or was not written by train.py.
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
                              f"({_load_error_reason(e)}); it cannot be used") from None
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
    return state


def _rng_state(sampler: Sampler, rank_device: torch.device | None = None) -> dict:
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


def _set_rng_state(rng: dict, sampler: Sampler, rank_device: torch.device | None = None) -> None:
    torch.set_rng_state(rng["torch"])
    random.setstate((rng["python_version"], tuple(rng["python"].tolist()), rng["python_gauss"]))
    sampler.set_state(rng["data"])
    if "cuda" in rng and torch.cuda.is_available():
        if rank_device is not None:  # a rank: its own GPU, from the first saved state (see _rng_state)
            if rank_device.type == "cuda" and len(rng["cuda"]):
                torch.cuda.set_rng_state(rng["cuda"][0], rank_device)
            return
        states = rng["cuda"][: torch.cuda.device_count()]
        for i, s in enumerate(states):
            torch.cuda.set_rng_state(s, i)


# ----------------------------------------------------------------------------------------------
# metrics


class _Metrics:
    """JSON lines, one object per record, plus TensorBoard / wandb when asked for.

    Records ("kind"): "start" (config, parameter count, device, versions), "train" (step, loss,
    bpc, tokens_per_s, peak memory), "val" (step, loss, bpc), "sample" (step, prime, text),
    "end" (step, reason). After a resume the file is appended to, so a step can appear twice
    (from the dead run and the resumed one): the later line wins.
    """

    def __init__(self, cfg: TrainConfig, path: Path, append: bool):
        self.tb = self.wandb = None
        if cfg.tensorboard:
            _require("tensorboard", "--tensorboard")
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(Path(cfg.out_dir) / "tb"))
        if cfg.wandb:
            wandb = _require("wandb", "--wandb")
            self.wandb = wandb.init(project=cfg.wandb_project, config=dataclasses.asdict(cfg))
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torn = append and path.is_file() and path.stat().st_size > 0 and _last_byte(path) != b"\n"
            self.file = open(path, "a" if append else "w", encoding="utf-8")
            if torn:  # a line cut short by a crash: end it, so the next record starts on its own line
                self.file.write("\n")
        except OSError as e:
            raise OutputError(f"cannot write the metrics file {path}: {os_reason(e)}") from None

    def log(self, kind: str, **record) -> None:
        try:
            self.file.write(json.dumps(dict(kind=kind, **record)) + "\n")
            self.file.flush()
        except OSError as e:
            raise OutputError(f"cannot write the metrics file {self.path}: {os_reason(e)}") from None
        step = record.get("step")
        scalars = {f"{kind}/{k}": v for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tb is not None and step is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
            if kind == "sample":
                self.tb.add_text("sample", record["prime"] + " >>> " + record["text"], step)
        if self.wandb is not None and step is not None and scalars:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        with contextlib.suppress(OSError):  # a failed flush was reported by log() already
            self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1)


def _require(module: str, flag: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(f"{flag} needs the {module} package, which is not installed "
                         f"({e}); pip install {module}, or drop {flag}") from None


def _peak_memory(device: torch.device) -> dict:
    """Peak memory so far: torch's allocator, and JAX's when the scan brought JAX in."""
    out = {}
    if device.type == "cuda":
        out["peak_mem_bytes"] = torch.cuda.max_memory_allocated(device)
    if "jax" in sys.modules and device.type == "cuda":
        try:
            jax = sys.modules["jax"]
            index = device.index if device.index is not None else torch.cuda.current_device()
            # the JAX device that is this GPU: the same CUDA device ordinal (see bridge.convert)
            devs = [d for d in jax.devices() if d.platform == "gpu" and d.local_hardware_id == index]
            stats = devs[0].memory_stats() if devs else None
            if stats and "peak_bytes_in_use" in stats:
                out["jax_peak_mem_bytes"] = int(stats["peak_bytes_in_use"])
        except Exception:  # memory stats are a nicety; never fail a run over them
            pass
    return out


# ----------------------------------------------------------------------------------------------
# several processes (torchrun; the torch.distributed side is gateloop_hybrid/distributed.py)


def start_world(cfg: TrainConfig):
    """(World, device) of this process. Not under torchrun: one process on --device. Under torchrun:
    join the process group (NCCL for CUDA, gloo for the CPU) on this rank's device, cuda:LOCAL_RANK."""
    from gateloop_hybrid import distributed

    if cfg.framework == "jax":  # JAX picks its own device (_jax_device); torch's side stays on the CPU
        if distributed.launched():
            raise ConfigError("--framework jax trains in one process; run it without torchrun")
        return distributed.World(), torch.device("cpu")
    device = check_device(cfg.device)
    if not distributed.launched():
        if cfg.fsdp:
            raise ConfigError("--fsdp shards the model across the ranks of a torchrun launch "
                              "(torchrun --nproc_per_node N train.py --fsdp ...); this is one process")
        return distributed.World(), device
    try:
        distributed.ranks_from_env()
    except ValueError as e:
        raise ConfigError(f"torchrun's environment: {e}") from None
    try:
        return distributed.start(device)
    except ValueError as e:
        raise ConfigError(f"--device {cfg.device}: {e}") from None


def stop_world(world) -> None:
    from gateloop_hybrid import distributed

    distributed.stop(world)


def on_main(world, fn, elsewhere=None):
    """fn() on rank 0, and `elsewhere` on the other ranks; a TrainError that fn raises is raised
    on every rank, so that all stop together (one process: fn())."""
    from gateloop_hybrid import distributed

    result, error = elsewhere, None
    if world.main:
        try:
            result = fn()
        except TrainError as e:
            if not world.distributed:
                raise
            error = e
    error = distributed.from_main(world, error)
    if error is not None:
        raise _on_every_rank(error) from None
    return result


def _on_every_rank(e: TrainError) -> TrainError:
    """Mark an error that every rank raises alike: main() prints it on rank 0 only."""
    e.every_rank = True
    return e


class _NoMetrics:
    """The metrics of a rank other than 0, which writes none."""

    def log(self, kind: str, **record) -> None:
        pass

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------------------------
# training


def _autocast(device: torch.device, bf16: bool | None):
    enabled = device.type == "cuda" if bf16 is None else bf16
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


@torch.no_grad()
def evaluate(model, val: torch.Tensor, cfg: TrainConfig, device: torch.device, world=None) -> float:
    """Mean validation loss in nats over the same cfg.val_batches micro-batches every time.

    With several ranks (``world``), each evaluates its rows of the same global micro-batches and
    the ranks' means are averaged: every rank gets the loss one process would compute with
    --batch-size x ranks. Call it on every rank."""
    rank, size = (world.rank, world.size) if world is not None else (0, 1)
    sampler = Sampler(val, cfg.seq_len, cfg.batch_size, seed=cfg.seed + 1, rank=rank, world_size=size)
    was_training = model.training
    model.eval()
    total = 0.0
    for _ in range(cfg.val_batches):
        batch = sampler.next().to(device, non_blocking=True)
        with _autocast(device, cfg.bf16):
            total += model(batch, return_loss=True).float().item()
    model.train(was_training)
    if world is not None and world.distributed:
        from gateloop_hybrid import distributed

        return distributed.mean(world, total / cfg.val_batches, device)
    return total / cfg.val_batches


def _val_prime(val: torch.Tensor, cfg: TrainConfig, step: int) -> torch.Tensor:
    """(1, prime_len) validation bytes that prime the sample at `step`."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    start = int(torch.randint(0, len(val) - cfg.prime_len, (1,), generator=g))
    return val[start:start + cfg.prime_len].long()[None]


def _sample_from_val(model, val: torch.Tensor, cfg: TrainConfig, device: torch.device, step: int) -> tuple[str, str]:
    prime = _val_prime(val, cfg, step).to(device)
    was_training = model.training
    model.eval()
    with _seeded_rng(device, cfg.seed + step), _autocast(device, cfg.bf16):
        out = model.generate(prime, cfg.gen_len, temperature=cfg.temperature, top_k=cfg.top_k)
    model.train(was_training)
    return decode(prime[0].tolist()), decode(out[0].tolist())


def _resolve_config(cfg: TrainConfig, given: set[str], world_size: int = 1) -> tuple[TrainConfig, dict | None]:
    """Fill in defaults that depend on other fields; on --resume, merge with the checkpoint's config
    (on ``world_size`` ranks, see ``_resume_batch_size``)."""
    if cfg.out_dir is None:
        cfg.out_dir = str(Path("runs") / ("attention" if cfg.attention else "gateloop"))
    ckpt_path = Path(cfg.out_dir) / CHECKPOINT_NAME
    state = None
    if cfg.resume:
        if not ckpt_path.is_file():
            raise ConfigError(f"--resume: no checkpoint at {ckpt_path}")
        state = load_checkpoint(ckpt_path)
        saved = state["config"]
        if not isinstance(saved, dict):
            raise CheckpointError(f"{ckpt_path} holds no config; it is not a checkpoint train.py can use")
        saved_ranks = state.get("world_size", 1)
        if not (isinstance(saved_ranks, int) and saved_ranks >= 1):
            raise CheckpointError(f"{ckpt_path} holds world_size {saved_ranks!r}; it is not a checkpoint train.py can use")
        fixed = RESUME_FIXED
        if saved_ranks != world_size:
            cfg.batch_size = _resume_batch_size(cfg, given, saved, saved_ranks, world_size)
            given = given | {"batch_size"}
            fixed = tuple(name for name in RESUME_FIXED if name != "batch_size")
        for name in fixed:
            if name in given and getattr(cfg, name) != saved.get(name):
                raise ConfigError(f"--resume: {_flag(name)} {getattr(cfg, name)} differs from the checkpoint's "
                                  f"{saved.get(name)}; a resumed run keeps its model, data stream and seed")
        merged = {k: (getattr(cfg, k) if k in given or k in NOT_RESUMED else saved.get(k, getattr(cfg, k)))
                  for k in (f.name for f in dataclasses.fields(TrainConfig))}
        cfg = TrainConfig(**merged)
        check_config(cfg)
    elif ckpt_path.exists():
        raise ConfigError(f"{ckpt_path} exists; pass --resume to continue that run, or choose another --out-dir")
    if cfg.metrics is None:
        cfg.metrics = str(Path(cfg.out_dir) / "metrics.jsonl")
    metrics = Path(cfg.metrics).resolve()
    for what, other in (("the checkpoint", ckpt_path), ("--data", cfg.data)):
        if other is not None and metrics == Path(other).resolve():
            raise ConfigError(f"--metrics {cfg.metrics} is {what}; writing metrics there would destroy it")
    return cfg, state


def _resume_batch_size(cfg: TrainConfig, given: set[str], saved: dict, saved_ranks: int, ranks: int) -> int:
    """--batch-size for resuming on ``ranks`` ranks a run that ran on ``saved_ranks``.

    The data stream is the sequence of global micro-batches of --batch-size x ranks windows (see
    Sampler), so that product must stay: a --batch-size typed on the command line must give it,
    and without one it is the checkpoint's product divided by the ranks. ConfigError otherwise.
    """
    rows = saved.get("batch_size", 0) * saved_ranks
    was = f"the checkpoint's run drew {rows} sequences per micro-batch (--batch-size {saved.get('batch_size')} x " \
          f"{saved_ranks} rank{'s' * (saved_ranks != 1)})"
    if "batch_size" in given:
        if cfg.batch_size * ranks != rows:
            fix = f"pass --batch-size {rows // ranks}" if rows % ranks == 0 else \
                f"run on a number of ranks that divides {rows}"
            raise ConfigError(f"--resume: --batch-size {cfg.batch_size} x {ranks} rank{'s' * (ranks != 1)} = "
                              f"{cfg.batch_size * ranks} sequences per micro-batch, but {was}; a resumed run keeps "
                              f"its data stream: {fix}")
        return cfg.batch_size
    if rows % ranks:
        raise ConfigError(f"--resume on {ranks} rank{'s' * (ranks != 1)}: {was}, which {ranks} ranks cannot share "
                          f"evenly; a resumed run keeps its data stream: run on a number of ranks that divides {rows}")
    return rows // ranks


def _load_splits(cfg: TrainConfig, state: dict | None) -> tuple[Path, torch.Tensor, torch.Tensor]:
    data_path = resolve_data_path(cfg.data)
    data, name = read_bytes(data_path)
    if not data:
        after = " after decompression" if name != data_path.name else ""
        raise DataError(f"--data {data_path} is empty (0 bytes{after})")
    train_data, val_data = split_data(data, name)
    if state is not None and list(state["data_len"]) != [len(train_data), len(val_data)]:
        raise DataError(f"--resume: --data {data_path} splits into {len(train_data)}/{len(val_data)} bytes, "
                        f"the checkpoint's data into {state['data_len'][0]}/{state['data_len'][1]}")
    for split, n in (("validation", len(val_data)), ("training", len(train_data))):
        if n < max(cfg.seq_len, cfg.prime_len) + 2:
            raise DataError(f"--data {data_path}: its {split} split has {n} bytes; --seq-len {cfg.seq_len} and "
                            f"--prime-len {cfg.prime_len} need at least {max(cfg.seq_len, cfg.prime_len) + 2}")
    return data_path, train_data, val_data


class _Run:
    """One invocation of training: the model, optimiser, data sampler and counters, and the
    steps that act on them (a training step, validation, a sample, a checkpoint).

    Under torchrun one _Run lives on each rank (``world``, see gateloop_hybrid.distributed): every
    rank calls the same methods in the same order, since each may talk to the others; only
    rank 0 writes the checkpoint."""

    WARMUP_STEPS = 10  # steps of each invocation left out of steady_tokens_per_s (JIT, allocator warm-up)

    def __init__(self, cfg: TrainConfig, state: dict | None, world=None, device: torch.device | None = None):
        from gateloop_hybrid import distributed

        self.cfg = cfg
        self.world = world if world is not None else distributed.World()
        self.device = device if device is not None else check_device(cfg.device)
        self.data_path, self.train_data, self.val_data = _load_splits(cfg, state)
        self.threads = set_threads(cfg, self.device)
        self.scan_backend = resolved_scan_backend(cfg, self.device)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        try:
            model = build_model(cfg.model_kwargs()).to(self.device)
        except (ValueError, TypeError) as e:  # sizes check_config let through but the model refuses
            raise ConfigError(f"the model flags do not fit together: {e}") from None
        # one process: the model itself; under torchrun DDP, or FSDP2 sharding each block
        self.model = distributed.wrap(model, self.world, self.device, fsdp=cfg.fsdp,
                                      units=[part for block in model.layers for part in block])
        self.sharded = distributed.is_sharded(self.model)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        self.forward = self.model
        self.graphs = cfg.compile in ("reduce-overhead", "max-autotune")  # CUDA graphs
        if cfg.compile is not None:
            if self.graphs and self.device.type != "cuda":
                raise ConfigError(f"--compile {cfg.compile}: CUDA graphs need a CUDA device, got {self.device}")
            self.forward = torch.compile(self.model, mode=cfg.compile)
        if self.graphs:
            # Gradients a graph's backward hands out live in its memory pool, which the next
            # micro-batch's replay overwrites; kept .grad tensors of our own take them by addition.
            for p in self.model.parameters():
                p.grad = torch.zeros_like(p)
        self.sampler = Sampler(self.train_data, cfg.seq_len, cfg.batch_size, seed=cfg.seed,
                               rank=self.world.rank, world_size=self.world.size)
        self.tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * self.world.size
        self.ckpt_path = Path(cfg.out_dir) / CHECKPOINT_NAME
        self._rank_device = self.device if self.world.distributed else None

        self.step, self.tokens_seen, self.train_time = 0, 0, 0.0
        self.window = self._empty_window()  # the steps since the last train record
        self.last_ckpt_step = None  # the step the checkpoint file holds, None while there is none
        if state is not None:
            try:
                distributed.load_full_state(self.model, self.optimizer, state["model"], state["optimizer"])
                _set_rng_state(state["rng"], self.sampler, self._rank_device)
            except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
                raise CheckpointError(f"{self.ckpt_path}: its weights or optimiser state do not fit this model "
                                      f"({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
            for group in self.optimizer.param_groups:  # --lr given on resume wins over the saved one
                group["lr"] = cfg.lr
            self.step, self.tokens_seen, self.train_time = state["step"], state["tokens_seen"], state["train_time_s"]
            self.window.update(state["log_window"])
            self.last_ckpt_step = self.step
        self.first_step = self.step
        self.steady = dict(tokens=0, time=0.0)  # this invocation, after WARMUP_STEPS
        self.started = time.perf_counter()
        self.results = dict(losses={}, val={})  # what train() returns, for callers and tests

    @staticmethod
    def _empty_window() -> dict:
        return dict(loss=0.0, steps=0, tokens=0, time=0.0)

    @property
    def n_params(self) -> int:
        return sum(p.numel() * (2 if p.is_complex() else 1) for p in self.model.parameters())

    def wall(self) -> float:
        return time.perf_counter() - self.started

    def train_step(self) -> tuple[float, float]:
        """One optimiser step over cfg.grad_accum micro-batches -> (mean loss in nats, tokens/s).
        Under torchrun: the mean over all ranks, and the tokens of all ranks."""
        from gateloop_hybrid import distributed

        t0 = time.perf_counter()
        loss_value = distributed.mean(self.world, self._optimiser_step(), self.device)
        dt = time.perf_counter() - t0

        self.step += 1
        self.tokens_seen += self.tokens_per_step
        self.train_time += dt
        for k, v in (("loss", loss_value), ("steps", 1), ("tokens", self.tokens_per_step), ("time", dt)):
            self.window[k] += v
        if self.step - self.first_step > self.WARMUP_STEPS:
            self.steady["tokens"] += self.tokens_per_step
            self.steady["time"] += dt
        self.results["losses"][self.step] = loss_value
        return loss_value, self.tokens_per_step / dt

    def _optimiser_step(self) -> float:
        """Forward, backward and the optimiser on cfg.grad_accum micro-batches; their mean loss."""
        from gateloop_hybrid import distributed

        cfg, device = self.cfg, self.device
        loss_sum = torch.zeros((), device=device)
        for i in range(cfg.grad_accum):
            batch = self.sampler.next().to(device, non_blocking=True)  # (b, seq_len + 1)
            if self.graphs:     # a new step: the graphs may reuse the last step's outputs' memory
                torch.compiler.cudagraph_mark_step_begin()
            # ranks exchange gradients once a step, in the last micro-batch's backward
            with distributed.no_sync(self.model, sync=i == cfg.grad_accum - 1):
                with _autocast(device, cfg.bf16):
                    loss = self.forward(batch, return_loss=True)
                with torch.autograd.set_multithreading_enabled(not cfg.main_thread_backward):
                    (loss / cfg.grad_accum).backward()
            loss_sum += loss.detach().float()
        if cfg.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=not self.graphs)
        return loss_sum.item() / cfg.grad_accum  # synchronises: the step has finished

    def train_record(self) -> dict:
        """The mean loss, tokens/s and peak memory since the last record; starts a new window."""
        w, self.window = self.window, self._empty_window()
        mean = w["loss"] / w["steps"]
        return dict(step=self.step, loss=mean, bpc=mean / math.log(2), tokens_per_s=w["tokens"] / w["time"],
                    tokens=self.tokens_seen, train_time_s=self.train_time, wall_s=self.wall(), lr=self.cfg.lr,
                    **_peak_memory(self.device))

    def validate(self) -> dict:
        """Every rank: the validation loss over all ranks (see evaluate)."""
        loss = self._val_loss()
        self.results["val"][self.step] = loss / math.log(2)
        return dict(step=self.step, loss=loss, bpc=loss / math.log(2), tokens=self.tokens_seen,
                    train_time_s=self.train_time, wall_s=self.wall(), **_peak_memory(self.device))

    def _val_loss(self) -> float:
        from gateloop_hybrid import distributed

        # DDP's wrapper is for training steps; sharded weights need every rank's forward
        model = self.model if self.sharded else distributed.unwrap(self.model)
        return evaluate(model, self.val_data, self.cfg, self.device, self.world)

    @property
    def samples_on_every_rank(self) -> bool:
        """Sharded weights (FSDP2) are gathered in each forward, so every rank must run a sample's
        forwards; otherwise rank 0 samples alone."""
        return self.sharded

    def sample(self) -> dict:
        from gateloop_hybrid import distributed

        model = self.model if self.sharded else distributed.unwrap(self.model)
        prime, text = _sample_from_val(model, self.val_data, self.cfg, self.device, self.step)
        return dict(step=self.step, prime=prime, text=text)

    def device_info(self) -> tuple[str, str | None]:
        """(the device the model trains on, its name) for the start record and the summary line."""
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None
        return str(self.device), name

    def checkpoint(self) -> None:
        """Write the checkpoint; a failed write raises CheckpointError saying what the file still holds.

        Weights that are no longer finite are never written over a good checkpoint (DivergedError).
        Under torchrun every rank calls it: the full (unsharded) state is gathered, rank 0 writes
        it, and every rank learns how that went, so all stop together if it failed.
        """
        from gateloop_hybrid import distributed

        world = self.world
        finite = all(bool(torch.isfinite(distributed.local_values(p)).all()) for p in self.model.parameters())
        if distributed.any_rank(world, not finite, self.device):
            held = ("no checkpoint written" if self.last_ckpt_step is None
                    else f"{self.ckpt_path} holds step {self.last_ckpt_step}")
            raise DivergedError(f"the weights are no longer finite at step {self.step}; stopped without saving "
                                f"them ({held}). Try a lower --lr or --clip")
        model_state, optim_state = distributed.full_state(self.model, self.optimizer)
        error = None
        if world.main:
            state = dict(
                format=CHECKPOINT_FORMAT, step=self.step, config=dataclasses.asdict(self.cfg),
                model=model_state, optimizer=optim_state, rng=_rng_state(self.sampler, self._rank_device),
                tokens_seen=self.tokens_seen, train_time_s=self.train_time, log_window=dict(self.window),
                data_len=[len(self.train_data), len(self.val_data)],
            )
            if world.distributed:
                state["world_size"] = world.size
            try:
                save_checkpoint(state, self.ckpt_path)
            except CheckpointError as e:
                held = ("no checkpoint was written before" if self.last_ckpt_step is None
                        else f"{self.ckpt_path.name} still holds step {self.last_ckpt_step}, whole")
                error = CheckpointError(f"step {self.step}: {e}; {held}")
        error = distributed.from_main(world, error)
        if error is not None:
            raise error
        self.last_ckpt_step = self.step

    def checkpoint_bytes(self) -> int:
        """About how large the checkpoint file is: the weights, Adam's two moments, and some slack."""
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return 3 * weights + (64 << 10)

    def end_record(self, reason: str) -> dict:
        steady = self.steady["tokens"] / self.steady["time"] if self.steady["time"] > 0 else None
        return dict(step=self.step, reason=reason, tokens=self.tokens_seen, train_time_s=self.train_time,
                    wall_s=self.wall(), steady_tokens_per_s=steady, **_peak_memory(self.device))


class _JaxRun(_Run):
    """--framework jax: the model, its training step, validation and samples in pure JAX
    (gateloop_hybrid.jax.training.Trainer); the flags, data stream, initial weights (torch's, from
    --seed), metrics and checkpoints are the torch run's. The torch model and optimiser stay on the
    CPU, as the checkpoint's format: the JAX state is converted from them on start (and resume)
    and into them before each checkpoint, so either framework resumes the other's checkpoints."""

    def __init__(self, cfg: TrainConfig, state: dict | None, world=None):
        try:
            import jax
            import jax.numpy as jnp

            import gateloop_hybrid.jax as glj
            from gateloop_hybrid.jax.training import Trainer
        except ImportError as e:
            raise ConfigError(f"--framework jax: {e}") from None
        from gateloop_hybrid import distributed

        self.jax_device = _jax_device(jax, cfg.device)
        if not cfg.attention and cfg.scan_backend == "pallas" and self.jax_device.platform != "gpu":
            raise ConfigError(f"--scan-backend pallas runs on a GPU; JAX's device here is {self.jax_device}")
        # the torch side (sampler, the weights in torch's format) on the CPU; its scan never runs
        super().__init__(dataclasses.replace(cfg, device="cpu", scan_backend="torch"), state, world)
        self.cfg = cfg
        self.scan_backend = None if cfg.attention else ("pallas" if cfg.scan_backend == "pallas" else "jax")
        self.glj = glj
        bf16 = self.jax_device.platform == "gpu" if cfg.bf16 is None else cfg.bf16
        names = distributed.parameter_names(self.model)
        adam = {names[i]: s for i, s in self.optimizer.state_dict()["state"].items()}
        try:
            model = glj.from_torch_state_dict(self.model.state_dict(), **cfg.model_kwargs())
        except ValueError as e:
            raise ConfigError(f"the model flags do not fit together: {e}") from None
        self.trainer = Trainer(model, lr=cfg.lr, clip=cfg.clip, compute_dtype=jnp.bfloat16 if bf16 else None,
                               device=self.jax_device, adam_state=adam)

    def _optimiser_step(self) -> float:
        batches = torch.stack([self.sampler.next() for _ in range(self.cfg.grad_accum)])  # (accum, b, seq_len + 1)
        return self.trainer.step(batches.numpy())

    def _val_loss(self) -> float:
        cfg = self.cfg
        sampler = Sampler(self.val_data, cfg.seq_len, cfg.batch_size, seed=cfg.seed + 1)  # as evaluate()
        return sum(self.trainer.loss(sampler.next().numpy()) for _ in range(cfg.val_batches)) / cfg.val_batches

    def sample(self) -> dict:
        cfg = self.cfg
        prime = _val_prime(self.val_data, cfg, self.step)
        try:
            out = self.trainer.generate(prime.numpy(), cfg.gen_len, temperature=cfg.temperature, top_k=cfg.top_k,
                                        seed=cfg.seed + self.step)
        except ValueError as e:  # non-finite logits
            raise DivergedError(f"step {self.step}: {e}") from None
        return dict(step=self.step, prime=decode(prime[0].tolist()), text=decode(out[0].tolist()))

    def checkpoint(self) -> None:
        from gateloop_hybrid import distributed

        weights, adam = self.trainer.state_dicts()
        self.model.load_state_dict(self.glj.convert.torch_tensors(weights))
        optimizer = self.optimizer.state_dict()
        optimizer["state"] = {i: {k: torch.as_tensor(v) for k, v in adam[name].items()}
                              for i, name in enumerate(distributed.parameter_names(self.model)) if name in adam}
        self.optimizer.load_state_dict(optimizer)
        super().checkpoint()

    def device_info(self) -> tuple[str, str | None]:
        return f"jax:{self.jax_device.platform}:{self.jax_device.id}", self.jax_device.device_kind


def _jax_device(jax, name: str):
    """JAX's device for --device: auto (JAX's default), cpu, cuda or cuda:i (JAX's GPU i)."""
    if name == "auto":
        return jax.devices()[0]
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"--device {name}: not a device name (cpu, cuda, cuda:1, ...)") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name}: --framework jax runs on cpu or cuda")
    try:
        devices = jax.devices("cpu" if device.type == "cpu" else "gpu")
    except RuntimeError:
        raise ConfigError(f"--device {name}: JAX has no GPU backend here (pip install 'gateloop-hybrid[cuda,jax]')") from None
    index = device.index or 0
    if index >= len(devices):
        raise ConfigError(f"--device {name}: JAX sees {len(devices)} device(s) of that kind")
    return devices[index]


def check_output(out_dir: Path, ckpt_path: Path, ckpt_bytes: int) -> None:
    """Make sure the checkpoint can be written before training for it: the folder exists (or can
    be made) and takes a file, and the disk has room for two checkpoints (the old one stays whole
    until the new one is written beside it), counting a checkpoint already there as one of the two."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"--out-dir {out_dir}: cannot create the folder: {os_reason(e)}") from None
    try:
        fd, probe = tempfile.mkstemp(dir=out_dir, prefix=".write-test-")
        try:
            os.write(fd, b"x")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise OutputError(f"--out-dir {out_dir}: cannot write there: {os_reason(e)}") from None
    existing = ckpt_path.stat().st_size if ckpt_path.is_file() else 0
    need = 2 * max(ckpt_bytes, existing) - existing
    free = shutil.disk_usage(out_dir).free
    if free < need:
        raise OutputError(f"--out-dir {out_dir}: {free / 2**20:.1f} MiB free on its disk; a checkpoint takes about "
                          f"{max(ckpt_bytes, existing) / 2**20:.1f} MiB and replacing one safely needs "
                          f"{need / 2**20:.1f} MiB more. Free some space or choose another --out-dir")


def _summary_line(run: "_Run", state: dict | None) -> str:
    cfg = run.cfg
    model = "attention" if cfg.attention else f"GateLoop (scan {run.scan_backend})"
    if cfg.framework != "torch":
        model = f"{model} in {cfg.framework}"
    where, name = run.device_info()
    device = f"{where}, {run.threads} thread{'s' * (run.threads != 1)}" if where.endswith("cpu") else (
        f"{where} ({name})" if name else where)
    where = f"resuming at step {run.step} of {cfg.max_steps}" if state is not None else f"{cfg.max_steps} steps"
    if run.world.distributed:
        device = (f"{run.world.size} ranks ({'FSDP2' if run.sharded else 'DDP'}, --batch-size {cfg.batch_size} each), "
                  f"rank 0 on {device}")
    return (f"train.py: {model}, {run.n_params:,} parameters, on {device}; data {run.data_path} "
            f"({len(run.train_data):,} train / {len(run.val_data):,} val bytes); {where}, "
            f"{run.tokens_per_step:,} tokens a step; out {cfg.out_dir}")


def train(cfg: TrainConfig, given: set[str] = frozenset()) -> dict:
    """Run training as configured; `given` names the flags typed on the command line (they
    override a resumed checkpoint's config). Returns {"step", "reason", "losses": {step: loss},
    "val": {step: bpc}, "checkpoint"}.

    Checks what it can before the first step (flags, device, data, output folder, disk space) and
    raises a TrainError subclass, with a one-line message naming the flag or file, when anything is wrong.

    Under torchrun, call it on every rank: each trains its share of every batch (see
    gateloop_hybrid.distributed) and returns the same losses; rank 0 alone writes.
    """
    try:
        cfg = apply_preset(cfg, given)
        if not cfg.resume:  # a resumed config is checked once merged with the checkpoint's
            check_config(cfg)
        world, device = start_world(cfg)
    except ConfigError as e:  # the same flags on every rank
        raise _on_every_rank(e) from None
    try:
        return _train(cfg, given, world, device)
    finally:
        stop_world(world)


def _train(cfg: TrainConfig, given: set[str], world, device: torch.device) -> dict:
    from tqdm import tqdm
    from gateloop_hybrid import distributed

    try:
        cfg, state = _resolve_config(cfg, given, world.size)
    except (ConfigError, DataError) as e:  # the same flags and files on every rank
        raise _on_every_rank(e) from None
    if state is not None and state["step"] >= cfg.max_steps:
        if world.main:
            print(f"train.py: --resume: {Path(cfg.out_dir) / CHECKPOINT_NAME} is at step {state['step']}, and "
                  f"--max-steps is {cfg.max_steps}: nothing to train (pass a larger --max-steps to go on)",
                  file=sys.stderr)
        return dict(losses={}, val={}, step=state["step"], reason="already_done",
                    checkpoint=str(Path(cfg.out_dir) / CHECKPOINT_NAME))
    try:
        run = _JaxRun(cfg, state, world) if cfg.framework == "jax" else _Run(cfg, state, world, device)
    except (ConfigError, DataError) as e:
        raise _on_every_rank(e) from None
    on_main(world, lambda: check_output(Path(cfg.out_dir), run.ckpt_path, run.checkpoint_bytes()))
    metrics = on_main(world, lambda: _Metrics(cfg, Path(cfg.metrics), append=state is not None), _NoMetrics())
    device = run.device
    device_str, device_name = run.device_info()
    metrics.log("start", step=run.step, resumed=state is not None, config=dataclasses.asdict(cfg),
                params=run.n_params, scan_backend=run.scan_backend, device=device_str, threads=run.threads,
                device_name=device_name,
                data=str(run.data_path), train_bytes=len(run.train_data), val_bytes=len(run.val_data),
                torch=torch.__version__, python=sys.version.split()[0],
                ranks=world.size, parallel=("fsdp2" if run.sharded else "ddp") if world.distributed else None)
    if world.main:
        print(_summary_line(run, state), file=sys.stderr, flush=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    bar = tqdm(total=cfg.max_steps, initial=run.step, desc="attention" if cfg.attention else "gateloop",
               dynamic_ncols=True, file=sys.stderr, disable=not world.main)
    say = bar.write if world.main else (lambda text: None)

    def validate():
        record = run.validate()
        metrics.log("val", **record)
        say(f"step {run.step}: validation {record['bpc']:.4f} bits per character")
        return run.step

    def held() -> str:
        if run.last_ckpt_step is None:
            return "no checkpoint written"
        return f"{run.ckpt_path} holds step {run.last_ckpt_step}"

    last_val = None
    reason = "max_steps"
    run.model.train()
    try:
        while run.step < cfg.max_steps:
            if cfg.time_budget is not None and distributed.any_rank(world, run.wall() >= cfg.time_budget, device):
                reason = "time_budget"
                break
            loss, tokens_per_s = run.train_step()
            if not math.isfinite(loss):
                raise DivergedError(f"the training loss is {loss} at step {run.step}; stopped without saving these "
                                    f"weights ({held()}). Try a lower --lr or --clip")
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
            step = run.step
            if step % cfg.log_every == 0:
                metrics.log("train", **run.train_record())
            if cfg.val_every and step % cfg.val_every == 0:
                last_val = validate()
            if cfg.sample_every and step % cfg.sample_every == 0 and (world.main or run.samples_on_every_rank):
                record = run.sample()
                metrics.log("sample", **record)
                say(f"--- step {step} sample ---\n{printable(record['prime'])}\n>>>\n"
                    f"{printable(record['text'])}\n")
            if cfg.ckpt_every and step % cfg.ckpt_every == 0:
                run.checkpoint()
        if last_val != run.step:
            validate()
        if run.last_ckpt_step != run.step:
            run.checkpoint()
    except KeyboardInterrupt:
        bar.close()
        if world.main:
            print(f"\ntrain.py: interrupted at step {run.step}; last checkpoint: "
                  f"{held() if run.last_ckpt_step is not None else 'none written'}", file=sys.stderr)
        _log_end(metrics, run, "interrupted")
        raise
    except TrainError as e:
        bar.close()
        _log_end(metrics, run, type(e).__name__, error=str(e))
        raise
    bar.close()
    metrics.log("end", **run.end_record(reason))
    metrics.close()
    return dict(run.results, step=run.step, reason=reason, checkpoint=str(run.ckpt_path))


def _log_end(metrics: _Metrics, run: _Run, reason: str, **extra) -> None:
    """The end record of a run that stops on an error; a metrics file that cannot take it is let be."""
    with contextlib.suppress(TrainError):
        metrics.log("end", **run.end_record(reason), **extra)
    metrics.close()


# ----------------------------------------------------------------------------------------------
# command line entry


def main(argv=None) -> int:
    """train.py's command line: `python train.py [flags]`, or `python train.py sample [flags]`
    (the same as `python sample.py [flags]`). Returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sample"]:
        import sample

        return sample.main(argv[1:])
    if argv[:1] == ["train"]:
        argv = argv[1:]
    cfg, given = parse_train_args(argv)
    try:
        train(cfg, given)
    except KeyboardInterrupt:
        return 130
    except TrainError as e:
        rank = os.environ.get("RANK", "0")  # under torchrun, one line from rank 0 for what all ranks hit
        if rank == "0" or not getattr(e, "every_rank", False):
            print(f"train.py: {e}" if rank == "0" else f"train.py [rank {rank}]: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # outside the files train.py checks: e.g. no usable temporary folder for torch
        print(f"train.py: {e}", file=sys.stderr)
        return 1
    except (torch.OutOfMemoryError, MemoryError) as e:
        first = (str(e).strip().splitlines() or [""])[0][:160]
        print(f"train.py: out of memory ({first}); try a smaller --batch-size, --seq-len or --dim", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
