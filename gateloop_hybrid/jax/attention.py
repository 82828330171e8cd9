"""Causal softmax (or unnormalised) attention in JAX, the seed's baseline mixer, with a KV cache.

The same layer as ``gateloop_hybrid.attention.CausalFullAttention`` (arguments, cache, parameter
names, the seed's data-dependent relative-position option), with an explicit PRNG ``key``.

Dimension letters used in the shape comments:
    b batch, n query positions (the new tokens), j key positions (cached + new),
    h heads, d head dimension, D model dimension.
"""

from __future__ import annotations

from typing import Optional

import equinox as eqx
import jax
import jax.numpy as jnp

from .norms import Linear, check_features, check_sizes, polar_parts


class RotaryEmbedding(eqx.Module):
    """Rotary position embedding over the whole head dimension, interleaved pairs.

    The torch layer's numbers (``rotary_embedding_torch.RotaryEmbedding(dim)`` with its
    defaults); ``freqs`` (d/2,) is a constant, never trained (its gradient is stopped).
    Positions are built in the dtype of ``freqs``, at least float32.
    """

    freqs: jax.Array

    def __init__(self, dim: int, theta: float = 10000.0):
        if dim % 2:
            raise ValueError(f"RotaryEmbedding needs an even dim, got {dim}")
        self.freqs = 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32)[: dim // 2] / dim))  # (d/2,)

    def __call__(self, t, offset: int = 0):
        """Rotate ``t`` (..., n, d) as if its n positions start at ``offset``."""
        n = t.shape[-2]
        freqs = jax.lax.stop_gradient(self.freqs)
        freqs = freqs.astype(jnp.promote_types(freqs.dtype, jnp.float32))
        pos = jnp.arange(offset, offset + n, dtype=freqs.dtype)
        angles = jnp.repeat(pos[:, None] * freqs, 2, axis=-1)  # (n, d)
        pairs = t.reshape(*t.shape[:-1], -1, 2)
        rotated_half = jnp.stack((-pairs[..., 1], pairs[..., 0]), axis=-1).reshape(t.shape)
        out = t * jnp.cos(angles) + rotated_half * jnp.sin(angles)
        return out.astype(t.dtype)


class CausalFullAttention(eqx.Module):
    """Causal multi-head attention: ``gateloop_hybrid.CausalFullAttention`` in JAX.

    Args:
        dim, dim_head, heads, rotary_emb, add_swish_gating, data_dependent_rel_pos,
        frac_gradient_data_dependent_rel_pos, softmax_normalize: as the torch layer (the
            rel-pos cumulative product runs over each head's feature pairs, as in the seed).
        key: PRNG key for the initial weights.

    Forward cache: ``(k, v)``, each (b, h, j, d), keys and values of every position so far.
    """

    rotary_emb: Optional[RotaryEmbedding]
    to_qkv: Linear
    to_a: Optional[Linear]
    to_gates: Optional[Linear]
    to_out: Linear
    dim: int = eqx.field(static=True)
    dim_head: int = eqx.field(static=True)
    heads: int = eqx.field(static=True)
    softmax_normalize: bool = eqx.field(static=True)
    data_dependent_rel_pos: bool = eqx.field(static=True)
    frac_gradient_data_dependent_rel_pos: float = eqx.field(static=True)

    torch_keys = {"to_qkv": "to_qkv.0", "to_a": "to_a.0", "to_gates": "to_gates.0", "to_out": "to_out.1"}

    def __init__(
        self,
        dim: int,
        *,
        dim_head: int = 64,
        heads: int = 8,
        rotary_emb: bool = False,
        add_swish_gating: bool = False,
        data_dependent_rel_pos: bool = False,
        frac_gradient_data_dependent_rel_pos: float = 0.5,
        softmax_normalize: Optional[bool] = None,
        key,
    ):
        check_sizes("CausalFullAttention", dim=dim, dim_head=dim_head, heads=heads)
        if data_dependent_rel_pos and dim_head % 2:
            raise ValueError(f"data_dependent_rel_pos needs an even dim_head, got {dim_head}")
        dim_inner = dim_head * heads
        self.dim, self.dim_head, self.heads = dim, dim_head, heads
        self.softmax_normalize = (not data_dependent_rel_pos) if softmax_normalize is None else softmax_normalize
        self.data_dependent_rel_pos = data_dependent_rel_pos
        self.frac_gradient_data_dependent_rel_pos = frac_gradient_data_dependent_rel_pos
        kq, ka, kg, ko = jax.random.split(key, 4)
        self.rotary_emb = RotaryEmbedding(dim_head) if rotary_emb else None
        self.to_qkv = Linear(dim, dim_inner * 3, bias=False, key=kq)
        self.to_a = Linear(dim, dim_inner, bias=False, key=ka) if data_dependent_rel_pos else None
        self.to_gates = Linear(dim, dim_inner, bias=False, key=kg) if add_swish_gating else None
        self.to_out = Linear(dim_inner, dim, key=ko)

    def _heads(self, t):
        """(b, n, h d) -> (b, h, n, d)"""
        b, n, _ = t.shape
        return t.reshape(b, n, self.heads, -1).transpose(0, 2, 1, 3)

    def _rel_pos_scale(self, x, ablate_complex: bool):
        """Per-position, per-feature-pair scale (b, h, n, d/2, 1) of the seed's rel-pos option."""
        frac = self.frac_gradient_data_dependent_rel_pos
        z = self._heads(self.to_a(x))  # (b, h, n, d)
        z = z.reshape(*z.shape[:-1], -1, 2)  # (b, h, n, d/2, 2)
        z = z * frac + jax.lax.stop_gradient(z) * (1 - frac)
        if jnp.finfo(z.dtype).bits < 32:
            z = z.astype(jnp.float32)  # complex needs float32 or wider
        re, im = z[..., 0], z[..., 1]
        if ablate_complex:
            im = jnp.zeros_like(im)
        magnitude, phase = polar_parts(re, im)
        r = jax.nn.sigmoid(magnitude)
        a = jax.lax.complex(r * jnp.cos(phase), r * jnp.sin(phase))  # (b, h, n, d/2)
        a_cumprod = jnp.cumprod(a, axis=-1)[..., None]  # over the feature pairs, as the seed
        return jnp.maximum(a_cumprod.real, 1e-10)

    def _check_cache(self, cache, x) -> None:
        what = "cache must be the (k, v) pair returned with return_cache=True by this attention layer"
        if hasattr(cache, "shape"):
            raise TypeError(f"CausalFullAttention: {what}, got one array of shape {tuple(cache.shape)} "
                            f"(a GateLoop state?)")
        if not isinstance(cache, (tuple, list)) or len(cache) != 2 or not all(hasattr(t, "shape") for t in cache):
            raise TypeError(f"CausalFullAttention: {what}, got {type(cache).__name__}")
        b = x.shape[0]
        for name, t in zip("kv", cache):
            if t.ndim != 4 or (t.shape[0], t.shape[1], t.shape[3]) != (b, self.heads, self.dim_head):
                raise ValueError(f"CausalFullAttention: cache {name} must have shape (batch, heads, past, "
                                 f"dim_head) = ({b}, {self.heads}, past, {self.dim_head}) for this input, "
                                 f"got {tuple(t.shape)}")
        if cache[0].shape != cache[1].shape:
            raise ValueError(f"CausalFullAttention: cache k {tuple(cache[0].shape)} and v "
                             f"{tuple(cache[1].shape)} differ")

    def __call__(
        self,
        x,
        ablate_complex: bool = False,
        ablate_state_transition: bool = False,
        cache=None,
        return_cache: bool = False,
    ):
        """Attend causally over the cached keys and the new positions.

        x (b, n, D) -> (b, n, D), or ``(out, (k, v))`` when ``return_cache``; ``cache`` is the
        ``(k, v)`` of an earlier call, each (b, h, j_past, d).
        """
        check_features(x, self.dim, "CausalFullAttention")
        if cache is not None:
            self._check_cache(cache, x)
        q, k, v = map(self._heads, jnp.split(self.to_qkv(x), 3, axis=-1))  # each (b, h, n, d)
        offset = 0 if cache is None else cache[0].shape[-2]

        if self.rotary_emb is not None:
            q = self.rotary_emb(q, offset=offset)
            k = self.rotary_emb(k, offset=offset)

        q = q * self.dim_head**-0.5

        if self.data_dependent_rel_pos and not ablate_state_transition:
            rel = self._rel_pos_scale(x, ablate_complex)  # (b, h, n, d/2, 1)
            pairs = lambda t: t.reshape(*t.shape[:-1], -1, 2)
            q = (pairs(q) * rel.astype(q.dtype)).reshape(q.shape)
            k = (pairs(k) * (1.0 / rel).astype(k.dtype)).reshape(k.shape)

        if cache is not None:
            k = jnp.concatenate((cache[0].astype(k.dtype), k), axis=-2)  # (b, h, j, d)
            v = jnp.concatenate((cache[1].astype(v.dtype), v), axis=-2)

        i, j = q.shape[-2], k.shape[-2]
        sim = jnp.einsum("bhid,bhjd->bhij", q, k)
        # causal, aligned to the last key (bottom right): query i sees keys up to i + j - i
        future = jnp.triu(jnp.ones((i, j), dtype=bool), j - i + 1)
        if self.softmax_normalize:
            simf = sim.astype(jnp.promote_types(sim.dtype, jnp.float32))
            attn = jax.nn.softmax(jnp.where(future, jnp.finfo(simf.dtype).min, simf), axis=-1).astype(sim.dtype)
        else:
            attn = jnp.where(future, 0.0, sim)
        out = jnp.einsum("bhij,bhjd->bhid", attn, v)  # (b, h, n, d)

        if self.to_gates is not None:
            out = out * self._heads(jax.nn.silu(self.to_gates(x)))

        b, _, n, _ = out.shape
        out = self.to_out(out.transpose(0, 2, 1, 3).reshape(b, n, -1))  # (b, n, D)
        return (out, (k, v)) if return_cache else out
