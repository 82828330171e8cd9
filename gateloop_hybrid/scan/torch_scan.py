"""The recurrence h_t = a_t * h_{t-1} + x_t in plain torch (imports no JAX).

Three formulations, all autograd-differentiable by torch itself:

- ``scan_loop``: one step per time index, differentiated by torch's autograd; exact up to the
  rounding of one multiply-add per step. Slow (a Python loop). The float64 reference that every
  backend is tested against is ``reference.scan_reference``, with hand-written gradients.
- ``scan_odd_even``: the work-efficient associative scan (Blelloch-style odd/even recursion, as in
  the seed and in ``jax.lax.associative_scan``), about 2 log2(N) levels of elementwise kernels.
- ``scan_heinsen``: the log-space formulation of Heinsen (2023): h_t = A_t * sum_s x_s / A_s with
  A_t = prod a, computed as exp(cumsum(log a) + logcumsumexp(log x - cumsum(log a))).

All three take inputs already validated and promoted by ``gateloop_hybrid.scan.gate_loop_scan``:
``a`` (B, N, *Fa) broadcastable to ``x`` (B, N, *F), ``h0`` (B, *F) or None, all in the compute
dtype, time along dim 1. They return (h, h_last) with h of shape (B, N, *F).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _fold_h0(a: Tensor, x: Tensor, h0: Tensor | None) -> Tensor:
    """Fold the initial state into the first step: h_0 = a_0 * h0 + x_0."""
    if h0 is None:
        return x
    first = a[:, :1] * h0.unsqueeze(1) + x[:, :1]
    return torch.cat([first, x[:, 1:]], dim=1)


def _last(h: Tensor, reverse: bool) -> Tensor:
    """The final state as its own tensor, never a view of h: an in-place edit of one must not
    change the other (as with the loop and the bridged backends)."""
    return (h[:, 0] if reverse else h[:, -1]).clone()


def scan_loop(a: Tensor, x: Tensor, h0: Tensor | None = None, reverse: bool = False):
    """Sequential loop: one multiply-add per step, in the dtype it is given."""
    steps = range(x.shape[1] - 1, -1, -1) if reverse else range(x.shape[1])
    h = torch.zeros_like(x[:, 0]) if h0 is None else h0
    # unbind once: indexing a[:, t] per step would make backward write a full-size zero
    # tensor per step (quadratic in N).
    a_t, x_t = a.unbind(1), x.unbind(1)
    out = [None] * x.shape[1]
    for t in steps:
        h = a_t[t] * h + x_t[t]
        out[t] = h
    return torch.stack(out, dim=1), h


def _combine(left, right):
    # (a_l, x_l) then (a_r, x_r): h -> a_r * (a_l * h + x_l) + x_r
    a_l, x_l = left
    a_r, x_r = right
    return a_r * a_l, torch.addcmul(x_r, a_r, x_l)


def _interleave(even: Tensor, odd: Tensor, length: int) -> Tensor:
    """Merge results at even and odd time indices back into one sequence of ``length``."""
    if odd.shape[1] < even.shape[1]:
        odd = torch.cat([odd, torch.zeros_like(odd[:, :1])], dim=1)
    merged = torch.stack([even, odd], dim=2).flatten(1, 2)
    return merged[:, :length]


def _odd_even(a: Tensor, x: Tensor):
    """Inclusive scan of (a, x) pairs under ``_combine`` along dim 1."""
    n = x.shape[1]
    if n < 2:
        return a, x
    # Pair up neighbours (0,1), (2,3), ...; scan the pairs; then fill in the even positions.
    pa, px = _combine((a[:, 0:-1:2], x[:, 0:-1:2]), (a[:, 1::2], x[:, 1::2]))
    odd_a, odd_x = _odd_even(pa, px)
    # Position 2k (k >= 1) = (prefix up to 2k-1) then element 2k.
    m = (n - 1) // 2
    ea, ex = _combine((odd_a[:, :m], odd_x[:, :m]), (a[:, 2::2], x[:, 2::2]))
    even_a = torch.cat([a[:, :1], ea], dim=1)
    even_x = torch.cat([x[:, :1], ex], dim=1)
    return _interleave(even_a, odd_a, n), _interleave(even_x, odd_x, n)


def scan_odd_even(a: Tensor, x: Tensor, h0: Tensor | None = None, reverse: bool = False):
    """Associative (odd/even) scan in plain torch; a may stay broadcast over feature dims."""
    if x.shape[1] == 1:     # one step: a * h0 + x, through a even without h0 (a zero gradient)
        return scan_loop(a, x, h0, reverse)
    if reverse:
        a, x = a.flip(1), x.flip(1)
    x = _fold_h0(a, x, h0)
    _, h = _odd_even(a, x)
    if reverse:
        h = h.flip(1)
    return h, _last(h, reverse)


def scan_heinsen(a: Tensor, x: Tensor, h0: Tensor | None = None, reverse: bool = False):
    """Log-space scan (Heinsen 2023) through complex logarithms.

    Accepts any nonzero gates, real (negative ones too, through log(-r) = log r + i*pi) or
    complex, and any x. Exact zeros in ``a`` give log 0 = -inf and a NaN result.
    Non-finite inputs give NaN from the first affected step on, where the loop gives +-inf
    (an inf gate or input: exp of log inf - log inf); either way the result is not finite.
    Inputs that fall below the state so far by a factor near the edge of the floating range
    (about 1e-300 in float64, 1e-38 in float32: subnormal exp in torch's complex logcumsumexp)
    can give NaN from that step on, though the loop's result is finite.
    Precision: the two prefix sums cancel against each other, so the relative error grows with
    |sum_t log|a_t||: about 1e-5 at N=256 and 1e-3 at N=16K with sigmoid gates in float32
    (against about 1e-7 for the sequential loop). Use float64 or another backend for long sequences.
    Gradients do not go through the logarithms (whose derivatives are infinite at zeros of x or
    of a cotangent): backward is the reverse recurrence run by ``scan_odd_even``, in plain torch,
    so gradients of gradients are those of the recurrence too.
    """
    if reverse:
        a, x = a.flip(1), x.flip(1)
    x = _fold_h0(a, x, h0)
    # Dynamo cannot trace a Function with a jvp rule: compiled graphs take the one without.
    h = (_LogSpaceScan if torch.compiler.is_compiling() else _LogSpaceScanForwardAD).apply(a, x)
    if reverse:
        h = h.flip(1)
    return h, _last(h, reverse)


def _log_space_values(a: Tensor, x: Tensor) -> Tensor:
    """h_t = a_t h_{t-1} + x_t from h_{-1} = 0 as exp(log A_t + logcumsumexp(log x - log A))."""
    out_is_complex = a.is_complex() or x.is_complex()
    cdtype = torch.complex128 if x.real.dtype == torch.float64 else torch.complex64
    log_a_star = torch.cumsum(torch.log(a.to(cdtype)), dim=1)          # log A_t
    log_h = log_a_star + torch.logcumsumexp(torch.log(x.to(cdtype)) - log_a_star, dim=1)
    h = torch.exp(log_h)
    return h if out_is_complex else h.real.contiguous()    # a view would confuse forward AD


def _sum_to(t: Tensor, shape) -> Tensor:
    """Sum t over the dims where ``shape`` has size 1 and t does not (undo broadcasting)."""
    dims = [i for i, (s, n) in enumerate(zip(shape, t.shape)) if s == 1 and n != 1]
    return t.sum(dim=dims, keepdim=True) if dims else t


def _recurrence_vjp(a: Tensor, h: Tensor, g: Tensor, a_complex: bool, x_complex: bool):
    """Gradients (da, dx) of h = scan(a, x) from h_{-1} = 0 for the cotangent g (torch's complex
    convention): G_t = g_t + conj(a_{t+1}) G_{t+1} (a reverse scan), dx = G, da = G conj(h_{t-1})."""
    a_next = torch.cat([a[:, 1:], torch.zeros_like(a[:, :1])], dim=1).conj()
    if g.is_complex() and not a_next.is_complex():
        a_next = a_next.to(g.dtype)
    _, G = _odd_even(a_next.flip(1), g.flip(1))
    G = G.flip(1)
    h_prev = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], dim=1)
    da = _sum_to(G * h_prev.conj(), a.shape)
    return (da if a_complex else da.real), (G if x_complex else G.real)


class _LogSpaceScan(torch.autograd.Function):
    """The log-space forward with the recurrence's own backward (differentiable again)."""
    generate_vmap_rule = True

    @staticmethod
    def forward(a, x):
        return _log_space_values(a, x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        a, x = inputs
        ctx.save_for_backward(a, output)
        ctx.complex_in = (a.is_complex(), x.is_complex())

    @staticmethod
    def backward(ctx, g):
        a, h = ctx.saved_tensors
        return _recurrence_vjp(a, h, g, *ctx.complex_in)


class _LogSpaceScanForwardAD(_LogSpaceScan):
    """The same, with a forward-mode rule (torch.func.jvp, jacfwd, dual tensors)."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        _LogSpaceScan.setup_context(ctx, inputs, output)
        ctx.save_for_forward(inputs[0], output)

    @staticmethod
    def jvp(ctx, da, dx):
        """Forward mode: dh_t = a_t dh_{t-1} + da_t h_{t-1} + dx_t, the same recurrence."""
        a, h = ctx.saved_tensors
        u = torch.zeros_like(h) if dx is None else dx.to(h.dtype)
        if da is not None:
            u = u + da * torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], dim=1)
        _, dh = _odd_even(a.to(u.dtype) if u.is_complex() else a, u)
        return dh
