"""Tokens per second of a training step of the model in pure JAX (gateloop_hybrid.jax).

    python benchmarks/lab/jax_model_speed.py                       # dim 512, depth 6, seq 4096, batch 4
    python benchmarks/lab/jax_model_speed.py --models gateloop,attention --scan-backend pallas
    python benchmarks/lab/jax_model_speed.py --dim 32 --depth 2 --seq-len 64 --batch 2 --steps 3   # CPU

One step is what ``train.py --framework jax`` runs: forward and backward over --grad-accum
micro-batches (a lax.scan), global-norm clipping and Adam, jitted as one function
(``gateloop_hybrid.jax.training.make_train_step``), with bf16 compute and float32 weights by
default on a GPU (--no-bf16: float32). Timed with benchmarks/harness.py: the first call
(compilation) apart, one untimed warm-up, then the median of --steps steps, each waited for with
``jax.block_until_ready``. The GateLoop model has one gate per feature (--gate-loop-heads
defaults to --dim, train.py's default) and recomputes the scan in backward unless
--no-checkpoint-scan. --json writes the rows with the environment.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # harness, when run as a script

import harness  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402  (harness's environment record only)

import gateloop_hybrid.jax as glj  # noqa: E402
from gateloop_hybrid.jax import training  # noqa: E402


def make_model(kind: str, args, key):
    kw = dict(dim=args.dim, num_tokens=256, depth=args.depth, ff_mult=args.ff_mult)
    if kind == "attention":
        kw.update(use_gate_looped_attn=False, heads=max(1, args.dim // 64), dim_head=min(64, args.dim))
    else:
        kw.update(gate_loop_heads=args.gate_loop_heads or args.dim, scan_backend=args.scan_backend,
                  checkpoint_gate_looped_attn=args.checkpoint_scan)
    return glj.Transformer(**kw, key=key)


def time_steps(kind: str, args, device) -> dict:
    model = jax.device_put(make_model(kind, args, jax.random.key(0)), device)
    optimizer = training.make_optimizer(lr=1e-4, clip=0.5)
    state = {"model": model, "opt": jax.device_put(optimizer.init(training.trainable(model)), device)}
    step = training.make_train_step(optimizer, jnp.bfloat16 if args.bf16 else None)
    batches = jax.device_put(jax.random.randint(jax.random.key(1), (args.grad_accum, args.batch, args.seq_len + 1),
                                                0, 256), device)

    def one_step():  # the step donates the model and optimiser state: carry the new ones
        state["model"], state["opt"], loss = step(state["model"], state["opt"], batches)
        return loss

    first, times, _ = harness.measure(one_step, jax.block_until_ready, reps=args.steps, budget_s=math.inf)
    loss = float(one_step())
    if not math.isfinite(loss):
        raise SystemExit(f"{kind}: the loss is {loss}")
    row = dict(model=kind, compile_s=first, **harness.stats(times))
    row["tokens_per_s"] = args.grad_accum * args.batch * args.seq_len / (row["median_ms"] / 1e3)
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        row["peak_mem_gib"] = stats["peak_bytes_in_use"] / 2**30
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="gateloop", help="comma list of gateloop, attention")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--ff-mult", type=int, default=4)
    p.add_argument("--gate-loop-heads", type=int, default=None, help="default: --dim (one gate per feature)")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--scan-backend", default="auto", choices=("auto", "jax", "pallas"))
    p.add_argument("--checkpoint-scan", action=argparse.BooleanOptionalAction, default=True,
                   help="recompute the scan in backward (the layers' default)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="compute in bfloat16 with float32 weights (default: on for a GPU)")
    p.add_argument("--steps", type=int, default=5, help="timed steps, after the compile and one warm-up")
    p.add_argument("--json", help="write the environment and the rows here")
    args = p.parse_args(argv)
    device = jax.devices()[0]
    if args.bf16 is None:
        args.bf16 = device.platform == "gpu"
    env = harness.environment(torch.device("cpu"))
    env.update(device=f"jax:{device.platform}:{device.id}", device_name=device.device_kind)
    print("\n".join(harness.header(env)))
    tokens = args.grad_accum * args.batch * args.seq_len
    print(f"JAX training step on {device.platform}:{device.id} ({device.device_kind}): dim {args.dim}, depth "
          f"{args.depth}, batch {args.batch} x accumulation {args.grad_accum}, seq {args.seq_len}, "
          f"{'bf16' if args.bf16 else 'float32'}; {tokens:,} tokens per step")
    print(f"{'model':>16} {'compile s':>10} {'step ms':>9} {'p25-p75 ms':>15} {'tokens/s':>12}")
    rows = []
    for kind in [m.strip() for m in args.models.split(",") if m.strip()]:
        if kind not in ("gateloop", "attention"):
            p.error(f"--models: unknown model {kind!r} (gateloop, attention)")
        row = time_steps(kind, args, device)
        rows.append(row)
        name = kind if kind == "attention" else f"gateloop[{args.scan_backend}]"
        print(f"{name:>16} {row['compile_s']:10.1f} {row['median_ms']:9.1f} "
              f"{row['p25_ms']:7.1f}-{row['p75_ms']:<7.1f} {row['tokens_per_s']:12,.0f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(env, args=vars(args), rows=rows), indent=1))
    return rows


if __name__ == "__main__":
    main()
