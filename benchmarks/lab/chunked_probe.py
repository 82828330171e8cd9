"""The GateLoop mixer with wide heads: chunked form against the materialized scan, and (on CUDA,
when installed) flash-linear-attention's chunk_gla on the same shapes with real gates.

    python benchmarks/lab/chunked_probe.py                               # CPU-sized shapes
    python benchmarks/lab/chunked_probe.py --device cuda --shapes 4x4096x8x64 --dtype bfloat16

Shapes are BxNxHxD (D features per head, the state D x D). Each row: forward+backward
milliseconds (median of --steps after one warm-up, synchronized: host time included), peak memory
on CUDA, the relative error of y against the float64 materialized scan where that fits
(--check-limit), and on CUDA the device time of one forward+backward (its kernels, summed).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # harness, when run as a script

import torch  # noqa: E402

import harness  # noqa: E402
from gateloop_hybrid.mixer import composed_mixer  # noqa: E402


def timed(fn, device, steps):
    times = []
    for i in range(steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def gpu_ms(fn, device, steps=3):
    """(device time of one call, the profile): the kernels' own time under torch.profiler, summed,
    per call (host time excluded, unlike ``timed``)."""
    torch.cuda.synchronize(device)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize(device)
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(e.self_device_time_total for e in events) / 1e3 / steps, prof


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--shapes", default="2x256x4x16,1x2048x8x64")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--backend", default="auto", help="gate_loop_scan backend")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--forms", default="chunked,materialized",
                   help="comma list of chunked, chunked-compiled (torch.compile), materialized, fla "
                        "(flash-linear-attention's chunk_gla, CUDA; its first call autotunes for minutes)")
    p.add_argument("--no-recompute", dest="recompute", action="store_false",
                   help="keep the forward's tensors for backward instead of recomputing them")
    p.add_argument("--profile", action="store_true",
                   help="print torch.profiler's costliest device ops of each form (CUDA)")
    p.add_argument("--check-limit", type=int, default=2 ** 22,
                   help="compare with float64 only where B N H D D is at most this")
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    lines = harness.header(harness.environment(device))
    lines.append(f"{'shape':>16} {'form':>16} {'fwd+bwd ms':>11} {'peak GiB':>9} {'rel err':>9} {'GPU ms':>7}")
    print("\n".join(lines), flush=True)
    for shape in args.shapes.split(","):
        b, n, h, d = (int(s) for s in shape.split("x"))
        g = torch.Generator().manual_seed(0)
        qkv = torch.randn(b, n, 3 * h * d, generator=g).to(device, dtype).requires_grad_()
        z = torch.randn(b, n, 2 * h, generator=g).to(device, dtype).requires_grad_()
        want = None
        if b * n * h * d * d <= args.check_limit:
            with torch.no_grad():
                want = composed_mixer(qkv.double(), z.double(), None, heads=h, backend="torch")[0]
        forms = args.forms.split(",")
        for form in (f for f in forms if f != "fla"):
            materialize = form == "materialized"

            def mixer(qkv, z, recompute=args.recompute, materialize=materialize):
                return composed_mixer(qkv, z, None, heads=h, recompute=recompute, backend=args.backend,
                                      chunked=not materialize)[0]
            fn = torch.compile(mixer) if form.endswith("-compiled") else mixer

            def step():
                y = fn(qkv, z)
                y.float().sum().backward()
                return y
            try:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                ms = timed(step, device, args.steps)
                peak = f"{torch.cuda.max_memory_allocated(device) / 2**30:9.2f}" if device.type == "cuda" else f"{'-':>9}"
                err = "-"
                if want is not None:
                    with torch.no_grad():
                        y = mixer(qkv, z, recompute=False)
                    err = f"{float((y.double() - want).norm() / want.norm()):.1e}"
                gpu, prof = gpu_ms(step, device) if device.type == "cuda" else (None, None)
                lines.append(f"{shape:>16} {form:>16} {ms:11.2f} {peak} {err:>9} "
                             + (f"{'-':>7}" if gpu is None else f"{gpu:7.3f}"))
                print(lines[-1], flush=True)
                if args.profile and prof is not None:   # the same three passes the device time came from
                    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=160))
            except torch.OutOfMemoryError:
                lines.append(f"{shape:>16} {form:>16} {'out of memory':>11}")
                print(lines[-1], flush=True)
            qkv.grad = z.grad = None
        if "fla" in forms and device.type == "cuda":
            try:
                from fla.ops.gla import chunk_gla
            except ImportError:
                print("flash-linear-attention is not installed: no fla row")
                continue
            gq, gk, gv = (torch.randn(b, n, h, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
            gg = torch.nn.functional.logsigmoid(torch.randn(b, n, h, d, device=device)).requires_grad_()

            def fla_step():
                o, _ = chunk_gla(gq, gk, gv, gg)
                o.float().sum().backward()
            t0 = time.perf_counter()
            fla_step()                                   # autotunes
            print(f"fla chunk_gla first call (autotune): {time.perf_counter() - t0:.0f} s", flush=True)
            torch.cuda.reset_peak_memory_stats(device)
            ms = timed(fla_step, device, args.steps)
            peak = torch.cuda.max_memory_allocated(device) / 2**30
            lines.append(f"{shape:>16} {'fla chunk_gla':>16} {ms:11.2f} {peak:9.2f} {'-':>9} {gpu_ms(fla_step, device)[0]:7.3f}")
            print(lines[-1], flush=True)


if __name__ == "__main__":
    main()
