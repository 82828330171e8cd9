"""Character-level language modelling with the GateLoop Transformer, in the enwik8 format.

Bytes are tokens (256 of them). Train, validate in bits per character, sample with the cached
incremental decoding, and checkpoint so that a run can be resumed exactly:

    python train.py --data enwik8.zip                      # GateLoop, the seed's sizes
    python train.py --data enwik8.zip --attention          # softmax-attention baseline
    python train.py --data enwik8.zip --resume             # continue <out-dir>/checkpoint.pt
    python train.py sample --checkpoint runs/gateloop/checkpoint.pt --prompt "The "

`python train.py --help` lists every training flag; `python train.py sample --help` the sampling ones.

Checkpoints are one file, <out-dir>/checkpoint.pt, replaced atomically (written to a temporary
file, fsync'd, then renamed over the old one), holding only tensors and plain Python values so
that `torch.load(..., weights_only=True)` opens it without running code from it.
Metrics go to <out-dir>/metrics.jsonl, one JSON object per line (see `_Metrics`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gzip
import json
import math
import os
import random
import sys
import time
import types
import typing
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

# JAX (the scan backend) would otherwise take 75% of GPU memory on its first op, leaving torch
# little and making peak-memory numbers meaningless. Set before anything imports jax.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import torch  # noqa: E402

NUM_TOKENS = 256  # bytes
CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = "gateloop_hybrid.train/1"
ENWIK8_TRAIN, ENWIK8_VAL = 90_000_000, 5_000_000  # the seed's split of enwik8
DEFAULT_DATA = ("data/enwik8.gz", "data/enwik8.zip", "data/enwik8")
ENWIK8_HELP = (
    "enwik8 is the Hutter Prize data set: the first 10^8 bytes of an English Wikipedia XML dump, "
    "http://mattmahoney.net/dc/enwik8.zip. train.py never downloads anything: fetch the file "
    "yourself and pass it with --data PATH (raw, .gz or .zip), or put it at data/enwik8.gz. "
    "Any other file works too, read as bytes."
)


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
              "forward scan per layer: 1.4-1.65x faster steps at --seq-len 4096 on an H200, about 15%% "
              "on CPU (benchmarks/step_profile.py)")
    main_thread_backward: bool = _opt(
        False, "run backward on the calling thread (torch.autograd.set_multithreading_enabled(False) "
               "around it) instead of torch's per-device autograd worker thread. Saves a thread "
               "hand-off per backward: 1.36 -> 1.02 ms for a bridged complex64 scan fwd+bwd at "
               "4x4096x1024 on an H200; a GateLoop step at --seq-len 256 took 106 instead of 132 ms there, "
               "none faster at 4096 (benchmarks/step_profile.py --backward-thread both)")

    # optimisation (the seed's values)
    seq_len: int = _opt(256, "training sequence length in bytes")
    batch_size: int = _opt(4, "sequences per micro-batch")
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

    def model_kwargs(self) -> dict:
        kw = dict(dim=self.dim, num_tokens=NUM_TOKENS, depth=self.depth, ff_mult=self.ff_mult,
                  use_gate_looped_attn=not self.attention)
        if self.attention:
            kw.update(heads=self.heads, dim_head=self.dim_head)
        else:
            kw.update(gate_loop_heads=self.gate_loop_heads, scan_backend=self.scan_backend,
                      checkpoint_gate_looped_attn=self.checkpoint_scan)
        return kw


# Flags that a resumed run must keep: they define the model, the data stream or the RNG.
RESUME_FIXED = ("dim", "depth", "gate_loop_heads", "attention", "heads", "dim_head", "ff_mult",
                "seq_len", "batch_size", "seed")
# Never taken from a checkpoint: they say what to do now, not what the run is.
NOT_RESUMED = ("resume",)


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


def build_train_parser(with_defaults: bool = True) -> argparse.ArgumentParser:
    """The training flags, one per TrainConfig field. with_defaults=False leaves every default
    out of the parsed namespace, which tells the flags that were typed from those that were not."""
    p = argparse.ArgumentParser(
        prog="train.py",
        description="Train a byte-level GateLoop Transformer (or the softmax-attention baseline) on "
                    "enwik8 or any file, with validation in bits per character, samples, metrics and "
                    "resumable checkpoints. " + ENWIK8_HELP,
        epilog="Sampling from a checkpoint: python train.py sample --checkpoint PATH --prompt TEXT "
               "(see python train.py sample --help).",
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


def build_sample_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py sample",
        description="Load a checkpoint written by train.py and continue a prompt, one cached decoding "
                    "step per new byte. Prints the prompt and its continuation.",
    )
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="checkpoint.pt written by train.py")
    p.add_argument("--prompt", required=True, metavar="TEXT", help="text to continue (encoded as UTF-8 bytes)")
    p.add_argument("--length", type=int, default=256, metavar="N", help="bytes to generate (default: 256)")
    p.add_argument("--temperature", type=float, default=1.0, metavar="X",
                   help="sampling temperature; 0 is greedy (default: 1.0)")
    p.add_argument("--top-k", type=_none_or(int), default=None, metavar="N",
                   help="sample from the k most likely bytes only")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="sampling seed (default: 0)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, ... (default: auto)")
    p.add_argument("--scan-backend", default=None, metavar="NAME",
                   help="override the checkpoint's scan backend (e.g. torch where jax is missing)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on for CUDA)")
    return p


# ----------------------------------------------------------------------------------------------
# data


def read_bytes(path: str | os.PathLike) -> tuple[bytes, str]:
    """The file's bytes, decompressed when it is gzip (.gz, dictzip .dz) or a zip archive.

    Returns (data, name) where name is the file or zip member name without compression suffix.
    """
    path = Path(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    name = path.name
    if magic[:2] == b"\x1f\x8b":
        with gzip.open(path, "rb") as f:
            data = f.read()
        for suffix in (".gz", ".dz"):
            name = name.removesuffix(suffix)
    elif magic == b"PK\x03\x04":
        with zipfile.ZipFile(path) as z:
            members = [m for m in z.infolist() if not m.is_dir()]
            if len(members) != 1:
                raise SystemExit(f"train.py: {path} holds {len(members)} files; pass a zip with exactly "
                                 f"one (e.g. enwik8.zip), or unpack it and pass the file")
            data = z.read(members[0])
            name = Path(members[0].filename).name
    else:
        data = path.read_bytes()
    return data, name


def split_data(data: bytes, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) uint8 tensors: enwik8 gets the seed's 90M/5M split, other files 90:5 in proportion."""
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    if name == "enwik8" and len(buf) >= ENWIK8_TRAIN + ENWIK8_VAL:
        return buf[:ENWIK8_TRAIN], buf[ENWIK8_TRAIN:ENWIK8_TRAIN + ENWIK8_VAL]
    n_train = len(buf) * 90 // 95
    return buf[:n_train], buf[n_train:]


def resolve_data_path(data: str | None) -> Path:
    if data is not None:
        path = Path(data)
        if not path.is_file():
            raise SystemExit(f"train.py: --data {data}: no such file. {ENWIK8_HELP}")
        return path
    for candidate in DEFAULT_DATA:
        if Path(candidate).is_file():
            return Path(candidate)
    raise SystemExit(f"train.py: no training data (no --data given and no data/enwik8.gz). {ENWIK8_HELP}")


class Sampler:
    """Random windows of seq_len + 1 bytes, drawn from a seeded torch.Generator.

    Its state (one tensor) goes into the checkpoint, so a resumed run sees the same batches.
    """

    def __init__(self, data: torch.Tensor, seq_len: int, batch_size: int, seed: int):
        if len(data) < seq_len + 2:
            raise SystemExit(f"train.py: a split of {len(data)} bytes is too short for --seq-len {seq_len}")
        self.data, self.seq_len, self.batch_size = data, seq_len, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self._window = torch.arange(seq_len + 1)

    def next(self) -> torch.Tensor:
        """(batch_size, seq_len + 1) int64 token ids."""
        starts = torch.randint(0, len(self.data) - self.seq_len - 1, (self.batch_size,), generator=self.generator)
        return self.data[starts[:, None] + self._window].long()

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
        raise SystemExit(f"train.py: --scan-backend {cfg.scan_backend}: {e}") from None


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


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    """Write state to path atomically: a temporary file beside it, fsync, rename, fsync the folder.

    A crash, kill or Ctrl-C at any point leaves either the old checkpoint or the new one, whole.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
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


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Open a checkpoint without running code from it (weights_only=True)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise SystemExit(f"train.py: {path} is not a checkpoint written by train.py")
    return state


def _rng_state(sampler: Sampler) -> dict:
    py_version, py_state, py_gauss = random.getstate()
    rng = dict(
        torch=torch.get_rng_state(),
        python=torch.tensor(py_state, dtype=torch.int64),
        python_version=py_version,
        python_gauss=py_gauss,
        data=sampler.state(),
    )
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def _set_rng_state(rng: dict, sampler: Sampler) -> None:
    torch.set_rng_state(rng["torch"])
    random.setstate((rng["python_version"], tuple(rng["python"].tolist()), rng["python_gauss"]))
    sampler.set_state(rng["data"])
    if "cuda" in rng and torch.cuda.is_available():
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
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a" if append else "w", encoding="utf-8")

    def log(self, kind: str, **record) -> None:
        self.file.write(json.dumps(dict(kind=kind, **record)) + "\n")
        self.file.flush()
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
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _require(module: str, flag: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise SystemExit(f"train.py: {flag} needs the {module} package, which is not installed "
                         f"({e}); pip install {module}, or drop {flag}") from None


def _peak_memory(device: torch.device) -> dict:
    """Peak memory so far: torch's allocator, and JAX's when the scan brought JAX in."""
    out = {}
    if device.type == "cuda":
        out["peak_mem_bytes"] = torch.cuda.max_memory_allocated(device)
    if "jax" in sys.modules:
        try:
            jax = sys.modules["jax"]
            devs = [d for d in jax.devices() if d.platform == "gpu"]
            stats = devs[0].memory_stats() if devs else None
            if stats and "peak_bytes_in_use" in stats:
                out["jax_peak_mem_bytes"] = int(stats["peak_bytes_in_use"])
        except Exception:  # memory stats are a nicety; never fail a run over them
            pass
    return out


# ----------------------------------------------------------------------------------------------
# training


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _autocast(device: torch.device, bf16: bool | None):
    enabled = device.type == "cuda" if bf16 is None else bf16
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


@torch.no_grad()
def evaluate(model, val: torch.Tensor, cfg: TrainConfig, device: torch.device) -> float:
    """Mean validation loss in nats over the same cfg.val_batches micro-batches every time."""
    sampler = Sampler(val, cfg.seq_len, cfg.batch_size, seed=cfg.seed + 1)
    was_training = model.training
    model.eval()
    total = 0.0
    for _ in range(cfg.val_batches):
        batch = sampler.next().to(device, non_blocking=True)
        with _autocast(device, cfg.bf16):
            total += model(batch, return_loss=True).float().item()
    model.train(was_training)
    return total / cfg.val_batches


def _sample_from_val(model, val: torch.Tensor, cfg: TrainConfig, device: torch.device, step: int) -> tuple[str, str]:
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    start = int(torch.randint(0, len(val) - cfg.prime_len, (1,), generator=g))
    prime = val[start:start + cfg.prime_len].long()[None].to(device)
    was_training = model.training
    model.eval()
    with _seeded_rng(device, cfg.seed + step), _autocast(device, cfg.bf16):
        out = model.generate(prime, cfg.gen_len, temperature=cfg.temperature, top_k=cfg.top_k)
    model.train(was_training)
    return decode(prime[0].tolist()), decode(out[0].tolist())


def _resolve_config(cfg: TrainConfig, given: set[str]) -> tuple[TrainConfig, dict | None]:
    """Fill in defaults that depend on other fields; on --resume, merge with the checkpoint's config."""
    if cfg.out_dir is None:
        cfg.out_dir = str(Path("runs") / ("attention" if cfg.attention else "gateloop"))
    ckpt_path = Path(cfg.out_dir) / CHECKPOINT_NAME
    state = None
    if cfg.resume:
        if not ckpt_path.is_file():
            raise SystemExit(f"train.py: --resume: no checkpoint at {ckpt_path}")
        state = load_checkpoint(ckpt_path)
        saved = state["config"]
        for name in RESUME_FIXED:
            if name in given and getattr(cfg, name) != saved[name]:
                raise SystemExit(f"train.py: --resume: --{name.replace('_', '-')} {getattr(cfg, name)} differs from "
                                 f"the checkpoint's {saved[name]}; a resumed run keeps its model, data stream and seed")
        merged = {k: (getattr(cfg, k) if k in given or k in NOT_RESUMED else saved.get(k, getattr(cfg, k)))
                  for k in (f.name for f in dataclasses.fields(TrainConfig))}
        merged["out_dir"] = cfg.out_dir
        cfg = TrainConfig(**merged)
    elif ckpt_path.exists():
        raise SystemExit(f"train.py: {ckpt_path} exists; pass --resume to continue that run, "
                         f"or choose another --out-dir")
    if cfg.metrics is None:
        cfg.metrics = str(Path(cfg.out_dir) / "metrics.jsonl")
    return cfg, state


def _load_splits(cfg: TrainConfig, state: dict | None) -> tuple[Path, torch.Tensor, torch.Tensor]:
    data_path = resolve_data_path(cfg.data)
    train_data, val_data = split_data(*read_bytes(data_path))
    if state is not None and state["data_len"] != [len(train_data), len(val_data)]:
        raise SystemExit(f"train.py: --resume: {data_path} splits into {len(train_data)}/{len(val_data)} bytes, "
                         f"the checkpoint's data into {state['data_len'][0]}/{state['data_len'][1]}")
    for split, n in (("validation", len(val_data)), ("training", len(train_data))):
        if n < max(cfg.seq_len, cfg.prime_len) + 2:
            raise SystemExit(f"train.py: the {split} split of {data_path} has {n} bytes; "
                             f"--seq-len {cfg.seq_len} and --prime-len {cfg.prime_len} need more")
    return data_path, train_data, val_data


class _Run:
    """One invocation of training: the model, optimiser, data sampler and counters, and the
    steps that act on them (a training step, validation, a sample, a checkpoint)."""

    WARMUP_STEPS = 10  # steps of each invocation left out of steady_tokens_per_s (JIT, allocator warm-up)

    def __init__(self, cfg: TrainConfig, state: dict | None):
        self.cfg = cfg
        self.data_path, self.train_data, self.val_data = _load_splits(cfg, state)
        self.device = _device(cfg.device)
        self.scan_backend = resolved_scan_backend(cfg, self.device)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        self.model = build_model(cfg.model_kwargs()).to(self.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        self.sampler = Sampler(self.train_data, cfg.seq_len, cfg.batch_size, seed=cfg.seed)
        self.tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum
        self.ckpt_path = Path(cfg.out_dir) / CHECKPOINT_NAME

        self.step, self.tokens_seen, self.train_time = 0, 0, 0.0
        self.window = self._empty_window()  # the steps since the last train record
        if state is not None:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            for group in self.optimizer.param_groups:  # --lr given on resume wins over the saved one
                group["lr"] = cfg.lr
            _set_rng_state(state["rng"], self.sampler)
            self.step, self.tokens_seen, self.train_time = state["step"], state["tokens_seen"], state["train_time_s"]
            self.window.update(state["log_window"])
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
        """One optimiser step over cfg.grad_accum micro-batches -> (mean loss in nats, tokens/s)."""
        cfg, device = self.cfg, self.device
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        for _ in range(cfg.grad_accum):
            batch = self.sampler.next().to(device, non_blocking=True)  # (b, seq_len + 1)
            with _autocast(device, cfg.bf16):
                loss = self.model(batch, return_loss=True)
            with torch.autograd.set_multithreading_enabled(not cfg.main_thread_backward):
                (loss / cfg.grad_accum).backward()
            loss_sum += loss.detach().float()
        if cfg.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss_value = loss_sum.item() / cfg.grad_accum  # synchronises: the step has finished
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

    def train_record(self) -> dict:
        """The mean loss, tokens/s and peak memory since the last record; starts a new window."""
        w, self.window = self.window, self._empty_window()
        mean = w["loss"] / w["steps"]
        return dict(step=self.step, loss=mean, bpc=mean / math.log(2), tokens_per_s=w["tokens"] / w["time"],
                    tokens=self.tokens_seen, train_time_s=self.train_time, wall_s=self.wall(), lr=self.cfg.lr,
                    **_peak_memory(self.device))

    def validate(self) -> dict:
        loss = evaluate(self.model, self.val_data, self.cfg, self.device)
        self.results["val"][self.step] = loss / math.log(2)
        return dict(step=self.step, loss=loss, bpc=loss / math.log(2), tokens=self.tokens_seen,
                    train_time_s=self.train_time, wall_s=self.wall(), **_peak_memory(self.device))

    def sample(self) -> dict:
        prime, text = _sample_from_val(self.model, self.val_data, self.cfg, self.device, self.step)
        return dict(step=self.step, prime=prime, text=text)

    def checkpoint(self) -> None:
        save_checkpoint(dict(
            format=CHECKPOINT_FORMAT, step=self.step, config=dataclasses.asdict(self.cfg),
            model=self.model.state_dict(), optimizer=self.optimizer.state_dict(), rng=_rng_state(self.sampler),
            tokens_seen=self.tokens_seen, train_time_s=self.train_time, log_window=dict(self.window),
            data_len=[len(self.train_data), len(self.val_data)],
        ), self.ckpt_path)

    def end_record(self, reason: str) -> dict:
        steady = self.steady["tokens"] / self.steady["time"] if self.steady["time"] > 0 else None
        return dict(step=self.step, reason=reason, tokens=self.tokens_seen, train_time_s=self.train_time,
                    wall_s=self.wall(), steady_tokens_per_s=steady, **_peak_memory(self.device))


def train(cfg: TrainConfig, given: set[str] = frozenset()) -> dict:
    """Run training as configured; `given` names the flags typed on the command line (they
    override a resumed checkpoint's config). Returns {"step", "reason", "losses": {step: loss},
    "val": {step: bpc}, "checkpoint"}."""
    from tqdm import tqdm

    cfg, state = _resolve_config(cfg, given)
    run = _Run(cfg, state)
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    metrics = _Metrics(cfg, Path(cfg.metrics), append=state is not None)
    device = run.device
    metrics.log("start", step=run.step, resumed=state is not None, config=dataclasses.asdict(cfg),
                params=run.n_params, scan_backend=run.scan_backend, device=str(device),
                device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                data=str(run.data_path), train_bytes=len(run.train_data), val_bytes=len(run.val_data),
                torch=torch.__version__, python=sys.version.split()[0])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    bar = tqdm(total=cfg.max_steps, initial=run.step, desc="attention" if cfg.attention else "gateloop",
               dynamic_ncols=True, file=sys.stderr)

    def validate():
        record = run.validate()
        metrics.log("val", **record)
        bar.write(f"step {run.step}: validation {record['bpc']:.4f} bits per character")
        return run.step

    last_val = last_ckpt = None
    reason = "max_steps"
    run.model.train()
    try:
        while run.step < cfg.max_steps:
            if cfg.time_budget is not None and run.wall() >= cfg.time_budget:
                reason = "time_budget"
                break
            loss, tokens_per_s = run.train_step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
            step = run.step
            if step % cfg.log_every == 0:
                metrics.log("train", **run.train_record())
            if cfg.val_every and step % cfg.val_every == 0:
                last_val = validate()
            if cfg.sample_every and step % cfg.sample_every == 0:
                record = run.sample()
                metrics.log("sample", **record)
                bar.write(f"--- step {step} sample ---\n{printable(record['prime'])}\n>>>\n"
                          f"{printable(record['text'])}\n")
            if cfg.ckpt_every and step % cfg.ckpt_every == 0:
                run.checkpoint()
                last_ckpt = step
        if last_val != run.step:
            validate()
        if last_ckpt != run.step:
            run.checkpoint()
            last_ckpt = run.step
    except KeyboardInterrupt:
        bar.close()
        if last_ckpt is not None:
            where = f"{run.ckpt_path} (step {last_ckpt})"
        else:
            where = f"{run.ckpt_path} (step {state['step']})" if state is not None else "none written"
        print(f"\ntrain.py: interrupted at step {run.step}; last checkpoint: {where}", file=sys.stderr)
        metrics.log("end", **run.end_record("interrupted"))
        metrics.close()
        raise
    bar.close()
    metrics.log("end", **run.end_record(reason))
    metrics.close()
    return dict(run.results, step=run.step, reason=reason, checkpoint=str(run.ckpt_path))


# ----------------------------------------------------------------------------------------------
# sampling from a checkpoint


def sample_main(argv) -> str:
    args = build_sample_parser().parse_args(argv)
    state = load_checkpoint(args.checkpoint)
    cfg = TrainConfig(**state["config"])
    if args.scan_backend is not None:
        cfg.scan_backend = args.scan_backend
    prompt = args.prompt.encode("utf-8")
    if not prompt:
        raise SystemExit("train.py sample: --prompt must not be empty")
    device = _device(args.device)
    resolved_scan_backend(cfg, device)
    model = build_model(cfg.model_kwargs())
    model.load_state_dict(state["model"])
    model.to(device).eval()
    ids = torch.tensor(list(prompt), dtype=torch.long, device=device)[None]
    t0 = time.perf_counter()
    with _seeded_rng(device, args.seed), _autocast(device, args.bf16):
        out = model.generate(ids, args.length, temperature=args.temperature, top_k=args.top_k)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    text = printable(args.prompt + decode(out[0].tolist()))
    print(text)
    print(f"train.py sample: {args.length} bytes after a {len(prompt)}-byte prompt in {seconds:.2f} s "
          f"(step {state['step']} of {args.checkpoint}, {device})", file=sys.stderr)
    return text


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sample"]:
        sample_main(argv[1:])
        return 0
    if argv[:1] == ["train"]:
        argv = argv[1:]
    cfg, given = parse_train_args(argv)
    try:
        train(cfg, given)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
