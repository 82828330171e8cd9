"""The wide-head mixer's two forms, chunked (chunked.py) and rotated (rotated.py), on one shape:
aten ops in one forward+backward (all; those that compute, not views; those with a complex operand
or result, which TorchInductor cannot generate code for), matrix-product FLOPs, and
forward+backward milliseconds (median and fastest of --steps, the forms alternating, synchronized
on CUDA). The row "scan" is the scan over chunks alone (gate_loop_scan forward+backward on the
states both forms scan), which both forms' counts include.

    python benchmarks/lab/rotated_probe.py --threads 1              # b=2, n=1024, h=4, d=32, float32
    python benchmarks/lab/rotated_probe.py --device cuda --shape 4x4096x8x64 --backend auto
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from gateloop_hybrid.chunked import chunked_heads
from gateloop_hybrid.rotated import rotated_heads
from gateloop_hybrid.routing import CHUNK
from gateloop_hybrid.scan import gate_loop_scan

FORMS = {"chunked": chunked_heads, "rotated": rotated_heads}


class OpCounter(TorchDispatchMode):
    """Counts every aten op that runs, those that compute (a result in new memory, not a view),
    and those that touch a complex tensor."""

    def __init__(self):
        super().__init__()
        self.ops, self.compute_ops, self.complex_ops = Counter(), Counter(), Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        self.ops[name] += 1
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        if any(isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs
               for t in tree_leaves(out)):
            self.compute_ops[name] += 1
        if any(isinstance(t, torch.Tensor) and t.is_complex() for t in tree_leaves((args, kwargs, out))):
            self.complex_ops[name] += 1
        return out


def step(fn, leaves, backend):
    y, h_last = fn(*leaves, backend=backend)
    (y.square().sum() + h_last.abs().square().sum()).backward()
    if y.is_cuda:
        torch.cuda.synchronize(y.device)


def scan_step(gate, own, h0, backend):
    states, h_last = gate_loop_scan(gate, own, h0, backend=backend)
    (states.abs().square().sum() + h_last.abs().square().sum()).backward()
    if states.is_cuda:
        torch.cuda.synchronize(states.device)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="2x1024x4x32", help="BxNxHxD")
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="torch", help="gate_loop_scan backend across chunks")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=0, help="torch's intra-op threads (0: as set)")
    p.add_argument("--verbose", action="store_true", help="each form's compute ops by name")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    b, n, h, d = (int(s) for s in args.shape.split("x"))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, n, h, d, generator=g) for _ in range(3))
    log_mag = torch.nn.functional.logsigmoid(torch.randn(b, n, h, generator=g).abs())
    phase = torch.randn(b, n, h, generator=g)
    h0 = torch.randn(b, h, d, d, generator=g, dtype=torch.complex64)
    leaves = [t.to(args.device).requires_grad_() for t in (q, k, v, log_mag, phase, h0)]
    print(f"shape {args.shape} float32 on {args.device}, scan backend {args.backend!r}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    c = -(-n // CHUNK)
    gate = torch.polar(log_mag[:, :c].exp(), phase[:, :c]).detach()[..., None, None]
    own = torch.randn(b, c, h, d, d, generator=g, dtype=torch.complex64)
    gate, own = (t.to(args.device).requires_grad_() for t in (gate, own))
    h0 = leaves[-1]
    runs = {name: (lambda fn=fn: step(fn, leaves, args.backend)) for name, fn in FORMS.items()}
    runs["scan"] = lambda: scan_step(gate, own, h0, args.backend)
    times = {name: [] for name in runs}
    for name, run in runs.items():
        run()                                               # warm-up
    for _ in range(args.steps):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    print(f"{'form':>8} {'aten ops':>9} {'compute':>8} {'complex':>8} {'matmul GFLOP':>13} "
          f"{'fwd+bwd ms':>11} {'min ms':>7}")
    for name, run in runs.items():
        with OpCounter() as counter:
            run()
        with FlopCounterMode(display=False) as flops:
            run()
        print(f"{name:>8} {sum(counter.ops.values()):>9} {sum(counter.compute_ops.values()):>8} "
              f"{sum(counter.complex_ops.values()):>8} {flops.get_total_flops() / 1e9:>13.3f} "
              f"{1e3 * statistics.median(times[name]):>11.1f} {1e3 * min(times[name]):>7.1f}")
        if args.verbose:
            print(f"{'':>8} compute: {dict(counter.compute_ops.most_common())}")


if __name__ == "__main__":
    main()
