"""The seed's language model: token embedding, depth x (mixer, feedforward), logits.

Dimension letters used in the shape comments:
    b batch, n time (the new tokens), D model dimension, V vocabulary size.
"""

from __future__ import annotations

import json
from numbers import Integral
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import hybrid
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


def FeedForward(dim: int, mult: int = 4, width: Optional[int] = None) -> nn.Sequential:
    """Linear(D, mult D) -> GELU -> Linear(mult D, D), as a Sequential (seed state-dict keys);
    ``width`` sets the hidden width instead of mult D."""
    dim_inner = dim * mult if width is None else width
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
        layer_pattern: one letter per layer, repeated to the depth: "g" GateLoop, "a" attention,
            "m" attention after a SimpleGateLoopLayer (``hybrid``). Each block then holds a
            GateLoop block's parameters (its feedforward widened or narrowed). Default: every
            layer "g", or "a" with ``use_gate_looped_attn=False`` (feedforwards ``ff_mult * dim``).
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
        layer_pattern: Optional[str] = None,
    ):
        config = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        check_sizes("Transformer", dim=dim, num_tokens=num_tokens, depth=depth, ff_mult=ff_mult)
        self.config = config        # the constructor's arguments: save_pretrained writes them
        if layer_pattern is not None and not use_gate_looped_attn:
            raise ValueError("Transformer: give layer_pattern or use_gate_looped_attn=False, not both "
                             "(the pattern says which layers are attention)")
        pattern = ("g" if use_gate_looped_attn else "a") * depth if layer_pattern is None else \
            hybrid.parse_pattern(layer_pattern, depth)
        if "g" in pattern or layer_pattern is not None:     # a pattern's blocks match a GateLoop block's size
            check_sizes("Transformer", gate_loop_heads=gate_loop_heads, dim_gate_looped_attn=dim_gate_looped_attn)
        if "a" in pattern or "m" in pattern:
            check_sizes("Transformer", heads=heads, dim_head=dim_head)
        self.layer_pattern = pattern
        self.num_tokens = num_tokens
        self.ablate_complex = ablate_complex
        self.ablate_state_transition = ablate_state_transition
        self.token_emb = nn.Embedding(num_tokens, dim)

        wrapper = PostNorm if post_ln_norm else PreNorm

        def make_gateloop():
            return GateLoopedAttention(
                dim=dim,
                heads=gate_loop_heads,
                dim_inner=dim_gate_looped_attn,
                add_swish_gating=attn_add_swish_gating,
                sub_ln=sub_ln,
                checkpoint_gate_looped_attn=checkpoint_gate_looped_attn,
                frac_gradient_state_transition=frac_gradient_state_transition,
                scan_backend=scan_backend,
            )

        def make_attention():
            return CausalFullAttention(
                dim=dim,
                dim_head=dim_head,
                heads=heads,
                rotary_emb=rotary_emb,
                add_swish_gating=attn_add_swish_gating,
                softmax_normalize=attn_softmax_normalize,
                data_dependent_rel_pos=data_dependent_rel_pos,
                frac_gradient_data_dependent_rel_pos=frac_gradient_state_transition,
            )

        reference = None if layer_pattern is None else hybrid.gateloop_mixer_parameters(make_gateloop)
        layers = []
        for kind in pattern:
            mixer = hybrid.build_mixer(kind, make_gateloop, make_attention, dim, scan_backend)
            width = None if reference is None else hybrid.feedforward_width(
                dim, ff_mult, hybrid.parameters_of(mixer), reference)
            ff = FeedForward(dim=dim, mult=ff_mult, width=width)
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

    def save_pretrained(self, directory) -> Path:
        """Write the weights as ``model.safetensors`` and the constructor's arguments as
        ``config.json`` into ``directory`` (made if missing); ``from_pretrained`` reads them."""
        from safetensors.torch import save_file
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        weights = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
        config = {"model": "gateloop_hybrid.Transformer", "format": 1, "arguments": self.config}
        (directory / "config.json").write_text(json.dumps(config, indent=1) + "\n")
        return directory

    @classmethod
    def from_pretrained(cls, directory, device=None, **overrides) -> "Transformer":
        """The model ``save_pretrained`` wrote into ``directory``, on ``device`` (default: the CPU).
        ``overrides`` replace saved arguments that do not change the weights' shapes (e.g.
        ``scan_backend``)."""
        from safetensors.torch import load_file
        directory = Path(directory)
        config_path, weights_path = directory / "config.json", directory / "model.safetensors"
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"Transformer.from_pretrained: {path} is missing (written by save_pretrained)")
        config = json.loads(config_path.read_text())
        if not isinstance(config, dict) or config.get("model") != "gateloop_hybrid.Transformer":
            raise ValueError(f"Transformer.from_pretrained: {config_path} is not a gateloop_hybrid Transformer's config")
        arguments = {**config["arguments"], **overrides}
        model = cls(arguments.pop("dim"), **arguments)
        model.load_state_dict(load_file(str(weights_path), device="cpu" if device is None else str(device)))
        return model if device is None else model.to(device)

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
        num_tokens: Optional[int] = None,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        *,
        max_new_tokens: Optional[int] = None,
        top_p: Optional[float] = None,
        eos_token: Optional[int] = None,
        stream: Optional[Callable[[Tensor], None]] = None,
        seed=None,
        lengths=None,
        capture: bool = False,
        compile: bool = False,
    ) -> Tensor:
        """Sample new tokens after ``prompt_ids``.

        The prompts go once through the layers' forward (their fast paths) into a state of fixed
        size (``generation.DecodeState``); each new token is then one decode step of every layer
        (GateLoop: one recurrence step; attention: one query against a key/value buffer of fixed
        length) and a draw on the device (``generation``).

        Args:
            prompt_ids: (b, n) token ids, n >= 1.
            num_tokens / max_new_tokens: how many tokens to sample (give one of them).
            temperature: softmax temperature; 0 picks the most likely token.
            top_k: sample only among the k most likely tokens.
            top_p: sample only among the most likely tokens whose probability reaches p.
            eos_token: a row that samples it stops; its later tokens are eos_token. Generation
                ends early once every row has stopped.
            stream: called with each step's tokens (b,) on the CPU as they come (a host
                synchronisation per token).
            seed: an int (row i draws from seed + i), one int per row, or None (from torch's
                global generator). A row's tokens depend on its seed and its own prompt only.
            lengths: (b,) prompt lengths when the rows' prompts differ in length: row i's prompt
                is prompt_ids[i, :lengths[i]], the rest padding (any valid ids).
            capture: record the decode step in a CUDA graph and replay it per token (CUDA).
            compile: put the decode step and draw through ``torch.compile`` first (Inductor fuses
                each layer's small operations; one compile per batch size and buffer length).

        Returns:
            (b, num_tokens) the sampled tokens only (the prompt is not repeated), in the
            prompt's dtype.
        """
        from . import generation
        self._check_ids(prompt_ids, "prompt_ids")
        if any(type(p).__name__ == "DTensor" for p in self.parameters()):
            raise TypeError("generate: this model's weights are sharded (FSDP2); the decode step needs them "
                            "whole: load the full state dict (torch.distributed.checkpoint.state_dict."
                            "get_model_state_dict with full_state_dict=True) into an unsharded copy")
        if (num_tokens is None) == (max_new_tokens is None):
            raise ValueError("generate: give the number of new tokens once, as num_tokens or max_new_tokens")
        count = num_tokens if max_new_tokens is None else max_new_tokens
        name = "num_tokens" if max_new_tokens is None else "max_new_tokens"
        if isinstance(count, bool) or not isinstance(count, Integral) or count < 0:
            raise ValueError(f"{name} must be an int >= 0, got {count!r}")
        temperature, top_k, top_p = generation.check_sampling(temperature, top_k, top_p)
        if eos_token is not None and (isinstance(eos_token, bool) or not isinstance(eos_token, Integral)
                                      or not 0 <= eos_token < self.num_tokens):
            raise ValueError(f"eos_token must be None or a token id in [0, {self.num_tokens}), got {eos_token!r}")
        if stream is not None and not callable(stream):
            raise TypeError(f"stream must be a callable taking each step's tokens, got {type(stream).__name__}")
        for flag, value in (("capture", capture), ("compile", compile)):
            if not isinstance(value, bool):
                raise TypeError(f"{flag} must be a bool, got {value!r}")
        if lengths is not None:
            lengths = torch.as_tensor(lengths)
            if (lengths.dtype.is_floating_point or lengths.dtype == torch.bool
                    or tuple(lengths.shape) != (prompt_ids.shape[0],)):
                raise ValueError(f"lengths must be {prompt_ids.shape[0]} ints (one per row), got "
                                 f"{tuple(lengths.shape)} {lengths.dtype}")
            if lengths.numel() and (int(lengths.min()) < 1 or int(lengths.max()) > prompt_ids.shape[1]):
                raise ValueError(f"lengths must lie in [1, {prompt_ids.shape[1]}] (the prompt's length), got "
                                 f"[{int(lengths.min())}, {int(lengths.max())}]")
        if torch.iinfo(prompt_ids.dtype).max < self.num_tokens - 1:
            raise TypeError(
                f"prompt_ids of dtype {prompt_ids.dtype} cannot hold the sampled token ids (up to "
                f"num_tokens - 1 = {self.num_tokens - 1}); pass them as int64"
            )
        return generation.generate(self, prompt_ids, int(count), temperature=temperature, top_k=top_k,
                                   top_p=top_p, eos_token=eos_token, stream=stream, seed=seed,
                                   lengths=lengths, capture=capture, compile=compile)

