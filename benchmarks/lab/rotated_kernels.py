"""Each wide-head kernel alone (kernels/mosaic_rotated.py): device time against its bytes and
matrix FLOPs, per shape and per number of time segments; and the whole op (ops/rotated.py,
forward+backward with its torch glue) on the same inputs.

    python benchmarks/lab/rotated_kernels.py --shapes 4x4096x8x64,1x16384x8x64,2x8192x16x128
    python benchmarks/lab/rotated_kernels.py --shapes 4x4096x8x64 --segments auto,1,2,4,8 --grouped false,true

Each kernel runs on inputs of its real shapes and values (gates from random log|a| and phases
through the op's own preparation), timed with CUDA events: --repeats launches after a warm-up,
median. A kernel's bytes are what it must move at least: each input read once per CTA that
reads it (q and k once per block of value columns) and each output written once. Its FLOPs are
those of its matrix products. The floor is the larger of bytes / bandwidth and FLOPs / peak
(--bandwidth, --tflops: by default an H100 SXM's 3.35 TB/s and 989 dense bf16 TFLOP/s, an
H200's 4.8 TB/s). "op" is rotated_qkv_mosaic forward+backward, timed the same way. --grouped
compares each chunk's independent products issued one by one (awaited in turn) and together
(``mosaic_rotated.GROUPED``); --stages, two chunks in flight per walk against one, which halves
the walk's buffers so that two CTAs can share a multiprocessor (``mosaic_rotated.STAGES``; pair
it with twice the segments). The "issue" column reads grouped-or-one / stages.

On a CPU the kernels run in Pallas's interpret mode: use a tiny shape (--shapes 1x128x1x64
--repeats 1), a check that the probe runs, not a timing.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import datetime
import json
import itertools
import math
import pstats
import statistics
import time

import torch

from gateloop_hybrid.kernels import mosaic_rotated as kern
from gateloop_hybrid.ops import rotated as op

KERNELS = ("summary", "forward", "backward_q", "summary_back", "backward_kv")


def parse_shape(text):
    b, n, h, d = map(int, text.split("x"))
    return b, n, h, d


def cost(key: kern.RotatedKey, name: str) -> tuple[float, float]:
    """(bytes, FLOPs) of one launch of kernel ``name`` for ``key``."""
    B, N, H, d, BV, CB, S = key.B, key.N, key.H, key.d, key.block_v, key.col_blocks, key.segments
    C, item = kern.C, key.jdtype.itemsize
    X = B * N * H * d * item                  # one (B, N, H, d) tensor
    P = B * H * N * 4                         # one (B, H, N) float32 row
    Gb = B * H * key.chunks * d * 4
    state = B * H * S * 2 * d * d * 4
    share = X if CB == 1 else CB * B * N * H * d * 4
    walks = B * H * CB * key.chunks           # (chunk, CTA) pairs
    by_kernel = {
        # bytes: q and k are read once per column block, v, dy and the outputs once
        "summary": (CB * X + X + 2 * P + Gb + state, 4 * d * C * BV),
        "forward": (2 * CB * X + X + 3 * P + Gb + X + 2 * state,
                    4 * C * C * d + 8 * C * d * BV + 2 * C * C * BV),
        "backward_q": (2 * CB * X + 2 * X + 3 * P + Gb + state + share + 2 * CB * P,
                       12 * C * C * d + 2 * C * C * BV + 8 * C * d * BV),
        "summary_back": (CB * X + X + 2 * P + Gb + state, 4 * d * C * BV),
        "backward_kv": (2 * CB * X + 2 * X + 3 * P + Gb + 2 * state + share + X + 2 * CB * P,
                        12 * C * C * d + 4 * C * C * BV + 12 * C * d * BV),
    }
    nbytes, flops_per_walk = by_kernel[name]
    return float(nbytes), float(flops_per_walk * walks)


def timed(fn, repeats, device):
    """Median milliseconds of fn() over ``repeats`` runs after a warm-up (CUDA events; wall clock
    on a CPU)."""
    fn()
    if device.type != "cuda":
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(samples)
    torch.cuda.synchronize(device)
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
    return statistics.median(samples)


def inputs(shape, device, dtype, seed=0):
    b, n, h, d = shape
    g = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(b, n, 3 * h * d, generator=g) / d ** 0.25).to(device, dtype)
    log_mag = (-0.2 * torch.rand(b, n, h, generator=g)).to(device)
    phase = (math.pi * (2 * torch.rand(b, n, h, generator=g) - 1)).to(device)
    dy = torch.randn(b, n, h, d, generator=g).to(device, dtype)
    return qkv, log_mag, phase, dy


def measure(shape, segments, grouped, stages, device, dtype, repeats, host_profile=0):
    """Rows for one shape, segment count, issue (grouped or not) and pipeline depth: each kernel,
    then the op."""
    kern.GROUPED, kern.STAGES = grouped, stages
    b, n, h, d = shape
    qkv, log_mag, phase, dy = inputs(shape, device, dtype)
    qkv4 = qkv.unflatten(-1, (3 * h, d))
    key = op._key(qkv4, segments)
    gates = op._Gates(log_mag, phase, key)
    qkvp = op._padded(qkv4, key.N - n)
    dyp = op._padded(dy, key.N - n)
    g = torch.Generator().manual_seed(1)
    states = (0.1 * torch.randn(b, h, key.segments, 2, d, d, generator=g)).to(device)
    with_state = dataclasses.replace(key, has_state=True)
    args = {
        "summary": (key, (qkvp, gates.T, gates.W, gates.G)),
        "forward": (with_state, (qkvp, gates.L, gates.T, gates.W, gates.G, states)),
        "backward_q": (with_state, (qkvp, dyp, gates.L, gates.T, gates.W, gates.G, states)),
        "summary_back": (key, (qkvp, dyp, gates.T, torch.exp(gates.L), gates.G)),
        "backward_kv": (with_state, (qkvp, dyp, gates.L, gates.T, gates.W, gates.G, states)),
    }
    rows = []
    for name in KERNELS:
        if name.startswith("summary") and key.segments == 1:
            continue                # one segment: no summary walks
        k, tensors = args[name]
        ms = timed(lambda: op._run(k, name, *tensors), repeats, device)
        nbytes, flops = cost(k, name)
        rows.append({"kernel": name, "ms": ms, "bytes": nbytes, "flops": flops})
    leaf = qkv.clone().requires_grad_()
    lm, ph = log_mag.clone().requires_grad_(), phase.clone().requires_grad_()

    def fwd_bwd():
        y, h_last = op.rotated_qkv_mosaic(leaf, lm, ph, heads=h, segments=key.segments)
        torch.autograd.grad((y, h_last.real), (leaf, lm, ph), (dy, torch.ones_like(h_last.real)))
    rows.append({"kernel": "op (forward+backward)", "ms": timed(fwd_bwd, repeats, device)})
    if host_profile:
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        for _ in range(repeats):
            fwd_bwd()
        sync()
        rows.append({"kernel": "op, wall per call", "ms": (time.perf_counter() - t0) / repeats * 1e3})
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(repeats):
            fwd_bwd()
        sync()
        profile.disable()
        print(f"host time of the op's forward+backward at {shape}, {repeats} calls, by own time:")
        pstats.Stats(profile).sort_stats("tottime").print_stats(host_profile)
    return key, rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", default="4x4096x8x64,1x16384x8x64,2x8192x16x128", help="BxNxHxd, comma list")
    p.add_argument("--segments", default="auto", help="comma list of 'auto' (choose_segments) and counts")
    p.add_argument("--stages", default="2",
                   help="comma list of 1, 2: chunks in flight per walk (mosaic_rotated.STAGES)")
    p.add_argument("--grouped", default="false,true",
                   help="comma list of false, true: each chunk's independent products issued one by one or together")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--bandwidth", type=float, default=None, help="TB/s (default: 4.8 on an H200, else 3.35)")
    p.add_argument("--tflops", type=float, default=989.0, help="dense 16-bit matrix TFLOP/s")
    p.add_argument("--host-profile", type=int, default=0, metavar="K",
                   help="also the op's wall time per call (synchronized) and the K functions with the most host time")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpret mode)"
    bandwidth = args.bandwidth or (4.8 if "H200" in name else 3.35)
    import jax
    header = (f"wide-head kernels on {name}; torch {torch.__version__}, jax {jax.__version__}; "
              f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; floor at {bandwidth} TB/s and "
              f"{args.tflops} TFLOP/s")
    print(header)
    print(f"{'shape':>15} {'S':>3} {'issue':>9} {'kernel':>22} {'ms':>8} {'MB':>8} {'GFLOP':>7} {'floor ms':>9} "
          f"{'x floor':>8}")
    results = {"header": header, "rows": []}
    dtype = getattr(torch, args.dtype)
    for text in args.shapes.split(","):
        shape = parse_shape(text)
        for seg, grouped, stages in itertools.product(args.segments.split(","), args.grouped.split(","),
                                                      map(int, args.stages.split(","))):
            segments = None if seg == "auto" else int(seg)
            issue = ("grouped" if grouped == "true" else "one") + f"/{stages}"
            try:
                key, rows = measure(shape, segments, grouped == "true", stages, device, dtype, args.repeats,
                                    args.host_profile)
            except Exception as e:  # noqa: BLE001  (one failing case must not lose the others)
                print(f"{text:>15} {seg:>3} {issue:>9} failed: {type(e).__name__}: "
                      f"{str(e).splitlines()[0][:200]}", flush=True)
                continue
            total = 0.0
            for r in rows:
                r.update(shape=text, segments=key.segments, block_v=key.block_v, grouped=key.grouped,
                         stages=key.stages)
                lead = f"{text:>15} {key.segments:>3} {issue:>9}"
                if "bytes" in r:
                    r["floor_ms"] = max(r["bytes"] / (bandwidth * 1e9), r["flops"] / (args.tflops * 1e9))
                    total += r["ms"]
                    print(f"{lead} {r['kernel']:>22} {r['ms']:8.3f} {r['bytes'] / 1e6:8.1f} "
                          f"{r['flops'] / 1e9:7.2f} {r['floor_ms']:9.4f} {r['ms'] / r['floor_ms']:8.1f}", flush=True)
                else:
                    if total is not None:
                        print(f"{lead} {'kernels, summed':>22} {total:8.3f}")
                        total = None
                    print(f"{lead} {r['kernel']:>22} {r['ms']:8.3f}", flush=True)
            results["rows"].extend(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
