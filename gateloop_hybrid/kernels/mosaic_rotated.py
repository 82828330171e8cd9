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

One CTA (one warpgroup) walks the chunks of one (batch row, head, block of BV value columns),
keeping its state in registers: no per-chunk state reaches HBM. The value columns of a head are
independent, so splitting them multiplies the CTAs at the price of recomputing the (C, C) scores.

Kernels, all walks over chunks of C = 64 steps (the caller pads N to a multiple of C with
k = v = 0, log|a| = 0 and phase 0, which leaves the state as it is):

- ``forward``: y, and the final state S_N.
- ``backward_q``: a forward walk that rebuilds S_{j-1} and gives dq' per position, returned as
  dq and the parts of dL and dT that come through q.
- ``backward_kv``: a backward walk carrying dS, giving dk, dv and the parts of dL and dT that
  come through k, and dS_0 (the cotangent of the initial state).

The position gradients follow from q'_t = R(T_t) q_t and the scaling q~ = e^{L} q', k~ = e^{-L} k':

    dL_t = q'_t . dq'_t - k'_t . dk'_t,
    dT_t = dq'_t . (dT q'_t) + dk'_t . (dT k'_t),   dT [xc, xs] = [xs, -xc]

and the caller turns them into the gradients of log|a| and of the phase by reversed cumulative
sums. Each kernel returns its value-column block's share of the q- and k-side gradients (those
sum over value columns); the caller adds the shares.

Interpret mode (``interpret=True``) runs the same kernels on the CPU. Pallas's Mosaic GPU
interpreter has no register layouts and no transposed wgmma operands, so the few operations that
need them go through ``_Tile``, which takes the plain-JAX form there: the walk, the indexing, the
masks, the pipelines and the arithmetic are the kernels' own.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from .._private import mosaic_interpret_params

C = 64                      # chunk length: the M of one wgmma
F32 = jnp.float32
WIDTHS = (64, 128)          # head widths d the kernels take (d a multiple of the 64-wide tiles)


@dataclasses.dataclass(frozen=True)
class RotatedKey:
    """Everything static about one launch; the compile key (with the dtype)."""
    B: int
    N: int                  # a multiple of C
    H: int
    d: int
    block_v: int            # BV: value columns per CTA
    has_h0: bool            # forward and backward_q: an initial state; backward_kv: dS_N
    dtype: str              # "bfloat16" or "float16"
    interpret: bool = False

    @property
    def chunks(self) -> int:
        return self.N // C

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


def choose_block_v(B: int, H: int, d: int, num_sms: int = 132) -> int:
    """BV: 64 value columns per CTA, or 32 where d = 128 (the two (d, BV) float32 state halves
    then fit the warpgroup's registers) or where B * H CTAs would leave most SMs idle."""
    if d == 128 or B * H * (d // 64) < num_sms // 2:
        return 32
    return 64


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
    their plain-JAX form for the interpreter."""

    def __init__(self, interpret: bool):
        self.interpret = interpret

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
        a0, b0, ta0, tb0 = terms[0]
        m = a0.shape[1] if ta0 else a0.shape[0]
        n = b0.shape[0] if tb0 else b0.shape[1]
        init = self.zeros((m, n)) if acc is None else acc

        def issue(acc_ref):
            for a, b, ta, tb in terms:
                plgpu.wgmma(acc_ref, plgpu.transpose_ref(a, (1, 0)) if ta else a,
                            plgpu.transpose_ref(b, (1, 0)) if tb else b)
        return pl.run_state(issue)(plgpu.ACC.init(init))

    def fence(self):
        """Register stores to SMEM become visible to the tensor cores."""
        plgpu.commit_smem()


def _bcast_rows(vec, shape):
    return lax.broadcast_in_dim(vec, shape, [0])


def _bcast_cols(vec, shape):
    return lax.broadcast_in_dim(vec, shape, [1])


def _kernel(body, key: RotatedKey, out_type):
    kw = {"interpret": mosaic_interpret_params()} if key.interpret else {}
    return plgpu.kernel(body, out_type=out_type, grid=(key.H, key.col_blocks, key.B),
                        grid_names=("h", "cb", "b"), **kw)


def _specs(key: RotatedKey, reverse: bool, *kinds):
    """BlockSpecs of the walked inputs, one per kind: "qk" a (C, d) tile, "v" a (C, BV) tile,
    "pos" a (C,) vector, "chunk" a (1, d) row of a per-chunk table."""
    last = key.chunks - 1
    at = (lambda j: last - j) if reverse else (lambda j: j)
    tr = _operand(key)
    out = []
    for kind in kinds:
        if kind == "qk":
            out.append(plgpu.BlockSpec((C, key.d), lambda j: (at(j), 0), transforms=tr))
        elif kind == "v":
            out.append(plgpu.BlockSpec((C, key.block_v), lambda j: (at(j), 0), transforms=tr))
        elif kind == "pos":
            out.append(plgpu.BlockSpec((C,), lambda j: (at(j),)))
        elif kind == "chunk":
            out.append(plgpu.BlockSpec((1, key.d), lambda j: (at(j), 0)))
        else:
            raise ValueError(kind)
    return out


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
    """exp(L_t - L_s) on s <= t, and where it is 0: a (C, C) tile indexed (t, s), or (s, t)
    when ``transposed``. Selected, never multiplied: the masked entries are exactly 0."""
    shape = (C, C)
    r, c = t.iota(shape, 0), t.iota(shape, 1)
    if transposed:                 # rows s, columns t
        keep = c >= r
        diff = _bcast_cols(L_cols, shape) - _bcast_rows(L_rows, shape)
    else:                          # rows t, columns s
        keep = r >= c
        diff = _bcast_rows(L_rows, shape) - _bcast_cols(L_cols, shape)
    return keep, jnp.exp(jnp.where(keep, diff, -jnp.inf))


def _stage(d: int, BV: int):
    """SMEM for a state's way in or out, scoped to that moment (the walk reuses the space)."""
    return plgpu.SMEM((2, d, BV), F32, transforms=_transforms(BV, 4))


def _state_in(t: _Tile, ref, b, h, cols, d, BV):
    """This CTA's columns of a (B, H, 2, d, d) float32 state in HBM, as its two halves."""
    def scoped(stage, bar):
        for i in range(2):
            plgpu.copy_gmem_to_smem(ref.at[b, h, i, :, cols], stage.at[i], bar.at[i])
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


def _state_out(t: _Tile, halves, ref, b, h, cols, d, BV):
    def scoped(stage):
        for i, half in enumerate(halves):
            stage[i] = half
        t.fence()
        for i in range(2):
            plgpu.copy_smem_to_gmem(stage.at[i], ref.at[b, h, i, :, cols])
        plgpu.wait_smem_to_gmem(0)
    pl.run_scoped(scoped, _stage(d, BV))


def _scaled(t: _Tile, x_ref, w, out_ref, dtype):
    """out = x with each row times w (a row vector), for a product operand."""
    x = t.load(x_ref).astype(F32)
    out_ref[...] = (x * _bcast_rows(w, x.shape)).astype(dtype)


# ---------------------------------------------------------------------------------------------
# forward


def forward(key: RotatedKey):
    """(q, k, v, L, T, W, G[, h0]) -> (y, S_N).

    q, k: (B, N, H, d); v: (B, N, H, d) in key.dtype. L, T, W: (B, H, N) float32: log|a| summed
    from each chunk's start, the phase summed from t = 0 mod 2 pi, and exp(L_C - L_t), the decay
    from t to its chunk's end. G: (B, H, chunks, d) float32, exp(L_C) of each chunk repeated d
    times. h0: (B, H, 2, d, d) float32, the initial [Sc; Ss]. y: (B, N, H, d) in key.dtype;
    S_N: (B, H, 2, d, d) float32."""
    d, BV, dt = key.d, key.block_v, key.jdtype
    t = _Tile(key.interpret)
    tr = tr_d = tr_v = tr_c = _operand(key)

    def body(*refs):
        if key.has_h0:
            q, k, v, L, T, W, G, h0, y, s_out, scratch = refs
        else:
            (q, k, v, L, T, W, G, y, s_out, scratch), h0 = refs, None
        qs, ks, vw, p, sc, ss, y_buf = scratch
        b, h, cb = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("cb")
        cols = pl.ds(cb * BV, BV)
        init = (t.zeros((d, BV)), t.zeros((d, BV))) if h0 is None else _state_in(t, h0, b, h, cols, d, BV)

        y_rows = y.at[b, :, h, cols]

        def step(idx, qc, kc, v_t, L_t, T_t, W_t, G_t, carry):
            # q and k are turned in place: their slots then hold qc and kc
            Sc, Ss = carry
            j = idx[0]
            Lr, Lc = t.rows(L_t), t.cols(L_t)
            Tr = t.rows(T_t)
            cos, sin = jnp.cos(Tr), jnp.sin(Tr)
            _rotate(t, t.load(qc).astype(F32), cos, sin, qc, qs, dt)
            _rotate(t, t.load(kc).astype(F32), cos, sin, kc, ks, dt)
            _scaled(t, v_t, t.rows(W_t), vw, dt)
            sc[...] = Sc.astype(dt)
            ss[...] = Ss.astype(dt)
            t.fence()

            # inside the chunk: (q' k'^T) weighted by exp(L_t - L_s) on s <= t
            scores = t.mm(None, (qc, kc, False, True), (qs, ks, False, True))
            keep, decay = _causal_decay(t, Lr, Lc)
            p[...] = jnp.where(keep, scores * decay, 0.0).astype(dt)
            # the carried state: exp(L_t) q'_t . S_{j-1}
            carried = t.mm(None, (qc, sc, False, False), (qs, ss, False, False))
            t.fence()
            out = t.mm(carried * _bcast_rows(jnp.exp(Lr), (C, BV)), (p, v_t, False, False))
            _store_rows(t, out.astype(dt), y_buf, y_rows, j)

            # S_j = exp(L_C) S_{j-1} + k'^T (v weighted to the chunk's end)
            g = _bcast_rows(t.rows(G_t.at[0]), (d, BV))
            Sc = t.mm(Sc * g, (kc, vw, True, False))
            Ss = t.mm(Ss * g, (ks, vw, True, False))
            return Sc, Ss

        walk = plgpu.emit_pipeline(
            step, grid=(key.chunks,),
            in_specs=[*_specs(key, False, "qk", "qk", "v", "pos", "pos", "pos", "chunk")],
            max_concurrent_steps=2, init_carry=init)
        Sc, Ss = walk(q.at[b, :, h, :], k.at[b, :, h, :], v.at[b, :, h, cols], L.at[b, h], T.at[b, h],
                      W.at[b, h], G.at[b, h])
        _state_out(t, (Sc, Ss), s_out, b, h, cols, d, BV)

    scratch = [
        plgpu.SMEM((C, d), dt, transforms=tr_d),      # qs
        plgpu.SMEM((C, d), dt, transforms=tr_d),      # ks
        plgpu.SMEM((C, BV), dt, transforms=tr_v),     # v weighted to the chunk's end
        plgpu.SMEM((C, C), dt, transforms=tr_c),      # P
        plgpu.SMEM((d, BV), dt, transforms=tr_v),     # Sc as a product operand
        plgpu.SMEM((d, BV), dt, transforms=tr_v),     # Ss
        plgpu.SMEM((2, C, BV), dt, transforms=tr_v),  # y, two chunks in flight to HBM
    ]
    out_type = (jax.ShapeDtypeStruct((key.B, key.N, key.H, d), dt),
                jax.ShapeDtypeStruct((key.B, key.H, 2, d, d), F32))

    def entry(*refs):
        n_in = 8 if key.has_h0 else 7
        ins, outs = refs[:n_in], refs[n_in:n_in + 2]
        pl.run_scoped(lambda *s: body(*ins, *outs, s), *scratch)
    return _kernel(entry, key, out_type)


# ---------------------------------------------------------------------------------------------
# backward


def _position_grads(t: _Tile, x, cos, sin, dxc, dxs):
    """From dx' = [dxc, dxs] (float32 (C, d)) and x: (dx, x' . dx', dx' . dT x'), the last two
    as (C,) row vectors."""
    shape = x.shape
    c, s = _bcast_rows(cos, shape), _bcast_rows(sin, shape)
    xc, xs = x * c, -(x * s)
    dx = c * dxc - s * dxs
    dot = jnp.sum(xc * dxc + xs * dxs, axis=1)
    turn = jnp.sum(dxc * xs - dxs * xc, axis=1)
    return dx, dot, turn


def backward_q(key: RotatedKey):
    """(q, k, v, dy, L, T, W, G[, h0]) -> (dq, dL_q, dT_q): a forward walk that rebuilds each
    chunk's starting state and gives the q side of the gradients. Inputs as ``forward``'s, dy
    like y. Outputs are this column block's shares, float32: dq (CB, B, N, H, d), dL_q and
    dT_q (CB, B, H, N), with dL_q = q' . dq' and dT_q = dq' . (dT q')."""
    d, BV, dt = key.d, key.block_v, key.jdtype
    t = _Tile(key.interpret)
    tr = tr_d = tr_v = tr_c = _operand(key)

    def body(*refs):
        if key.has_h0:
            q, k, v, dy, L, T, W, G, h0, dq, dL, dT, scratch = refs
        else:
            (q, k, v, dy, L, T, W, G, dq, dL, dT, scratch), h0 = refs, None
        ks, vw, dp, sc, ss, dq_buf, vec_buf = scratch
        b, h, cb = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("cb")
        cols = pl.ds(cb * BV, BV)
        init = (t.zeros((d, BV)), t.zeros((d, BV))) if h0 is None else _state_in(t, h0, b, h, cols, d, BV)
        dq_rows, dL_row, dT_row = dq.at[cb, b, :, h], dL.at[cb, b, h], dT.at[cb, b, h]

        def step(idx, q_t, kc, v_t, dy_t, L_t, T_t, W_t, G_t, carry):
            Sc, Ss = carry            # k is turned in place: its slot then holds kc
            j = idx[0]
            Lr, Lc = t.rows(L_t), t.cols(L_t)
            Tr = t.rows(T_t)
            cos, sin = jnp.cos(Tr), jnp.sin(Tr)
            _rotate(t, t.load(kc).astype(F32), cos, sin, kc, ks, dt)
            _scaled(t, v_t, t.rows(W_t), vw, dt)
            sc[...] = Sc.astype(dt)
            ss[...] = Ss.astype(dt)
            t.fence()

            # dP = (dy v^T) weighted by exp(L_t - L_s) on s <= t
            dscores = t.mm(None, (dy_t, v_t, False, True))
            keep, decay = _causal_decay(t, Lr, Lc)
            dp[...] = jnp.where(keep, dscores * decay, 0.0).astype(dt)
            t.fence()
            # dq' = dP k' + exp(L_t) dy S_{j-1}^T
            e = _bcast_rows(jnp.exp(Lr), (C, d))
            dqc = t.mm(t.mm(None, (dy_t, sc, False, True)) * e, (dp, kc, False, False))
            dqs = t.mm(t.mm(None, (dy_t, ss, False, True)) * e, (dp, ks, False, False))
            dq_t, dot, turn = _position_grads(t, t.load(q_t).astype(F32), cos, sin, dqc, dqs)
            _store_rows(t, dq_t, dq_buf, dq_rows, j)
            _store_vec(t, dot, vec_buf, 0, dL_row, j)
            _store_vec(t, turn, vec_buf, 1, dT_row, j)

            g = _bcast_rows(t.rows(G_t.at[0]), (d, BV))
            Sc = t.mm(Sc * g, (kc, vw, True, False))
            Ss = t.mm(Ss * g, (ks, vw, True, False))
            return Sc, Ss

        walk = plgpu.emit_pipeline(
            step, grid=(key.chunks,),
            in_specs=[*_specs(key, False, "qk", "qk", "v", "v", "pos", "pos", "pos", "chunk")],
            max_concurrent_steps=2, init_carry=init)
        walk(q.at[b, :, h, :], k.at[b, :, h, :], v.at[b, :, h, cols], dy.at[b, :, h, cols], L.at[b, h],
             T.at[b, h], W.at[b, h], G.at[b, h])
        plgpu.wait_smem_to_gmem(0)

    scratch = [
        plgpu.SMEM((C, d), dt, transforms=tr_d),      # ks
        plgpu.SMEM((C, BV), dt, transforms=tr_v),     # v weighted to the chunk's end
        plgpu.SMEM((C, C), dt, transforms=tr_c),      # dP
        plgpu.SMEM((d, BV), dt, transforms=tr_v),     # Sc as a product operand
        plgpu.SMEM((d, BV), dt, transforms=tr_v),     # Ss
        plgpu.SMEM((2, C, d), F32, transforms=_transforms(d, 4)),    # dq, two chunks in flight
        plgpu.SMEM((2, 2, C), F32),                   # dL_q and dT_q, likewise
    ]
    CB = key.col_blocks
    out_type = (jax.ShapeDtypeStruct((CB, key.B, key.N, key.H, d), F32),
                jax.ShapeDtypeStruct((CB, key.B, key.H, key.N), F32),
                jax.ShapeDtypeStruct((CB, key.B, key.H, key.N), F32))

    def entry(*refs):
        n_in = 9 if key.has_h0 else 8
        pl.run_scoped(lambda *s: body(*refs[:n_in], *refs[n_in:n_in + 3], s), *scratch)
    return _kernel(entry, key, out_type)


def backward_kv(key: RotatedKey):
    """(q, k, v, dy, L, T, W, G[, dS_N]) -> (dk, dv, dL_k, dT_k, dS_0): a backward walk carrying
    the cotangent dS of the state at each chunk's end. dS_N (B, H, 2, d, d) float32 is the
    cotangent of ``forward``'s S_N (key.has_h0 says it is given). Outputs float32: dk
    (CB, B, N, H, d) and dL_k = -k' . dk', dT_k = dk' . (dT k') (CB, B, H, N), this column
    block's shares; dv (B, N, H, d) whole, in key.dtype; dS_0 (B, H, 2, d, d), the cotangent of h0's [Sc; Ss]."""
    d, BV, dt = key.d, key.block_v, key.jdtype
    t = _Tile(key.interpret)
    tr = tr_d = tr_v = tr_c = _operand(key)
    last = key.chunks - 1

    def body(*refs):
        if key.has_h0:
            q, k, v, dy, L, T, W, G, dsn, dk, dv, dL, dT, ds0, scratch = refs
        else:
            (q, k, v, dy, L, T, W, G, dk, dv, dL, dT, ds0, scratch), dsn = refs, None
        qs, ks, dye, pt, dpt, dsc, dss, dk_buf, dv_buf, vec_buf = scratch
        b, h, cb = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("cb")
        cols = pl.ds(cb * BV, BV)
        init = (t.zeros((d, BV)), t.zeros((d, BV))) if dsn is None else _state_in(t, dsn, b, h, cols, d, BV)
        dk_rows, dv_rows = dk.at[cb, b, :, h], dv.at[b, :, h, cols]
        dL_row, dT_row = dL.at[cb, b, h], dT.at[cb, b, h]

        def step(idx, qc, kc, v_t, dy_t, L_t, T_t, W_t, G_t, carry):
            dSc, dSs = carry          # q and k are turned in place: their slots then hold qc and kc
            j = last - idx[0]
            Lr, Lc = t.rows(L_t), t.cols(L_t)
            Tr = t.rows(T_t)
            cos, sin = jnp.cos(Tr), jnp.sin(Tr)
            qf, kf = t.load(qc).astype(F32), t.load(kc).astype(F32)
            _rotate(t, qf, cos, sin, qc, qs, dt)
            _rotate(t, kf, cos, sin, kc, ks, dt)
            _scaled(t, dy_t, jnp.exp(Lr), dye, dt)
            wr = t.rows(W_t)
            dsc[...] = dSc.astype(dt)
            dss[...] = dSs.astype(dt)
            t.fence()

            # P^T and dP^T, indexed (s, t), weighted by exp(L_t - L_s) on t >= s
            keep, decay = _causal_decay(t, Lr, Lc, transposed=True)
            scores = t.mm(None, (kc, qc, False, True), (ks, qs, False, True))
            pt[...] = jnp.where(keep, scores * decay, 0.0).astype(dt)
            dscores = t.mm(None, (v_t, dy_t, False, True))
            dpt[...] = jnp.where(keep, dscores * decay, 0.0).astype(dt)
            t.fence()

            # dv = P^T dy + exp(L_C - L_s) k' dS_j
            carried = t.mm(None, (kc, dsc, False, False), (ks, dss, False, False))
            dv_t = t.mm(carried * _bcast_rows(wr, (C, BV)), (pt, dy_t, False, False)).astype(dt)
            _store_rows(t, dv_t, dv_buf, dv_rows, j)
            # dk' = dP^T q' + exp(L_C - L_s) v dS_j^T
            w = _bcast_rows(wr, (C, d))
            dkc = t.mm(t.mm(None, (v_t, dsc, False, True)) * w, (dpt, qc, False, False))
            dks = t.mm(t.mm(None, (v_t, dss, False, True)) * w, (dpt, qs, False, False))
            dk_t, dot, turn = _position_grads(t, kf, cos, sin, dkc, dks)
            _store_rows(t, dk_t, dk_buf, dk_rows, j)
            _store_vec(t, -dot, vec_buf, 0, dL_row, j)
            _store_vec(t, turn, vec_buf, 1, dT_row, j)

            # dS_{j-1} = exp(L_C) dS_j + q'^T (exp(L_t) dy_t)
            g = _bcast_rows(t.rows(G_t.at[0]), (d, BV))
            dSc = t.mm(dSc * g, (qc, dye, True, False))
            dSs = t.mm(dSs * g, (qs, dye, True, False))
            return dSc, dSs

        walk = plgpu.emit_pipeline(
            step, grid=(key.chunks,),
            in_specs=[*_specs(key, True, "qk", "qk", "v", "v", "pos", "pos", "pos", "chunk")],
            max_concurrent_steps=2, init_carry=init)
        dSc, dSs = walk(q.at[b, :, h, :], k.at[b, :, h, :], v.at[b, :, h, cols], dy.at[b, :, h, cols],
                        L.at[b, h], T.at[b, h], W.at[b, h], G.at[b, h])
        plgpu.wait_smem_to_gmem(0)
        _state_out(t, (dSc, dSs), ds0, b, h, cols, d, BV)

    scratch = [
        plgpu.SMEM((C, d), dt, transforms=tr_d),      # qs
        plgpu.SMEM((C, d), dt, transforms=tr_d),      # ks
        plgpu.SMEM((C, BV), dt, transforms=tr_v),     # exp(L_t) dy_t
        plgpu.SMEM((C, C), dt, transforms=tr_c),      # P^T
        plgpu.SMEM((C, C), dt, transforms=tr_c),      # dP^T
        plgpu.SMEM((d, BV), dt, transforms=tr_v),     # dSc as a product operand
        plgpu.SMEM((d, BV), dt, transforms=tr_v),     # dSs
        # dk, two chunks in flight (one where d = 128: the walk's SMEM is then full)
        plgpu.SMEM((2 if d <= 64 else 1, C, d), F32, transforms=_transforms(d, 4)),
        plgpu.SMEM((2, C, BV), dt, transforms=tr_v),  # dv, likewise
        plgpu.SMEM((2, 2, C), F32),                   # dL_k and dT_k, likewise
    ]
    CB = key.col_blocks
    out_type = (jax.ShapeDtypeStruct((CB, key.B, key.N, key.H, d), F32),
                jax.ShapeDtypeStruct((key.B, key.N, key.H, d), dt),
                jax.ShapeDtypeStruct((CB, key.B, key.H, key.N), F32),
                jax.ShapeDtypeStruct((CB, key.B, key.H, key.N), F32),
                jax.ShapeDtypeStruct((key.B, key.H, 2, d, d), F32))

    def entry(*refs):
        n_in = 9 if key.has_h0 else 8
        pl.run_scoped(lambda *s: body(*refs[:n_in], *refs[n_in:n_in + 5], s), *scratch)
    return _kernel(entry, key, out_type)


_KERNELS = {"forward": forward, "backward_q": backward_q, "backward_kv": backward_kv}


def launch(*arrays, key, kernel: str):
    """Run one of the kernels on ``arrays``. ``key`` may be the tuple of RotatedKey's fields
    (plain values are what torch.compile passes to an opaque op)."""
    if not isinstance(key, RotatedKey):
        key = RotatedKey(*key)
    return _KERNELS[kernel](key)(*arrays)
