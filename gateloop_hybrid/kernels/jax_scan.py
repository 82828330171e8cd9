"""The recurrence h_t = a_t * h_{t-1} + x_t in pure JAX (imports no torch).

``scan_jax(a, x, h0, reverse)`` runs ``jax.lax.associative_scan`` forward and has a
hand-written backward (``jax.custom_vjp``): the cotangent is itself a linear recurrence run the
other way, G_t = g_t + a_{t+1} G_{t+1}, so backward is one more associative scan plus elementwise
work, and its residuals are just (a, h, h0) -- never the log2(N) levels a generic vjp would keep.

Conventions (JAX's): for complex inputs the vjp multiplies the cotangent by the derivative,
unconjugated. Torch's convention differs by a conjugate; the bridge converts.

Shapes: a (B, N, *Fa) broadcastable to x (B, N, *F); h0 (B, *F) or None; time is axis 1.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _combine(left, right):
    a_l, x_l = left
    a_r, x_r = right
    return a_r * a_l, a_r * x_l + x_r


def compute_dtype(*dtypes):
    """Result dtype of the scan, raised to at least 32 bits (bf16/fp16 accumulate in float32)."""
    dt = jnp.result_type(*dtypes)
    if jnp.issubdtype(dt, jnp.floating) and jnp.finfo(dt).bits < 32:
        return jnp.dtype(jnp.float32)
    return dt


def _first_step(x, reverse):
    return x[:, -1] if reverse else x[:, 0]


def _fold_h0(a, x, h0, reverse):
    """h at the first step is a_0 * h0 + x_0: fold h0 into x there."""
    if h0 is None:
        return x
    i = x.shape[1] - 1 if reverse else 0
    return x.at[:, i].add(_first_step(a, reverse) * h0)


def _scan_core(a, x, h0, reverse):
    _, h = jax.lax.associative_scan(_combine, (a, _fold_h0(a, x, h0, reverse)), axis=1, reverse=reverse)
    return h, (h[:, 0] if reverse else h[:, -1])


def _sum_to(t, shape):
    """Sum t over the axes where ``shape`` was broadcast (size 1), keeping dims."""
    axes = tuple(i for i, (s, n) in enumerate(zip(shape, t.shape)) if s == 1 and n != 1)
    return t.sum(axis=axes, keepdims=True) if axes else t


def scan_backward(a, h, h0, g_h, g_last, reverse=False):
    """Cotangents (da, dx, dh0) of the scan, in JAX's convention, all in the dtype of h.

    G_t = g_t + a_{t+1} G_{t+1} (the state's total cotangent) is the same recurrence run the
    other way with gates shifted by one step; then dx = G, da = G * h_{t-1}, dh0 = a_0 G_0.
    """
    last = 0 if reverse else g_h.shape[1] - 1
    g = g_h.at[:, last].add(g_last)
    zeros_a = jnp.zeros_like(a[:, :1])
    h_before = jnp.zeros_like(h[:, :1]) if h0 is None else h0[:, None]
    if reverse:   # h_t = a_t h_{t+1} + x_t, so G_t = g_t + a_{t-1} G_{t-1} runs forward in t
        a_next = jnp.concatenate([zeros_a, a[:, :-1]], axis=1)
        h_prev = jnp.concatenate([h[:, 1:], h_before], axis=1)
    else:
        a_next = jnp.concatenate([a[:, 1:], zeros_a], axis=1)
        h_prev = jnp.concatenate([h_before, h[:, :-1]], axis=1)
    _, G = jax.lax.associative_scan(_combine, (a_next, g), axis=1, reverse=not reverse)
    da = _sum_to(G * h_prev, a.shape)
    dh0 = None if h0 is None else _first_step(a, reverse) * _first_step(G, reverse)
    return da, G, dh0


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _scan(a, x, h0, reverse):
    return _scan_core(a, x, h0, reverse)


def _scan_fwd(a, x, h0, reverse):
    h, h_last = _scan_core(a, x, h0, reverse)
    return (h, h_last), (a, h, h0)


def _scan_bwd(reverse, res, cts):
    a, h, h0 = res
    return scan_backward(a, h, h0, *cts, reverse=reverse)


_scan.defvjp(_scan_fwd, _scan_bwd)


def scan_jax(a, x, h0=None, reverse=False):
    """h_t = a_t * h_{t-1} + x_t along axis 1; returns (h, h_last) in the promoted input dtype.

    Accumulates in at least float32. Differentiable; the backward is a reverse scan (above) whose
    residuals are the gates, the states and h0 only.
    """
    out_dtype = jnp.result_type(a.dtype, x.dtype, *(() if h0 is None else (h0.dtype,)))
    dt = compute_dtype(out_dtype)
    h, h_last = _scan(a.astype(dt), x.astype(dt), None if h0 is None else h0.astype(dt), reverse)
    return h.astype(out_dtype), h_last.astype(out_dtype)
