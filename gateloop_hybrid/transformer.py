"""The seed's language model: token embedding, depth x (mixer, feedforward), logits.

Dimension letters used in the shape comments:
    b batch, n time (the new tokens), D model dimension, V vocabulary size.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import CausalFullAttention
from .gate_loop import GateLoopedAttention
from .norms import RMSNorm


class PreNorm(nn.Module):
    """``fn(RMSNorm(x)) + x``. With ``return_cache=True`` the wrapped mixer's cache is passed on."""

    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.fn = fn
        self.norm = RMSNorm(dim)

    def forward(self, x: Tensor, **kwargs):
        out = self.fn(self.norm(x), **kwargs)
        if kwargs.get("return_cache", False):
            out, cache = out
            return out + x, cache
        return out + x


class PostNorm(nn.Module):
    """``LayerNorm(fn(x) + x)``. With ``return_cache=True`` the wrapped mixer's cache is passed on."""

    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.fn = fn
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, **kwargs):
        out = self.fn(x, **kwargs)
        if kwargs.get("return_cache", False):
            out, cache = out
            return self.norm(out + x), cache
        return self.norm(out + x)


def FeedForward(dim: int, mult: int = 4) -> nn.Sequential:
    """Linear(D, mult D) -> GELU -> Linear(mult D, D), as a Sequential (seed state-dict keys)."""
    dim_inner = dim * mult
    return nn.Sequential(nn.Linear(dim, dim_inner), nn.GELU(), nn.Linear(dim_inner, dim))


class Transformer(nn.Module):
    """Decoder-only language model, constructor- and checkpoint-compatible with the seed 0.2.5.

    Args:
        dim: model dimension D.
        num_tokens: vocabulary size V.
        depth: number of (mixer, feedforward) blocks.
        dim_head, heads: per-head dimension and head count of the softmax attention
            (used when ``use_gate_looped_attn=False``).
        ff_mult: feedforward expansion factor.
        checkpoint_gate_looped_attn: recompute the GateLoop scan in backward.
        use_gate_looped_attn: GateLoopedAttention mixers when True, CausalFullAttention
            when False.
        gate_loop_heads: GateLoop heads; default one per inner feature.
        attn_add_swish_gating: SiLU output gating in the mixers.
        dim_gate_looped_attn: GateLoop inner dimension; default D.
        attn_softmax_normalize: softmax in CausalFullAttention; default
            ``not data_dependent_rel_pos``.
        data_dependent_rel_pos: the seed's data-dependent q/k scaling in CausalFullAttention.
        frac_gradient_state_transition: gradient fraction reaching the gate projections.
        ablate_complex, ablate_state_transition: defaults for the forward arguments.
        rotary_emb: rotary embedding in CausalFullAttention.
        post_ln_norm: post-LayerNorm residual blocks instead of pre-RMSNorm, and no final norm.
        sub_ln: LayerNorm inside GateLoopedAttention.
        scan_backend: backend name for ``gate_loop_scan``.
    """

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
    ):
        super().__init__()
        self.ablate_complex = ablate_complex
        self.ablate_state_transition = ablate_state_transition
        self.token_emb = nn.Embedding(num_tokens, dim)

        wrapper = PostNorm if post_ln_norm else PreNorm
        layers = []
        for _ in range(depth):
            if use_gate_looped_attn:
                mixer = GateLoopedAttention(
                    dim=dim,
                    heads=gate_loop_heads,
                    dim_inner=dim_gate_looped_attn,
                    add_swish_gating=attn_add_swish_gating,
                    sub_ln=sub_ln,
                    checkpoint_gate_looped_attn=checkpoint_gate_looped_attn,
                    frac_gradient_state_transition=frac_gradient_state_transition,
                    scan_backend=scan_backend,
                )
            else:
                mixer = CausalFullAttention(
                    dim=dim,
                    dim_head=dim_head,
                    heads=heads,
                    rotary_emb=rotary_emb,
                    add_swish_gating=attn_add_swish_gating,
                    softmax_normalize=attn_softmax_normalize,
                    data_dependent_rel_pos=data_dependent_rel_pos,
                    frac_gradient_data_dependent_rel_pos=frac_gradient_state_transition,
                )
            ff = FeedForward(dim=dim, mult=ff_mult)
            layers.append(nn.ModuleList([wrapper(dim, mixer), wrapper(dim, ff)]))
        self.layers = nn.ModuleList(layers)

        # seed: Sequential(RMSNorm, Linear), or the bare Linear when post_ln_norm
        logits = nn.Linear(dim, num_tokens, bias=False)
        self.to_logits = logits if post_ln_norm else nn.Sequential(RMSNorm(dim), logits)

    def forward(
        self,
        x: Tensor,
        return_loss: bool = False,
        ablate_complex: Optional[bool] = None,
        ablate_state_transition: Optional[bool] = None,
        cache: Optional[Sequence] = None,
        return_cache: bool = False,
    ):
        """Logits, next-token loss, or logits plus a decoding cache.

        Args:
            x: token ids (b, n); with ``cache``, only the new tokens.
            return_loss: return the mean cross-entropy of predicting x[:, 1:] from x[:, :-1].
            ablate_complex, ablate_state_transition: override the constructor's defaults.
            cache: per-layer caches from an earlier call with ``return_cache=True``.
            return_cache: also return the per-layer caches after these tokens (a list of
                length depth: the complex GateLoop state (b, h, d, e) per layer, or the
                attention ``(k, v)`` pair).

        Returns:
            logits (b, n, V); the loss (a scalar) when ``return_loss``;
            ``(logits, cache)`` when ``return_cache``.
        """
        if return_loss and (cache is not None or return_cache):
            raise ValueError("return_loss=True cannot be combined with cache or return_cache")
        if cache is not None and len(cache) != len(self.layers):
            raise ValueError(f"cache has {len(cache)} entries, the model has {len(self.layers)} layers")
        if x.ndim != 2:
            raise ValueError(f"x must be token ids of shape (batch, seq), got {tuple(x.shape)}")
        ablate_complex = self.ablate_complex if ablate_complex is None else ablate_complex
        ablate_state_transition = (
            self.ablate_state_transition if ablate_state_transition is None else ablate_state_transition
        )

        if return_loss:
            x, labels = x[:, :-1], x[:, 1:]

        x = self.token_emb(x)  # (b, n, D)
        new_cache: List = []
        for i, (attn, ff) in enumerate(self.layers):
            out = attn(
                x,
                ablate_complex=ablate_complex,
                ablate_state_transition=ablate_state_transition,
                cache=None if cache is None else cache[i],
                return_cache=return_cache,
            )
            if return_cache:
                out, layer_cache = out
                new_cache.append(layer_cache)
            x = ff(out)

        logits = self.to_logits(x)  # (b, n, V)
        if return_loss:
            return F.cross_entropy(logits.transpose(1, 2), labels)
        if return_cache:
            return logits, new_cache
        return logits

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: Tensor,
        num_tokens: int,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
    ) -> Tensor:
        """Sample ``num_tokens`` continuation tokens after ``prompt_ids``.

        The prompt is run once; each new token then costs one step of every layer (one scan
        step for GateLoop layers, one query against the KV cache for attention layers).

        Args:
            prompt_ids: (b, n) token ids, n >= 1.
            num_tokens: how many tokens to sample.
            temperature: softmax temperature; 0 picks the most likely token.
            top_k: sample only among the k most likely tokens.

        Returns:
            (b, num_tokens) the sampled tokens only (the prompt is not repeated).
        """
        if prompt_ids.ndim != 2 or prompt_ids.shape[1] < 1:
            raise ValueError(
                f"prompt_ids must have shape (batch, seq) with seq >= 1, got {tuple(prompt_ids.shape)}"
            )
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")

        sampled = prompt_ids.new_empty((prompt_ids.shape[0], 0))
        if num_tokens == 0:
            return sampled
        logits, cache = self(prompt_ids, return_cache=True)
        for step in range(num_tokens):
            token = _sample(logits[:, -1].float(), temperature, top_k)  # (b,)
            sampled = torch.cat((sampled, token[:, None]), dim=1)
            if step + 1 < num_tokens:
                logits, cache = self(token[:, None], cache=cache, return_cache=True)
        return sampled


def _sample(logits: Tensor, temperature: float, top_k: Optional[int]) -> Tensor:
    """One token id per row of logits (b, V)."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = (logits / temperature).softmax(dim=-1)
    return torch.multinomial(probs, 1).squeeze(-1)
