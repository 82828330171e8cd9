"""GateLoop's wide-head mixer as scalar-decay linear attention on rotated keys: real products only.

Dimension letters: b batch, n time, h heads, d = e head dimension, c chunks, C chunk length.

Per head, with real q, k, v and one complex gate a_t = |a_t| e^{i phi_t} per step,

    h_t = a_t h_{t-1} + k_t v_t^T,    y_t = q_t . Re(h_t)

and L = cumsum log|a|, T = cumsum phi, the closed form

    y_t = sum_{s<=t} exp(L_t - L_s) cos(T_t - T_s) (q_t . k_s) v_s
        = sum_{s<=t} exp(L_t - L_s) (q'_t . k'_s) v_s,    q' = [q cos T, -q sin T],  k' = [k cos T, -k sin T]

holds because q'_t . k'_s = (q_t . k_s) cos(T_t - T_s): a head of width d is gated linear
attention with one real decay per step and keys of width 2d (q' and k' are q and k turned by
e^{-iT}, as [real part, imaginary part]). Its real (2d, e) state is the complex state seen from
the phase T_t:

    S_t = sum_{s<=t} exp(L_t - L_s) k'_s v_s^T = [Re(e^{-i T_t} h_t); Im(e^{-i T_t} h_t)]

with y_t = q'_t . S_t and S_t = |a_t| S_{t-1} + k'_t v_t^T: inside a chunk S decays by |a_t| alone.
Where T restarts from 0 (a chunk's start), S is [Re h; Im h]; from a chunk's end, where T = T_C,
to the next chunk's start the state turns by e^{i T_C}: [Re; Im] <- [c Re - s Im; s Re + c Im],
c = cos T_C, s = sin T_C.

Chunks. L and T are taken relative to each chunk's start, so float32 keeps its precision at any
length. Inside a chunk: scores q' k'^T (C x C, one real product), weighted by exp(L_t - L_s) on
s < t, times v, plus the diagonal (q_t . k_t) v_t. Across chunks the state is the complex h at each
chunk's end, which is the next chunk's S at T = 0; chunk j adds

    own_j = sum_s exp(L_C - L_s) e^{i(T_C - T_s)} k_s v_s^T       (T_C, L_C: the chunk's totals)

one real product of v with the keys turned to the chunk's end (the turn e^{i T_C} above, applied
to each key rather than to the state), and ``gate_loop_scan`` runs h_j = exp(L_C) e^{i T_C} h_{j-1}
+ own_j over the chunks. The carried part of y_t in chunk j is exp(L_t) q'_t . [Re h_{j-1};
Im h_{j-1}]: one real product.

Complex tensors appear only in the scan over chunks and at its two ends: own_j from its real
and imaginary halves, and the states h_j as [Re h_j; Im h_j] for the carried product.

Causality holds whatever the values: the causal mask selects (torch.where), never multiplies, so
a later position's overflowing q' . k' never reaches an earlier output.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .chunked import in_chunks
from .routing import CHUNK
from .scan import gate_loop_scan


def rotated_heads(q: Tensor, k: Tensor, v: Tensor, log_mag: Tensor, phase: Tensor,
                  h0: Optional[Tensor] = None, *, chunk: int = CHUNK,
                  backend: str = "auto") -> tuple[Tensor, Tensor]:
    """y_t = q_t . Re(h_t) with h_t = a_t h_{t-1} + k_t v_t^T, a_t = exp(log_mag_t + i phase_t),
    computed as linear attention on rotated keys (see the module docstring). Arguments, results
    and dtypes as ``chunked.chunked_heads``'s: y (b, n, h, d) in q's dtype, and the final state
    (b, h, d, d), complex64 (complex128 for float64 gates).
    """
    b, n, h, d = q.shape
    real = log_mag.dtype                       # float32 or float64: decays, phases, accumulation
    with torch.autocast(q.device.type, enabled=False):   # the dtypes below are chosen, not cast
        size, (qb, kb, vb), L, T = in_chunks(q, k, v, log_mag, phase, chunk)

        # q' = [q cos T, -q sin T] and k' likewise: each feature turned by e^{-iT}, (b, c, h, C, 2d)
        cos, minus_sin = torch.cos(T).unsqueeze(-1), -torch.sin(T).unsqueeze(-1)
        qr = torch.cat([qb * cos, qb * minus_sin], -1).to(q.dtype)
        kr = torch.cat([kb * cos, kb * minus_sin], -1).to(q.dtype)

        # inside a chunk: q' k'^T weighted by exp(L_t - L_s) on s < t, times v. The mask selects
        # (where), never multiplies: a later key's q' . k' may overflow, and 0 * inf is nan.
        # The diagonal (s = t, weight 1) is (q_t . k_t) v_t unturned: turned, its gradients in T_t
        # from q' and from k' would cancel only to rounding, and as the largest term it would swamp
        # the small true gradients of gates near 0 (L's through exp(L_t - L_t) likewise).
        earlier = torch.ones(size, size, dtype=torch.bool, device=q.device).tril(-1)   # s < t
        decay = torch.exp((L.unsqueeze(-1) - L.unsqueeze(-2)).masked_fill(~earlier, float("-inf")))
        scores = torch.where(earlier, (qr @ kr.mT).to(real) * decay, 0.0)
        y = scores.to(q.dtype) @ vb                                  # (b, c, h, C, e)
        same = (qb.to(real) * kb).sum(-1, keepdim=True) * vb         # (q_t . k_t) v_t

        # each chunk's own part of the state at its end, [Re own_j; Im own_j] as (2d, e) from one
        # real product, with the keys turned to the chunk's end by e^{i(T_C - T_s)}
        # and weighted by exp(L_C - L_s) <= 1 (s = C turns by exactly 0: no gradient to cancel)
        back = T[..., -1:] - T
        to_end = torch.exp(L[..., -1:] - L)
        k_end = torch.cat([kb * (to_end * torch.cos(back)).unsqueeze(-1),
                           kb * (to_end * torch.sin(back)).unsqueeze(-1)], -1).to(q.dtype)
        own = (k_end.mT @ vb).to(real)                               # (b, c, h, 2d, e)
        own = torch.complex(own[..., :d, :], own[..., d:, :])        # (b, c, h, d, e)
        gate = torch.polar(torch.exp(L[..., -1]), T[..., -1])[..., None, None]   # (b, c, h, 1, 1)

        # across chunks: h_j = gate_j h_{j-1} + own_j
        states, h_last = gate_loop_scan(gate, own, h0, backend=backend)      # (b, c, h, d, e)

        # the carried state's part: exp(L_t) q'_t . [Re h_{j-1}; Im h_{j-1}]
        before = torch.cat([states[:, :-1].real, states[:, :-1].imag], -2)   # (b, c - 1, h, 2d, e)
        if h0 is None:
            first = before.new_zeros(b, 1, h, 2 * d, d)
        else:
            first = torch.cat([h0.real, h0.imag], -2).unsqueeze(1).to(before.dtype)
        before = torch.cat([first, before], 1)
        carried = (qr @ before.to(q.dtype)).to(real) * torch.exp(L).unsqueeze(-1)
        y = (y.to(real) + same + carried).to(q.dtype)

    y = y.movedim(3, 2).flatten(1, 2)                     # (b, c C, h, e)
    return y[:, :n], h_last
