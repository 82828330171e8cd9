"""The rotated form of the wide-head mixer (linear attention on rotated keys) against the
materialized scan."""

from __future__ import annotations

import math

import pytest
import torch

from gateloop_hybrid.gates import log_gates
from gateloop_hybrid.mixer import _heads_scan, composed_mixer
from gateloop_hybrid.rotated import rotated_heads
from mixer_cases import inputs, values_and_grads


def rel(got, want):
    """Relative error; against a gradient that is exactly zero (z's, for one step from no state),
    the absolute error."""
    got, want = got.detach(), want.detach()
    scale = want.abs().norm()
    return float((got - want).abs().norm() / (scale if scale > 0 else 1.0))


def rotated_mixer(qkv, z, h0, heads, frac=1.0, **kw):
    """gate_loop_mixer's wide-head composition with the rotated form in place of the chunked one."""
    b, n = qkv.shape[:2]
    q, k, v = (t.unflatten(-1, (heads, -1)) for t in qkv.chunk(3, dim=-1))
    log_mag, phase = log_gates(z.reshape(b, n, heads, 2), frac)
    y, h_last = rotated_heads(q, k, v, log_mag, phase, h0, **kw)
    return y.flatten(-2), h_last


@pytest.mark.parametrize("b,n,h,d,chunk", [(2, 1, 2, 3, 64), (1, 5, 2, 3, 1), (2, 63, 2, 4, 16),
                                           (2, 77, 3, 4, 64), (1, 77, 1, 5, 200), (3, 130, 2, 2, 7),
                                           (1, 130, 2, 3, 1)])
@pytest.mark.parametrize("with_h0", [True, False])
def test_rotated_equals_the_materialized_scan_in_float64(b, n, h, d, chunk, with_h0):
    qkv, z, h0 = inputs(b, n, h, d, with_h0=with_h0)
    leaves = [qkv, z, h0]
    want = values_and_grads(lambda: composed_mixer(qkv, z, h0, heads=h, frac=0.9, backend="loop"), leaves)
    got = values_and_grads(lambda: rotated_mixer(qkv, z, h0, h, 0.9, chunk=chunk, backend="torch"), leaves)
    for name, g, w in zip(["y", "h_last", "d qkv", "d z", "d h0"], got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        assert rel(g, w) < 1e-9, (name, rel(g, w))


def test_the_final_state_continues_the_sequence():
    """Two halves, the first's h_last as the second's h0, give one run's outputs and state."""
    b, n, h, d, cut = 2, 150, 2, 4, 71
    qkv, z, h0 = inputs(b, n, h, d)
    with torch.no_grad():
        y, h_last = rotated_mixer(qkv, z, h0, h, chunk=16, backend="torch")
        y1, s = rotated_mixer(qkv[:, :cut], z[:, :cut], h0, h, chunk=16, backend="torch")
        y2, s = rotated_mixer(qkv[:, cut:], z[:, cut:], s, h, chunk=16, backend="torch")
    assert rel(torch.cat([y1, y2], 1), y) < 1e-12 and rel(s, h_last) < 1e-12


@pytest.mark.parametrize("log_mag_range", [(-1e-4, 0.0), (math.log(1e-3), math.log(0.05)),
                                           (math.log(0.5), 0.0)], ids=["near-1", "near-0", "layer-range"])
def test_float32_at_4096_steps(log_mag_range):
    """Gates near 1 (the state carries across the whole sequence), near 0, and in the layer's range
    [0.5, 1), with phases up to pi: float32 against the float64 materialized scan."""
    n, h, d = 4096, 2, 4
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, h, d, generator=g, dtype=torch.float64) for _ in range(3))
    lo, hi = log_mag_range
    log_mag = lo + (hi - lo) * torch.rand(1, n, h, generator=g, dtype=torch.float64)
    phase = math.pi * (2 * torch.rand(1, n, h, generator=g, dtype=torch.float64) - 1)
    h0 = torch.randn(1, h, d, d, generator=g, dtype=torch.complex128)
    leaves64 = [t.requires_grad_() for t in (q, k, v, log_mag, phase, h0)]
    leaves32 = [t.detach().to(torch.complex64 if t.is_complex() else torch.float32).requires_grad_()
                for t in leaves64]

    def materialized():
        q_, k_, v_, lm, ph, s0 = leaves64
        return _heads_scan(q_, k_, v_, torch.polar(lm.exp(), ph)[..., None, None], s0, "torch")
    want = values_and_grads(materialized, leaves64)
    got = values_and_grads(lambda: rotated_heads(*leaves32, backend="torch"), leaves32)
    for name, g, w in zip(["y", "h_last", "dq", "dk", "dv", "d log|a|", "d arg a", "d h0"], got, want):
        assert g.dtype == (torch.complex64 if w.is_complex() else torch.float32), name
        assert rel(g.to(w.dtype), w) < 1e-5, (name, rel(g.to(w.dtype), w))


def test_half_precision_products():
    """bf16 q, k, v (as under autocast): products in bf16, decays, phases and states in float32."""
    b, n, h, d = 2, 300, 2, 8
    qkv, z, _ = inputs(b, n, h, d, with_h0=False)
    want = composed_mixer(qkv, z, None, heads=h, backend="torch")[0]
    y, h_last = rotated_mixer(qkv.detach().bfloat16(), z.detach().float(), None, h, backend="torch")
    assert y.dtype == torch.bfloat16 and h_last.dtype == torch.complex64
    assert rel(y.double(), want) < 2e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [2, 8])
def test_an_overflowing_key_leaves_earlier_outputs_bit_identical(dtype, d):
    """k at position t the dtype's largest value: q' . k' overflows at t and after, never before."""
    b, n, h, t, chunk = 2, 2 * 64 + 5, 2, 64 + 9, 64
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, n, h, d, generator=g).to(dtype) for _ in range(3))
    log_mag, phase = log_gates(torch.randn(b, n, h, 2, generator=g))
    clean, _ = rotated_heads(q, k, v, log_mag, phase, chunk=chunk, backend="torch")
    bad = k.clone()
    bad[:, t] = torch.finfo(dtype).max
    y, _ = rotated_heads(q, bad, v, log_mag, phase, chunk=chunk, backend="torch")
    assert not torch.isfinite(y[:, t:]).all()
    assert torch.equal(y[:, :t], clean[:, :t])


def test_second_derivatives():
    qkv, z, h0 = inputs(1, 9, 2, 2)

    def f(qkv, z, h0):
        y, h_last = rotated_mixer(qkv, z, h0, 2, chunk=4, backend="torch")
        return y.square().sum() + h_last.abs().square().sum()
    assert torch.autograd.gradgradcheck(f, (qkv, z, h0))


def test_the_real_state_is_the_complex_state_turned_by_the_running_phase():
    """S_t = sum_{s<=t} exp(L_t - L_s) k'_s v_s^T equals [Re(e^{-iT_t} h_t); Im(e^{-iT_t} h_t)], decays
    by |a_t| alone (S_t = |a_t| S_{t-1} + k'_t v_t^T), and y_t = q'_t . S_t; from T = T_C back to
    T = 0 the state turns by e^{iT_C}."""
    from gateloop_hybrid.scan import gate_loop_scan
    g = torch.Generator().manual_seed(5)
    n, d = 23, 3
    q, k, v = (torch.randn(n, d, generator=g, dtype=torch.float64) for _ in range(3))
    log_mag = -torch.rand(n, generator=g, dtype=torch.float64)
    phase = math.pi * (2 * torch.rand(n, generator=g, dtype=torch.float64) - 1)
    h, _ = gate_loop_scan(torch.polar(log_mag.exp(), phase)[None, :, None, None],
                          (k[:, :, None] * v[:, None, :])[None], backend="loop")
    h = h[0]                                                    # (n, d, e) complex
    L, T = log_mag.cumsum(0), phase.cumsum(0)

    def turned(x, angle):                                       # x (.., d) as [x cos, -x sin]
        return torch.cat([x * torch.cos(angle)[..., None], -x * torch.sin(angle)[..., None]], -1)
    qr, kr = turned(q, T), turned(k, T)
    w = torch.exp(L[:, None] - L[None, :]).tril()               # exp(L_t - L_s) on s <= t
    S = torch.einsum("ts,sd,se->tde", w, kr, v)                 # (n, 2d, e)
    turned_h = torch.exp(-1j * T)[:, None, None] * h
    assert torch.allclose(S, torch.cat([turned_h.real, turned_h.imag], 1), atol=1e-12)
    assert torch.allclose(S[1:], log_mag[1:].exp()[:, None, None] * S[:-1]
                          + kr[1:, :, None] * v[1:, None, :], atol=1e-12)
    y = torch.einsum("td,tde->te", q, h.real)
    assert torch.allclose(torch.einsum("td,tde->te", qr, S), y, atol=1e-12)
    t = 11                                                      # a chunk ending at t restarts T at 0
    c, s = torch.cos(T[t]), torch.sin(T[t])
    re, im = S[t, :d], S[t, d:]
    assert torch.allclose(torch.cat([c * re - s * im, s * re + c * im]),
                          torch.cat([h[t].real, h[t].imag]), atol=1e-12)
