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

from . import walk as walks
from .walk import F32, W, WalkBody, add, complexify, conj, mul, pairs


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
    one_pass: bool = False    # chunks > 1: one kernel exchanging summaries (walk.stages)

    def __post_init__(self):
        walks.check_chunks(self)

    @property
    def width(self) -> int:
        return self.F

    @property
    def cplx(self) -> bool:   # is the state complex
        return self.complex_a or self.complex_x or self.complex_init or self.complex_h0

    @property
    def walk_down(self) -> bool:  # does the walk go from t = N-1 down to 0
        return self.reverse != self.backward

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
# The kernel body


class _ScanBody(WalkBody):
    """The scan's walk: a step reads a gate and an input row (forward), or the cotangent, the
    gate and the state before (backward)."""

    def gate(self, t):
        a, w = self.r["a"], self.w
        if w.gate_mode() == "scalar":
            g = (self.f0 // w.R) % w.G
            if w.complex_a:
                return a[self.b, t, g, 0].astype(F32), a[self.b, t, g, 1].astype(F32)
            return a[self.b, t, g].astype(F32), None
        g0 = self.f0 % w.G
        if w.complex_a:
            return a[self.b, t, pl.ds(g0, W), 0].astype(F32), a[self.b, t, pl.ds(g0, W), 1].astype(F32)
        return a[self.b, t, pl.ds(g0, W)].astype(F32), None

    def unit_gate(self):
        if self.w.gate_mode() == "scalar":
            return (jnp.asarray(1.0, F32), jnp.asarray(0.0, F32) if self.w.complex_a else None)
        return (self.full(1.0), self.full(0.0) if self.w.complex_a else None)

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
        """Advance the state by walk step p; returns (state, the gate this step read)."""
        w = self.w
        if not w.backward:
            gate, x = (loaded[0], loaded[1]), (loaded[2], loaded[3])
            state = add(mul(gate, state), x)
            if write:
                self.store(self.r["h_out"], self.time(p), state, w.cplx)
            return state, gate
        g, gate, h_prev = (loaded[0], loaded[1]), (loaded[2], loaded[3]), (loaded[4], loaded[5])
        state = add(g, mul(conj(carry_gate), state))
        if write:
            t = self.time(p)
            if h_before is not None:
                h_prev = h_before
            self.store(self.r["dx"], t, state if w.complex_x else (state[0], None), w.complex_x)
            da = mul(state, conj(h_prev))
            self.store(self.r["da_full"], t, da if w.complex_a else (da[0], None), w.complex_a)
        return state, gate

    def first_step_backward(self, state, gate):
        """The step where the forward recurrence started: h_{t-1} is h0 (or zero), and
        dh0 = conj(a there) G there."""
        w = self.w
        h_before = self.vec(self.r["h0"], w.complex_h0) if w.has_h0 else self.zero_state()
        h_before = complexify(h_before, self.full(0.0)) if w.cplx else h_before
        p = jnp.asarray(w.N - 1, jnp.int32)
        loaded = self.load_step(p)
        last, _ = self.step(p, loaded, state, gate, True, h_before=h_before)
        if w.has_h0:
            dh0 = mul(conj((loaded[2], loaded[3])), last)
            self.store_vec(self.r["dh0"], dh0 if w.complex_h0 else (dh0[0], None), w.complex_h0)


# ---------------------------------------------------------------------------------------------
# Kernels as JAX functions


def _stage_refs(w: Walk, stage: str, out_dtypes: tuple):
    """Names of a stage's input refs, and its outputs' types."""
    B, N, F = w.B, w.N, w.F
    if w.backward:
        ins = ("a", "g", "h", *(("init",) if w.has_init else ()), *(("h0",) if w.has_h0 else ()))
        outs = {"dx": jax.ShapeDtypeStruct(pairs((B, N, F), w.complex_x), out_dtypes[0]),
                "da_full": jax.ShapeDtypeStruct(pairs((B, N, F), w.complex_a), out_dtypes[1])}
        if w.has_h0:
            outs["dh0"] = jax.ShapeDtypeStruct(pairs((B, F), w.complex_h0), out_dtypes[2])
    else:
        ins = ("a", "x", *(("init",) if w.has_init else ()))
        outs = {"h_out": jax.ShapeDtypeStruct(pairs((B, N, F), w.cplx), out_dtypes[0]),
                "h_last": jax.ShapeDtypeStruct(pairs((B, F), w.cplx), out_dtypes[1])}
    sums = {"sum_a": jax.ShapeDtypeStruct(pairs((B, w.chunks, F), w.complex_a), F32),
            "sum_x": jax.ShapeDtypeStruct(pairs((B, w.chunks, F), w.cplx), F32)}
    if stage == "summary":
        outs = sums
    elif stage == "finish":
        ins = (*ins, "sum_a", "sum_x")
    elif stage == "onepass":    # the summaries are outputs the chunks exchange (dropped by stage)
        outs = {**outs, **sums}
    return ins, outs


def stage(*arrays, walk: Walk | tuple, stage: str, out_dtypes: tuple):
    """Run one kernel of a walk (``walk.stages``): "single" (chunks == 1), "onepass", or
    "summary" then "finish" (whose inputs end with the summary's two outputs). ``walk`` may be
    given as the tuple of its fields (plain values are what torch.compile passes to an opaque op).

    Forward inputs: a, x, [h0]; outputs h, h_last (dtypes out_dtypes).
    Backward inputs: a, g, h, [g_last], [h0]; outputs dx, da_full (da before summing over the
    features that share a gate), [dh0] (dtypes out_dtypes, in that order).
    """
    walk = walks.as_key(Walk, walk)
    walk.gate_mode()
    ins, outs = _stage_refs(walk, stage, out_dtypes)
    results = walks.build(_ScanBody, walk, stage, ins, outs)(*arrays)
    return results[:-2] if stage == "onepass" else results


def walk_kernel(w: Walk, out_dtypes: tuple):
    """The whole walk as one JAX function of the stage's inputs (one or two kernels)."""
    if len(walks.stages(w)) == 1:
        return functools.partial(stage, walk=w, stage=walks.stages(w)[0], out_dtypes=out_dtypes)

    def chunked(*args):
        sums = stage(*args, walk=w, stage="summary", out_dtypes=out_dtypes)
        return stage(*args, *sums, walk=w, stage="finish", out_dtypes=out_dtypes)
    return chunked
