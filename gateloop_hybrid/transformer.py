"""The seed's language model: token embedding, depth x (mixer, feedforward), logits.

Dimension letters used in the shape comments:
    b batch, n time (the new tokens), D model dimension, V vocabulary size.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import CausalFullAttention
from .gate_loop import GateLoopedAttention
from .norms import RMSNorm, check_sizes


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
        check_sizes("Transformer", dim=dim, num_tokens=num_tokens, depth=depth, ff_mult=ff_mult)
        if use_gate_looped_attn:
            check_sizes("Transformer", gate_loop_heads=gate_loop_heads, dim_gate_looped_attn=dim_gate_looped_attn)
        else:
            check_sizes("Transformer", heads=heads, dim_head=dim_head)
        self.num_tokens = num_tokens
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
        if cache is not None:
            if not isinstance(cache, (list, tuple)):
                raise TypeError(f"cache must be the list returned with return_cache=True, got {type(cache).__name__}")
            if len(cache) != len(self.layers):
                raise ValueError(f"cache has {len(cache)} entries, the model has {len(self.layers)} layers")
        self._check_ids(x, "x")
        if return_loss and x.shape[0] == 0:
            raise ValueError(f"return_loss needs at least one sequence, got x of shape {tuple(x.shape)}")
        if return_loss and x.shape[1] < 2:
            raise ValueError(
                f"return_loss needs at least 2 tokens per sequence (inputs and their next-token targets), "
                f"got x of shape {tuple(x.shape)}"
            )
        ablate_complex = self.ablate_complex if ablate_complex is None else ablate_complex
        ablate_state_transition = (
            self.ablate_state_transition if ablate_state_transition is None else ablate_state_transition
        )

        if return_loss:
            x, labels = x[:, :-1], x[:, 1:]

        if x.dtype not in (torch.int32, torch.int64):
            x = x.long()  # the embedding takes int32 or int64 only; the ids were checked above
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

    def _check_ids(self, x: Tensor, name: str) -> None:
        """Refuse anything but integer token ids (b, n), n >= 1, in [0, num_tokens).

        The range is checked for CPU tensors only, outside torch.compile: on a GPU it would cost a
        synchronisation per call (an embedding lookup out of range fails there with a device-side
        assertion), and in a compiled graph a break.
        """
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a tensor of token ids, got {type(x).__name__}")
        if x.ndim != 2 or x.shape[1] < 1:
            raise ValueError(f"{name} must be token ids of shape (batch, seq) with seq >= 1, got {tuple(x.shape)}")
        if x.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise TypeError(f"{name} must hold integer token ids, got {x.dtype}")
        if x.device.type == "cpu" and x.numel() and not torch.compiler.is_compiling():
            lo, hi = int(x.min()), int(x.max())
            if lo < 0 or hi >= self.num_tokens:
                raise ValueError(f"{name} holds token ids in [{lo}, {hi}]; this model has num_tokens={self.num_tokens}")

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
            (b, num_tokens) the sampled tokens only (the prompt is not repeated), in the
            prompt's dtype.
        """
        self._check_ids(prompt_ids, "prompt_ids")
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, Integral) or num_tokens < 0:
            raise ValueError(f"num_tokens must be an int >= 0, got {num_tokens!r}")
        if (isinstance(temperature, bool) or not isinstance(temperature, Real)
                or not math.isfinite(temperature) or temperature < 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, Integral) or top_k < 1):
            raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")

        if torch.iinfo(prompt_ids.dtype).max < self.num_tokens - 1:
            raise TypeError(
                f"prompt_ids of dtype {prompt_ids.dtype} cannot hold the sampled token ids (up to "
                f"num_tokens - 1 = {self.num_tokens - 1}); pass them as int64"
            )
        num_tokens, temperature = int(num_tokens), float(temperature)
        top_k = None if top_k is None else int(top_k)
        sampled = prompt_ids.new_empty((prompt_ids.shape[0], 0))
        if num_tokens == 0:
            return sampled
        logits, cache = self(prompt_ids, return_cache=True)
        for step in range(num_tokens):
            token = _sample(logits[:, -1].float(), temperature, top_k, step)  # (b,)
            sampled = torch.cat((sampled, token[:, None].to(sampled.dtype)), dim=1)
            if step + 1 < num_tokens:
                logits, cache = self(token[:, None], cache=cache, return_cache=True)
        return sampled


def _sample(logits: Tensor, temperature: float, top_k: Optional[int], step: int = 0) -> Tensor:
    """One token id per row of logits (b, V).

    top_k keeps exactly k candidates per row, ties broken by ``topk``'s order (a threshold
    ``logits >= kth`` would keep every token tied with the k-th). The logits are shifted so that
    each row's maximum is 0 before dividing by the temperature (in float64): a tiny temperature
    then sends the others to -inf (greedy in the limit) instead of overflowing to inf - inf = nan.
    """
    best = logits.max(dim=-1, keepdim=True).values  # (b, 1)
    if not bool(torch.isfinite(best).all()):
        raise ValueError(
            f"generate: the model's logits at new token {step} are not finite (nan or inf); "
            f"the weights or the inputs hold non-finite values"
        )
    if top_k is not None and top_k < logits.shape[-1]:
        top = logits.topk(top_k, dim=-1)
        logits = torch.full_like(logits, float("-inf")).scatter(-1, top.indices, top.values)
    if temperature == 0:
        return logits.argmax(dim=-1)
    # in float64, where any temperature > 0 (a Python float) is representable: 0 / t stays 0
    probs = ((logits.double() - best.double()) / temperature).softmax(dim=-1)
    return torch.multinomial(probs, 1).squeeze(-1)
