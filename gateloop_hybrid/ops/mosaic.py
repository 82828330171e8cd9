"""Torch ops on the Mosaic GPU kernels, launched on torch tensors by ``bridge.MosaicKernel`` (no
XLA, PJRT or DLPack per call), differentiable by torch: the scan on kernels/mosaic_scan.py's walks,
and the fused mixers on kernels/mosaic_mixer.py's.

Each op works the same way: a call signature (shapes, dtypes, device, static options) gets a
*plan* once, kept in one bounded cache (``_plan``); the plan holds the walk keys and, in eager
mode, the kernels bound to their compiled launches, so a later call costs the launches and a few
views. Under torch.compile no plan is cached: each launch is the launcher's opaque op.

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

from bridge.mosaic import MosaicKernel, tracing

from ..kernels import mosaic_mixer, mosaic_scan, walk as walks

_JAX_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16",
               torch.complex64: "float32"}


def _interpreted(*arrays, walk, **kw):
    return mosaic_scan.stage(*arrays, walk=dataclasses.replace(mosaic_scan.Walk(*walk), interpret=True), **kw)


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
    return (x.shape[0] > 0 and layout is not None and mosaic_scan.supported(math.prod(x.shape[2:]), *layout)
            and all(t.dtype in _JAX_DTYPES for t in (a, x)))


_SMS: dict = {}


def _num_sms(index: int) -> int:
    if index not in _SMS:
        _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SMS[index]


def _pairs(t: Tensor, shape) -> Tensor:
    """t as float pairs (complex) or as is (real), viewed as shape (+ (2,) for complex); shape
    None: t's own. Non-contiguous tensors are made contiguous first, as torch ops do."""
    if t.is_complex():
        t = torch.view_as_real(t.resolve_conj())
        shape = None if shape is None else (*shape, 2)
    if not t.is_contiguous():
        t = t.contiguous()
    return t if shape is None else t.view(shape)


def _from_pairs(t: Tensor, cplx: bool, shape) -> Tensor:
    """The inverse of _pairs (shape None: keep the kernel's shape)."""
    if cplx:
        t = torch.view_as_complex(t)
    return t if shape is None else t.view(shape)


def _walk(a, x, h0, reverse, backward, B, N, F, G, R):
    cplx = a.is_complex() or x.is_complex() or (h0 is not None and h0.is_complex())
    num_sms = _num_sms(x.device.index or 0) if x.is_cuda else 132
    chunks, block = walks.choose_walk(B, N, F, cplx, num_sms, backward)
    chunks, one_pass = _cut(N, chunks, num_sms)
    h0c = h0 is not None and h0.is_complex()
    return mosaic_scan.Walk(
        B=B, N=N, F=F, G=G, R=R, complex_a=a.is_complex(), complex_x=x.is_complex(),
        complex_init=cplx if backward else h0c, complex_h0=h0c if backward else False,
        has_init=True if backward else h0 is not None, has_h0=backward and h0 is not None,
        backward=backward, reverse=reverse, chunks=chunks, block=block, one_pass=one_pass)


def _cut(N, chunks, num_sms) -> tuple[int, bool]:
    """(chunks, one pass?) of a walk that choose_walk cut into ``chunks``."""
    if chunks > 1 and walks.ONE_PASS:
        return walks.one_pass_chunks(N, chunks, num_sms), True
    return walks.fit_chunks(N, chunks), False


def _run_stages(kernel, key, args, bound, **static):
    """Run a walk's kernels (walk.stages: one, or a summary then a finish). With ``bound`` (a
    list kept by the caller), the first call binds each stage to its compiled launch and later
    calls go straight to the launches."""
    if bound:
        if len(bound) == 1:
            return bound[0](args)
        return bound[1]([*args, *bound[0](args)])
    for stage in walks.stages(key):
        outs = kernel(*args, stage=stage, **static)
        if bound is not None:
            bound.append(kernel.bind(*args, stage=stage, **static))
        args = [*args, *outs]
    return outs


def _launch(walk, args, out_dtypes, bound=None):
    if bound:       # bound launches need no static values (building them is a tenth of a call)
        return _run_stages(_KERNEL, walk, args, bound)
    return _run_stages(_KERNEL, walk, args, bound, walk=walks.key_fields(walk), out_dtypes=out_dtypes)


def _real_dtype(dtype: torch.dtype) -> str:
    return _JAX_DTYPES[dtype]


class _Plan:
    """What one call signature (shapes, dtypes, device, reverse) needs, worked out once: the
    pair views' shapes, both walks, and the kernels bound to their compiled launches. An eager
    call then costs the launches and a few views."""

    def __init__(self, a, x, h0, reverse, bind=True):
        B, N = x.shape[:2]
        F = math.prod(x.shape[2:])
        G, R = gate_layout(a.shape, x.shape)
        self.fwd_walk = _walk(a, x, h0, reverse, False, B, N, F, G, R)
        self.bwd_walk = _walk(a, x, h0, reverse, True, B, N, F, G, R)
        # h_last unused (no cotangent): the backward walk starts from zero, no zeros tensor made
        self.bwd_walk_no_last = dataclasses.replace(self.bwd_walk, has_init=False, complex_init=False)
        self.cplx = self.fwd_walk.cplx
        out_dtype = torch.promote_types(a.dtype, x.dtype)
        if h0 is not None:
            out_dtype = torch.promote_types(out_dtype, h0.dtype)
        self.grad_dtype = torch.complex64 if self.cplx else out_dtype
        od = _real_dtype(out_dtype)
        self.fwd_dtypes = (od, od)
        self.bwd_dtypes = (_real_dtype(x.dtype), _real_dtype(a.dtype),
                           *(() if h0 is None else (_real_dtype(h0.dtype),)))
        # views only where the kernels' flat feature axis differs from the tensors' own dims
        flat = lambda shape, own: None if tuple(own) == shape else shape
        self.shapes = dict(a=flat((B, N, G), a.shape), x=flat((B, N, F), x.shape),
                           h0=flat((B, F), (B, *x.shape[2:])))
        self.x_shape, self.last_shape = x.shape, (B, *x.shape[2:])
        self.out_x = None if self.shapes["x"] is None else x.shape
        self.out_last = None if self.shapes["h0"] is None else self.last_shape
        self.out_a = None if self.shapes["a"] is None else a.shape
        self.sum_dims = [i for i, (sa, sx) in enumerate(zip(a.shape, x.shape)) if sa == 1 and sx != 1]
        self.complex = (a.is_complex(), x.is_complex(), h0 is not None and h0.is_complex())
        self.device = x.device
        # under torch.compile nothing is bound: each launch is the launcher's opaque op
        self.fwd_bound, self.bwd_bound, self.bwd_bound_no_last = ([], [], []) if bind else (None, None, None)

    def forward(self, a, x, h0):
        """(h, h_last, h as the kernels wrote it)."""
        args = [_pairs(a, self.shapes["a"]), _pairs(x, self.shapes["x"])]
        if h0 is not None:
            args.append(_pairs(h0, self.shapes["h0"]))
        h, h_last = _launch(self.fwd_walk, args, self.fwd_dtypes, self.fwd_bound)
        return _from_pairs(h, self.cplx, self.out_x), _from_pairs(h_last, self.cplx, self.out_last), h

    def backward(self, a, h, h0, gh, gl):
        dt = self.grad_dtype
        if gh is None:
            gh = torch.zeros(self.x_shape, dtype=dt, device=self.device)
        elif gh.dtype != dt:
            gh = gh.to(dt)
        args = [_pairs(a, self.shapes["a"]), _pairs(gh, self.shapes["x"]), h]
        if gl is not None:
            args.append(_pairs(gl.to(dt), self.shapes["h0"]))
        if h0 is not None:
            args.append(_pairs(h0, self.shapes["h0"]))
        if gl is None:
            outs = _launch(self.bwd_walk_no_last, args, self.bwd_dtypes, self.bwd_bound_no_last)
        else:
            outs = _launch(self.bwd_walk, args, self.bwd_dtypes, self.bwd_bound)
        ca, cx, c0 = self.complex
        dx = _from_pairs(outs[0], cx, self.out_x)
        if self.sum_dims:   # features sharing a gate: sum their contributions
            da = _from_pairs(outs[1], ca, self.x_shape).sum(dim=self.sum_dims, keepdim=True)
        else:
            da = _from_pairs(outs[1], ca, self.out_a)
        dh0 = None if h0 is None else _from_pairs(outs[2], c0, self.out_last)
        return da, dx, dh0


def once_differentiable(backward):
    """torch's ``once_differentiable`` at no cost where it changes nothing: without
    create_graph, backward runs with grad mode off and ``backward`` is called as it is (the
    wrapper's own work is a third of a small call's host time); with create_graph, torch's
    wrapper runs it and a second derivative raises."""
    wrapped = torch.autograd.function.once_differentiable(backward)

    @functools.wraps(backward)
    def run(ctx, *grads):
        if torch.is_grad_enabled():
            return wrapped(ctx, *grads)
        return backward(ctx, *grads)
    return run


class _MosaicScan(torch.autograd.Function):
    """Eager calls bring their signature's plan; under torch.compile it is made in the trace."""

    @staticmethod
    def forward(ctx, a, x, h0, reverse, plan):
        if plan is None:
            plan = _Plan(a, x, h0, reverse, bind=False)
        h, h_last, h_pairs = plan.forward(a, x, h0)
        ctx.save_for_backward(a, h_pairs, h0)
        ctx.plan = plan
        return h, h_last

    @staticmethod
    @once_differentiable
    def backward(ctx, gh, gl):
        a, h, h0 = ctx.saved_tensors
        return (*ctx.plan.backward(a, h, h0, gh, gl), None, None)


def scan_mosaic(a: Tensor, x: Tensor, h0: Tensor | None = None, reverse: bool = False):
    """(h, h_last) of h_t = a_t h_{t-1} + x_t along dim 1 on the Mosaic GPU kernels.

    Inputs as gate_loop_scan takes them (already checked there), float32, bfloat16, float16 or
    complex64, with ``supported(a, x)``. Output dtype: the promoted input dtype (16-bit inputs
    accumulate in float32). Differentiable once; a second derivative raises.
    """
    out = try_scan_mosaic(a, x, h0, reverse)
    if out is None:
        raise ValueError(f"scan_mosaic: the Mosaic GPU kernels do not take a {tuple(a.shape)} {a.dtype}, "
                         f"x {tuple(x.shape)} {x.dtype}" + ("" if h0 is None else f", h0 {h0.dtype}")
                         + f" (a batch of at least one row, features a multiple of {walks.W}, gates one per step, per head or per "
                         "feature block; float32, bfloat16, float16 or complex64)")
    return out


_PLANS: dict = {}
_MAX_PLANS = 256


def _plan(key, make):
    """The plan of a call signature, made by make() on its first call (None: the kernels do not
    take it). One cache for every op; a full cache is emptied rather than grown without bound."""
    plan = _PLANS.get(key, _PLANS)
    if plan is _PLANS:
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        plan = _PLANS[key] = make()
    return plan


def _call(op, key, fits, make, inputs, infer, apply):
    """One op call: ``apply(plan)`` (the autograd Function) when a gradient is wanted, else
    ``infer(plan)``; None where ``fits()`` says the kernels do not take the tensors. Under
    torch.compile the plan is made in the trace (plan None), never cached."""
    if tracing():
        return apply(None) if fits() else None
    plan = _plan((op, *key), lambda: make() if fits() else None)
    if plan is None:
        return None
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        return apply(plan)
    return infer(plan)


def try_scan_mosaic(a: Tensor, x: Tensor, h0: Tensor | None = None, reverse: bool = False):
    """scan_mosaic, or None where the kernels do not take these shapes or dtypes. Whether they
    do is decided once per signature, with the rest of its plan."""
    key = (a.shape, a.dtype, x.shape, x.dtype, None if h0 is None else (h0.shape, h0.dtype), x.device, reverse)
    return _call("scan", key, lambda: takes(a, x, h0), lambda: _Plan(a, x, h0, reverse), (a, x, h0),
                 lambda plan: plan.forward(a, x, h0)[:2],
                 lambda plan: _MosaicScan.apply(a, x, h0, reverse, plan))


def takes(a, x, h0) -> bool:
    """Whether the scan kernels take a, x and h0 (shapes and dtypes)."""
    return supported(a, x) and (h0 is None or h0.dtype in _JAX_DTYPES)


# ---------------------------------------------------------------------------------------------
# The fused mixer: gates, scan and readout of a GateLoop layer with one feature per head


def _interpreted_mixer(*arrays, mixer, **kw):
    return mosaic_mixer.mixer_stage(
        *arrays, mixer=dataclasses.replace(mosaic_mixer.Mixer(*mixer), interpret=True), **kw)


_MIXER_KERNEL = MosaicKernel(mosaic_mixer.mixer_stage, name="gateloop_mixer", interpret_fn=_interpreted_mixer)
_MIXER_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class _MixerPlan:
    """The mixer kernels for one call signature, bound once (see _Plan). Without z, the real-gate
    mixer of SimpleGateLoopLayer (qkv is qkva, states and h0 real)."""

    def __init__(self, qkv, z, h0, frac, recompute, bind=True, blocks=None):
        B, N, H = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
        self.shape = (B, N, H)
        self.real = real = z is None
        num_sms = _num_sms(qkv.device.index or 0) if qkv.is_cuda else 132

        def mixer(backward, **kw):
            chunks, block = walks.choose_walk(B, N, H, not real, num_sms, backward)
            if blocks is not None:      # (forward, backward) block override, for tuning
                block = blocks[backward]
            chunks, one_pass = _cut(N, chunks, num_sms)
            return mosaic_mixer.Mixer(B=B, N=N, H=H, frac=float(frac), backward=backward, chunks=chunks,
                                      block=block, real=real, one_pass=one_pass, **kw)
        init = h0 is not None
        self.infer = mixer(False, has_init=init, has_h0=False)
        # training: y, and every state when backward is to read them rather than recompute them
        self.train = self.infer if recompute else mixer(False, has_init=init, has_h0=False, write_h=True)
        self.states = mixer(False, has_init=init, has_h0=False, write_y=False, write_h=True)
        self.bwd = mixer(True, has_init=True, has_h0=init)
        self.bwd_no_last = dataclasses.replace(self.bwd, has_init=False)
        self.recompute = recompute
        self.bound = {name: ([] if bind else None) for name in ("infer", "train", "states", "bwd", "bwd_no_last")}

    def _run(self, name, args):
        m, bound = getattr(self, name), self.bound[name]
        if bound:
            return _run_stages(_MIXER_KERNEL, m, args, bound)
        return _run_stages(_MIXER_KERNEL, m, args, bound, mixer=walks.key_fields(m))

    def _state(self, t):
        """h0 or a cotangent of h_last as the kernels read it: (B, H) float32, or complex pairs."""
        return t.float().contiguous() if self.real else _pairs(t.to(torch.complex64), self.shape[::2])

    def _args(self, qkv, z, h0):
        B, N, H = self.shape
        args = [] if self.real else [_pairs(z, (B, N, H, 2))]
        args.append(qkv if qkv.is_contiguous() else qkv.contiguous())
        if h0 is not None:
            args.append(self._state(h0))
        return args

    def forward(self, qkv, z, h0, train):
        """(y, h_last as (B, H) complex (float32 if real), every state or None)."""
        outs = self._run("train" if train else "infer", self._args(qkv, z, h0))
        h = outs[2] if train and not self.recompute else None
        return outs[0], outs[1] if self.real else torch.view_as_complex(outs[1]), h

    def backward(self, qkv, z, h0, h, dy, gl):
        B, N, H = self.shape
        args = self._args(qkv, z, h0)
        if h is None:       # recompute the states from the inputs
            h = self._run("states", args)[1]
        dy = torch.zeros((B, N, H), dtype=qkv.dtype, device=qkv.device) if dy is None else dy
        inputs = 1 if self.real else 2      # (qkv) or (z, qkv)
        args = [*args[:inputs], h, dy.to(qkv.dtype).contiguous()]
        if gl is not None:
            args.append(self._state(gl))
        if h0 is not None:
            args.append(self._state(h0))
        outs = self._run("bwd_no_last" if gl is None else "bwd", args)
        if self.real:
            return outs[0], None, None if h0 is None else outs[1]
        dz = outs[0].view(B, N, 2 * H)
        dh0 = None if h0 is None else torch.view_as_complex(outs[2])
        return outs[1], dz, dh0


class _MosaicMixer(torch.autograd.Function):
    """Eager calls bring their signature's plan; under torch.compile it is made in the trace.
    z None: the real-gate mixer."""

    @staticmethod
    def forward(ctx, qkv, z, h0, frac, recompute, plan):
        if plan is None:
            plan = _MixerPlan(qkv, z, h0, frac, recompute, bind=False)
        y, h_last, h = plan.forward(qkv, z, h0, train=True)
        ctx.save_for_backward(qkv, z, h0, h)
        ctx.plan = plan
        return y, h_last

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, gl):
        qkv, z, h0, h = ctx.saved_tensors
        return (*ctx.plan.backward(qkv, z, h0, h, dy, gl), None, None, None)




def mixer_supported(qkv: Tensor, z: Tensor, h0: Tensor | None) -> bool:
    """Whether the mixer kernels take these tensors: qkv (B, N, 3H) and z (B, N, 2H) of 16 or 32
    bits with H a multiple of the kernels' tile, h0 None or complex64 (B, H)."""
    if qkv.dim() != 3 or z.dim() != 3 or qkv.shape[-1] % 3:
        return False
    B, N, H = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
    return (B > 0 and H % walks.W == 0 and tuple(z.shape) == (B, N, 2 * H)
            and qkv.dtype in _MIXER_DTYPES and z.dtype in _MIXER_DTYPES
            and (h0 is None or (h0.dtype == torch.complex64 and tuple(h0.shape) == (B, H))))


def try_mixer_mosaic(qkv: Tensor, z: Tensor, h0: Tensor | None, frac: float, recompute: bool):
    """(y (B, N, H), h_last (B, H) complex64) of the fused mixer, or None where the kernels do not
    take these tensors. ``recompute``: backward recomputes the states instead of the forward
    storing them."""
    key = (qkv.shape, qkv.dtype, z.shape, z.dtype, None if h0 is None else h0.shape, qkv.device,
           frac, recompute)
    return _call("mixer", key, lambda: mixer_supported(qkv, z, h0),
                 lambda: _MixerPlan(qkv, z, h0, frac, recompute), (qkv, z, h0),
                 lambda plan: plan.forward(qkv, z, h0, train=False)[:2],
                 lambda plan: _MosaicMixer.apply(qkv, z, h0, frac, recompute, plan))


# ---------------------------------------------------------------------------------------------
# SimpleGateLoopLayer's mixer: real gates sigmoid(za), h_t = a_t h_{t-1} + kv_t, y_t = q_t h_t


def simple_mixer_supported(qkva: Tensor, h0: Tensor | None) -> bool:
    """Whether the real-gate mixer kernels take qkva (B, N, 3D) of 16 or 32 bits, D a multiple of
    the kernels' tile, and h0 None or a real (B, D) float tensor."""
    if qkva.dim() != 3 or qkva.shape[-1] % 3:
        return False
    B, D = qkva.shape[0], qkva.shape[2] // 3
    return (B > 0 and D % walks.W == 0 and qkva.dtype in _MIXER_DTYPES
            and (h0 is None or (h0.dtype in _MIXER_DTYPES and tuple(h0.shape) == (B, D))))


def try_simple_mixer_mosaic(qkva: Tensor, h0: Tensor | None, recompute: bool = False):
    """(y (B, N, D) in qkva's dtype, h_last (B, D) float32) of SimpleGateLoopLayer's fused mixer,
    or None where the kernels do not take these tensors."""
    key = (qkva.shape, qkva.dtype, None if h0 is None else (h0.shape, h0.dtype), qkva.device, recompute)
    return _call("simple_mixer", key, lambda: simple_mixer_supported(qkva, h0),
                 lambda: _MixerPlan(qkva, None, h0, 1.0, recompute), (qkva, h0),
                 lambda plan: plan.forward(qkva, None, h0, train=False)[:2],
                 lambda plan: _MosaicMixer.apply(qkva, None, h0, 1.0, recompute, plan))
