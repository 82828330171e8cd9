"""The run's configuration: TrainConfig (every flag of train.py as a typed field), its command line
(argparse built from the fields), presets, and the checks that reject a flag out of range or
flags that contradict each other.

On --resume the checkpoint's config is merged in (see ``resume``): RESUME_FIXED names the fields
a resumed run may not change, NOT_RESUMED those never taken from a checkpoint, and PER_RANK those
that the ranks of a torchrun launch may set differently.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError

NUM_TOKENS = 256  # bytes
ENWIK8_HELP = (
    "enwik8 is the Hutter Prize data set: the first 10^8 bytes of an English Wikipedia XML dump, "
    "http://mattmahoney.net/dc/enwik8.zip. train.py never downloads anything: fetch the file "
    "yourself and pass it with --data PATH (raw, .gz or .zip), or put it at data/enwik8.gz. "
    "Any other file works too, read as bytes."
)


def option(default, help, metavar=None):
    """A config field that is also a command-line flag; `help` is its --help text."""
    return field(default=default, metadata=dict(help=help, metavar=metavar))


@dataclass
class TrainConfig:
    """Everything a run depends on. Each field is the flag --field-name (underscores as dashes).

    Stored in the checkpoint as a plain dict. On --resume the checkpoint's values are used, and
    only the flags given on the command line override them; the ones in RESUME_FIXED may not change.
    """

    # data and files
    data: str | None = option(
        None, "file of bytes to model: raw, .gz or .zip (default: data/enwik8.gz). A file named "
              "enwik8 gets the seed's split, the first 90M bytes to train and the next 5M to validate; "
              "any other file a 90:5 split in proportion", metavar="PATH")
    out_dir: str | None = option(
        None, "folder for checkpoint.pt and metrics.jsonl (default: runs/gateloop, or runs/attention "
              "with --attention)", metavar="DIR")
    resume: bool = option(
        False, "continue from <out-dir>/checkpoint.pt: same model, optimiser, step, RNG and data-sampler "
               "state, so the next losses equal those of an uninterrupted run")
    allow_data_change: bool = option(
        False, "on --resume, train on --data even when it is not the file the checkpoint was trained on "
               "(another file, or one changed since; the checkpoint records a fingerprint of it): a warning "
               "instead of a refusal")
    metrics: str | None = option(
        None, "JSONL metrics file (default: <out-dir>/metrics.jsonl; appended to on --resume)", metavar="PATH")
    tensorboard: bool = option(False, "also log to TensorBoard in <out-dir>/tb (needs the tensorboard package)")
    wandb: bool = option(False, "also log to Weights & Biases (needs the wandb package and a login)")
    wandb_project: str = option("gateloop_hybrid", "wandb project name", metavar="NAME")
    preset: str | None = option(
        None, "start from a named set of flag values; flags typed as well win. "
              "demo: a 124K-parameter GateLoop model on tests/data/devils_dictionary.txt, on the CPU, "
              "in under a minute, ending with a sample (out-dir runs/demo)", metavar="NAME")
    threads: int | None = option(
        None, "CPU threads for torch (torch.set_num_threads). Default: OMP_NUM_THREADS when set, "
              "else the cores not busy now (available cores minus the 1-minute load average, at least 1): "
              "on a loaded machine torch's default of every core made steps 5-10x slower than 1 thread")

    # model (the seed's sizes)
    dim: int = option(512, "model width")
    depth: int = option(6, "number of layers (one token mixer and one feed-forward each)")
    gate_loop_heads: int | None = option(512, "GateLoop heads, each with its own complex gate (512 = dim: one a channel)")
    attention: bool = option(False, "train the softmax-attention baseline instead (uses --heads, --dim-head)")
    layer_pattern: str | None = option(
        None, "a hybrid stack: one letter per layer, repeated to --depth: g GateLoop, a attention (--heads, "
              "--dim-head), m attention after a SimpleGateLoopLayer; every block then holds a GateLoop block's "
              "parameters (its feed-forward widened or narrowed; gateloop_hybrid.hybrid)", metavar="LETTERS")
    heads: int = option(8, "attention heads (with --attention, or the a and m layers of --layer-pattern)")
    dim_head: int = option(64, "width of one attention head (with --attention or --layer-pattern)")
    ff_mult: int = option(4, "feed-forward width as a multiple of --dim")
    rotary_emb: bool = option(False, "rotary position embedding in the attention layers")
    ablate_complex: bool = option(False, "GateLoop with real gates only (the seed's ablate_complex)")
    ablate_state_transition: bool = option(
        False, "GateLoop without its data-controlled state transition (the seed's ablate_state_transition)")
    scan_backend: str = option(
        "auto", "GateLoop scan backend: auto, loop, torch, heinsen, jax or pallas (auto picks the fastest "
                "one installed; see gateloop_hybrid.scan)", metavar="NAME")
    checkpoint_scan: bool = option(
        True, "recompute the GateLoop scan in backward instead of storing its states (the seed's "
              "checkpoint_gate_looped_attn; default on). With one feature per head (--gate-loop-heads = "
              "--dim) the states are as small as one activation, and --no-checkpoint-scan saves a "
              "forward scan per layer: on an H200 with the fused kernels, 2-5%% faster steps for 14%% more "
              "peak memory at --seq-len 4096 (benchmarks/model_speed.py --no-recompute); about 15%% on CPU")
    main_thread_backward: bool = option(
        False, "run backward on the calling thread (torch.autograd.set_multithreading_enabled(False) "
               "around it) instead of torch's per-device autograd worker thread. Saves a thread "
               "hand-off per backward: 1.36 -> 1.02 ms for a bridged complex64 scan fwd+bwd at "
               "4x4096x1024 on an H200; a GateLoop step at --seq-len 256 took 106 instead of 132 ms there, "
               "none faster at 4096 (benchmarks/lab/step_profile.py --backward-thread both)")

    # optimisation (the seed's values)
    seq_len: int = option(256, "training sequence length in bytes")
    batch_size: int = option(
        4, "sequences per micro-batch, on each rank under torchrun: an optimiser step sees "
           "--batch-size x --grad-accum x ranks sequences")
    grad_accum: int = option(4, "micro-batches accumulated into one optimiser step")
    lr: float = option(1e-4, "Adam learning rate (constant)")
    clip: float = option(0.5, "clip the gradient norm to this; 0 disables")
    max_steps: int = option(100_000, "stop after this many optimiser steps in all")
    time_budget: float | None = option(
        None, "stop after this many seconds of this invocation, then validate, checkpoint and exit "
              "(for a timed comparison)")
    seed: int = option(0, "seed for the initial weights, the data sampler and the samples")

    # evaluation, sampling, checkpoints, logging
    val_every: int = option(100, "validate every N steps, and at the end; 0: only at the end")
    val_batches: int = option(4, "micro-batches per validation, the same ones every time")
    sample_every: int = option(500, "print a sample every N steps, continuing a validation prime; 0: never")
    prime_len: int = option(128, "bytes of validation text that prime each sample")
    gen_len: int = option(256, "bytes generated per sample")
    temperature: float = option(1.0, "sampling temperature; 0 picks the most likely byte")
    top_k: int | None = option(None, "sample from the k most likely bytes only")
    ckpt_every: int = option(500, "checkpoint every N steps, and at the end; 0: only at the end")
    log_every: int = option(10, "write a train record (mean loss, tokens/s, peak memory) every N steps")
    device: str = option("auto", "torch device: auto (cuda when available), cpu, cuda, cuda:1, ...", metavar="DEVICE")
    bf16: bool | None = option(
        None, "bf16 autocast (default: on for CUDA, off for CPU); the scan accumulates in float32 either way")
    compile: str | None = option(
        None, "torch.compile the training forward and backward: 'default', or 'reduce-overhead' (CUDA graphs, "
              "CUDA only; the fastest mode for both models on an H200, see benchmarks/model_speed.py). "
              "Validation and samples run uncompiled", metavar="MODE")
    framework: str = option(
        "torch", "torch, or jax: the same model, optimiser, data stream and checkpoints, with the model and "
                 "its training step in pure JAX (gateloop_hybrid.jax; needs the jax extra). With jax, --bf16 "
                 "computes in bfloat16 with float32 weights, --scan-backend is auto (= jax), jax or pallas, and "
                 "--device names JAX's device", metavar="NAME")
    fsdp: bool = option(
        False, "under torchrun, shard the weights, gradients and optimiser state across the ranks with FSDP2 "
               "(torch.distributed.fsdp.fully_shard) instead of replicating them (DistributedDataParallel)")

    def model_kwargs(self) -> dict:
        kw = dict(dim=self.dim, num_tokens=NUM_TOKENS, depth=self.depth, ff_mult=self.ff_mult,
                  use_gate_looped_attn=not self.attention)
        kw.update({name: True for name in ("rotary_emb", "ablate_complex", "ablate_state_transition")
                   if getattr(self, name)})       # only when set: older checkpoints' models are unchanged
        if self.layer_pattern is not None:
            kw.update(layer_pattern=self.layer_pattern, heads=self.heads, dim_head=self.dim_head)
        if self.attention:
            kw.update(heads=self.heads, dim_head=self.dim_head)
        else:
            kw.update(gate_loop_heads=self.gate_loop_heads, scan_backend=self.scan_backend,
                      checkpoint_gate_looped_attn=self.checkpoint_scan)
        return kw


# Flags that a resumed run must keep: they define the model, the data stream or the RNG. (On a
# different number of ranks --batch-size may change so that --batch-size x ranks stays the same.)
RESUME_FIXED = ("dim", "depth", "gate_loop_heads", "attention", "layer_pattern", "heads", "dim_head", "ff_mult",
                "rotary_emb", "ablate_complex", "ablate_state_transition",
                "seq_len", "batch_size", "seed")
# Never taken from a checkpoint: they say what to do now, not what the run is. (out_dir is
# where the checkpoint was found; metrics follow it unless --metrics is given again.)
NOT_RESUMED = ("resume", "allow_data_change", "out_dir", "metrics", "threads", "preset", "compile", "fsdp")
# Flags that the ranks of one torchrun launch may set differently; the ranks compare all others
# before the first step. out_dir and data are compared by what they hold (the checkpoint a resume
# starts from, the data's fingerprint), not by their paths, which may differ from machine to machine;
# the rest say what rank 0 alone does (metrics, loggers) or how one process runs (threads); a
# preset's values are compared once applied.
PER_RANK = ("out_dir", "data", "metrics", "tensorboard", "wandb", "wandb_project", "threads", "preset")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

FRAMEWORKS = ("torch", "jax")
JAX_SCAN_BACKENDS = ("auto", "jax", "pallas")  # gateloop_hybrid.jax's

DEMO_TEXT = Path(__file__).resolve().parents[2] / "tests" / "data" / "devils_dictionary.txt"
# Named flag sets for --preset; flags typed on the command line override them. A preset's scan
# backend is for --framework torch; with --framework jax it gives way to JAX's (PRESET_JAX).
PRESETS = {
    "demo": dict(
        data=str(DEMO_TEXT), out_dir=str(Path("runs") / "demo"), device="cpu", scan_backend="torch",
        # small enough not to learn its 45 KB by heart in 450 steps: validation falls to the end
        dim=64, depth=2, gate_loop_heads=None, ff_mult=2, seq_len=64, batch_size=16, grad_accum=1,
        lr=3e-3, clip=0.5, max_steps=450, val_every=150, val_batches=4, sample_every=450,
        prime_len=64, gen_len=300, temperature=0.8, ckpt_every=150, log_every=25,
    ),
}
PRESET_JAX = dict(scan_backend="jax")


# ----------------------------------------------------------------------------------------------
# command line


def unoptional(tp):
    """int | None -> int; other types unchanged."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def none_or(tp):
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
        base = unoptional(tp)
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
            p.add_argument(flag, type=none_or(base) if base is not tp else base, metavar=metavar, **kw)
    return p


def parse_train_args(argv) -> tuple[TrainConfig, set[str]]:
    """The config from argv, and the names of the flags given explicitly (they win on --resume)."""
    args = build_train_parser().parse_args(argv)
    given = set(vars(build_train_parser(with_defaults=False).parse_args(argv)))
    return TrainConfig(**vars(args)), given


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_config(cfg: TrainConfig) -> None:
    """Raise ConfigError, naming the flag, for any value out of range or flags that contradict.

    Run before anything is read or written, and again on the config a resume merges.
    """
    def need(ok: bool, name: str, what: str):
        if not ok:
            raise ConfigError(f"{flag_name(name)} {getattr(cfg, name)}: {what}")

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
    if cfg.layer_pattern is not None:
        from ..hybrid import KINDS      # the letters the model builds
        need(not cfg.attention, "layer_pattern", "says which layers are attention; not with --attention")
        need(cfg.framework == "torch", "layer_pattern", "hybrid stacks are built by the torch model only")
        need(isinstance(cfg.layer_pattern, str) and cfg.layer_pattern != "" and set(cfg.layer_pattern) <= set(KINDS),
             "layer_pattern", "must be letters g (GateLoop), a (attention), m (attention after a SimpleGateLoopLayer)")
        need(isinstance(cfg.layer_pattern, str) and cfg.layer_pattern != "" and is_int(cfg.depth)
             and cfg.depth % len(cfg.layer_pattern) == 0, "layer_pattern",
             f"must have one letter per layer, or a number of letters that divides --depth {cfg.depth}")
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
    values = dict(PRESETS[cfg.preset])
    if cfg.framework == "jax":
        values.update(PRESET_JAX)
    return dataclasses.replace(cfg, **{k: v for k, v in values.items() if k not in given})
