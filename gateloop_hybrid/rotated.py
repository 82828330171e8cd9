"""GateLoop's wide-head mixer as scalar-decay linear attention on rotated keys: real products only.

Dimension letters: b batch, n time, h heads, d = e head dimension, c chunks, C chunk length.

Per head, with real q, k, v and one complex gate a_t = |a_t| e^{i phi_t} per step,

    h_t = a_t h_{t-1} + k_t v_t^T,    y_t = q_t . Re(h_t)

and L = cumsum log|a|, T = cumsum phi, the closed form

    y_t = sum_{s<=t} exp(L_t - L_s) cos(T_t - T_s) (q_t . k_s) v_s
        = sum_{s<=t} exp(L_t - L_s) (q'_t . k'_s) v_s

holds with q' and k' each feature turned by e^{-iT}, written as interleaved (re, im) pairs:

    q'[2i] = q_i cos T,  q'[2i+1] = -q_i sin T     (the same for k'),

because q'_t . k'_s = (q_t . k_s) cos(T_t - T_s). So a head of width d is gated linear attention
with one real decay per step and keys of width 2d. Its real (2d, e) state is the complex state
seen from the phase T_t, as interleaved (re, im) rows:

    S_t = sum_{s<=t} exp(L_t - L_s) k'_s v_s^T  =  e^{-i T_t} h_t  (row 2i: Re, row 2i+1: Im of row i)

and y_t = q'_t . S_t. Inside a chunk S decays by |a_t| alone; the phase turns only the frame.

Chunks. L and T are taken relative to each chunk's start, so float32 keeps its precision at any
length. Inside a chunk: scores q' k'^T (C x C, one real product), weighted by exp(L_t - L_s) on
s <= t, times v. Across chunks the state is the complex h itself at each chunk's end (at T = 0 of
the next chunk, so the frame there is h's own): chunk j adds

    own_j = e^{i T_C} (sum_s exp(L_C - L_s) k'_s v_s^T)     (T_C, L_C: the chunk's totals)

one real (C, e)^T (C, 2d) product, read as complex, turned by the chunk's total phase; and
``gate_loop_scan`` runs h_j = exp(L_C) e^{i T_C} h_{j-1} + own_j over the chunks. The carried part
of y_t in chunk j is exp(L_t) q'_t . h_{j-1} (h_{j-1} as interleaved rows): one real product.

The states across chunks are kept transposed, (e, d) per head, so that every product reads its
operands in place: the own product lands as (e, 2d) = (e, d, re/im), a complex (e, d) with no copy,
and the carried product takes that layout's transpose as a strided operand. Complex tensors appear
only in the scan over chunks and at the boundary (h0, h_last), in the layer's cache format (d, e).

Causality holds whatever the values: the causal mask selects (torch.where), never multiplies, so
a later position's overflowing q' . k' never reaches an earlier output.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .routing import CHUNK
from .scan import gate_loop_scan


def rotated_heads(q: Tensor, k: Tensor, v: Tensor, log_mag: Tensor, phase: Tensor,
                  h0: Optional[Tensor] = None, *, chunk: int = CHUNK,
                  backend: str = "auto") -> tuple[Tensor, Tensor]:
    """y_t = q_t . Re(h_t) with h_t = a_t h_{t-1} + k_t v_t^T, a_t = exp(log_mag_t + i phase_t),
    computed as linear attention on rotated keys (see the module docstring).

    Args:
        q, k, v: (b, n, h, d) real. Every matrix product runs in q's dtype (bf16 or float16 on
            tensor cores; float32 as torch's matmul precision setting says), the rest in the gates' dtype.
        log_mag, phase: (b, n, h) real, float32 or float64: log|a| (finite) and arg a.
        h0: (b, h, d, d) complex state to continue from, or None.
        chunk: the chunk length C (the last chunk is padded with a = 1, k = v = 0).
        backend: the ``gate_loop_scan`` backend for the recurrence across chunks.

    Returns:
        y (b, n, h, d) in q's dtype and the final state (b, h, d, d), complex64 (complex128 for
        float64 gates).
    """
    b, n, h, d = q.shape
    real = log_mag.dtype                       # float32 or float64: decays, phases, accumulation
    size = min(chunk, n)
    pad = -n % size
    c = (n + pad) // size

    def blocks(t: Tensor) -> Tensor:           # (b, n, h, ...) -> (b, c, h, C, ...)
        if pad:
            t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
        return t.unflatten(1, (c, size)).movedim(2, 3)

    with torch.autocast(q.device.type, enabled=False):   # the dtypes below are chosen, not cast
        qb, kb, vb = blocks(q), blocks(k), blocks(v)      # (b, c, h, C, d)
        L = blocks(log_mag.to(real)).cumsum(-1)           # (b, c, h, C), relative to the chunk start
        T = blocks(phase.to(real)).cumsum(-1)

        # e^{-iT} as (re, im); q' and k' as interleaved pairs, (b, c, h, C, 2d)
        turn = torch.stack([torch.cos(T), -torch.sin(T)], -1).unsqueeze(-2)   # (b, c, h, C, 1, 2)
        qr = (qb.unsqueeze(-1) * turn).flatten(-2).to(q.dtype)
        kr = (kb.unsqueeze(-1) * turn).flatten(-2).to(q.dtype)

        # inside a chunk: q' k'^T weighted by exp(L_t - L_s) on s <= t, times v. The mask selects
        # (where), never multiplies: a later key's q' . k' may overflow, and 0 * inf is nan.
        # The diagonal (s = t, weight 1) is q_t . k_t unturned: turned, its gradients in T_t from q'
        # and from k' cancel only to rounding, and being the largest term it would swamp the small
        # true gradients of gates near 0 (L's through exp(L_t - L_t) likewise).
        before_t = torch.ones(size, size, dtype=torch.bool, device=q.device).tril(-1)   # s < t
        decay = torch.exp((L.unsqueeze(-1) - L.unsqueeze(-2)).masked_fill(~before_t, float("-inf")))
        same = torch.diag_embed((qb * kb).to(real).sum(-1))
        scores = torch.where(before_t, (qr @ kr.mT).to(real) * decay, same)
        y = scores.to(q.dtype) @ vb                       # (b, c, h, C, e)

        # each chunk's own part of the state at its end, transposed: own_j^T as (e, d, re/im) from
        # one real product, with the keys turned to the chunk's end, k_s e^{i(T_C - T_s)}, and
        # weighted by exp(L_C - L_s) <= 1 (s = C turns by exactly 0: no gradient to cancel there)
        back = T[..., -1:] - T
        to_end = torch.exp(L[..., -1:] - L)
        turn_end = torch.stack([to_end * torch.cos(back), to_end * torch.sin(back)], -1).unsqueeze(-2)
        k_end = (kb.unsqueeze(-1) * turn_end).flatten(-2).to(q.dtype)                # (b, c, h, C, 2d)
        own = torch.view_as_complex((vb.mT @ k_end).to(real).unflatten(-1, (d, 2)))  # (b, c, h, e, d)
        gate = torch.polar(torch.exp(L[..., -1]), T[..., -1])[..., None, None]       # (b, c, h, 1, 1)

        # across chunks: h_j = gate_j h_{j-1} + own_j, on the transposed states (b, c, h, e, d)
        h0t = None if h0 is None else h0.mT
        states, h_last = gate_loop_scan(gate, own, h0t, backend=backend)

        # the carried state's part: exp(L_t) q'_t . h_{j-1}, h_{j-1} as interleaved rows (2d, e)
        before = torch.view_as_real(states[:, :-1]).flatten(-2)              # (b, c - 1, h, e, 2d)
        if h0 is None:
            first = before.new_zeros(b, 1, h, d, 2 * d)
        else:
            first = torch.view_as_real(h0t.to(states.dtype)).flatten(-2).unsqueeze(1)
        before = torch.cat([first, before], dim=1)
        carried = (qr @ before.to(q.dtype).mT).to(real) * torch.exp(L).unsqueeze(-1)
        y = (y.to(real) + carried).to(q.dtype)

    y = y.movedim(3, 2).flatten(1, 2)                     # (b, c C, h, e)
    return y[:, :n], h_last.mT.contiguous()
