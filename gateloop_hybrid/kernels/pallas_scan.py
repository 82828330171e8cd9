"""Pallas GPU kernels for the GateLoop recurrence h_t = a_t * h_{t-1} + x_t (time is axis 1).

Pure JAX (imports no torch). Two public entry points, both differentiable through a
``jax.custom_vjp`` whose backward is the same kernel run the other way over the cotangent
(G_t = g_t + a_{t+1} G_{t+1}; dx = G, da = G * h_{t-1}, dh0 = a_first G_first), with the
residuals (a, h, h0) only -- the forward is never recomputed:

    scan_pallas(a, x, h0=None, reverse=False, interpret=False) -> (h, h_last)
        JAX arrays, real or complex; JAX's complex convention (the vjp multiplies the
        cotangent by the derivative, unconjugated).
    scan_pallas_ri(a, x, h0, *, complex_a, complex_x, complex_h0, ...) -> (h, h_last)
        Complex values given as float pairs in a trailing axis of size 2 (what
        torch.view_as_real produces, free of copies); gradients in torch's convention
        (conjugated), so a bridge needs no conversion pass at all.

``scan_fwd(a, x, h0, reverse, interpret)`` is the forward alone.

Layout: inputs stay (B, N, *F) with time on axis 1; no transpose pass. Features are flattened to
D columns; the kernels tile (T time steps) x (BD columns) and keep the recurrence in float32
registers. Complex arrays live in the kernels as interleaved (re, im) float32 pairs. JAX has no
zero-copy view of complex64 as float32 (StableHLO rejects a complex bitcast), so the complex-array
entry point pays one conversion pass per tensor; the _ri entry point pays none.

Two kernels (``KernelConfig.method``; "auto" walks when there are at least 24 columns B * D
per multiprocessor, else looks back):

    "walk"      one program per (batch, column block) walks all N steps, tile by tile, carrying
                the state between tiles (each tile: an in-register scan over time). Reads a and x
                once, writes h once; Triton software-pipelines the tile loads (cp.async) once the
                loop carries ``tt.num_stages``, which a post-lowering hook adds (Pallas does not).
                Needs B * D / BD programs to fill the GPU.
    "lookback"  one program per (tile of T steps, batch, column block): a single-pass scan with
                decoupled look-back (Merrill & Garland 2016) across time tiles, so that long
                sequences with few columns (B=1, D=512) still fill the GPU. Programs take tickets
                from an atomic counter, publish their tile's aggregate, then read their
                predecessors W at a time until the latest one that published its inclusive state,
                and compose the aggregates in between (one round trip per W tiles).

``KernelConfig.column_per_lane`` > 0 lays a tile out with one column (or a few) per lane and all
of the tile's time steps in the lane, so that the tile scan is sequential in registers. Defaults
(``resolve_config``) differ between the forward and the backward kernel and between real and
complex data; they are the fastest variants measured on an H200 (docs/kernels.md).

Legend: B batch, N time steps, F feature dims, D = prod(F) columns, T tile rows (time), BD tile
columns, P planes (1 real, 2 complex), C = ceil(N / T) time tiles, W look-back window.

The Triton lowering of Pallas has no general associative scan; ``_tile_scan_p`` adds one (a
``tt.scan`` over the tile's time axis with the linear-recurrence combine). Kernels use Pallas's
Triton lowering (deprecated in JAX 0.11 in favour of Mosaic GPU, but working). On Hopper and newer
the Mosaic GPU kernels (mosaic_scan.py) take the scan's common shapes instead; these kernels serve
older GPUs, the gate layouts the Mosaic kernels do not read, and the JAX model.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax.interpreters import mlir

from .._private import triton_lowering

# the Triton lowering is only needed (and only importable on some builds) for GPU runs
_ir, _tt, _triton_lowering, _registration = triton_lowering() or (None, None, None, None)

__all__ = ["KernelConfig", "scan_fwd", "scan_bwd", "scan_pallas", "scan_pallas_ri"]

_F32 = jnp.float32
_SENTINEL = np.int32(0x7FBADBAD)   # "not yet published": a NaN payload no arithmetic produces
_CANON_NAN = np.int32(0x7FFFFFFF)
_MAX_SPINS = 1 << 18              # look-back gives up (and poisons its tile with NaN) after this


# ---------------------------------------------------------------------------------------------
# Complex arithmetic on "planes": a tuple of 1 (real) or 2 (re, im) float32 arrays


def _cmul(u, v):
    if len(u) == 1 and len(v) == 1:
        return (u[0] * v[0],)
    if len(u) == 1:
        return (u[0] * v[0], u[0] * v[1])
    if len(v) == 1:
        return (u[0] * v[0], u[1] * v[0])
    return (u[0] * v[0] - u[1] * v[1], u[0] * v[1] + u[1] * v[0])


def _cadd(u, v):
    if len(u) < len(v):
        u, v = v, u
    return tuple(ui + vi for ui, vi in zip(u, v)) + u[len(v):]


def _conj(u):
    return u if len(u) == 1 else (u[0], -u[1])


def _widen(u, planes):
    return u + tuple(jnp.zeros_like(u[0]) for _ in range(planes - len(u)))


def _combine(left, right, n_a):
    """(A1, X1) then (A2, X2) -> (A1 A2, A2 X1 + X2); left is the earlier element."""
    a1, x1 = tuple(left[:n_a]), tuple(left[n_a:])
    a2, x2 = tuple(right[:n_a]), tuple(right[n_a:])
    return (*_cmul(a1, a2), *_cadd(_cmul(a2, x1), x2))


# ---------------------------------------------------------------------------------------------
# _tile_scan_p: inclusive linear-recurrence scan over axis 0 of a tile, inside a kernel


_tile_scan_p = jax.extend.core.Primitive("gateloop_tile_scan")
_tile_scan_p.multiple_results = True


def _tile_scan_ref(*planes, n_a):
    """Sequential over the (short) tile: the interpreter's HLO stays small and compiles fast."""
    def step(acc, row):
        acc = _combine(acc, row, n_a)
        return acc, acc
    first = tuple(v[0] for v in planes)
    _, rest = lax.scan(step, first, tuple(v[1:] for v in planes))
    return [jnp.concatenate([f[None], r], axis=0) for f, r in zip(first, rest)]


_tile_scan_p.def_abstract_eval(
    lambda *avals, n_a: [jax.core.ShapedArray(av.shape, av.dtype) for av in avals])
_tile_scan_p.def_impl(_tile_scan_ref)
mlir.register_lowering(_tile_scan_p, mlir.lower_fun(_tile_scan_ref, multiple_results=True))


def _tile_scan_triton(ctx, *planes, n_a):
    """Lower to one ``tt.scan`` over axis 0 with the combine traced to a jaxpr."""
    k = len(planes)
    scalars = [jax.ShapeDtypeStruct((), _F32)] * (2 * k)
    closed = jax.make_jaxpr(lambda *s: _combine(s[:k], s[k:], n_a))(*scalars)
    if closed.consts:
        raise NotImplementedError("tile scan combine must not close over constants")
    scan_op = _tt.ScanOp(list(planes), 0)
    f32 = _ir.F32Type.get()
    entry = scan_op.regions[0].blocks.append(*([f32] * (2 * k)))
    with _ir.InsertionPoint.at_block_begin(entry):
        results = _triton_lowering.lower_jaxpr_to_triton_ir(
            ctx.context, closed.jaxpr, None, *entry.arguments)
        _tt.scan_return(results)
    scan_op.verify()
    return list(scan_op.result)


if _triton_lowering is not None:
    _triton_lowering.register_lowering(_tile_scan_p)(_tile_scan_triton)


# Triton software-pipelines the loads of a loop that has no dot only when the loop carries a
# ``tt.num_stages`` attribute (what ``tl.range(..., num_stages=k)`` sets); Pallas never sets it.
# Kernels of this module whose name ends in ``_pipe<k>`` get it on their loops after lowering.
_PIPE_TAG = "_pipe"


def _annotate_loops(module):
    def visit(op, stages):
        for region in op.regions:
            for block in region.blocks:
                for inner in block.operations:
                    inner = inner.operation
                    if inner.name == "scf.for" and stages:
                        inner.attributes["tt.num_stages"] = _ir.IntegerAttr.get(
                            _ir.IntegerType.get_signless(32), stages)
                    visit(inner, stages)

    with module.context:
        for op in module.body.operations:
            op = op.operation
            if "sym_name" not in op.attributes:
                continue
            name = _ir.StringAttr(op.attributes["sym_name"]).value
            if name.startswith("gateloop_") and _PIPE_TAG in name:
                visit(op, int(name.rsplit(_PIPE_TAG, 1)[1]))


def _install_pipeline_hook():
    registration = _registration
    lower = registration.lowering.lower_jaxpr_to_triton_module
    if getattr(lower, "_gateloop_pipeline_hook", False):
        return

    @functools.wraps(lower)
    def lower_and_annotate(*args, **kwargs):
        result = lower(*args, **kwargs)
        try:   # only ever an optimisation: never let it break any kernel's lowering
            _annotate_loops(result.module)
        except Exception:  # noqa: BLE001
            pass
        return result

    lower_and_annotate._gateloop_pipeline_hook = True
    registration.lowering.lower_jaxpr_to_triton_module = lower_and_annotate


if _triton_lowering is not None:
    try:
        _install_pipeline_hook()
    except (ImportError, AttributeError):  # pragma: no cover - a JAX without these internals
        pass


def _tile_scan(a_planes, x_planes):
    out = _tile_scan_p.bind(*a_planes, *x_planes, n_a=len(a_planes))
    return tuple(out[:len(a_planes)]), tuple(out[len(a_planes):])


# ---------------------------------------------------------------------------------------------
# Static description of one launch


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Launch parameters; None / 0 / "auto" fields are filled in by ``resolve_config``.

    method: "walk" | "lookback" | "auto" (see the module docstring).
    block_t: time steps per tile (power of 2). block_d: columns per tile (power of 2).
    num_warps, num_stages: Triton's; num_stages pipelines the walk kernel's loads.
    prefetch: walk only; load the next tile in the loop body before scanning this one.
    wide_pairs: read/write complex (re, im) pairs as one contiguous (T, 2 BD) tile split in
        registers (16-byte loads) rather than as (T, BD, 2) (8-byte loads).
    ticket: lookback only; take tiles from an atomic counter (safe) instead of the program id.
    window: lookback only; predecessors read per round trip of the look-back (power of 2).
    incl_every: testing only; publish inclusive states for every k-th tile alone, so that the
        look-back has to combine aggregates over several windows (as it does on a busy GPU).
    column_per_lane: 0 lets Triton lay tiles out (16-byte vectors, lanes across rows too);
        v > 0 gives each lane v floats of a row (v=1 for complex: one (re, im) pair) and all of
        the tile's time steps, so the tile scan runs in registers without shuffles; use with
        block_d = 32 v (real) or 32 (complex).
    publish_atomic: lookback only; publish aggregates with atomic exchanges (ordered, but each
        waits a round trip) instead of plain stores (safe too: every 32-bit word is checked
        against the sentinel on its own, so no ordering between words is needed).

    Fields left at None / 0 / "auto" take the defaults below, which depend on the kernel
    (forward or backward), on real or complex data and on the number of columns. ``config``
    arguments also accept a pair (forward config, backward config).
    """
    method: str = "auto"
    block_t: int = 0
    block_d: int = 0
    num_warps: int = 0
    num_stages: int = 0
    prefetch: bool = False
    wide_pairs: bool = True
    ticket: bool = True
    column_per_lane: int | None = None
    window: int | None = None
    incl_every: int = 0
    publish_atomic: bool | None = None


# Defaults, from benchmarks/lab/pallas_tune.py on an H200 (docs/kernels.md, with the command and
# its results). "many": at least _MANY_COLUMNS columns (B * D) in all.
_MANY_COLUMNS = 8192
_WALK_PER_SM = 24        # "auto" walks when B * D >= this many columns per multiprocessor


def _defaults(method: str, cplx: bool, backward: bool, many: bool) -> dict:
    d = dict(num_stages=1, column_per_lane=0, window=8, publish_atomic=True)
    if method == "walk":
        if cplx and not backward:
            return {**d, **dict(block_t=32, block_d=32, num_warps=1, num_stages=4, column_per_lane=1)}
        if cplx:
            return {**d, **(dict(block_t=64, block_d=32, num_warps=4, num_stages=3) if many
                            else dict(block_t=128, block_d=32, num_warps=8, num_stages=3))}
        return {**d, **(dict(block_t=64, block_d=32, num_warps=4, num_stages=3) if many
                        else dict(block_t=128, block_d=16, num_warps=4, num_stages=4))}
    if cplx:
        return {**d, **(dict(block_t=64, block_d=32, num_warps=4, column_per_lane=1, window=8) if backward
                        else dict(block_t=32, block_d=32, num_warps=2, column_per_lane=1, window=4))}
    return {**d, **(dict(block_t=128, block_d=64, num_warps=4, column_per_lane=2) if backward
                    else dict(block_t=128, block_d=32, num_warps=4, column_per_lane=1))}


_INTERPRET_DEFAULTS = dict(block_t=16, block_d=16, num_warps=1, num_stages=1, column_per_lane=0,
                           window=8, publish_atomic=False)


def _num_sms() -> int:
    try:
        return int(getattr(jax.devices()[0], "core_count", 0)) or 132
    except Exception:  # noqa: BLE001 - no device info: assume an H100/H200-sized GPU
        return 132


def resolve_config(cfg, B: int, N: int, D: int, interpret: bool, *, cplx: bool = False,
                   backward: bool = False) -> KernelConfig:
    """The launch parameters for one kernel: ``cfg``'s set fields over the defaults."""
    if isinstance(cfg, (tuple, list)):
        cfg = cfg[1 if backward else 0]
    cfg = cfg or KernelConfig()
    method = cfg.method
    if method == "auto":
        method = "walk" if (interpret or B * D >= _WALK_PER_SM * _num_sms()) else "lookback"
    if method not in ("walk", "lookback"):
        raise ValueError(f"pallas scan: unknown method {method!r}; use 'walk', 'lookback' or 'auto'")
    base = _INTERPRET_DEFAULTS if interpret else _defaults(method, cplx, backward, B * D >= _MANY_COLUMNS)
    zero_is_unset = ("block_t", "block_d", "num_warps", "num_stages", "window")
    unset = lambda k, v: v is None or (k in zero_is_unset and v == 0)
    fields = {k: (v if unset(k, getattr(cfg, k)) else getattr(cfg, k)) for k, v in base.items()}
    for k in ("block_t", "block_d", "window"):
        if fields[k] & (fields[k] - 1):
            raise ValueError(f"pallas scan: {k}={fields[k]} must be a power of 2")
    return dataclasses.replace(cfg, method=method, **fields)


class _Geom(NamedTuple):
    """Shapes of one launch. ``a_terms`` maps a column of x to a column of a (broadcast)."""
    B: int
    N: int
    D: int
    Da: int
    a_terms: tuple | None   # None: a has x's columns; else ((div, mod, stride), ...)
    wdir: int               # +1: the kernel walks t = 0..N-1; -1: t = N-1..0


def _a_terms(fa: tuple, f: tuple):
    """Index terms for a's column given x's column (None when a is not broadcast)."""
    if tuple(fa) == tuple(f):
        return None
    terms = []
    inner_x = inner_a = 1
    # merge runs of equal (kept) dims from the innermost outwards
    run_x = 1
    for k in reversed(range(len(f))):
        kept = fa[k] == f[k] and f[k] != 1
        if kept:
            run_x *= f[k]
        if (not kept or k == 0) and run_x > 1:
            terms.append((inner_x, run_x, inner_a))
            inner_x *= run_x
            inner_a *= run_x
            run_x = 1
        if not kept:
            inner_x *= f[k]
    return tuple(terms)


def _a_columns(cols, terms):
    if terms is None:
        return cols
    out = jnp.zeros_like(cols)
    for div, mod, stride in terms:
        out = out + ((cols // div) % mod) * stride
    return out


# ---------------------------------------------------------------------------------------------
# Tile loads and stores (planes interleaved in the last axis of each ref)


def _load(ref, b, rows, rmask, cols, cmask, planes, other=0.0, col0=None):
    """(T, BD) float32 tiles, one per plane. Complex pairs are read together: with ``col0``
    (cols == col0 + iota) as one contiguous (T, 2 BD) tile, else as (T, BD, 2); then split in
    registers."""
    T, BD = rows.shape[0], cols.shape[0]
    m = rmask[:, None] & cmask[None, :]
    zero = jnp.asarray(0.0, ref.dtype)
    if planes == 2:
        if col0 is not None:
            cc = 2 * col0 + lax.broadcasted_iota(jnp.int32, (2 * BD,), 0)
            r2 = jnp.broadcast_to(rows[:, None], (T, 2 * BD))
            c2 = jnp.broadcast_to(cc[None, :], (T, 2 * BD))
            m2 = rmask[:, None] & (cc < ref.shape[-1])[None, :]
            v = plgpu.load(ref.at[b, r2, c2], mask=m2, other=zero).reshape(T, BD, 2)
        else:
            shape = (T, BD, 2)
            r3 = jnp.broadcast_to(rows[:, None, None], shape)
            c3 = jnp.broadcast_to(2 * cols[None, :, None] + lax.broadcasted_iota(jnp.int32, (1, 1, 2), 2),
                                  shape)
            v = plgpu.load(ref.at[b, r3, c3], mask=jnp.broadcast_to(m[:, :, None], shape), other=zero)
        re, im = lax.unstack(v.astype(_F32), axis=2)
        if other != 0.0:
            re = jnp.where(m, re, other)
        return re, im
    r2 = jnp.broadcast_to(rows[:, None], (T, BD))
    c2 = jnp.broadcast_to(cols[None, :], (T, BD))
    return (plgpu.load(ref.at[b, r2, c2], mask=m, other=jnp.asarray(other, ref.dtype)).astype(_F32),)


def _store(ref, b, rows, rmask, cols, cmask, vals, col0=None):
    T, BD = rows.shape[0], cols.shape[0]
    m = rmask[:, None] & cmask[None, :]
    if len(vals) == 2:
        v = lax.stack([vals[0], vals[1]], axis=2).astype(ref.dtype)
        if col0 is not None:
            cc = 2 * col0 + lax.broadcasted_iota(jnp.int32, (2 * BD,), 0)
            r2 = jnp.broadcast_to(rows[:, None], (T, 2 * BD))
            c2 = jnp.broadcast_to(cc[None, :], (T, 2 * BD))
            m2 = rmask[:, None] & (cc < ref.shape[-1])[None, :]
            plgpu.store(ref.at[b, r2, c2], v.reshape(T, 2 * BD), mask=m2)
        else:
            shape = (T, BD, 2)
            r3 = jnp.broadcast_to(rows[:, None, None], shape)
            c3 = jnp.broadcast_to(2 * cols[None, :, None] + lax.broadcasted_iota(jnp.int32, (1, 1, 2), 2),
                                  shape)
            plgpu.store(ref.at[b, r3, c3], v, mask=jnp.broadcast_to(m[:, :, None], shape))
        return
    r2 = jnp.broadcast_to(rows[:, None], (T, BD))
    c2 = jnp.broadcast_to(cols[None, :], (T, BD))
    plgpu.store(ref.at[b, r2, c2], vals[0].astype(ref.dtype), mask=m)


def _load_row(ref, b, cols, cmask, planes):
    out = []
    for p in range(planes):
        o = jnp.asarray(0.0, ref.dtype)
        out.append(plgpu.load(ref.at[b, cols * planes + p], mask=cmask, other=o).astype(_F32))
    return tuple(out)


def _store_row(ref, b, cols, cmask, vals):
    planes = len(vals)
    for p, v in enumerate(vals):
        plgpu.store(ref.at[b, cols * planes + p], v.astype(ref.dtype), mask=cmask)


def _last_row(vals):
    T = vals[0].shape[0]
    is_last = (lax.broadcasted_iota(jnp.int32, vals[0].shape, 0) == T - 1)
    return tuple(jnp.sum(jnp.where(is_last, v, 0.0), axis=0) for v in vals)


# ---------------------------------------------------------------------------------------------
# What a kernel computes: forward or backward, as prologue (loads -> a', x'), epilogue (stores)


class _Tile(NamedTuple):
    b: jax.Array
    t: jax.Array       # (T,) time index of each row (N where masked off)
    rmask: jax.Array   # (T,) row holds a real time step
    cols: jax.Array    # (BD,) columns of x: col0 + iota
    cmask: jax.Array   # (BD,)
    acols: jax.Array   # (BD,) columns of a
    col0: jax.Array | None    # first column, when complex pairs are read as one wide tile
    acol0: jax.Array | None   # the same for a (None when a is broadcast)


@dataclasses.dataclass(frozen=True)
class _Fwd:
    """h = scan(a, x) from h0. refs: a, x, [h0] -> h, h_last."""
    pa: int
    px: int
    p0: int        # planes of h0; 0 when h0 is None
    p: int         # planes of the state

    n_in = property(lambda s: 2 + (s.p0 > 0))

    def carry0(self, ins, b, cols, cmask):
        if self.p0:
            return _widen(_load_row(ins[2], b, cols, cmask, self.p0), self.p)
        return tuple(jnp.zeros(cols.shape, _F32) for _ in range(self.p))

    def prologue(self, ins, tl: _Tile, geom):
        a = _load(ins[0], tl.b, tl.t, tl.rmask, tl.acols, tl.cmask, self.pa, 1.0, tl.acol0)
        x = _load(ins[1], tl.b, tl.t, tl.rmask, tl.cols, tl.cmask, self.px, 0.0, tl.col0)
        return a, _widen(x, self.p), ()

    def epilogue(self, ins, outs, tl: _Tile, h, aux, geom):
        _store(outs[0], tl.b, tl.t, tl.rmask, tl.cols, tl.cmask, h, tl.col0)

    def finish(self, outs, b, cols, cmask, carry):
        _store_row(outs[1], b, cols, cmask, carry)


@dataclasses.dataclass(frozen=True)
class _Bwd:
    """G = reverse scan of g with gates a shifted one step; refs: a, h, [h0], g, [g_last] ->
    dx (= G in x's planes), da (G * h_prev, at a's columns or at x's when a is broadcast),
    G_first (the state cotangent at the first forward step; dh0 is a_first * G_first)."""
    pa: int
    px: int
    p0: int
    p: int
    has_gl: bool
    conj: bool        # torch's convention: multiply by conj(a) and conj(h)
    da_full: bool     # a is broadcast: write G * h_prev at x's columns; summed outside

    n_in = property(lambda s: 4 + (s.p0 > 0) + s.has_gl - 1)

    def _idx(self):
        i_h0 = 2 if self.p0 else None
        i_g = 3 if self.p0 else 2
        return i_h0, i_g, (i_g + 1 if self.has_gl else None)

    def carry0(self, ins, b, cols, cmask):
        _, _, i_gl = self._idx()
        if i_gl is not None:
            return _load_row(ins[i_gl], b, cols, cmask, self.p)
        return tuple(jnp.zeros(cols.shape, _F32) for _ in range(self.p))

    def prologue(self, ins, tl: _Tile, geom: _Geom):
        i_h0, i_g, _ = self._idx()
        fdir = -geom.wdir            # direction of the forward scan
        N = geom.N
        # gate that carries G from step t + fdir back to t: a_{t + fdir}; 1 past the end
        ta = tl.t + fdir
        va = tl.rmask & (ta >= 0) & (ta < N)
        a = _load(ins[0], tl.b, _masked_index(ta, va, N), va, tl.acols, tl.cmask, self.pa, 1.0,
                  tl.acol0)
        g = _load(ins[i_g], tl.b, tl.t, tl.rmask, tl.cols, tl.cmask, self.p, 0.0, tl.col0)
        # state before step t: h_{t - fdir}, or h0 at the first step
        th = tl.t - fdir
        vh = tl.rmask & (th >= 0) & (th < N)
        hp = _load(ins[1], tl.b, _masked_index(th, vh, N), vh, tl.cols, tl.cmask, self.p, 0.0,
                   tl.col0)
        if i_h0 is not None:
            h0 = _widen(_load_row(ins[i_h0], tl.b, tl.cols, tl.cmask, self.p0), self.p)
            first = ((th < 0) | (th >= N))[:, None]
            hp = tuple(jnp.where(first, r[None, :], v) for r, v in zip(h0, hp))
        if self.conj:
            a, hp = _conj(a), _conj(hp)
        return a, g, hp

    def epilogue(self, ins, outs, tl: _Tile, G, hp, geom):
        _store(outs[0], tl.b, tl.t, tl.rmask, tl.cols, tl.cmask, G[:self.px], tl.col0)
        da = _cmul(G, hp)[:self.pa]
        dcols = tl.cols if self.da_full else tl.acols
        _store(outs[1], tl.b, tl.t, tl.rmask, dcols, tl.cmask, da,
               tl.col0 if self.da_full else tl.acol0)

    def finish(self, outs, b, cols, cmask, carry):
        _store_row(outs[2], b, cols, cmask, carry)


# ---------------------------------------------------------------------------------------------
# The two kernels


def _opaque_zero():
    """Zero at run time, of unknown alignment to Triton (call at the kernel's top level)."""
    return pl.program_id(0) // (1 << 30)


def _make_tile(b, d, c, cfg: KernelConfig, geom: _Geom, opaque_zero) -> _Tile:
    """Rows and columns of tile (time tile c, column block d) of batch b."""
    T, BD, N = cfg.block_t, cfg.block_d, geom.N
    s = c * T + lax.broadcasted_iota(jnp.int32, (T,), 0)
    rmask = s < N
    t = s if geom.wdir > 0 else (N - 1) - s
    col0 = d * BD
    if cfg.column_per_lane:
        # A zero that Triton cannot see through, times the vector width: the columns stay
        # contiguous (so lanes run along them) but their alignment is only column_per_lane
        # elements, so each lane gets that many columns and all of the tile's time steps.
        col0 = col0 + cfg.column_per_lane * opaque_zero
    cols = col0 + lax.broadcasted_iota(jnp.int32, (BD,), 0)
    wide = cfg.wide_pairs
    return _Tile(b, _masked_index(t, rmask, N), rmask, cols, cols < geom.D,
                 _a_columns(cols, geom.a_terms), col0 if wide else None,
                 col0 if wide and geom.a_terms is None else None)


def _masked_index(t, valid, N):
    """Rows that are masked off point one past the end (never negative: interpret mode would
    wrap a negative index onto a real row and, scattering, clobber it)."""
    return jnp.where(valid, t, N)


def _walk_kernel(*refs, op, geom: _Geom, cfg: KernelConfig):
    n_in = op.n_in
    ins, outs = refs[:n_in], refs[n_in:]
    T, BD = cfg.block_t, cfg.block_d
    nD = pl.cdiv(geom.D, BD)
    nC = pl.cdiv(geom.N, T)
    pid = pl.program_id(0)
    b, d = pid // nD, pid % nD
    opaque = _opaque_zero()
    tile = lambda c: _make_tile(b, d, c, cfg, geom, opaque)
    cols, cmask = tile(0).cols, tile(0).cmask

    def step(c, carry, loaded):
        a, x, aux = loaded
        A, X = _tile_scan(a, x)
        h = _cadd(_cmul(A, carry), X)
        op.epilogue(ins, outs, tile(c), h, aux, geom)
        return _last_row(h)

    carry = op.carry0(ins, b, cols, cmask)
    if cfg.prefetch:
        def body(c, state):
            carry, loaded = state
            nxt = op.prologue(ins, tile(c + 1), geom)   # rows past N are masked: no traffic
            return step(c, carry, loaded), nxt
        carry, _ = lax.fori_loop(0, nC, body, (carry, op.prologue(ins, tile(0), geom)))
    else:
        carry = lax.fori_loop(0, nC, lambda c, carry: step(c, carry, op.prologue(ins, tile(c), geom)),
                              carry)
    op.finish(outs, b, cols, cmask, carry)


def _bits(v):
    bits = lax.bitcast_convert_type(v, jnp.int32)
    return jnp.where(bits == _SENTINEL, _CANON_NAN, bits)


def _publish(ref, b, c, cols, vals, interpret, atomic=True):
    Dp = ref.shape[-1] // len(vals)
    for p, v in enumerate(vals):
        idx = ref.at[b, c, p * Dp + cols]
        if interpret or not atomic:   # (the interpreter's discharge rules have no atomic xchg)
            plgpu.store(idx, _bits(v))
        else:           # an atomic store is never reordered past the look-back that follows
            plgpu.atomic_xchg(ref, (b, c, p * Dp + cols), _bits(v))


def _peek(ref, b, j, cols, planes, W):
    """Volatile load of the vectors published for tiles j-W+1 .. j: (row published?, planes),
    each plane (W, BD); rows before tile 0 count as unpublished."""
    Dp = ref.shape[-1] // planes
    rows = j - (W - 1) + lax.broadcasted_iota(jnp.int32, (W,), 0)
    valid = rows >= 0
    BD = cols.shape[0]
    r2 = jnp.broadcast_to(jnp.where(valid, rows, 0)[:, None], (W, BD))
    m = jnp.broadcast_to(valid[:, None], (W, BD))
    ok = jnp.ones((W,), jnp.int32)
    vals = []
    for p in range(planes):
        c2 = jnp.broadcast_to((p * Dp + cols)[None, :], (W, BD))
        bits = plgpu.load(ref.at[b, r2, c2], mask=m, other=jnp.asarray(_SENTINEL), volatile=True)
        ok = jnp.minimum(ok, jnp.min((bits != _SENTINEL).astype(jnp.int32), axis=1))
        vals.append(lax.bitcast_convert_type(bits, _F32))
    return ok > 0, tuple(vals)


def _lookback_kernel(*refs, op, geom: _Geom, cfg: KernelConfig, interpret: bool):
    n_in = op.n_in
    ins = refs[:n_in]
    counter, agg_a, agg_x, incl = refs[n_in:n_in + 4]          # inputs aliased to outputs
    outs = refs[n_in + 4 + 4:]                                 # skip the aliased outputs
    T, BD = cfg.block_t, cfg.block_d
    nD = pl.cdiv(geom.D, BD)
    nC = pl.cdiv(geom.N, T)
    if cfg.ticket:   # tiles in the order programs start, so a wait is only ever on a started one
        ticket = plgpu.atomic_add(counter, (jnp.zeros((), jnp.int32),), jnp.ones((), jnp.int32))
    else:            # trusts the GPU to start programs in index order (as CUB's scan does)
        ticket = pl.program_id(0)
    per_c = geom.B * nD
    c, r = ticket // per_c, ticket % per_c
    b, d = r // nD, r % nD
    tl = _make_tile(b, d, c, cfg, geom, _opaque_zero())
    cols, cmask = tl.cols, tl.cmask

    a, x, aux = op.prologue(ins, tl, geom)
    A, X = _tile_scan(a, x)
    A_last, X_last = _last_row(A), _last_row(X)
    pa, p = len(A), len(X)

    @pl.when(c > 0)
    def _():
        _publish(agg_a, b, c, cols, A_last, interpret, cfg.publish_atomic)
        _publish(agg_x, b, c, cols, X_last, interpret, cfg.publish_atomic)

    carry0 = op.carry0(ins, b, cols, cmask)
    ones = (jnp.ones((BD,), _F32),) + tuple(jnp.zeros((BD,), _F32) for _ in range(pa - 1))
    zeros = tuple(jnp.zeros((BD,), _F32) for _ in range(p))

    def cond(state):
        done, spins = state[0], state[1]
        return jnp.logical_and(jnp.logical_not(done), spins < _MAX_SPINS)

    W = cfg.window
    iw = lax.broadcasted_iota(jnp.int32, (W,), 0)

    def body(state):
        # One round trip reads the W predecessors j-W+1..j. If the latest that published its
        # inclusive state is followed only by published aggregates, compose them: done. If all W
        # published aggregates, fold them into acc and move W back. Otherwise look again.
        done, spins, j, acc_a, acc_x, carry = state
        incl_ok, incl_v = _peek(incl, b, j, cols, p, W)
        agg_ok_a, agg_a_v = _peek(agg_a, b, j, cols, pa, W)
        agg_ok_x, agg_x_v = _peek(agg_x, b, j, cols, p, W)
        agg_ok = agg_ok_a & agg_ok_x
        r_incl = jnp.max(jnp.where(incl_ok, iw, -1))
        r_bad = jnp.max(jnp.where(incl_ok | agg_ok, -1, iw))
        found = (r_incl >= 0) & (r_bad < r_incl)
        all_agg = (r_bad < 0) & jnp.logical_not(found)
        after, at = (iw > r_incl)[:, None], (iw == r_incl)[:, None]
        row_a = tuple(jnp.where(after, v, jnp.where(at, 0.0, 1.0 if k == 0 else 0.0))
                      for k, v in enumerate(agg_a_v))
        row_x = tuple(jnp.where(after, v, jnp.where(at, w, 0.0)) for v, w in zip(agg_x_v, incl_v))
        win_a, win_x = _tile_scan(row_a, row_x)
        win_a, win_x = _last_row(win_a), _last_row(win_x)
        new_carry = _cadd(_cmul(acc_a, win_x), acc_x)
        new_acc_a = _cmul(win_a, acc_a)
        new_acc_x = new_carry
        carry = tuple(jnp.where(found, n, o) for n, o in zip(new_carry, carry))
        acc_a = tuple(jnp.where(all_agg, n, o) for n, o in zip(new_acc_a, acc_a))
        acc_x = tuple(jnp.where(all_agg, n, o) for n, o in zip(new_acc_x, acc_x))
        j = jnp.where(all_agg, j - W, j)
        return found, spins + 1, j, acc_a, acc_x, carry

    state = (c == 0, jnp.int32(0), c - 1, ones, zeros, carry0)
    done, _, _, _, _, carry = lax.while_loop(cond, body, state)
    carry = tuple(jnp.where(done, v, jnp.nan) for v in carry)

    incl_state = _cadd(_cmul(A_last, carry), X_last)
    if cfg.incl_every > 1:   # testing: successors must then walk back over aggregates
        pl.when(c % cfg.incl_every == 0)(
            lambda: _publish(incl, b, c, cols, incl_state, interpret, cfg.publish_atomic))
    else:
        _publish(incl, b, c, cols, incl_state, interpret, cfg.publish_atomic)
    h = _cadd(_cmul(A, carry), X)
    op.epilogue(ins, outs, tl, h, aux, geom)

    @pl.when(c == nC - 1)
    def _():
        op.finish(outs, b, cols, cmask, incl_state)


# ---------------------------------------------------------------------------------------------
# Launch


def _launch(op, geom: _Geom, cfg: KernelConfig, ins, out_shapes, interpret: bool):
    T, BD = cfg.block_t, cfg.block_d
    nD, nC = pl.cdiv(geom.D, BD), pl.cdiv(geom.N, T)
    params = plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    name = f"gateloop_{type(op).__name__[1:].lower()}_{cfg.method}"
    if cfg.method == "walk" and cfg.num_stages > 1:
        name += f"{_PIPE_TAG}{cfg.num_stages}"
    if cfg.method == "walk":
        kernel = functools.partial(_walk_kernel, op=op, geom=geom, cfg=cfg)
        return pl.pallas_call(kernel, out_shape=tuple(out_shapes), grid=(geom.B * nD,),
                              compiler_params=params, interpret=interpret, name=name)(*ins)
    # look-back: a ticket counter and three "published" buffers, filled with the sentinel
    Dp = nD * BD
    sent = lambda planes: jnp.full((geom.B, nC, planes * Dp), _SENTINEL, jnp.int32)
    scratch = (jnp.zeros((1,), jnp.int32), sent(op.pa), sent(op.p), sent(op.p))
    n_in = len(ins)
    kernel = functools.partial(_lookback_kernel, op=op, geom=geom, cfg=cfg, interpret=interpret)
    out = pl.pallas_call(
        kernel, out_shape=tuple(jax.ShapeDtypeStruct(s.shape, s.dtype) for s in scratch) + tuple(out_shapes),
        grid=(geom.B * nD * nC,), input_output_aliases={n_in + i: i for i in range(4)},
        compiler_params=params, interpret=interpret, name=name)(*ins, *scratch)
    return out[4:]


# ---------------------------------------------------------------------------------------------
# Core: arrays in "ri" form (complex values as a trailing axis of 2 real planes)


_REAL_DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))


def _check(a, x, h0, ca, cx, c0):
    B, N = x.shape[:2]
    F = x.shape[2:len(x.shape) - cx]
    Fa = a.shape[2:len(a.shape) - ca]
    if len(F) != len(Fa) or a.shape[:2] != (B, N):
        raise ValueError(f"pallas scan: a {a.shape} must be (B, N, *Fa) with x {x.shape} = (B, N, *F)")
    if any(fa not in (1, f) for fa, f in zip(Fa, F)):
        raise ValueError(f"pallas scan: a's feature dims {Fa} do not broadcast to x's {F}")
    if N == 0:
        raise ValueError("pallas scan: x has no time steps")
    if h0 is not None and tuple(h0.shape[:len(h0.shape) - c0]) != (B, *F):
        raise ValueError(f"pallas scan: h0 {h0.shape} must be (B, *F) = {(B, *F)}")
    for name, arr, cplx in (("a", a, ca), ("x", x, cx), ("h0", h0, c0)):
        if arr is None:
            continue
        if jnp.dtype(arr.dtype) not in _REAL_DTYPES:
            raise TypeError(f"pallas scan: {name} has dtype {arr.dtype}; the kernels take float16, "
                            "bfloat16, float32 and complex64 (float64/complex128: use the 'jax' backend)")
        if cplx and arr.shape[-1] != 2:
            raise ValueError(f"pallas scan: complex {name} in pair form needs a trailing axis of 2")
    return B, N, tuple(F), tuple(Fa)


def _geom(a, x, ca, cx, reverse, walk_forward):
    B, N = x.shape[:2]
    F = tuple(x.shape[2:len(x.shape) - cx])
    Fa = tuple(a.shape[2:len(a.shape) - ca])
    wdir = (1 if not reverse else -1) * (1 if walk_forward else -1)
    return _Geom(B, N, math.prod(F), math.prod(Fa), _a_terms(Fa, F), wdir), F, Fa


def _planes_of(arr, cplx):
    """ri array -> tuple of float32 planes."""
    arr = arr.astype(_F32)
    return (arr[..., 0], arr[..., 1]) if cplx else (arr,)


def _from_planes(planes, cplx, dtype):
    if cplx:
        return jnp.stack(_widen(tuple(planes), 2), axis=-1).astype(dtype)
    return planes[0].astype(dtype)


def _fwd_ri(a, x, h0, ca, cx, c0, reverse, cfg, interpret):
    B, N, F, Fa = _check(a, x, h0, ca, cx, c0)
    geom, F, Fa = _geom(a, x, ca, cx, reverse, True)
    cfg = resolve_config(cfg, B, N, geom.D, interpret, cplx=bool(ca or cx or c0))
    pa, px, p0 = 1 + ca, 1 + cx, (0 if h0 is None else 1 + c0)
    p = max(pa, px, p0)
    dtype = jnp.result_type(*(t.dtype for t in (a, x, h0) if t is not None))
    op = _Fwd(pa=pa, px=px, p0=p0, p=p)
    ins = [a.reshape(B, N, geom.Da * pa), x.reshape(B, N, geom.D * px)]
    if h0 is not None:
        ins.append(h0.reshape(B, geom.D * p0))
    tail = (2,) if p == 2 else ()
    h, h_last = _launch(op, geom, cfg, ins, [jax.ShapeDtypeStruct((B, N, geom.D * p), dtype),
                                             jax.ShapeDtypeStruct((B, geom.D * p), dtype)], interpret)
    return h.reshape(B, N, *F, *tail), h_last.reshape(B, *F, *tail)


def _sum_to_shape(t, shape):
    axes = tuple(i for i, (s, n) in enumerate(zip(shape, t.shape)) if s == 1 and n != 1)
    return t.sum(axis=axes, keepdims=True) if axes else t


def _bwd_ri(a, h, h0, g, g_last, ca, cx, c0, reverse, conj, cfg, interpret):
    """Cotangents (da, dx, dh0) in ri form; JAX's convention, or torch's when ``conj``."""
    B, N = h.shape[:2]
    p = 1 + (h.shape[-1] == 2 and (ca or cx or c0))
    geom, F, Fa = _geom(a, h, ca, p == 2, reverse, False)
    cfg = resolve_config(cfg, B, N, geom.D, interpret, cplx=p == 2, backward=True)
    pa, px, p0 = 1 + ca, 1 + cx, (0 if h0 is None else 1 + c0)
    x_dtype = jnp.result_type(h.dtype)     # dx takes h's real dtype; the caller casts
    op = _Bwd(pa=pa, px=px, p0=p0, p=p, has_gl=g_last is not None, conj=conj,
              da_full=geom.a_terms is not None)
    ins = [a.reshape(B, N, geom.Da * pa), h.reshape(B, N, geom.D * p)]
    if h0 is not None:
        ins.append(h0.reshape(B, geom.D * p0))
    ins.append(g.reshape(B, N, geom.D * p))
    if g_last is not None:
        ins.append(g_last.reshape(B, geom.D * p))
    da_cols = geom.D if op.da_full else geom.Da
    da_dtype = _F32 if op.da_full else a.dtype
    dx, da, g_first = _launch(op, geom, cfg, ins, [
        jax.ShapeDtypeStruct((B, N, geom.D * px), x_dtype),
        jax.ShapeDtypeStruct((B, N, da_cols * pa), da_dtype),
        jax.ShapeDtypeStruct((B, geom.D * p), _F32)], interpret)
    ta, tx = (2,) if ca else (), (2,) if cx else ()
    dx = dx.reshape(B, N, *F, *tx)
    if op.da_full:
        da = _sum_to_shape(da.reshape(B, N, *F, *ta), a.shape).astype(a.dtype)
    else:
        da = da.reshape(a.shape)
    dh0 = None
    if h0 is not None:   # dh0 = a_first * G_first, summed nowhere (h0 has x's features)
        a_first = _planes_of(a[:, -1] if reverse else a[:, 0], ca)
        a_first = tuple(jnp.broadcast_to(v, (B, *F)) for v in a_first)
        if conj:
            a_first = _conj(a_first)
        gf = g_first.reshape(B, *F, p)
        gf = tuple(gf[..., i] for i in range(p))
        dh0 = _from_planes(_cmul(a_first, gf)[:p0], c0, h0.dtype)
    return da, dx, dh0


# ---------------------------------------------------------------------------------------------
# Public API: complex JAX arrays (JAX's convention)


def _to_ri(arr):
    if arr is None or not jnp.iscomplexobj(arr):
        return arr, False
    if arr.dtype != jnp.complex64:
        raise TypeError(f"pallas scan: {arr.dtype} is not supported (complex64 only)")
    return jnp.stack([jnp.real(arr), jnp.imag(arr)], axis=-1), True


def _from_ri(arr, cplx):
    return lax.complex(arr[..., 0], arr[..., 1]) if cplx else arr


def scan_fwd(a, x, h0=None, reverse: bool = False, interpret: bool = False,
             config: KernelConfig | None = None):
    """h_t = a_t * h_{t-1} + x_t along axis 1 (forward only). Returns (h, h_last).

    a: (B, N, *Fa), Fa broadcastable to F; x: (B, N, *F); h0: (B, *F) or None. float16,
    bfloat16, float32 or complex64; the result has the promoted dtype and is accumulated in
    float32. ``reverse`` runs t = N-1 .. 0 (h0 is then the state after the last index).
    """
    (a_r, ca), (x_r, cx), (h0_r, c0) = _to_ri(a), _to_ri(x), _to_ri(h0)
    h, h_last = _fwd_ri(a_r, x_r, h0_r, ca, cx, c0, reverse, config, interpret)
    cplx = ca or cx or c0
    return _from_ri(h, cplx), _from_ri(h_last, cplx)


def scan_bwd(a, h, h0, g, g_last, reverse: bool = False, interpret: bool = False,
             config: KernelConfig | None = None, x_dtype=None):
    """Cotangents (da, dx, dh0) of ``scan_fwd`` in JAX's convention (as jax_scan.scan_backward).

    g: cotangent of h, g_last: of h_last (or None). dx is complex when ``x_dtype`` is complex
    or None (default: h's dtype); pass a real ``x_dtype`` to get Re(G) for a real x.
    """
    x_dtype = jnp.dtype(h.dtype if x_dtype is None else x_dtype)
    (a_r, ca), (h_r, _), (h0_r, c0) = _to_ri(a), _to_ri(h), _to_ri(h0)
    cx = bool(jnp.issubdtype(x_dtype, jnp.complexfloating))
    g_r = _to_ri(g.astype(h.dtype))[0]
    gl_r = None if g_last is None else _to_ri(g_last.astype(h.dtype))[0]
    da, dx, dh0 = _bwd_ri(a_r, h_r, h0_r, g_r, gl_r, ca, cx, c0, reverse, False, config, interpret)
    return (_from_ri(da, ca).astype(a.dtype), _from_ri(dx, cx).astype(x_dtype),
            None if h0 is None else _from_ri(dh0, c0).astype(h0.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _scan_c(a, x, h0, reverse, interpret, config):
    return scan_fwd(a, x, h0, reverse, interpret, config)


def _scan_c_fwd(a, x, h0, reverse, interpret, config):
    h, h_last = scan_fwd(a, x, h0, reverse, interpret, config)
    return (h, h_last), (a, h, h0, jnp.zeros((0,), x.dtype))


def _scan_c_bwd(reverse, interpret, config, res, cts):
    a, h, h0, x_proto = res
    g, g_last = cts
    return scan_bwd(a, h, h0, g, g_last, reverse, interpret, config, x_dtype=x_proto.dtype)


_scan_c.defvjp(_scan_c_fwd, _scan_c_bwd)


def scan_pallas(a, x, h0=None, reverse: bool = False, interpret: bool = False,
                          config: KernelConfig | None = None):
    """Differentiable ``scan_fwd``: (h, h_last); gradients to a, x, h0 in JAX's convention.

    The backward is one Pallas reverse scan of the cotangent with the gates shifted by one
    step; its residuals are (a, h, h0).
    """
    return _scan_c(a, x, h0, reverse, interpret, config)


# ---------------------------------------------------------------------------------------------
# Public API: complex values as float pairs (torch.view_as_real layout; torch's convention)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7, 8))
def _scan_ri(a, x, h0, ca, cx, c0, reverse, interpret, config):
    return _fwd_ri(a, x, h0, ca, cx, c0, reverse, config, interpret)


def _scan_ri_fwd(a, x, h0, ca, cx, c0, reverse, interpret, config):
    h, h_last = _fwd_ri(a, x, h0, ca, cx, c0, reverse, config, interpret)
    return (h, h_last), (a, h, h0, jnp.zeros((0,), x.dtype))


def _scan_ri_bwd(ca, cx, c0, reverse, interpret, config, res, cts):
    a, h, h0, x_proto = res
    g, g_last = cts
    da, dx, dh0 = _bwd_ri(a, h, h0, g, g_last, ca, cx, c0, reverse, True, config, interpret)
    return da, dx.astype(x_proto.dtype), dh0


_scan_ri.defvjp(_scan_ri_fwd, _scan_ri_bwd)


def scan_pallas_ri(a, x, h0=None, *, complex_a: bool = False, complex_x: bool = False,
                             complex_h0: bool = False, reverse: bool = False,
                             interpret: bool = False, config: KernelConfig | None = None):
    """``scan_pallas`` on real arrays in which complex values are float pairs.

    A tensor flagged complex carries a trailing axis of size 2 (re, im), e.g. torch.view_as_real
    of a complex64 tensor, so no conversion pass is needed. h and h_last carry that axis when any
    input is complex. Gradients follow torch's convention (d/d(re) + i d/d(im), i.e. conjugated
    relative to JAX's), which is what torch.view_as_complex of the pair gradient means.
    """
    return _scan_ri(a, x, h0, complex_a, complex_x, complex_h0 and h0 is not None, reverse,
                    interpret, config)
