"""What every Mosaic GPU walk kernel shares. Pure JAX.

A *walk* is one CTA (a warpgroup of W = 128 threads) carrying the states of W features of one
batch row through time, thread i holding feature i's state in registers. Three things are common
to every walk kernel (the scan in mosaic_scan.py, the fused mixers in mosaic_mixer.py):

- **The walk key** (``WalkKey``): a frozen dataclass holding everything static about a launch.
  It is the kernel's compile key (with the inputs' dtypes), and it reaches the torch op as the
  plain tuple of its fields (``key_fields``), which is what an opaque op under torch.compile takes.
- **The body** (``WalkBody``): loads and stores of rows and vectors, the double-buffered walk over
  blocks of K steps, the chunk geometry and the kernel entry points ("single"; when the time
  axis is cut into chunks, "summary" then "finish", or "onepass", which does both in one kernel
  with the chunks of a row exchanging their summaries through grid-wide counters). A kernel
  subclasses it with what a step reads (``load_step``), what it does (``step``), its gate and
  its first-step backward.
- **Complex arithmetic on (re, im) pairs** of float32 arrays, where an ``im`` of None means real.

``build`` turns a key, a stage and a body class into the ``plgpu.kernel`` call.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from .._private import mosaic_interpret_params

W = 128                       # features per CTA: one per thread of a warpgroup
F32 = jnp.float32


class WalkKey(Protocol):
    """The static description of one walk kernel launch (a frozen dataclass)."""
    B: int
    N: int
    chunks: int
    block: int
    backward: bool
    interpret: bool
    has_init: bool                       # forward: h0; backward: the cotangent of h_last
    complex_a: bool                      # are the gates complex
    complex_init: bool                   # is the initial state complex
    one_pass: bool                       # cut into chunks: one kernel rather than two (stages)

    @property
    def width(self) -> int: ...          # features walked (a multiple of W)
    @property
    def cplx(self) -> bool: ...          # is the state complex
    @property
    def walk_down(self) -> bool: ...     # does the walk go from t = N-1 down to 0
    def gate_mode(self) -> str: ...      # "scalar" (one gate for a CTA) or "row" (one a feature)


def span(key: WalkKey) -> int:
    """Walk steps per chunk (the last chunk may be shorter)."""
    return -(-key.N // key.chunks)


def check_chunks(key: WalkKey) -> None:
    if not 1 <= key.chunks <= key.N or -(-key.N // span(key)) != key.chunks:
        raise ValueError(f"{key.chunks} time chunks of {span(key)} steps do not cover N={key.N} "
                         "with none empty (see fit_chunks)")


def key_fields(key) -> tuple:
    """A key's fields as a plain tuple. Not dataclasses.astuple, which deep-copies: under dynamic
    shapes the sizes are SymInts, whose copy reaches the fake tensors."""
    return tuple(getattr(key, f.name) for f in dataclasses.fields(key))


def as_key(cls, key):
    """``key`` as an instance of ``cls`` (a kernel may be given the tuple of its fields)."""
    return key if isinstance(key, cls) else cls(*key)


def fit_chunks(N: int, chunks: int) -> int:
    """The number of chunks of ceil(N / chunks) steps that covers N steps with none empty."""
    chunks = max(1, min(chunks, N))
    return -(-N // -(-N // chunks))


def choose_walk(B: int, N: int, F: int, cplx: bool, num_sms: int = 132,
                backward: bool = False) -> tuple[int, int]:
    """(chunks, block) for a walk, from measurements on an H200 (docs/mosaic.md).

    One pass when B * F / W CTAs nearly fill the GPU: it reads the inputs once, and deeper blocks
    keep enough loads in flight (forward 32 steps; backward, which loads three rows a step, 32
    real and 16 complex). Otherwise chunks for about eight CTAs per multiprocessor, with blocks of
    16 steps (32 for real backward walks) or 8 complex: more, shorter chunks hide the summary
    pass's extra read better than fewer, longer ones."""
    ctas = max(1, B * (F // W))
    if ctas * 10 >= num_sms * 9:
        return 1, 16 if (cplx and backward) else 32
    block = 8 if cplx else 32 if backward else 16
    chunks = -(-8 * num_sms // ctas)
    return fit_chunks(N, min(chunks, max(1, N // 64))), block


ONE_PASS = False     # cut walks run as "onepass" (see one_pass_chunks); off until measured faster


def one_pass_chunks(N: int, chunks: int, num_sms: int) -> int:
    """The chunks of a one-pass walk asked for ``chunks``: at most one per multiprocessor, so
    that a row's chunks, which wait for each other, always fit on the GPU together."""
    return fit_chunks(N, min(chunks, num_sms))


# ---------------------------------------------------------------------------------------------
# Complex arithmetic on (re, im) pairs of float32 arrays; im None means a real value.


def mul(u, v):
    (ur, ui), (vr, vi) = u, v
    if ui is None and vi is None:
        return ur * vr, None
    if ui is None:
        return ur * vr, ur * vi
    if vi is None:
        return ur * vr, ui * vr
    return ur * vr - ui * vi, ur * vi + ui * vr


def add(u, v):
    (ur, ui), (vr, vi) = u, v
    im = ui if vi is None else vi if ui is None else ui + vi
    return ur + vr, im


def conj(u):
    return u if u[1] is None else (u[0], -u[1])


def complexify(u, zero):
    return u if u[1] is not None else (u[0], zero)


# ---------------------------------------------------------------------------------------------
# The body


class WalkBody:
    """One CTA's walk. Holds the refs and the static key; ``run_*`` are the kernel entry points.

    A subclass gives ``gate(t)``, ``unit_gate()``, ``load_step(p)`` (what walk step p reads, as a
    flat tuple), ``step(p, loaded, state, carry_gate, write, h_before=None)`` -> (state, gate), and
    ``first_step_backward(state, gate)``: the backward walk's last step, where the forward
    recurrence started and h_{t-1} is h0 (or zero) rather than a stored state.
    """

    def __init__(self, key: WalkKey, refs: dict):
        self.w = key
        self.r = refs
        self.b = jax.lax.axis_index("b")
        self.f0 = jax.lax.axis_index("d") * W
        self.c = jax.lax.axis_index("c")
        self.lay = plgpu.Layout.WG_STRIDED((W,), vec_size=1)

    # -- values
    def full(self, value):
        v = jnp.full((W,), value, F32)
        return v if self.w.interpret else plgpu.layout_cast(v, self.lay)

    def zero_state(self):
        return (self.full(0.0), self.full(0.0) if self.w.cplx else None)

    def time(self, p):
        """Time index of walk step p."""
        return self.w.N - 1 - p if self.w.walk_down else p

    def row(self, ref, t, cplx):
        """(re, im) of ref[b, t, features of this CTA], in float32."""
        if cplx:
            return (ref[self.b, t, pl.ds(self.f0, W), 0].astype(F32),
                    ref[self.b, t, pl.ds(self.f0, W), 1].astype(F32))
        return ref[self.b, t, pl.ds(self.f0, W)].astype(F32), None

    def vec(self, ref, cplx):
        """(re, im) of ref[b, features of this CTA] (h0, or a cotangent of h_last)."""
        if cplx:
            return (ref[self.b, pl.ds(self.f0, W), 0].astype(F32),
                    ref[self.b, pl.ds(self.f0, W), 1].astype(F32))
        return ref[self.b, pl.ds(self.f0, W)].astype(F32), None

    def vec_at(self, ref, j, cplx):
        if cplx:
            return (ref[self.b, j, pl.ds(self.f0, W), 0], ref[self.b, j, pl.ds(self.f0, W), 1])
        return ref[self.b, j, pl.ds(self.f0, W)], None

    def store(self, ref, t, value, cplx):
        dt = ref.dtype
        if cplx:
            value = complexify(value, self.full(0.0))
            ref[self.b, t, pl.ds(self.f0, W), 0] = value[0].astype(dt)
            ref[self.b, t, pl.ds(self.f0, W), 1] = value[1].astype(dt)
        else:
            ref[self.b, t, pl.ds(self.f0, W)] = value[0].astype(dt)

    def store_vec(self, ref, value, cplx, index=None):
        dt = ref.dtype
        where = (self.b, pl.ds(self.f0, W)) if index is None else (self.b, index, pl.ds(self.f0, W))
        if cplx:
            value = complexify(value, self.full(0.0))
            ref[(*where, 0)] = value[0].astype(dt)
            ref[(*where, 1)] = value[1].astype(dt)
        else:
            ref[where] = value[0].astype(dt)

    # -- the walk
    def walk(self, lo, n, state, carry_gate, write, prod=None):
        """Walk steps [lo, lo + n) (n dynamic), K steps at a time with the next block's loads
        issued before this block's arithmetic. Returns (state, gate), or with ``prod`` (a
        running product of multipliers, e.g. the unit gate) (state, gate, prod times the
        product of the steps' multipliers): a chunk's summary in the same blocked walk."""
        K, w = self.w.block, self.w

        def advance(p, loaded, state, gate, prod):
            new_state, new_gate = self.step(p, loaded, state, gate, write)
            if prod is not None:    # forward multiplies by the gate it read; backward by conj(gate before)
                prod = mul(conj(gate) if w.backward else new_gate, prod)
            return new_state, new_gate, prod

        def load_block(p0):
            return tuple(self.load_step(jnp.minimum(p0 + k, w.N - 1)) for k in range(K))

        def block(i, carry):
            state, gate, prod, cur = carry
            nxt = load_block(lo + (i + 1) * K)
            for k in range(K):
                state, gate, prod = advance(lo + i * K + k, cur[k], state, gate, prod)
            return state, gate, prod, nxt

        blocks = n // K
        state, carry_gate, prod, _ = jax.lax.fori_loop(0, blocks, block,
                                                       (state, carry_gate, prod, load_block(lo)))

        def single(p, carry):
            return advance(p, self.load_step(p), *carry)
        out = jax.lax.fori_loop(lo + blocks * K, lo + n, single, (state, carry_gate, prod))
        return out if prod is not None else out[:2]

    def chunk(self):
        lo = self.c * span(self.w)
        return lo, jnp.minimum(span(self.w), self.w.N - lo)

    def initial(self):
        """The state before the first walk step: h0 / the cotangent of h_last, or zeros."""
        if not self.w.has_init:
            return self.zero_state()
        v = self.vec(self.r["init"], self.w.complex_init)
        return complexify(v, self.full(0.0)) if self.w.cplx else v

    def gate_before(self, lo):
        """Backward: the multiplier of walk step lo is the conjugate gate of step lo - 1."""
        unit = self.unit_gate()
        if not self.w.backward:
            return unit
        return jax.lax.cond(lo > 0, lambda: self.gate(self.time(jnp.maximum(lo - 1, 0))), lambda: unit)

    def walk_chunk(self, state, write):
        """Walk this CTA's chunk from ``state``; a writing backward walk ends with
        ``first_step_backward`` in the chunk that holds the forward recurrence's first step."""
        lo, n = self.chunk()
        gate = self.gate_before(lo)
        if not (self.w.backward and write):
            return self.walk(lo, n, state, gate, write)[0]
        last_chunk = lo + n == self.w.N
        state, gate = self.walk(lo, n - last_chunk.astype(n.dtype), state, gate, write)

        @pl.when(last_chunk)
        def _():
            self.first_step_backward(state, gate)
        return state

    # -- entry points
    def run_single(self):
        state = self.walk_chunk(self.initial(), write=True)
        if not self.w.backward:
            self.store_vec(self.r["h_last"], state, self.w.cplx)

    def run_summary(self):
        """This chunk reduced to (the product of its multipliers, its last state from zero).
        Summaries are small work against the finishing walk: one step at a time."""
        lo, n = self.chunk()

        def body(p, carry):
            state, prod, gate = carry
            state, new_gate = self.step(p, self.load_step(p), state, gate, False)
            mult = conj(gate) if self.w.backward else new_gate
            return state, mul(mult, prod), new_gate
        state, prod, _ = jax.lax.fori_loop(lo, lo + n, body,
                                           (self.zero_state(), self.unit_gate(), self.gate_before(lo)))
        self.store_summary(prod, state)

    def store_summary(self, prod, state):
        if self.w.gate_mode() == "scalar":      # one gate for the CTA: widen to a row
            prod = (prod[0] + self.full(0.0), None if prod[1] is None else prod[1] + self.full(0.0))
        self.store_vec(self.r["sum_a"], prod, self.w.complex_a, index=self.c)
        self.store_vec(self.r["sum_x"], state, self.w.cplx, index=self.c)

    def carry_in(self):
        """The state entering this chunk: the earlier chunks' summaries folded into the initial state."""
        w = self.w

        def fold(j, state):
            prod = self.vec_at(self.r["sum_a"], j, w.complex_a)
            x = self.vec_at(self.r["sum_x"], j, w.cplx)
            return add(mul(prod, state), x)
        return jax.lax.fori_loop(0, self.c, fold, self.initial())

    def finish(self, state):
        state = self.walk_chunk(state, write=True)
        if not self.w.backward:
            @pl.when(self.c == self.w.chunks - 1)
            def _():
                self.store_vec(self.r["h_last"], state, self.w.cplx)

    def run_finish(self):
        self.finish(self.carry_in())

    def run_onepass(self):
        """Summary, exchange and finishing walk in one kernel. The chunks of one row of W
        features are consecutive CTAs (the chunk is the grid's fastest axis): each writes its
        summary, adds one to its row's counter, waits until every chunk of the row has, folds
        the earlier summaries and walks its chunk again, now from L2 rather than HBM.

        No deadlock, on the condition CUB's single-pass scan also relies on: CTAs start in the
        order of their linear index, and a row's chunks (at most one per multiprocessor,
        ``one_pass_chunks``) fit on the GPU at once, so a waiting row is always complete on
        the GPU. Interpret mode runs the CTAs one after another in grid order, so there every
        earlier summary is written before it is read and the counter is left out (Pallas's
        interpreter has no semaphores)."""
        w = self.w
        lo, n = self.chunk()
        state, _, prod = self.walk(lo, n, self.zero_state(), self.gate_before(lo), False,
                                   prod=self.unit_gate())
        self.store_summary(prod, state)
        if not w.interpret:
            rows = w.width // W
            counters = pl.get_global(plgpu.SemaphoreType.REGULAR((w.B * rows,)))
            row = counters.at[self.b * rows + self.f0 // W]
            plgpu.semaphore_signal(row, 1, memory_scope="gpu")
            plgpu.semaphore_wait(row, w.chunks, decrement=False, memory_scope="gpu")
        self.finish(self.carry_in())


def stages(key: WalkKey) -> tuple[str, ...]:
    """The kernels a walk runs, in order: "single" (one chunk), "onepass" (chunks exchanging
    their summaries through counters in one kernel), or "summary" then "finish"."""
    if key.chunks == 1:
        return ("single",)
    return ("onepass",) if key.one_pass else ("summary", "finish")


def build(body_cls, key: WalkKey, stage: str, in_names, out_types: dict):
    """The ``plgpu.kernel`` of one stage over grid (width / W, B, C) (one pass: (C, width / W,
    B), a row's chunks consecutive), its refs named in_names + out_types, each CTA running
    ``body_cls(key, refs).run_<stage>()``."""
    if stage not in stages(key) and not (stage in ("summary", "finish") and key.chunks > 1):
        raise ValueError(f"stage {stage!r} does not fit a walk of {key.chunks} chunks "
                         f"({'one pass' if key.one_pass else 'two passes'})")
    if key.B == 0:
        raise ValueError("a walk kernel needs a batch of at least one row, got B=0")
    names = (*in_names, *out_types)

    def body(*refs):
        getattr(body_cls(key, dict(zip(names, refs))), f"run_{stage}")()
    kw = {"interpret": mosaic_interpret_params()} if key.interpret else {}
    if stage == "onepass":
        grid, grid_names = (key.chunks, key.width // W, key.B), ("c", "d", "b")
    else:
        grid, grid_names = (key.width // W, key.B, key.chunks if stage != "single" else 1), ("d", "b", "c")
    return plgpu.kernel(body, out_type=tuple(out_types.values()), grid=grid, grid_names=grid_names, **kw)


def pairs(shape, cplx):
    """A tensor's shape with complex values as trailing (re, im) pairs."""
    return (*shape, 2) if cplx else tuple(shape)
