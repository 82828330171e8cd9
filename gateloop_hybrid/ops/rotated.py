"""The wide-head mixer on the Mosaic GPU kernels of kernels/mosaic_rotated.py, as a torch op with
torch's autograd: ``rotated_heads_mosaic`` computes what ``rotated.rotated_heads`` computes, and
``rotated_qkv_mosaic`` the same from a layer's (b, n, 3 h d) projection, which the kernels read
in place (q, k and v are never copied out of it) and whose gradient comes back as one tensor.

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
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"q, k, v of {q.dtype}, {k.dtype}, {v.dtype} (the kernels take one of bfloat16 or float16)"
    if tuple(k.shape) != tuple(q.shape) or tuple(v.shape) != tuple(q.shape):
        return "v wider than q and k"
    return _unsupported(q, log_mag, phase, h0)


def _unsupported(q: Tensor, log_mag: Tensor, phase: Tensor, h0) -> str | None:
    """Why the kernels do not take heads shaped like q (b, n, h, d) with these gates and h0, or
    None."""
    b, n, h, d = q.shape
    if q.dtype not in _DTYPES:
        return f"q, k, v of {q.dtype} (the kernels take one of bfloat16 or float16)"
    if log_mag.dtype != torch.float32 or phase.dtype != torch.float32:
        return f"gates of {log_mag.dtype} (the kernels take float32)"
    if h0 is not None and h0.dtype != torch.complex64:
        return f"h0 of {h0.dtype} (the kernels take complex64)"
    if b == 0:
        return "an empty batch"
    return kern.supported(n, _PADDED.get(d, d), _DTYPES[q.dtype])


def _key(qkv: Tensor, segments: int | None = None) -> kern.RotatedKey:
    """The launch for qkv (b, n, 3 h, d): N is n padded to whole chunks (of whole segments)."""
    b, n, h3, d = qkv.shape
    h = h3 // 3
    chunks = -(-n // kern.C)
    block_v = kern.choose_block_v(d)
    if segments is None:
        num_sms = _num_sms(qkv.device.index or 0) if qkv.is_cuda else 132
        segments = kern.choose_segments(b, h, d // block_v, chunks, num_sms, per_sm=3 - kern.STAGES)
    chunks = -(-chunks // segments) * segments
    return kern.RotatedKey(B=b, N=chunks * kern.C, H=h, d=d, block_v=block_v, has_state=False,
                           dtype=_DTYPES[qkv.dtype], segments=segments, grouped=kern.GROUPED,
                           stages=kern.STAGES)


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
    def forward(ctx, qkv, log_mag, phase, h0, segments):
        n = qkv.shape[1]
        key = _key(qkv, segments)
        gates = _Gates(log_mag, phase, key)
        qkvp = _padded(qkv, key.N - n)                                       # (b, N, 3 h, d)
        S0 = None if h0 is None else _state_pairs(h0).unsqueeze(2)          # (b, h, 1, 2, d, d)
        starts = S0
        if key.segments > 1:
            own = _run(key, "summary", qkvp, gates.T, gates.W, gates.G)[0]
            starts = _chain(own, gates.D, None if S0 is None else S0[:, :, 0])
        fwd = dataclasses.replace(key, has_state=starts is not None)
        y, ends = _run(fwd, "forward", qkvp, gates.L, gates.T, gates.W, gates.G,
                       *(() if starts is None else (starts,)))
        SN = ends[:, :, -1]
        turn = torch.polar(torch.ones_like(gates.T_last), gates.T_last).to(torch.complex64)[..., None, None]
        h_last = turn * torch.complex(SN[:, :, 0], SN[:, :, 1])
        ctx.save_for_backward(qkvp, gates.L, gates.T, gates.W, gates.G, gates.D, starts, SN, turn)
        ctx.shape = (n, key, h0 is not None)
        return y[:, :n], h_last

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dh_last):
        qkvp, L, T, W, G, D, starts, SN, turn = ctx.saved_tensors
        n, key, has_h0 = ctx.shape
        dt = qkvp.dtype
        b, _, h3, d = qkvp.shape
        dy = _padded(qkvp.new_zeros(b, n, h3 // 3, d) if dy is None else dy.to(dt), key.N - n)
        common = (qkvp, dy, L, T, W, G)
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
            own = _run(key, "summary_back", qkvp, dy, T, torch.exp(L), G)[0]
            ends = _chain(own, D, dS, reverse=True)
        kv_key = dataclasses.replace(key, has_state=ends is not None)
        dk, dv, dL_k, dT_k, dstarts = _run(kv_key, "backward_kv", *common, *(() if ends is None else (ends,)))
        dL += _sum_blocks(dL_k)
        dT += _sum_blocks(dT_k)
        # the running sums' gradients to their summands: reversed cumulative sums over all of N
        d_log_mag = dL.flip(-1).cumsum(-1).flip(-1).transpose(1, 2)[:, :n]
        d_phase = dT.flip(-1).cumsum(-1).flip(-1).transpose(1, 2)[:, :n]
        # one copy makes the gradient of qkv from the three parts (and rounds float32 shares)
        dqkv = torch.cat([_sum_blocks(dq)[:, :n].to(dt), _sum_blocks(dk)[:, :n].to(dt), dv[:, :n]], dim=2)
        dh0 = torch.complex(dstarts[:, :, 0, 0], dstarts[:, :, 0, 1]) if has_h0 else None
        return dqkv, d_log_mag, d_phase, dh0, None


def rotated_heads_mosaic(q: Tensor, k: Tensor, v: Tensor, log_mag: Tensor, phase: Tensor,
                         h0: Tensor | None = None, *, segments: int | None = None) -> tuple[Tensor, Tensor]:
    """``rotated.rotated_heads`` on the Mosaic GPU kernels: y (b, n, h, d) in q's dtype and the
    final state (b, h, d, d) complex64. q, k, v (b, n, h, d) bfloat16 or float16 with d in
    kernels.mosaic_rotated.WIDTHS, or d = 32 (run as heads of 64 with zero features); log_mag,
    phase (b, n, h) float32; h0 None or complex64. q, k and v are copied side by side into one
    (b, n, 3 h, d) tensor, as the kernels read them (``rotated_qkv_mosaic`` takes that tensor).
    ``segments``: segments of time walked side by side (default: about one CTA per
    multiprocessor; see kernels.mosaic_rotated.choose_segments). Differentiable once.
    ValueError where the kernels do not take the tensors (``supported``)."""
    problem = supported(q, k, v, log_mag, phase, h0)
    if problem is not None:
        raise ValueError(f"rotated_heads_mosaic: the wide-head kernels do not take {problem}")
    _check_segments("rotated_heads_mosaic", segments)
    return _heads(torch.cat([q, k, v], dim=2), log_mag, phase, h0, segments)


def rotated_qkv_mosaic(qkv: Tensor, log_mag: Tensor, phase: Tensor, h0: Tensor | None = None, *,
                       heads: int, segments: int | None = None) -> tuple[Tensor, Tensor]:
    """``rotated_heads_mosaic`` on q, k, v side by side in one projection: qkv (b, n, 3 h d) with
    q, k, v each (b, n, h d) as ``qkv.chunk(3, -1)`` splits it, and h = ``heads``. The kernels
    read q, k and v in place (qkv's last dim must be contiguous, else it is copied once), and
    the gradient of qkv comes back as one tensor. Returns y (b, n, h, d) and h_last."""
    if not isinstance(qkv, Tensor) or qkv.dim() != 3:
        raise ValueError(f"rotated_qkv_mosaic: qkv must be a (b, n, 3 heads d) tensor, got "
                         f"{tuple(qkv.shape) if isinstance(qkv, Tensor) else type(qkv).__name__}")
    width = qkv.shape[-1]
    if not isinstance(heads, int) or isinstance(heads, bool) or heads < 1 or width % (3 * heads):
        raise ValueError(f"rotated_qkv_mosaic: qkv's last dim {width} is not 3 x heads x d for heads={heads!r}")
    qkv = qkv.unflatten(-1, (3 * heads, width // (3 * heads)))
    problem = _unsupported(qkv[:, :, :heads], log_mag, phase, h0)
    if problem is not None:
        raise ValueError(f"rotated_qkv_mosaic: the wide-head kernels do not take {problem}")
    _check_segments("rotated_qkv_mosaic", segments)
    return _heads(qkv, log_mag, phase, h0, segments)


def _check_segments(where: str, segments):
    if segments is not None and (not isinstance(segments, int) or isinstance(segments, bool) or segments < 1):
        raise ValueError(f"{where}: segments must be a positive int or None, got {segments!r}")


def _heads(qkv, log_mag, phase, h0, segments):
    """y and h_last of qkv (b, n, 3 h, d), heads of 32 run as heads of 64."""
    d = qkv.shape[-1]
    if d not in _PADDED:
        return _RotatedHeads.apply(qkv, log_mag, phase, h0, segments)
    extra = _PADDED[d] - d
    qkv = F.pad(qkv, (0, extra))
    h0 = None if h0 is None else F.pad(h0, (0, extra, 0, extra))
    y, h_last = _RotatedHeads.apply(qkv, log_mag, phase, h0, segments)
    return y[..., :d], h_last[..., :d, :d]
