"""Hybrid stacks: a Transformer whose layers mix tokens in different ways, by a per-layer pattern.

One letter per layer (the pattern repeats to the depth when it divides it):

    g   GateLoopedAttention (the model's gate_loop_heads, dim_gate_looped_attn, ...)
    a   CausalFullAttention (the model's heads, dim_head, rotary_emb, ...)
    m   a SimpleGateLoopLayer in front of attention (``AugmentedAttention``): attention reads
        x + simple(x), a small real-gated recurrence that carries a summary of the past into the
        queries, keys and values, as Mega's exponential moving average does for its attention

**Equal parameters.** With a pattern, every block (mixer and feedforward) holds as many
parameters as a GateLoop block of the same model: a block whose mixer is smaller gets a wider
feedforward, one whose mixer is larger a narrower one (``feedforward_width``; the hidden width is
rounded to a multiple of 8, so blocks agree to within 16 D + 8 parameters). A GateLoop block keeps
``ff_mult * dim`` exactly, so the pattern "g" is the plain GateLoop model, weight for weight.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .attention import CausalFullAttention
from .gate_loop import SimpleGateLoopLayer
from .norms import check_features

KINDS = {"g": "GateLoopedAttention", "a": "CausalFullAttention",
         "m": "AugmentedAttention (SimpleGateLoopLayer, then attention)"}


class AugmentedAttention(nn.Module):
    """Attention that reads its input plus a SimpleGateLoopLayer's output: out = attn(x + simple(x)).

    Cache: ``(simple state (b, D), (k, v))``, the two layers' own caches."""

    def __init__(self, gate_loop: SimpleGateLoopLayer, attn: CausalFullAttention):
        super().__init__()
        self.gate_loop = gate_loop
        self.attn = attn

    def forward(self, x: Tensor, ablate_complex: bool = False, ablate_state_transition: bool = False,
                cache=None, return_cache: bool = False):
        check_features(x, self.gate_loop.dim, "AugmentedAttention")
        if cache is not None and not (isinstance(cache, (tuple, list)) and len(cache) == 2
                                      and isinstance(cache[0], Tensor) and isinstance(cache[1], (tuple, list))):
            raise TypeError("AugmentedAttention: cache must be the (simple state, (k, v)) pair returned with "
                            f"return_cache=True, got {type(cache).__name__}")
        simple_cache, attn_cache = (None, None) if cache is None else cache
        summary = self.gate_loop(x, cache=simple_cache, return_cache=return_cache)
        if return_cache:
            summary, simple_cache = summary
        out = self.attn(x + summary, ablate_complex=ablate_complex, ablate_state_transition=ablate_state_transition,
                        cache=attn_cache, return_cache=return_cache)
        if not return_cache:
            return out
        out, attn_cache = out
        return out, (simple_cache, attn_cache)


def parse_pattern(pattern, depth: int) -> str:
    """The pattern as one letter per layer (``depth`` letters), or ValueError naming what is wrong."""
    if not isinstance(pattern, str):
        raise TypeError(f"layer_pattern must be a string of the letters {sorted(KINDS)}, got {type(pattern).__name__}")
    if not pattern or any(c not in KINDS for c in pattern):
        bad = sorted(set(pattern) - set(KINDS)) if pattern else "nothing"
        raise ValueError(f"layer_pattern {pattern!r}: each letter one layer, from "
                         + ", ".join(f"{k} = {v}" for k, v in KINDS.items()) + f"; got {bad}")
    if depth % len(pattern):
        raise ValueError(f"layer_pattern {pattern!r} has {len(pattern)} letters, which do not divide depth={depth} "
                         "(give one letter per layer, or a pattern that repeats to the depth)")
    return pattern * (depth // len(pattern))


def parameters_of(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def feedforward_width(dim: int, ff_mult: int, mixer_params: int, gateloop_params: int) -> int:
    """The feedforward hidden width that gives a block with a mixer of ``mixer_params`` the
    parameters of a GateLoop block (mixer of ``gateloop_params``, feedforward ``ff_mult * dim``).
    A feedforward of width w holds 2 D w + w + D parameters."""
    if mixer_params == gateloop_params:
        return ff_mult * dim
    block = gateloop_params + (2 * dim + 1) * ff_mult * dim + dim
    width = (block - mixer_params - dim) / (2 * dim + 1)
    if width < 8:
        raise ValueError(f"layer_pattern: a mixer of {mixer_params} parameters leaves no feedforward at the "
                         f"GateLoop block's {block} (raise ff_mult)")
    return max(8, int(round(width / 8)) * 8)


def build_mixer(kind: str, make_gateloop, make_attention, dim: int, scan_backend: str) -> nn.Module:
    if kind == "g":
        return make_gateloop()
    if kind == "a":
        return make_attention()
    return AugmentedAttention(SimpleGateLoopLayer(dim, scan_backend=scan_backend), make_attention())


def gateloop_mixer_parameters(make_gateloop) -> int:
    """A GateLoop mixer's parameter count, built on the meta device (no memory)."""
    with torch.device("meta"):
        return parameters_of(make_gateloop())
