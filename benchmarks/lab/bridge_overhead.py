"""What the bridge costs: the jitted JAX scan called natively vs. through bridge.jax2torch.

    python benchmarks/lab/bridge_overhead.py [--device cuda] [--json PATH]

Both sides run the same jitted functions (the forward, the forward that also returns residuals,
and the backward); native JAX calls them on jax.Arrays, the bridge on torch tensors. Timing: K
back-to-back calls, then one synchronization (torch.cuda.synchronize and block_until_ready),
median over repetitions. At the tiny size this is the per-call (dispatch) cost; at the large
size, the device time. "fused" is one jit of forward+backward together, for context.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import bridge  # noqa: E402  (sets JAX's GPU memory policy first)
import jax  # noqa: E402


from gateloop_hybrid.kernels.jax_scan import scan_jax as jax_scan  # noqa: E402


def sync(device, *arrays):
    for a in arrays:
        jax.block_until_ready(a)
    if device == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device, calls, reps):
    """Median and spread of the per-call time (microseconds) over ``reps`` blocks of ``calls``."""
    out = fn()
    sync(device, out)
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(calls):
            out = fn()
        sync(device, out)
        samples.append((time.perf_counter() - t0) / calls * 1e6)
    samples.sort()
    return {"median_us": statistics.median(samples), "min_us": samples[0], "max_us": samples[-1]}


def measure(shape, device, calls, reps):
    B, N, D = shape
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.sigmoid(torch.randn(B, N, D, device=device, generator=g))
    x = torch.randn(B, N, D, device=device, generator=g)
    ct = torch.randn(B, N, D, device=device, generator=g)
    ct_last = torch.randn(B, D, device=device, generator=g)
    ja, jx, jct, jct_last = (bridge.to_jax(t) for t in (a, x, ct, ct_last))

    bridged = bridge.jax2torch(jax_scan)
    fwd = jax.jit(lambda a, x: jax_scan(a, x))

    # Exactly the jitted functions the bridge runs, called natively.
    spec, tensors = bridged._spec((a, x), {})
    a_req, x_req = a.clone().requires_grad_(), x.clone().requires_grad_()
    sig = spec.signature([a_req, x_req], True)
    vjp_fwd, bwd = spec.vjp_fwd, sig.bwd
    pick = lambda outs, extras: [{"in": [ja, jx], "out": outs, "res": extras}[k][i] for k, i in sig.res_sources]

    def native_fwd_bwd():
        outs, extras = vjp_fwd(ja, jx)
        return bwd(pick(outs, extras), [jct, jct_last])

    @jax.jit
    def fused(a, x, ct, ct_last):
        _, pull = jax.vjp(lambda a, x: jax_scan(a, x), a, x)
        return pull((ct, ct_last))

    def bridge_fwd():
        with torch.no_grad():
            return bridged(a, x)[0]

    def bridge_fwd_bwd():
        h, h_last = bridged(a_req, x_req)
        return torch.autograd.grad((h, h_last), (a_req, x_req), (ct, ct_last))

    res = {
        "native_fwd": timeit(lambda: fwd(ja, jx), device, calls, reps),
        "bridge_fwd": timeit(bridge_fwd, device, calls, reps),
        "native_fwd_bwd": timeit(native_fwd_bwd, device, calls, reps),
        "bridge_fwd_bwd": timeit(bridge_fwd_bwd, device, calls, reps),
        "native_fused_fwd_bwd": timeit(lambda: fused(ja, jx, jct, jct_last), device, calls, reps),
    }
    # The bridge must give the native values.
    h_native = torch.from_dlpack(fwd(ja, jx)[0])
    assert torch.equal(bridge_fwd(), h_native)
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", default="1,16,16", help="B,N,D of the per-call case")
    p.add_argument("--large", default=None, help="B,N,D of the bandwidth case "
                   "(default 4,4096,1024 on cuda, 4,1024,256 on cpu)")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    large = args.large or ("4,4096,1024" if args.device == "cuda" else "4,1024,256")
    cases = {"tiny": (tuple(map(int, args.tiny.split(","))), 200),
             "large": (tuple(map(int, large.split(","))), 20 if args.device == "cuda" else 3)}
    name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    header = (f"bridge overhead on {name} ({args.device}); torch {torch.__version__}, jax {jax.__version__}; "
              f"{datetime.date.today()}")
    print(header)
    results = {"header": header, "cases": {}}
    print(f"{'case':>22} {'impl':>22} {'median':>10} {'min':>10} {'max':>10}  (us per call)")
    for label, (shape, calls) in cases.items():
        r = measure(shape, args.device, calls, args.reps)
        results["cases"][label] = {"shape": shape, **r}
        for impl, v in r.items():
            print(f"{label + str(shape):>22} {impl:>22} {v['median_us']:10.1f} {v['min_us']:10.1f} {v['max_us']:10.1f}")
        f = r["bridge_fwd"]["median_us"] - r["native_fwd"]["median_us"]
        fb = r["bridge_fwd_bwd"]["median_us"] - r["native_fwd_bwd"]["median_us"]
        print(f"{'':>22} {'bridge extra':>22} fwd {f:+.1f} us ({r['bridge_fwd']['median_us'] / r['native_fwd']['median_us']:.3f}x), "
              f"fwd+bwd {fb:+.1f} us ({r['bridge_fwd_bwd']['median_us'] / r['native_fwd_bwd']['median_us']:.3f}x)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
