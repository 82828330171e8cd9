"""Inputs and the loss that the wide-head mixer tests share (test_chunked.py, test_rotated.py)."""

from __future__ import annotations

import torch


def inputs(b, n, h, d, dtype=torch.float64, seed=0, with_h0=True):
    """qkv (b, n, 3 h d) and z (b, n, 2 h) as leaves, and h0 (b, h, d, d) complex or None."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(b, n, 3 * h * d, generator=g, dtype=dtype).requires_grad_()
    z = torch.randn(b, n, 2 * h, generator=g, dtype=dtype).requires_grad_()
    h0 = None
    if with_h0:
        h0 = torch.randn(b, h, d, d, generator=g, dtype=torch.complex128 if dtype == torch.float64
                         else torch.complex64).requires_grad_()
    return qkv, z, h0


def values_and_grads(fn, leaves, seed=1):
    """[y, h_last, and the gradient of a random linear loss in each leaf that is not None] of
    fn() -> (y, h_last); a leaf the output does not reach gets None."""
    y, h_last = fn()
    g = torch.Generator().manual_seed(seed)
    wy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)
    wh = torch.randn(h_last.shape, generator=g, dtype=torch.complex128).to(h_last.dtype)
    loss = (y * wy).sum() + (h_last * wh).real.sum()
    grads = torch.autograd.grad(loss, [t for t in leaves if t is not None], allow_unused=True)
    return [y, h_last, *grads]
