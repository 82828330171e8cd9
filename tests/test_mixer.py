"""gate_loop_mixer: the fused Mosaic GPU kernels (run on CPU in Pallas's Mosaic GPU interpret
mode, through their torch op) against the composition of torch ops in float64, values and all
gradients; the composition against the layer's seed semantics; argument errors. The GPU runs of
the same kernels are in test_cuda.py."""

from __future__ import annotations

import pytest
import torch

from gateloop_hybrid.mixer import gate_loop_mixer, gates

H = 128     # the kernels' tile of heads


def make(B, N, H, seed=0, h0=True, zero_gate_at=None):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, N, 3 * H, generator=g, dtype=torch.float64)
    z = 2 * torch.randn(B, N, 2 * H, generator=g, dtype=torch.float64)
    if zero_gate_at is not None:          # z = 0 exactly: a = 1/2, no gradient to z
        b, t, j = zero_gate_at
        z[b, t, 2 * j: 2 * j + 2] = 0
    state = torch.randn(B, H, 1, 1, generator=g, dtype=torch.complex128) if h0 else None
    return qkv, z, state


def compare(qkv, z, h0, frac=0.9, recompute=False, dtype=torch.float32, tol=2e-5):
    """Kernels (inputs in dtype) against the float64 composition: y, h_last and every gradient."""
    pytest.importorskip("jax")
    pytest.importorskip("absl")          # Mosaic GPU's Python side needs absl-py
    from gateloop_hybrid.ops import mosaic as mosaic_op

    B, N = qkv.shape[:2]
    heads = z.shape[-1] // 2
    leaves = [qkv.to(dtype).requires_grad_(), z.to(dtype).requires_grad_()]
    if h0 is not None:
        leaves.append(h0.to(torch.complex64).requires_grad_())
    y, h_last = mosaic_op.try_mixer_mosaic(leaves[0], leaves[1], None if h0 is None else leaves[2].view(B, heads),
                                           frac, recompute)
    wide = [t.detach().to(torch.complex128 if t.is_complex() else torch.float64).requires_grad_() for t in leaves]
    y_ref, last_ref = gate_loop_mixer(wide[0], wide[1], wide[2] if h0 is not None else None, heads=heads,
                                      frac_gradient=frac, backend="loop")
    assert y.dtype == dtype and y.shape == y_ref.shape and h_last.dtype == torch.complex64
    g = torch.Generator().manual_seed(1)
    cy = torch.randn(y_ref.shape, generator=g, dtype=torch.float64)
    cl = torch.randn(last_ref.shape, generator=g, dtype=torch.complex128)
    loss = lambda y, hl: (y * cy.to(y.dtype)).sum() + (hl.reshape(cl.shape) * cl.to(hl.dtype).conj()).real.sum()
    grads = torch.autograd.grad(loss(y, h_last), leaves)
    refs = torch.autograd.grad(loss(y_ref, last_ref), wide)
    rel = lambda got, want: ((got.detach().to(want.dtype) - want).abs().norm() / want.abs().norm()).item()
    errors = {"y": rel(y, y_ref), "h_last": rel(h_last.view(last_ref.shape), last_ref)}
    for name, got, want, leaf in zip(("qkv", "z", "h0"), grads, refs, leaves):
        assert got.shape == leaf.shape and got.dtype == leaf.dtype, name
        errors[name] = rel(got, want)
    assert max(errors.values()) < tol, errors
    return errors


@pytest.mark.parametrize("recompute", [False, True])
def test_fused_kernels_match_the_composition(recompute):
    """Odd length, h0, a gate pre-activation of exactly zero, states stored or recomputed."""
    compare(*make(2, 13, H, zero_gate_at=(1, 4, 7)), recompute=recompute)


@pytest.mark.parametrize("chunks,n,h0,one_pass", [(3, 29, True, True), (4, 9, False, False)])
def test_fused_kernels_cut_into_time_chunks(monkeypatch, chunks, n, h0, one_pass):
    """Forward and backward through the summary and finishing kernels (9 steps in 4 chunks run
    as 3 of 3) or the one-pass kernel, and the first chunk's carry from h0 or from zero."""
    from gateloop_hybrid.kernels import walk
    monkeypatch.setattr(walk, "choose_walk", lambda B, N, F, cplx, sms, backward: (chunks, 4))
    monkeypatch.setattr(walk, "ONE_PASS", one_pass)
    compare(*make(1, n, H, seed=2, h0=h0), frac=0.5)


def test_fused_kernels_take_bfloat16_and_accumulate_in_float32():
    errors = compare(*make(1, 64, H, seed=3), dtype=torch.bfloat16, tol=3e-2)
    assert errors["h_last"] < 1e-2       # the state is float32: only the inputs are rounded


def test_fused_kernels_second_derivative_raises():
    pytest.importorskip("absl")
    from gateloop_hybrid.ops import mosaic as mosaic_op
    qkv, z, _ = make(1, 5, H)
    qkv, z = qkv.float().requires_grad_(), z.float().requires_grad_()
    y, _ = mosaic_op.try_mixer_mosaic(qkv, z, None, 1.0, False)
    (gq,) = torch.autograd.grad(y.sum(), qkv, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        torch.autograd.grad(gq.sum(), z)


def test_mixer_supported_shapes():
    pytest.importorskip("jax")
    from gateloop_hybrid.ops import mosaic as mosaic_op
    t = lambda *s, dt=torch.float32: torch.empty(*s, dtype=dt)
    assert mosaic_op.mixer_supported(t(2, 5, 3 * 256), t(2, 5, 512), None)
    assert not mosaic_op.mixer_supported(t(2, 5, 3 * 96), t(2, 5, 192), None)          # not a tile of heads
    assert not mosaic_op.mixer_supported(t(2, 5, 384, dt=torch.float64), t(2, 5, 256), None)
    assert not mosaic_op.mixer_supported(t(2, 5, 384), t(2, 5, 256), t(2, 128, dt=torch.complex128))


def test_composition_is_the_seed_layers_math():
    """y = q Re(h) with h_t = a_t h_{t-1} + k_t v_t^T and a = sigmoid(|z|) exp(i arg z), written
    out step by step for wide heads (d = 3), with a cache."""
    g = torch.Generator().manual_seed(4)
    b, n, heads, d = 2, 7, 2, 3
    qkv = torch.randn(b, n, 3 * heads * d, generator=g, dtype=torch.float64)
    z = torch.randn(b, n, 2 * heads, generator=g, dtype=torch.float64)
    h0 = torch.randn(b, heads, d, d, generator=g, dtype=torch.complex128)
    y, h_last = gate_loop_mixer(qkv, z, h0, heads=heads, backend="loop")
    q, k, v = (t.view(b, n, heads, d) for t in qkv.chunk(3, dim=-1))
    zc = torch.view_as_complex(z.view(b, n, heads, 2))
    a = torch.sigmoid(zc.abs()) * torch.exp(1j * zc.angle())
    h = h0
    for t in range(n):
        h = a[:, t, :, None, None] * h + k[:, t, :, :, None] * v[:, t, :, None, :]
        want = torch.einsum("bhd,bhde->bhe", q[:, t], h.real).reshape(b, heads * d)
        torch.testing.assert_close(y[:, t], want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h_last, h, rtol=1e-12, atol=1e-12)


def test_gates_keep_values_and_scale_the_gradient():
    z = torch.randn(3, 4, 2, dtype=torch.float64, requires_grad=True)
    a_full, a_frac = gates(z), gates(z, frac_gradient=0.25)
    torch.testing.assert_close(a_full, a_frac)
    (g_full,) = torch.autograd.grad(a_full.abs().sum(), z)
    (g_frac,) = torch.autograd.grad(a_frac.abs().sum(), z)
    torch.testing.assert_close(g_frac, 0.25 * g_full)


@pytest.mark.parametrize("ablate_complex,ablate_state_transition", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_gate_parts_are_the_gates_real_and_imaginary_parts(ablate_complex, ablate_state_transition, dtype):
    """The decode step's real-arithmetic gates equal ``gates``, negative and zero z included."""
    from gateloop_hybrid.gates import gate_parts
    z = torch.randn(5, 7, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    z[0, 0] = 0.0
    z[0, 1] = torch.tensor([-1.5, 0.0])
    z = z.to(dtype)
    want = gates(z, ablate_complex=ablate_complex, ablate_state_transition=ablate_state_transition)
    re, im = gate_parts(z, ablate_complex, ablate_state_transition)
    assert re.dtype == want.real.dtype
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(re, want.real, rtol=tol, atol=tol)
    torch.testing.assert_close(im, want.imag, rtol=tol, atol=tol)


@pytest.mark.parametrize("kwargs,match", [
    (dict(qkv=torch.zeros(2, 5, 10), heads=2), r"qkv's last dim \(10\) must be 3 \* heads \* d"),
    (dict(z=torch.zeros(2, 5, 3)), r"z must be \(batch, time, 2 \* heads\) = \(2, 5, 4\), got \(2, 5, 3\)"),
    (dict(h0=torch.zeros(2, 2, 1, 1)), "h0 must be a complex tensor"),
    (dict(h0=torch.zeros(2, 2, 2, 1, dtype=torch.complex64)), r"h0 must be \(batch, heads, d, d\)"),
    (dict(qkv=torch.zeros(2, 5, 6, dtype=torch.int64)), "qkv has dtype torch.int64"),
    (dict(heads=0), "heads must be a positive int"),
])
def test_mixer_argument_errors(kwargs, match):
    args = dict(qkv=torch.zeros(2, 5, 6), z=torch.zeros(2, 5, 4), h0=None, heads=2)
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        gate_loop_mixer(args.pop("qkv"), args.pop("z"), args.pop("h0"), **args)


# ---------------------------------------------------------------------------------------------
# SimpleGateLoopLayer's mixer: real gates a = sigmoid(za), y = q h


def compare_simple(B, N, D, h0=True, recompute=False, dtype=torch.float32, tol=2e-5, seed=0):
    """The real-gate kernels (inputs in dtype) against the float64 composition: y, h_last, dqkva, dh0."""
    pytest.importorskip("jax")
    pytest.importorskip("absl")
    from gateloop_hybrid.mixer import simple_gate_loop_mixer
    from gateloop_hybrid.ops import mosaic as mosaic_op

    g = torch.Generator().manual_seed(seed)
    qkva = 2 * torch.randn(B, N, 3 * D, generator=g, dtype=torch.float64)
    state = torch.randn(B, D, generator=g, dtype=torch.float64) if h0 else None
    leaves = [qkva.to(dtype).requires_grad_()] + ([state.float().requires_grad_()] if h0 else [])
    y, h_last = mosaic_op.try_simple_mixer_mosaic(*leaves, *([None] if not h0 else []), recompute=recompute)
    wide = [t.detach().double().requires_grad_() for t in leaves]
    y_ref, last_ref = simple_gate_loop_mixer(*wide, backend="loop")
    assert y.dtype == dtype and y.shape == y_ref.shape and h_last.dtype == torch.float32
    cy = torch.randn(y_ref.shape, generator=g, dtype=torch.float64)
    cl = torch.randn(last_ref.shape, generator=g, dtype=torch.float64)
    loss = lambda y, hl: (y * cy.to(y.dtype)).sum() + (hl * cl.to(hl.dtype)).sum()
    grads = torch.autograd.grad(loss(y, h_last), leaves)
    refs = torch.autograd.grad(loss(y_ref, last_ref), wide)
    rel = lambda got, want: ((got.detach().double() - want).norm() / want.norm()).item()
    errors = {"y": rel(y, y_ref), "h_last": rel(h_last, last_ref)}
    for name, got, want, leaf in zip(("qkva", "h0"), grads, refs, leaves):
        assert got.shape == leaf.shape and got.dtype == leaf.dtype, name
        errors[name] = rel(got, want)
    assert max(errors.values()) < tol, errors
    return errors


@pytest.mark.parametrize("h0,recompute", [(True, False), (False, True)])
def test_real_gate_kernels_match_the_composition(h0, recompute):
    """Odd length, with and without h0, states stored or recomputed."""
    compare_simple(2, 13, H, h0=h0, recompute=recompute)


def test_real_gate_kernels_cut_into_time_chunks(monkeypatch):
    from gateloop_hybrid.kernels import walk
    monkeypatch.setattr(walk, "choose_walk", lambda B, N, F, cplx, sms, backward: (3, 4))
    compare_simple(1, 29, H, seed=2)


def test_real_gate_kernels_take_bfloat16():
    errors = compare_simple(1, 17, H, dtype=torch.bfloat16, tol=3e-2, seed=3)
    assert errors["h_last"] < 1e-5       # the state is float32: only the inputs are rounded


def test_simple_mixer_is_the_seed_layers_math():
    """y = q h with h_t = sigmoid(za_t) h_{t-1} + kv_t, step by step, with a cache and reversed."""
    from gateloop_hybrid.mixer import simple_gate_loop_mixer
    g = torch.Generator().manual_seed(5)
    qkva = torch.randn(2, 6, 9, generator=g, dtype=torch.float64)
    h0 = torch.randn(2, 3, generator=g, dtype=torch.float64)
    q, kv, za = qkva.chunk(3, dim=-1)
    for reverse in (False, True):
        y, h_last = simple_gate_loop_mixer(qkva, None if reverse else h0, reverse=reverse, backend="loop")
        h = torch.zeros_like(h0) if reverse else h0
        for t in (range(5, -1, -1) if reverse else range(6)):
            h = za[:, t].sigmoid() * h + kv[:, t]
            torch.testing.assert_close(y[:, t], q[:, t] * h, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(h_last, h, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("qkva,h0,match", [
    (torch.zeros(2, 5, 10), None, r"qkva must be \(batch, time >= 1, 3 \* dim\), got shape \(2, 5, 10\)"),
    (torch.zeros(2, 5, 6, dtype=torch.int32), None, "qkva has dtype torch.int32"),
    (torch.zeros(2, 5, 6), torch.zeros(2, 3), r"h0 must be \(batch, dim\) = \(2, 2\), got \(2, 3\)"),
    (torch.zeros(2, 5, 6), torch.zeros(2, 2, dtype=torch.complex64), "h0 must be a real float tensor"),
])
def test_simple_mixer_argument_errors(qkva, h0, match):
    from gateloop_hybrid.mixer import simple_gate_loop_mixer
    with pytest.raises((ValueError, TypeError), match=match):
        simple_gate_loop_mixer(qkva, h0)


def test_real_gate_self_test_passes_in_interpret_mode():
    """The check that decides, once per GPU, whether SimpleGateLoopLayer takes the fused kernels
    (here the kernels run interpreted on the CPU)."""
    pytest.importorskip("jax")
    pytest.importorskip("absl")
    from gateloop_hybrid.ops import selftest
    assert selftest.simple_mixer(torch.device("cpu")) is None


def test_fused_mixer_self_test_passes_in_interpret_mode():
    """The check that admits the fused mixer on a GPU (its own kernels, not the scan's)."""
    pytest.importorskip("jax")
    pytest.importorskip("absl")
    from gateloop_hybrid.ops import selftest
    assert selftest.fused_mixer(torch.device("cpu")) is None


@pytest.mark.parametrize("op,test", [("simple_mixer", "simple_mixer"), ("mixer", "fused_mixer")])
def test_a_failing_self_test_warns_and_composes(monkeypatch, op, test):
    from gateloop_hybrid import routing
    from gateloop_hybrid.ops import selftest
    monkeypatch.setattr(routing, "_device_problem", lambda device_type, index: None)
    monkeypatch.setattr(selftest, test, lambda device: "ValueError: a broken kernel")
    monkeypatch.setattr(routing, "_warned", set())
    check = routing.fused_mixer_available if op == "mixer" else routing.simple_mixer_available
    check.cache_clear()
    routing._route.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="failed their self-test on cuda:0 .*a broken kernel"):
            route = routing.route(op, device="cuda:0", heads=128)
        assert route.path == "composed" and "a broken kernel" in route.why
    finally:
        check.cache_clear()
        routing._route.cache_clear()


@pytest.mark.parametrize("real", [False, True])
def test_fused_kernels_compile_with_dynamic_shapes(real):
    """The fused kernels (GateLoop's and the real-gate ones) called as the layers call them under
    torch.compile(dynamic=True, fullgraph=True): sizes arrive as SymInts (as after a recompile at
    a new shape) and each new shape gets its own kernels; values and gradients equal eager's."""
    import gateloop_hybrid.mixer as mixer
    if real:
        def f(qkv, z):
            y, h_last = mixer._simple_fused_untraced(qkv)
            return y.square().sum() + h_last.sum()
    else:
        def f(qkv, z):
            y, h_last = mixer._fused_untraced(0.9, False, qkv, z)
            return y.square().sum() + torch.view_as_real(h_last).sum()
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=True)
    for B, N in ((1, 9), (2, 13)):
        g = torch.Generator().manual_seed(N)
        qkv = torch.randn(B, N, 3 * 128, generator=g, requires_grad=True)
        z = torch.randn(B, N, 2 * 128, generator=g, requires_grad=True)
        want = torch.autograd.grad(f(qkv, z), (qkv, z), allow_unused=True)
        got = torch.autograd.grad(compiled(qkv, z), (qkv, z), allow_unused=True)
        for a, b in zip(got, want):
            if b is None:
                assert a is None
            else:
                torch.testing.assert_close(a, b)
