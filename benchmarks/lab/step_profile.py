"""Where one training step of train.py's models spends its time (GateLoop vs softmax attention).

    python benchmarks/lab/step_profile.py [--seq-len 4096] [--steps 5] [--scan-backends auto,torch]

Builds the Transformer at train.py's defaults (dim 512, depth 6, batch 4, bf16 autocast on CUDA),
runs a few optimizer steps (forward, backward over `--grad-accum` micro-batches, Adam) and reports
for each model: the step time (synchronized, median over --steps after two warm-up steps,
benchmarks/harness.py); the time in
the scan alone, measured by timing a step whose `gate_loop_scan` is replaced by a zero-cost stand-in
(returns x and x[:, -1], which keeps the graph and shapes; it replaces the scan of the composed
mixer, so the fused kernels, which have no separate scan, run unchanged); and, with --trace, torch.profiler's
table of the most expensive device ops (CUPTI sees JAX's kernels too, under XLA's names).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # harness, when run as a script

import gateloop_hybrid.mixer as mixer_mod  # noqa: E402
import harness  # noqa: E402
from gateloop_hybrid import Transformer


def make_model(kind: str, args, device):
    kw = dict(dim=args.dim, num_tokens=256, depth=args.depth)
    if kind == "attention":
        kw.update(use_gate_looped_attn=False, heads=max(1, args.dim // 64), dim_head=min(64, args.dim), ff_mult=5)
    else:
        backend, _, mode = kind.partition("/")
        kw.update(use_gate_looped_attn=True, gate_loop_heads=args.dim, scan_backend=backend,
                  checkpoint_gate_looped_attn=mode != "no-checkpoint")
    return Transformer(**kw).to(device)


@contextlib.contextmanager
def scan_replaced():
    """gate_loop_scan -> a stand-in with the same outputs' shapes and no recurrence."""
    original = mixer_mod.gate_loop_scan

    def standin(a, x, h0=None, *, reverse=False, backend="auto"):
        x = x * a.real if a.is_complex() else x * a        # keeps a in the graph
        return x, x[:, -1]
    mixer_mod.gate_loop_scan = standin
    try:
        yield
    finally:
        mixer_mod.gate_loop_scan = original


def step_times(model, args, device, steps, threaded_backward=True):
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    data = torch.randint(0, 256, (args.batch, args.seq_len + 1), device=device)

    def step():
        for _ in range(args.grad_accum):
            with autocast:
                loss = model(data, return_loss=True)
            with torch.autograd.set_multithreading_enabled(threaded_backward):
                (loss / args.grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        opt.zero_grad(set_to_none=True)

    _, times, _ = harness.measure(step, harness.device_wait(device), reps=steps, budget_s=math.inf)
    return times, step


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=4)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--scan-backends", default="auto,auto/no-checkpoint",
                   help="GateLoop scan backends to profile, comma list; NAME/no-checkpoint stores the "
                        "scan's states instead of recomputing them in backward (the layers' default, "
                        "checkpoint_gate_looped_attn=True, recomputes)")
    p.add_argument("--backward-thread", choices=("worker", "main", "both"), default="both",
                   help="where autograd runs backward: torch's per-device worker thread (torch's default "
                        "for CUDA), the calling thread (torch.autograd.set_multithreading_enabled(False), "
                        "train.py --main-thread-backward), or both, one row each")
    p.add_argument("--trace", action="store_true", help="print torch.profiler's top device ops per model")
    args = p.parse_args()
    device = torch.device(args.device)
    tokens = args.batch * args.seq_len * args.grad_accum
    print("\n".join(harness.header(harness.environment(device))))
    print(f"step profile on {device}: dim {args.dim}, depth {args.depth}, batch {args.batch} x accumulation {args.grad_accum}, "
          f"seq {args.seq_len}; {tokens} tokens per step")
    print(f"{'model':>28} {'backward':>9} {'step ms':>9} {'tokens/s':>11} {'scan stand-in ms':>17} {'scan share':>10}")
    threads = {"worker": [True], "main": [False], "both": [True, False]}[args.backward_thread]
    for kind in ["attention", *[b.strip() for b in args.scan_backends.split(",") if b.strip()]]:
        torch.manual_seed(0)
        model = make_model(kind, args, device)
        for threaded in threads:
            times, step = step_times(model, args, device, args.steps, threaded)
            ms = 1e3 * statistics.median(times)
            name = f"gateloop[{kind}]" if kind != "attention" else "attention (sdpa)"
            line = f"{name:>28} {'worker' if threaded else 'main':>9} {ms:9.1f} {tokens / ms * 1e3:11,.0f}"
            if kind != "attention":
                with scan_replaced():
                    t2, _ = step_times(model, args, device, args.steps, threaded)
                ms2 = 1e3 * statistics.median(t2)
                line += f" {ms2:17.1f} {(ms - ms2) / ms:10.0%}"
            print(line, flush=True)
        if args.trace:
            from torch.profiler import ProfilerActivity, profile
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            with profile(activities=acts) as prof:
                step()
                if device.type == "cuda":
                    torch.cuda.synchronize()
            key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
            print(prof.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=60))
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
