"""Gradient parity of every gate_loop_scan backend against the float64 reference (scan/reference.py)."""

import functools
import math
import warnings

import pytest
import torch

import gateloop_hybrid
import gateloop_hybrid.routing as routing
from gateloop_hybrid.ops import bridged, selftest
from gateloop_hybrid.scan import gate_loop_scan
from gateloop_hybrid.scan.reference import scan_reference

CPU_BACKENDS = ["loop", "torch", "heinsen", "jax"]
LENGTHS = [1, 2, 3, 5, 63, 64, 1000]


def rel_err(got, want) -> float:
    got, want = got.detach().to(torch.complex128), want.detach().to(torch.complex128)
    return ((got - want).abs().norm() / want.abs().norm().clamp_min(1.0)).item()


def make_inputs(n, *, complex_, broadcast, with_h0, dtype=torch.float64, batch=2, feat=(3, 4), seed=0,
                near_one=False):
    """Random gates in the unit disk (sigmoid magnitude, uniform phase), random x and h0."""
    g = torch.Generator().manual_seed(seed * 7919 + n)
    a_shape = (batch, n, 1, 1) if broadcast else (batch, n, *feat)
    mag = torch.sigmoid(torch.randn(a_shape, generator=g, dtype=torch.float64) + 2)
    if near_one:
        mag = 1 - 1e-3 * torch.rand(a_shape, generator=g, dtype=torch.float64)
    if complex_:
        phase = (torch.rand(a_shape, generator=g, dtype=torch.float64) * 2 - 1) * math.pi
        a = torch.polar(mag, phase)
        x = torch.randn(batch, n, *feat, generator=g, dtype=torch.complex128)
    else:
        a, x = mag, torch.randn(batch, n, *feat, generator=g, dtype=torch.float64)
    h0 = torch.randn(batch, *feat, generator=g, dtype=x.dtype) if with_h0 else None
    cast = {torch.float64: None, torch.float32: torch.complex64, torch.bfloat16: torch.complex64}
    if dtype != torch.float64:
        cdt = cast[dtype]
        a = a.to(cdt if a.is_complex() else dtype)
        x = x.to(cdt if x.is_complex() else dtype)
        h0 = None if h0 is None else h0.to(x.dtype)
    return a, x, h0


def run(backend, a, x, h0, reverse, cot_h, cot_last):
    """Outputs and the gradients of <cot_h, h> + <cot_last, h_last> w.r.t. a, x, h0; backend
    "reference" is the float64 reference with its hand-written gradients."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (a, x, h0)]
    if backend == "reference":
        h, h_last = scan_reference(*leaves, reverse=reverse)
    else:
        h, h_last = gate_loop_scan(*leaves, reverse=reverse, backend=backend)
    loss = (h * cot_h.conj()).real.sum() + (h_last * cot_last.conj()).real.sum()
    wanted = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(loss, wanted, materialize_grads=True)
    return h, h_last, dict(zip(["a", "x", "h0"], grads))


CASES = [
    (n, reverse, complex_, broadcast, with_h0)
    for n in LENGTHS
    for reverse in (False, True)
    for complex_ in (False, True)
    for broadcast, with_h0 in ((False, True), (True, False))
]


@functools.lru_cache(maxsize=None)
def reference(n, reverse, complex_, broadcast, with_h0):
    a, x, h0 = make_inputs(n, complex_=complex_, broadcast=broadcast, with_h0=with_h0)
    g = torch.Generator().manual_seed(1234 + n)
    cot_h = torch.randn(x.shape, generator=g, dtype=x.dtype)
    cot_last = torch.randn(x[:, 0].shape, generator=g, dtype=x.dtype)
    return (a, x, h0, cot_h, cot_last), run("reference", a, x, h0, reverse, cot_h, cot_last)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "n{}-{}-{}-{}-{}".format(
    c[0], "rev" if c[1] else "fwd", "cplx" if c[2] else "real", "bcast" if c[3] else "full",
    "h0" if c[4] else "noh0"))
def test_float64_parity_with_loop(backend, case):
    (a, x, h0, cot_h, cot_last), (h_ref, last_ref, g_ref) = reference(*case)
    h, h_last, grads = run(backend, a, x, h0, case[1], cot_h, cot_last)
    tol = 1e-9 if backend == "heinsen" else 1e-12
    assert h.dtype == h_ref.dtype and h.shape == h_ref.shape
    assert rel_err(h, h_ref) < tol
    assert rel_err(h_last, last_ref) < tol
    assert set(grads) == set(g_ref)
    for name in g_ref:
        assert grads[name].shape == g_ref[name].shape, name
        assert grads[name].dtype == g_ref[name].dtype, name
        assert rel_err(grads[name], g_ref[name]) < tol, name


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("complex_", [False, True])
@pytest.mark.parametrize("n,near_one,tol", [(257, False, 2e-6), (4096, True, 1e-4)])
def test_float32_against_float64_loop(backend, complex_, n, near_one, tol):
    """float32/complex64 within stated tolerances, including a long run with gates near 1."""
    if backend == "heinsen":
        tol = 5e-3    # log-space cancellation; documented in torch_scan.scan_heinsen
    a64, x64, h064 = make_inputs(n, complex_=complex_, broadcast=False, with_h0=True, feat=(8,),
                                 near_one=near_one, seed=3)
    a, x, h0 = (t.to(torch.complex64 if t.is_complex() else torch.float32) for t in (a64, x64, h064))
    cot_h = torch.randn(x.shape, dtype=x.dtype)
    cot_last = torch.randn(x[:, 0].shape, dtype=x.dtype)
    # The reference sees the same (rounded) float32 inputs, computed in float64.
    up = lambda t: t.to(torch.complex128 if t.is_complex() else torch.float64)
    h_ref, last_ref, g_ref = run("reference", up(a), up(x), up(h0), False, up(cot_h), up(cot_last))
    h, h_last, grads = run(backend, a, x, h0, False, cot_h, cot_last)
    assert h.dtype == x.dtype
    assert rel_err(h, h_ref) < tol
    assert rel_err(h_last, last_ref) < tol
    for name in g_ref:
        assert rel_err(grads[name], g_ref[name]) < tol, name


@pytest.mark.parametrize("backend", ["loop", "torch", "jax"])
def test_bfloat16_accumulates_in_float32(backend):
    a, x, h0 = make_inputs(300, complex_=False, broadcast=False, with_h0=True, dtype=torch.bfloat16)
    h, h_last = gate_loop_scan(a, x, h0, backend=backend)
    assert h.dtype == torch.bfloat16 and h_last.dtype == torch.bfloat16
    h_ref, _ = gate_loop_scan(a.double(), x.double(), h0.double(), backend="loop")
    assert rel_err(h.double(), h_ref) < 1e-2      # bf16 output rounding only, not accumulation


def test_real_x_with_complex_gates_gives_complex_state():
    a, _, _ = make_inputs(9, complex_=True, broadcast=True, with_h0=False)
    x = torch.randn(2, 9, 3, 4, dtype=torch.float64, requires_grad=True)
    for backend in CPU_BACKENDS:
        h, _ = gate_loop_scan(a, x, backend=backend)
        h_ref, _ = gate_loop_scan(a, x, backend="loop")
        assert h.dtype == torch.complex128
        assert rel_err(h, h_ref) < 1e-9
        (g,) = torch.autograd.grad(h.real.sum(), x)
        (g_ref,) = torch.autograd.grad(h_ref.real.sum(), x)
        assert g.dtype == torch.float64 and rel_err(g, g_ref) < 1e-9


def test_gradcheck_jax_backend():
    a, x, h0 = make_inputs(7, complex_=True, broadcast=True, with_h0=True)
    inputs = [t.clone().requires_grad_() for t in (a, x, h0)]
    f = lambda a, x, h0: gate_loop_scan(a, x, h0, backend="jax")
    assert torch.autograd.gradcheck(f, inputs)
    fr = lambda a, x, h0: gate_loop_scan(a, x, h0, reverse=True, backend="jax")
    a, x, h0 = make_inputs(6, complex_=False, broadcast=False, with_h0=True)
    assert torch.autograd.gradcheck(fr, [t.clone().requires_grad_() for t in (a, x, h0)])


# ---- bad input ---------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    a, x = torch.rand(2, 5, 3), torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match=r"time lengths.*a has 4 steps.*x has 5"):
        gate_loop_scan(torch.rand(2, 4, 3), x)
    with pytest.raises(ValueError, match=r"h0 must have shape.*\(2, 3\).*\(2, 4\)"):
        gate_loop_scan(a, x, torch.zeros(2, 4))
    with pytest.raises(TypeError, match=r"x has dtype torch.int64"):
        gate_loop_scan(a, torch.ones(2, 5, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"do not broadcast"):
        gate_loop_scan(torch.rand(2, 5, 2), x)
    with pytest.raises(ValueError, match=r"same number of dims"):
        gate_loop_scan(torch.rand(2, 5), x)
    with pytest.raises(ValueError, match=r"one device.*meta"):
        gate_loop_scan(a, x.to("meta"))
    with pytest.raises(ValueError, match=r"unknown backend 'cuda'"):
        gate_loop_scan(a, x, backend="cuda")
    with pytest.raises(ValueError, match=r"pallas.*CUDA"):
        gate_loop_scan(a, x, backend="pallas")


def test_a_signature_seen_before_is_checked_and_routed_on_every_call(monkeypatch):
    """The checks' verdict is remembered per signature (type, layout, shape, dtype, device of each
    tensor), never lent to another signature, and the route is asked on every call."""
    a, x = torch.rand(2, 5, 3), torch.randn(2, 5, 3)
    gate_loop_scan(a, x, backend="torch")
    with pytest.raises(TypeError, match="reverse must be a bool"):
        gate_loop_scan(a, x, reverse=1, backend="torch")
    with pytest.raises(TypeError, match="dense"):
        gate_loop_scan(a, x.to_sparse(), backend="torch")
    with pytest.raises(TypeError, match="x has dtype torch.int32"):
        gate_loop_scan(a, x.int(), backend="torch")
    with pytest.raises(ValueError, match="one device"):
        gate_loop_scan(a, x.to("meta"), backend="torch")
    asked = []
    monkeypatch.setattr(routing, "route", lambda *args, **facts: asked.append(facts) or routing.Route("loop", "test"))
    h, _ = gate_loop_scan(a, x, backend="torch")
    assert asked and asked[0]["device"] == "cpu" and asked[0]["dtype"] == "float32"
    assert torch.equal(h, gate_loop_scan(a, x, backend="loop")[0])


def test_without_jax_auto_falls_back_once_and_jax_raises(monkeypatch):
    monkeypatch.setattr(routing, "jax_available", lambda: False)
    monkeypatch.setattr(routing, "jax_has_device", lambda device_type: False)
    monkeypatch.setattr(routing, "_warned", set())
    routing._route.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="uses 'torch'.*JAX is not installed"):
            assert routing.route("scan", "auto", device="cpu").path == "torch"
        routing._route.cache_clear()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert routing.route("scan", "auto", device="cpu").path == "torch"      # said once only
        with pytest.raises(ImportError, match="pip install"):
            routing.route("scan", "jax", device="cpu")
    finally:
        routing._route.cache_clear()


def test_auto_picks_jax_on_cpu_when_installed():
    assert routing.route("scan", "auto", device="cpu").path == "jax"


def test_explain_says_which_path_and_why():
    assert "'jax'" in gateloop_hybrid.explain("scan", device="cpu")
    assert "'chunked'" in gateloop_hybrid.explain("mixer", device="cpu", heads=8, width=64)
    why = gateloop_hybrid.explain("mixer", device="cpu", heads=512, width=1)
    assert "'composed'" in why and "CUDA" in why
    with pytest.raises(ValueError, match="unknown backend"):
        gateloop_hybrid.explain("scan", "cuda")


def force_path(monkeypatch, path):
    """Every route takes ``path`` (to run a GPU path's torch side on the CPU)."""
    monkeypatch.setattr(routing, "route", lambda *args, **kwargs: routing.Route(path, "forced by a test"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["jax", "torch", "heinsen"])
@pytest.mark.parametrize("n,reverse,complex_", [(1, False, True), (63, True, True), (1000, False, False),
                                                (1000, True, True)])
def test_cuda_float64_parity_with_loop(backend, n, reverse, complex_):
    """The same parity on CUDA tensors (the bridge hands them to JAX's GPU backend)."""
    (a, x, h0, cot_h, cot_last), (h_ref, last_ref, g_ref) = reference(n, reverse, complex_, False, True)
    cuda = lambda t: t.cuda()
    h, h_last, grads = run(backend, cuda(a), cuda(x), cuda(h0), reverse, cuda(cot_h), cuda(cot_last))
    tol = 1e-9 if backend == "heinsen" else 1e-12
    assert h.device.type == "cuda"
    assert rel_err(h.cpu(), h_ref) < tol and rel_err(h_last.cpu(), last_ref) < tol
    for name in g_ref:
        assert grads[name].device.type == "cuda"
        assert rel_err(grads[name].cpu(), g_ref[name]) < tol, name


@pytest.mark.parametrize("case", [(63, True, True, False, True), (5, False, False, True, False),
                                  (1000, False, True, True, True)])
def test_pallas_backend_adapter_in_interpret_mode(monkeypatch, request, case):
    """The torch side of the "pallas" backend (complex tensors as (re, im) pairs through the
    bridge, gradients back through the same views), with the kernels in Pallas interpret mode."""
    import functools
    import gateloop_hybrid.kernels.pallas_scan as pallas_scan
    # The real adapter and the bridged function (static flags bound, tensors only), kernels interpreted.
    monkeypatch.setattr(pallas_scan, "scan_pallas_ri",
                        functools.partial(pallas_scan.scan_pallas_ri, interpret=True))
    force_path(monkeypatch, "triton")
    bridged.cache_clear()
    request.addfinalizer(bridged.cache_clear)     # no interpreted kernels left behind
    (a, x, h0, cot_h, cot_last), (h_ref, last_ref, g_ref) = reference(*case)
    f32 = lambda t: None if t is None else t.to(torch.complex64 if t.is_complex() else torch.float32)
    h, h_last, grads = run("pallas", f32(a), f32(x), f32(h0), case[1], f32(cot_h), f32(cot_last))
    assert rel_err(h, h_ref) < 1e-5 and rel_err(h_last, last_ref) < 1e-5
    for name in g_ref:
        assert rel_err(grads[name], g_ref[name]) < 1e-5, name


def test_pallas_self_test_passes_in_interpret_mode():
    """The check behind "auto" choosing pallas on a GPU, run here through the interpreter."""
    import jax
    assert selftest.triton_scan(jax.devices("cpu")[0], interpret=True) is None


def test_pallas_self_test_reports_a_failure(monkeypatch):
    import jax
    import gateloop_hybrid.kernels.pallas_scan as pallas_scan

    def broken(a, x, *args, **kwargs):
        raise RuntimeError("no kernel for you")
    monkeypatch.setattr(pallas_scan, "scan_pallas", broken)
    assert "no kernel for you" in selftest.triton_scan(jax.devices("cpu")[0], interpret=True)


def test_pallas_self_test_sets_the_gpu_memory_policy_first():
    """Called before anything imported the bridge, the self-test must not let JAX start with
    its default preallocation (75% of a GPU): it imports the bridge's policy first."""
    import subprocess
    import sys
    code = ("import os, sys\n"
            "os.environ.pop('XLA_PYTHON_CLIENT_PREALLOCATE', None)\n"
            "from gateloop_hybrid.ops.selftest import triton_scan\n"
            "assert 'jax' not in sys.modules or 'bridge' in sys.modules\n"
            "import jax\n"
            "assert triton_scan(jax.devices('cpu')[0], interpret=True) is None\n"
            "print(os.environ.get('XLA_PYTHON_CLIENT_PREALLOCATE'), 'bridge' in sys.modules)\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "XLA_PYTHON_CLIENT_PREALLOCATE"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]), timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["false", "True"]


def test_torch_compile_of_the_scan_matches_eager_without_warnings():
    """gate_loop_scan inside torch.compile(fullgraph=True): same values and gradients, complex
    gates included, and no warning (torch.compile warns on every lru_cache it traces through)."""
    g = torch.Generator().manual_seed(3)
    a = torch.polar(torch.rand(2, 9, 3, generator=g, dtype=torch.float64) * 0.5 + 0.5,
                    torch.randn(2, 9, 3, generator=g, dtype=torch.float64)).requires_grad_()
    x = torch.randn(2, 9, 3, generator=g, dtype=torch.complex128).requires_grad_()

    def f(a, x):
        h, h_last = gate_loop_scan(a, x, backend="jax")
        return (h.abs() ** 2).sum() + h_last.real.sum()
    eager = f(a, x)
    ga, gx = torch.autograd.grad(eager, (a, x))
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(a, x)
        ca, cx = torch.autograd.grad(compiled, (a, x))
    assert torch.allclose(compiled, eager) and torch.allclose(ca, ga) and torch.allclose(cx, gx)
    assert not [str(w.message) for w in caught if "lru_cache" in str(w.message)]


# ---- second order, views, transforms, cold compile ----------------------------------------------


def _gradient_penalty(backend, a, x, reverse=False):
    """x.grad of h.sum() + |d(sum h^2)/da|^2: the gradient of a gradient."""
    a, x = a.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    h, _ = gate_loop_scan(a, x, reverse=reverse, backend=backend)
    (ga,) = torch.autograd.grad(h.abs().pow(2).sum(), a, create_graph=True)
    assert ga.grad_fn is not None, backend
    (h.real.sum() + ga.abs().pow(2).sum()).backward()
    return x.grad, a.grad


@pytest.mark.parametrize("backend", CPU_BACKENDS[1:])
@pytest.mark.parametrize("complex_,reverse", [(False, False), (True, True)])
def test_double_backward_matches_loop(backend, complex_, reverse):
    a, x, _ = make_inputs(7, complex_=complex_, broadcast=complex_, with_h0=False)
    gx, ga = _gradient_penalty(backend, a, x, reverse)
    rx, ra = _gradient_penalty("loop", a, x, reverse)
    tol = 1e-9 if backend == "heinsen" else 1e-12
    assert rel_err(gx, rx) < tol and rel_err(ga, ra) < tol


def test_gradgradcheck_jax_backend():
    a, x, h0 = make_inputs(5, complex_=True, broadcast=True, with_h0=True, batch=1, feat=(2, 1))
    f = lambda a, x, h0: gate_loop_scan(a, x, h0, backend="jax")
    assert torch.autograd.gradgradcheck(f, [t.clone().requires_grad_() for t in (a, x, h0)])
    # a real h0 under complex gates is cast inside JAX: the residuals are then intermediate values
    a, x, h0 = make_inputs(4, complex_=True, broadcast=True, with_h0=True, batch=1, feat=(2, 1))
    h0 = h0.real.contiguous()
    assert torch.autograd.gradgradcheck(f, [t.clone().requires_grad_() for t in (a, x, h0)])


def test_pallas_double_backward_raises_in_interpret_mode(monkeypatch, request):
    import gateloop_hybrid.kernels.pallas_scan as pallas_scan
    from bridge import DoubleBackwardError
    monkeypatch.setattr(pallas_scan, "scan_pallas_ri",
                        functools.partial(pallas_scan.scan_pallas_ri, interpret=True))
    force_path(monkeypatch, "triton")
    bridged.cache_clear()
    request.addfinalizer(bridged.cache_clear)
    a = torch.rand(2, 5, 3, requires_grad=True)
    x = torch.randn(2, 5, 3, requires_grad=True)
    h, _ = gate_loop_scan(a, x, backend="pallas")
    (ga,) = torch.autograd.grad(h.pow(2).sum(), a, retain_graph=True)    # first order works
    with pytest.raises(DoubleBackwardError, match="gate_loop_scan_pallas: a gradient of its gradient"):
        torch.autograd.grad(h.pow(2).sum(), a, create_graph=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reverse", [False, True])
def test_h_last_is_never_a_view_of_h(backend, reverse):
    a, x, h0 = make_inputs(4, complex_=False, broadcast=False, with_h0=True)
    h, h_last = gate_loop_scan(a, x, h0, reverse=reverse, backend=backend)
    assert h_last._base is None and h_last.untyped_storage().data_ptr() != h.untyped_storage().data_ptr()
    before = h.clone()
    h_last.add_(1.0)
    assert torch.equal(h, before)


def test_non_finite_gates_give_non_finite_states_in_every_backend():
    """An inf gate: +-inf from the loop, NaN from "heinsen" (documented); never a finite number."""
    a, x, _ = make_inputs(5, complex_=False, broadcast=False, with_h0=False)
    a[0, 2, 1, 1] = float("inf")
    for backend in CPU_BACKENDS:
        h, _ = gate_loop_scan(a, x, backend=backend)
        assert torch.isfinite(h[0, :2]).all() and not torch.isfinite(h[0, 2:, 1, 1]).any(), backend
        if backend == "heinsen":
            assert torch.isnan(h[0, 2:, 1, 1]).all()
        else:
            assert torch.isinf(h[0, 2:, 1, 1]).all()


def test_sparse_and_nested_inputs_refused_by_name():
    a, x = torch.rand(2, 5, 3), torch.randn(2, 5, 3)
    with pytest.raises(TypeError, match=r"gate_loop_scan: a must be a dense.*sparse_coo"):
        gate_loop_scan(a.to_sparse(), x, backend="loop")
    with pytest.raises(TypeError, match=r"gate_loop_scan: x must be a dense.*nested"):
        gate_loop_scan(a, torch.nested.nested_tensor([x[0], x[1]]), backend="jax")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_vmap_and_func_grad_over_every_backend(backend):
    a, x, _ = make_inputs(6, complex_=False, broadcast=False, with_h0=False, batch=4, feat=(3,))
    hs = torch.vmap(lambda a, x: gate_loop_scan(a[None], x[None], backend=backend)[0][0])(a, x)
    assert rel_err(hs, gate_loop_scan(a, x, backend="loop")[0]) < 1e-9
    loss = lambda a: gate_loop_scan(a, x, backend=backend)[0].pow(2).sum()
    leaf = a.clone().requires_grad_()
    (want,) = torch.autograd.grad(gate_loop_scan(leaf, x, backend="loop")[0].pow(2).sum(), leaf)
    assert rel_err(torch.func.grad(loss)(a), want) < 1e-9
    per_example = torch.vmap(torch.func.grad(lambda a, x: gate_loop_scan(a[None], x[None], backend=backend)[0].pow(2).sum()))
    assert rel_err(per_example(a, x), want) < 1e-9


def test_cold_compile_fullgraph_first_call(monkeypatch):
    """A first call (nothing built, JAX's devices not yet asked) and a new reverse= value under
    torch.compile(fullgraph=True), with no eager warm-up."""
    for memo in (bridged, routing.jax_has_device, routing.jax_available, routing._route):
        memo.cache_clear()
    torch._dynamo.reset()
    a, x, h0 = make_inputs(9, complex_=True, broadcast=True, with_h0=True)
    leaves = [t.clone().requires_grad_() for t in (a, x, h0)]

    def f(a, x, h0, reverse):
        h, h_last = gate_loop_scan(a, x, h0, reverse=reverse)      # backend "auto": jax on CPU
        return (h.abs() ** 2).sum() + h_last.real.sum()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for reverse in (False, True):
        got = compiled(*leaves, reverse)
        grads = torch.autograd.grad(got, leaves)
        want = f(*leaves, reverse)
        for g, w in zip(grads, torch.autograd.grad(want, leaves)):
            assert rel_err(g, w) < 1e-12
        assert rel_err(got, want) < 1e-12


def test_cold_compile_of_the_default_transformer_with_checkpointed_scan():
    """The default GateLoop Transformer (checkpoint_gate_looped_attn on) compiled cold with
    fullgraph=True: same loss and gradients as eager."""
    from gateloop_hybrid.transformer import Transformer
    bridged.cache_clear()
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Transformer(16, num_tokens=20, depth=1, dim_head=8, heads=2)
    ids = torch.randint(0, 20, (2, 8))
    loss = lambda ids: model(ids).logsumexp(-1).mean()
    got = torch.compile(loss, fullgraph=True, backend="aot_eager")(ids)
    got.backward()
    compiled_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    want = loss(ids)
    want.backward()
    torch.testing.assert_close(got, want)
    for g, p in zip(compiled_grads, model.parameters()):
        torch.testing.assert_close(g, p.grad)


def test_heinsen_derivatives_where_a_cotangent_or_x_is_zero():
    """The log-space forward has the recurrence's own backward: no NaN from log 0 in first or
    second order, and forward mode (jacfwd) works."""
    a, x, h0 = make_inputs(6, complex_=True, broadcast=False, with_h0=True, batch=1, feat=(3,))
    x = x.clone()
    x[0, 2, 1] = 0
    results = {}
    for backend in ("heinsen", "loop"):
        leaf = a.clone().requires_grad_()
        h, _ = gate_loop_scan(leaf, x, h0, backend=backend)
        cot = torch.zeros_like(h)
        cot[0, 3, 1] = 1.0                                    # zero almost everywhere
        (ga,) = torch.autograd.grad((h * cot).real.sum(), leaf, create_graph=True)
        (gg,) = torch.autograd.grad(ga.abs().pow(2).sum(), leaf)
        jf = torch.func.jacfwd(lambda x: gate_loop_scan(a.real, x, h0.real, backend=backend)[1])(x.real)
        results[backend] = (ga, gg, jf)
    for got, want in zip(results["heinsen"], results["loop"]):
        assert torch.isfinite(got).all() and rel_err(got, want) < 1e-9


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_one_step_without_h0_still_differentiates_the_gates(backend):
    """h = a * 0 + x: the gradient for a is zero, in every backend (not a missing graph)."""
    a = torch.rand(2, 1, 3, dtype=torch.float64, requires_grad=True)
    h, h_last = gate_loop_scan(a, torch.randn(2, 1, 3, dtype=torch.float64), backend=backend)
    (g,) = torch.autograd.grad(h.sum() + h_last.sum(), a)
    assert torch.equal(g, torch.zeros_like(a))
