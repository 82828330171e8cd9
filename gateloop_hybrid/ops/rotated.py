"""The wide-head mixer on the Mosaic GPU kernels of kernels/mosaic_rotated.py, as a torch op with
torch's autograd: ``rotated_heads_mosaic`` computes what ``rotated.rotated_heads`` computes.

Around the kernels, in torch: the gates' running sums (log|a| from each chunk's start in float32;
the phase from t = 0 in float64, reduced mod 2 pi), the decays to each chunk's end, padding of a
ragged last chunk (a = 1, k = v = 0), the final state's turn e^{i T_N} to the complex h_last, and
in backward the reversed cumulative sums that turn the kernels' per-position gradients of the
running sums into gradients of log|a| and of the phase.

Backward recomputes: nothing per chunk is kept from forward but the inputs and the final state.
On CPU tensors the kernels run in Pallas's interpret mode (slow; for tests).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from bridge.mosaic import MosaicKernel

from ..kernels import mosaic_rotated as kern
from ..kernels import walk as walks
from .mosaic import _num_sms, once_differentiable

_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}
# head widths the kernels take as a wider head whose extra features are zero (the state's rows
# are a wgmma's M, at least 64): the same result, at the wider head's cost
_PADDED = {32: 64}


def _interpreted(*arrays, key, kernel):
    return kern.launch(*arrays, key=dataclasses.replace(walks.as_key(kern.RotatedKey, key), interpret=True),
                       kernel=kernel)


_KERNEL = MosaicKernel(kern.launch, name="gateloop_rotated", interpret_fn=_interpreted)


def supported(q: Tensor, k: Tensor, v: Tensor, log_mag: Tensor, phase: Tensor, h0) -> str | None:
    """None if the kernels take these tensors, else why not."""
    b, n, h, d = q.shape
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"q, k, v of {q.dtype}, {k.dtype}, {v.dtype} (the kernels take one of bfloat16 or float16)"
    if tuple(k.shape) != tuple(q.shape) or tuple(v.shape) != tuple(q.shape):
        return "v wider than q and k"
    if log_mag.dtype != torch.float32 or phase.dtype != torch.float32:
        return f"gates of {log_mag.dtype} (the kernels take float32)"
    if h0 is not None and h0.dtype != torch.complex64:
        return f"h0 of {h0.dtype} (the kernels take complex64)"
    if b == 0:
        return "an empty batch"
    return kern.supported(n, _PADDED.get(d, d), _DTYPES[q.dtype])


def _key(q: Tensor, segments: int | None = None) -> kern.RotatedKey:
    """The launch for q (b, n, h, d): N is n padded to whole chunks (of whole segments)."""
    b, n, h, d = q.shape
    chunks = -(-n // kern.C)
    block_v = kern.choose_block_v(d)
    if segments is None:
        num_sms = _num_sms(q.device.index or 0) if q.is_cuda else 132
        segments = kern.choose_segments(b, h, d // block_v, chunks, num_sms)
    chunks = -(-chunks // segments) * segments
    return kern.RotatedKey(B=b, N=chunks * kern.C, H=h, d=d, block_v=block_v, has_state=False,
                           dtype=_DTYPES[q.dtype], segments=segments)


def _run(key: kern.RotatedKey, kernel: str, *tensors):
    return _KERNEL(*tensors, key=walks.key_fields(key), kernel=kernel)


def _padded(t: Tensor, pad: int) -> Tensor:
    """t (b, n, ...) with ``pad`` zero rows after its last step, contiguous."""
    if pad:
        t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
    return t.contiguous()


class _Gates:
    """The running sums the kernels read, from log|a| and the phase (b, n, h) float32, padded
    to the key's N; and each segment's decay."""

    def __init__(self, log_mag: Tensor, phase: Tensor, key: kern.RotatedKey):
        pad = key.N - log_mag.shape[1]
        lm = _padded(log_mag, pad).transpose(1, 2)                           # (b, h, N)
        L = lm.unflatten(-1, (-1, kern.C)).cumsum(-1)                        # from each chunk's start
        self.W = torch.exp(L[..., -1:] - L).flatten(-2).contiguous()
        T = torch.remainder(_padded(phase.double(), pad).transpose(1, 2).cumsum(-1), 2 * math.pi)
        self.T_last = T[..., -1]                                             # (b, h) float64
        self.T = T.float().contiguous()
        chunk_total = L[..., -1]                                             # (b, h, chunks)
        self.G = torch.exp(chunk_total).unsqueeze(-1).expand(*chunk_total.shape, key.d).contiguous()
        # each segment's decay: exp of its chunks' summed log|a| (b, h, S)
        self.D = torch.exp(chunk_total.unflatten(-1, (key.segments, -1)).sum(-1))
        self.L = L.flatten(-2).contiguous()


def _chain(own: Tensor, decay: Tensor, first: Tensor | None, reverse: bool = False) -> Tensor:
    """Each segment's boundary state from the segments' own states (b, h, S, 2, d, d): forward,
    start_0 = first and start_{s+1} = D_s start_s + own_s; reverse, end_{S-1} = first and
    end_{s-1} = D_s end_s + own_s. float32, S small (a few (2d, d) updates)."""
    S = own.shape[2]
    out = [torch.zeros_like(own[:, :, 0]) if first is None else first]
    order = range(S - 1, 0, -1) if reverse else range(S - 1)
    for s in order:
        out.append(decay[:, :, s, None, None, None] * out[-1] + own[:, :, s])
    if reverse:
        out.reverse()
    return torch.stack(out, 2).contiguous()


def _sum_blocks(t: Tensor) -> Tensor:
    """The sum of the kernels' per-column-block partials (axis 0); one block is taken as it is,
    a view, rather than summed by a kernel that reads and writes it all."""
    return t[0] if t.shape[0] == 1 else t.sum(0)


def _state_pairs(h: Tensor) -> Tensor:
    """(b, h, d, d) complex -> (b, h, 2, d, d) float32 [Re; Im]."""
    return torch.stack([h.real, h.imag], 2).float().contiguous()


class _RotatedHeads(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, log_mag, phase, h0, segments):
        n = q.shape[1]
        key = _key(q, segments)
        gates = _Gates(log_mag, phase, key)
        qp, kp, vp = (_padded(t, key.N - n) for t in (q, k, v))
        S0 = None if h0 is None else _state_pairs(h0).unsqueeze(2)          # (b, h, 1, 2, d, d)
        starts = S0
        if key.segments > 1:
            own = _run(key, "summary", kp, vp, gates.T, gates.W, gates.G)[0]
            starts = _chain(own, gates.D, None if S0 is None else S0[:, :, 0])
        fwd = dataclasses.replace(key, has_state=starts is not None)
        y, ends = _run(fwd, "forward", qp, kp, vp, gates.L, gates.T, gates.W, gates.G,
                       *(() if starts is None else (starts,)))
        SN = ends[:, :, -1]
        turn = torch.polar(torch.ones_like(gates.T_last), gates.T_last).to(torch.complex64)[..., None, None]
        h_last = turn * torch.complex(SN[:, :, 0], SN[:, :, 1])
        ctx.save_for_backward(qp, kp, vp, gates.L, gates.T, gates.W, gates.G, gates.D, starts, SN, turn)
        ctx.shape = (n, key, h0 is not None)
        return y[:, :n], h_last

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dh_last):
        qp, kp, vp, L, T, W, G, D, starts, SN, turn = ctx.saved_tensors
        n, key, has_h0 = ctx.shape
        dy = _padded(torch.zeros_like(qp[:, :n]) if dy is None else dy.to(qp.dtype), key.N - n)
        common = (qp, kp, vp, dy, L, T, W, G)
        q_key = dataclasses.replace(key, has_state=starts is not None)
        dq, dL_q, dT_q = _run(q_key, "backward_q", *common, *(() if starts is None else (starts,)))
        dL = _sum_blocks(dL_q)
        dT = _sum_blocks(dT_q)
        dS = None
        if dh_last is not None:
            # h_last = e^{i T_N} (Sc + i Ss): the state's cotangent, and T_N's and L_N's parts
            dZ = turn.conj() * dh_last.to(torch.complex64)
            dS = _state_pairs(dZ)
            h_last = turn * torch.complex(SN[:, :, 0], SN[:, :, 1])
            dT[..., -1] += (dh_last.conj() * 1j * h_last).real.sum((-2, -1)).float()
            dL[..., -1] += (dS * SN).sum((-3, -2, -1))
        ends = None if dS is None else dS.unsqueeze(2)
        if key.segments > 1:
            own = _run(key, "summary_back", qp, dy, T, torch.exp(L), G)[0]
            ends = _chain(own, D, dS, reverse=True)
        kv_key = dataclasses.replace(key, has_state=ends is not None)
        dk, dv, dL_k, dT_k, dstarts = _run(kv_key, "backward_kv", *common, *(() if ends is None else (ends,)))
        dL += _sum_blocks(dL_k)
        dT += _sum_blocks(dT_k)
        # the running sums' gradients to their summands: reversed cumulative sums over all of N
        d_log_mag = dL.flip(-1).cumsum(-1).flip(-1).transpose(1, 2)[:, :n]
        d_phase = dT.flip(-1).cumsum(-1).flip(-1).transpose(1, 2)[:, :n]
        dq = _sum_blocks(dq)[:, :n]
        dk = _sum_blocks(dk)[:, :n]
        dh0 = torch.complex(dstarts[:, :, 0, 0], dstarts[:, :, 0, 1]) if has_h0 else None
        return dq.to(qp.dtype), dk.to(kp.dtype), dv[:, :n].to(vp.dtype), d_log_mag, d_phase, dh0, None


def rotated_heads_mosaic(q: Tensor, k: Tensor, v: Tensor, log_mag: Tensor, phase: Tensor,
                         h0: Tensor | None = None, *, segments: int | None = None) -> tuple[Tensor, Tensor]:
    """``rotated.rotated_heads`` on the Mosaic GPU kernels: y (b, n, h, d) in q's dtype and the
    final state (b, h, d, d) complex64. q, k, v (b, n, h, d) bfloat16 or float16 with d in
    kernels.mosaic_rotated.WIDTHS, or d = 32 (run as heads of 64 with zero features); log_mag, phase (b, n, h) float32; h0 None or complex64.
    ``segments``: segments of time walked side by side (default: about one CTA per
    multiprocessor; see kernels.mosaic_rotated.choose_segments). Differentiable once.
    ValueError where the kernels do not take the tensors (``supported``)."""
    problem = supported(q, k, v, log_mag, phase, h0)
    if problem is not None:
        raise ValueError(f"rotated_heads_mosaic: the wide-head kernels do not take {problem}")
    if segments is not None and (not isinstance(segments, int) or isinstance(segments, bool) or segments < 1):
        raise ValueError(f"rotated_heads_mosaic: segments must be a positive int or None, got {segments!r}")
    d = q.shape[-1]
    if d not in _PADDED:
        return _RotatedHeads.apply(q, k, v, log_mag, phase, h0, segments)
    extra = _PADDED[d] - d
    q, k, v = (F.pad(t, (0, extra)) for t in (q, k, v))
    h0 = None if h0 is None else F.pad(h0, (0, extra, 0, extra))
    y, h_last = _RotatedHeads.apply(q, k, v, log_mag, phase, h0, segments)
    return y[..., :d], h_last[..., :d, :d]
