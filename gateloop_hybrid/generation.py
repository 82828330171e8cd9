"""Generation over a static state: a one-token decode step that a CUDA graph can capture, prefill
through the layers' fast paths, and sampling on the device.

    state = DecodeState(model, batch, max_len)        every layer's state, allocated once
    logits = prefill(model, prompt, state, lengths)    the prompt through the layers' forward
    token = sample(logits, seeds, counter, ...)        on the device, one stream per row
    logits = decode_step(model, token, state, active)  one token per row; the state updated in place

A decode step has fixed shapes, allocates nothing that outlives it, branches on no tensor value
and never waits for the device, so ``torch.cuda.graph`` (``Decoder(capture=True)``) or
``torch.compile(mode="reduce-overhead")`` records it whole. Its state:

- a GateLoop layer: the complex state (b, heads, d, e), as the layer's cache (``return_cache``);
- an attention layer: keys and values (b, heads, max_len, dim_head) in a buffer of fixed length,
  written at each row's own position.

Rows of different prompt lengths: the shortest prompt's tokens go through the layers' forward
together, and each longer row takes its remaining tokens as decode steps in which the rows that
are done sit still (``active``): every row's state is the one it would have alone, to rounding.

Sampling draws its randomness from a counter-based hash of (row seed, token index, vocabulary
index): a row's tokens depend on its seed and its own logits only, never on the batch around it,
and nothing random is kept between steps (a captured step replays the same stream).
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from .attention import CausalFullAttention
from .gate_loop import GateLoopedAttention, SimpleGateLoopLayer
from .gates import gate_parts
from .hybrid import AugmentedAttention
from .transformer import PreNorm

# ---------------------------------------------------------------------------------------------
# the state


class DecodeState:
    """Every layer's decoding state for ``batch`` rows, allocated once and updated in place.

    Args:
        model: a ``Transformer``.
        batch: rows.
        max_len: tokens per row the attention layers' key/value buffers hold (prompt and new
            tokens); GateLoop layers need no length.
        device, dtype: where and in which dtype the attention buffers live (default: the
            model's); GateLoop states are complex64 (complex128 for a float64 model).
    """

    def __init__(self, model, batch: int, max_len: int, device=None, dtype=None):
        param = next(model.parameters())
        device = param.device if device is None else torch.device(device)
        dtype = param.dtype if dtype is None else dtype
        cdtype = torch.complex128 if param.dtype == torch.float64 else torch.complex64
        self.batch, self.max_len = batch, max_len
        self.layers: list = []
        real = torch.float64 if param.dtype == torch.float64 else torch.float32

        def buffers(layer: CausalFullAttention):
            shape = (batch, layer.heads, max_len, layer.dim_head)
            return torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)

        for attn, _ in model.layers:
            mixer = attn.fn
            if isinstance(mixer, GateLoopedAttention):
                d = mixer.to_qkv.out_features // (3 * mixer.heads)
                self.layers.append(torch.zeros(batch, mixer.heads, d, d, dtype=cdtype, device=device))
            elif isinstance(mixer, CausalFullAttention):
                self.layers.append(buffers(mixer))
            elif isinstance(mixer, AugmentedAttention):       # (the simple layer's state, k, v)
                self.layers.append((torch.zeros(batch, mixer.gate_loop.dim, dtype=real, device=device),
                                    *buffers(mixer.attn)))
            else:
                raise TypeError(f"DecodeState: no decode step for {type(mixer).__name__}")
        self.position = torch.zeros(batch, dtype=torch.long, device=device)   # tokens consumed per row

    def tensors(self) -> list[Tensor]:
        out = []
        for s in self.layers:
            out.extend(s if isinstance(s, tuple) else (s,))
        return [*out, self.position]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def load(self, caches: Sequence, n: int) -> None:
        """Take the caches of a forward over n tokens (``return_cache=True``) as the state."""
        if n > self.max_len and any(isinstance(buf, tuple) for buf in self.layers):
            raise ValueError(f"DecodeState: a prompt of {n} tokens exceeds max_len={self.max_len}")
        for buf, cache in zip(self.layers, caches):
            if not isinstance(buf, tuple):
                buf.copy_(cache)
                continue
            if len(buf) == 3:                                   # AugmentedAttention
                buf[0].copy_(cache[0])
                buf, cache = buf[1:], cache[1]
            buf[0][:, :, :n].copy_(cache[0])
            buf[1][:, :, :n].copy_(cache[1])
        self.position.fill_(n)


# ---------------------------------------------------------------------------------------------
# one token through each layer


def _gateloop_step(layer: GateLoopedAttention, x: Tensor, state: Tensor, active: Tensor,
                   ablate_complex: bool, ablate_state_transition: bool) -> Tensor:
    """GateLoopedAttention on one token per row, x (b, D): h = a h + k v^T, y = q . Re(h); the
    state is updated in place where ``active``. In real arithmetic on the state's (re, im) view,
    so that a compiled step fuses gates, update and write into a few kernels."""
    b, h = x.shape[0], layer.heads
    q, k, v = (t.unflatten(-1, (h, -1)) for t in layer.to_qkv(x).chunk(3, dim=-1))   # (b, h, d)
    a_re, a_im = (t[..., None, None] for t in
                  gate_parts(layer.to_a[0](x).view(b, h, 2), ablate_complex, ablate_state_transition))
    pairs = torch.view_as_real(state)                                     # (b, h, d, e, 2)
    s_re, s_im = pairs.unbind(-1)
    kv = (k[..., :, None] * v[..., None, :]).to(pairs.dtype)
    new_re = a_re * s_re - a_im * s_im + kv
    new_im = a_re * s_im + a_im * s_re
    pairs.copy_(torch.where(active[:, None, None, None, None], torch.stack([new_re, new_im], -1), pairs))
    y = torch.einsum("b h d, b h d e -> b h e", q, new_re.to(q.dtype)).flatten(1)   # (b, I)
    out = layer.maybe_sub_ln(y)
    if layer.to_gates is not None:
        out = layer.to_gates(x) * out
    return layer.to_out(out)


def _simple_step(layer: SimpleGateLoopLayer, x: Tensor, state: Tensor, active: Tensor) -> Tensor:
    """SimpleGateLoopLayer on one token per row, x (b, D): h = sigmoid(a) h + kv, y = q h; the
    state (b, D) is updated in place where ``active``."""
    q, kv, za = layer.to_qkva[0](layer.norm(x)).chunk(3, dim=-1)
    new = za.sigmoid().to(state.dtype) * state + kv.to(state.dtype)
    state.copy_(torch.where(active[:, None], new, state))
    return layer.maybe_post_ln(q * new.to(q.dtype))


def _attention_step(layer: CausalFullAttention, x: Tensor, cache, position: Tensor, active: Tensor,
                    ablate_complex: bool, ablate_state_transition: bool) -> Tensor:
    """CausalFullAttention on one token per row against a key/value buffer of fixed length: the
    new key and value go to each row's ``position``, the query sees positions <= it."""
    k_buf, v_buf = cache
    x1 = x[:, None]                                     # (b, 1, D)
    q, k, v = layer.project(x1, position[:, None, None], ablate_complex, ablate_state_transition)   # (b, h, 1, d)
    b, h, _, d = q.shape
    # an inactive row writes too, at the slot its next real token overwrites
    at = position.clamp(max=k_buf.shape[2] - 1)[:, None, None, None].expand(b, h, 1, d)
    k_buf.scatter_(2, at, k.to(k_buf.dtype))
    v_buf.scatter_(2, at, v.to(v_buf.dtype))
    visible = torch.arange(k_buf.shape[2], device=x.device)[None, :] <= position[:, None]   # (b, L)
    out = layer.attend(q, k_buf.to(q.dtype), v_buf.to(q.dtype), ~visible[:, None, None])
    return layer.output(x1, out)[:, 0]


def decode_step(model, tokens: Tensor, state: DecodeState, active: Optional[Tensor] = None,
                ablate_complex: Optional[bool] = None, ablate_state_transition: Optional[bool] = None) -> Tensor:
    """Logits (b, V) after one more token per row (``tokens`` (b,)); every layer's state in
    ``state`` is advanced in place for the rows where ``active`` (default: all)."""
    if active is None:
        active = torch.ones(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    ablate_complex = model.ablate_complex if ablate_complex is None else ablate_complex
    ablate_st = model.ablate_state_transition if ablate_state_transition is None else ablate_state_transition
    x = model.token_emb(tokens.long())                  # (b, D)
    for (attn, ff), layer_state in zip(model.layers, state.layers):
        mixer = attn.fn
        inner = attn.norm(x) if isinstance(attn, PreNorm) else x
        if isinstance(mixer, GateLoopedAttention):
            out = _gateloop_step(mixer, inner, layer_state, active, ablate_complex, ablate_st)
        elif isinstance(mixer, AugmentedAttention):
            summary = _simple_step(mixer.gate_loop, inner, layer_state[0], active)
            out = _attention_step(mixer.attn, inner + summary, layer_state[1:], state.position, active,
                                  ablate_complex, ablate_st)
        else:
            out = _attention_step(mixer, inner, layer_state, state.position, active, ablate_complex, ablate_st)
        x = out + x if isinstance(attn, PreNorm) else attn.norm(out + x)
        x = ff(x)
    state.position.add_(active.long())
    return model.to_logits(x)


def prefill(model, prompt: Tensor, state: DecodeState, lengths: Optional[Tensor] = None) -> Tensor:
    """Run the prompts (b, n) into ``state``; each row's logits after its last prompt token (b, V).

    ``lengths`` (b,): row i's prompt is prompt[i, :lengths[i]] (the rest is padding, any valid ids).
    The tokens all rows share in number go through the model's forward (its fast paths); a longer
    row's remaining tokens are decode steps in which the shorter rows sit still."""
    n = prompt.shape[1]
    if lengths is None:
        logits, caches = model(prompt, return_cache=True)
        state.load(caches, n)
        return logits[:, -1]
    lengths = lengths.to(prompt.device)
    shortest = int(lengths.min())
    logits, caches = model(prompt[:, :shortest], return_cache=True)
    state.load(caches, shortest)
    last = logits[:, -1]
    for t in range(shortest, int(lengths.max())):
        active = lengths > t
        step = decode_step(model, prompt[:, t], state, active)
        last = torch.where(active[:, None], step, last)
    return last


# ---------------------------------------------------------------------------------------------
# sampling on the device

_M32 = (1 << 32) - 1


def _mul32(x: Tensor, c: int) -> Tensor:
    """x * c mod 2^32 for x in [0, 2^32), in int64 with no product past 2^49: signed overflow is
    left to no compiler (Inductor's CPU code does not wrap it as eager torch does)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _fmix32(h: Tensor) -> Tensor:
    """MurmurHash3's 32-bit finaliser on int64 tensors holding values in [0, 2^32)."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def uniforms(seeds: Tensor, counter: Tensor, size: int) -> Tensor:
    """(b, size) float64 uniforms in (0, 1) with 53 random bits: two hashes of (seed, counter,
    index) per row, the same in eager torch, compiled code and on every device."""
    idx = torch.arange(size, device=seeds.device, dtype=torch.long)[None, :]
    row = _fmix32(_fmix32(_fmix32((seeds & _M32) ^ 0x9E3779B9) ^ ((seeds >> 32) & _M32))
                  ^ ((counter + 1) & _M32))[:, None]
    high = _fmix32(row ^ idx)
    low = _fmix32(_fmix32(row ^ 0x27D4EB2F) ^ idx)
    return (((high << 21) | (low >> 11)).double() + 0.5) * (1.0 / (1 << 53))


def sample(logits: Tensor, seeds: Tensor, counter: Tensor, temperature: float = 1.0,
           top_k: Optional[int] = None, top_p: Optional[float] = None) -> Tensor:
    """One token id per row of ``logits`` (b, V), on the device, with no host synchronisation.

    temperature 0 takes the most likely token. Otherwise the Gumbel-max draw from the softmax
    of logits / temperature, shifted so each row's maximum is 0 and divided in float64 (a tiny
    temperature then sends the others to -inf rather than overflowing). ``top_k`` keeps exactly
    k candidates (ties broken by ``topk``'s order); ``top_p`` keeps the smallest set of most
    likely tokens whose probability reaches p (the most likely always). The randomness of row i
    comes from (seeds[i], counter[i]) alone."""
    logits = logits.float()
    if top_k is not None and top_k < logits.shape[-1]:
        top = logits.topk(top_k, dim=-1)
        logits = torch.full_like(logits, float("-inf")).scatter(-1, top.indices, top.values)
    if temperature == 0:
        return logits.argmax(dim=-1)
    scaled = (logits.double() - logits.max(dim=-1, keepdim=True).values.double()) / temperature
    if top_p is not None and top_p < 1.0:
        probs, order = scaled.softmax(dim=-1).sort(dim=-1, descending=True)
        before = probs.cumsum(dim=-1) - probs              # the mass of the more likely tokens
        drop = torch.zeros_like(before, dtype=torch.bool).scatter(-1, order, before >= top_p)
        scaled = scaled.masked_fill(drop, float("-inf"))
    gumbel = -torch.log(-torch.log(uniforms(seeds, counter, logits.shape[-1])))
    return (scaled + gumbel).argmax(dim=-1)


# ---------------------------------------------------------------------------------------------
# the loop


class Decoder:
    """A model's decode step and sampler over one ``DecodeState``, as one callable
    ``step(tokens, active) -> next tokens``, optionally captured in a CUDA graph.

    With ``capture=True`` (CUDA only) the first call warms the step up on a side stream, puts
    the state back as it was, and records step and sampling in a ``torch.cuda.CUDAGraph``; each
    later call copies the tokens in and replays it (the inputs and outputs live in fixed
    buffers; the returned tensor is overwritten by the next call).

    With ``compile=True`` step and sampling go through ``torch.compile(fullgraph=True)`` first,
    so that Inductor fuses each layer's small element-wise operations (one compile per batch size
    and, for attention, buffer length); with ``capture`` the graph then records the fused kernels."""

    def __init__(self, model, state: DecodeState, seeds: Tensor, *, temperature: float = 1.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None, capture: bool = False,
                 compile: bool = False):
        self.model, self.state, self.seeds = model, state, seeds
        self.options = dict(temperature=temperature, top_k=top_k, top_p=top_p)
        self.counter = torch.zeros_like(seeds)
        self.capture = capture and state.position.is_cuda
        self.graph = None
        self._step = torch.compile(self._eager_step, fullgraph=True, dynamic=False) if compile else self._eager_step

    def _eager_step(self, tokens: Tensor, active: Tensor) -> tuple[Tensor, Tensor]:
        logits = decode_step(self.model, tokens, self.state, active)
        nxt = sample(logits, self.seeds, self.counter, **self.options)
        self.counter.add_(1)
        return nxt, logits

    def _run(self, tokens: Tensor, active: Tensor) -> tuple[Tensor, Tensor]:
        return self._step(tokens, active)

    def __call__(self, tokens: Tensor, active: Tensor) -> tuple[Tensor, Tensor]:
        """(next tokens (b,), the logits they were drawn from (b, V))."""
        if not self.capture:
            return self._run(tokens, active)
        if self.graph is None:
            self._record(tokens, active)
        self.tokens.copy_(tokens)
        self.active.copy_(active)
        self.graph.replay()
        return self.out

    def _record(self, tokens: Tensor, active: Tensor) -> None:
        kept = [t.clone() for t in self.state.tensors()] + [self.counter.clone()]
        self.tokens, self.active = tokens.clone(), active.clone()
        side = torch.cuda.Stream(self.tokens.device)
        side.wait_stream(torch.cuda.current_stream(self.tokens.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._run(self.tokens, self.active)
        torch.cuda.current_stream(self.tokens.device).wait_stream(side)
        for t, k in zip([*self.state.tensors(), self.counter], kept):
            t.copy_(k)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self._run(self.tokens, self.active)


def check_sampling(temperature, top_k, top_p) -> tuple[float, Optional[int], Optional[float]]:
    if (isinstance(temperature, bool) or not isinstance(temperature, Real)
            or not math.isfinite(temperature) or temperature < 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, Integral) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, Real)
                              or not 0.0 < float(top_p) <= 1.0):
        raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")
    return float(temperature), None if top_k is None else int(top_k), None if top_p is None else float(top_p)


def row_seeds(seed, batch: int, device) -> Tensor:
    """(batch,) int64 seeds: from an int (row i gets seed + i), a sequence or tensor of one per
    row, or None (drawn from torch's global generator, so torch.manual_seed fixes them)."""
    if seed is None:
        return torch.randint(0, 2 ** 62, (batch,), dtype=torch.long).to(device)
    if isinstance(seed, bool):
        raise TypeError("seed must be None, an int, or one int per row, got a bool")
    if isinstance(seed, Integral):
        return (torch.arange(batch, dtype=torch.long) + int(seed)).to(device)
    seeds = torch.as_tensor(seed)
    if seeds.dtype.is_floating_point or seeds.dtype.is_complex or seeds.dtype == torch.bool or tuple(seeds.shape) != (batch,):
        raise ValueError(f"seed must be None, an int, or {batch} ints (one per row), got {tuple(seeds.shape)} "
                         f"{seeds.dtype}")
    return seeds.to(device=device, dtype=torch.long)


def generate(model, prompt: Tensor, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None, eos_token: Optional[int] = None,
             stream: Optional[Callable[[Tensor], None]] = None, seed=None, lengths: Optional[Tensor] = None,
             capture: bool = False, compile: bool = False) -> Tensor:
    """``Transformer.generate``'s loop: prefill, then one captured-or-eager step per token.
    Arguments as ``Transformer.generate``, checked there (``lengths`` a tensor)."""
    b, n = prompt.shape
    device = prompt.device
    if max_new_tokens == 0:
        return prompt.new_empty((b, 0))
    state = DecodeState(model, b, n + max_new_tokens)
    seeds = row_seeds(seed, b, device)
    logits = prefill(model, prompt, state, None if lengths is None else lengths.long())
    decoder = Decoder(model, state, seeds, temperature=temperature, top_k=top_k, top_p=top_p, capture=capture,
                      compile=compile)
    first_bad = torch.full((), -1, dtype=torch.long, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    tokens = []
    token = sample(logits, seeds, decoder.counter, temperature, top_k, top_p)
    decoder.counter.add_(1)
    for step in range(max_new_tokens):
        finite = torch.isfinite(logits.float().max(dim=-1).values).all()
        first_bad = torch.where((first_bad < 0) & ~finite, step, first_bad)
        if eos_token is not None:
            token = torch.where(done, eos_token, token)
            done = done | (token == eos_token)
        tokens.append(token)
        if stream is not None:
            stream(token.to(prompt.dtype).cpu())
        if step + 1 == max_new_tokens:
            break
        if eos_token is not None and step % 16 == 15 and bool(done.all()):
            tokens.extend([torch.full_like(token, eos_token)] * (max_new_tokens - step - 1))
            break
        token, logits = decoder(token, ~done)
        token, logits = token.clone(), logits.clone()    # the captured step's buffers are reused
    bad = int(first_bad)
    if bad >= 0:
        raise ValueError(f"generate: the model's logits at new token {bad} are not finite (nan or inf); "
                         "the weights or the inputs hold non-finite values")
    return torch.stack(tokens, dim=1).to(prompt.dtype)
