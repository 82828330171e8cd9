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
chunk's start. Where the gates have a known lower bound (the layer's are sigmoid(|z|) >= 1/2),
the decays are split between the two sides of the product, q_t exp(L_t - M) and k_s exp(M - L_s)
about the chunk's centre M, and the scores are one product with no (C, C) decay tensor; without
one they are formed from differences exp(L_t - L_s) (s <= t), which never overflow for |a| <= 1.

Backward: the factored chunk-local part has its gradient written out (``_FactoredChunks``), the
rest is torch's autograd through these ops and ``gate_loop_scan``. What it keeps per chunk is
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

        if _factors(min_log_gate, size, q.dtype):
            y, own_before, own_last = _FactoredChunks.apply(qb, kb, vb, L, T)
        else:
            y = _within_chunks(qb, kb, vb, L, T)
            v_ri = _to_chunk_end(vb, L, T)     # chunk j's contribution reaches the scan at j + 1
            own_before, own_last = _own(_shifted(kb), _shifted(v_ri), real), _own(kb[:, -1], v_ri[:, -1], real)
        gate = torch.polar(torch.exp(L[..., -1]), T[..., -1])   # (b, c, h): A_C of each chunk

        # across chunks, the state at each chunk's start, S_{j-1} = gate_{j-1} S_{j-2} + own_{j-1}:
        # the scan takes the previous chunk's gate and contribution (shifted k and v, not states)
        gate_before = torch.cat([torch.ones_like(gate[:, :1]), gate[:, :-1]], 1)   # the first starts at h0
        before, last_before = gate_loop_scan(gate_before[..., None, None], _complex(own_before, d), h0,
                                             backend=backend)   # (b, c, h, d, d)
        h_last = gate[:, -1, :, None, None] * last_before + _complex(own_last, d)
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


def _complex(ri: Tensor, d: int) -> Tensor:
    """(..., d, 2 d) with interleaved real and imaginary columns, in the gates' dtype -> (..., d, d) complex."""
    return torch.view_as_complex(ri.unflatten(-1, (d, 2)))


def _own(k_blocks: Tensor, v_ri: Tensor, real: torch.dtype) -> Tensor:
    """Each chunk's own contribution to the state at its end, sum_s (A_C / A_s) k_s v_s^T, as one
    product whose columns interleave real and imaginary parts (a complex view, no copy)."""
    return (k_blocks.transpose(-1, -2) @ v_ri).to(real)


def _to_chunk_end_factors(L: Tensor, T: Tensor) -> tuple[Tensor, Tensor]:
    """Re and Im of A_C / A_s for each step s of a chunk: |.| <= 1 for |a| <= 1."""
    mag = torch.exp(L[..., -1:] - L)
    arg = T[..., -1:] - T
    return mag * torch.cos(arg), mag * torch.sin(arg)


def _to_chunk_end(vb: Tensor, L: Tensor, T: Tensor) -> Tensor:
    """(A_C / A_s) v_s with real and imaginary parts interleaved: (b, c, h, C, 2 d) in v's dtype."""
    w_re, w_im = _to_chunk_end_factors(L, T)
    return torch.stack([vb * w_re.unsqueeze(-1), vb * w_im.unsqueeze(-1)], -1).to(vb.dtype).flatten(-2)


def _within_chunks(qb: Tensor, kb: Tensor, vb: Tensor, L: Tensor, T: Tensor) -> Tensor:
    """sum_{s<=t in the chunk} Re(A_t / A_s) (q_t . k_s) v_s, with L and T relative to the chunk
    start, from differences: exp(L_t - L_s) cos(T_t - T_s) never overflows for |a| <= 1."""
    real = L.dtype
    size = L.shape[-1]
    causal = torch.ones(size, size, dtype=torch.bool, device=L.device).tril()
    diff = L.unsqueeze(-1) - L.unsqueeze(-2)              # (b, c, h, C, C): L_t - L_s
    decay = torch.exp(diff.masked_fill(~causal, float("-inf")))
    weight = decay * torch.cos(T.unsqueeze(-1) - T.unsqueeze(-2))
    scores = (qb @ kb.transpose(-1, -2)).to(real) * weight
    return (scores.to(qb.dtype) @ vb).to(real)


class _FactoredChunks(torch.autograd.Function):
    """Inside each chunk, y_t = sum_{s<=t} Re(A_t / A_s) (q_t . k_s) v_s, and each chunk's own
    state contribution, shifted by one chunk for the scan (chunk j gets j - 1's, the first zero)
    and the last chunk's, for the final state.

    Re(A_t / A_s) = exp(L_t - L_s) (cos T_t cos T_s + sin T_t sin T_s): each side carries half of
    the decay from the chunk's centre M, q_t exp(L_t - M) (cos T_t, sin T_t) and
    k_s exp(M - L_s) (cos T_s, sin T_s), so the decay-weighted scores are one product over 2 d and
    no (C, C) decay tensor is formed (``_factors`` says when that is safe). y does not depend on M.

    The backward is written out so that every gradient leaves its product in the (C, d) layout of
    its input: autograd's gradient of a transposed operand comes out transposed, and the strided
    copies that follow cost more than the products. It is made of differentiable torch ops, so
    second derivatives are autograd's. Saved: the inputs only; the operands are recomputed.
    """

    @staticmethod
    def _operands(q, k, v, L, T):
        centre = (L[..., :1] + L[..., -1:]) / 2
        cos_t, sin_t = torch.cos(T), torch.sin(T)
        up, down = torch.exp(L - centre), torch.exp(centre - L)
        qf = (up * cos_t, up * sin_t)                     # (b, c, h, C) each
        kf = (down * cos_t, down * sin_t)
        q2 = torch.cat([q * f.unsqueeze(-1) for f in qf], -1).to(q.dtype)   # (b, c, h, C, 2d)
        k2 = torch.cat([k * f.unsqueeze(-1) for f in kf], -1).to(q.dtype)
        w = _to_chunk_end_factors(L, T)
        v_ri = torch.stack([v * f.unsqueeze(-1) for f in w], -1).to(v.dtype).flatten(-2)
        return qf, kf, w, q2, k2, v_ri

    @staticmethod
    def forward(ctx, q, k, v, L, T):
        _, _, _, q2, k2, v_ri = _FactoredChunks._operands(q, k, v, L, T)
        scores = (q2 @ k2.transpose(-1, -2)).tril()       # (b, c, h, C, C); above the diagonal discarded
        y = (scores @ v).to(L.dtype)
        own_before = _own(_shifted(k), _shifted(v_ri), L.dtype)
        own_last = _own(k[:, -1], v_ri[:, -1], L.dtype)
        ctx.save_for_backward(q, k, v, L, T)
        return y, own_before, own_last

    @staticmethod
    def backward(ctx, dy, d_before, d_last):
        q, k, v, L, T = ctx.saved_tensors
        dt, real, d = q.dtype, L.dtype, q.shape[-1]
        qf, kf, w, q2, k2, v_ri = _FactoredChunks._operands(q, k, v, L, T)
        dy, d_before, d_last = dy.to(dt), d_before.to(dt), d_last.to(dt)
        scores = (q2 @ k2.transpose(-1, -2)).tril()
        d_scores = (dy @ v.transpose(-1, -2)).tril()
        dq2 = (d_scores @ k2).to(real).unflatten(-1, (2, d))                     # (b, c, h, C, 2, d)
        dk2 = (d_scores.transpose(-1, -2) @ q2).to(real).unflatten(-1, (2, d))
        # own contributions: chunk j's reached the scan at j + 1, the last one as the final state
        dk_own = _unshifted(_shifted(v_ri) @ d_before.transpose(-1, -2), v_ri[:, -1] @ d_last.transpose(-1, -2))
        dv_ri = _unshifted(_shifted(k) @ d_before, k[:, -1] @ d_last).to(real).unflatten(-1, (d, 2))

        dq = dq2[..., 0, :] * qf[0].unsqueeze(-1) + dq2[..., 1, :] * qf[1].unsqueeze(-1)
        dk = dk2[..., 0, :] * kf[0].unsqueeze(-1) + dk2[..., 1, :] * kf[1].unsqueeze(-1) + dk_own.to(real)
        dv = ((scores.transpose(-1, -2) @ dy).to(real)
              + dv_ri[..., 0] * w[0].unsqueeze(-1) + dv_ri[..., 1] * w[1].unsqueeze(-1))
        # through the factors qf = e^(L - M) (cos T, sin T), kf = e^(M - L) (cos T, sin T) and
        # w = e^(L_C - L) (cos, sin)(T_C - T), each a function of its step's L, T (and w of the last's)
        qd, kd, vd = q.to(real), k.to(real), v.to(real)
        dqf = [(dq2[..., i, :] * qd).sum(-1) for i in (0, 1)]
        dkf = [(dk2[..., i, :] * kd).sum(-1) for i in (0, 1)]
        dw = [(dv_ri[..., i] * vd).sum(-1) for i in (0, 1)]
        to_end_L = dw[0] * w[0] + dw[1] * w[1]
        to_end_T = dw[0] * w[1] - dw[1] * w[0]
        size = L.shape[-1]
        at_end = lambda t: F.pad(t.sum(-1, keepdim=True), (size - 1, 0))
        dL = dqf[0] * qf[0] + dqf[1] * qf[1] - dkf[0] * kf[0] - dkf[1] * kf[1] - to_end_L + at_end(to_end_L)
        dT = dqf[1] * qf[0] - dqf[0] * qf[1] + dkf[1] * kf[0] - dkf[0] * kf[1] + to_end_T - at_end(to_end_T)
        return dq.to(dt), dk.to(dt), dv.to(dt), dL, dT


def _shifted(t: Tensor) -> Tensor:
    """Along the chunks (dim 1): chunk j gets chunk j - 1's blocks, the first zeros."""
    return F.pad(t, (0, 0) * (t.dim() - 2) + (1, 0))[:, :t.shape[1]]


def _unshifted(g: Tensor, g_last: Tensor) -> Tensor:
    """The gradient of ``_shifted(t)``, given as g, plus g_last for t's last chunk."""
    return torch.cat([g[:, 1:], g_last.unsqueeze(1)], 1)
