"""GateLoop's mixer for heads wider than one feature, in chunked form: no per-token d x e state.

Dimension letters: b batch, n time, h heads, d = e head dimension, c chunks, C chunk length.

Per head, with a real q, k, v and one complex gate a_t per step,

    h_t = a_t h_{t-1} + k_t v_t^T,    y_t = q_t . Re(h_t)

has, with A_t = a_1 ... a_t, the closed form

    y_t = sum_{s<=t} Re(A_t / A_s) (q_t . k_s) v_s
    Re(A_t / A_s) = exp(L_t - L_s) cos(T_t - T_s),    L = cumsum log|a|,  T = cumsum arg a

Inside a chunk this is a causal, decay-weighted q k^T times v: two matrix products. Across chunks
a (d, e) complex state per head carries the rest; ``gate_loop_scan`` runs that recurrence over
the chunks (a gate and a state per chunk, not per token). L and T are taken relative to each
chunk's start, and the decays exp(L_t - L_s) are formed from differences (s <= t), so nothing
overflows for gates of magnitude at most 1 and nothing is lost to cancellation across chunks.

Causality holds whatever the values: the causal mask selects rather than multiplies, so a later
position's overflowing q . k never reaches an earlier output, and a non-finite input reaches no
output of an earlier chunk. Inside its own chunk a non-finite v_s can still make earlier rows nan,
through the product (scores @ v) that holds it with weight zero (docs/limits.md).

Backward is torch's autograd through these ops and ``gate_loop_scan``. What it keeps per chunk is
O(C^2 + d e) per head, against O(C d e) for the states of the materialized scan.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .routing import CHUNK
from .scan import gate_loop_scan


def in_chunks(q: Tensor, k: Tensor, v: Tensor, log_mag: Tensor, phase: Tensor, chunk: int):
    """The chunk length C and the inputs in chunks, the layout of the scan over chunks:
    (q, k, v) each (b, c, h, C, d), and L, T (b, c, h, C), the running sums of log|a| and arg a
    from each chunk's start, in log_mag's dtype. The last chunk is padded with a = 1, k = v = 0."""
    n = q.shape[1]
    size = min(chunk, n)
    pad = -n % size
    c = (n + pad) // size

    def blocks(t: Tensor) -> Tensor:           # (b, n, h, ...) -> (b, c, h, C, ...)
        if pad:
            t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
        return t.unflatten(1, (c, size)).movedim(2, 3)
    real = log_mag.dtype
    return (size, (blocks(q), blocks(k), blocks(v)), blocks(log_mag.to(real)).cumsum(-1),
            blocks(phase.to(real)).cumsum(-1))


def chunked_heads(q: Tensor, k: Tensor, v: Tensor, log_mag: Tensor, phase: Tensor,
                  h0: Optional[Tensor] = None, *, chunk: int = CHUNK,
                  backend: str = "auto") -> tuple[Tensor, Tensor]:
    """y_t = q_t . Re(h_t) with h_t = a_t h_{t-1} + k_t v_t^T, a_t = exp(log_mag_t + i phase_t).

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
    real = log_mag.dtype                       # float32 or float64: decays, states, accumulation
    with torch.autocast(q.device.type, enabled=False):   # the dtypes below are chosen, not cast
        size, (qb, kb, vb), L, T = in_chunks(q, k, v, log_mag, phase, chunk)

        # inside a chunk: (q k^T) weighted by Re(A_t / A_s) on s <= t, times v. The mask selects
        # (where), never multiplies: a later key's q . k may overflow, and 0 * inf is nan.
        causal = torch.ones(size, size, dtype=torch.bool, device=q.device).tril()
        diff = L.unsqueeze(-1) - L.unsqueeze(-2)          # (b, c, h, C, C): L_t - L_s
        decay = torch.exp(diff.masked_fill(~causal, float("-inf")))
        weight = decay * torch.cos(T.unsqueeze(-1) - T.unsqueeze(-2))
        scores = torch.where(causal, (qb @ kb.transpose(-1, -2)).to(real) * weight, 0.0)
        y = scores.to(q.dtype) @ vb                       # (b, c, h, C, d)

        # each chunk's own contribution to the state at its end, sum_s (A_C / A_s) k_s v_s^T, as
        # one product whose columns interleave real and imaginary parts: a complex view, no copy
        to_end_mag = torch.exp(L[..., -1:] - L)           # |A_C / A_s| <= 1 for |a| <= 1
        to_end_arg = T[..., -1:] - T
        to_end = torch.stack([to_end_mag * torch.cos(to_end_arg), to_end_mag * torch.sin(to_end_arg)], -1)
        v_ri = (vb.unsqueeze(-1) * to_end.unsqueeze(-2)).to(q.dtype).flatten(-2)   # (b, c, h, C, 2d)
        own = torch.view_as_complex((kb.transpose(-1, -2) @ v_ri).to(real).unflatten(-1, (d, 2)))
        gate = torch.polar(torch.exp(L[..., -1]), T[..., -1])   # (b, c, h)

        # across chunks: S_j = gate_j S_{j-1} + own_j
        states, h_last = gate_loop_scan(gate[..., None, None], own, h0, backend=backend)  # (b, c, h, d, d)
        first = torch.zeros_like(states[:, :1]) if h0 is None else h0.unsqueeze(1).to(states.dtype)
        before = torch.view_as_real(torch.cat([first, states[:, :-1]], dim=1))   # S_{j-1}: (b, c, h, d, d, 2)

        # the carried state's part: Re(A_t q_t^T S_{j-1}), one product over interleaved parts
        q_ri = (qb @ before.to(q.dtype).flatten(-2)).to(real).unflatten(-1, (d, 2))   # (b, c, h, C, d, 2)
        from_start = torch.exp(L).unsqueeze(-1)           # |A_t| relative to the chunk start
        carried = from_start * (torch.cos(T).unsqueeze(-1) * q_ri[..., 0] - torch.sin(T).unsqueeze(-1) * q_ri[..., 1])
        y = (y.to(real) + carried).to(q.dtype)

    y = y.movedim(3, 2).flatten(1, 2)                     # (b, c C, h, d)
    return y[:, :n], h_last

