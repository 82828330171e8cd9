"""GateLoop mixers in JAX: data-controlled linear recurrences computed by the pure-JAX scans.

The same layers as ``gateloop_hybrid.gate_loop`` (constructor arguments, forward arguments,
caches, parameter names), with an explicit PRNG ``key`` for the initial weights.

Dimension letters used in the shape comments:
    b batch, n time (the new tokens), h heads, d and e head dimensions (d = e),
    D model dimension, I inner dimension (h * d).
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import equinox as eqx
import jax
import jax.numpy as jnp

from .. import routing
from ..checks import check_options
from ..kernels.jax_scan import scan_jax
from ..routing import CHUNK
from .norms import LayerNorm, Linear, RMSNorm, check_features, check_sizes, polar_parts, refuse_torch

BACKENDS = routing.JAX_BACKENDS


def check_backend(scan_backend: str) -> str:
    return routing.check_backend(scan_backend, framework="jax")


def scan(a, x, h0=None, *, reverse: bool = False, backend: str = "auto"):
    """h_t = a_t * h_{t-1} + x_t along axis 1 -> (h, h_last), as ``gateloop_hybrid.scan``'s contract.

    The path is ``routing.route``'s: "auto" and "jax" run ``jax.lax.associative_scan`` with a
    reverse-scan backward (any device, any float dtype); "pallas" the Triton-lowered Pallas
    kernels (a GPU, 32 bits or fewer).
    """
    if not isinstance(reverse, bool):
        raise TypeError(f"scan: reverse must be a bool, got {type(reverse).__name__} {reverse!r}")
    path = routing.route("scan", backend, device=_default_backend(), framework="jax").path
    if path == "triton":
        from ..kernels import pallas_scan
        return pallas_scan.scan_pallas(a, x, h0, reverse=reverse)
    return scan_jax(a, x, h0, reverse=reverse)


def _gate_looped_heads(q, k, v, a, h0, backend: str):
    """y_t = q_t . Re(h_t) with h_t = a_t h_{t-1} + k_t v_t^T, per (batch, head).

    q, k, v: (b, n, h, d) real. a: (b, n, h, 1, 1) complex (one gate per head, never expanded).
    h0: (b, h, d, e) complex or None. Returns y (b, n, h, e) and the final state (b, h, d, e).
    """
    kv = jnp.einsum("bnhd,bnhe->bnhde", k, v)  # real; the scan promotes to complex
    h, h_last = scan(a, kv, h0, backend=backend)  # (b, n, h, d, e) complex
    y = jnp.einsum("bnhd,bnhde->bnhe", q, h.real.astype(q.dtype))
    return y, h_last


def _default_backend() -> str:
    """JAX's default backend ("cpu", "gpu"): the device fact the routing function gets."""
    return jax.default_backend()


def _chunked_heads(q, k, v, log_mag, phase, h0, backend: str, chunk: int = CHUNK):
    """``_gate_looped_heads`` in chunked form (``gateloop_hybrid.chunked`` in JAX): the same y and
    final state without forming a (d, e) state per token.

    Inside a chunk of C steps, y_t = sum_{s<=t} exp(L_t - L_s) cos(T_t - T_s) (q_t . k_s) v_s, with
    L and T the running sums of log|a| and arg a from the chunk's start; across chunks a (d, e)
    complex state per head, scanned over the chunks. q, k, v: (b, n, h, d) real, products in their
    dtype; log_mag, phase: (b, n, h), float32 or wider, for decays and states.
    """
    b, n, h, d = q.shape
    real = log_mag.dtype
    size = min(chunk, n)
    pad = -n % size
    c = (n + pad) // size

    def blocks(t):  # (b, n, h, ...) -> (b, c, h, C, ...): the scan's layout
        if pad:
            t = jnp.pad(t, [(0, 0), (0, pad)] + [(0, 0)] * (t.ndim - 2))
        return jnp.moveaxis(t.reshape(b, c, size, *t.shape[2:]), 2, 3)

    qb, kb, vb = blocks(q), blocks(k), blocks(v)          # (b, c, h, C, d)
    L = jnp.cumsum(blocks(log_mag), axis=-1)              # (b, c, h, C)
    T = jnp.cumsum(blocks(phase), axis=-1)

    # the causal mask selects, never multiplies: a later key's q . k may overflow (0 * inf = nan)
    causal = jnp.tril(jnp.ones((size, size), dtype=bool))
    decay = jnp.exp(jnp.where(causal, L[..., :, None] - L[..., None, :], -jnp.inf))   # s <= t only
    weight = decay * jnp.cos(T[..., :, None] - T[..., None, :])
    scores = jnp.where(causal, jnp.einsum("bchtd,bchsd->bchts", qb, kb).astype(real) * weight, 0.0)
    y = jnp.einsum("bchts,bchsd->bchtd", scores.astype(q.dtype), vb)

    to_end_mag = jnp.exp(L[..., -1:] - L)                 # |A_C / A_s| <= 1 for |a| <= 1
    to_end_arg = T[..., -1:] - T

    def weighted_kv(w):                                   # sum_s w_s k_s v_s^T
        return jnp.einsum("bchsd,bchse->bchde", kb, (vb * w[..., None].astype(real)).astype(q.dtype)).astype(real)
    own = jax.lax.complex(weighted_kv(to_end_mag * jnp.cos(to_end_arg)),
                          weighted_kv(to_end_mag * jnp.sin(to_end_arg)))   # (b, c, h, d, e)
    gate_mag = jnp.exp(L[..., -1])
    gate = jax.lax.complex(gate_mag * jnp.cos(T[..., -1]), gate_mag * jnp.sin(T[..., -1]))   # (b, c, h)

    states, h_last = scan(gate[..., None, None], own, h0, backend=backend)   # (b, c, h, d, e)
    first = jnp.zeros_like(states[:, :1]) if h0 is None else h0[:, None].astype(states.dtype)
    before = jnp.concatenate([first, states[:, :-1]], axis=1)   # the state at each chunk's start

    q_re, q_im = (jnp.einsum("bchtd,bchde->bchte", qb, part.astype(q.dtype)).astype(real)
                  for part in (before.real, before.imag))
    from_start = jnp.exp(L)[..., None]                    # |A_t| relative to the chunk start
    carried = from_start * (jnp.cos(T)[..., None] * q_re - jnp.sin(T)[..., None] * q_im)
    y = (y.astype(real) + carried).astype(q.dtype)
    y = jnp.moveaxis(y, 3, 2).reshape(b, c * size, h, d)
    return y[:, :n], h_last


class GateLoopedAttention(eqx.Module):
    """GateLoop as an attention replacement (Katsch 2023): ``gateloop_hybrid.GateLoopedAttention``
    in JAX.

    For each head, ``h_t = a_t h_{t-1} + k_t v_t^T`` with a complex scalar gate
    ``a_t = sigmoid(|z_t|) exp(i arg z_t)`` computed from the input, and ``y_t = q_t Re(h_t)``.

    Args:
        dim, heads, dim_inner, checkpoint_gate_looped_attn, add_swish_gating, sub_ln,
        frac_gradient_state_transition: as the torch layer (``checkpoint_gate_looped_attn``
            wraps the scan in ``jax.checkpoint``: recomputed in backward, not stored).
        scan_backend: "auto" (= "jax"), "jax" or "pallas" (GPU).
        key: PRNG key for the initial weights.

    Forward cache: the complex state, shape (b, h, d, e).
    """

    to_qkv: Linear
    to_a: Linear
    sub_ln: Optional[LayerNorm]
    to_gates: Optional[Linear]
    to_out: Optional[Linear]
    dim: int = eqx.field(static=True)
    heads: int = eqx.field(static=True)
    frac_gradient_state_transition: float = eqx.field(static=True)
    checkpoint_gate_looped_attn: bool = eqx.field(static=True)
    scan_backend: str = eqx.field(static=True)

    # field -> the torch module's key (nn.Sequential members are numbered)
    torch_keys = {"to_a": "to_a.0", "sub_ln": "maybe_sub_ln", "to_gates": "to_gates.0"}

    def __init__(
        self,
        dim: int,
        heads: Optional[int] = None,
        dim_inner: Optional[int] = None,
        checkpoint_gate_looped_attn: bool = True,
        add_swish_gating: bool = True,
        sub_ln: bool = False,
        frac_gradient_state_transition: float = 0.9,
        scan_backend: str = "auto",
        *,
        key,
    ):
        check_sizes("GateLoopedAttention", dim=dim, heads=heads, dim_inner=dim_inner)
        check_options("GateLoopedAttention", checkpoint_gate_looped_attn=checkpoint_gate_looped_attn,
                      add_swish_gating=add_swish_gating, sub_ln=sub_ln,
                      frac_gradient_state_transition=frac_gradient_state_transition)
        dim_inner = dim if dim_inner is None else dim_inner
        heads = dim_inner if heads is None else heads
        if dim_inner % heads:
            raise ValueError(f"dim_inner ({dim_inner}) must be divisible by the number of heads ({heads})")
        self.dim, self.heads = dim, heads
        self.frac_gradient_state_transition = frac_gradient_state_transition
        self.checkpoint_gate_looped_attn = checkpoint_gate_looped_attn
        self.scan_backend = check_backend(scan_backend)
        kq, ka, kg, ko = jax.random.split(key, 4)
        self.to_qkv = Linear(dim, dim_inner * 3, bias=False, key=kq)
        self.to_a = Linear(dim, heads * 2, key=ka)
        self.sub_ln = LayerNorm(dim_inner) if sub_ln else None
        self.to_gates = Linear(dim, dim_inner, bias=False, key=kg) if add_swish_gating else None
        needs_proj = dim_inner != dim or add_swish_gating
        self.to_out = Linear(dim_inner, dim, bias=False, key=ko) if needs_proj else None

    def _gates(self, x, ablate_complex: bool, ablate_state_transition: bool, log_polar: bool = False):
        """Complex state-transition gates, (b, n, h, 1, 1); with ``log_polar``, (log|a|, arg a),
        each (b, n, h) real, for the chunked form."""
        b, n, _ = x.shape
        frac = self.frac_gradient_state_transition
        z = self.to_a(x).reshape(b, n, self.heads, 1, 1, 2)
        z = z * frac + jax.lax.stop_gradient(z) * (1 - frac)
        if jnp.finfo(z.dtype).bits < 32:
            z = z.astype(jnp.float32)  # complex needs float32 or wider
        if ablate_state_transition:
            if log_polar:
                zero = jnp.zeros(z.shape[:3], z.dtype)
                return zero, zero
            return jnp.ones(z.shape[:-1], z.dtype) + 0j
        re, im = z[..., 0], z[..., 1]
        if ablate_complex:
            im = jnp.zeros_like(im)
        # sigmoid on the magnitude, identity on the phase
        magnitude, phase = polar_parts(re, im)
        if log_polar:
            return jax.nn.log_sigmoid(magnitude)[..., 0, 0], phase[..., 0, 0]
        r = jax.nn.sigmoid(magnitude)
        return jax.lax.complex(r * jnp.cos(phase), r * jnp.sin(phase))

    def __call__(
        self,
        x,
        ablate_complex: bool = False,
        ablate_state_transition: bool = False,
        cache=None,
        return_cache: bool = False,
    ):
        """Mix along time: x (b, n, D) -> (b, n, D), or ``(out, state)`` when ``return_cache``.

        ``cache`` is the state (b, h, d, e) after the previous chunk; x then holds the new
        positions only.
        """
        check_features(x, self.dim, "GateLoopedAttention")
        check_options("GateLoopedAttention", ablate_complex=ablate_complex,
                      ablate_state_transition=ablate_state_transition, return_cache=return_cache)
        b, n, _ = x.shape
        if n == 0:
            raise ValueError(f"GateLoopedAttention: x has no time steps, shape {tuple(x.shape)}")
        q, k, v = jnp.split(self.to_qkv(x), 3, axis=-1)
        q, k, v = (t.reshape(b, n, self.heads, -1) for t in (q, k, v))  # each (b, n, h, d)
        if cache is not None:
            d = q.shape[-1]
            refuse_torch(cache, "GateLoopedAttention", "cache")
            if isinstance(cache, (tuple, list)) or not hasattr(cache, "shape"):
                raise TypeError(f"GateLoopedAttention: cache must be the state array returned with "
                                f"return_cache=True, got {type(cache).__name__} (an attention layer's "
                                f"(k, v) cache?)")
            if tuple(cache.shape) != (b, self.heads, d, d):
                raise ValueError(f"GateLoopedAttention: cache must be the state from return_cache=True, "
                                 f"shape (batch, heads, d, e) = {(b, self.heads, d, d)}, got {tuple(cache.shape)}")
            if not jnp.iscomplexobj(cache):
                raise TypeError(f"GateLoopedAttention: cache must be the complex state from "
                                f"return_cache=True, got a real array of dtype {cache.dtype}")

        form = routing.route("mixer", self.scan_backend, device=_default_backend(), heads=self.heads,
                             width=q.shape[-1], framework="jax").path
        if form == "chunked":   # wider heads: no (d, e) state per token
            gates = self._gates(x, ablate_complex, ablate_state_transition, log_polar=True)
            fn = partial(_chunked_heads, backend=self.scan_backend)
        else:                   # one feature per head: the states are per-token scalars
            gates = (self._gates(x, ablate_complex, ablate_state_transition),)   # (b, n, h, 1, 1)
            fn = partial(_gate_looped_heads, backend=self.scan_backend)
        if self.checkpoint_gate_looped_attn:
            fn = jax.checkpoint(fn)
        y, h_last = fn(q, k, v, *gates, cache)

        out = y.reshape(b, n, -1)  # (b, n, I)
        if self.sub_ln is not None:
            out = self.sub_ln(out)
        if self.to_gates is not None:
            out = jax.nn.silu(self.to_gates(x)) * out
        if self.to_out is not None:
            out = self.to_out(out)  # (b, n, D)
        return (out, h_last) if return_cache else out


def _resolve_simple_backend(scan_backend: str, use_heinsen: bool, use_jax: bool) -> str:
    """Map the seed's boolean flags onto one backend name; refuse what JAX has no scan for."""
    check_backend(scan_backend)
    if use_heinsen:
        raise ValueError("use_heinsen=True asks for the log-space scan, a torch backend; "
                         "the JAX layer runs scan_backend 'jax' or 'pallas'")
    if use_jax and scan_backend not in ("auto", "jax"):
        raise ValueError(f"use_jax_associative_scan=True asks for scan_backend='jax', which conflicts "
                         f"with scan_backend={scan_backend!r}; pass only scan_backend")
    return "jax" if use_jax else scan_backend


class SimpleGateLoopLayer(eqx.Module):
    """The seed's simplified GateLoop: ``gateloop_hybrid.SimpleGateLoopLayer`` in JAX.

    ``h_t = sigmoid(a_t) * h_{t-1} + kv_t`` and ``y_t = q_t * h_t`` per channel, where
    q, kv, a are three linear maps of the (optionally RMS-normed) input.

    Args:
        dim, prenorm, post_ln, reverse: as the torch layer.
        use_heinsen: refused (the log-space scan is a torch backend).
        use_jax_associative_scan: the seed's alias for ``scan_backend="jax"``.
        scan_backend: "auto" (= "jax"), "jax" or "pallas" (GPU).
        key: PRNG key for the initial weights.

    Forward cache: the state after the last position, shape (b, D).
    """

    norm: Optional[RMSNorm]
    to_qkva: Linear
    post_ln: Optional[LayerNorm]
    dim: int = eqx.field(static=True)
    reverse: bool = eqx.field(static=True)
    scan_backend: str = eqx.field(static=True)

    torch_keys = {"to_qkva": "to_qkva.0", "post_ln": "maybe_post_ln"}

    def __init__(
        self,
        dim: int,
        prenorm: bool = True,
        use_heinsen: bool = False,
        use_jax_associative_scan: bool = False,
        post_ln: bool = False,
        reverse: bool = False,
        scan_backend: str = "auto",
        *,
        key,
    ):
        check_sizes("SimpleGateLoopLayer", dim=dim)
        check_options("SimpleGateLoopLayer", prenorm=prenorm, use_heinsen=use_heinsen,
                      use_jax_associative_scan=use_jax_associative_scan, post_ln=post_ln, reverse=reverse)
        self.dim, self.reverse = dim, reverse
        self.scan_backend = _resolve_simple_backend(scan_backend, use_heinsen, use_jax_associative_scan)
        self.norm = RMSNorm(dim) if prenorm else None
        self.to_qkva = Linear(dim, dim * 3, bias=False, key=key)
        self.post_ln = LayerNorm(dim) if post_ln else None

    def __call__(self, x, cache=None, return_cache: bool = False):
        """Mix along time: x (b, n, D) -> (b, n, D), or ``(out, state)`` when ``return_cache``.

        ``cache`` is the state (b, D) after the previous chunk.
        """
        check_options("SimpleGateLoopLayer", return_cache=return_cache)
        if self.reverse and (cache is not None or return_cache):
            raise ValueError("SimpleGateLoopLayer(reverse=True) cannot continue from or return a cache: "
                             "a reversed scan needs the whole sequence")
        check_features(x, self.dim, "SimpleGateLoopLayer")
        if x.shape[1] == 0:
            raise ValueError(f"SimpleGateLoopLayer: x has no time steps, shape {tuple(x.shape)}")
        if cache is not None and tuple(getattr(cache, "shape", ())) != (x.shape[0], self.dim):
            raise ValueError(f"SimpleGateLoopLayer: cache must have shape (batch, dim) = "
                             f"{(x.shape[0], self.dim)}, got {getattr(cache, 'shape', type(cache).__name__)}")
        if self.norm is not None:
            x = self.norm(x)
        q, kv, a = jnp.split(self.to_qkva(x), 3, axis=-1)  # each (b, n, D)
        h, h_last = scan(jax.nn.sigmoid(a), kv, cache, reverse=self.reverse, backend=self.scan_backend)
        out = q * h
        if self.post_ln is not None:
            out = self.post_ln(out)
        return (out, h_last) if return_cache else out
