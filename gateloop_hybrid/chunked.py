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

Backward is torch's autograd through these ops and ``gate_loop_scan``. What it keeps per chunk is
O(C^2 + d e) per head, against O(C d e) for the states of the materialized scan.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .scan import gate_loop_scan

CHUNK = 64
LOG_GATE_FLOOR = -math.log(2)   # log_gates' magnitudes are sigmoid(|z|) >= 1/2


def gate_preactivation(z: Tensor, frac_gradient: float = 1.0, ablate_complex: bool = False) -> Tensor:
    """(..., 2) gate pre-activations as (...) complex (float32 or wider), with only frac_gradient
    of their gradient passed back (the values unchanged) and, with ablate_complex, no imaginary part."""
    z = z * frac_gradient + z.detach() * (1 - frac_gradient)
    if z.dtype in (torch.float16, torch.bfloat16):
        z = z.float()  # complex needs float32 or wider
    z = torch.view_as_complex(z)
    return z.real + 0.0j if ablate_complex else z


def log_gates(z: Tensor, frac_gradient: float = 1.0, ablate_complex: bool = False,
              ablate_state_transition: bool = False) -> tuple[Tensor, Tensor]:
    """log|a| and arg a of the gates a = sigmoid(|z|) exp(i arg z), from (..., 2) pre-activations
    (as ``mixer.gates``, which returns a itself); float32 or wider."""
    z = gate_preactivation(z, frac_gradient, ablate_complex)
    if ablate_state_transition:
        zero = torch.zeros_like(z.real)
        return zero, zero
    return F.logsigmoid(z.abs()), z.angle()


def chunked_heads(q: Tensor, k: Tensor, v: Tensor, log_mag: Tensor, phase: Tensor,
                  h0: Optional[Tensor] = None, *, chunk: int = CHUNK, backend: str = "auto",
                  min_log_gate: Optional[float] = None) -> tuple[Tensor, Tensor]:
    """y_t = q_t . Re(h_t) with h_t = a_t h_{t-1} + k_t v_t^T, a_t = exp(log_mag_t + i phase_t).

    Args:
        q, k, v: (b, n, h, d) real. Every matrix product runs in q's dtype (bf16 or float16 on
            tensor cores; float32 as torch's matmul precision setting says), the rest in the gates' dtype.
        log_mag, phase: (b, n, h) real, float32 or float64: log|a| (finite) and arg a.
        h0: (b, h, d, d) complex state to continue from, or None.
        chunk: the chunk length C (the last chunk is padded with a = 1, k = v = 0).
        backend: the ``gate_loop_scan`` backend for the recurrence across chunks.
        min_log_gate: a lower bound on log_mag that the caller guarantees (the layer's gates,
            sigmoid(|z|), have log|a| >= log 1/2). Where it keeps the decays of a chunk inside
            q's dtype range, the decay-weighted scores are one matrix product of factored
            operands; otherwise they are formed from differences L_t - L_s.

    Returns:
        y (b, n, h, d) in q's dtype and the final state (b, h, d, d), complex64 (complex128 for
        float64 gates).
    """
    b, n, h, d = q.shape
    real = log_mag.dtype                       # float32 or float64: decays, states, accumulation
    size = min(chunk, n)
    pad = -n % size
    c = (n + pad) // size

    def blocks(t: Tensor) -> Tensor:           # (b, n, h, ...) -> (b, c, h, C, ...): the scan's layout
        if pad:
            t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
        return t.unflatten(1, (c, size)).movedim(2, 3)

    with torch.autocast(q.device.type, enabled=False):   # the dtypes below are chosen, not cast
        qb, kb, vb = blocks(q), blocks(k), blocks(v)      # (b, c, h, C, d)
        L = blocks(log_mag.to(real)).cumsum(-1)           # (b, c, h, C), relative to the chunk start
        T = blocks(phase.to(real)).cumsum(-1)

        y = _within_chunks(qb, kb, vb, L, T, factor=_factors(min_log_gate, size, q.dtype))

        # each chunk's own contribution to the state at its end, sum_s (A_C / A_s) k_s v_s^T, as
        # one product whose columns interleave real and imaginary parts: a complex view, no copy
        to_end_mag = torch.exp(L[..., -1:] - L)           # |A_C / A_s| <= 1 for |a| <= 1
        to_end_arg = T[..., -1:] - T
        to_end = torch.stack([to_end_mag * torch.cos(to_end_arg), to_end_mag * torch.sin(to_end_arg)], -1)
        v_ri = (vb.unsqueeze(-1) * to_end.unsqueeze(-2)).to(q.dtype).flatten(-2)   # (b, c, h, C, 2d)
        gate = torch.polar(torch.exp(L[..., -1]), T[..., -1])   # (b, c, h): A_C of each chunk

        def own(k_blocks, v_blocks):                      # -> (..., d, d) complex
            return torch.view_as_complex((k_blocks.transpose(-1, -2) @ v_blocks).to(real).unflatten(-1, (d, 2)))

        # across chunks, the state at each chunk's start, S_{j-1} = gate_{j-1} S_{j-2} + own_{j-1}:
        # the scan takes the previous chunk's gate and contribution (shifted k and v, not states)
        shifted = lambda t: F.pad(t, (0, 0) * (t.dim() - 2) + (1, 0))[:, :c]   # chunk j gets j - 1's
        gate_before = torch.cat([torch.ones_like(gate[:, :1]), gate[:, :-1]], 1)   # the first starts at h0
        before, last_before = gate_loop_scan(gate_before[..., None, None], own(shifted(kb), shifted(v_ri)), h0,
                                             backend=backend)   # (b, c, h, d, d)
        h_last = gate[:, -1, :, None, None] * last_before + own(kb[:, -1], v_ri[:, -1])
        before = torch.view_as_real(before)               # (b, c, h, d, d, 2)

        # the carried state's part: Re(A_t q_t^T S_{j-1}), one product over interleaved parts
        q_ri = (qb @ before.to(q.dtype).flatten(-2)).to(real).unflatten(-1, (d, 2))   # (b, c, h, C, d, 2)
        from_start = torch.exp(L).unsqueeze(-1)           # |A_t| relative to the chunk start
        carried = from_start * (torch.cos(T).unsqueeze(-1) * q_ri[..., 0] - torch.sin(T).unsqueeze(-1) * q_ri[..., 1])
        y = (y + carried).to(q.dtype)

    y = y.movedim(3, 2).flatten(1, 2)                     # (b, c C, h, d)
    return y[:, :n], h_last


def _factors(min_log_gate: Optional[float], size: int, dtype: torch.dtype) -> bool:
    """Whether the factored scores are safe: operands scaled by up to exp(R / 2), R = the chunk's
    range of L, and masked products up to exp(R), stay well inside dtype's range."""
    if min_log_gate is None or not math.isfinite(min_log_gate):
        return False
    half_range = (size - 1) * max(0.0, -min_log_gate) / 2
    return half_range <= math.log(torch.finfo(dtype).max) / 3


def _within_chunks(qb: Tensor, kb: Tensor, vb: Tensor, L: Tensor, T: Tensor, factor: bool) -> Tensor:
    """sum_{s<=t in the chunk} Re(A_t / A_s) (q_t . k_s) v_s, with L and T relative to the chunk start.

    Re(A_t / A_s) = exp(L_t - L_s) (cos T_t cos T_s + sin T_t sin T_s). Factored, each side carries
    its half of the decay measured from the chunk's centre M, q_t exp(L_t - M) (cos T_t, sin T_t)
    and k_s exp(M - L_s) (cos T_s, sin T_s), and the scores are one product over 2 d: no (C, C)
    decay tensor. Otherwise the decays are formed from differences, exp(L_t - L_s) cos(T_t - T_s),
    which never overflow for |a| <= 1 whatever the gates.
    """
    real = L.dtype
    size = L.shape[-1]
    if factor:
        centre = ((L[..., :1] + L[..., -1:]) / 2).detach()   # y does not depend on it: a constant
        cos_t, sin_t = torch.cos(T), torch.sin(T)
        up, down = torch.exp(L - centre), torch.exp(centre - L)
        q2 = torch.cat([qb * (up * cos_t).unsqueeze(-1), qb * (up * sin_t).unsqueeze(-1)], -1).to(qb.dtype)
        k2 = torch.cat([kb * (down * cos_t).unsqueeze(-1), kb * (down * sin_t).unsqueeze(-1)], -1).to(qb.dtype)
        scores = (q2 @ k2.transpose(-1, -2)).tril()       # (b, c, h, C, C); above the diagonal discarded
        return (scores @ vb).to(real)
    causal = torch.ones(size, size, dtype=torch.bool, device=L.device).tril()
    diff = L.unsqueeze(-1) - L.unsqueeze(-2)              # (b, c, h, C, C): L_t - L_s
    decay = torch.exp(diff.masked_fill(~causal, float("-inf")))
    weight = decay * torch.cos(T.unsqueeze(-1) - T.unsqueeze(-2))
    scores = (qb @ kb.transpose(-1, -2)).to(real) * weight
    return (scores.to(qb.dtype) @ vb).to(real)

