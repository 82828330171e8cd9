"""The wide-head Mosaic GPU kernels (kernels/mosaic_rotated.py, ops/rotated.py) against the float64
rotated form, values and every gradient, in Pallas's interpret mode on the CPU (on a GPU by the
same self-test, in test_cuda.py), their lowering for CUDA (checked on the CPU), and the route
that takes them.

Interpret mode is slow (seconds to tens of seconds a call), so the default run checks two cases:
the self-test that admits the kernels (two segments, a ragged last chunk, h0, a cotangent for
h_last) and gate_loop_mixer on the kernels (one segment over three chunks, h0). More shapes (d = 128 and split value columns, one
step, batches) run with ``-m kernels``.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("jax")

from gateloop_hybrid.ops.rotated import rotated_heads_mosaic, rotated_qkv_mosaic, supported  # noqa: E402
from gateloop_hybrid.rotated import rotated_heads  # noqa: E402


def cases(b, n, h, d, seed=0, dtype=torch.bfloat16, h0=True):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, n, h, d, generator=g) * 0.3 for _ in range(3))
    log_mag = torch.rand(b, n, h, generator=g) * 0.3 - 0.3          # |a| in (0.74, 1]
    phase = (torch.rand(b, n, h, generator=g) * 2 - 1) * torch.pi   # phases up to pi
    state = torch.randn(b, h, d, d, generator=g, dtype=torch.complex64) * 0.1 if h0 else None
    low = [t.to(dtype) for t in (q, k, v)] + [log_mag, phase, state]
    return [t if t is None else t.detach().requires_grad_() for t in low]


def run(fn, leaves, seed=1):
    y, h_last = fn(*leaves[:5], leaves[5])
    g = torch.Generator().manual_seed(seed)
    wy = torch.randn(y.shape, generator=g)
    wh = torch.randn(h_last.shape, generator=g, dtype=torch.complex128)
    loss = (y.double() * wy.double()).sum() + (h_last.to(torch.complex128) * wh).real.sum()
    grads = torch.autograd.grad(loss, [t for t in leaves if t is not None])
    return [y, h_last, *grads]


def compare(b, n, h, d, h0=True, segments=None):
    low = cases(b, n, h, d, h0=h0)
    wide = [t if t is None else (t.detach().double() if not t.is_complex() else t.detach().to(torch.complex128))
            .requires_grad_() for t in low]
    got = run(lambda *a: rotated_heads_mosaic(*a, segments=segments), low)
    want = run(rotated_heads, wide)
    names = ["y", "h_last", "dq", "dk", "dv", "dlog|a|", "dphase", "dh0"]
    for name, a, w in zip(names, got, want):
        a, w = a.detach().to(w.dtype), w.detach()
        err = float((a - w).abs().max() / w.abs().max())
        assert err < 2e-2, f"{name}: relative error {err:.2e} at b={b}, n={n}, h={h}, d={d}, segments={segments}"


def force_kernels(monkeypatch, segments):
    """gate_loop_mixer's route forced to the kernels (as on a GPU that passed their self-test),
    walking ``segments`` segments of time."""
    from gateloop_hybrid import routing
    from gateloop_hybrid.kernels import mosaic_rotated
    route = routing.route
    monkeypatch.setattr(routing, "route", lambda op, *a, **k: routing.Route("rotated", "forced")
                        if op == "mixer" else route(op, *a, **k))
    monkeypatch.setattr(mosaic_rotated, "choose_segments", lambda *a, **k: segments)


def test_self_test_passes_in_interpret_mode():
    """The check that admits the kernels on a GPU: two chunks walked as two segments (summary
    walks and the chaining between them), a ragged last chunk, h0 and a cotangent for h_last."""
    from gateloop_hybrid.ops import selftest
    assert selftest.rotated_heads(torch.device("cpu")) is None


@pytest.mark.kernels
@pytest.mark.parametrize("b,n,h,d,h0,segments", [(2, 64, 1, 128, True, None), (1, 200, 1, 64, False, 1),
                                                  (1, 300, 1, 64, True, 5), (1, 1, 2, 64, True, None),
                                                  (2, 130, 2, 128, False, 3)])
def test_kernels_equal_the_float64_rotated_form_more_shapes(b, n, h, d, h0, segments):
    compare(b, n, h, d, h0, segments)


def test_walks_with_one_chunk_in_flight_equal_the_float64_rotated_form(monkeypatch):
    """STAGES = 1 (one chunk of inputs in flight and one of outputs on its way out, so that two
    CTAs fit a multiprocessor): two segments, a ragged chunk, h0."""
    from gateloop_hybrid.kernels import mosaic_rotated
    monkeypatch.setattr(mosaic_rotated, "STAGES", 1)
    compare(1, 200, 1, 64, h0=True, segments=2)


def test_heads_of_32_run_as_heads_of_64_with_zero_features():
    """d = 32: values and every gradient against the float64 form, h0 and h_last cut back to 32."""
    compare(1, 70, 2, 32, h0=True, segments=1)


def test_supported_names_what_the_kernels_refuse():
    q = torch.zeros(1, 8, 2, 64, dtype=torch.bfloat16)
    g = torch.zeros(1, 8, 2)
    assert supported(q, q, q, g, g, None) is None
    assert "float32" in supported(q.float(), q.float(), q.float(), g, g, None)
    assert supported(q[..., :32], q[..., :32], q[..., :32], g, g, None) is None     # run as heads of 64
    assert "head width 16" in supported(q[..., :16], q[..., :16], q[..., :16], g, g, None)
    assert "complex64" in supported(q, q, q, g, g, torch.zeros(1, 2, 64, 64, dtype=torch.complex128))
    with pytest.raises(ValueError, match="rotated_heads_mosaic"):
        rotated_heads_mosaic(q.float(), q.float(), q.float(), g, g)
    qkv = torch.zeros(1, 8, 3 * 2 * 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"rotated_qkv_mosaic: qkv's last dim 384 is not 3 x heads x d for heads=5"):
        rotated_qkv_mosaic(qkv, g, g, heads=5)
    with pytest.raises(ValueError, match=r"rotated_qkv_mosaic: .*gates of torch.float64"):
        rotated_qkv_mosaic(qkv, g.double(), g.double(), heads=2)
    with pytest.raises(ValueError, match=r"rotated_qkv_mosaic: qkv must be a \(b, n, 3 heads d\) tensor, got \(8, 384\)"):
        rotated_qkv_mosaic(qkv[0], g, g, heads=2)
    with pytest.raises(ValueError, match=r"rotated_qkv_mosaic: segments must be a positive int or None, got 0"):
        rotated_qkv_mosaic(qkv, g, g, heads=2, segments=0)


def test_gate_loop_mixer_on_the_kernels_equals_its_composition(monkeypatch):
    """gate_loop_mixer with the route forced to the kernels (as on a GPU that passed the self-test)
    and one segment (one CTA walks all three chunks, the last ragged, carrying the state), in
    bfloat16 with h0, against the float64 composition of the same bfloat16 values."""
    from gateloop_hybrid.mixer import composed_mixer, gate_loop_mixer
    force_kernels(monkeypatch, segments=1)
    g = torch.Generator().manual_seed(3)
    b, n, h, d = 1, 150, 1, 64
    qkv = (0.3 * torch.randn(b, n, 3 * h * d, generator=g)).bfloat16().requires_grad_()
    z = torch.randn(b, n, 2 * h, generator=g).requires_grad_()
    h0 = (0.1 * torch.randn(b, h, d, d, generator=g, dtype=torch.complex64)).requires_grad_()
    y, h_last = gate_loop_mixer(qkv, z, h0, heads=h, frac_gradient=0.9)
    wide = [t.detach().double().requires_grad_() for t in (qkv, z)] + [h0.detach().to(torch.complex128).requires_grad_()]
    y_ref, h_ref = composed_mixer(*wide, heads=h, frac=0.9, backend="loop", chunked=True)
    assert y.dtype == torch.bfloat16 and h_last.dtype == torch.complex64
    w = torch.randn(y.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad((y.double() * w).sum() + h_last.real.double().sum(), (qkv, z, h0))
    want = torch.autograd.grad((y_ref * w).sum() + h_ref.real.sum(), wide)
    # dz within 1.5% (0.95% measured, the chunked form 0.54%): the gates' gradients are reversed
    # sums of per-position terms that cancel in pairs; the rest within 2%
    pairs = [("y", y, y_ref, 2e-2), ("h_last", h_last, h_ref, 2e-2), ("dqkv", got[0], want[0], 2e-2),
             ("dz", got[1], want[1], 1.5e-2), ("dh0", got[2], want[2], 2e-2)]
    for name, a, r, tol in pairs:
        a, r = a.detach().to(r.dtype), r.detach()
        assert float((a - r).abs().max()) <= tol * float(r.abs().max()), name


@pytest.mark.parametrize("dtype,segments", [(torch.bfloat16, 3), (torch.float16, 1)])
def test_an_overflow_at_t_leaves_earlier_outputs_bit_identical_on_the_kernels(monkeypatch, dtype, segments):
    """The kernels' masks select: k at t = 100 (the middle of the second of three chunks) the
    largest finite value, so q_s . k_t and k_t v_t overflow; every output before t equals a
    clean run bit for bit, with one walk or with three segments chained."""
    from gateloop_hybrid.mixer import gate_loop_mixer
    force_kernels(monkeypatch, segments=segments)
    g = torch.Generator().manual_seed(4)
    n, t, h, d = 150, 100, 1, 64
    qkv = torch.randn(1, n, 3 * h * d, generator=g).to(dtype)
    z = torch.randn(1, n, 2 * h, generator=g)
    bad = qkv.clone()
    bad[:, t, h * d:2 * h * d] = torch.finfo(dtype).max
    clean, _ = gate_loop_mixer(qkv, z, heads=h)
    y, _ = gate_loop_mixer(bad, z, heads=h)
    assert not torch.isfinite(y[:, t:]).all()
    assert torch.equal(y[:, :t], clean[:, :t])


@pytest.mark.parametrize("grouped,stages", [(False, 2), (True, 2), (False, 1)])
@pytest.mark.parametrize("d,block_v", [(64, 64), (128, 32)])
@pytest.mark.parametrize("kernel", ["forward", "summary", "backward_q", "backward_kv", "summary_back"])
def test_kernels_lower_for_cuda(d, block_v, kernel, grouped, stages):
    """The kernels lower to Mosaic GPU (layouts, swizzles, TMA shapes and shared memory checked)
    on the CPU, with no GPU: jax.export for the cuda platform."""
    import jax
    import jax.numpy as jnp
    from jax import export
    from gateloop_hybrid.kernels import mosaic_rotated as kern
    B, N, H, segments = 2, 4 * kern.C, 3, 2
    key = kern.RotatedKey(B, N, H, d, block_v, True, "bfloat16", segments, grouped, stages)
    S = jax.ShapeDtypeStruct
    qkv, x, pos = S((B, N, 3 * H, d), jnp.bfloat16), S((B, N, H, d), jnp.bfloat16), S((B, H, N), jnp.float32)
    G, state = S((B, H, N // kern.C, d), jnp.float32), S((B, H, segments, 2, d, d), jnp.float32)
    args = {"forward": [qkv, pos, pos, pos, G, state], "summary": [qkv, pos, pos, G],
            "backward_q": [qkv, x, pos, pos, pos, G, state], "backward_kv": [qkv, x, pos, pos, pos, G, state],
            "summary_back": [qkv, x, pos, pos, G]}[kernel]
    exported = export.export(jax.jit(lambda *a: kern.launch(*a, key=key, kernel=kernel)), platforms=["cuda"])(*args)
    assert "mosaic_gpu" in exported.mlir_module()


def test_route_takes_the_kernels_for_wide_half_precision_heads_on_a_gpu(monkeypatch):
    from gateloop_hybrid import routing
    monkeypatch.setattr(routing, "_device_problem", lambda device_type, index: None)
    monkeypatch.setattr(routing, "rotated_available", lambda device_type, index: None)
    routing._route.cache_clear()
    try:
        route = lambda **kw: routing.route("mixer", **{"device": "cuda:0", "dtype": "bfloat16", "heads": 8,
                                                       "backend": "pallas", **kw})
        assert route(width=64).path == "rotated"
        assert "backend 'pallas' only" in route(width=64, backend="auto").why
        assert route(width=128, dtype="float16").path == "rotated"
        assert "heads of (32, 64, 128)" in route(width=16).why and route(width=16).path == "chunked"
        assert "bfloat16 or float16" in route(width=64, dtype="float32").why
        assert route(width=64, backend="torch").path == "chunked"
        assert route(width=64, device="cpu").path == "chunked"
        assert route(width=64, framework="jax", device="gpu").path == "chunked"
    finally:
        routing._route.cache_clear()


def test_a_failing_self_test_warns_and_takes_the_chunked_form(monkeypatch):
    from gateloop_hybrid import routing
    from gateloop_hybrid.ops import selftest
    monkeypatch.setattr(routing, "_device_problem", lambda device_type, index: None)
    monkeypatch.setattr(selftest, "rotated_heads", lambda device: "ValueError: a broken kernel")
    monkeypatch.setattr(routing, "_warned", set())
    routing.rotated_available.cache_clear()
    routing._route.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="wide-head kernels failed their self-test on cuda:0"):
            route = routing.route("mixer", "pallas", device="cuda:0", dtype="bfloat16", heads=8, width=64)
        assert route.path == "chunked" and "a broken kernel" in route.why
    finally:
        routing.rotated_available.cache_clear()
        routing._route.cache_clear()


def test_the_kernels_under_torch_compile_equal_eager(monkeypatch):
    """gate_loop_mixer on the kernels compiled with fullgraph=True (each kernel an opaque op,
    the torch work around them traced): output and gradients equal eager bit for bit, with two
    segments chained."""
    from gateloop_hybrid.mixer import gate_loop_mixer
    force_kernels(monkeypatch, segments=2)
    g = torch.Generator().manual_seed(5)
    b, n, h, d = 1, 150, 2, 64
    qkv = (0.3 * torch.randn(b, n, 3 * h * d, generator=g)).bfloat16().requires_grad_()
    z = torch.randn(b, n, 2 * h, generator=g).requires_grad_()

    def f(qkv, z):
        y = gate_loop_mixer(qkv, z, heads=h, backend="pallas")[0]
        return y, torch.autograd.grad(y.float().square().sum(), (qkv, z))
    torch._dynamo.reset()
    eager = f(qkv, z)
    compiled = torch.compile(lambda qkv, z: gate_loop_mixer(qkv, z, heads=h, backend="pallas")[0],
                             backend="aot_eager", fullgraph=True)
    y = compiled(qkv, z)
    got = (y, torch.autograd.grad(y.float().square().sum(), (qkv, z)))
    assert torch.equal(got[0], eager[0])
    assert all(torch.equal(a, w) for a, w in zip(got[1], eager[1]))
