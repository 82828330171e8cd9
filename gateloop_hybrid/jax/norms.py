"""Building blocks of the JAX model: Linear, Embedding, LayerNorm, RMSNorm, the input checks, and
|z| and arg z with torch's values and gradients at z = 0 (polar_parts).

Each holds its weights in torch's layout under torch's names (``weight`` (out, in), ``bias``,
``gamma``), so that a state dict maps onto the module tree one to one, and initialises them
from the same distributions as torch's layers. All act on the last axis and take any leading
axes: the layers are called on whole batches (b, n, D), as the torch layers are.

Narrow floats (bfloat16, float16) are normalised in float32 and cast back, as torch's autocast
does for its norms.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp


def refuse_torch(x, who: str, name: str) -> None:
    """A torch tensor given to the JAX model gets one error naming it (JAX would fail deep inside,
    e.g. "Cannot interpret 'torch.int64' as a data type")."""
    if type(x).__module__.split(".")[0] == "torch":
        raise TypeError(f"{who}: {name} is a torch.Tensor ({x.dtype}, shape {tuple(x.shape)}); the JAX model "
                        "takes JAX or NumPy arrays (convert with bridge.to_jax(t) or jnp.asarray(t.numpy()))")


def check_features(x, dim: int, who: str, *, sequence: bool = True) -> None:
    """Raise ValueError unless x is a floating array (b, n, dim) (``sequence``) or (..., dim)."""
    refuse_torch(x, who, "x")
    shape = getattr(x, "shape", None)
    if shape is None or not hasattr(x, "dtype"):
        raise TypeError(f"{who}: x must be a JAX array, got {type(x).__name__}")
    if sequence and len(shape) != 3:
        raise ValueError(f"{who}: x must have shape (batch, seq, {dim}), got {tuple(shape)}")
    if len(shape) == 0 or shape[-1] != dim:
        want = f"(batch, seq, {dim})" if sequence else f"(..., {dim})"
        raise ValueError(f"{who}: x must have shape {want} (last dim = dim = {dim}), got {tuple(shape)}")
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        raise TypeError(f"{who}: x must be a floating-point array, got {x.dtype}")


def check_sizes(who: str, **sizes) -> None:
    """Raise ValueError unless every named size is an int >= 1 (None is left to the caller)."""
    for name, value in sizes.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{who}: {name} must be an int >= 1, got {value!r}")


def _at_least_f32(x):
    """x in float32 when it is narrower, else as it is (the dtype norms compute in)."""
    return x.astype(jnp.float32) if jnp.finfo(x.dtype).bits < 32 else x


class Linear(eqx.Module):
    """``x @ weight.T + bias`` over the last axis; weight (out, in) as torch.nn.Linear.

    Initialised as torch's: weight and bias uniform in +-1/sqrt(in_features).
    """

    weight: jax.Array
    bias: jax.Array | None

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, key):
        wkey, bkey = jax.random.split(key)
        bound = 1.0 / math.sqrt(in_features)
        self.weight = jax.random.uniform(wkey, (out_features, in_features), minval=-bound, maxval=bound)
        self.bias = jax.random.uniform(bkey, (out_features,), minval=-bound, maxval=bound) if bias else None

    def __call__(self, x):
        y = x @ self.weight.T
        return y if self.bias is None else y + self.bias


class Embedding(eqx.Module):
    """Rows of ``weight`` (num_embeddings, dim) picked by integer ids; N(0, 1) init as torch's."""

    weight: jax.Array

    def __init__(self, num_embeddings: int, dim: int, *, key):
        self.weight = jax.random.normal(key, (num_embeddings, dim))

    def __call__(self, ids):
        return jnp.take(self.weight, ids, axis=0)


class LayerNorm(eqx.Module):
    """torch.nn.LayerNorm(dim): (x - mean) / sqrt(var + 1e-5) * weight + bias over the last axis."""

    weight: jax.Array
    bias: jax.Array
    eps: float = eqx.field(static=True)

    def __init__(self, dim: int, eps: float = 1e-5):
        self.weight = jnp.ones((dim,))
        self.bias = jnp.zeros((dim,))
        self.eps = eps

    def __call__(self, x):
        xf = _at_least_f32(x)
        mean = xf.mean(axis=-1, keepdims=True)
        var = jnp.square(xf - mean).mean(axis=-1, keepdims=True)  # biased, as torch
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.weight + self.bias).astype(jnp.result_type(x.dtype, self.weight.dtype))


class RMSNorm(eqx.Module):
    """``x / max(||x||_2, 1e-12) * sqrt(dim) * gamma`` over the last axis, as the torch RMSNorm.

    Args:
        dim: size of the last axis of the input.

    Parameters: ``gamma`` (dim,), ones (the torch module's key).
    """

    gamma: jax.Array
    dim: int = eqx.field(static=True)

    def __init__(self, dim: int):
        check_sizes("RMSNorm", dim=dim)
        self.dim = dim
        self.gamma = jnp.ones((dim,))

    def __call__(self, x):
        # x: (..., dim) -> (..., dim)
        check_features(x, self.dim, "RMSNorm", sequence=False)
        xf = _at_least_f32(x)
        sq = jnp.sum(jnp.square(xf), axis=-1, keepdims=True)
        # the norm with torch's floor of 1e-12, and a finite gradient at x = 0 (no sqrt(0) in it)
        big = sq > 1e-24
        norm = jnp.where(big, jnp.sqrt(jnp.where(big, sq, 1.0)), 1e-12)
        y = xf / norm * math.sqrt(self.dim) * self.gamma
        return y.astype(jnp.result_type(x.dtype, self.gamma.dtype))


def polar_parts(re, im):
    """|z| and arg z of z = re + i im, both 0 with zero gradient at z = 0 as torch's abs and angle
    give (bf16 projections do produce z = 0; hypot and arctan2 alone give NaN gradients there)."""
    nonzero = (re != 0) | (im != 0)
    re, im = jnp.where(nonzero, re, 1.0), jnp.where(nonzero, im, 0.0)
    return jnp.where(nonzero, jnp.hypot(re, im), 0.0), jnp.where(nonzero, jnp.arctan2(im, re), 0.0)
