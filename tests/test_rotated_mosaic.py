"""The wide-head Mosaic GPU kernels (kernels/mosaic_rotated.py, ops/rotated.py) against the float64
rotated form, values and every gradient, in Pallas's interpret mode on the CPU (on a GPU with
the same test in test_cuda.py).

Interpret mode is slow (tens of seconds a call), so one case here covers the most: two chunks and
a ragged third, a continued state h0, and a cotangent for h_last. The other shapes (d = 128, split
value columns) run with ``-m kernels``.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("jax")

from gateloop_hybrid.ops.rotated import rotated_heads_mosaic, supported  # noqa: E402
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
    y, h_last = fn(*leaves)
    g = torch.Generator().manual_seed(seed)
    wy = torch.randn(y.shape, generator=g)
    wh = torch.randn(h_last.shape, generator=g, dtype=torch.complex128)
    loss = (y.double() * wy.double()).sum() + (h_last.to(torch.complex128) * wh).real.sum()
    grads = torch.autograd.grad(loss, [t for t in leaves if t is not None])
    return [y, h_last, *grads]


def compare(b, n, h, d, h0=True):
    low = cases(b, n, h, d, h0=h0)
    wide = [t if t is None else (t.detach().double() if not t.is_complex() else t.detach().to(torch.complex128))
            .requires_grad_() for t in low]
    got = run(rotated_heads_mosaic, low)
    want = run(rotated_heads, wide)
    names = ["y", "h_last", "dq", "dk", "dv", "dlog|a|", "dphase", "dh0"]
    for name, a, w in zip(names, got, want):
        a, w = a.detach().to(w.dtype), w.detach()
        err = float((a - w).abs().max() / w.abs().max())
        assert err < 2e-2, f"{name}: relative error {err:.2e} at b={b}, n={n}, h={h}, d={d}"


def test_kernels_equal_the_float64_rotated_form():
    compare(1, 150, 2, 64)


@pytest.mark.kernels
@pytest.mark.parametrize("b,n,h,d,h0", [(2, 64, 1, 128, True), (1, 200, 1, 64, False), (1, 1, 2, 64, True)])
def test_kernels_equal_the_float64_rotated_form_more_shapes(b, n, h, d, h0):
    compare(b, n, h, d, h0)


def test_supported_names_what_the_kernels_refuse():
    q = torch.zeros(1, 8, 2, 64, dtype=torch.bfloat16)
    g = torch.zeros(1, 8, 2)
    assert supported(q, q, q, g, g, None) is None
    assert "float32" in supported(q.float(), q.float(), q.float(), g, g, None)
    assert "head width 32" in supported(q[..., :32], q[..., :32], q[..., :32], g, g, None)
    assert "complex64" in supported(q, q, q, g, g, torch.zeros(1, 2, 64, 64, dtype=torch.complex128))
    with pytest.raises(ValueError, match="rotated_heads_mosaic"):
        rotated_heads_mosaic(q.float(), q.float(), q.float(), g, g)
