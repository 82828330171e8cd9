"""Causal softmax (or unnormalised) attention, the seed's baseline mixer, with a KV cache.

Dimension letters used in the shape comments:
    b batch, n query positions (the new tokens), j key positions (cached + new),
    h heads, d head dimension, D model dimension.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from einops.layers.torch import Rearrange
from torch import Tensor, nn

from .norms import check_features, check_sizes

KVCache = Tuple[Tensor, Tensor]  # (k, v), each (b, h, j, d)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding over the whole head dimension, interleaved pairs.

    Matches ``rotary_embedding_torch.RotaryEmbedding(dim)`` (0.9.x) with its defaults
    (``freqs_for="lang"``, ``theta=10000``): same state-dict key (``freqs``, a parameter that
    does not train) and the same numbers, so a seed checkpoint loads and gives the same
    output. Positions are built in the dtype of ``freqs`` (float32 unless the module is
    cast; never below float32), not in the input's dtype, so bf16 inputs or a bf16 model
    keep exact positions past 256 (the seed's do not).

    Args:
        dim: head dimension to rotate (even).
        theta: base of the geometric frequency ladder.
    """

    def __init__(self, dim: int, theta: float = 10000.0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"RotaryEmbedding needs an even dim, got {dim}")
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
        self.freqs = nn.Parameter(freqs, requires_grad=False)  # (d/2,)

    def forward(self, t: Tensor, offset: int = 0) -> Tensor:
        """Rotate ``t`` (..., n, d) as if its n positions start at ``offset``."""
        dtype = torch.promote_types(self.freqs.dtype, torch.float32)
        return self.at_positions(t, torch.arange(offset, offset + t.shape[-2], device=t.device, dtype=dtype))

    def at_positions(self, t: Tensor, positions: Tensor) -> Tensor:
        """Rotate ``t`` (..., d) at ``positions``, which broadcast against t's leading dims (e.g.
        (n,) for t (..., n, d), or one position per row (b, 1, 1) for t (b, h, 1, d))."""
        dtype = t.dtype
        freqs = self.freqs.to(torch.promote_types(self.freqs.dtype, torch.float32))
        angles = (positions.to(freqs.dtype)[..., None] * freqs).repeat_interleave(2, dim=-1)   # (..., d)
        pairs = t.unflatten(-1, (-1, 2))
        rotated_half = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
        out = t * angles.cos() + rotated_half * angles.sin()
        return out.to(dtype)


class CausalFullAttention(nn.Module):
    """Causal multi-head attention, constructor-compatible with the seed's.

    Args:
        dim: model dimension D.
        dim_head: per-head dimension d.
        heads: number of heads h.
        rotary_emb: apply rotary position embedding to queries and keys.
        add_swish_gating: multiply the attention output by SiLU(W x) before the output
            projection.
        data_dependent_rel_pos: scale q and k feature pairs by the real part of a
            data-controlled complex cumulative product (see note below).
        frac_gradient_data_dependent_rel_pos: fraction of the gradient that reaches the
            projection behind the data-dependent scaling (the rest is detached).
        softmax_normalize: softmax attention when True, unnormalised causal linear
            attention when False. Default: ``not data_dependent_rel_pos``.

    Note: as in the seed 0.2.5, the "data-dependent relative position" cumulative product
    runs over the head's feature pairs at each position, not over time. It is kept as is so
    seed checkpoints give the same outputs.

    Softmax attention without the rel-pos option goes through
    ``F.scaled_dot_product_attention``; the other cases through an explicit masked matmul.
    """

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
    ):
        super().__init__()
        check_sizes("CausalFullAttention", dim=dim, dim_head=dim_head, heads=heads)
        dim_inner = dim_head * heads
        self.dim, self.dim_head, self.heads = dim, dim_head, heads
        self.softmax_normalize = (
            (not data_dependent_rel_pos) if softmax_normalize is None else softmax_normalize
        )
        self.scale = dim_head**-0.5
        self.rotary_emb = RotaryEmbedding(dim_head) if rotary_emb else None

        # module structure (and so state-dict keys) follows the seed
        self.to_qkv = nn.Sequential(
            nn.Linear(dim, dim_inner * 3, bias=False),
            Rearrange("b n (qkv h d) -> qkv b h n d", h=heads, qkv=3),
        )

        self.data_dependent_rel_pos = data_dependent_rel_pos
        self.frac_gradient_data_dependent_rel_pos = frac_gradient_data_dependent_rel_pos
        if data_dependent_rel_pos:
            if dim_head % 2:
                raise ValueError(f"data_dependent_rel_pos needs an even dim_head, got {dim_head}")
            self.to_a = nn.Sequential(
                nn.Linear(dim, dim_inner, bias=False),
                Rearrange("b n (h d c) -> b h n d c", h=heads, c=2),
            )

        self.to_gates = None
        if add_swish_gating:
            self.to_gates = nn.Sequential(
                nn.Linear(dim, dim_inner, bias=False),
                nn.SiLU(),
                Rearrange("b n (h d) -> b h n d", h=heads),
            )

        self.to_out = nn.Sequential(
            Rearrange("b h n d -> b n (h d)"),
            nn.Linear(dim_inner, dim),
        )

    def _rel_pos_scale(self, x: Tensor, ablate_complex: bool) -> Tensor:
        """Per-position, per-feature-pair scale (b, h, n, d/2, 1) of the seed's rel-pos option."""
        frac = self.frac_gradient_data_dependent_rel_pos
        a = self.to_a(x)  # (b, h, n, d/2, 2)
        a = a * frac + a.detach() * (1 - frac)
        if a.dtype in (torch.float16, torch.bfloat16):
            a = a.float()  # complex needs float32 or wider
        a = torch.view_as_complex(a)  # (b, h, n, d/2)
        if ablate_complex:
            a = a.real + 0.0j
        a = torch.polar(a.abs().sigmoid(), a.angle())
        a_cumprod = a.unsqueeze(-1).cumprod(dim=-2)  # over the feature pairs, as the seed
        return a_cumprod.real.clamp(min=1e-10)

    def project(self, x: Tensor, positions: Tensor, ablate_complex: bool = False,
                ablate_state_transition: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """q (scaled), k and v (b, h, n, d) of x (b, n, D): rotated at ``positions`` (which
        broadcast against (b, h, n): (n,) for a sequence, (b, 1, 1) for one token per row), and
        the seed's data-dependent scaling of q and k."""
        q, k, v = self.to_qkv(x)
        if self.rotary_emb is not None:
            q = self.rotary_emb.at_positions(q, positions)
            k = self.rotary_emb.at_positions(k, positions)
        q = q * self.scale
        if self.data_dependent_rel_pos and not ablate_state_transition:
            rel = self._rel_pos_scale(x, ablate_complex)  # (b, h, n, d/2, 1)
            q = (q.unflatten(-1, (-1, 2)) * rel.to(q.dtype)).flatten(-2)
            k = (k.unflatten(-1, (-1, 2)) * (1.0 / rel).to(k.dtype)).flatten(-2)
        return q, k, v

    def attend(self, q: Tensor, k: Tensor, v: Tensor, hidden: Tensor) -> Tensor:
        """(b, h, i, d): the seed's explicit attention, softmax (or not) over q k^T with the keys
        that ``hidden`` marks (True, broadcast to (b, h, i, j)) left out, times v."""
        sim = torch.einsum("b h i d, b h j d -> b h i j", q, k)
        if self.softmax_normalize:
            attn = sim.masked_fill(hidden, -torch.finfo(sim.dtype).max).softmax(dim=-1)
        else:
            attn = sim.masked_fill(hidden, 0.0)
        return torch.einsum("b h i j, b h j d -> b h i d", attn, v)

    def output(self, x: Tensor, out: Tensor) -> Tensor:
        """(b, n, D): the heads' outputs (b, h, n, d), gated by x where the layer gates, projected."""
        if self.to_gates is not None:
            out = out * self.to_gates(x)
        return self.to_out(out)

    def _check_cache(self, cache, x: Tensor) -> None:
        """Refuse a cache that is not this layer's (k, v) for this batch, naming what differs."""
        what = "cache must be the (k, v) pair returned with return_cache=True by this attention layer"
        if isinstance(cache, Tensor):
            raise TypeError(f"CausalFullAttention: {what}, got one tensor of shape {tuple(cache.shape)} "
                            f"(a GateLoop state?)")
        if not isinstance(cache, (tuple, list)) or len(cache) != 2 or not all(isinstance(t, Tensor) for t in cache):
            raise TypeError(f"CausalFullAttention: {what}, got {type(cache).__name__}")
        k, v = cache
        b = x.shape[0]
        for name, t in (("k", k), ("v", v)):
            if t.ndim != 4 or (t.shape[0], t.shape[1], t.shape[3]) != (b, self.heads, self.dim_head):
                raise ValueError(
                    f"CausalFullAttention: cache {name} must have shape (batch, heads, past, dim_head) = "
                    f"({b}, {self.heads}, past, {self.dim_head}) for this input, got {tuple(t.shape)}"
                )
        if k.shape != v.shape:
            raise ValueError(f"CausalFullAttention: cache k {tuple(k.shape)} and v {tuple(v.shape)} differ")
        if k.device != x.device:
            raise ValueError(f"CausalFullAttention: cache is on {k.device}, x on {x.device}")

    def forward(
        self,
        x: Tensor,
        ablate_complex: bool = False,
        ablate_state_transition: bool = False,
        cache: Optional[KVCache] = None,
        return_cache: bool = False,
    ):
        """Attend causally over the cached keys and the new positions.

        Args:
            x: (b, n, D) the new positions (all of them when there is no cache).
            ablate_complex: use only the real part of the rel-pos gate.
            ablate_state_transition: skip the data-dependent rel-pos scaling.
            cache: ``(k, v)`` from an earlier call, each (b, h, j_past, d).
            return_cache: also return the updated ``(k, v)``.

        Returns:
            (b, n, D), or ``(out, (k, v))`` when ``return_cache``.
        """
        check_features(x, self.dim, "CausalFullAttention")
        if cache is not None:
            self._check_cache(cache, x)
        offset = 0 if cache is None else cache[0].shape[-2]
        positions = torch.arange(offset, offset + x.shape[1], device=x.device)
        q, k, v = self.project(x, positions, ablate_complex, ablate_state_transition)   # each (b, h, n, d)

        if cache is not None:
            # a cache made under another autocast setting takes this call's dtype
            k = torch.cat((cache[0].to(k.dtype), k), dim=-2)  # (b, h, j, d)
            v = torch.cat((cache[1].to(v.dtype), v), dim=-2)

        i, j = q.shape[-2], k.shape[-2]
        if self.softmax_normalize and not self.data_dependent_rel_pos:
            # q is already scaled; the causal mask is aligned to the last key (bottom right)
            if i == j:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0)
            else:
                allowed = torch.ones((i, j), dtype=torch.bool, device=x.device).tril(j - i)
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=1.0)
        else:
            # explicit path, as the seed: the rel-pos scaling divides k by up to 1e10 (its
            # clamp), where a fused kernel's online softmax rounds visibly differently
            future = torch.ones((i, j), dtype=torch.bool, device=x.device).triu(j - i + 1)
            out = self.attend(q, k, v, future)  # (b, h, n, d)

        out = self.output(x, out)  # (b, n, D)
        if not return_cache:
            return out
        return out, (k, v)
