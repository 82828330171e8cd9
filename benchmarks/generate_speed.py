"""Decoding speed: ms per token and new tokens/s against batch and context, GateLoop (one feature
per head, and wide heads) against attention with a key/value buffer of fixed length, in one
harness (gateloop_hybrid.generation: the same decode step, sampler and capture for every model).

    python benchmarks/generate_speed.py --device cuda --json out.json --plot out.png
    python benchmarks/generate_speed.py --device cuda --batches 1,256 --contexts 512,32768 --max-batch-at 32768

Each (model, batch, context) gets a state as after a prompt of ``context`` tokens (the attention
buffers hold context + new tokens and the first ``context`` are filled; a GateLoop state has one
size at any context), then --new-tokens decode steps, each a decode step of every layer and a
draw on the device; with --capture (default on CUDA) each step is a CUDA graph replay; with
--compile the step is compiled by torch.compile first (Inductor's fused kernels). Timed:
the steps after --warmup, synchronized; reported: ms per step, new tokens/s (batch / step
time), the state's bytes and torch's peak allocated memory. Weights in bf16 (--dtype).
--max-batch-at C doubles the batch at context C until a step runs out of memory, per model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness, when run as a script

import torch  # noqa: E402

import harness  # noqa: E402
from gateloop_hybrid import Transformer  # noqa: E402
from gateloop_hybrid.generation import DecodeState, Decoder  # noqa: E402

MODELS = ("gateloop", "gateloop-wide", "attention")


def build(kind: str, dim: int, depth: int, device, dtype) -> Transformer:
    kw = dict(dim=dim, num_tokens=256, depth=depth)
    if kind == "attention":
        kw.update(use_gate_looped_attn=False, heads=max(1, dim // 64), dim_head=min(64, dim), ff_mult=5)
    elif kind == "gateloop-wide":
        kw.update(gate_loop_heads=max(1, dim // 64))
    torch.manual_seed(0)
    return Transformer(**kw).to(device=device, dtype=dtype).eval()


def run(model, batch, context, new_tokens, warmup, capture, device, compile=False):
    """(ms per step, state bytes, peak GiB or None)."""
    state = DecodeState(model, batch, context + new_tokens + warmup)
    for buf in state.layers:                       # as after a prompt of `context` tokens
        for t in (buf if isinstance(buf, tuple) else (buf,)):
            t.normal_()
    state.position.fill_(context)
    seeds = torch.arange(batch, device=device)
    decoder = Decoder(model, state, seeds, temperature=1.0, top_k=50, capture=capture, compile=compile)
    tokens = torch.randint(0, 256, (batch,), device=device)
    active = torch.ones(batch, dtype=torch.bool, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad():
        for _ in range(warmup):
            tokens = decoder(tokens, active)[0].clone()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            tokens = decoder(tokens, active)[0]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    ms = 1e3 * (time.perf_counter() - t0) / new_tokens
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    return ms, state.nbytes(), peak


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--batches", default="1,16,256")
    p.add_argument("--contexts", default="512,4096,32768,65536")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--capture", choices=("auto", "yes", "no"), default="auto",
                   help="a CUDA graph per step (auto: on CUDA)")
    p.add_argument("--compile", action="store_true", help="the step through torch.compile (fullgraph) first")
    p.add_argument("--max-batch-at", type=int, default=None, metavar="CONTEXT")
    p.add_argument("--json", type=Path)
    p.add_argument("--plot", type=Path)
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    capture = device.type == "cuda" if args.capture == "auto" else args.capture == "yes"
    env = harness.environment(device)
    lines = harness.header(env)
    lines.append(f"step: {'compiled, ' if args.compile else ''}{'a CUDA graph replay' if capture else 'eager'}")
    lines.append(f"{'model':>14} {'batch':>6} {'context':>8} {'ms/token':>9} {'tokens/s':>11} {'state MiB':>10} "
                 f"{'peak GiB':>9}")
    print("\n".join(lines), flush=True)
    rows = []
    for kind in args.models.split(","):
        if kind not in MODELS:
            p.error(f"unknown model {kind!r}; choose from {MODELS}")
        model = build(kind, args.dim, args.depth, device, dtype)
        for context in (int(c) for c in args.contexts.split(",")):
            for batch in (int(b) for b in args.batches.split(",")):
                row = dict(model=kind, batch=batch, context=context, capture=capture, compile=args.compile)
                try:
                    ms, nbytes, peak = run(model, batch, context, args.new_tokens, args.warmup, capture, device,
                                           args.compile)
                    row.update(ms_per_token=ms, tokens_per_s=batch * 1e3 / ms, state_bytes=nbytes, peak_gib=peak)
                    lines.append(f"{kind:>14} {batch:>6} {context:>8} {ms:9.3f} {batch * 1e3 / ms:11,.0f} "
                                 f"{nbytes / 2 ** 20:10.1f} {'-' if peak is None else f'{peak:9.2f}':>9}")
                except torch.OutOfMemoryError:
                    row.update(error="out of memory")
                    lines.append(f"{kind:>14} {batch:>6} {context:>8} {'out of memory':>9}")
                print(lines[-1], flush=True)
                rows.append(row)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        if args.max_batch_at:
            batch, largest = 1, None
            while batch <= 1 << 16:
                try:
                    run(model, batch, args.max_batch_at, 2, 1, capture, device)
                    largest = batch
                    batch *= 2
                except torch.OutOfMemoryError:
                    break
                finally:
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
            rows.append(dict(model=kind, context=args.max_batch_at, largest_batch=largest))
            lines.append(f"{kind:>14} largest batch at context {args.max_batch_at}: {largest} (powers of 2)")
            print(lines[-1], flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(environment=env, command=" ".join(sys.argv), rows=rows), indent=1))
    if args.plot:
        plot(rows, args.plot, env)
    return 0


def plot(rows, path: Path, env):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    batches = sorted({r["batch"] for r in rows if "ms_per_token" in r})
    fig, axes = plt.subplots(1, len(batches), figsize=(4.5 * len(batches), 3.6), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        for kind in MODELS:
            pts = sorted((r["context"], r["ms_per_token"]) for r in rows
                         if r.get("model") == kind and r.get("batch") == batch and "ms_per_token" in r)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=kind)
        ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="ms per token", title=f"batch {batch}")
        ax.legend(fontsize=8)
    fig.suptitle(f"decode step, {env.get('device', '')}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
