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
import io
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


def _opt(default, help, **kw):
    """A config field that is also a command-line flag; `help` is its --help text."""
    return field(default=default, metadata=dict(help=help, **kw))


@dataclass
class TrainConfig:
    """Everything a run depends on. Each field is the flag --field-name (underscores as dashes).

    Stored in the checkpoint as a plain dict. On --resume the checkpoint's values are used, and
    only the flags given on the command line override them; the ones in RESUME_FIXED may not change.
    """

    # data and files
    data: str | None = _opt(None, "file of bytes to model: raw, .gz or .zip (default: data/enwik8.gz). "
                                  "A file named enwik8 gets the seed's split, first 90M bytes train and the "
                                  "next 5M validation; any other file the same 90:5 split in proportion")
    out_dir: str | None = _opt(None, "folder for checkpoint.pt and metrics.jsonl "
                                     "(default: runs/gateloop, or runs/attention with --attention)")
    resume: bool = _opt(False, "continue from <out-dir>/checkpoint.pt: same model, optimiser, step, RNG and "
                               "data-sampler state, so the next losses equal those of an uninterrupted run")
    metrics: str | None = _opt(None, "JSONL metrics file (default: <out-dir>/metrics.jsonl; appended to on --resume)")
    tensorboard: bool = _opt(False, "also log to TensorBoard in <out-dir>/tb (needs the tensorboard package)")
    wandb: bool = _opt(False, "also log to Weights & Biases (needs the wandb package and a login)")
    wandb_project: str = _opt("gateloop_hybrid", "wandb project name")

    # model (the seed's sizes)
    dim: int = _opt(512, "model width")
    depth: int = _opt(6, "number of layers (one token mixer and one feed-forward each)")
    gate_loop_heads: int | None = _opt(512, "GateLoop heads; each has its own complex gate (default 512 = dim: one per channel)")
    attention: bool = _opt(False, "train the softmax-attention baseline instead of GateLoop (uses --heads, --dim-head)")
    heads: int = _opt(8, "attention heads (with --attention)")
    dim_head: int = _opt(64, "width of one attention head (with --attention)")
    ff_mult: int = _opt(4, "feed-forward width as a multiple of --dim")
    scan_backend: str = _opt("auto", "GateLoop scan backend: auto, loop, torch, heinsen, jax or pallas "
                                     "(auto picks jax when installed)")

    # optimisation (the seed's values)
    seq_len: int = _opt(256, "training sequence length in bytes")
    batch_size: int = _opt(4, "sequences per micro-batch")
    grad_accum: int = _opt(4, "micro-batches accumulated into one optimiser step")
    lr: float = _opt(1e-4, "Adam learning rate (constant)")
    clip: float = _opt(0.5, "clip the gradient norm to this; 0 disables")
    max_steps: int = _opt(100_000, "stop after this many optimiser steps in all")
    time_budget: float | None = _opt(None, "stop after this many seconds of this invocation (then validate, "
                                           "checkpoint and exit), e.g. for a timed head-to-head")
    seed: int = _opt(0, "seed for the initial weights, the data sampler and sampling")

    # evaluation, sampling, checkpoints, logging
    val_every: int = _opt(100, "validate every N steps (and at the end); 0: only at the end")
    val_batches: int = _opt(4, "micro-batches per validation; the same fixed ones every time")
    sample_every: int = _opt(500, "print a sample every N steps, continuing a validation prime; 0 disables")
    prime_len: int = _opt(128, "bytes of validation text that prime each sample")
    gen_len: int = _opt(256, "bytes generated per sample")
    temperature: float = _opt(1.0, "sampling temperature; 0 picks the most likely byte")
    top_k: int | None = _opt(None, "sample from the k most likely bytes only")
    ckpt_every: int = _opt(500, "checkpoint every N steps (and at the end); 0: only at the end")
    log_every: int = _opt(10, "write a train record (mean loss, tokens/s, peak memory) every N steps")
    device: str = _opt("auto", "torch device: auto (cuda when available), cpu, cuda, cuda:1, ...")
    bf16: bool | None = _opt(None, "bf16 autocast for the forward pass (default: on for CUDA, off for CPU); "
                                   "the scan accumulates in float32 either way")

    def model_kwargs(self) -> dict:
        kw = dict(dim=self.dim, num_tokens=NUM_TOKENS, depth=self.depth, ff_mult=self.ff_mult,
                  use_gate_looped_attn=not self.attention)
        if self.attention:
            kw.update(heads=self.heads, dim_head=self.dim_head)
        else:
            kw.update(gate_loop_heads=self.gate_loop_heads, scan_backend=self.scan_backend)
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


def build_train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py",
        description="Train a byte-level GateLoop Transformer (or the softmax-attention baseline) on "
                    "enwik8 or any file. " + ENWIK8_HELP,
        epilog="Sampling from a checkpoint: python train.py sample --checkpoint PATH --prompt TEXT "
               "(see python train.py sample --help).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        tp = hints[f.name]
        base = _unoptional(tp)
        optional = base is not tp
        if base is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                           help=f.metadata["help"])
        else:
            p.add_argument(flag, type=_none_or(base) if optional else base, default=f.default,
                           metavar=f.name.upper(), help=f.metadata["help"])
    return p


def parse_train_args(argv) -> tuple[TrainConfig, set[str]]:
    """The config from argv, and the names of the flags given explicitly (they win on --resume)."""
    parser = build_train_parser()
    args = parser.parse_args(argv)
    # Parse again with every default suppressed to learn which flags were typed.
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    given = set(vars(parser.parse_args(argv)))
    return TrainConfig(**vars(args)), given


def build_sample_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py sample",
        description="Load a checkpoint written by train.py and continue a prompt, one cached decoding "
                    "step per new byte. Prints the prompt and its continuation.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt written by train.py")
    p.add_argument("--prompt", required=True, help="text to continue (encoded as UTF-8 bytes)")
    p.add_argument("--length", type=int, default=256, help="bytes to generate")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature; 0 is greedy")
    p.add_argument("--top-k", type=_none_or(int), default=None, help="sample from the k most likely bytes only")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, ...")
    p.add_argument("--scan-backend", default=None,
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
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------------------------
# model and sampling


def build_model(model_kwargs: dict) -> torch.nn.Module:
    """The package's Transformer from plain keyword arguments (those of TrainConfig.model_kwargs)."""
    from gateloop_hybrid import Transformer

    return Transformer(**model_kwargs)


def _seeded_rng(device: torch.device, seed: int):
    """A context in which torch's global RNG (CPU and the model's GPU) starts from `seed` and is
    restored afterwards, so that sampling neither depends on nor disturbs the training stream."""
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    ctx = torch.random.fork_rng(devices=devices)

    @contextlib.contextmanager
    def seeded():
        with ctx:
            torch.manual_seed(seed)
            yield

    return seeded()


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
            self.wandb = wandb.init(project=cfg.wandb_project, config=dataclasses.asdict(cfg),
                                    resume="allow" if cfg.resume else None)
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


def train(cfg: TrainConfig, given: set[str] = frozenset()) -> dict:
    """Run training as configured. Returns a summary dict (final step, last losses, reason)."""
    cfg, state = _resolve_config(cfg, given)
    from tqdm import tqdm

    data_path = resolve_data_path(cfg.data)
    raw, name = read_bytes(data_path)
    train_data, val_data = split_data(raw, name)
    del raw
    if state is not None and state["data_len"] != [len(train_data), len(val_data)]:
        raise SystemExit(f"train.py: --resume: {data_path} splits into {len(train_data)}/{len(val_data)} bytes, "
                         f"the checkpoint's data into {state['data_len'][0]}/{state['data_len'][1]}")
    for split, n in (("validation", len(val_data)), ("training", len(train_data))):
        if n < max(cfg.seq_len, cfg.prime_len) + 2:
            raise SystemExit(f"train.py: the {split} split of {data_path} has {n} bytes; "
                             f"--seq-len {cfg.seq_len} and --prime-len {cfg.prime_len} need more")

    device = _device(cfg.device)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model = build_model(cfg.model_kwargs()).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sampler = Sampler(train_data, cfg.seq_len, cfg.batch_size, seed=cfg.seed)

    step, tokens_seen, train_time = 0, 0, 0.0
    window = dict(loss=0.0, steps=0, tokens=0, time=0.0)  # the steps since the last train record
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        for group in optimizer.param_groups:  # a flag given on resume wins over the saved value
            group["lr"] = cfg.lr
        _set_rng_state(state["rng"], sampler)
        step, tokens_seen, train_time = state["step"], state["tokens_seen"], state["train_time_s"]
        window.update(state["log_window"])

    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = out_dir / CHECKPOINT_NAME
    metrics = _Metrics(cfg, Path(cfg.metrics), append=state is not None)
    n_params = sum(p.numel() * (2 if p.is_complex() else 1) for p in model.parameters())
    metrics.log("start", step=step, resumed=state is not None, config=dataclasses.asdict(cfg),
                params=n_params, device=str(device),
                device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                data=str(data_path), train_bytes=len(train_data), val_bytes=len(val_data),
                torch=torch.__version__, python=sys.version.split()[0])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def checkpoint():
        save_checkpoint(dict(
            format=CHECKPOINT_FORMAT, step=step, config=dataclasses.asdict(cfg),
            model=model.state_dict(), optimizer=optimizer.state_dict(), rng=_rng_state(sampler),
            tokens_seen=tokens_seen, train_time_s=train_time, log_window=dict(window),
            data_len=[len(train_data), len(val_data)],
        ), ckpt_path)
        return step

    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum
    last_val = last_ckpt = None
    reason = "max_steps"
    started = time.perf_counter()
    bar = tqdm(total=cfg.max_steps, initial=step, desc="gateloop" if not cfg.attention else "attention",
               dynamic_ncols=True, file=sys.stderr)
    summary = dict(losses={}, val={})
    model.train()
    try:
        while step < cfg.max_steps:
            if cfg.time_budget is not None and time.perf_counter() - started >= cfg.time_budget:
                reason = "time_budget"
                break
            t0 = time.perf_counter()
            loss_sum = torch.zeros((), device=device)
            for _ in range(cfg.grad_accum):
                batch = sampler.next().to(device, non_blocking=True)
                with _autocast(device, cfg.bf16):
                    loss = model(batch, return_loss=True)
                (loss / cfg.grad_accum).backward()
                loss_sum += loss.detach().float()
            if cfg.clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += tokens_per_step
            loss_value = loss_sum.item() / cfg.grad_accum  # synchronises: the step is done
            dt = time.perf_counter() - t0
            train_time += dt
            window["loss"] += loss_value
            window["steps"] += 1
            window["tokens"] += tokens_per_step
            window["time"] += dt
            summary["losses"][step] = loss_value
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tokens_per_step / dt:,.0f}", refresh=False)

            if step % cfg.log_every == 0:
                mean = window["loss"] / window["steps"]
                metrics.log("train", step=step, loss=mean, bpc=mean / math.log(2),
                            tokens_per_s=window["tokens"] / window["time"], tokens=tokens_seen,
                            train_time_s=train_time, wall_s=time.perf_counter() - started,
                            lr=cfg.lr, **_peak_memory(device))
                window = dict(loss=0.0, steps=0, tokens=0, time=0.0)
            if cfg.val_every and step % cfg.val_every == 0:
                last_val = _validate(model, val_data, cfg, device, step, metrics, bar, train_time, started, summary)
            if cfg.sample_every and step % cfg.sample_every == 0:
                prime, text = _sample_from_val(model, val_data, cfg, device, step)
                bar.write(f"--- step {step} sample ---\n{prime}\n>>>\n{text}\n")
                metrics.log("sample", step=step, prime=prime, text=text)
            if cfg.ckpt_every and step % cfg.ckpt_every == 0:
                last_ckpt = checkpoint()
        if last_val != step:
            _validate(model, val_data, cfg, device, step, metrics, bar, train_time, started, summary)
        if last_ckpt != step:
            checkpoint()
    except KeyboardInterrupt:
        bar.close()
        where = f"{ckpt_path} (step {last_ckpt})" if last_ckpt is not None else (
            f"{ckpt_path} (from before this invocation)" if state is not None else "none written")
        print(f"\ntrain.py: interrupted at step {step}; last checkpoint: {where}", file=sys.stderr)
        metrics.log("end", step=step, reason="interrupted")
        metrics.close()
        raise
    bar.close()
    metrics.log("end", step=step, reason=reason, tokens=tokens_seen, train_time_s=train_time,
                wall_s=time.perf_counter() - started, **_peak_memory(device))
    metrics.close()
    summary.update(step=step, reason=reason, checkpoint=str(ckpt_path))
    return summary


def _validate(model, val_data, cfg, device, step, metrics, bar, train_time, started, summary) -> int:
    loss = evaluate(model, val_data, cfg, device)
    bpc = loss / math.log(2)
    metrics.log("val", step=step, loss=loss, bpc=bpc, train_time_s=train_time,
                wall_s=time.perf_counter() - started, **_peak_memory(device))
    bar.write(f"step {step}: validation {bpc:.4f} bits per character")
    summary["val"][step] = bpc
    return step


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
    model = build_model(cfg.model_kwargs())
    model.load_state_dict(state["model"])
    model.to(device).eval()
    ids = torch.tensor(list(prompt), dtype=torch.long, device=device)[None]
    with _seeded_rng(device, args.seed), _autocast(device, args.bf16):
        out = model.generate(ids, args.length, temperature=args.temperature, top_k=args.top_k)
    text = args.prompt + decode(out[0].tolist())
    print(text)
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
