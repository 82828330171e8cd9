"""Training speed of whole models: tokens/s and peak memory per model, mode and sequence length.

    python benchmarks/model_speed.py --device cuda --json out.json --plot out.png
    python benchmarks/model_speed.py --models gateloop,attention --modes eager,reduce-overhead \
        --configs 512x6 --seq-lens 4096

One step is what train.py does per optimiser step with --grad-accum 1: forward, backward,
gradient clipping (0.5) and Adam, under bf16 autocast on CUDA (--precision fp32 turns it off).
Each (model, mode, sequence length) gets a fresh model and, for the compiled modes, a fresh
torch.compile (torch._dynamo.reset() in between). Timing: median step time over --steps steps
after --warmup steps (synchronized), host time (until the step's Python returned, not
synchronized), tokens/s, and torch's peak allocated memory over warm-up and timed steps (CUDA
graphs allocate their memory pool while warming up).

Models:
    gateloop        this package's GateLoop Transformer (one complex gate per feature, the default)
    attention       this package's softmax-attention Transformer (SDPA), with --attn-ff-mult
                    (default 5: the same parameter count as the GateLoop model at dim 512)
    seed-gateloop   lucidrains' gateloop-transformer 0.2.5, when installed (it runs in float32 only:
                    its complex gates fail under bf16 autocast)
    seed-attention  the seed's attention model (use_gate_looped_attn=False)
Modes: eager, compile (torch.compile), reduce-overhead (torch.compile with CUDA graphs).
A mode that fails is reported with its error's first line, and the run goes on.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import time
import traceback
from pathlib import Path

import torch

import harness
import plots
from gateloop_hybrid import Transformer

MODELS = ("gateloop", "attention", "seed-gateloop", "seed-attention")
MODES = ("eager", "compile", "reduce-overhead")


def model_kwargs(kind: str, dim: int, depth: int, args) -> dict:
    kw = dict(dim=dim, num_tokens=256, depth=depth)
    if kind.endswith("attention"):
        kw.update(use_gate_looped_attn=False, heads=max(1, dim // 64), dim_head=min(64, dim),
                  ff_mult=args.attn_ff_mult)
    else:
        kw.update(use_gate_looped_attn=True, checkpoint_gate_looped_attn=args.recompute)
        if args.gate_loop_heads is not None:
            kw.update(gate_loop_heads=args.gate_loop_heads)
        if args.scan_backend != "auto" and not kind.startswith("seed-"):
            kw.update(scan_backend=args.scan_backend)
    return kw


def build(kind: str, dim: int, depth: int, args, device):
    torch.manual_seed(0)
    kw = model_kwargs(kind, dim, depth, args)
    if kind.startswith("seed-"):
        from gateloop_transformer import Transformer as SeedTransformer
        return SeedTransformer(**kw).to(device)
    return Transformer(**kw).to(device)


def make_step(model, mode: str, batch: int, seq: int, device, bf16: bool):
    """The optimiser step as a closure, and the data it trains on."""
    forward = model
    if mode == "compile":
        forward = torch.compile(model)
    elif mode == "reduce-overhead":
        forward = torch.compile(model, mode="reduce-overhead")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-4, fused=device.type == "cuda")
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if bf16
                else contextlib.nullcontext())
    data = torch.randint(0, 256, (batch, seq + 1), device=device)

    def step():
        if mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        with autocast:
            loss = forward(data, return_loss=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.5, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step


def run_case(kind, mode, dim, depth, seq, args, device) -> dict:
    batch = max(1, args.tokens // seq)
    bf16 = device.type == "cuda" and args.precision == "bf16"
    row = dict(model=kind, mode=mode, dim=dim, depth=depth, seq=seq, batch=batch,
               precision="bf16" if bf16 else "fp32")
    if kind.endswith("gateloop"):
        row.update(recompute=args.recompute, heads=args.gate_loop_heads or dim)
        if args.scan_backend != "auto":
            row.update(scan_backend=args.scan_backend)
    if kind == "seed-gateloop" and bf16:
        row["error"] = "not run: its complex gates fail under bf16 autocast (view_as_complex on bf16)"
        return row
    torch._dynamo.reset()
    try:
        model = build(kind, dim, depth, args, device)
    except ImportError as e:
        row["error"] = f"not run: {e}"
        return row
    row["params"] = sum(p.numel() for p in model.parameters())
    try:
        step = make_step(model, mode, batch, seq, device, bf16)
        wait = harness.device_wait(device)
        if device.type == "cuda":       # CUDA graphs allocate their pool while warming up
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            loss = step()
        wait(None)
        row["warmup_s"] = time.perf_counter() - t0
        times, host = [], []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            loss = step()
            host.append(time.perf_counter() - t0)
            wait(None)
            times.append(time.perf_counter() - t0)
        row["loss"] = float(loss.detach())
        if not math.isfinite(row["loss"]):
            raise FloatingPointError(f"loss is {row['loss']}")
        step_ms = 1e3 * statistics.median(times)
        row.update(step_ms=step_ms, host_ms=1e3 * statistics.median(host),
                   step_ms_p25=1e3 * statistics.quantiles(times, n=4)[0] if len(times) > 1 else step_ms,
                   step_ms_p75=1e3 * statistics.quantiles(times, n=4)[2] if len(times) > 1 else step_ms,
                   tokens_per_s=batch * seq / step_ms * 1e3)
        if device.type == "cuda":
            row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    except Exception as e:    # one failing mode must not end the run
        lines = [line for line in str(e).splitlines() if line.strip()]
        row["error"] = f"{type(e).__name__}: {lines[0][:300] if lines else ''}"
        if args.verbose:
            traceback.print_exc()
    finally:
        del model
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
    return row


def format_row(r: dict) -> str:
    wide = f" {r['heads']}h" if r.get("heads", r["dim"]) != r["dim"] else ""
    backend = f" ({r['scan_backend']} scan)" if "scan_backend" in r else ""
    name = f"{r['model']}{wide}{backend}{'' if r.get('recompute', True) else ' (store)'} [{r['mode']}]"
    cfg = f"{r['dim']}x{r['depth']} seq {r['seq']} b{r['batch']} {r['precision']}"
    if "error" in r:
        return f"{name:>30} {cfg:>26}  {r['error']}"
    mem = f"{r['peak_gib']:8.2f}" if "peak_gib" in r else f"{'-':>8}"
    return (f"{name:>30} {cfg:>26} {r['step_ms']:9.1f} {r['host_ms']:9.1f} {r['tokens_per_s']:12,.0f} "
            f"{mem} {r['loss']:8.3f}")


def summary(rows: list[dict]) -> list[str]:
    """For each (config, seq): every model's fastest mode, and GateLoop's ratio to attention."""
    out = []
    keys = sorted({(r["dim"], r["depth"], r["seq"], r["precision"]) for r in rows})
    for key in keys:
        best = {}
        for r in rows:
            if (r["dim"], r["depth"], r["seq"], r["precision"]) == key and "error" not in r:
                if r["model"] not in best or r["tokens_per_s"] > best[r["model"]]["tokens_per_s"]:
                    best[r["model"]] = r
        parts = [f"{m} {b['tokens_per_s']:,.0f} ({b['mode']})" for m, b in best.items()]
        line = f"dim {key[0]} depth {key[1]} seq {key[2]} {key[3]}: " + ", ".join(parts)
        if "gateloop" in best and "attention" in best:
            line += f"; gateloop/attention {best['gateloop']['tokens_per_s'] / best['attention']['tokens_per_s']:.2f}x"
        if "gateloop" in best and "seed-gateloop" in best:
            line += f"; gateloop/seed {best['gateloop']['tokens_per_s'] / best['seed-gateloop']['tokens_per_s']:.2f}x"
        out.append(line)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", default="gateloop,attention",
                   help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--modes", default="eager,compile,reduce-overhead", help=f"comma list of {', '.join(MODES)}")
    p.add_argument("--configs", default="512x6", help="comma list of DIMxDEPTH, e.g. 512x6,1024x8")
    p.add_argument("--seq-lens", default="4096", help="comma list of sequence lengths")
    p.add_argument("--tokens", type=int, default=16384,
                   help="tokens per step; batch = tokens // seq (4 at seq 4096)")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                   help="bf16 autocast (CUDA only) or float32")
    p.add_argument("--attn-ff-mult", type=int, default=5,
                   help="feed-forward multiple of the attention models (5 matches GateLoop's parameters)")
    p.add_argument("--recompute", action=argparse.BooleanOptionalAction, default=True,
                   help="GateLoop recomputes its scan in backward (checkpoint_gate_looped_attn, the default)")
    p.add_argument("--gate-loop-heads", type=int, default=None,
                   help="GateLoop heads (default: dim, one feature per head); fewer heads are wider: "
                        "dim / heads features each, on the chunked form")
    p.add_argument("--scan-backend", default="auto",
                   help="GateLoop's scan_backend (auto, jax: through the XLA bridge, pallas, torch, ...)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--json", help="write the rows and the environment here")
    p.add_argument("--text", help="also write the printed table here")
    p.add_argument("--plot", help="PNG bar chart of tokens/s")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failing modes")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for name, given, allowed in (("--models", models, MODELS), ("--modes", modes, MODES)):
        bad = [g for g in given if g not in allowed]
        if bad:
            p.error(f"{name}: unknown {bad}; choose from {', '.join(allowed)}")
    if "reduce-overhead" in modes and device.type != "cuda":
        modes.remove("reduce-overhead")     # CUDA graphs need CUDA
    try:
        configs = [tuple(int(v) for v in c.lower().split("x")) for c in args.configs.split(",")]
        seqs = [int(s) for s in args.seq_lens.split(",")]
    except ValueError:
        p.error(f"--configs takes DIMxDEPTH items and --seq-lens integers, got {args.configs!r}, {args.seq_lens!r}")

    env = harness.environment(device)
    lines = harness.header(env)
    lines.append(f"model speed on {device}: one optimiser step (forward, backward, clip, Adam) of "
                 f"{args.tokens} tokens, median of {args.steps} after {args.warmup} warm-up steps")
    lines.append(f"{'model [mode]':>30} {'config':>26} {'step ms':>9} {'host ms':>9} {'tokens/s':>12} "
                 f"{'peak GiB':>8} {'loss':>8}")
    print("\n".join(lines), flush=True)
    rows = []
    for dim, depth in configs:
        for seq in seqs:
            for kind in models:
                for mode in modes:
                    row = run_case(kind, mode, dim, depth, seq, args, device)
                    rows.append(row)
                    lines.append(format_row(row))
                    print(lines[-1], flush=True)
                    if args.json:
                        Path(args.json).write_text(json.dumps({"env": env, "rows": rows}, separators=(",", ":")))
    lines += ["", "fastest mode per model:", *summary(rows)]
    print("\n".join(lines[-len(summary(rows)) - 2:]))
    if args.text:
        Path(args.text).write_text("\n".join(lines) + "\n")
    if args.plot:
        plots.model_speed(rows, env, args.plot)
    return rows


if __name__ == "__main__":
    main()
