"""Normalisation layers shared by the GateLoop modules, and the input check the layers share."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def check_features(x: Tensor, dim: int, who: str, *, sequence: bool = True) -> None:
    """Raise ValueError unless x is a floating tensor (b, n, dim) (``sequence``) or (..., dim).

    Layers call this first, so that a 2-D input or a wrong width is named here rather than
    surfacing as an einops KeyError or a matmul shape error further in.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{who}: x must be a torch.Tensor, got {type(x).__name__}")
    if sequence and x.ndim != 3:
        raise ValueError(f"{who}: x must have shape (batch, seq, {dim}), got {tuple(x.shape)}")
    if x.ndim == 0 or x.shape[-1] != dim:
        want = f"(batch, seq, {dim})" if sequence else f"(..., {dim})"
        raise ValueError(f"{who}: x must have shape {want} (last dim = dim = {dim}), got {tuple(x.shape)}")
    if not (x.is_floating_point() or x.is_complex()):
        raise TypeError(f"{who}: x must be a floating-point tensor, got {x.dtype}")


def check_sizes(who: str, **sizes) -> None:
    """Raise ValueError unless every named size is an int >= 1 (None is left to the caller)."""
    for name, value in sizes.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{who}: {name} must be an int >= 1, got {value!r}")


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain, as in the seed package.

    ``y = x / max(||x||_2, 1e-12) * sqrt(dim) * gamma`` over the last dimension.

    Args:
        dim: size of the last dimension of the input.

    State dict: ``gamma`` (dim,), the same key as the seed's RMSNorm.
    """

    def __init__(self, dim: int):
        super().__init__()
        check_sizes("RMSNorm", dim=dim)
        self.dim = dim
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # x: (..., dim) -> (..., dim)
        check_features(x, self.dim, "RMSNorm", sequence=False)
        return F.normalize(x, dim=-1) * self.scale * self.gamma
