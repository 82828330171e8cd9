"""The seed's language model in JAX: token embedding, depth x (mixer, feedforward), logits.

``gateloop_hybrid.Transformer`` with the same constructor and forward arguments, caches and
parameter names (so state dicts convert one to one, see ``convert.py``), plus an explicit PRNG
``key`` for the initial weights and for ``generate``.

Dimension letters used in the shape comments:
    b batch, n time (the new tokens), D model dimension, V vocabulary size.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import List, Optional, Sequence, Tuple, Union

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .attention import CausalFullAttention
from .gate_loop import GateLoopedAttention, check_backend
from .norms import Embedding, LayerNorm, Linear, RMSNorm, check_sizes, refuse_torch


class FeedForward(eqx.Module):
    """Linear(D, mult D) -> GELU (exact) -> Linear(mult D, D); torch keys "0" and "2"."""

    proj_in: Linear
    proj_out: Linear

    torch_keys = {"proj_in": "0", "proj_out": "2"}

    def __init__(self, dim: int, mult: int = 4, *, key):
        kin, kout = jax.random.split(key)
        self.proj_in = Linear(dim, dim * mult, key=kin)
        self.proj_out = Linear(dim * mult, dim, key=kout)

    def __call__(self, x):
        return self.proj_out(jax.nn.gelu(self.proj_in(x), approximate=False))


class PreNorm(eqx.Module):
    """``fn(RMSNorm(x)) + x``; with ``return_cache=True`` the mixer's cache is passed on."""

    fn: eqx.Module
    norm: RMSNorm

    def __init__(self, dim: int, fn: eqx.Module):
        self.fn, self.norm = fn, RMSNorm(dim)

    def __call__(self, x, **kwargs):
        out = self.fn(self.norm(x), **kwargs)
        if kwargs.get("return_cache", False):
            out, cache = out
            return out + x, cache
        return out + x


class PostNorm(eqx.Module):
    """``LayerNorm(fn(x) + x)``; with ``return_cache=True`` the mixer's cache is passed on."""

    fn: eqx.Module
    norm: LayerNorm

    def __init__(self, dim: int, fn: eqx.Module):
        self.fn, self.norm = fn, LayerNorm(dim)

    def __call__(self, x, **kwargs):
        out = self.fn(x, **kwargs)
        if kwargs.get("return_cache", False):
            out, cache = out
            return self.norm(out + x), cache
        return self.norm(out + x)


Block = Union[PreNorm, PostNorm]


class Transformer(eqx.Module):
    """Decoder-only language model: ``gateloop_hybrid.Transformer`` in JAX.

    Args:
        dim, num_tokens, depth, dim_head, heads, ff_mult, checkpoint_gate_looped_attn,
        use_gate_looped_attn, gate_loop_heads, attn_add_swish_gating, dim_gate_looped_attn,
        attn_softmax_normalize, data_dependent_rel_pos, frac_gradient_state_transition,
        ablate_complex, ablate_state_transition, rotary_emb, post_ln_norm, sub_ln: as the torch
            Transformer.
        scan_backend: "auto" (= "jax"), "jax" or "pallas" (GPU).
        key: PRNG key for the initial weights (drawn from the distributions torch's layers use).

    Weights from a torch state dict: ``gateloop_hybrid.jax.from_torch_state_dict``.
    """

    token_emb: Embedding
    layers: List[Tuple[Block, Block]]
    final_norm: Optional[RMSNorm]
    to_logits: Linear
    num_tokens: int = eqx.field(static=True)
    ablate_complex: bool = eqx.field(static=True)
    ablate_state_transition: bool = eqx.field(static=True)

    def __init__(
        self,
        dim: int,
        *,
        num_tokens: int,
        depth: int,
        dim_head: int = 64,
        heads: int = 8,
        ff_mult: int = 4,
        checkpoint_gate_looped_attn: bool = True,
        use_gate_looped_attn: bool = True,
        gate_loop_heads: Optional[int] = None,
        attn_add_swish_gating: bool = True,
        dim_gate_looped_attn: Optional[int] = None,
        attn_softmax_normalize: Optional[bool] = None,
        data_dependent_rel_pos: bool = False,
        frac_gradient_state_transition: float = 0.9,
        ablate_complex: bool = False,
        ablate_state_transition: bool = False,
        rotary_emb: bool = False,
        post_ln_norm: bool = False,
        sub_ln: bool = False,
        scan_backend: str = "auto",
        key,
    ):
        check_sizes("Transformer", dim=dim, num_tokens=num_tokens, depth=depth, ff_mult=ff_mult)
        if use_gate_looped_attn:
            check_sizes("Transformer", gate_loop_heads=gate_loop_heads, dim_gate_looped_attn=dim_gate_looped_attn)
        else:
            check_sizes("Transformer", heads=heads, dim_head=dim_head)
        check_backend(scan_backend)
        self.num_tokens = num_tokens
        self.ablate_complex = ablate_complex
        self.ablate_state_transition = ablate_state_transition
        kemb, klogits, *kl = jax.random.split(key, 2 + 2 * depth)
        self.token_emb = Embedding(num_tokens, dim, key=kemb)

        wrapper = PostNorm if post_ln_norm else PreNorm
        layers = []
        for kmix, kff in zip(kl[::2], kl[1::2]):
            if use_gate_looped_attn:
                mixer = GateLoopedAttention(
                    dim=dim, heads=gate_loop_heads, dim_inner=dim_gate_looped_attn,
                    add_swish_gating=attn_add_swish_gating, sub_ln=sub_ln,
                    checkpoint_gate_looped_attn=checkpoint_gate_looped_attn,
                    frac_gradient_state_transition=frac_gradient_state_transition,
                    scan_backend=scan_backend, key=kmix,
                )
            else:
                mixer = CausalFullAttention(
                    dim=dim, dim_head=dim_head, heads=heads, rotary_emb=rotary_emb,
                    add_swish_gating=attn_add_swish_gating, softmax_normalize=attn_softmax_normalize,
                    data_dependent_rel_pos=data_dependent_rel_pos,
                    frac_gradient_data_dependent_rel_pos=frac_gradient_state_transition, key=kmix,
                )
            layers.append((wrapper(dim, mixer), wrapper(dim, FeedForward(dim, ff_mult, key=kff))))
        self.layers = layers
        # torch: Sequential(RMSNorm, Linear), or the bare Linear when post_ln_norm
        self.final_norm = None if post_ln_norm else RMSNorm(dim)
        self.to_logits = Linear(dim, num_tokens, bias=False, key=klogits)

    def torch_keys(self) -> dict:
        if self.final_norm is None:
            return {}
        return {"final_norm": "to_logits.0", "to_logits": "to_logits.1"}

    def __call__(
        self,
        x,
        return_loss: bool = False,
        ablate_complex: Optional[bool] = None,
        ablate_state_transition: Optional[bool] = None,
        cache: Optional[Sequence] = None,
        return_cache: bool = False,
    ):
        """Logits, next-token loss, or logits plus a decoding cache.

        Args:
            x: integer token ids (b, n); with ``cache``, only the new tokens.
            return_loss: return the mean cross-entropy of predicting x[:, 1:] from x[:, :-1]
                (computed in at least float32).
            ablate_complex, ablate_state_transition: override the constructor's defaults.
            cache: per-layer caches from an earlier call with ``return_cache=True``.
            return_cache: also return the per-layer caches after these tokens (a list of
                length depth: the complex GateLoop state (b, h, d, e) per layer, or the
                attention ``(k, v)`` pair).

        Returns:
            logits (b, n, V); the loss (a scalar) when ``return_loss``;
            ``(logits, cache)`` when ``return_cache``.

        Runs jitted (compiled once per shapes and flags; inside a caller's jit it is inlined):
        op-by-op, every JAX primitive would compile on its first call.
        """
        if return_loss and (cache is not None or return_cache):
            raise ValueError("return_loss=True cannot be combined with cache or return_cache")
        if cache is not None:
            if not isinstance(cache, (list, tuple)):
                raise TypeError(f"cache must be the list returned with return_cache=True, got {type(cache).__name__}")
            if len(cache) != len(self.layers):
                raise ValueError(f"cache has {len(cache)} entries, the model has {len(self.layers)} layers")
        self._check_ids(x, "x")
        if return_loss and x.shape[0] == 0:
            raise ValueError(f"return_loss needs at least one sequence, got x of shape {tuple(x.shape)}")
        if return_loss and x.shape[1] < 2:
            raise ValueError(f"return_loss needs at least 2 tokens per sequence (inputs and their next-token "
                             f"targets), got x of shape {tuple(x.shape)}")
        ablate_complex = self.ablate_complex if ablate_complex is None else ablate_complex
        ablate_state_transition = (
            self.ablate_state_transition if ablate_state_transition is None else ablate_state_transition
        )
        return _forward(self, x, return_loss, ablate_complex, ablate_state_transition, cache, return_cache)

    def _apply(self, x, return_loss, ablate_complex, ablate_state_transition, cache, return_cache):
        if return_loss:
            x, labels = x[:, :-1], x[:, 1:]

        h = self.token_emb(x)  # (b, n, D)
        new_cache = []
        for i, (attn, ff) in enumerate(self.layers):
            out = attn(h, ablate_complex=ablate_complex, ablate_state_transition=ablate_state_transition,
                       cache=None if cache is None else cache[i], return_cache=return_cache)
            if return_cache:
                out, layer_cache = out
                new_cache.append(layer_cache)
            h = ff(out)

        if self.final_norm is not None:
            h = self.final_norm(h)
        logits = self.to_logits(h)  # (b, n, V)
        if return_loss:
            return cross_entropy(logits, labels)
        if return_cache:
            return logits, new_cache
        return logits

    def _check_ids(self, x, name: str) -> None:
        """Refuse anything but integer token ids (b, n), n >= 1; and, for concrete arrays (not
        under a transformation), ids outside [0, num_tokens), which JAX would clamp silently."""
        refuse_torch(x, "Transformer", name)
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"{name} must be an array of token ids, got {type(x).__name__}")
        if x.ndim != 2 or x.shape[1] < 1:
            raise ValueError(f"{name} must be token ids of shape (batch, seq) with seq >= 1, got {tuple(x.shape)}")
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise TypeError(f"{name} must hold integer token ids, got {x.dtype}")
        if not isinstance(x, jax.core.Tracer) and x.size:
            lo, hi = int(x.min()), int(x.max())
            if lo < 0 or hi >= self.num_tokens:
                raise ValueError(f"{name} holds token ids in [{lo}, {hi}]; this model has num_tokens={self.num_tokens}")

    def generate(
        self,
        prompt_ids,
        num_tokens: int,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        *,
        key=None,
    ):
        """Sample ``num_tokens`` continuation tokens after ``prompt_ids``.

        The prompt is run once; each new token then costs one step of every layer (one scan
        step for GateLoop layers, one query against the KV cache for attention layers). Each
        step is jitted: GateLoop models compile it once; attention models once per cache length.

        Args:
            prompt_ids: (b, n) token ids, n >= 1.
            num_tokens: how many tokens to sample.
            temperature: softmax temperature; 0 picks the most likely token (no key needed).
            top_k: sample only among the k most likely tokens.
            key: PRNG key for the sampling (``jax.random.key(0)``), needed when temperature > 0.

        Returns:
            (b, num_tokens) the sampled tokens only, in the prompt's dtype.
        """
        self._check_ids(prompt_ids, "prompt_ids")
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, Integral) or num_tokens < 0:
            raise ValueError(f"num_tokens must be an int >= 0, got {num_tokens!r}")
        if (isinstance(temperature, bool) or not isinstance(temperature, Real)
                or not math.isfinite(temperature) or temperature < 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, Integral) or top_k < 1):
            raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
        if temperature > 0 and key is None:
            raise ValueError("generate needs a PRNG key to sample with temperature > 0 "
                             "(key=jax.random.key(0)); temperature=0 needs none")
        dtype = np.dtype(prompt_ids.dtype)
        if np.iinfo(dtype).max < self.num_tokens - 1:
            raise TypeError(f"prompt_ids of dtype {dtype} cannot hold the sampled token ids (up to "
                            f"num_tokens - 1 = {self.num_tokens - 1}); pass them as int32")
        num_tokens, temperature = int(num_tokens), float(temperature)
        top_k = None if top_k is None or top_k >= self.num_tokens else int(top_k)
        prompt_ids = jnp.asarray(prompt_ids)
        if num_tokens == 0:
            return jnp.zeros((prompt_ids.shape[0], 0), dtype)
        if key is None:
            key = jax.random.key(0)  # unused: temperature 0 is greedy

        logits, cache = _decode(self, prompt_ids, None)
        sampled = []
        for step in range(num_tokens):
            key, sub = jax.random.split(key)
            token, finite = _pick(logits[:, -1], sub, temperature, top_k)  # (b,)
            if not bool(finite):
                raise ValueError(f"generate: the model's logits at new token {step} are not finite (nan or inf); "
                                 f"the weights or the inputs hold non-finite values")
            sampled.append(token)
            if step + 1 < num_tokens:
                logits, cache = _decode(self, token[:, None].astype(prompt_ids.dtype), cache)
        return jnp.stack(sampled, axis=1).astype(dtype)


@eqx.filter_jit
def _forward(model: Transformer, x, *flags):
    return model._apply(x, *flags)


def cross_entropy(logits, labels):
    """Mean cross-entropy of logits (b, n, V) against integer labels (b, n), in at least float32."""
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    picked = jnp.take_along_axis(logits, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - picked)


@eqx.filter_jit
def _decode(model: Transformer, ids, cache):
    """One cached forward: the prompt (cache None), then one token at a time."""
    return model(ids, cache=cache, return_cache=True)


@eqx.filter_jit
def _pick(logits, key, temperature: float, top_k: Optional[int]):
    """One token id per row of logits (b, V), and whether every row was finite.

    top_k keeps exactly k candidates per row (ties broken by ``lax.top_k``'s order). The
    logits are shifted so that each row's maximum is 0 before dividing by the temperature: a
    tiny temperature then sends the others to -inf (greedy in the limit), not to inf - inf = nan.
    ``temperature`` and ``top_k`` are Python numbers, so each value compiles once.
    """
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    best = logits.max(axis=-1, keepdims=True)  # (b, 1)
    finite = jnp.isfinite(best).all()
    if top_k is not None:
        values, index = jax.lax.top_k(logits, top_k)
        rows = jnp.arange(logits.shape[0])[:, None]
        logits = jnp.full_like(logits, -jnp.inf).at[rows, index].set(values)
    if temperature == 0:
        return logits.argmax(axis=-1), finite
    return jax.random.categorical(key, (logits - best) / temperature, axis=-1), finite
