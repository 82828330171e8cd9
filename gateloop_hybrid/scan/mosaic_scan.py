"""The scan h_t = a_t * h_{t-1} + x_t as Pallas Mosaic GPU kernels (Hopper and newer). Pure JAX.

Layout, as torch holds the tensors (no transposes, no planar split):

    x, h     (B, N, F)  real, or (B, N, F, 2): complex as interleaved (re, im) pairs, the layout
             torch.view_as_real gives
    a        (B, N, G) or (B, N, G, 2); feature f uses gate (f // R) % G, so one gate per head
             (R = head size) or per step (G = 1) is never expanded
    h0       (B, F) or (B, F, 2)

Legend: B batch, N time, F features (a multiple of W = 128), G gates per step, C time chunks.

How a kernel walks. One CTA is one warpgroup of 128 threads; it owns W features of one batch
row, and thread i carries feature i's state in registers. Loads and stores go straight between
HBM and registers: a block of K steps is loaded one block ahead of the arithmetic (double
buffering in registers), so memory latency overlaps the dependent chain of multiply-adds.

Parallel over time. When B * F / W CTAs cannot fill the GPU, the walk is cut into C chunks: a
summary kernel reduces each chunk to (A_c, X_c) (the product of its gates, and its last state
from zero), and a finishing kernel folds the earlier chunks' summaries into its carry-in and
walks its chunk again, writing the outputs. That reads the inputs twice.

Backward is the same walk run the other way over the cotangent, with conjugated gates shifted by
one step (G_t = g_t + conj(a_{t+1}) G_{t+1}, seeded with the cotangent of h_last), and writes
dx = G and da = G conj(h_{t-1}) as it goes; torch's complex convention throughout.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

W = 128                       # features per CTA: one per thread of a warpgroup
_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Walk:
    """Everything static about one kernel launch (the compile-cache key, with the dtypes)."""
    B: int
    N: int
    F: int
    G: int
    R: int
    complex_a: bool
    complex_x: bool           # x (forward) or the cotangent g (backward)
    complex_init: bool        # h0 (forward) or the cotangent of h_last (backward)
    complex_h0: bool          # backward only: h0, read at the last step for da
    has_init: bool
    has_h0: bool              # backward only
    backward: bool
    reverse: bool             # the forward recurrence runs from t = N-1 down to 0
    chunks: int = 1
    block: int = 8
    interpret: bool = False

    def __post_init__(self):
        if not 1 <= self.chunks <= self.N or -(-self.N // self.span) != self.chunks:
            raise ValueError(f"{self.chunks} time chunks of {self.span} steps do not cover N={self.N} "
                             "with none empty (see fit_chunks)")

    @property
    def cplx(self) -> bool:   # is the state complex
        return self.complex_a or self.complex_x or self.complex_init or self.complex_h0

    @property
    def walk_down(self) -> bool:  # does the walk go from t = N-1 down to 0
        return self.reverse != self.backward

    @property
    def span(self) -> int:    # walk steps per chunk (the last chunk may be shorter)
        return -(-self.N // self.chunks)

    def gate_mode(self) -> str:
        mode = _gate_mode(self.G, self.R)
        if mode is None:
            raise ValueError(f"gates (G={self.G}, R={self.R}) cannot be read per tile of {W} features")
        return mode


def _gate_mode(G: int, R: int) -> str | None:
    """How a CTA of W features reads its gates: "scalar" (one for all), "row" (one each), or
    None when neither fits."""
    if G == 1 or R % W == 0:
        return "scalar"
    if R == 1 and G % W == 0:
        return "row"
    return None


def supported(F: int, G: int, R: int) -> bool:
    """Whether the kernels take x with F features and gates (G, R) (see the module docstring)."""
    return F > 0 and F % W == 0 and _gate_mode(G, R) is not None


# ---------------------------------------------------------------------------------------------
# Complex arithmetic on (re, im) pairs of float32 arrays; im None means a real value.


def _mul(u, v):
    (ur, ui), (vr, vi) = u, v
    if ui is None and vi is None:
        return ur * vr, None
    if ui is None:
        return ur * vr, ur * vi
    if vi is None:
        return ur * vr, ui * vr
    return ur * vr - ui * vi, ur * vi + ui * vr


def _add(u, v):
    (ur, ui), (vr, vi) = u, v
    im = ui if vi is None else vi if ui is None else ui + vi
    return ur + vr, im


def _conj(u):
    return u if u[1] is None else (u[0], -u[1])


def _complexify(u, zero):
    return u if u[1] is not None else (u[0], zero)


# ---------------------------------------------------------------------------------------------
# The kernel body


class _Body:
    """One CTA's walk. Holds the refs and the static walk; `run_*` are the kernel entry points."""

    def __init__(self, w: Walk, refs: dict):
        self.w = w
        self.r = refs
        self.b = jax.lax.axis_index("b")
        self.f0 = jax.lax.axis_index("d") * W
        self.c = jax.lax.axis_index("c")
        self.lay = plgpu.Layout.WG_STRIDED((W,), vec_size=1)

    # -- values
    def full(self, value):
        v = jnp.full((W,), value, _F32)
        return v if self.w.interpret else plgpu.layout_cast(v, self.lay)

    def zero_state(self):
        return (self.full(0.0), self.full(0.0) if self.w.cplx else None)

    def time(self, p):
        """Time index of walk step p."""
        return self.w.N - 1 - p if self.w.walk_down else p

    def row(self, ref, t, cplx):
        """(re, im) of ref[b, t, features of this CTA], in float32."""
        if cplx:
            return (ref[self.b, t, pl.ds(self.f0, W), 0].astype(_F32),
                    ref[self.b, t, pl.ds(self.f0, W), 1].astype(_F32))
        return ref[self.b, t, pl.ds(self.f0, W)].astype(_F32), None

    def vec(self, ref, cplx):
        """(re, im) of ref[b, features of this CTA] (h0, or a cotangent of h_last)."""
        if cplx:
            return (ref[self.b, pl.ds(self.f0, W), 0].astype(_F32),
                    ref[self.b, pl.ds(self.f0, W), 1].astype(_F32))
        return ref[self.b, pl.ds(self.f0, W)].astype(_F32), None

    def gate(self, t):
        a, w = self.r["a"], self.w
        if w.gate_mode() == "scalar":
            g = (self.f0 // w.R) % w.G
            if w.complex_a:
                return a[self.b, t, g, 0].astype(_F32), a[self.b, t, g, 1].astype(_F32)
            return a[self.b, t, g].astype(_F32), None
        g0 = self.f0 % w.G
        if w.complex_a:
            return a[self.b, t, pl.ds(g0, W), 0].astype(_F32), a[self.b, t, pl.ds(g0, W), 1].astype(_F32)
        return a[self.b, t, pl.ds(g0, W)].astype(_F32), None

    def unit_gate(self):
        if self.w.gate_mode() == "scalar":
            return (jnp.asarray(1.0, _F32), jnp.asarray(0.0, _F32) if self.w.complex_a else None)
        return (self.full(1.0), self.full(0.0) if self.w.complex_a else None)

    def store(self, ref, t, value, cplx):
        dt = ref.dtype
        if cplx:
            value = _complexify(value, self.full(0.0))
            ref[self.b, t, pl.ds(self.f0, W), 0] = value[0].astype(dt)
            ref[self.b, t, pl.ds(self.f0, W), 1] = value[1].astype(dt)
        else:
            ref[self.b, t, pl.ds(self.f0, W)] = value[0].astype(dt)

    def store_vec(self, ref, value, cplx, index=None):
        dt = ref.dtype
        where = (self.b, pl.ds(self.f0, W)) if index is None else (self.b, index, pl.ds(self.f0, W))
        if cplx:
            value = _complexify(value, self.full(0.0))
            ref[(*where, 0)] = value[0].astype(dt)
            ref[(*where, 1)] = value[1].astype(dt)
        else:
            ref[where] = value[0].astype(dt)

    # -- one step
    def load_step(self, p):
        """What walk step p reads, as a flat tuple of arrays (None entries dropped later)."""
        w, t = self.w, self.time(p)
        if not w.backward:
            return (*self.gate(t), *self.row(self.r["x"], t, w.complex_x))
        # backward: the cotangent g_t, the gate a_t (the next step's multiplier) and h before t
        # in the forward recurrence (clamped at the end; the last step uses h0 instead).
        t_prev = self.time(jnp.minimum(p + 1, w.N - 1))
        return (*self.row(self.r["g"], t, w.cplx), *self.gate(t),
                *self.row(self.r["h"], t_prev, w.cplx))

    def step(self, p, loaded, state, carry_gate, write, h_before=None):
        """Advance the state by walk step p; returns (state, carry_gate)."""
        w = self.w
        if not w.backward:
            gate, x = (loaded[0], loaded[1]), (loaded[2], loaded[3])
            state = _add(_mul(gate, state), x)
            if write:
                self.store(self.r["h_out"], self.time(p), state, w.cplx)
            return state, carry_gate
        g, gate, h_prev = (loaded[0], loaded[1]), (loaded[2], loaded[3]), (loaded[4], loaded[5])
        state = _add(g, _mul(_conj(carry_gate), state))
        if write:
            t = self.time(p)
            if h_before is not None:
                h_prev = h_before
            self.store(self.r["dx"], t, state if w.complex_x else (state[0], None), w.complex_x)
            da = _mul(state, _conj(h_prev))
            self.store(self.r["da_full"], t, da if w.complex_a else (da[0], None), w.complex_a)
        return state, gate

    def walk(self, lo, n, state, carry_gate, write):
        """Walk steps [lo, lo + n) (n dynamic), K steps at a time with the next block's loads
        issued before this block's arithmetic."""
        K, w = self.w.block, self.w

        def load_block(p0):
            return tuple(self.load_step(jnp.minimum(p0 + k, w.N - 1)) for k in range(K))

        def block(i, carry):
            state, gate, cur = carry
            nxt = load_block(lo + (i + 1) * K)
            for k in range(K):
                state, gate = self.step(lo + i * K + k, cur[k], state, gate, write)
            return state, gate, nxt

        blocks = n // K
        state, carry_gate, _ = jax.lax.fori_loop(0, blocks, block, (state, carry_gate, load_block(lo)))

        def single(p, carry):
            return self.step(p, self.load_step(p), *carry, write)
        return jax.lax.fori_loop(lo + blocks * K, lo + n, single, (state, carry_gate))

    # -- chunk geometry
    def chunk(self):
        w = self.w
        lo = self.c * w.span
        return lo, jnp.minimum(w.span, w.N - lo)

    def initial(self):
        """The state before the first walk step: h0 / the cotangent of h_last, or zeros."""
        if not self.w.has_init:
            return self.zero_state()
        v = self.vec(self.r["init"], self.w.complex_init)
        return _complexify(v, self.full(0.0)) if self.w.cplx else v

    def gate_before(self, lo):
        """Backward: the multiplier of walk step lo is the conjugate gate of step lo - 1."""
        if not self.w.backward:
            return self.unit_gate()
        unit = self.unit_gate()
        return jax.lax.cond(lo > 0, lambda: self.gate(self.time(jnp.maximum(lo - 1, 0))), lambda: unit)

    def walk_chunk(self, state, write):
        """Walk this CTA's chunk from ``state``. In backward the very last step (t where the
        forward recurrence started) reads h0 (or zeros) for da instead of a state."""
        w = self.w
        lo, n = self.chunk()
        gate = self.gate_before(lo)
        if not (w.backward and write):
            return self.walk(lo, n, state, gate, write)[0]
        last_chunk = lo + n == w.N
        n_main = n - last_chunk.astype(n.dtype)
        state, gate = self.walk(lo, n_main, state, gate, write)

        @pl.when(last_chunk)
        def _():
            h_before = (self.vec(self.r["h0"], w.complex_h0) if w.has_h0 else self.zero_state())
            h_before = _complexify(h_before, self.full(0.0)) if w.cplx else h_before
            p = jnp.asarray(w.N - 1, jnp.int32)
            loaded = self.load_step(p)
            last, _ = self.step(p, loaded, state, gate, True, h_before=h_before)
            if w.has_h0:     # dh0 = conj(a at the recurrence's first step) G there
                dh0 = _mul(_conj((loaded[2], loaded[3])), last)
                self.store_vec(self.r["dh0"], dh0 if w.complex_h0 else (dh0[0], None), w.complex_h0)
        return state

    # -- entry points
    def run_single(self):
        state = self.walk_chunk(self.initial(), write=True)
        if not self.w.backward:
            self.store_vec(self.r["h_last"], state, self.w.cplx)

    def run_summary(self):
        lo, n = self.chunk()
        gate_prod = self.unit_gate()
        state = self.zero_state()
        gate0 = self.gate_before(lo)

        def body(p, carry):
            state, prod, gate = carry
            loaded = self.load_step(p)
            state, new_gate = self.step(p, loaded, state, gate, False)
            mult = _conj(gate) if self.w.backward else (loaded[0], loaded[1])
            return state, _mul(mult, prod), new_gate
        # Summaries are small work against the finishing walk: one step at a time.
        state, prod, _ = jax.lax.fori_loop(lo, lo + n, body, (state, gate_prod, gate0))
        if self.w.gate_mode() == "scalar":
            prod = (prod[0] + self.full(0.0), None if prod[1] is None else prod[1] + self.full(0.0))
        self.store_vec(self.r["sum_a"], prod, self.w.complex_a, index=self.c)
        self.store_vec(self.r["sum_x"], state, self.w.cplx, index=self.c)

    def run_finish(self):
        w = self.w

        def fold(j, state):
            prod = self.vec_at(self.r["sum_a"], j, w.complex_a)
            x = self.vec_at(self.r["sum_x"], j, w.cplx)
            return _add(_mul(prod, state), x)
        state = jax.lax.fori_loop(0, self.c, fold, self.initial())
        state = self.walk_chunk(state, write=True)
        if not w.backward:
            @pl.when(self.c == w.chunks - 1)
            def _():
                self.store_vec(self.r["h_last"], state, w.cplx)

    def vec_at(self, ref, j, cplx):
        if cplx:
            return (ref[self.b, j, pl.ds(self.f0, W), 0], ref[self.b, j, pl.ds(self.f0, W), 1])
        return ref[self.b, j, pl.ds(self.f0, W)], None


# ---------------------------------------------------------------------------------------------
# Kernels as JAX functions


def _pairs(shape, cplx):
    return (*shape, 2) if cplx else tuple(shape)


def _kernel(w: Walk, stage: str, in_names, out_types: dict):
    """A plgpu.kernel over grid (F / W, B, C) whose refs are named in_names + out_types."""
    names = (*in_names, *out_types)

    def body(*refs):
        getattr(_Body(w, dict(zip(names, refs))), f"run_{stage}")()
    kw = {}
    if w.interpret:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
        kw["interpret"] = InterpretGPUParams()
    return plgpu.kernel(body, out_type=tuple(out_types.values()),
                        grid=(w.F // W, w.B, w.chunks if stage != "single" else 1),
                        grid_names=("d", "b", "c"), **kw)


def _stage_refs(w: Walk, stage: str, out_dtypes: tuple):
    """Names of a stage's input refs, and its outputs' types."""
    B, N, F = w.B, w.N, w.F
    if w.backward:
        ins = ("a", "g", "h", *(("init",) if w.has_init else ()), *(("h0",) if w.has_h0 else ()))
        outs = {"dx": jax.ShapeDtypeStruct(_pairs((B, N, F), w.complex_x), out_dtypes[0]),
                "da_full": jax.ShapeDtypeStruct(_pairs((B, N, F), w.complex_a), out_dtypes[1])}
        if w.has_h0:
            outs["dh0"] = jax.ShapeDtypeStruct(_pairs((B, F), w.complex_h0), out_dtypes[2])
    else:
        ins = ("a", "x", *(("init",) if w.has_init else ()))
        outs = {"h_out": jax.ShapeDtypeStruct(_pairs((B, N, F), w.cplx), out_dtypes[0]),
                "h_last": jax.ShapeDtypeStruct(_pairs((B, F), w.cplx), out_dtypes[1])}
    if stage == "summary":
        outs = {"sum_a": jax.ShapeDtypeStruct(_pairs((B, w.chunks, F), w.complex_a), _F32),
                "sum_x": jax.ShapeDtypeStruct(_pairs((B, w.chunks, F), w.cplx), _F32)}
    elif stage == "finish":
        ins = (*ins, "sum_a", "sum_x")
    return ins, outs


def stage(*arrays, walk: Walk | tuple, stage: str, out_dtypes: tuple):
    """Run one kernel of a walk: "single" (chunks == 1), or "summary" then "finish" (whose
    inputs end with the summary's two outputs). ``walk`` may be given as the tuple of its fields
    (plain values are what torch.compile passes to an opaque op).

    Forward inputs: a, x, [h0]; outputs h, h_last (dtypes out_dtypes).
    Backward inputs: a, g, h, [g_last], [h0]; outputs dx, da_full (da before summing over the
    features that share a gate), [dh0] (dtypes out_dtypes, in that order).
    """
    walk = walk if isinstance(walk, Walk) else Walk(*walk)
    walk.gate_mode()
    if (stage == "single") != (walk.chunks == 1):
        raise ValueError(f"stage {stage!r} does not fit a walk of {walk.chunks} chunks")
    ins, outs = _stage_refs(walk, stage, out_dtypes)
    return _kernel(walk, stage, ins, outs)(*arrays)


def walk_kernel(w: Walk, out_dtypes: tuple):
    """The whole walk as one JAX function of the stage's inputs (one or two kernels)."""
    if w.chunks == 1:
        return functools.partial(stage, walk=w, stage="single", out_dtypes=out_dtypes)

    def chunked(*args):
        sums = stage(*args, walk=w, stage="summary", out_dtypes=out_dtypes)
        return stage(*args, *sums, walk=w, stage="finish", out_dtypes=out_dtypes)
    return chunked


def fit_chunks(N: int, chunks: int) -> int:
    """The number of chunks of ceil(N / chunks) steps that covers N steps with none empty."""
    chunks = max(1, min(chunks, N))
    return -(-N // -(-N // chunks))


def choose_walk(B: int, N: int, F: int, cplx: bool, num_sms: int = 132,
                backward: bool = False) -> tuple[int, int]:
    """(chunks, block) for a walk, from measurements on an H200 (benchmarks/lab/mosaic_walk_probe.py).

    One pass when B * F / W CTAs nearly fill the GPU: it reads the inputs once, and deeper blocks
    keep enough loads in flight (forward 32 steps; backward, which loads three rows a step, 32
    real and 16 complex). Otherwise chunks for about eight CTAs per multiprocessor, with blocks of
    16 steps (32 for real backward walks) or 8 complex: more, shorter chunks hide the summary
    pass's extra read better than fewer, longer ones."""
    ctas = B * (F // W)
    if ctas * 10 >= num_sms * 9:
        return 1, 16 if (cplx and backward) else 32
    block = 8 if cplx else 32 if backward else 16
    chunks = -(-8 * num_sms // ctas)
    return fit_chunks(N, min(chunks, max(1, N // 64))), block
