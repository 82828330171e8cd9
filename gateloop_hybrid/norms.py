"""Normalisation layers shared by the GateLoop modules."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain, as in the seed package.

    ``y = x / max(||x||_2, 1e-12) * sqrt(dim) * gamma`` over the last dimension.

    Args:
        dim: size of the last dimension of the input.

    State dict: ``gamma`` (dim,), the same key as the seed's RMSNorm.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # x: (..., dim) -> (..., dim)
        return F.normalize(x, dim=-1) * self.scale * self.gamma
