"""Check and time the Pallas scan kernels (gateloop_hybrid/scan/pallas_scan.py) on a GPU.

    python benchmarks/lab/pallas_tune.py --out results_dir [--budget-s 240] [--plan quick|basic|layouts|defaults]

The kernels run in JAX; the float64 reference is the package's (gateloop_hybrid.scan.reference,
torch on the CPU). One run does, in order:

1. the copy bandwidth of this GPU (y = x + 1 over 1 GiB: bytes read + written over the time);
2. correctness on small shapes (values and all gradients against a float64 sequential
   reference computed on the CPU): both kernels, real/complex, reverse, odd lengths, broadcast
   gates, bfloat16, both entry points;
3. timing of kernel variants at B=4,N=4096,D=1024; B=1,N=65536,D=512; B=16,N=1024,D=1024 in
   float32 and complex64 (as float pairs, the bridge's zero-copy layout), forward, then
   forward+backward for the fastest forward variants, each checked against the reference;
   baselines: jax.lax.associative_scan (jax_scan.py) and the complex-array entry point;
4. a table (last in the output) and the full JSON under --out.

Timing: each measurement runs K independent problems (distinct inputs, so no caching across them
and no common subexpressions) in one jitted call; the median over repetitions of the call's wall
time (after warm-up, synchronised with block_until_ready) divided by K is the time per problem.
Floors: 3x (fwd) and 8x (fwd+bwd) the bytes of one tensor over the measured copy bandwidth.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import time
import traceback
from pathlib import Path

import numpy as np
import torch

import bridge  # noqa: F401  (JAX's GPU memory policy, before JAX starts)
import jax
import jax.numpy as jnp
from gateloop_hybrid.kernels import jax_scan as js
from gateloop_hybrid.kernels import pallas_scan as ps
from gateloop_hybrid.scan.reference import scan_reference, scan_reference_vjp

KC = ps.KernelConfig

CASES = {"A": (4, 4096, 1024), "B": (1, 65536, 512), "C": (16, 1024, 1024)}
SMOKE_CASES = {"A": (2, 100, 40), "B": (1, 300, 24), "C": (3, 50, 40)}
INTERPRET = False   # --smoke: tiny shapes in Pallas interpret mode, to test this script on a CPU
TARGET = {  # accelerated-scan's Triton kernel at case A float32 on an H200, ms (docs/results.md)
    ("A", "float32", "fwd"): 0.12, ("A", "float32", "fwd+bwd"): 0.31}

def _name(k):
    short = {"column_per_lane": "cpl", "window": "W", "prefetch": "pf", "ticket": "ticket"}
    return "".join(f" {short.get(n, n)}{'' if v is True else v}" for n, v in k.items()
                   if v and not (n == "ticket"))


def _explicit(k):
    """Variants name every field that has a data-dependent default (see resolve_config)."""
    return {"column_per_lane": 0, "window": 8, "publish_atomic": True, **k}


def _w(t, d, w, s, **k):
    return f"walk T{t} BD{d} w{w} s{s}" + _name(k), KC("walk", t, d, w, s, **_explicit(k))


def _l(t, d, w, **k):
    name = _name({n: v for n, v in k.items() if n != "publish_atomic"})
    return (f"lookback T{t} BD{d} w{w}" + name + ("" if k.get("ticket", True) else " pid")
            + ("" if k.get("publish_atomic", True) else " store"), KC("lookback", t, d, w, 1, **_explicit(k)))


AUTO = ("auto", None)                                     # the module's own choice, per kernel
STORE = ("auto store", (KC(publish_atomic=False), KC(publish_atomic=False)))


# Forward variants per (case, dtype) and plan; the fastest --top are also timed fwd+bwd.
PLANS = {
    "quick": {("A", "float32"): [_w(64, 32, 4, 3), _l(128, 32, 8)]},
    "basic": {
        ("A", "float32"): [_w(64, 32, 4, 3), _w(64, 32, 4, 1), _w(64, 32, 4, 1, prefetch=True),
                           _w(128, 32, 4, 4), _w(128, 16, 4, 4), _l(128, 32, 8), _l(256, 32, 8),
                           _l(128, 32, 8, ticket=False)],
        ("A", "complex64"): [_w(64, 32, 4, 3), _w(128, 32, 8, 3), _l(128, 32, 8), _l(64, 32, 4)],
        ("B", "float32"): [_l(128, 32, 8), _l(256, 32, 8), _l(128, 32, 8, ticket=False), _l(128, 64, 8),
                           _w(128, 16, 4, 4)],
        ("B", "complex64"): [_l(128, 32, 8), _l(64, 32, 4)],
        ("C", "float32"): [_w(64, 32, 4, 3), _w(128, 32, 4, 4), _l(128, 32, 8)],
        ("C", "complex64"): [_w(64, 32, 4, 3), _l(128, 32, 8)],
    },
    # lanes own columns (in-thread tile scan) and a windowed look-back
    "layouts": {
        ("A", "float32"): [_w(128, 16, 4, 4), _w(64, 64, 4, 3, column_per_lane=2),
                           _w(32, 32, 1, 4, column_per_lane=1), _l(128, 64, 4, column_per_lane=2, window=8),
                           _l(128, 32, 4, column_per_lane=1, window=8), _l(128, 32, 8, window=8)],
        ("A", "complex64"): [_w(128, 32, 8, 3), _w(32, 32, 1, 4, column_per_lane=1),
                             _l(64, 32, 4, column_per_lane=1, window=8), _l(64, 32, 4, window=8)],
        ("B", "float32"): [_l(128, 64, 4, column_per_lane=2, window=8), _l(64, 64, 4, column_per_lane=2, window=8),
                           _l(128, 32, 4, column_per_lane=1, window=8), _l(32, 32, 1, column_per_lane=1, window=8),
                           _l(128, 32, 8, window=8)],
        ("B", "complex64"): [_l(64, 32, 4, column_per_lane=1, window=8), _l(32, 32, 2, column_per_lane=1, window=4),
                             _l(128, 32, 8, column_per_lane=1, window=8), _l(64, 32, 4, window=8)],
        ("C", "float32"): [_w(64, 32, 4, 3), _w(64, 64, 4, 3, column_per_lane=2), _w(32, 32, 1, 4, column_per_lane=1),
                           _l(128, 64, 4, column_per_lane=2, window=8), _l(128, 32, 4, column_per_lane=1, window=8)],
        ("C", "complex64"): [_w(64, 32, 4, 3), _w(32, 32, 1, 4, column_per_lane=1),
                             _l(64, 32, 4, column_per_lane=1, window=8)],
    },
    # the defaults (per kernel: forward and backward may differ), plain-store publication for
    # the look-back, narrower walk columns for case A
    "defaults": {
        ("A", "float32"): [AUTO, _w(128, 8, 4, 4), _w(128, 16, 2, 4),
                           _l(128, 32, 4, column_per_lane=1, publish_atomic=False)],
        ("A", "complex64"): [AUTO, _w(64, 16, 4, 3), _l(32, 32, 2, column_per_lane=1, window=4, publish_atomic=False)],
        ("B", "float32"): [AUTO, STORE, _l(128, 32, 4, column_per_lane=1, ticket=False, publish_atomic=False),
                           _l(64, 32, 2, column_per_lane=1, publish_atomic=False)],
        ("B", "complex64"): [AUTO, STORE],
        ("C", "float32"): [AUTO],
        ("C", "complex64"): [AUTO],
    },
}


# ---------------------------------------------------------------------------------------------
# the float64 reference


def reference(a, x, h0, g, gl, reverse, jax_convention):
    """float64 (h, h_last, da, dx, dh0) of numpy inputs from the package's reference; gradients
    in torch's convention, or JAX's (the conjugate, for conjugated cotangents) when jax_convention."""
    t = lambda v: None if v is None else torch.from_numpy(np.asarray(v))
    a, x, h0, g, gl = (t(v) for v in (a, x, h0, g, gl))
    if jax_convention:
        g, gl = g.conj(), gl.conj()
    h, hl = scan_reference(a, x, h0, reverse=reverse)
    grads = scan_reference_vjp(a, x, h0, h, g, gl, reverse=reverse)
    n = lambda v: None if v is None else (v.conj() if jax_convention else v).resolve_conj().numpy()
    return (h.numpy(), hl.numpy(), *(n(v) for v in grads))


def rel_err(got, want):
    got = np.asarray(got, np.complex128)
    want = np.asarray(want, np.complex128)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def pairs(v):
    return np.stack([v.real, v.imag], -1).astype(np.float32) if np.iscomplexobj(v) else v


def unpairs(v, cplx):
    v = np.asarray(v, np.float64)
    return v[..., 0] + 1j * v[..., 1] if cplx else v


def rand_inputs(rng, B, N, F, Fa, cplx, h0=True):
    mag = rng.uniform(0.8, 1.0, (B, N, *Fa))
    if cplx:
        a = (mag * np.exp(1j * rng.uniform(-np.pi, np.pi, mag.shape))).astype(np.complex64)
        x = (rng.normal(size=(B, N, *F)) + 1j * rng.normal(size=(B, N, *F))).astype(np.complex64)
        z = (rng.normal(size=(B, *F)) + 1j * rng.normal(size=(B, *F))).astype(np.complex64)
    else:
        a = (mag * rng.choice([-1.0, 1.0], mag.shape)).astype(np.float32)
        x = rng.normal(size=(B, N, *F)).astype(np.float32)
        z = rng.normal(size=(B, *F)).astype(np.float32)
    return a, x, (z if h0 else None)


# ---------------------------------------------------------------------------------------------
# Correctness on small shapes


def check_small(log):
    rng = np.random.default_rng(1)
    rows = []
    specs = [  # (name, B, N, F, Fa, cplx, reverse, cfg, pairs_api, bf16)
        ("walk real", 2, 1000, (96,), (96,), False, False, KC("walk", 64, 32, 4, 3), False, False),
        ("walk real rev bcast", 2, 63, (3, 40), (3, 1), False, True, KC("walk", 64, 32, 4, 3), False, False),
        ("walk cplx pairs", 2, 1000, (96,), (96,), True, False, KC("walk", 64, 32, 4, 3), True, False),
        ("walk cplx rev arrays", 3, 3, (40,), (40,), True, True, KC("walk", 64, 32, 4, 3), False, False),
        ("walk regprefetch", 2, 1000, (96,), (96,), True, True, KC("walk", 64, 32, 4, 1, prefetch=True), True, False),
        ("lookback real", 2, 1000, (96,), (96,), False, False, KC("lookback", 128, 32, 8), False, False),
        ("lookback real rev bcast", 2, 1000, (4, 24), (1, 24), False, True, KC("lookback", 128, 32, 8), False, False),
        ("lookback cplx pairs rev", 2, 1000, (96,), (96,), True, True, KC("lookback", 128, 32, 8), True, False),
        ("lookback cplx n1 scalar gate", 2, 1, (40,), (1,), True, False, KC("lookback", 128, 32, 8), False, False),
        ("lookback pid", 1, 5000, (200,), (200,), False, False, KC("lookback", 64, 32, 4, ticket=False), False, False),
        ("walk cpl2", 2, 1000, (96,), (96,), False, True, KC("walk", 64, 64, 2, 3, column_per_lane=2), False, False),
        ("walk cpl1 cplx", 2, 1000, (40,), (40,), True, False, KC("walk", 32, 32, 1, 4, column_per_lane=1), True, False),
        ("lookback cpl2 W8", 2, 5000, (200,), (200,), False, False,
         KC("lookback", 128, 64, 4, column_per_lane=2, window=8), False, False),
        ("lookback cpl1 cplx W4 every5", 2, 5000, (40,), (1,), True, True,
         KC("lookback", 64, 32, 4, column_per_lane=1, window=4, incl_every=5), True, False),
        ("walk bf16", 2, 1000, (96,), (96,), False, False, KC("walk", 64, 32, 4, 3), False, True),
        ("lookback bf16", 2, 1000, (96,), (96,), False, True, KC("lookback", 128, 32, 8), False, True),
    ]
    for name, B, N, F, Fa, cplx, reverse, cfg, use_pairs, bf16 in specs:
        t0 = time.perf_counter()
        if INTERPRET:   # smoke test of this script: small enough for the interpreter
            N, F, Fa = min(N, 40), tuple(min(f, 6) for f in F), tuple(min(f, 6) for f in Fa)
        try:
            a, x, h0 = rand_inputs(rng, B, N, F, Fa, cplx)
            if bf16:
                a, x, h0 = (v.astype(jnp.bfloat16) for v in (a, x, h0))
            g = rand_inputs(rng, B, N, F, F, cplx)[1]
            gl = rand_inputs(rng, B, 1, F, F, cplx)[1][:, 0]
            if use_pairs:
                def run(a, x, h0, g, gl):
                    fn = lambda a, x, h0: ps.scan_pallas_ri(
                        a, x, h0, complex_a=cplx, complex_x=cplx, complex_h0=cplx, reverse=reverse,
                        interpret=INTERPRET, config=cfg)
                    out, vjp = jax.vjp(fn, a, x, h0)
                    return out, vjp((g, gl))
                (h, hl), (da, dx, dh0) = jax.jit(run)(*(pairs(v) for v in (a, x, h0, g, gl)))
                h, hl, da, dx, dh0 = (unpairs(v, cplx) for v in (h, hl, da, dx, dh0))
            else:
                def run(a, x, h0, g, gl):
                    fn = lambda a, x, h0: ps.scan_pallas(a, x, h0, reverse, INTERPRET, cfg)
                    out, vjp = jax.vjp(fn, a, x, h0)
                    return out, vjp((g.astype(out[0].dtype), gl.astype(out[0].dtype)))
                (h, hl), (da, dx, dh0) = jax.jit(run)(a, x, h0, g, gl)
            f64 = lambda v: np.asarray(v, np.complex128 if cplx else np.float64)
            hr, hlr, dar, dxr, dh0r = reference(f64(a), f64(x), f64(h0), f64(g), f64(gl), reverse,
                                                jax_convention=not use_pairs)
            errs = {k: rel_err(v, w) for k, v, w in (("h", h, hr), ("h_last", hl, hlr), ("da", da, dar),
                                                      ("dx", dx, dxr), ("dh0", dh0, dh0r))}
            tol = 2e-2 if bf16 else 1e-4
            ok = all(e < tol for e in errs.values())
            rows.append(dict(name=name, ok=ok, errors=errs, seconds=time.perf_counter() - t0))
        except Exception as e:  # noqa: BLE001 - report and carry on
            rows.append(dict(name=name, ok=False, error=f"{type(e).__name__}: {e}"[:3000],
                             trace=traceback.format_exc()[-4000:]))
        r = rows[-1]
        log(f"check {name:32s} {'OK ' if r['ok'] else 'FAIL'} "
            + (" ".join(f"{k}={v:.1e}" for k, v in r.get("errors", {}).items()) or r.get("error", "")[:300]))
    return rows


# ---------------------------------------------------------------------------------------------
# Timing


def copy_bandwidth():
    """Bytes read + written per second by an XLA elementwise pass and by a Pallas copy kernel
    over 1 GiB (timed like the kernels: back-to-back calls); returns both."""
    from jax.experimental import pallas as pl
    rows = 64 if INTERPRET else 256 * 1024
    x = jnp.ones((rows, 1024), jnp.float32)
    xla = jax.jit(lambda x: [x + 1.0])

    def copy_kernel(x_ref, o_ref):
        o_ref[...] = x_ref[...]

    br = 32
    pallas = jax.jit(lambda x: [pl.pallas_call(
        copy_kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), grid=(rows // br,),
        in_specs=[pl.BlockSpec((br, 1024), lambda i: (i, 0))],
        out_specs=pl.BlockSpec((br, 1024), lambda i: (i, 0)), interpret=INTERPRET)(x)])
    out = {}
    for name, fn in (("xla", xla), ("pallas", pallas)):
        try:
            out[name] = 2 * x.nbytes / time_call(fn, (x,), 1, reps=5, calls=10)[0]
        except Exception as e:  # noqa: BLE001
            out[name] = float("nan")
            print(f"copy {name} failed: {e}"[:500])
    return out


def time_call(fn, args, k, reps=5, calls=8):
    """Median over reps of (wall time of `calls` back-to-back calls) / (calls * k)."""
    out = fn(*args)
    jax.block_until_ready(out)
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    if time.perf_counter() - t > 0.5:   # a hung look-back spins until its limit: don't repeat it
        raise RuntimeError(f"one call took {time.perf_counter() - t:.2f}s; not timed further")
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        ts.append((time.perf_counter() - t) / (calls * k))
    return statistics.median(ts), (min(ts), max(ts)), out


class Problem:
    """K independent problems of one case on the GPU plus the float64 reference of the first."""

    def __init__(self, case, cplx, k, rng):
        B, N, D = CASES[case]
        self.case, self.cplx, self.k, self.shape = case, cplx, k, (B, N, D)
        a, x, _ = rand_inputs(rng, B, N, (D,), (D,), cplx, h0=False)
        g = rand_inputs(rng, B, N, (D,), (D,), cplx, h0=False)[1]
        gl = g[:, 0] * 0.5
        self.host = (a, x, g, gl)
        dev = [jnp.asarray(pairs(v)) for v in (a, x, g, gl)]
        # K problems: the first is the checked one, the rest are perturbed copies (distinct data)
        self.pairs = [[v if i == 0 else v * (1.0 - 1e-3 * i) for v in dev] for i in range(k)]
        self._complex = None
        self.bytes_one = B * N * D * (8 if cplx else 4)
        self._ref = None

    def inputs(self, api):
        """pairs: float arrays (complex as trailing pairs). arrays/assoc: complex64 arrays, with
        the cotangents conjugated so that JAX's convention gives conj(the torch-convention ref)."""
        if api == "pairs" or not self.cplx:
            return self.pairs
        if self._complex is None:
            c = jax.jit(lambda v: jax.lax.complex(v[..., 0], v[..., 1]))
            self._complex = [[c(a), c(x), jnp.conj(c(g)), jnp.conj(c(gl))] for a, x, g, gl in self.pairs]
        return self._complex

    def ref(self):
        if self._ref is None:
            a, x, g, gl = (np.asarray(v, np.complex128 if self.cplx else np.float64) for v in self.host)
            self._ref = reference(a, x, None, g, gl, False, jax_convention=False)[:4]
        return self._ref


def fwd_fn(prob, cfg, api="pairs"):
    c = prob.cplx

    def one(a, x):
        if api == "pairs":
            return ps.scan_pallas_ri(a, x, None, complex_a=c, complex_x=c, interpret=INTERPRET,
                                               config=cfg)
        if api == "arrays":   # complex JAX arrays: pays the conversion passes
            return ps.scan_pallas(a, x, None, False, INTERPRET, cfg)
        return js.scan_jax(a, x, None, False)

    return jax.jit(lambda inputs: [one(a, x) for a, x, _, _ in inputs])


def fwdbwd_fn(prob, cfg, api="pairs"):
    c = prob.cplx
    if api == "pairs":
        fn = lambda a, x: ps.scan_pallas_ri(a, x, None, complex_a=c, complex_x=c, interpret=INTERPRET,
                                               config=cfg)
    elif api == "arrays":
        fn = lambda a, x: ps.scan_pallas(a, x, None, False, INTERPRET, cfg)
    else:
        fn = lambda a, x: js.scan_jax(a, x, None, False)

    def one(a, x, g, gl):
        out, vjp = jax.vjp(fn, a, x)
        return out, vjp((g, gl))

    return jax.jit(lambda inputs: [one(*v) for v in inputs])


def check_timed(prob, out, mode, api):
    """Relative errors of the first problem's outputs against the float64 reference."""
    h_ref, hl_ref, da_ref, dx_ref = prob.ref()
    c = prob.cplx
    take = (lambda v: unpairs(v, c)) if api == "pairs" else (lambda v: np.asarray(v))
    if mode == "fwd":
        h, hl = out[0]
        return {"h": rel_err(take(h), h_ref), "h_last": rel_err(take(hl), hl_ref)}
    (h, hl), (da, dx) = out[0]
    da, dx = take(da), take(dx)
    if api != "pairs" and c:   # JAX's convention, driven by conj(cotangent): conj of torch's
        da, dx = np.conj(da), np.conj(dx)
    return {"h": rel_err(take(h), h_ref), "da": rel_err(da, da_ref), "dx": rel_err(dx, dx_ref)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--budget-s", type=float, default=240.0, help="stop starting timings after this")
    ap.add_argument("--plan", default="layouts", choices=tuple(PLANS))
    ap.add_argument("--cases", default="A,B,C")
    ap.add_argument("--dtypes", default="float32,complex64")
    ap.add_argument("--k", type=int, default=4, help="independent problems per timed call")
    ap.add_argument("--top", type=int, default=2, help="forward variants also timed fwd+bwd")
    ap.add_argument("--baselines", action="store_true", help="associative_scan, complex-array API at A")
    ap.add_argument("--no-checks", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, interpret mode (CPU)")
    args = ap.parse_args()
    if args.smoke:
        global INTERPRET
        INTERPRET = True
        CASES.update(SMOKE_CASES)
    t_start = time.perf_counter()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = []

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)

    dev = jax.devices()[0]
    header = dict(device=str(dev), device_kind=getattr(dev, "device_kind", "?"),
                  sms=getattr(dev, "core_count", None), jax=jax.__version__, python=platform.python_version(),
                  date=time.strftime("%Y-%m-%d %H:%M:%S"))
    log(f"# {header}")
    result = dict(header=header, checks=[], timings=[])

    def save():
        (out_dir / "pallas_tune.json").write_text(json.dumps(result, indent=1, default=str))

    bws = copy_bandwidth()
    bw = max(v for v in bws.values() if not math.isnan(v))
    result["copy_bandwidth_Bps"] = bw
    result["copy_bandwidths_Bps"] = bws
    log("copy bandwidth " + ", ".join(f"{k} {v / 1e12:.2f}" for k, v in bws.items()) + f" TB/s; floor uses {bw / 1e12:.2f}")
    save()
    if not args.no_checks:
        result["checks"] = check_small(log)
        save()

    rng = np.random.default_rng(0)
    for case in args.cases.split(","):
        for dtype in args.dtypes.split(","):
            cplx = dtype == "complex64"
            prob = Problem(case, cplx, args.k, rng)
            floor = {"fwd": 3 * prob.bytes_one / bw, "fwd+bwd": 8 * prob.bytes_one / bw}
            fwd_times = []

            def record(mode, label, fn, api="pairs"):
                if time.perf_counter() - t_start > args.budget_s:
                    log(f"skip {case} {dtype} {mode} {label}: over budget")
                    return None
                t0 = time.perf_counter()
                row = dict(case=case, shape=prob.shape, dtype=dtype, mode=mode, variant=label, api=api)
                try:
                    med, (lo, hi), out = time_call(fn, (prob.inputs(api),), prob.k)
                    row.update(ms=med * 1e3, ms_min=lo * 1e3, ms_max=hi * 1e3, floor_ms=floor[mode] * 1e3,
                               x_floor=med / floor[mode], errors=check_timed(prob, out, mode, api))
                    finite = [v for v in row["errors"].values() if not math.isnan(v)]
                    row["ok"] = all(v < 1e-3 for v in finite)
                except Exception as e:  # noqa: BLE001
                    row.update(error=f"{type(e).__name__}: {e}"[:2000], trace=traceback.format_exc()[-3000:])
                row["wall_s"] = time.perf_counter() - t0
                result["timings"].append(row)
                save()
                if "ms" in row:
                    log(f"{case} {dtype:9s} {mode:7s} {label:28s} {api:6s} {row['ms']:8.4f} ms "
                        f"({row['x_floor']:.2f}x floor {row['floor_ms']:.4f}) "
                        f"err {max((v for v in row['errors'].values() if not math.isnan(v)), default=0):.1e}"
                        f"{'' if row['ok'] else ' WRONG'}  [{row['wall_s']:.1f}s]")
                else:
                    log(f"{case} {dtype} {mode} {label} {api} ERROR {row['error'][:400]}")
                return row

            for label, cfg in PLANS[args.plan].get((case, dtype), []):
                row = record("fwd", label, fwd_fn(prob, cfg))
                if row and "ms" in row and row["ok"]:
                    fwd_times.append((row["ms"], label, cfg))
            fwd_times.sort(key=lambda r: r[0])
            fb = fwd_times[:args.top] + [r for r in fwd_times[args.top:] if r[1].startswith("auto")]
            for _, label, cfg in fb:
                record("fwd+bwd", label, fwdbwd_fn(prob, cfg))
            if fwd_times and case == "A" and args.baselines:
                best = fwd_times[0][2]
                if cplx:
                    record("fwd", fwd_times[0][1], fwd_fn(prob, best, "arrays"), "arrays")
                    record("fwd+bwd", fwd_times[0][1], fwdbwd_fn(prob, best, "arrays"), "arrays")
                record("fwd", "associative_scan", fwd_fn(prob, None, "assoc"), "assoc")
                record("fwd+bwd", "associative_scan", fwdbwd_fn(prob, None, "assoc"), "assoc")
            del prob

    # the table: best per (case, dtype, mode, api)
    best = {}
    for r in result["timings"]:
        if "ms" in r and r["ok"]:
            key = (r["case"], r["dtype"], r["mode"], r["api"])
            if key not in best or r["ms"] < best[key]["ms"]:
                best[key] = r
    table = ["", f"copy bandwidth {bw / 1e12:.2f} TB/s; {header['device_kind']}; jax {jax.__version__}",
             f"{'case':4s} {'shape':>16s} {'dtype':9s} {'mode':7s} {'api':6s} {'ms':>8s} {'floor':>7s} "
             f"{'x':>5s} {'target':>6s}  best variant"]
    for (case, dtype, mode, api), r in sorted(best.items()):
        tgt = TARGET.get((case, dtype, mode))
        table.append(f"{case:4s} {'x'.join(map(str, r['shape'])):>16s} {dtype:9s} {mode:7s} {api:6s} "
                     f"{r['ms']:8.4f} {r['floor_ms']:7.4f} {r['x_floor']:5.2f} {tgt or '':>6}  {r['variant']}")
    checks = result["checks"]
    table.append(f"small checks: {sum(c['ok'] for c in checks)}/{len(checks)} ok"
                 + "".join(f"; FAIL {c['name']}" for c in checks if not c["ok"]))
    table.append(f"total {time.perf_counter() - t_start:.0f}s")
    result["table"] = table
    save()
    (out_dir / "pallas_tune.txt").write_text("\n".join(lines + table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
