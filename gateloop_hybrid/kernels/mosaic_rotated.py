"""Mosaic GPU kernels for wide GateLoop heads: scalar-decay linear attention on rotated keys.

Pure JAX. The maths and its torch reference are in ``gateloop_hybrid/rotated.py``; these kernels
compute the same thing in the *global frame*, where no state ever has to be turned:

    q'_t = [q_t cos T_t, -q_t sin T_t],  k'_t likewise           (width 2d; T = cumsum phase)
    y_t  = sum_{s<=t} exp(L_t - L_s) (q'_t . k'_s) v_s
    S_j  = exp(L_C) S_{j-1} + sum_s exp(L_C - L_s) k'_s v_s^T     (state at the end of chunk j)

S is the real (2d, e) state [Re(e^{-iT} h); Im(e^{-iT} h)], held on chip as its two (d, e)
halves Sc and Ss. The caller gives T reduced mod 2 pi in float64 (then float32 keeps its
precision at any length) and L relative to each chunk's start (then no decay over- or
underflows inside a chunk). Every product is a bf16/f16 matmul with float32 accumulation.

One CTA (one warpgroup) walks the chunks of one (batch row, head, block of BV value columns,
segment of time), keeping its state in registers: no per-chunk state reaches HBM. The value
columns of a head are independent, so splitting them multiplies the CTAs at the price of
recomputing the (C, C) scores. Where batch x heads x column blocks leave multiprocessors idle,
time is cut into S segments walked side by side: a summary walk gives each segment's own state
(from zero), the caller chains those (a scalar decay per segment: a few (2d, d) updates in
torch) into each segment's true start, and the full walk then starts from it. With S = 1 the
inputs are read once.

Kernels, all walks over chunks of C = 64 steps (the caller pads N to a multiple of C S with
k = v = 0, log|a| = 0 and phase 0, which leaves the state as it is):

- ``summary``: each segment's own state at its end (k, v and the gates only); reversed
  (``summary_back``), each segment's own cotangent at its start (q, dy and the gates only).
- ``forward``: y, and the state at each segment's end (the last is S_N).
- ``backward_q``: a forward walk that rebuilds S_{j-1} and gives dq' per position, returned as
  dq and the parts of dL and dT that come through q.
- ``backward_kv``: a backward walk carrying dS, giving dk, dv, the parts of dL and dT that come
  through k, and the cotangent at each segment's start (the first is dh0's).

The position gradients follow from q'_t = R(T_t) q_t and the scaling q~ = e^{L} q', k~ = e^{-L} k':

    dL_t = q'_t . dq'_t - k'_t . dk'_t,
    dT_t = dq'_t . (dT q'_t) + dk'_t . (dT k'_t),   dT [xc, xs] = [xs, -xc]

and the caller turns them into the gradients of log|a| and of the phase by reversed cumulative
sums. In those sums a pair (t, s) adds its term at t and takes it away at s, so both kernels
form a chunk's own pairs' part from the same float32 tiles (dP times the scores q'_t . k'_s and
the sines dT q'_t . k'_s, row sums), and the carried part from the rounded operands the state
products used: then the terms cancel to float32 rounding, not to bf16's. Each kernel returns
its value-column block's share of the q- and k-side gradients (those sum over value columns);
the caller adds the shares. Where one block holds all the value columns (d = 64), the share is
the gradient and comes out in the inputs' dtype.

Interpret mode (``interpret=True``) runs the same kernels on the CPU. Pallas's Mosaic GPU
interpreter has no register layouts and no transposed wgmma operands, so the few operations that
need them go through ``_Tile``, which takes the plain-JAX form there: the walk, the indexing, the
masks, the pipelines and the arithmetic are the kernels' own.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from .._private import mosaic_interpret_params
from .walk import as_key

# Lane semantics: the kernels are lowered with the layouts their code gives the register arrays.
# JAX 0.11 made Warpgroup semantics (layouts found by inference) the default, and on an H100 with
# jax 0.11.2 that inference found no solution for the forward walk; jax 0.10 defaults to Lane.
SEMANTICS = plgpu.LoweringSemantics.Lane
C = 64                      # chunk length: the M of one wgmma
F32 = jnp.float32
WIDTHS = (64, 128)          # head widths d the kernels take (d a multiple of the 64-wide tiles)
# RotatedKey.grouped for the launches ops/rotated.py makes: issue each chunk's independent
# products together. Off until timed on a GPU against one-by-one (benchmarks/lab/rotated_kernels.py).
GROUPED = False
# RotatedKey.stages likewise: with 1, the forward walk's shared memory (118 KB at d = 64) drops
# below half a multiprocessor's, so that two CTAs can share one and hide each other's latency.
STAGES = 2


@dataclasses.dataclass(frozen=True)
class RotatedKey:
    """Everything static about one launch; the compile key (with the dtype)."""
    B: int
    N: int                  # a multiple of C * segments
    H: int
    d: int
    block_v: int            # BV: value columns per CTA
    has_state: bool         # a state comes in: the starts (forward, backward_q) or ends (backward_kv)
    dtype: str              # "bfloat16" or "float16"
    segments: int = 1       # stretches of time walked side by side, each by its own CTAs
    grouped: bool = False   # independent products of a chunk issued together, awaited once
    stages: int = 2         # chunks in flight, in (inputs) and out (outputs); 1 halves that memory
    interpret: bool = False

    @property
    def chunks(self) -> int:
        return self.N // C

    @property
    def per_segment(self) -> int:
        return self.chunks // self.segments

    @property
    def col_blocks(self) -> int:
        return self.d // self.block_v

    @property
    def jdtype(self):
        return jnp.dtype(self.dtype)


def supported(N: int, d: int, dtype) -> str | None:
    """None if the kernels take this shape and dtype, else why not."""
    if d not in WIDTHS:
        return f"head width {d} (the wide-head kernels take d in {WIDTHS})"
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"dtype {jnp.dtype(dtype)} (the wide-head kernels take bfloat16 and float16)"
    if N < 1:
        return "an empty sequence"
    return None


def choose_block_v(d: int) -> int:
    """BV: 64 value columns per CTA, or 32 where d = 128 (the two (d, BV) float32 state halves
    then fit the warpgroup's registers)."""
    return 64 if d <= 64 else 32


def choose_segments(B: int, H: int, col_blocks: int, chunks: int, num_sms: int = 132, per_sm: int = 1) -> int:
    """Segments of time for about ``per_sm`` CTAs per multiprocessor (with two stages a CTA takes
    most of one's shared memory; with one, two fit at d = 64): the largest divisor of ``chunks``
    at most per_sm num_sms / (B H col_blocks). Each segment beyond the first costs a summary walk
    over its keys and values (queries and dy backward)."""
    want = max(1, per_sm * num_sms // max(1, B * H * col_blocks))
    return max(s for s in range(1, min(want, chunks) + 1) if chunks % s == 0)


def _transforms(cols: int, itemsize: int):
    """SMEM tiling and swizzle for a (rows, cols) tile, the widest swizzle its rows allow."""
    swizzle = min(128, cols * itemsize)
    return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


def _operand(key: RotatedKey):
    """The transforms of every 16-bit tile a wgmma reads: one swizzle for all of them, since
    both operands of a wgmma must share it, set by the narrowest (the BV value columns)."""
    return _transforms(key.block_v, key.jdtype.itemsize)


class _Tile:
    """The operations whose Mosaic GPU form needs register layouts or transposed operands, with
    their plain-JAX form for the interpreter. ``grouped``: ``mms`` issues its products together."""

    def __init__(self, interpret: bool, grouped: bool = False):
        self.interpret, self.grouped = interpret, grouped

    def load(self, ref):
        """A 2-D tile in the WGMMA layout."""
        if self.interpret:
            return ref[...]
        return plgpu.load(ref, (), layout=plgpu.Layout.WGMMA)

    def rows(self, ref):
        """A vector indexed by a tile's rows, ready to broadcast along its columns."""
        if self.interpret:
            return ref[...]
        return plgpu.load(ref, (), layout=plgpu.Layout.WGMMA.reduce(1))

    def cols(self, ref):
        """A vector indexed by a tile's columns, ready to broadcast along its rows."""
        if self.interpret:
            return ref[...]
        return plgpu.load(ref, (), layout=plgpu.Layout.WGMMA.reduce(0))

    def zeros(self, shape):
        z = jnp.zeros(shape, F32)
        return z if self.interpret else plgpu.layout_cast(z, plgpu.Layout.WGMMA)

    def iota(self, shape, dim):
        if self.interpret:
            return lax.broadcasted_iota(jnp.int32, shape, dim)
        return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)

    def mm(self, acc, *terms):
        """acc + sum of a @ b over terms (a_ref, b_ref, transpose_a, transpose_b), float32.
        ``acc`` is a float32 array (or None for zeros) of the product's shape."""
        if self.interpret:
            total = acc
            for a, b, ta, tb in terms:
                av, bv = a[...], b[...]
                prod = jnp.dot(av.T if ta else av, bv.T if tb else bv, preferred_element_type=F32)
                total = prod if total is None else total + prod
            return total
        return self._issue([(acc, *terms)])[0]

    def mms(self, *products):
        """Independent products, each (acc, *terms) as ``mm`` takes them, as a list. Grouped, their
        wgmmas are issued back to back and awaited once (each wait is a round trip to the tensor
        cores, and a chunk's walk is a chain of them); else each is awaited in turn (fewer
        accumulators live at once)."""
        if self.interpret or not self.grouped:
            return [self.mm(acc, *terms) for acc, *terms in products]
        return self._issue(products)

    def _issue(self, products):
        inits = []
        for acc, *terms in products:
            a0, b0, ta0, tb0 = terms[0]
            m = a0.shape[1] if ta0 else a0.shape[0]
            n = b0.shape[0] if tb0 else b0.shape[1]
            inits.append(self.zeros((m, n)) if acc is None else acc)

        def issue(acc_refs):
            for acc_ref, (_, *terms) in zip(acc_refs, products):
                for a, b, ta, tb in terms:
                    plgpu.wgmma(acc_ref, plgpu.transpose_ref(a, (1, 0)) if ta else a,
                                plgpu.transpose_ref(b, (1, 0)) if tb else b)
        return list(pl.run_state(issue)(tuple(plgpu.ACC.init(i) for i in inits)))

    def fence(self):
        """Register stores to SMEM become visible to the tensor cores."""
        plgpu.commit_smem()


def _bcast_rows(vec, shape):
    return lax.broadcast_in_dim(vec, shape, [0])


def _bcast_cols(vec, shape):
    return lax.broadcast_in_dim(vec, shape, [1])


class _Place:
    """Where one CTA walks: its batch row b, head h, block of value columns and segment of time,
    and the views of each input and output that it reads and writes."""

    def __init__(self, key: RotatedKey):
        self.key = key
        S, n = key.segments, key.per_segment
        bs = lax.axis_index("bs")
        self.b, self.s = lax.div(bs, S), lax.rem(bs, S)
        self.h, self.cb = lax.axis_index("h"), lax.axis_index("cb")
        self.cols = pl.ds(self.cb * key.block_v, key.block_v)
        self.rows = pl.ds(self.s * n * C, n * C)
        self.chunk_rows = pl.ds(self.s * n, n)

    def head(self, part):
        """This CTA's head in a (B, N, H, d) array (part None), or in part 0, 1 or 2 (q, k or v)
        of the (B, N, 3 H, d) qkv array."""
        return self.h if part is None else part * self.key.H + self.h

    def x(self, ref, part=None):         # (B, N, H or 3 H, d) -> this segment's (n C, d)
        return ref.at[self.b, self.rows, self.head(part), :]

    def xv(self, ref, part=None):        # likewise, (n C, BV) of this CTA's columns
        return ref.at[self.b, self.rows, self.head(part), self.cols]

    def pos(self, ref):          # (B, H, N) -> (n C,)
        return ref.at[self.b, self.h, self.rows]

    def table(self, ref):        # (B, H, chunks, d) -> (n, d)
        return ref.at[self.b, self.h, self.chunk_rows]

    def state(self, ref):        # (B, H, S, 2, d, d) -> (2, d, d)
        return ref.at[self.b, self.h, self.s]

    def shares(self, ref):       # (CB, B, N, H, d) -> (n C, d)
        return ref.at[self.cb, self.b, self.rows, self.h]

    def vec_shares(self, ref):   # (CB, B, H, N) -> (n C,)
        return ref.at[self.cb, self.b, self.h, self.rows]


def _kernel(body, key: RotatedKey, out_type, scratch):
    """The plgpu.kernel over grid (H, CB, B S) running ``body(place, *refs, scratch refs)``."""
    kw = {"interpret": mosaic_interpret_params()} if key.interpret else {}

    def entry(*refs):
        pl.run_scoped(lambda *s: body(_Place(key), *refs, s), *scratch)
    return plgpu.kernel(entry, out_type=out_type, grid=(key.H, key.col_blocks, key.B * key.segments),
                        grid_names=("h", "cb", "bs"),
                        compiler_params=plgpu.CompilerParams(lowering_semantics=SEMANTICS), **kw)


def _specs(key: RotatedKey, reverse: bool, *kinds):
    """BlockSpecs of the walked inputs (a segment's views), one per kind: "qk" a (C, d) tile,
    "v" a (C, BV) tile, "pos" a (C,) vector, "chunk" a (1, d) row of a per-chunk table."""
    last = key.per_segment - 1
    at = (lambda j: last - j) if reverse else (lambda j: j)
    tr = _operand(key)
    shapes = {"qk": ((C, key.d), tr), "v": ((C, key.block_v), tr), "pos": ((C,), ()), "chunk": ((1, key.d), ())}
    out = []
    for kind in kinds:
        shape, transforms = shapes[kind]
        index = (lambda j: (at(j), 0)) if len(shape) == 2 else (lambda j: (at(j),))
        out.append(plgpu.BlockSpec(shape, index, transforms=transforms) if transforms
                   else plgpu.BlockSpec(shape, index))
    return out


def _walk(key: RotatedKey, step, init, reverse, kinds, views):
    """Walk this CTA's chunks (backward from the last with ``reverse``), two in flight."""
    return plgpu.emit_pipeline(step, grid=(key.per_segment,), in_specs=_specs(key, reverse, *kinds),
                               max_concurrent_steps=key.stages, init_carry=init)(*views)


def _rotate(t: _Tile, x, cos, sin, xc_ref, xs_ref, dtype, scale=None):
    """Store [x cos T, -x sin T] (each row times ``scale`` if given) into two SMEM tiles."""
    shape = x.shape
    c, s = _bcast_rows(cos, shape), _bcast_rows(sin, shape)
    if scale is not None:
        w = _bcast_rows(scale, shape)
        c, s = c * w, s * w
    xc_ref[...] = (x * c).astype(dtype)
    xs_ref[...] = (-(x * s)).astype(dtype)


def _causal_decay(t: _Tile, L_rows, L_cols, transposed: bool = False):
    """exp(L_t - L_s) on s < t, and where it is 0: a (C, C) tile indexed (t, s), or (s, t)
    when ``transposed``. Selected, never multiplied: the masked entries are exactly 0.

    The diagonal s = t is left out: its weight is exactly 1 and (q'_t . k'_t) = (q_t . k_t),
    so the kernels add (q_t . k_t) v_t unturned (``_diagonal``). Through the turned products its
    gradients in L_t and T_t would cancel only to bf16 rounding, and as the largest term it
    would swamp the small true gradients of strongly decaying gates."""
    shape = (C, C)
    r, c = t.iota(shape, 0), t.iota(shape, 1)
    if transposed:                 # rows s, columns t
        keep = c > r
        diff = _bcast_cols(L_cols, shape) - _bcast_rows(L_rows, shape)
    else:                          # rows t, columns s
        keep = r > c
        diff = _bcast_rows(L_rows, shape) - _bcast_cols(L_cols, shape)
    return keep, jnp.exp(jnp.where(keep, diff, -jnp.inf))


def _turn_in_place(t: _Tile, L_t, T_t, qc, kc, qs, ks, dtype):
    """The chunk's gate sums as row and column vectors, and q and k turned in place: their
    pipeline slots then hold qc and kc, and qs, ks the sine halves. Returns (Lr, Lc, cos, sin,
    q, k), q and k as loaded (float32)."""
    Lr, Lc = t.rows(L_t), t.cols(L_t)
    Tr = t.rows(T_t)
    cos, sin = jnp.cos(Tr), jnp.sin(Tr)
    qf, kf = t.load(qc).astype(F32), t.load(kc).astype(F32)
    _rotate(t, qf, cos, sin, qc, qs, dtype)
    _rotate(t, kf, cos, sin, kc, ks, dtype)
    return Lr, Lc, cos, sin, qf, kf


def _rowdot(x, y):
    """Row-wise dot products of two float32 tiles, as a row vector."""
    return jnp.sum(x * y, axis=1)


def _stage(d: int, BV: int):
    """SMEM for a state's way in or out, scoped to that moment (the walk reuses the space)."""
    return plgpu.SMEM((2, d, BV), F32, transforms=_transforms(BV, 4))


def _zero_state(t: _Tile, key: RotatedKey):
    return t.zeros((key.d, key.block_v)), t.zeros((key.d, key.block_v))


def _state_in(t: _Tile, place: _Place, ref):
    """This CTA's columns of its segment's (2, d, d) float32 state in ``ref`` (B, H, S, 2, d, d),
    as its two halves."""
    d, BV, state = place.key.d, place.key.block_v, place.state(ref)

    def scoped(stage, bar):
        for i in range(2):
            plgpu.copy_gmem_to_smem(state.at[i, :, place.cols], stage.at[i], bar.at[i])
        for i in range(2):
            plgpu.barrier_wait(bar.at[i])
        return t.load(stage.at[0]), t.load(stage.at[1])
    return pl.run_scoped(scoped, _stage(d, BV), plgpu.Barrier(num_barriers=2))


def _store_rows(t: _Tile, value, buf, ref, j):
    """Chunk j's (C, cols) tile of ``ref`` (rows are time) from ``value``, through slot j % S of
    ``buf`` (S = 1 or 2 slots): the copy out of the slot's previous chunk is waited for, this
    one's is left in flight."""
    slots = buf.shape[0]
    slot = lax.rem(j, jnp.asarray(slots, j.dtype))
    plgpu.wait_smem_to_gmem(slots - 1, wait_read_only=True)
    buf[slot] = value
    t.fence()
    plgpu.copy_smem_to_gmem(buf.at[slot], ref.at[pl.ds(j * C, C)])


def _store_vec(t: _Tile, value, buf, which, ref, j):
    """Chunk j's (C,) slice of ``ref`` from a row vector, through slot (j % 2, which) of ``buf``."""
    slot = lax.rem(j, jnp.asarray(2, j.dtype))
    plgpu.wait_smem_to_gmem(1, wait_read_only=True)
    buf[slot, which] = value
    t.fence()
    plgpu.copy_smem_to_gmem(buf.at[slot, which], ref.at[pl.ds(j * C, C)])


def _state_out(t: _Tile, place: _Place, halves, ref):
    d, BV, state = place.key.d, place.key.block_v, place.state(ref)

    def scoped(stage):
        for i, half in enumerate(halves):
            stage[i] = half
        t.fence()
        for i in range(2):
            plgpu.copy_smem_to_gmem(stage.at[i], state.at[i, :, place.cols])
        plgpu.wait_smem_to_gmem(0)
    pl.run_scoped(scoped, _stage(d, BV))


def _scaled(t: _Tile, x_ref, w, out_ref, dtype):
    """out = x with each row times w (a row vector), for a product operand."""
    x = t.load(x_ref).astype(F32)
    out_ref[...] = (x * _bcast_rows(w, x.shape)).astype(dtype)


# ---------------------------------------------------------------------------------------------
# forward
#
# Shapes: qkv (B, N, 3 H, d) in key.dtype, q the heads [0, H), k [H, 2 H) and v [2 H, 3 H) (a
# view of a layer's (B, N, 3 H d) projection, read in place); y, dy (B, N, H, d) in key.dtype.
# L, T, W (B, H, N) float32: log|a| summed from each chunk's start, the phase summed from t = 0
# mod 2 pi, and exp(L_C - L_t), the decay from t to its chunk's end. G (B, H, chunks, d) float32: exp(L_C) of each chunk, repeated d times.
# States (B, H, S, 2, d, d) float32, one [Sc; Ss] per segment of time.


def _forward_walk_scratch(key: RotatedKey):
    """SMEM of a walk forward in time over turned q and k: qs, ks, v weighted to the chunk's end,
    one (C, C) product operand (P or dP), and the state's halves Sc, Ss as product operands."""
    d, BV, dt, tr = key.d, key.block_v, key.jdtype, _operand(key)
    return [plgpu.SMEM((C, d), dt, transforms=tr), plgpu.SMEM((C, d), dt, transforms=tr),
            plgpu.SMEM((C, BV), dt, transforms=tr), plgpu.SMEM((C, C), dt, transforms=tr),
            plgpu.SMEM((d, BV), dt, transforms=tr), plgpu.SMEM((d, BV), dt, transforms=tr)]


def _state_products(t, key, Sc, Ss, xc, xs, yw, G_t):
    """One chunk of a walk's state, S = exp(L_C) S + [xc, xs]^T yw, as the two products that
    give its halves. Forward: x = k turned, yw = v weighted to the chunk's end, S the state at
    the chunk's end. Backward: x = q turned, yw = exp(L_t) dy_t, S the cotangent at the chunk's
    start."""
    g = _bcast_rows(t.rows(G_t.at[0]), (key.d, key.block_v))
    return (Sc * g, (xc, yw, True, False)), (Ss * g, (xs, yw, True, False))


def _state_step(t, key, Sc, Ss, xc, xs, yw, G_t):
    return tuple(t.mms(*_state_products(t, key, Sc, Ss, xc, xs, yw, G_t)))


def forward(key: RotatedKey):
    """(qkv, L, T, W, G[, starts]) -> (y, ends): each segment walked from its start state
    (zero without ``key.has_state``), giving y and the state at the segment's end."""
    d, BV, dt = key.d, key.block_v, key.jdtype
    t, tr = _Tile(key.interpret, key.grouped), _operand(key)

    def body(place, *refs):
        ins, (y, ends, scratch) = refs[:-3], refs[-3:]
        qkv, L, T, W, G, *starts = ins
        qs, ks, vw, p, sc, ss, y_buf = scratch
        init = _state_in(t, place, starts[0]) if starts else _zero_state(t, key)
        y_rows = place.xv(y)

        def step(idx, qc, kc, v_t, L_t, T_t, W_t, G_t, carry):
            Sc, Ss = carry
            Lr, Lc, cos, sin, qf, kf = _turn_in_place(t, L_t, T_t, qc, kc, qs, ks, dt)
            diagonal = _rowdot(qf, kf)
            _scaled(t, v_t, t.rows(W_t), vw, dt)
            sc[...] = Sc.astype(dt)
            ss[...] = Ss.astype(dt)
            t.fence()
            # inside the chunk: (q' k'^T) weighted by exp(L_t - L_s) on s < t, and (q_t . k_t) v_t;
            # the carried state: exp(L_t) q'_t . S_{j-1}
            scores, carried = t.mms((None, (qc, kc, False, True), (qs, ks, False, True)),
                                    (None, (qc, sc, False, False), (qs, ss, False, False)))
            keep, decay = _causal_decay(t, Lr, Lc)
            p[...] = jnp.where(keep, scores * decay, 0.0).astype(dt)
            t.fence()
            # y, and the state at the chunk's end (kc, ks and vw are in place since the first fence)
            out, Sc, Ss = t.mms((carried * _bcast_rows(jnp.exp(Lr), (C, BV)), (p, v_t, False, False)),
                                *_state_products(t, key, Sc, Ss, kc, ks, vw, G_t))
            out = out + _bcast_rows(diagonal, (C, BV)) * t.load(v_t).astype(F32)
            _store_rows(t, out.astype(dt), y_buf, y_rows, idx[0])
            return Sc, Ss

        Sc, Ss = _walk(key, step, init, False, ("qk", "qk", "v", "pos", "pos", "pos", "chunk"),
                       (place.x(qkv, 0), place.x(qkv, 1), place.xv(qkv, 2), place.pos(L), place.pos(T),
                        place.pos(W), place.table(G)))
        _state_out(t, place, (Sc, Ss), ends)

    scratch = [*_forward_walk_scratch(key), plgpu.SMEM((key.stages, C, BV), dt, transforms=tr)]   # y on its way out
    out_type = (jax.ShapeDtypeStruct((key.B, key.N, key.H, d), dt), _states(key))
    return _kernel(body, key, out_type, scratch)


def summary(key: RotatedKey, reverse: bool = False):
    """(qkv, T, W, G) -> own, or with ``reverse`` (qkv, dy, T, exp(L), G) -> own: each segment's
    own state from a zero start, walking its chunks forward (x = k, y = v, w = W: the state at the
    segment's end from its keys and values only) or backward (x = q, y = dy, w = exp(L): the
    cotangent at the segment's start from its queries and dy only). The caller chains the
    segments: start_{s+1} = D_s start_s + own_s forward, end_{s-1} = D_s end_s + own_s backward,
    D_s the segment's decay."""
    d, BV, dt = key.d, key.block_v, key.jdtype
    t, tr = _Tile(key.interpret, key.grouped), _operand(key)

    def body(place, *refs):
        if reverse:
            qkv, dy, T, w, G, own, scratch = refs
            x, y = place.x(qkv, 0), place.xv(dy)
        else:
            qkv, T, w, G, own, scratch = refs
            x, y = place.x(qkv, 1), place.xv(qkv, 2)
        xs, yw = scratch

        def step(idx, xc, y_t, T_t, w_t, G_t, carry):
            Tr = t.rows(T_t)
            _rotate(t, t.load(xc).astype(F32), jnp.cos(Tr), jnp.sin(Tr), xc, xs, dt)   # x turned in place
            _scaled(t, y_t, t.rows(w_t), yw, dt)
            t.fence()
            return _state_step(t, key, *carry, xc, xs, yw, G_t)

        state = _walk(key, step, _zero_state(t, key), reverse, ("qk", "v", "pos", "pos", "chunk"),
                      (x, y, place.pos(T), place.pos(w), place.table(G)))
        _state_out(t, place, state, own)

    scratch = [plgpu.SMEM((C, d), dt, transforms=tr), plgpu.SMEM((C, BV), dt, transforms=tr)]
    return _kernel(body, key, _states(key), scratch)


def _states(key: RotatedKey):
    return jax.ShapeDtypeStruct((key.B, key.H, key.segments, 2, key.d, key.d), F32)


# ---------------------------------------------------------------------------------------------
# backward


def _unturn(cos, sin, dxc, dxs):
    """dx from dx' = [dxc, dxs] (float32 (C, d)), x' = [x cos T, -x sin T]."""
    shape = dxc.shape
    return _bcast_rows(cos, shape) * dxc - _bcast_rows(sin, shape) * dxs


def _dot_turn(t: _Tile, xc_ref, xs_ref, dxc, dxs):
    """x' . dx' and dx' . (dT x') as (C,) row vectors, from dx' = [dxc, dxs] (float32) and x' as
    the product operands hold it (16-bit, in SMEM): the state products that meet these terms in
    the reversed sums were formed from those same rounded values."""
    xc, xs = t.load(xc_ref).astype(F32), t.load(xs_ref).astype(F32)
    return jnp.sum(xc * dxc + xs * dxs, axis=1), jnp.sum(dxc * xs - dxs * xc, axis=1)


def _pair_sums(dpf, scores, sines):
    """The chunk's own pairs' share of the position gradients, as row sums of float32 tiles:
    sum_s dP_ts (q'_t . k'_s) and sum_s dP_ts (dT q'_t . k'_s) (rows t), or their k-side
    counterparts (rows s). Both kernels form them from the same float32 dP, scores and sines, so
    that a pair's terms at t and at s cancel to float32 rounding in the reversed sums, rather than
    to the rounding of 16-bit product operands (which made dz about 5x less precise)."""
    return jnp.sum(dpf * scores, axis=1), jnp.sum(dpf * sines, axis=1)


def backward_q(key: RotatedKey):
    """(qkv, dy, L, T, W, G[, starts]) -> (dq, dL_q, dT_q): a forward walk that rebuilds each
    chunk's starting state and gives the q side of the gradients. Outputs are this column
    block's shares: dq (CB, B, N, H, d) in ``_share_dtype``, dL_q and dT_q (CB, B, H, N) float32,
    with dL_q = q' . dq' and dT_q = dq' . (dT q')."""
    d, dt, sd = key.d, key.jdtype, _share_dtype(key)
    t = _Tile(key.interpret, key.grouped)

    def body(place, *refs):
        ins, (dq, dL, dT, scratch) = refs[:-4], refs[-4:]
        qkv, dy, L, T, W, G, *starts = ins
        qs, ks, vw, dp, sc, ss, dq_buf, vec_buf = scratch
        init = _state_in(t, place, starts[0]) if starts else _zero_state(t, key)
        dq_rows, dL_row, dT_row = place.shares(dq), place.vec_shares(dL), place.vec_shares(dT)

        def step(idx, qc, kc, v_t, dy_t, L_t, T_t, W_t, G_t, carry):
            Sc, Ss = carry            # q and k are turned in place: their slots then hold qc, kc
            j = idx[0]
            Lr, Lc, cos, sin, qf, kf = _turn_in_place(t, L_t, T_t, qc, kc, qs, ks, dt)
            _scaled(t, v_t, t.rows(W_t), vw, dt)
            sc[...] = Sc.astype(dt)
            ss[...] = Ss.astype(dt)
            t.fence()
            # dP = (dy v^T) weighted by exp(L_t - L_s) on s < t; the scores q'_t . k'_s and the
            # sines dT q'_t . k'_s of the same pairs for the position gradients
            dscores, scores = t.mms((None, (dy_t, v_t, False, True)),
                                    (None, (qc, kc, False, True), (qs, ks, False, True)))
            keep, decay = _causal_decay(t, Lr, Lc)
            dpf = jnp.where(keep, dscores * decay, 0.0)
            dp[...] = dpf.astype(dt)
            sines_a, sines_b = t.mms((None, (qs, kc, False, True)), (None, (qc, ks, False, True)))
            own_dot, own_turn = _pair_sums(dpf, scores, sines_a - sines_b)
            t.fence()
            # dq' = exp(L_t) dy S_{j-1}^T (carried) + dP k' (the chunk's own pairs)
            e = _bcast_rows(jnp.exp(Lr), (C, d))
            cqc, cqs = t.mms((None, (dy_t, sc, False, True)), (None, (dy_t, ss, False, True)))
            cqc, cqs = cqc * e, cqs * e
            dot, turn = _dot_turn(t, qc, qs, cqc, cqs)
            dq_t = _unturn(cos, sin, *t.mms((cqc, (dp, kc, False, False)), (cqs, (dp, ks, False, False))))
            # the diagonal (q_t . k_t) v_t: dq_t += (dy_t . v_t) k_t, nothing in L or T
            dyv = _rowdot(t.load(dy_t).astype(F32), t.load(v_t).astype(F32))
            dq_t = dq_t + _bcast_rows(dyv, (C, d)) * kf
            _store_rows(t, dq_t.astype(sd), dq_buf, dq_rows, j)
            _store_vec(t, dot + own_dot, vec_buf, 0, dL_row, j)
            _store_vec(t, turn + own_turn, vec_buf, 1, dT_row, j)
            return _state_step(t, key, Sc, Ss, kc, ks, vw, G_t)

        _walk(key, step, init, False, ("qk", "qk", "v", "v", "pos", "pos", "pos", "chunk"),
              (place.x(qkv, 0), place.x(qkv, 1), place.xv(qkv, 2), place.xv(dy), place.pos(L), place.pos(T),
               place.pos(W), place.table(G)))
        plgpu.wait_smem_to_gmem(0)

    scratch = [
        *_forward_walk_scratch(key),                  # the (C, C) tile holds dP
        plgpu.SMEM((key.stages, C, d), sd, transforms=_transforms(d, sd.itemsize)),   # dq on its way out
        plgpu.SMEM((2, 2, C), F32),                   # dL_q and dT_q, likewise
    ]
    return _kernel(body, key, _shares(key), scratch)


def _share_dtype(key: RotatedKey):
    """dq's and dk's dtype out of the kernels: key.dtype where one column block holds every value
    column (the share is the gradient: no float32 copy to round later), else float32 shares for
    the caller to sum."""
    return key.jdtype if key.col_blocks == 1 else jnp.dtype(F32)


def _shares(key: RotatedKey):
    CB = key.col_blocks
    return (jax.ShapeDtypeStruct((CB, key.B, key.N, key.H, key.d), _share_dtype(key)),
            jax.ShapeDtypeStruct((CB, key.B, key.H, key.N), F32),
            jax.ShapeDtypeStruct((CB, key.B, key.H, key.N), F32))


def backward_kv(key: RotatedKey):
    """(qkv, dy, L, T, W, G[, ends]) -> (dk, dv, dL_k, dT_k, dstarts): a backward walk
    carrying the cotangent dS of the state at each chunk's end, from the cotangent at the
    segment's end (``ends``; zero without ``key.has_state``). Outputs: this column block's shares
    dk (CB, B, N, H, d) in ``_share_dtype`` and dL_k = -k' . dk', dT_k = dk' . (dT k')
    (CB, B, H, N) float32; dv (B, N, H, d) whole, in key.dtype; and the cotangent at each
    segment's start (a state)."""
    d, BV, dt, sd = key.d, key.block_v, key.jdtype, _share_dtype(key)
    t, tr = _Tile(key.interpret, key.grouped), _operand(key)
    last = key.per_segment - 1

    def body(place, *refs):
        ins, (dk, dv, dL, dT, dstarts, scratch) = refs[:-6], refs[-6:]
        qkv, dy, L, T, W, G, *ends = ins
        qs, ks, dye, pt, dpt, dsc, dss, dk_buf, dv_buf, vec_buf = scratch
        init = _state_in(t, place, ends[0]) if ends else _zero_state(t, key)
        dk_rows, dv_rows = place.shares(dk), place.xv(dv)
        dL_row, dT_row = place.vec_shares(dL), place.vec_shares(dT)

        def step(idx, qc, kc, v_t, dy_t, L_t, T_t, W_t, G_t, carry):
            dSc, dSs = carry
            j = last - idx[0]
            Lr, Lc, cos, sin, qf, kf = _turn_in_place(t, L_t, T_t, qc, kc, qs, ks, dt)
            diagonal = _rowdot(qf, kf)
            _scaled(t, dy_t, jnp.exp(Lr), dye, dt)
            wr = t.rows(W_t)
            dsc[...] = dSc.astype(dt)
            dss[...] = dSs.astype(dt)
            t.fence()
            # P^T and dP^T, indexed (s, t), weighted by exp(L_t - L_s) on t > s
            keep, decay = _causal_decay(t, Lr, Lc, transposed=True)
            scores, dscores = t.mms((None, (kc, qc, False, True), (ks, qs, False, True)),
                                    (None, (v_t, dy_t, False, True)))
            pt[...] = jnp.where(keep, scores * decay, 0.0).astype(dt)
            dptf = jnp.where(keep, dscores * decay, 0.0)
            dpt[...] = dptf.astype(dt)
            # the same pairs' sines, as (s, t): q'_t . dT k'_s = -(dT q'_t . k'_s)
            sines_a, sines_b = t.mms((None, (ks, qc, False, True)), (None, (kc, qs, False, True)))
            own_dot, own_turn = _pair_sums(dptf, scores, sines_a - sines_b)
            t.fence()
            # the carried parts: exp(L_C - L_s) k' dS_j of dv, and exp(L_C - L_s) v dS_j^T of dk'
            carried, ckc, cks = t.mms((None, (kc, dsc, False, False), (ks, dss, False, False)),
                                      (None, (v_t, dsc, False, True)), (None, (v_t, dss, False, True)))
            w = _bcast_rows(wr, (C, d))
            ckc, cks = ckc * w, cks * w
            dot, turn = _dot_turn(t, kc, ks, ckc, cks)
            # dv = P^T dy + carried, dk' = dP^T q' + carried
            dv_t, dkc, dks = t.mms((carried * _bcast_rows(wr, (C, BV)), (pt, dy_t, False, False)),
                                   (ckc, (dpt, qc, False, False)), (cks, (dpt, qs, False, False)))
            # the diagonal (q_t . k_t) v_t: dv_t += (q_t . k_t) dy_t, dk_t += (dy_t . v_t) q_t
            dyf = t.load(dy_t).astype(F32)
            dv_t = (dv_t + _bcast_rows(diagonal, (C, BV)) * dyf).astype(dt)
            _store_rows(t, dv_t, dv_buf, dv_rows, j)
            dk_t = _unturn(cos, sin, dkc, dks)
            dk_t = dk_t + _bcast_rows(_rowdot(dyf, t.load(v_t).astype(F32)), (C, d)) * qf
            _store_rows(t, dk_t.astype(sd), dk_buf, dk_rows, j)
            _store_vec(t, -(dot + own_dot), vec_buf, 0, dL_row, j)
            _store_vec(t, turn + own_turn, vec_buf, 1, dT_row, j)
            return _state_step(t, key, dSc, dSs, qc, qs, dye, G_t)

        state = _walk(key, step, init, True, ("qk", "qk", "v", "v", "pos", "pos", "pos", "chunk"),
                      (place.x(qkv, 0), place.x(qkv, 1), place.xv(qkv, 2), place.xv(dy), place.pos(L),
                       place.pos(T), place.pos(W), place.table(G)))
        plgpu.wait_smem_to_gmem(0)
        _state_out(t, place, state, dstarts)

    scratch = [
        plgpu.SMEM((C, d), dt, transforms=tr),        # qs
        plgpu.SMEM((C, d), dt, transforms=tr),        # ks
        plgpu.SMEM((C, BV), dt, transforms=tr),       # exp(L_t) dy_t
        plgpu.SMEM((C, C), dt, transforms=tr),        # P^T
        plgpu.SMEM((C, C), dt, transforms=tr),        # dP^T
        plgpu.SMEM((d, BV), dt, transforms=tr),       # dSc as a product operand
        plgpu.SMEM((d, BV), dt, transforms=tr),       # dSs
        # dk on its way out (one chunk where d = 128: the walk's SMEM is then full)
        plgpu.SMEM((key.stages if d <= 64 else 1, C, d), sd, transforms=_transforms(d, sd.itemsize)),
        plgpu.SMEM((key.stages, C, BV), dt, transforms=tr),    # dv, likewise
        plgpu.SMEM((2, 2, C), F32),                   # dL_k and dT_k, likewise
    ]
    dk, dL, dT = _shares(key)
    out_type = (dk, jax.ShapeDtypeStruct((key.B, key.N, key.H, d), dt), dL, dT, _states(key))
    return _kernel(body, key, out_type, scratch)


_KERNELS = {"forward": forward, "summary": summary, "backward_q": backward_q, "backward_kv": backward_kv,
            "summary_back": lambda key: summary(key, reverse=True)}


def launch(*arrays, key, kernel: str):
    """Run one of the kernels on ``arrays``. ``key`` may be the tuple of RotatedKey's fields
    (plain values are what torch.compile passes to an opaque op)."""
    return _KERNELS[kernel](as_key(RotatedKey, key))(*arrays)
