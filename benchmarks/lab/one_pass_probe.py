"""Lab probe: the Mosaic GPU scan walks cut into time chunks, as two kernels (summary, then
finish) against one kernel whose chunks exchange their summaries through grid-wide counters
(``walk.ONE_PASS``). For each shape and dtype, both forms in one process on the same inputs:
their outputs and gradients against each other, and median device time (CUDA events) of the
forward and of forward+backward, with multiples of the memory floor (3 and 8 tensors at the
copy bandwidth measured here). ``benchmarks/scan_speed.py`` remains the kept benchmark.

    python benchmarks/lab/one_pass_probe.py [--shapes 4x4096x1024,1x65536x512] [--dtypes float32,complex64]
"""
import argparse
import json
import statistics

import torch

from gateloop_hybrid import gate_loop_scan
from gateloop_hybrid.kernels import walk
from gateloop_hybrid.ops import mosaic as mosaic_op


def timed(fn, reps):
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def bandwidth():
    src = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = timed(lambda: dst.copy_(src), 10)
    return 2 * src.numel() / ms / 1e6      # GB/s, read + write


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="4x4096x1024,1x65536x512")
    p.add_argument("--dtypes", default="float32,complex64")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--json")
    args = p.parse_args()
    gbps = bandwidth()
    print(f"{torch.cuda.get_device_name()}, copy bandwidth {gbps:.0f} GB/s", flush=True)
    rows = []
    for dtype in [getattr(torch, d) for d in args.dtypes.split(",")]:
        for shape in [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]:
            g = torch.Generator(device="cuda").manual_seed(0)
            a = 0.5 + 0.49 * torch.rand(shape, generator=g, device="cuda")
            x = torch.randn(shape, generator=g, device="cuda", dtype=dtype)
            if dtype.is_complex:
                a = torch.polar(a, torch.rand(shape, generator=g, device="cuda") * 6 - 3)
            ct = torch.randn(shape, generator=g, device="cuda", dtype=x.dtype)
            one = x.numel() * x.element_size()
            floors = (3 * one / gbps / 1e6, 8 * one / gbps / 1e6)
            results = {}
            for one_pass in (False, True):
                walk.ONE_PASS = one_pass
                mosaic_op._PLANS.clear()        # plans hold the walks chosen when they were made
                leaves = [a.clone().requires_grad_(), x.clone().requires_grad_()]

                def fwd():
                    with torch.no_grad():
                        return gate_loop_scan(a, x, backend="pallas")

                def fwdbwd():
                    h, _ = gate_loop_scan(*leaves, backend="pallas")
                    return torch.autograd.grad(h, leaves, ct)
                h = fwd()[0]
                grads = fwdbwd()
                results[one_pass] = (h, grads, timed(fwd, args.reps), timed(fwdbwd, args.reps))
            walk.ONE_PASS = False
            (h2, g2, f2, b2), (h1, g1, f1, b1) = results[False], results[True]
            rel = lambda u, v: ((u - v).abs().max() / v.abs().max()).item()
            diff = max(rel(h1, h2), *(rel(u, v) for u, v in zip(g1, g2)))
            row = dict(shape=shape, dtype=str(dtype), two_pass=(f2, b2), one_pass=(f1, b1), floors=floors,
                       max_rel_diff=diff)
            rows.append(row)
            print(f"{str(dtype)[6:]:>9} {'x'.join(map(str, shape)):>14}  two kernels {f2:.3f} ({f2 / floors[0]:.1f}x) / "
                  f"{b2:.3f} ({b2 / floors[1]:.1f}x)  one pass {f1:.3f} ({f1 / floors[0]:.1f}x) / "
                  f"{b1:.3f} ({b1 / floors[1]:.1f}x)  ms fwd / fwd+bwd; max rel diff {diff:.1e}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), gbps=gbps, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
