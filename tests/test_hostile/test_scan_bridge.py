"""Hostile inputs to gate_loop_scan and the bridge: every attempt must give the right result or
stop with one clear error.

Each attempt ends in one of the outcomes of hostile_tally:
    right            the result matches the float64 sequential loop (or torch's own computation);
                     "documented" where it differs in a way the docstrings state (the "heinsen"
                     backend's NaN after inputs near the edge of the floating range)
    refused clearly  an exception of a named type (TypeError, ValueError, NotImplementedError,
                     RuntimeError or ImportError, or a subclass) whose message contains what the
                     attempt expects: the function or argument name and what was wrong
    silent wrong     a result that differs from the reference, or a result where an error was due
    unclear          any other exception (AttributeError, KeyError, an internal error, a message
                     that does not name the argument)

Kinds of attack, one test each: shapes, dtypes, devices and layouts, values (inf, NaN, zero and
large gates), gradients (first and second order, gradcheck), torch.compile (cold, fullgraph),
torch.vmap and torch.func, threads, and the generic bridge (failing traces, statics, aliasing,
in-place edits). CPU (CUDA tensors too where a GPU is present).
"""

from __future__ import annotations

import functools
import itertools
import math
import threading
import warnings

import pytest
import torch

import bridge
from bridge import DoubleBackwardError, jax2torch
from gateloop_hybrid import routing
from gateloop_hybrid.ops import bridged as bridged_ops
from gateloop_hybrid.scan import gate_loop_scan
import jax.numpy as jnp

import hostile_tally

pytestmark = pytest.mark.hostile

QUICK = False      # fewer combinations (for a quick look while editing)
CLEAR_TYPES = (TypeError, ValueError, NotImplementedError, RuntimeError, ImportError)
UNCLEAR_TYPES = (AttributeError, KeyError, IndexError, AssertionError, StopIteration, NameError)
BACKENDS = ["loop", "torch", "heinsen", "jax"]
TOL = {torch.float64: 1e-10, torch.complex128: 1e-10, torch.float32: 2e-5, torch.complex64: 2e-5,
       torch.float16: 2e-2, torch.bfloat16: 2e-2}


class SilentWrong(Exception):
    """Raised by a check when a result is wrong."""


class Documented(Exception):
    """Raised by a check when a result is wrong in a way the code's documentation states."""


def attempt(kind: str, label: str, fn, expect_error: tuple | None = None, error_type=CLEAR_TYPES):
    """Run one attempt. ``fn`` returns None when its own checks passed (it raises SilentWrong
    otherwise). ``expect_error``: substrings the error message must all contain; the attempt
    then must raise."""
    detail = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fn()
    except SilentWrong as e:
        outcome, detail = "silent wrong", str(e)
    except Documented as e:
        outcome, detail = "documented", str(e)
    except Exception as e:     # noqa: BLE001 (classifying every failure is the point)
        msg = f"{type(e).__name__}: {e}"
        if isinstance(e, UNCLEAR_TYPES) or not isinstance(e, error_type):
            outcome, detail = "unclear", msg[:400]
        elif expect_error is None:
            outcome, detail = "unclear", "unexpected error: " + msg[:400]
        elif all(s.lower() in str(e).lower() for s in expect_error):
            outcome = "refused clearly"
        else:
            outcome, detail = "unclear", f"message lacks {expect_error}: {msg[:400]}"
    else:
        if expect_error is not None:
            outcome, detail = "silent wrong", f"no error, expected one mentioning {expect_error}"
        else:
            outcome = "right"
    hostile_tally.record(f"{kind}: {label}", outcome, detail or "")


# ---- references and checks --------------------------------------------------------------------


def up(t):
    if t is None:
        return None
    return t.detach().to(torch.complex128 if t.is_complex() else torch.float64)


def loop_ref(a, x, h0=None, reverse=False):
    """float64 sequential reference on the promoted inputs, written out here (no package code)."""
    a, x, h0 = up(a), up(x), up(h0)
    cplx = a.is_complex() or x.is_complex() or (h0 is not None and h0.is_complex())
    dt = torch.complex128 if cplx else torch.float64
    a, x = a.to(dt).expand_as(x), x.to(dt)
    h = torch.zeros_like(x[:, 0]) if h0 is None else h0.to(dt)
    out = torch.empty_like(x)
    steps = range(x.shape[1] - 1, -1, -1) if reverse else range(x.shape[1])
    for t in steps:
        h = a[:, t] * h + x[:, t]
        out[:, t] = h
    return out, h


def close(got, want, tol, what):
    got, want = up(got), up(want)
    if got.shape != want.shape:
        raise SilentWrong(f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}")
    fin_g, fin_w = torch.isfinite(got), torch.isfinite(want)
    if not torch.equal(fin_g, fin_w):
        raise SilentWrong(f"{what}: finite pattern differs")
    if fin_w.any():
        err = ((got - want)[fin_w].abs().norm() / want[fin_w].abs().norm().clamp_min(1.0)).item()
        if not err <= tol:
            raise SilentWrong(f"{what}: rel err {err:.2e} > {tol:.0e}")


def check_scan(backend, a, x, h0=None, reverse=False, tol=None):
    h, h_last = gate_loop_scan(a, x, h0, reverse=reverse, backend=backend)
    want_dtype = torch.promote_types(torch.promote_types(a.dtype, x.dtype), h0.dtype if h0 is not None else a.dtype)
    if h.dtype != want_dtype or h_last.dtype != want_dtype:
        raise SilentWrong(f"dtype {h.dtype} != {want_dtype}")
    if h_last.untyped_storage().data_ptr() == h.untyped_storage().data_ptr() and h.numel():
        raise SilentWrong("h_last shares memory with h")
    rh, rlast = loop_ref(a, x, h0, reverse)
    tol = tol or TOL[want_dtype] * (50 if backend == "heinsen" else 1)
    close(h, rh, tol, "h")
    close(h_last, rlast, tol, "h_last")


def rand_inputs(shape, *, complex_=False, dtype=torch.float64, a_shape=None, h0=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    a_shape = a_shape or shape
    mag = torch.sigmoid(torch.randn(a_shape, generator=g, dtype=torch.float64) + 2)
    if complex_:
        a = torch.polar(mag, torch.randn(a_shape, generator=g, dtype=torch.float64))
        x = torch.randn(shape, generator=g, dtype=torch.complex128)
    else:
        a, x = mag, torch.randn(shape, generator=g, dtype=torch.float64)
    hz = torch.randn((shape[0], *shape[2:]), generator=g, dtype=x.dtype) if h0 else None
    cast = lambda t: None if t is None else t.to(
        {torch.float64: torch.complex128, torch.float32: torch.complex64}.get(dtype, torch.complex64)
        if t.is_complex() else dtype)
    return cast(a), cast(x), cast(hz)


# ---- attacks ------------------------------------------------------------------------------------


def attack_shapes():
    good = [((1, 1, 1), None), ((2, 1, 3), None), ((2, 2, 3), None), ((3, 7, 5), None),
            ((2, 64, 4), None), ((1, 257, 2), None), ((2, 5, 3, 4), (2, 5, 1, 1)),
            ((2, 5, 3, 4), (2, 5, 3, 1)), ((2, 5, 3, 4), (2, 5, 1, 4)), ((2, 6, 2, 2, 2, 2), None),
            ((2, 5), None), ((0, 5, 3), None), ((2, 5, 0), None), ((1, 1000, 1), None)]
    for (shape, a_shape), backend, h0, rev in itertools.product(good, BACKENDS, (False, True), (False, True)):
        if QUICK and (h0 != rev):
            continue
        a, x, hz = rand_inputs(shape, a_shape=a_shape, h0=h0)
        attempt("shapes", f"{backend} x{shape} a{a_shape} h0={h0} rev={rev}",
                lambda: check_scan(backend, a, x, hz, rev))
    # strided layouts: transposed, stepped, expanded (stride 0) gates
    for backend in BACKENDS:
        a, x, _ = rand_inputs((3, 8, 4))
        attempt("shapes", f"{backend} transposed x", lambda: check_scan(
            backend, a.transpose(0, 2).contiguous().transpose(0, 2), x.transpose(0, 2).contiguous().transpose(0, 2)))
        attempt("shapes", f"{backend} stepped slices", lambda: check_scan(backend, a[:, ::2], x[:, ::2]))
        attempt("shapes", f"{backend} expanded gate", lambda: check_scan(backend, a[:, :, :1].expand(3, 8, 4), x))
        attempt("shapes", f"{backend} conj/neg views", lambda: check_scan(
            backend, rand_inputs((2, 5, 3), complex_=True)[0].conj(), -rand_inputs((2, 5, 3), complex_=True)[1]))
    bad = [
        ("time lengths differ", (2, 4, 3), (2, 5, 3), None, ("time lengths", "a has 4")),
        ("batch differs", (3, 5, 3), (2, 5, 3), None, ("batch sizes differ",)),
        ("a rank lower", (2, 5), (2, 5, 3), None, ("same number of dims",)),
        ("a rank higher", (2, 5, 3, 1), (2, 5, 3), None, ("same number of dims",)),
        ("features do not broadcast", (2, 5, 2), (2, 5, 3), None, ("do not broadcast",)),
        ("a broadcast larger", (2, 5, 6), (2, 5, 3), None, ("do not broadcast",)),
        ("x 1-d", (5,), (5,), None, ("x must be (batch, time",)),
        ("x 0-d", (), (), None, ("x must be (batch, time",)),
        ("no time steps", (2, 0, 3), (2, 0, 3), None, ("no time steps",)),
        ("h0 wrong shape", (2, 5, 3), (2, 5, 3), (2, 4), ("h0 must have shape",)),
        ("h0 with time dim", (2, 5, 3), (2, 5, 3), (2, 1, 3), ("h0 must have shape",)),
        ("h0 broadcastable only", (2, 5, 3), (2, 5, 3), (1, 3), ("h0 must have shape",)),
        ("a time broadcast", (2, 1, 3), (2, 5, 3), None, ("time lengths",)),
    ]
    for (label, a_shape, x_shape, h_shape, expect), backend in itertools.product(bad, BACKENDS):
        a, x = torch.rand(a_shape, dtype=torch.float64), torch.randn(x_shape, dtype=torch.float64)
        hz = None if h_shape is None else torch.randn(h_shape, dtype=torch.float64)
        attempt("shapes", f"{backend} {label}", lambda: gate_loop_scan(a, x, hz, backend=backend),
                expect_error=("gate_loop_scan", *expect))


def attack_dtypes():
    floats = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128]
    for da, dx, backend in itertools.product(floats, floats, BACKENDS):
        if QUICK and da != dx and backend != "jax":
            continue
        g = torch.Generator().manual_seed(1)
        a = (torch.rand(2, 9, 3, generator=g, dtype=torch.float64) * 0.5 + 0.4).to(da)
        x = torch.randn(2, 9, 3, generator=g, dtype=torch.float64).to(dx)
        out = torch.promote_types(da, dx)
        tol = {torch.float16: 3e-3, torch.bfloat16: 2e-2}.get(out, TOL[out] * (50 if backend == "heinsen" else 1))
        attempt("dtypes", f"{backend} a {da} x {dx}", lambda: check_scan(backend, a, x, tol=tol))
    for dh, backend in itertools.product(floats, BACKENDS):
        a, x = torch.rand(2, 6, 3, dtype=torch.float32) * 0.9, torch.randn(2, 6, 3, dtype=torch.float32)
        hz = torch.randn(2, 3, dtype=torch.float64).to(dh)
        out = torch.promote_types(torch.float32, dh)
        attempt("dtypes", f"{backend} h0 {dh}", lambda: check_scan(
            backend, a, x, hz, tol={torch.float16: 3e-3, torch.bfloat16: 2e-2}.get(out, 1e-4)))
    bad = [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex32,
           torch.float8_e4m3fn, torch.float8_e5m2]
    for dt, which, backend in itertools.product(bad, ("a", "x", "h0"), BACKENDS):
        if QUICK and backend not in ("jax", "loop"):
            continue
        t = {"a": torch.rand(2, 5, 3), "x": torch.randn(2, 5, 3), "h0": torch.randn(2, 3)}
        t[which] = torch.ones_like(t[which]).to(dt)
        attempt("dtypes", f"{backend} {which} {dt}", lambda: gate_loop_scan(t["a"], t["x"], t["h0"], backend=backend),
                expect_error=("gate_loop_scan", f"{which} has dtype"))
    for obj, which in [([1.0, 2.0], "x"), (3.0, "a"), (None, "a"), ("str", "x")]:
        args = {"a": torch.rand(2, 5, 3), "x": torch.randn(2, 5, 3)}
        args[which] = obj
        attempt("dtypes", f"{which} is {type(obj).__name__}", lambda: gate_loop_scan(args["a"], args["x"]),
                expect_error=("gate_loop_scan", f"{which} must be a torch.Tensor"))


def attack_devices_and_layouts():
    a, x = torch.rand(2, 5, 3), torch.randn(2, 5, 3)
    for backend in [*BACKENDS, "auto"]:
        attempt("devices", f"{backend} meta x", lambda: gate_loop_scan(a, x.to("meta"), backend=backend),
                expect_error=("gate_loop_scan", "one device", "meta"))
        attempt("devices", f"{backend} meta h0", lambda: gate_loop_scan(a, x, torch.zeros(2, 3, device="meta"), backend=backend),
                expect_error=("gate_loop_scan", "one device", "h0 on meta"))
        attempt("layouts", f"{backend} sparse a", lambda: gate_loop_scan(a.to_sparse(), x, backend=backend),
                expect_error=("gate_loop_scan", "a must be a dense", "sparse"))
        attempt("layouts", f"{backend} sparse x", lambda: gate_loop_scan(a, x.to_sparse(), backend=backend),
                expect_error=("gate_loop_scan", "x must be a dense", "sparse"))
        attempt("layouts", f"{backend} nested x", lambda: gate_loop_scan(a, torch.nested.nested_tensor(list(x)), backend=backend),
                expect_error=("gate_loop_scan", "nested"))
        attempt("layouts", f"{backend} jagged nested x", lambda: gate_loop_scan(
            a, torch.nested.nested_tensor(list(x), layout=torch.jagged), backend=backend),
            expect_error=("gate_loop_scan", "nested"))
    for backend in ["pallas", "cuda", "JAX", "", None, 3]:
        attempt("devices", f"backend={backend!r} on cpu", lambda: gate_loop_scan(a, x, backend=backend),
                expect_error=("gate_loop_scan",), error_type=(ValueError, TypeError))
    f = jax2torch(lambda p, q: p * q, name="mul")
    for label, args, expect in [
        ("sparse", (torch.ones(3).to_sparse(), torch.ones(3)), ("mul", "args[0]", "sparse")),
        ("csr", (torch.eye(3).to_sparse_csr(), torch.eye(3)), ("mul", "args[0]", "sparse_csr")),
        ("nested", (torch.ones(3), torch.nested.nested_tensor([torch.ones(3), torch.ones(2)])), ("mul", "args[1]", "nested")),
        ("meta", (torch.ones(3), torch.ones(3, device="meta")), ("mul", "args[1]", "meta")),
        ("complex32", (torch.ones(3, dtype=torch.complex32), torch.ones(3)), ("mul", "args[0]", "complex32")),
        ("float8", (torch.ones(3), torch.ones(3).to(torch.float8_e5m2)), ("mul", "args[1]", "float8")),
    ]:
        attempt("layouts", f"bridge {label}", lambda: f(*args), expect_error=expect)
        f(torch.ones(3), torch.ones(3))      # then the fast path (a known spec) must check as well
        attempt("layouts", f"bridge fast path {label}", lambda: f(*args), expect_error=expect)
    if torch.cuda.is_available():
        for backend in BACKENDS:
            attempt("devices", f"{backend} cuda x cpu a", lambda: gate_loop_scan(a, x.cuda(), backend=backend),
                    expect_error=("gate_loop_scan", "one device"))
            attempt("devices", f"{backend} cuda", lambda: check_scan(backend, a.cuda().double(), x.cuda().double()))


def attack_values():
    specials = {"inf gate": ("a", math.inf), "-inf gate": ("a", -math.inf), "nan gate": ("a", math.nan),
                "inf x": ("x", math.inf), "nan x": ("x", math.nan), "zero gate": ("a", 0.0),
                "negative gate": ("a", -0.7), "gate 1": ("a", 1.0), "gate 10": ("a", 10.0),
                "huge x": ("x", 1e300), "tiny x": ("x", 1e-300), "zero x": ("x", 0.0)}
    for (label, (which, value)), backend, dtype in itertools.product(specials.items(), BACKENDS,
                                                                      (torch.float64, torch.float32)):
        a, x, _ = rand_inputs((2, 6, 3), dtype=dtype)
        t = {"a": a, "x": x}
        t[which] = t[which].clone()
        t[which][0, 2, 1] = torch.tensor(value, dtype=torch.float64).to(dtype)   # 1e300 -> inf in float32

        def run(backend=backend, t=t, label=label, dtype=dtype):
            h, h_last = gate_loop_scan(t["a"], t["x"], backend=backend)
            rh, _ = loop_ref(t["a"], t["x"])
            rh = rh.to(dtype)    # the reference rounded to the dtype (1e300 overflows float32)
            if backend == "heinsen" and not torch.isfinite(rh).all():
                # documented: non-finite inputs give NaN where the loop gives +-inf
                if not torch.equal(torch.isfinite(h), torch.isfinite(rh)):
                    raise SilentWrong("heinsen: non-finite pattern differs from the loop")
                return
            if backend == "heinsen" and label in ("zero gate", "zero x", "tiny x", "huge x"):
                # documented: exact zero gates give NaN; log-space loses tiny values
                if label == "zero gate" and not torch.isnan(h[0, 2:, 1]).all():
                    raise SilentWrong("heinsen zero gate: expected the documented NaN")
                if label != "zero gate":
                    try:
                        close(h, rh, 1e-6, "h")
                    except SilentWrong as e:
                        if torch.isnan(h[0, 2:, 1]).all() and torch.isfinite(h[0, :2]).all():
                            raise Documented("heinsen: NaN after an input near the floating range's "
                                             f"edge (torch's complex logcumsumexp) ({e})") from None
                        raise
                return
            close(h, rh, 1e-9 if dtype == torch.float64 else 1e-4, "h")
        attempt("values", f"{backend} {dtype} {label}", run)


def attack_gradients():
    def grads(backend, a, x, h0, reverse, create_graph=False):
        leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (a, x, h0)]
        if backend == "pallas":     # the Triton-lowered kernels in interpret mode, through the bridge
            h, h_last = bridged_ops.scan("triton", *leaves, reverse)
        else:
            h, h_last = gate_loop_scan(*leaves, reverse=reverse, backend=backend)
        g = torch.Generator().manual_seed(3)
        ct = torch.randn(h.shape, generator=g, dtype=h.dtype)
        loss = (h * ct.conj()).real.sum() + h_last.abs().pow(2).sum()
        wanted = [t for t in leaves if t is not None]
        gs = torch.autograd.grad(loss, wanted, create_graph=create_graph, materialize_grads=True)
        if not create_graph:
            return gs
        if any(gg.grad_fn is None for gg in gs):
            raise SilentWrong("create_graph=True gave a gradient without grad_fn")
        penalty = sum(gg.abs().pow(2).sum() for gg in gs)
        return torch.autograd.grad(penalty + h.real.sum(), wanted, materialize_grads=True)

    configs = list(itertools.product([1, 2, 5, 17], [False, True], [False, True], [False, True]))
    for (n, cplx, h0, rev), backend in itertools.product(configs, BACKENDS[1:]):
        if QUICK and n == 17:
            continue
        a, x, hz = rand_inputs((2, n, 3), complex_=cplx, h0=h0, seed=n)
        tol = 1e-8 if backend == "heinsen" else 1e-11

        def first(backend=backend, a=a, x=x, hz=hz, rev=rev, tol=tol):
            for g, r in zip(grads(backend, a, x, hz, rev), grads("loop", a, x, hz, rev)):
                close(g, r, tol, "grad")

        def second(backend=backend, a=a, x=x, hz=hz, rev=rev, tol=tol):
            for g, r in zip(grads(backend, a, x, hz, rev, True), grads("loop", a, x, hz, rev, True)):
                close(g, r, tol, "grad of grad")
        attempt("gradients", f"{backend} n={n} cplx={cplx} h0={h0} rev={rev} first order", first)
        attempt("gradients", f"{backend} n={n} cplx={cplx} h0={h0} rev={rev} second order", second)
    # the reproducer
    for backend in BACKENDS[1:]:
        def repro(backend=backend):
            res = []
            for b in (backend, "loop"):
                torch.manual_seed(0)
                a = torch.rand(2, 7, 3, dtype=torch.float64).requires_grad_()
                x = torch.randn(2, 7, 3, dtype=torch.float64).requires_grad_()
                h, _ = gate_loop_scan(a, x, backend=b)
                ga, = torch.autograd.grad(h.pow(2).sum(), a, create_graph=True)
                (h.sum() + ga.pow(2).sum()).backward()
                res.append(x.grad)
            close(res[0], res[1], 1e-9, "x.grad")
        attempt("gradients", f"{backend} gradient penalty reproducer", repro)
    for cplx, h0_real in [(False, False), (True, False), (True, True)]:
        def ggc(cplx=cplx, h0_real=h0_real):
            a, x, hz = rand_inputs((1, 4, 2), complex_=cplx, h0=True)
            if h0_real:
                hz = hz.real.contiguous()
            f = lambda a, x, h: gate_loop_scan(a, x, h, backend="jax")
            if not torch.autograd.gradgradcheck(f, [t.requires_grad_() for t in (a, x, hz)], raise_exception=False):
                raise SilentWrong("gradgradcheck failed")
        attempt("gradients", f"jax gradgradcheck cplx={cplx} real h0={h0_real}", ggc)
    # pallas (interpret mode): first order right, second order refused by name
    import gateloop_hybrid.kernels.pallas_scan as pallas_scan
    orig_ri = pallas_scan.scan_pallas_ri
    pallas_scan.scan_pallas_ri = functools.partial(orig_ri, interpret=True)
    bridged_ops.cache_clear()
    try:
        for cplx in (False, True):
            a, x, hz = rand_inputs((2, 5, 3), complex_=cplx, dtype=torch.float32, h0=True)
            attempt("gradients", f"pallas (interpret) cplx={cplx} first order", lambda: [
                close(g, r, 1e-4, "grad") for g, r in zip(grads("pallas", a, x, hz, False), grads("loop", a, x, hz, False))])
            attempt("gradients", f"pallas (interpret) cplx={cplx} second order",
                    lambda: grads("pallas", a, x, hz, False, True),
                    expect_error=("gate_loop_scan_pallas", "gradient of its gradient"))
    finally:
        pallas_scan.scan_pallas_ri = orig_ri
        bridged_ops.cache_clear()
    # torch's own rules still apply: backward twice without retain_graph, grad of a non-leaf
    for backend in BACKENDS[1:]:
        def twice(backend=backend):
            a = torch.rand(2, 4, 3, requires_grad=True)
            h, _ = gate_loop_scan(a, torch.randn(2, 4, 3), backend=backend)
            s = h.sum()
            s.backward()
            s.backward()
        attempt("gradients", f"{backend} backward twice", twice, expect_error=("backward through the graph a second time",))


def attack_compile():
    def cold(backend, reverse, h0, cplx):
        for memo in (bridged_ops, routing.jax_has_device, routing.jax_available, routing._route):
            memo.cache_clear()
        torch._dynamo.reset()
        a, x, hz = rand_inputs((2, 6, 3), complex_=cplx, h0=h0)
        leaves = [t.requires_grad_() for t in (a, x, hz) if t is not None]

        def f(*ts):
            h, last = gate_loop_scan(*ts, reverse=reverse, backend=backend)
            return (h.abs() ** 2).sum() + last.real.sum()
        got = torch.compile(f, fullgraph=True, backend="aot_eager")(*leaves)
        want = f(*leaves)
        close(got, want, 1e-10, "value")
        for g, r in zip(torch.autograd.grad(got, leaves), torch.autograd.grad(want, leaves)):
            close(g, r, 1e-10, "grad")
    configs = [("auto", False, False, False), ("jax", True, True, True), ("loop", False, True, False),
               ("torch", True, False, True), ("heinsen", False, True, True), ("auto", True, True, False)]
    for cfg in configs[:3] if QUICK else configs:
        attempt("compile", f"cold fullgraph {cfg}", lambda: cold(*cfg))

    def new_reverse():
        torch._dynamo.reset()
        f = torch.compile(lambda a, x, r: gate_loop_scan(a, x, reverse=r, backend="jax")[0], fullgraph=True,
                          backend="aot_eager")
        a, x, _ = rand_inputs((2, 5, 3))
        for r in (False, True):
            close(f(a, x, r), loop_ref(a, x, None, r)[0], 1e-10, f"reverse={r}")
    attempt("compile", "new reverse= value", new_reverse)

    def transformer():
        from gateloop_hybrid.transformer import Transformer
        bridged_ops.cache_clear()
        torch._dynamo.reset()
        torch.manual_seed(0)
        m = Transformer(16, num_tokens=20, depth=1, dim_head=8, heads=2)
        ids = torch.randint(0, 20, (2, 8))
        loss = lambda ids: m(ids).logsumexp(-1).mean()
        got = torch.compile(loss, fullgraph=True, backend="aot_eager")(ids)
        got.backward()
        cg = [p.grad.clone() for p in m.parameters()]
        m.zero_grad()
        want = loss(ids)
        want.backward()
        close(got, want, 1e-5, "loss")
        for g, p in zip(cg, m.parameters()):
            close(g, p.grad, 1e-4, "param grad")
    attempt("compile", "default transformer cold (checkpointed scan)", transformer)

    def double():
        torch._dynamo.reset()
        a, x, _ = rand_inputs((2, 5, 3))
        a.requires_grad_()
        h = torch.compile(lambda a, x: gate_loop_scan(a, x, backend="jax")[0], fullgraph=True, backend="aot_eager")(a, x)
        (ga,) = torch.autograd.grad(h.pow(2).sum(), a, create_graph=True)
        ga.pow(2).sum().backward()
    attempt("compile", "double backward through compiled scan", double, expect_error=("double backward",))

    def dynamic():
        torch._dynamo.reset()
        f = torch.compile(lambda a, x: gate_loop_scan(a, x, backend="jax")[0], dynamic=True, backend="aot_eager")
        for n in (3, 5, 9):
            a, x, _ = rand_inputs((2, n, 3))
            close(f(a, x), loop_ref(a, x)[0], 1e-10, f"n={n}")
    attempt("compile", "dynamic shapes", dynamic)

    def compiled_transform(kind):
        torch._dynamo.reset()
        A, X, _ = rand_inputs((3, 2, 5, 4))
        fn = {"vmap": lambda A, X: torch.vmap(lambda a, x: gate_loop_scan(a, x, backend="jax")[0])(A, X),
              "grad": lambda A, X: torch.func.grad(lambda a: gate_loop_scan(a, X[0], backend="jax")[0].pow(2).sum())(A[0])}[kind]
        ref = {"vmap": lambda A, X: torch.vmap(lambda a, x: gate_loop_scan(a, x, backend="loop")[0])(A, X),
               "grad": lambda A, X: torch.func.grad(lambda a: gate_loop_scan(a, X[0], backend="loop")[0].pow(2).sum())(A[0])}[kind]
        close(torch.compile(fn, fullgraph=True, backend="aot_eager")(A, X), ref(A, X), 1e-10, kind)
    def inductor():
        for memo in (bridged_ops, routing.jax_has_device, routing._route):
            memo.cache_clear()
        torch._dynamo.reset()
        a, x, _ = rand_inputs((2, 5, 3), dtype=torch.float32)
        a.requires_grad_()
        got = torch.compile(lambda a, x: gate_loop_scan(a, x)[0].sin().sum(), fullgraph=True)(a, x)
        (g,) = torch.autograd.grad(got, a)
        leaf = a.detach().requires_grad_()
        (r,) = torch.autograd.grad(gate_loop_scan(leaf, x, backend="loop")[0].sin().sum(), leaf)
        close(g, r, 1e-5, "inductor grad")
    if not QUICK:
        attempt("compile", "inductor cold fullgraph (auto backend)", inductor)
    attempt("compile", "compiled torch.vmap over the jax backend", lambda: compiled_transform("vmap"))
    attempt("compile", "compiled torch.func.grad over the jax backend", lambda: compiled_transform("grad"))

    def bridge_cold():
        torch._dynamo.reset()
        f = jax2torch(lambda p, q: (jnp.sin(p) * q, jnp.cos(q)))
        p = torch.randn(4, 3, requires_grad=True)
        q = torch.randn(4, 3, requires_grad=True)
        got = torch.compile(lambda p, q: sum(o.sum() for o in f(p, q)), fullgraph=True, backend="aot_eager")(p, q)
        close(got, (torch.sin(p) * q).sum() + torch.cos(q).sum(), 1e-5, "value")
    attempt("compile", "bridge cold fullgraph", bridge_cold)


def attack_transforms():
    for backend in BACKENDS:
        for cplx in (False, True):
            A, X, _ = rand_inputs((4, 2, 6, 3), complex_=cplx)

            def vm(backend=backend, A=A, X=X):
                h = torch.vmap(lambda a, x: gate_loop_scan(a, x, backend=backend)[0])(A, X)
                close(h, torch.stack([loop_ref(A[i], X[i])[0] for i in range(4)]), 1e-9, "vmap")

            def vm_in_dims(backend=backend, A=A, X=X):
                h = torch.vmap(lambda a, x: gate_loop_scan(a, x, backend=backend)[0], in_dims=(None, 1))(A[0], X.movedim(0, 1))
                close(h, torch.stack([loop_ref(A[0], X[i])[0] for i in range(4)]), 1e-9, "vmap in_dims")

            def fgrad(backend=backend, A=A, X=X):
                loss = lambda a: gate_loop_scan(a, X[0], backend=backend)[0].abs().pow(2).sum()
                leaf = A[0].clone().requires_grad_()
                (want,) = torch.autograd.grad(gate_loop_scan(leaf, X[0], backend="loop")[0].abs().pow(2).sum(), leaf)
                close(torch.func.grad(loss)(A[0]), want, 1e-9, "func.grad")

            def vgrad(backend=backend, A=A, X=X):
                g = torch.vmap(torch.func.grad(lambda a, x: gate_loop_scan(a, x, backend=backend)[0].abs().pow(2).sum()))(A, X)
                want = torch.vmap(torch.func.grad(lambda a, x: gate_loop_scan(a, x, backend="loop")[0].abs().pow(2).sum()))(A, X)
                close(g, want, 1e-9, "vmap(grad)")

            def gvmap(backend=backend, A=A, X=X):
                g = torch.func.grad(lambda a: torch.vmap(lambda a, x: gate_loop_scan(a, x, backend=backend)[0])(a, X).abs().pow(2).sum())(A)
                want = torch.func.grad(lambda a: torch.vmap(lambda a, x: gate_loop_scan(a, x, backend="loop")[0])(a, X).abs().pow(2).sum())(A)
                close(g, want, 1e-9, "grad(vmap)")

            def jacrev(backend=backend, A=A, X=X):
                j = torch.func.jacrev(lambda a: gate_loop_scan(a, X[0], backend=backend)[1])(A[0])
                close(j, torch.func.jacrev(lambda a: gate_loop_scan(a, X[0], backend="loop")[1])(A[0]), 1e-9, "jacrev")

            def hess_rev(backend=backend, A=A, X=X):
                f = lambda b: lambda a: gate_loop_scan(a[None], X[0, :1], backend=b)[1].abs().pow(2).sum()
                hr = torch.func.jacrev(torch.func.jacrev(f(backend)))(A[0, 0])
                close(hr, torch.func.jacrev(torch.func.jacrev(f("loop")))(A[0, 0]), 1e-8, "jacrev(jacrev)")

            def jacfwd(backend=backend, A=A, X=X):
                j = torch.func.jacfwd(lambda x: gate_loop_scan(A[0], x, backend=backend)[1])(X[0])
                close(j, torch.func.jacrev(lambda x: gate_loop_scan(A[0], x, backend="loop")[1])(X[0]), 1e-9, "jacfwd")
            tag = f"{backend} cplx={cplx}"
            attempt("transforms", f"{tag} vmap", vm)
            attempt("transforms", f"{tag} vmap in_dims", vm_in_dims)
            attempt("transforms", f"{tag} func.grad", fgrad)
            attempt("transforms", f"{tag} vmap(grad)", vgrad)
            attempt("transforms", f"{tag} grad(vmap)", gvmap)
            if cplx:
                continue        # torch.func's jacobians take real inputs only
            attempt("transforms", f"{tag} jacrev", jacrev)
            attempt("transforms", f"{tag} jacrev(jacrev)", hess_rev)
            if backend == "jax":
                attempt("transforms", f"{tag} jacfwd", jacfwd, expect_error=("gate_loop_scan_jax", "forward-mode"))
            else:
                attempt("transforms", f"{tag} jacfwd", jacfwd)

    def dual():
        import torch.autograd.forward_ad as fwAD
        a, x, _ = rand_inputs((2, 5, 3))
        with fwAD.dual_level():
            gate_loop_scan(a, fwAD.make_dual(x, torch.ones_like(x)), backend="jax")
    attempt("transforms", "forward_ad dual tensor", dual, expect_error=("gate_loop_scan_jax", "forward-mode"))


def attack_threads():
    def run_threads(backend, n_threads, per_thread):
        errors, wrong = [], []

        def work(seed):
            try:
                for i in range(per_thread):
                    n = (seed + i) % 6 + 1
                    a, x, hz = rand_inputs((2, n, 3), complex_=bool(i % 2), h0=bool(seed % 2), seed=seed * 31 + i)
                    leaf = a.clone().requires_grad_()
                    h, last = gate_loop_scan(leaf, x, hz, backend=backend)
                    (g,) = torch.autograd.grad(h.abs().pow(2).sum(), leaf)
                    rh, _ = loop_ref(a, x, hz)
                    l2 = a.clone().requires_grad_()
                    (rg,) = torch.autograd.grad(gate_loop_scan(l2, x, hz, backend="loop")[0].abs().pow(2).sum(), l2)
                    try:
                        close(h, rh, 1e-9, "h")
                        close(g, rg, 1e-9, "grad")
                    except SilentWrong as e:
                        wrong.append(str(e))
            except Exception as e:   # noqa: BLE001
                errors.append(e)
        threads = [threading.Thread(target=work, args=(s,)) for s in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if wrong:
            raise SilentWrong(f"{len(wrong)} wrong results: {wrong[0]}")
        if errors:
            raise errors[0]
    for backend, n_threads in itertools.product(BACKENDS[1:], (2, 4, 8)):
        bridged_ops.cache_clear()          # first calls race too
        attempt("threads", f"{backend} {n_threads} threads", lambda: run_threads(backend, n_threads, 4))

    def bridge_threads():
        f = jax2torch(lambda p: jnp.tanh(p) * 2)
        out = [None] * 16

        def work(i):
            t = torch.randn(i % 4 + 1, 3, dtype=torch.float64)
            out[i] = (t, f(t))
        ts = [threading.Thread(target=work, args=(i,)) for i in range(16)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        for t, o in out:
            close(o, torch.tanh(t) * 2, 1e-12, "tanh")
    attempt("threads", "bridge 16 threads first calls", bridge_threads)


def attack_bridge():
    def failing_then_fixed(err):
        calls = []

        def fn(p):
            calls.append(1)
            if len(calls) == 1:
                raise err("trace failure")
            return p * 3
        f = jax2torch(fn)
        p = torch.ones(3, requires_grad=True)
        try:
            f(p)
        except err:
            pass
        close(f(p), 3 * p, 1e-12, "after a failed trace")
        f(p).sum().backward()
        close(p.grad, torch.full((3,), 3.0), 1e-12, "grad after a failed trace")
    for err in (NameError, TypeError, ValueError, ZeroDivisionError, RuntimeError):
        attempt("bridge", f"recovers after {err.__name__} while tracing", lambda: failing_then_fixed(err))

    f_int = jax2torch(lambda p: 3, name="returns_int")
    attempt("bridge", "non-array output", lambda: f_int(torch.ones(2)), expect_error=("returns_int", "output leaf 0"))
    f_st = jax2torch(lambda p, s: p * len(s), name="statics")
    attempt("bridge", "unhashable static", lambda: f_st(torch.ones(2), {1, 2}), expect_error=("statics", "not hashable"))

    def identity_statics():
        class Tag:
            pass
        f = jax2torch(lambda p, tag: p + 1, name="tagged")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(bridge.function.MAX_STATIC_VALUES + 5):
                close(f(torch.ones(2), Tag()), torch.full((2,), 2.0), 0, "value")
        if len(f._specs) > bridge.function.MAX_STATIC_VALUES:
            raise SilentWrong(f"cache grew to {len(f._specs)}")
        if sum("different static" in str(w.message) for w in caught) != 1:
            raise SilentWrong("expected exactly one warning")
    attempt("bridge", "identity-hashed statics bounded, one warning", identity_statics)

    def nan_statics():
        f = jax2torch(lambda p, s: p * 0 + 1, name="nanstatic")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(5):
                f(torch.ones(2), float("nan"))
        if sum("not equal to itself" in str(w.message) for w in caught) != 1:
            raise SilentWrong("expected one NaN warning")
    attempt("bridge", "NaN static warns once", nan_statics)

    def many_shapes():
        f = jax2torch(lambda p: p * 2)
        for n in range(1, bridge.function.MAX_SIGNATURES + 10):
            close(f(torch.ones(n)), torch.full((n,), 2.0), 0, f"n={n}")
        spec = next(iter(f._specs.values()))
        if len(spec.signatures) > bridge.function.MAX_SIGNATURES:
            raise SilentWrong("signature cache unbounded")
        close(f(torch.ones(1)), torch.full((1,), 2.0), 0, "evicted shape")
    attempt("bridge", "many shapes bounded, evicted shape recomputed", many_shapes)

    def aliasing():
        f = jax2torch(lambda p: (p, p, p * 2))
        p = torch.randn(4)
        a, b, c = f(p)
        a.add_(1)
        close(b, p, 0, "second output changed by an in-place edit of the first")
        close(p, b, 0, "input changed")
    attempt("bridge", "outputs never alias inputs", aliasing)

    def in_place_after_forward():
        f = jax2torch(lambda p: p * p)
        p = torch.randn(3, requires_grad=True)
        leaf = p.clone()
        y = f(leaf)
        with torch.no_grad():
            leaf.mul_(10)
        y.sum().backward()
    attempt("bridge", "in-place edit of a saved input", in_place_after_forward, expect_error=("inplace operation",))

    def in_place_output():
        f = jax2torch(jnp.exp)
        p = torch.randn(3, requires_grad=True)
        y = f(p)
        with torch.no_grad():
            y.add_(1)
        y.sum().backward()
    attempt("bridge", "in-place edit of a saved output", in_place_output, expect_error=("inplace operation",))

    for shape in [(0,), (0, 3), (3, 0), (), (1,), (1, 1, 1, 1, 1, 1, 1)]:
        def zero_size(shape=shape):
            f = jax2torch(lambda p: jnp.sin(p) * 2)
            p = torch.randn(shape, dtype=torch.float64, requires_grad=True)
            close(f(p), torch.sin(p) * 2, 1e-12, "value")
            f(p).sum().backward()
            close(p.grad, 2 * torch.cos(p.detach()), 1e-12, "grad")
        attempt("bridge", f"shape {shape}", zero_size)

    for dt in [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128,
               torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool]:
        def round_trip(dt=dt):
            f = jax2torch(lambda p: p)
            t = (torch.randn(9) * 50).to(dt) if dt != torch.int64 else torch.tensor([2 ** 40 + 1, -3])
            out = f(t)
            if out.dtype != dt or not torch.equal(out, t):
                raise SilentWrong(f"{dt} round trip changed the values or dtype ({out.dtype})")
        attempt("bridge", f"round trip {dt}", round_trip)

    def int_requires_grad():
        f = jax2torch(lambda p, i: p * i, name="mixed")
        p = torch.randn(3, dtype=torch.float64, requires_grad=True)
        i = torch.arange(3)
        f(p, i).sum().backward()
        close(p.grad, i.double(), 0, "grad")
    attempt("bridge", "float times int tensor", int_requires_grad)

    def int_output_grad():
        f = jax2torch(lambda p: (p * 2, jnp.argmax(p)))
        p = torch.randn(4, requires_grad=True)
        y, k = f(p)
        if k.requires_grad:
            raise SilentWrong("integer output requires grad")
        y.sum().backward()
        close(p.grad, torch.full((4,), 2.0), 0, "grad")
    attempt("bridge", "integer output is not differentiable", int_output_grad)

    def subclass():
        class Tagged(torch.Tensor):
            pass
        f = jax2torch(lambda p: p * 2)
        t = torch.randn(3).as_subclass(Tagged)
        close(f(t), t.as_subclass(torch.Tensor) * 2, 0, "subclass")
        prm = torch.nn.Parameter(torch.randn(3))
        close(f(prm), prm.detach() * 2, 0, "parameter")
    attempt("bridge", "tensor subclass and Parameter", subclass)

    def inference_mode():
        f = jax2torch(lambda p: p * 2)
        with torch.inference_mode():
            t = torch.randn(3)
            close(f(t), t * 2, 0, "inference mode")
        close(f(t), t * 2, 0, "inference tensor outside")
    attempt("bridge", "inference mode tensors", inference_mode)

    for kind in ("holomorphic", "non-holomorphic", "real-to-complex", "complex-to-real"):
        def cgrad(kind=kind):
            jf, tf, di, do = {
                "holomorphic": (lambda z: jnp.exp(z) * z, lambda z: torch.exp(z) * z, torch.complex128, None),
                "non-holomorphic": (lambda z: jnp.abs(z) ** 2 * jnp.conj(z), lambda z: z.abs() ** 2 * z.conj(), torch.complex128, None),
                "real-to-complex": (lambda r: jnp.exp(1j * r), lambda r: torch.exp(1j * r), torch.float64, None),
                "complex-to-real": (lambda z: jnp.real(z) * jnp.imag(z), lambda z: z.real * z.imag, torch.complex128, None),
            }[kind]
            f = jax2torch(jf)
            z = torch.randn(5, dtype=di, requires_grad=True)
            out = f(z)
            ct = torch.randn(out.shape, dtype=out.dtype)
            (g,) = torch.autograd.grad(out, z, ct, create_graph=True)
            z2 = z.detach().requires_grad_()
            (r,) = torch.autograd.grad(tf(z2), z2, ct, create_graph=True)
            close(g, r, 1e-12, "grad")
            (gg,) = torch.autograd.grad(g.abs().pow(2).sum(), z)
            (rr,) = torch.autograd.grad(r.abs().pow(2).sum(), z2)
            close(gg, rr, 1e-10, "grad of grad")
        attempt("bridge", f"complex {kind} first and second order", cgrad)

    def declared():
        f = jax2torch(lambda p: jnp.sin(p), name="kern", double_backward=False)
        p = torch.randn(3, requires_grad=True)
        torch.autograd.grad(f(p).sum(), p, create_graph=True)
    attempt("bridge", "double_backward=False refuses", declared, expect_error=("kern", "gradient of its gradient"))

    def third_order():
        f = jax2torch(lambda p: jnp.sin(p) ** 2)
        p = torch.randn(4, dtype=torch.float64, requires_grad=True)
        g1, = torch.autograd.grad(f(p).sum(), p, create_graph=True)
        g2, = torch.autograd.grad(g1.sum(), p, create_graph=True)
        g3, = torch.autograd.grad(g2.sum(), p)
        close(g3, -4 * torch.sin(2 * p.detach()), 1e-10, "third derivative")
    attempt("bridge", "third order", third_order)

    def retain_graph_twice():
        f = jax2torch(lambda p: jnp.sin(p))
        p = torch.randn(3, dtype=torch.float64, requires_grad=True)
        y = f(p).sum()
        g1, = torch.autograd.grad(y, p, retain_graph=True)
        g2, = torch.autograd.grad(y, p)
        close(g1, g2, 0, "retain_graph")
    attempt("bridge", "backward twice with retain_graph", retain_graph_twice)

    def to_jax_bad():
        bridge.to_jax(torch.ones(2).to_sparse(), name="weights")
    attempt("bridge", "to_jax sparse", to_jax_bad, expect_error=("weights", "sparse"))
    attempt("bridge", "to_jax non-tensor", lambda: bridge.to_jax([1.0]), expect_error=("must be a torch.Tensor",))
    attempt("bridge", "to_torch non-array", lambda: bridge.to_torch(torch.ones(2)), expect_error=("jax.Array",))


ATTACKS = [attack_shapes, attack_dtypes, attack_devices_and_layouts, attack_values, attack_gradients,
           attack_compile, attack_transforms, attack_threads, attack_bridge]


@pytest.mark.parametrize("attack", ATTACKS, ids=[a.__name__[len("attack_"):] for a in ATTACKS])
def test_attack(attack, batch):
    attack()
    batch.check()
