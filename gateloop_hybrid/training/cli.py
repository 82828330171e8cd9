"""The command lines: ``train_main`` (train.py, the gateloop-train command) and ``sample_main``
(sample.py, gateloop-sample). Each returns its exit code: 0, 2 for a bad flag or bad data, 1 for
any other error, 130 on Ctrl-C; every error is one line on stderr."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from pathlib import Path

import torch

from .checkpoints import load_checkpoint
from .config import OneLineParser, TrainConfig, none_or, parse_train_args
from .data import decode, printable
from .devices import autocast, check_device, seeded_rng, set_threads
from .errors import CheckpointError, ConfigError, TrainError, env_rank
from .loop import train
from .run import build_model, resolved_scan_backend


def train_main(argv=None) -> int:
    """train.py's command line: `train.py [flags]`, or `train.py sample [flags]` (the same as
    `sample.py [flags]`). Returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sample"]:
        return sample_main(argv[1:])
    if argv[:1] == ["train"]:
        argv = argv[1:]
    cfg, given = parse_train_args(argv)
    try:
        train(cfg, given)
    except KeyboardInterrupt:
        return 130
    except TrainError as e:
        line = error_line(e)
        if line is not None:
            print(line, file=sys.stderr)
        return e.exit_code
    except OSError as e:  # outside the files train.py checks: e.g. no usable temporary folder for torch
        print(f"train.py: {e}", file=sys.stderr)
        return 1
    except (torch.OutOfMemoryError, MemoryError) as e:
        first = (str(e).strip().splitlines() or [""])[0][:160]
        print(f"train.py: out of memory ({first}); try a smaller --batch-size, --seq-len or --dim", file=sys.stderr)
        return 1
    return 0


def error_line(e: TrainError) -> str | None:
    """The line train.py prints for an error, or None on a rank that leaves it to others.

    An error every rank met alike (``every_rank``) is printed by rank 0, and by the rank it came
    from when another (naming it); ranks that disagree on their flags or data each print that;
    any other error is printed by the rank that met it, naming it when not rank 0. ``e.rank`` is
    this process's rank (None when torchrun's environment itself is in doubt: then every process
    prints); before the ranks are up, RANK from the environment stands for it."""
    rank = e.rank if hasattr(e, "rank") else env_rank()
    if getattr(e, "said_by_each_rank", False):
        return f"train.py: {e}"
    if getattr(e, "every_rank", False):
        origin = getattr(e, "origin", 0)
        if rank not in (None, 0, origin):
            return None
        return f"train.py: {e}" if origin == 0 else f"train.py [rank {origin}]: {e}"
    return f"train.py: {e}" if rank in (None, 0) else f"train.py [rank {rank}]: {e}"


# ----------------------------------------------------------------------------------------------
# sampling


def build_sample_parser() -> OneLineParser:
    p = OneLineParser(
        prog="sample.py",
        description="Load a checkpoint written by train.py and continue a prompt, one cached decoding "
                    "step per new byte. Prints the prompt and its continuation.",
    )
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="checkpoint.pt written by train.py")
    p.add_argument("--prompt", required=True, metavar="TEXT", help="text to continue (encoded as UTF-8 bytes)")
    p.add_argument("--length", type=int, default=256, metavar="N", help="bytes to generate (default: 256)")
    p.add_argument("--temperature", type=float, default=1.0, metavar="X",
                   help="sampling temperature; 0 is greedy (default: 1.0)")
    p.add_argument("--top-k", type=none_or(int), default=None, metavar="N",
                   help="sample from the k most likely bytes only")
    p.add_argument("--top-p", type=none_or(float), default=None, metavar="P",
                   help="sample from the most likely bytes whose probability reaches P only")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="sampling seed (default: 0)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, ... (default: auto)")
    p.add_argument("--scan-backend", default=None, metavar="NAME",
                   help="override the checkpoint's scan backend (e.g. torch where jax is missing)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on for CUDA)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for torch (default: as train.py, the cores not busy now)")
    return p


def check_sample_args(args) -> None:
    """ConfigError, naming the flag, for a value out of range."""
    if args.length < 0:
        raise ConfigError(f"--length {args.length}: must be an integer >= 0")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ConfigError(f"--temperature {args.temperature}: must be a finite number >= 0")
    if args.top_k is not None and args.top_k < 1:
        raise ConfigError(f"--top-k {args.top_k}: must be an integer >= 1 (or none)")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p {args.top_p}: must be a number in (0, 1] (or none)")
    if not 0 <= args.seed < 2**63:
        raise ConfigError(f"--seed {args.seed}: must be an integer in [0, 2**63)")
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads {args.threads}: must be an integer >= 1")
    if not args.prompt:
        raise ConfigError("--prompt must not be empty")
    if not Path(args.checkpoint).exists():
        raise ConfigError(f"--checkpoint {args.checkpoint}: no such file")


def sample(args) -> str:
    """Load the checkpoint, continue the prompt, print and return prompt + continuation."""
    check_sample_args(args)
    device = check_device(args.device)
    state = load_checkpoint(args.checkpoint)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in state["config"].items() if k in fields})
    cfg.threads = args.threads
    if args.scan_backend is not None:
        cfg.scan_backend = args.scan_backend
    set_threads(cfg, device)
    resolved_scan_backend(cfg, device)
    try:
        model = build_model(cfg.model_kwargs())
        model.load_state_dict(state["model"])
    except (RuntimeError, ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{args.checkpoint}: its weights do not fit the model its config describes "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    model.to(device).eval()
    prompt = args.prompt.encode("utf-8", errors="surrogateescape")
    ids = torch.tensor(list(prompt), dtype=torch.long, device=device)[None]
    t0 = time.perf_counter()
    with seeded_rng(device, args.seed), autocast(device, args.bf16):
        try:
            out = model.generate(ids, args.length, temperature=args.temperature, top_k=args.top_k,
                                 top_p=args.top_p, seed=args.seed)
        except ValueError as e:  # non-finite logits: weights saved from a diverged run
            raise TrainError(f"{args.checkpoint}: {e}") from None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    text = printable(decode(list(prompt) + out[0].tolist()))
    print(text)
    rate = f"{args.length / seconds:,.0f} tokens/s" if seconds > 0 else "-"
    print(f"sample.py: {args.length} bytes after a {len(prompt)}-byte prompt in {seconds:.2f} s, {rate} "
          f"(step {state['step']} of {args.checkpoint}, {device})", file=sys.stderr)
    return text


def sample_main(argv=None) -> int:
    """sample.py's command line. Returns the exit code."""
    args = build_sample_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        sample(args)
    except TrainError as e:
        print(f"sample.py: {e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:  # stdout closed early (| head): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:  # outside the files sample.py checks: e.g. no usable temporary folder for torch
        print(f"sample.py: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
