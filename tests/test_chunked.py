"""The chunked GateLoop mixer (heads wider than one feature) against the materialized scan."""

from __future__ import annotations

import math

import pytest
import torch

from gateloop_hybrid import GateLoopedAttention, gate_loop_mixer
from gateloop_hybrid.chunked import chunked_heads
from gateloop_hybrid.mixer import _heads_scan, composed_mixer
from mixer_cases import inputs, values_and_grads


def rel(got, want):
    if got is None or want is None:     # an input that does not reach the output (an ablation)
        return 0.0 if got is None and want is None else math.inf
    got, want = got.detach(), want.detach()
    return float((got - want).abs().norm() / want.abs().norm().clamp_min(1e-300))


@pytest.mark.parametrize("b,n,h,d,chunk", [(2, 77, 3, 4, 16), (1, 5, 2, 3, 64), (2, 64, 2, 2, 64), (2, 1, 2, 3, 64),
                                           (1, 33, 1, 5, 1), (3, 130, 2, 2, 7)])
@pytest.mark.parametrize("with_h0", [True, False])
def test_chunked_equals_the_materialized_scan_in_float64(b, n, h, d, chunk, with_h0):
    qkv, z, h0 = inputs(b, n, h, d, with_h0=with_h0)
    leaves = [qkv, z, h0]
    want = values_and_grads(lambda: composed_mixer(qkv, z, h0, heads=h, frac=0.9, backend="loop"),
                            leaves)

    def chunked():
        q, k, v = (t.unflatten(-1, (h, -1)) for t in qkv.chunk(3, dim=-1))
        from gateloop_hybrid.gates import log_gates
        log_mag, phase = log_gates(z.reshape(b, n, h, 2), 0.9)
        y, h_last = chunked_heads(q, k, v, log_mag, phase, h0, chunk=chunk, backend="torch")
        return y.flatten(-2), h_last
    got = values_and_grads(chunked, leaves)
    for name, g, w in zip(["y", "h_last", "d qkv", "d z", "d h0"], got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        assert rel(g, w) < 1e-9, (name, rel(g, w))


@pytest.mark.parametrize("ablate_complex,ablate_state_transition,frac", [(True, False, 1.0), (False, True, 1.0),
                                                                         (False, False, 0.25)])
@pytest.mark.parametrize("recompute", [False, True])
def test_gate_loop_mixer_with_wide_heads_keeps_the_seeds_options(ablate_complex, ablate_state_transition, frac,
                                                                 recompute):
    """gate_loop_mixer takes the chunked form for d > 1, with ablations, frac_gradient and recompute."""
    b, n, h, d = 2, 45, 2, 3
    qkv, z, h0 = inputs(b, n, h, d)
    leaves = [qkv, z, h0]
    want = values_and_grads(lambda: composed_mixer(
        qkv, z, h0, heads=h, frac=frac, ablate_complex=ablate_complex,
        ablate_state_transition=ablate_state_transition, backend="loop"), leaves)
    got = values_and_grads(lambda: gate_loop_mixer(
        qkv, z, h0, heads=h, frac_gradient=frac, ablate_complex=ablate_complex,
        ablate_state_transition=ablate_state_transition, recompute=recompute, backend="torch"), leaves)
    for name, g, w in zip(["y", "h_last", "d qkv", "d z", "d h0"], got, want):
        assert rel(g, w) < 1e-9, (name, rel(g, w))


def test_cache_continues_the_sequence():
    b, n, h, d = 2, 70, 2, 4
    qkv, z, _ = inputs(b, n, h, d, with_h0=False)
    with torch.no_grad():
        y, h_last = gate_loop_mixer(qkv, z, heads=h, backend="torch")
        y1, s = gate_loop_mixer(qkv[:, :41], z[:, :41], heads=h, backend="torch")
        parts = [y1]
        for t in range(41, n):     # then one token at a time, as decoding does
            yt, s = gate_loop_mixer(qkv[:, t:t + 1], z[:, t:t + 1], s, heads=h, backend="torch")
            parts.append(yt)
    assert rel(torch.cat(parts, 1), y) < 1e-12 and rel(s, h_last) < 1e-12


def _long_case(log_mag_range, n=4096, h=2, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, n, h, d, generator=g, dtype=torch.float64) for _ in range(3))
    lo, hi = log_mag_range
    log_mag = lo + (hi - lo) * torch.rand(1, n, h, generator=g, dtype=torch.float64)
    phase = math.pi * (2 * torch.rand(1, n, h, generator=g, dtype=torch.float64) - 1)   # up to +-pi
    h0 = torch.randn(1, h, d, d, generator=g, dtype=torch.complex128)
    return q, k, v, log_mag, phase, h0


@pytest.mark.parametrize("log_mag_range", [(-1e-4, 0.0), (math.log(1e-3), math.log(0.05)),
                                           (math.log(0.5), 0.0)], ids=["near-1", "near-0", "layer-range"])
def test_float32_at_4096_steps(log_mag_range):
    """Gates near 1 (the state carries across the whole sequence), near 0, and in the layer's range
    [0.5, 1), with phases up to pi: float32 against the float64 materialized scan."""
    q, k, v, log_mag, phase, h0 = _long_case(log_mag_range)
    leaves64 = [t.clone().requires_grad_() for t in (q, k, v, log_mag, phase, h0)]
    leaves32 = [t.detach().to(torch.complex64 if t.is_complex() else torch.float32).requires_grad_()
                for t in leaves64]

    def materialized():
        q_, k_, v_, lm, ph, s0 = leaves64
        a = torch.polar(lm.exp(), ph)[..., None, None]
        return _heads_scan(q_, k_, v_, a, s0, "torch")
    want = values_and_grads(materialized, leaves64)
    got = values_and_grads(lambda: chunked_heads(*leaves32, backend="torch"), leaves32)
    for name, g, w in zip(["y", "h_last", "dq", "dk", "dv", "d log|a|", "d arg a", "d h0"], got, want):
        assert g.dtype == (torch.complex64 if w.is_complex() else torch.float32), name
        assert torch.isfinite(torch.view_as_real(g) if g.is_complex() else g).all(), name
        assert rel(g.to(w.dtype), w) < 1e-4, (name, rel(g.to(w.dtype), w))


def test_bfloat16_projections():
    """bf16 q, k, v (as under autocast): products in bf16, gates, decays and states in float32."""
    b, n, h, d = 2, 300, 2, 8
    qkv, z, _ = inputs(b, n, h, d, with_h0=False)
    want = composed_mixer(qkv, z, None, heads=h, backend="torch")[0]
    y, h_last = gate_loop_mixer(qkv.detach().bfloat16(), z.detach().float(), heads=h, backend="torch")
    assert y.dtype == torch.bfloat16 and h_last.dtype == torch.complex64
    assert rel(y.double(), want) < 2e-2


def test_no_per_token_state_is_kept_for_backward():
    """What autograd keeps is per chunk: nothing as large as a (d, e) state per token, which the
    materialized scan keeps."""
    b, n, h, d = 2, 256, 2, 16
    qkv, z, h0 = inputs(b, n, h, d, dtype=torch.float32)
    per_token_state = b * n * h * d * d

    def largest_saved(materialize):
        sizes = []

        def pack(t):
            sizes.append(t.numel())
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            composed_mixer(qkv, z, h0, heads=h, backend="torch", chunked=not materialize)
        return max(sizes)
    assert largest_saved(True) >= per_token_state
    assert largest_saved(False) <= per_token_state // 4


def test_second_derivatives():
    qkv, z, h0 = inputs(1, 9, 2, 2)

    def f(qkv, z, h0):
        y, h_last = gate_loop_mixer(qkv, z, h0, heads=2, backend="torch")
        return y.square().sum() + h_last.abs().square().sum()
    assert torch.autograd.gradgradcheck(f, (qkv, z, h0))


def test_layer_with_wide_heads_matches_the_materialized_layer(monkeypatch):
    """GateLoopedAttention with 4 heads of 8: the same outputs and gradients through both forms."""
    torch.manual_seed(0)
    layer = GateLoopedAttention(dim=32, heads=4, scan_backend="torch").double()
    x = torch.randn(2, 50, 32, dtype=torch.float64)

    def run():
        layer.zero_grad()
        out, cache = layer(x, return_cache=True)
        (out.square().sum() + cache.abs().sum()).backward()
        return [out, cache] + [p.grad.clone() for p in layer.parameters()]
    got = run()
    import gateloop_hybrid.mixer as mixer
    original = mixer.composed_mixer
    monkeypatch.setattr(mixer, "composed_mixer", lambda *args, **kw: original(*args, **{**kw, "chunked": False}))
    want = run()
    for g, w in zip(got, want):
        assert rel(g, w) < 1e-9


def test_compiles_in_one_graph():
    qkv, z, h0 = inputs(2, 40, 2, 4, dtype=torch.float32)
    compiled = torch.compile(lambda *a: gate_loop_mixer(*a, heads=2, backend="torch"), fullgraph=True,
                             backend="aot_eager")
    want = values_and_grads(lambda: gate_loop_mixer(qkv, z, h0, heads=2, backend="torch"), [qkv, z, h0])
    got = values_and_grads(lambda: compiled(qkv, z, h0), [qkv, z, h0])
    for g, w in zip(got, want):
        assert rel(g, w) < 1e-5
