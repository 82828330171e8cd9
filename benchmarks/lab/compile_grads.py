"""Eager against torch.compile: the loss and every parameter's gradient of a Transformer, one row
per (heads, scan backend, compile mode, precision, recompute), to find which setting a compiled step gets
wrong.

    python benchmarks/lab/compile_grads.py --device cuda --heads 128,8 --backends auto,torch \
        --modes default,reduce-overhead --precisions fp32,bf16

Each row: the loss of both, the largest relative gradient error over the parameters (||g_c - g_e||
/ ||g_e||) and the parameter it belongs to. Under reduce-overhead the step is replayed three
times first, as in training. bf16 is autocast (CUDA), where a few 1e-3 is rounding; in fp32 a
correct step stays near 1e-5.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # harness, when run as a script

import harness  # noqa: E402
from gateloop_hybrid import Transformer  # noqa: E402


def loss_and_grads(fn, model, data, device, bf16: bool, replays: int):
    for _ in range(replays):
        if device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = fn(data, return_loss=True)
        grads = torch.autograd.grad(loss, list(model.parameters()))
    return float(loss.detach()), [g.detach().clone() for g in grads]


def compare(args, heads: int, backend: str, mode: str, precision: str, recompute: str, device) -> str:
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Transformer(dim=args.dim, num_tokens=64, depth=args.depth, gate_loop_heads=heads,
                        scan_backend=backend, checkpoint_gate_looped_attn=recompute == "on").to(device)
    data = torch.randint(0, 64, (args.batch, args.seq + 1), device=device)
    bf16 = precision == "bf16"
    replays = 3 if mode == "reduce-overhead" else 1
    loss_e, grads_e = loss_and_grads(model, model, data, device, bf16, replays)
    compiled = torch.compile(model, mode=None if mode == "default" else mode, fullgraph=True)
    loss_c, grads_c = loss_and_grads(compiled, model, data, device, bf16, replays)
    errors = {name: float((c - e).norm() / e.norm().clamp_min(1e-30))
              for (name, _), e, c in zip(model.named_parameters(), grads_e, grads_c)}
    worst = max(errors, key=errors.get)
    return (f"{heads:>6} {backend:>8} {mode:>16} {precision:>5} {recompute:>4} {loss_e:10.5f} {loss_c:10.5f} "
            f"{errors[worst]:9.1e}  {worst}")


def _causes(e):
    """The exceptions chained to e (Dynamo reports some errors as another, the first as cause)."""
    seen = {id(e)}
    while (e := e.__cause__ or e.__context__) is not None and id(e) not in seen:
        seen.add(id(e))
        yield e


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--seq", type=int, default=300)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", default="8", help="comma list of gate_loop_heads (dim: one feature per head)")
    p.add_argument("--backends", default="auto", help="comma list of scan backends")
    p.add_argument("--modes", default="default,reduce-overhead", help="comma list of torch.compile modes")
    p.add_argument("--precisions", default="fp32", help="comma list of fp32, bf16 (autocast)")
    p.add_argument("--recompute", default="on", help="comma list of on, off (checkpoint_gate_looped_attn)")
    p.add_argument("--traceback", action="store_true", help="print a failing row's whole exception chain")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    lines = harness.header(harness.environment(device))
    lines.append(f"{'heads':>6} {'backend':>8} {'mode':>16} {'prec':>5} {'rec':>4} {'eager loss':>10} {'comp loss':>10} "
                 f"{'max rel':>9}  worst parameter")
    print("\n".join(lines), flush=True)
    split = lambda s: [x.strip() for x in s.split(",") if x.strip()]
    for heads, backend, mode, precision, recompute in itertools.product(
            [int(h) for h in split(args.heads)], split(args.backends), split(args.modes), split(args.precisions),
            split(args.recompute)):
        if mode == "reduce-overhead" and device.type != "cuda":
            continue
        try:
            lines.append(compare(args, heads, backend, mode, precision, recompute, device))
        except Exception as e:  # noqa: BLE001 - one failing case is a row, not the end
            if args.traceback:
                traceback.print_exception(e)
                for cause in _causes(e):
                    print("--- caused by:", flush=True)
                    traceback.print_exception(cause)
            lines.append(f"{heads:>6} {backend:>8} {mode:>16} {precision:>5} {recompute:>4}  "
                         f"{type(e).__name__}: {str(e)[:120]}")
        print(lines[-1], flush=True)


if __name__ == "__main__":
    main()
