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

from bridge.mosaic import MosaicKernel, tracing

from ..kernels import mosaic_rotated as kern
from .mosaic import _num_sms

_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _interpreted(*arrays, key, kernel):
    return kern.launch(*arrays, key=dataclasses.replace(kern.RotatedKey(*key), interpret=True), kernel=kernel)


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
    return kern.supported(n, d, _DTYPES[q.dtype])


def _key(q: Tensor, n_pad: int, has_init: bool) -> kern.RotatedKey:
    b, _, h, d = q.shape
    num_sms = _num_sms(q.device.index or 0) if q.is_cuda else 132
    return kern.RotatedKey(B=b, N=n_pad, H=h, d=d, block_v=kern.choose_block_v(b, h, d, num_sms),
                           has_h0=has_init, dtype=_DTYPES[q.dtype])


def _run(key: kern.RotatedKey, kernel: str, *tensors):
    fields = tuple(getattr(key, f.name) for f in dataclasses.fields(key))
    return _KERNEL(*tensors, key=fields, kernel=kernel)


def _padded(t: Tensor, pad: int) -> Tensor:
    """t (b, n, ...) with ``pad`` zero rows after its last step, contiguous."""
    if pad:
        t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
    return t.contiguous()


class _Gates:
    """The running sums the kernels read, from log|a| and the phase (b, n, h) float32."""

    def __init__(self, log_mag: Tensor, phase: Tensor, pad: int):
        b, n, h = log_mag.shape
        C = kern.C
        lm = _padded(log_mag, pad).transpose(1, 2)                           # (b, h, N)
        self.L = lm.unflatten(-1, (-1, C)).cumsum(-1)                        # from each chunk's start
        self.W = torch.exp(self.L[..., -1:] - self.L).flatten(-2).contiguous()
        self.G = None
        self.T = torch.remainder(_padded(phase.double(), pad).transpose(1, 2).cumsum(-1), 2 * math.pi)
        self.T_last = self.T[..., -1]                                        # (b, h) float64
        self.T = self.T.float().contiguous()
        self.chunk_decay = torch.exp(self.L[..., -1])                        # (b, h, c)
        self.L = self.L.flatten(-2).contiguous()

    def table(self, d: int) -> Tensor:
        return self.chunk_decay.unsqueeze(-1).expand(*self.chunk_decay.shape, d).contiguous()


def _state_pairs(h: Tensor) -> Tensor:
    """(b, h, d, d) complex -> (b, h, 2, d, d) float32 [Re; Im]."""
    return torch.stack([h.real, h.imag], 2).float().contiguous()


class _RotatedHeads(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, log_mag, phase, h0):
        b, n, h, d = q.shape
        pad = -n % kern.C
        gates = _Gates(log_mag, phase, pad)
        G = gates.table(d)
        qp, kp, vp = (_padded(t, pad) for t in (q, k, v))
        S0 = None if h0 is None else _state_pairs(h0)
        key = _key(q, n + pad, S0 is not None)
        y, SN = _run(key, "forward", qp, kp, vp, gates.L, gates.T, gates.W, G,
                     *(() if S0 is None else (S0,)))
        turn = torch.polar(torch.ones_like(gates.T_last), gates.T_last).to(torch.complex64)[..., None, None]
        h_last = turn * torch.complex(SN[:, :, 0], SN[:, :, 1])
        ctx.save_for_backward(qp, kp, vp, gates.L, gates.T, gates.W, G, S0, SN, turn)
        ctx.shape = (n, pad, key)
        return y[:, :n], h_last

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, dh_last):
        qp, kp, vp, L, T, W, G, S0, SN, turn = ctx.saved_tensors
        n, pad, key = ctx.shape
        b, N, h, d = qp.shape
        dy = _padded(torch.zeros_like(qp[:, :n]) if dy is None else dy.to(qp.dtype), pad)
        common = (qp, kp, vp, dy, L, T, W, G)
        dq, dL_q, dT_q = _run(key, "backward_q", *common, *(() if S0 is None else (S0,)))
        dL = dL_q.sum(0)
        dT = dT_q.sum(0)
        dS = None
        if dh_last is not None:
            # h_last = e^{i T_N} (Sc + i Ss): the state's cotangent, and T_N's and L_N's parts
            dZ = turn.conj() * dh_last.to(torch.complex64)
            dS = _state_pairs(dZ)
            h_last = turn * torch.complex(SN[:, :, 0], SN[:, :, 1])
            dT[..., -1] += (dh_last.conj() * 1j * h_last).real.sum((-2, -1)).float()
            dL[..., -1] += (dS * SN).sum((-3, -2, -1))
        kv_key = dataclasses.replace(key, has_h0=dS is not None)
        dk, dv, dL_k, dT_k, dS0 = _run(kv_key, "backward_kv", *common, *(() if dS is None else (dS,)))
        dL += dL_k.sum(0)
        dT += dT_k.sum(0)
        # the running sums' gradients to their summands: reversed cumulative sums over all of N
        d_log_mag = dL.flip(-1).cumsum(-1).flip(-1).transpose(1, 2)[:, :n]
        d_phase = dT.flip(-1).cumsum(-1).flip(-1).transpose(1, 2)[:, :n]
        dq = dq.sum(0)[:, :n]
        dk = dk.sum(0)[:, :n]
        dh0 = None if S0 is None else torch.complex(dS0[:, :, 0], dS0[:, :, 1])
        return dq.to(qp.dtype), dk.to(kp.dtype), dv[:, :n].to(vp.dtype), d_log_mag, d_phase, dh0


def rotated_heads_mosaic(q: Tensor, k: Tensor, v: Tensor, log_mag: Tensor, phase: Tensor,
                         h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``rotated.rotated_heads`` on the Mosaic GPU kernels: y (b, n, h, d) in q's dtype and the
    final state (b, h, d, d) complex64. q, k, v (b, n, h, d) bfloat16 or float16 with d in
    kernels.mosaic_rotated.WIDTHS; log_mag, phase (b, n, h) float32; h0 None or complex64.
    Differentiable once. ValueError where the kernels do not take the tensors (``supported``)."""
    problem = supported(q, k, v, log_mag, phase, h0)
    if problem is not None:
        raise ValueError(f"rotated_heads_mosaic: the wide-head kernels do not take {problem}")
    return _RotatedHeads.apply(q, k, v, log_mag, phase, h0)
