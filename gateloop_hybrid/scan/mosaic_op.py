"""gate_loop_scan on the Mosaic GPU kernels: mosaic_scan.py's walks launched on torch tensors by
``bridge.MosaicKernel`` (no XLA, PJRT or DLPack per call), differentiable by torch.

Complex tensors go in and out as ``view_as_real`` pairs (no copy, no planar split). Gates keep
their broadcast shape: ``a`` (B, N, *Fa) against ``x`` (B, N, *F) becomes (B, N, G) with feature
f reading gate (f // R) % G, which covers one gate per head or per step. Outputs come from
torch's caching allocator, so the op runs on torch's current stream and inside CUDA graphs.

On CPU tensors the same kernels run in Pallas's interpret mode (slow; for tests).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
from torch import Tensor

from bridge.mosaic import MosaicKernel

from . import mosaic_scan

_JAX_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16",
               torch.complex64: "float32"}


def _interpreted(*arrays, walk, **kw):
    return mosaic_scan.stage(*arrays, walk=dataclasses.replace(walk, interpret=True), **kw)


_KERNEL = MosaicKernel(mosaic_scan.stage, name="gateloop_scan", interpret_fn=_interpreted)


def gate_layout(a_shape, x_shape) -> tuple[int, int] | None:
    """(G, R) such that x's flattened feature f reads a's flattened gate (f // R) % G, or None
    when a's non-broadcast feature dims are not one contiguous block."""
    fa, fx = tuple(a_shape[2:]), tuple(x_shape[2:])
    kept = [i for i, (sa, sx) in enumerate(zip(fa, fx)) if sa == sx and sx != 1]
    broadcast = [i for i, (sa, sx) in enumerate(zip(fa, fx)) if sa != sx]
    if not kept:
        return 1, math.prod(fx)
    lo, hi = kept[0], kept[-1] + 1
    if any(lo < i < hi for i in broadcast):
        return None
    return math.prod(fx[lo:hi]), math.prod(fx[hi:])


def supported(a: Tensor, x: Tensor) -> bool:
    """Whether the kernels take these shapes and dtypes (else the caller picks another path)."""
    layout = gate_layout(a.shape, x.shape)
    return (layout is not None and mosaic_scan.supported(math.prod(x.shape[2:]), *layout)
            and all(t.dtype in _JAX_DTYPES for t in (a, x)))


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _pairs(t: Tensor, shape) -> Tensor:
    """t as float pairs (complex) or as is (real), reshaped to shape (+ (2,) for complex)."""
    if t.is_complex():
        return torch.view_as_real(t.resolve_conj()).contiguous().reshape(*shape, 2)
    return t.contiguous().reshape(shape)


def _from_pairs(t: Tensor, cplx: bool, shape) -> Tensor:
    return torch.view_as_complex(t).reshape(shape) if cplx else t.reshape(shape)


def _walk(a, x, h0, reverse, backward, B, N, F, G, R):
    cplx = a.is_complex() or x.is_complex() or (h0 is not None and h0.is_complex())
    num_sms = _num_sms(x.device.index or 0) if x.is_cuda else 132
    chunks, block = mosaic_scan.choose_walk(B, N, F, cplx, num_sms)
    h0c = h0 is not None and h0.is_complex()
    return mosaic_scan.Walk(
        B=B, N=N, F=F, G=G, R=R, complex_a=a.is_complex(), complex_x=x.is_complex(),
        complex_init=cplx if backward else h0c, complex_h0=h0c if backward else False,
        has_init=True if backward else h0 is not None, has_h0=backward and h0 is not None,
        backward=backward, reverse=reverse, chunks=chunks, block=block)


def _launch(walk, args, out_dtypes):
    if walk.chunks == 1:
        return _KERNEL(*args, walk=walk, stage="single", out_dtypes=out_dtypes)
    sums = _KERNEL(*args, walk=walk, stage="summary", out_dtypes=out_dtypes)
    return _KERNEL(*args, *sums, walk=walk, stage="finish", out_dtypes=out_dtypes)


def _real_dtype(dtype: torch.dtype) -> str:
    return _JAX_DTYPES[dtype]


class _MosaicScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, x, h0, reverse, out_dtype):
        B, N = x.shape[:2]
        F = math.prod(x.shape[2:])
        G, R = gate_layout(a.shape, x.shape)
        walk = _walk(a, x, h0, reverse, False, B, N, F, G, R)
        args = [_pairs(a, (B, N, G)), _pairs(x, (B, N, F))]
        if h0 is not None:
            args.append(_pairs(h0, (B, F)))
        od = _real_dtype(out_dtype)
        h, h_last = _launch(walk, args, (od, od))
        ctx.save_for_backward(a, h, h0)
        ctx.meta = (reverse, B, N, F, G, R, x.shape, x.dtype, walk.cplx)
        return _from_pairs(h, walk.cplx, x.shape), _from_pairs(h_last, walk.cplx, (B, *x.shape[2:]))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gh, gl):
        a, h, h0 = ctx.saved_tensors
        reverse, B, N, F, G, R, x_shape, x_dtype, cplx = ctx.meta
        out = torch.complex64 if cplx else h.dtype
        gh = torch.zeros(x_shape, dtype=out, device=h.device) if gh is None else gh.to(out)
        gl = torch.zeros((B, *x_shape[2:]), dtype=out, device=h.device) if gl is None else gl.to(out)
        x_like = torch.empty(0, dtype=x_dtype)   # only its dtype and complexity matter
        walk = _walk(a, x_like, h0, reverse, True, B, N, F, G, R)
        args = [_pairs(a, (B, N, G)), _pairs(gh, (B, N, F)), h, _pairs(gl, (B, F))]
        dtypes = [_real_dtype(x_dtype), _real_dtype(a.dtype)]
        if h0 is not None:
            args.append(_pairs(h0, (B, F)))
            dtypes.append(_real_dtype(h0.dtype))
        outs = _launch(walk, args, tuple(dtypes))
        dx = _from_pairs(outs[0], x_dtype.is_complex, x_shape)
        da = _from_pairs(outs[1], a.is_complex(), x_shape)
        if G != F:   # features sharing a gate: sum their contributions
            dims = [i for i, (sa, sx) in enumerate(zip(a.shape, x_shape)) if sa == 1 and sx != 1]
            da = da.sum(dim=dims, keepdim=True)
        dh0 = None if h0 is None else _from_pairs(outs[2], h0.is_complex(), h0.shape)
        return da.reshape(a.shape), dx, dh0, None, None


def scan_mosaic(a: Tensor, x: Tensor, h0: Tensor | None = None, reverse: bool = False):
    """(h, h_last) of h_t = a_t h_{t-1} + x_t along dim 1 on the Mosaic GPU kernels.

    Inputs as gate_loop_scan takes them (already checked there), float32, bfloat16, float16 or
    complex64, with ``supported(a, x)``. Output dtype: the promoted input dtype (16-bit inputs
    accumulate in float32). Differentiable once; a second derivative raises.
    """
    out_dtype = torch.promote_types(a.dtype, x.dtype)
    if h0 is not None:
        out_dtype = torch.promote_types(out_dtype, h0.dtype)
    return _MosaicScan.apply(a, x, h0, reverse, out_dtype)
