"""The wide-head mixer's device time, forward and backward, against causal flash attention on the
same (batch, time, heads, head width), bf16.

    python benchmarks/wide_heads.py --device cuda --json out.json
    python benchmarks/wide_heads.py --device cuda --shapes 4x4096x8x64 --forms kernels,sdpa --profile

Forms:
    kernels         gate_loop_mixer(backend="pallas") on the wide-head Mosaic GPU kernels (ops/rotated.py), eager: the
                    gates from z, the q/k/v split of qkv and the kernels, as a layer calls them
    kernels-compiled
                    the same under torch.compile: Inductor fuses the torch work around the kernels (the
                    gates, their running sums, the gradients' reversed sums), each kernel an opaque op
    chunked         gate_loop_mixer's cosine-weighted chunked form (chunked.py) under torch.compile
    rotated         the rotated form in torch (rotated.py, the kernels' reference) under torch.compile
    sdpa            F.scaled_dot_product_attention(is_causal=True) on q, k, v of the same shape
    fla-gla, fla-simple-gla
                    flash-linear-attention's chunk_gla and chunk_simple_gla on the rotated keys (width
                    2d) with the rotation included, when fla is installed (their first call autotunes)

Device time is the sum of the CUDA kernels' own times under torch.profiler per forward+backward
(host time excluded; each step starts with no gradients, as a training step after zero_grad),
the median of --repeats profiled calls after a warm-up; wall time is the synchronized median
(benchmarks/harness.py's measure). --profile lists each form's kernels with their share.
--check compares the kernels' values and gradients with the float64 rotated form on the first
1024 steps of each shape.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness, when run as a script

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import harness  # noqa: E402

FORMS = ("kernels", "kernels-compiled", "chunked", "rotated", "sdpa", "fla-gla", "fla-simple-gla")


def inputs(b, n, h, d, device, dtype, seed=0):
    """qkv (b, n, 3 h d) and z (b, n, 2 h) as a GateLoopedAttention layer makes them."""
    g = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(b, n, 3 * h * d, generator=g) / d ** 0.25).to(device, dtype).requires_grad_()
    z = (2 * torch.randn(b, n, 2 * h, generator=g)).to(device, dtype).requires_grad_()
    return qkv, z


def mixer_step(form: str, h: int):
    """fn(qkv, z) -> y for a gate_loop_mixer form."""
    from gateloop_hybrid import routing
    from gateloop_hybrid.mixer import composed_mixer, gate_loop_mixer
    from gateloop_hybrid.gates import log_gates
    from gateloop_hybrid.rotated import rotated_heads
    if form in ("kernels", "kernels-compiled"):
        mixer = lambda qkv, z: gate_loop_mixer(qkv, z, heads=h, backend="pallas")[0]
        run = torch.compile(mixer) if form == "kernels-compiled" else mixer

        def kernels(qkv, z):
            route = routing.route("mixer", "pallas", device=str(qkv.device),
                                  dtype=str(qkv.dtype).removeprefix("torch."), heads=h, width=qkv.shape[-1] // (3 * h))
            if route.path != "rotated":
                raise RuntimeError(f"the route takes {route.path!r}, not the kernels: {route.why}")
            return run(qkv, z)
        return kernels
    if form == "chunked":
        return torch.compile(lambda qkv, z: composed_mixer(qkv, z, None, heads=h, chunked=True)[0])

    def rotated(qkv, z):
        b, n = qkv.shape[:2]
        q, k, v = (t.unflatten(-1, (h, -1)) for t in qkv.chunk(3, dim=-1))
        log_mag, phase = log_gates(z.reshape(b, n, h, 2))
        return rotated_heads(q, k, v, log_mag, phase)[0].flatten(-2)
    return torch.compile(rotated)


def attention_step(b, n, h, d, device, dtype):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(b, h, n, d, generator=g).to(device, dtype).requires_grad_() for _ in range(3))

    def step():
        q.grad = k.grad = v.grad = None
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y.backward(torch.ones_like(y))
    return step


def fla_step(kind, b, n, h, d, device, dtype):
    """fla on the rotated keys of width 2d, the rotation (and the gates) included in the step."""
    if kind == "fla-gla":
        from fla.ops.gla import chunk_gla as op
    else:
        from fla.ops.simple_gla import chunk_simple_gla as op
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(b, n, h, d, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
    z = torch.randn(b, n, h, 2, generator=g).to(device, torch.float32).requires_grad_()

    def step():
        q.grad = k.grad = v.grad = z.grad = None
        zc = torch.view_as_complex(z)
        log_mag, phase = F.logsigmoid(zc.abs()), zc.angle()
        T = phase.cumsum(1).unsqueeze(-1)
        qr = torch.cat([q * torch.cos(T), -q * torch.sin(T)], -1).to(dtype)
        kr = torch.cat([k * torch.cos(T), -k * torch.sin(T)], -1).to(dtype)
        if kind == "fla-gla":
            y = op(qr, kr, v, log_mag.unsqueeze(-1).expand(*log_mag.shape, 2 * d), scale=1.0)[0]
        else:
            y = op(qr, kr, v, log_mag, scale=1.0)[0]
        y.backward(torch.ones_like(y))
    return step


def device_ms(step, device, repeats):
    """(median device ms of one call, the profiler of the last) over ``repeats`` profiled calls."""
    per_call, prof = [], None
    for _ in range(repeats):
        torch.cuda.synchronize(device)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize(device)
        per_call.append(sum(e.self_device_time_total for e in prof.key_averages()
                            if e.device_type == torch.autograd.DeviceType.CUDA) / 1e3)
    return statistics.median(per_call), prof


def check_kernels(b, n, h, d, device):
    """Max relative errors of the kernels' y, h_last and gradients against the float64 rotated form
    on the first 1024 steps (bf16 inputs)."""
    from gateloop_hybrid.ops.rotated import rotated_heads_mosaic
    from gateloop_hybrid.rotated import rotated_heads
    n = min(n, 1024)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(b, n, h, d, generator=g).bfloat16().float() / d ** 0.25 for _ in range(3))
    log_mag = -0.2 * torch.rand(b, n, h, generator=g)
    phase = math.pi * (2 * torch.rand(b, n, h, generator=g) - 1)
    w = torch.randn(b, n, h, d, generator=g, dtype=torch.float64)
    low = [t.to(device).bfloat16().requires_grad_() for t in (q, k, v)]
    low += [t.to(device).requires_grad_() for t in (log_mag, phase)]
    y, h_last = rotated_heads_mosaic(*low)
    got = [y, h_last, *torch.autograd.grad((y.double() * w.to(device)).sum() + h_last.real.sum(), low)]
    wide = [t.double().requires_grad_() for t in (q, k, v, log_mag, phase)]
    y, h_last = rotated_heads(*wide)
    want = [y, h_last, *torch.autograd.grad((y * w).sum() + h_last.real.sum(), wide)]
    names = ("y", "h_last", "dq", "dk", "dv", "dlog|a|", "dphase")
    return {name: float((a.detach().cpu().to(r.dtype) - r.detach()).abs().max() / r.detach().abs().max())
            for name, a, r in zip(names, got, want)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--shapes", default="4x4096x8x64,1x16384x8x64,2x8192x16x128",
                   help="comma list of BxTxHxd")
    p.add_argument("--forms", default="kernels,chunked,sdpa", help=f"comma list of {', '.join(FORMS)}")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--check", action="store_true", help="the kernels against the float64 rotated form")
    p.add_argument("--profile", action="store_true", help="each form's kernels, by device time")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), torch.bfloat16
    forms = args.forms.split(",")
    for form in forms:
        if form not in FORMS:
            p.error(f"unknown form {form!r}; choose from {FORMS}")
    env = harness.environment(device)
    lines = harness.header(env)
    lines.append(f"{'shape':>16} {'form':>15} {'device ms':>10} {'wall ms':>8} {'x sdpa':>7}")
    print("\n".join(lines), flush=True)
    results = []
    for shape in args.shapes.split(","):
        b, n, h, d = (int(s) for s in shape.split("x"))
        rows = {}
        if args.check and device.type == "cuda":
            errors = check_kernels(b, n, h, d, device)
            print(f"{shape:>16} kernels against float64: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()),
                  flush=True)
            results.append(dict(shape=shape, form="check", errors=errors))
        for form in forms:
            try:
                if form == "sdpa":
                    step = attention_step(b, n, h, d, device, dtype)
                elif form.startswith("fla"):
                    step = fla_step(form, b, n, h, d, device, dtype)
                else:
                    qkv, z = inputs(b, n, h, d, device, dtype)
                    fn = mixer_step(form, h)

                    def step(fn=fn, qkv=qkv, z=z):
                        qkv.grad = z.grad = None
                        y = fn(qkv, z)
                        y.backward(torch.ones_like(y))
                # the first call compiles, autotunes and self-tests
                first, times, _ = harness.measure(step, harness.device_wait(device), reps=args.repeats,
                                                  budget_s=30.0)
                wall = 1e3 * statistics.median(times)
                dev, prof = device_ms(step, device, args.repeats) if device.type == "cuda" else (None, None)
            except Exception as e:  # noqa: BLE001  (a form that fails is reported, the run goes on)
                message = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                print(f"{shape:>16} {form:>15} failed: {message}", flush=True)
                if not isinstance(e, (ImportError, torch.OutOfMemoryError)):
                    traceback.print_exc()
                results.append(dict(shape=shape, form=form, error=message))
                continue
            rows[form] = dev
            ratio = dev / rows["sdpa"] if dev is not None and rows.get("sdpa") else None
            lines.append(f"{shape:>16} {form:>15} {'-' if dev is None else f'{dev:10.3f}':>10} {wall:8.3f} "
                         f"{'-' if ratio is None else f'{ratio:7.2f}':>7}")
            print(lines[-1], flush=True)
            entry = dict(shape=shape, form=form, device_ms=dev, wall_ms=wall, first_call_s=first)
            if args.profile and prof is not None:
                kernels = sorted(((e.key, e.self_device_time_total / 1e3, e.count) for e in prof.key_averages()
                                  if e.device_type == torch.autograd.DeviceType.CUDA), key=lambda r: -r[1])
                entry["kernels"] = [dict(name=k, ms=ms, calls=c) for k, ms, c in kernels]
                for k, ms, c in kernels[:12]:
                    print(f"{'':>18}{ms:8.3f} ms {c:4d}x  {k[:110]}", flush=True)
            results.append(entry)
        # ratios to attention, for the rows measured before it
        for entry in results:
            if entry.get("shape") == shape and entry.get("device_ms") and rows.get("sdpa"):
                entry["x_sdpa"] = entry["device_ms"] / rows["sdpa"]
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(environment=env, command=" ".join(sys.argv), results=results), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
