"""The float64 reference of h_t = a_t * h_{t-1} + x_t, with hand-written gradients.

Every fast path (the torch, JAX and Pallas backends, the benchmarks' correctness checks, the
kernel tuning script) is checked against this one module. It is sequential and computes in
float64 / complex128 whatever it is given, so its only error is one rounding per multiply-add.

    scan_reference(a, x, h0=None, reverse=False) -> (h, h_last)
        differentiable by torch (first order), through ``scan_reference_vjp``
    scan_reference_vjp(a, x, h0, h, dh, dh_last, reverse=False) -> (da, dx, dh0)
        the cotangents of (a, x, h0), in torch's complex convention

Shapes as gate_loop_scan: a (B, N, *Fa) broadcastable to x (B, N, *F), h0 (B, *F) or None,
time along dim 1. Results are float64, or complex128 when any input is complex.

The gradient is the recurrence run the other way: with G_t the total cotangent of h_t,
G_t = dh_t + conj(a_next) G_next, and dx_t = G_t, da_t = G_t conj(h_prev), dh0 = conj(a_first) G_first
(torch's convention conjugates where JAX's does not).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _wide(t: Tensor | None, complex_: bool) -> Tensor | None:
    if t is None:
        return None
    return t.to(torch.complex128 if complex_ else torch.float64)


def _is_complex(*ts) -> bool:
    return any(t is not None and t.is_complex() for t in ts)


def _forward(a: Tensor, x: Tensor, h0: Tensor | None, reverse: bool) -> tuple[Tensor, Tensor]:
    cplx = _is_complex(a, x, h0)
    a, x, h0 = _wide(a, cplx), _wide(x, cplx), _wide(h0, cplx)
    n = x.shape[1]
    h = torch.zeros_like(x[:, 0]) if h0 is None else h0
    out = torch.empty_like(x)
    for t in (range(n - 1, -1, -1) if reverse else range(n)):
        h = a[:, t] * h + x[:, t]
        out[:, t] = h
    return out, h.clone()


def _sum_to(t: Tensor, shape) -> Tensor:
    """Sum t over the dims where ``shape`` has size 1 (undo broadcasting)."""
    dims = [i for i, (s, n) in enumerate(zip(shape, t.shape)) if s == 1 and n != 1]
    return t.sum(dim=dims, keepdim=True) if dims else t


def _like(g: Tensor, ref: Tensor | None) -> Tensor | None:
    """A cotangent for a real input is the real part of the complex one."""
    if ref is None:
        return None
    return g if ref.is_complex() else g.real if g.is_complex() else g


def scan_reference_vjp(a: Tensor, x: Tensor, h0: Tensor | None, h: Tensor, dh: Tensor | None,
                       dh_last: Tensor | None, reverse: bool = False):
    """Cotangents (da, dx, dh0) of scan_reference for cotangents dh of h and dh_last of h_last
    (None means zero). Returned in float64/complex128, shaped like a, x and h0."""
    cplx = _is_complex(a, x, h0, h)
    wa, wh0 = _wide(a, cplx), _wide(h0, cplx)
    wh = _wide(h, cplx)
    wa = wa.expand(wh.shape)
    g = torch.zeros_like(wh) if dh is None else _wide(dh, cplx).expand(wh.shape)
    n = wh.shape[1]
    steps = list(range(n) if reverse else range(n - 1, -1, -1))    # backward runs the other way
    G = torch.empty_like(wh)
    carry = g[:, steps[0]] if dh_last is None else g[:, steps[0]] + _wide(dh_last, cplx)
    G[:, steps[0]] = carry
    for prev, t in zip(steps, steps[1:]):
        carry = g[:, t] + wa[:, prev].conj() * carry
        G[:, t] = carry
    start = n - 1 if reverse else 0      # the step that reads h0
    before = torch.zeros_like(wh[:, :1]) if wh0 is None else wh0.unsqueeze(1)
    h_prev = (torch.cat([wh[:, 1:], before], dim=1) if reverse
              else torch.cat([before, wh[:, :-1]], dim=1))
    da = _sum_to(G * h_prev.conj(), a.shape)
    dh0 = None if h0 is None else wa[:, start].conj() * G[:, start]
    return _like(da, a), _like(G, x), _like(dh0, h0)


class _Reference(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, x, h0, reverse):
        h, h_last = _forward(a, x, h0, reverse)
        ctx.save_for_backward(a, x, h0, h)
        ctx.reverse = reverse
        return h, h_last

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dh, dh_last):
        a, x, h0, h = ctx.saved_tensors
        da, dx, dh0 = scan_reference_vjp(a, x, h0, h, dh, dh_last, ctx.reverse)
        return da, dx, dh0, None


def scan_reference(a: Tensor, x: Tensor, h0: Tensor | None = None, reverse: bool = False):
    """Sequential float64 scan: (h, h_last), differentiable once through scan_reference_vjp."""
    return _Reference.apply(a, x, h0, reverse)
