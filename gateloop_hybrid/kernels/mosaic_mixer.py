"""The GateLoop mixer with one feature per head, fused into Mosaic GPU kernels. Pure JAX.

Per batch row b, time t and head j (one feature per head, d = e = 1):

    a_t = sigmoid(|z_t|) z_t / |z_t|   (a_t = 1/2 where z_t = 0)       the complex gate
    h_t = a_t h_{t-1} + k_t v_t                                           the complex state
    y_t = q_t Re(h_t)

Layout, as the layer's projections produce it (no transposes, no splits):

    qkv    (B, N, 3H)      q, k, v side by side (the output of one Linear)
    z      (B, N, H, 2)    the gate pre-activation as (re, im) pairs (a Linear's output viewed)
    y      (B, N, H)       in qkv's dtype; h0, h_last (B, H, 2) float32; h (B, N, H, 2) float32

Forward is mosaic_scan.py's walk reading z, q, k, v instead of a and x, and writing y instead of
h (h too when backward is to read it). Backward walks the cotangent down the time axis:

    G_t = dy_t q_t + conj(a_{t+1}) G_{t+1}          (seeded with the cotangent of h_last)
    dq_t = dy_t Re(h_t)     dk_t = Re(G_t) v_t      dv_t = Re(G_t) k_t
    da_t = G_t conj(h_{t-1}),  dz_t = frac * (c da_t + (s' - c) u <da_t, u>)

with u = z/|z|, s = sigmoid(|z|), s' = s (1 - s), c = s / |z| (dz_t = 0 where z_t = 0, as torch
differentiates abs and angle there), and frac the fraction of the gate's gradient that the layer
lets through. dq, dk, dv are written side by side, the gradient of qkv as it is laid out.

With ``real=True`` the kernels are SimpleGateLoopLayer's mixer, one real gate per feature:

    qkva   (B, N, 3D)      q, kv and the gate pre-activation side by side (one Linear's output)
    a_t = sigmoid(za_t),   h_t = a_t h_{t-1} + kv_t,   y_t = q_t h_t      (all real)

and backward G_t = dy_t q_t + a_{t+1} G_{t+1}, dq_t = dy_t h_t, dkv_t = G_t,
dza_t = G_t h_{t-1} a_t (1 - a_t); h0, h_last, h float32.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import walk as walks
from .walk import F32, W, WalkBody, add, conj, mul


@dataclasses.dataclass(frozen=True)
class Mixer:
    """Everything static about one mixer kernel launch (with the dtypes, the compile-cache key)."""
    B: int
    N: int
    H: int                    # heads (= features: one per head)
    frac: float               # fraction of the gate's gradient passed to z
    has_init: bool            # forward: h0; backward: the cotangent of h_last
    has_h0: bool              # backward only: h0, read at t = 0 for da and given dh0
    backward: bool
    write_y: bool = True      # forward only
    write_h: bool = False     # forward only: also write every state, for backward
    chunks: int = 1
    block: int = 8
    interpret: bool = False
    real: bool = False        # SimpleGateLoopLayer's real gates (see the module docstring)
    one_pass: bool = False    # chunks > 1: one kernel exchanging summaries (walk.stages)

    @property
    def cplx(self) -> bool:
        return not self.real

    complex_a = complex_init = cplx

    @property
    def width(self) -> int:
        return self.H

    def __post_init__(self):
        if self.H % W:
            raise ValueError(f"the mixer kernels take a multiple of {W} heads, got H={self.H}")
        walks.check_chunks(self)
        if not self.backward and not (self.write_y or self.write_h):
            raise ValueError("a forward mixer kernel writes y, h or both")

    @property
    def walk_down(self) -> bool:
        return self.backward

    def gate_mode(self) -> str:
        return "row"


def _gate(zr, zi):
    """(a, what the gradient reuses) for z = (zr, zi): a = sigmoid(|z|) z/|z|, 1/2 at z = 0."""
    r2 = zr * zr + zi * zi
    nonzero = r2 > 0
    inv_r = jax.lax.rsqrt(jnp.where(nonzero, r2, 1.0))
    s = jax.nn.sigmoid(r2 * inv_r)
    c = s * inv_r
    return (jnp.where(nonzero, c * zr, 0.5), c * zi), (nonzero, inv_r, s, c)


def _gate_grad(zr, zi, da, frac):
    """Cotangent of z (torch's convention) from the cotangent da of a = _gate(z)."""
    _, (nonzero, inv_r, s, c) = _gate(zr, zi)
    ur, ui = zr * inv_r, zi * inv_r
    radial = (s * (1.0 - s) - c) * (da[0] * ur + da[1] * ui)
    zero = jnp.zeros_like(zr)
    return (frac * jnp.where(nonzero, c * da[0] + radial * ur, zero),
            frac * jnp.where(nonzero, c * da[1] + radial * ui, zero))


class _MixerBody(WalkBody):
    """One CTA's walk over W heads of one batch row."""

    def qkv(self, t, which):
        return self.r["qkv"][self.b, t, pl.ds(which * self.w.H + self.f0, W)].astype(F32)

    def z(self, t):
        z = self.r["z"]
        return (z[self.b, t, pl.ds(self.f0, W), 0].astype(F32),
                z[self.b, t, pl.ds(self.f0, W), 1].astype(F32))

    def gate(self, t):
        if self.w.real:
            return jax.nn.sigmoid(self.qkv(t, 2)), None
        return _gate(*self.z(t))[0]

    def unit_gate(self):
        return (self.full(1.0), None if self.w.real else self.full(0.0))

    def load_step(self, p):
        w, t = self.w, self.time(p)
        if w.real:
            if not w.backward:
                return tuple(self.qkv(t, i) for i in range(3))      # q, kv, the gate's pre-activation
            t_prev = jnp.maximum(t - 1, 0)     # t = 0 reads h0 instead (walk_chunk)
            return (self.r["dy"][self.b, t, pl.ds(self.f0, W)].astype(F32), self.qkv(t, 0), self.qkv(t, 2),
                    self.row(self.r["h"], t, False)[0], self.row(self.r["h"], t_prev, False)[0])
        if not w.backward:
            return (*self.z(t), *(self.qkv(t, i) for i in range(3)))
        t_prev = jnp.maximum(t - 1, 0)     # t = 0 reads h0 instead (walk_chunk)
        return (self.r["dy"][self.b, t, pl.ds(self.f0, W)].astype(F32),
                *(self.qkv(t, i) for i in range(3)), *self.z(t),
                *self.row(self.r["h"], t, True), *self.row(self.r["h"], t_prev, True))

    def step(self, p, loaded, state, carry_gate, write, h_before=None):
        w, t = self.w, self.time(p)
        if w.real:
            return self._real_step(t, loaded, state, carry_gate, write, h_before)
        if not w.backward:
            zr, zi, q, k, v = loaded
            gate, _ = _gate(zr, zi)
            state = add(mul(gate, state), (k * v, None))
            if write and w.write_y:
                self.r["y"][self.b, t, pl.ds(self.f0, W)] = (q * state[0]).astype(self.r["y"].dtype)
            if write and w.write_h:
                self.store(self.r["h_out"], t, state, True)
            return state, gate
        dy, q, k, v, zr, zi, hr, hi, pr, pi = loaded
        gate, _ = _gate(zr, zi)
        state = add((dy * q, None), mul(conj(carry_gate), state))
        if write:
            dqkv, dt = self.r["dqkv"], self.r["dqkv"].dtype
            dqkv[self.b, t, pl.ds(self.f0, W)] = (dy * hr).astype(dt)
            dqkv[self.b, t, pl.ds(w.H + self.f0, W)] = (state[0] * v).astype(dt)
            dqkv[self.b, t, pl.ds(2 * w.H + self.f0, W)] = (state[0] * k).astype(dt)
            h_prev = (pr, pi) if h_before is None else h_before
            dz = _gate_grad(zr, zi, mul(state, conj(h_prev)), w.frac)
            self.store(self.r["dz"], t, dz, True)
        return state, gate

    def _real_step(self, t, loaded, state, carry_gate, write, h_before):
        w = self.w
        if not w.backward:
            q, kv, za = loaded
            gate = jax.nn.sigmoid(za)
            state = (gate * state[0] + kv, None)
            if write and w.write_y:
                self.r["y"][self.b, t, pl.ds(self.f0, W)] = (q * state[0]).astype(self.r["y"].dtype)
            if write and w.write_h:
                self.store(self.r["h_out"], t, state, False)
            return state, (gate, None)
        dy, q, za, h, h_prev = loaded
        gate = jax.nn.sigmoid(za)
        state = (dy * q + carry_gate[0] * state[0], None)
        if write:
            dqkv, dt = self.r["dqkv"], self.r["dqkv"].dtype
            if h_before is not None:
                h_prev = h_before[0]
            dqkv[self.b, t, pl.ds(self.f0, W)] = (dy * h).astype(dt)
            dqkv[self.b, t, pl.ds(w.H + self.f0, W)] = state[0].astype(dt)
            dqkv[self.b, t, pl.ds(2 * w.H + self.f0, W)] = (state[0] * h_prev * gate * (1.0 - gate)).astype(dt)
        return state, (gate, None)

    def first_step_backward(self, state, gate):
        """The step at t = 0, whose h_{t-1} is h0 (or zero); dh0 = conj(a_0) G_0."""
        w = self.w
        h_before = self.vec(self.r["h0"], w.cplx) if w.has_h0 else self.zero_state()
        p = jnp.asarray(w.N - 1, jnp.int32)
        last, gate0 = self.step(p, self.load_step(p), state, gate, True, h_before=h_before)
        if w.has_h0:
            self.store_vec(self.r["dh0"], mul(conj(gate0), last), w.cplx)


def _refs(m: Mixer, stage: str, dtypes: dict):
    """Names of a stage's input refs, and its outputs' types; dtypes maps "qkv" and "z" to
    the inputs' dtypes (the outputs' dtypes follow them)."""
    B, N, H = m.B, m.N, m.H
    f32 = F32
    pair = () if m.real else (2,)          # complex values as (re, im) pairs
    z = () if m.real else ("z",)
    if m.backward:
        ins = (*z, "qkv", "h", "dy", *(("init",) if m.has_init else ()), *(("h0",) if m.has_h0 else ()))
        outs = {} if m.real else {"dz": jax.ShapeDtypeStruct((B, N, H, 2), dtypes["z"])}
        outs["dqkv"] = jax.ShapeDtypeStruct((B, N, 3 * H), dtypes["qkv"])
        if m.has_h0:
            outs["dh0"] = jax.ShapeDtypeStruct((B, H, *pair), f32)
    else:
        ins = (*z, "qkv", *(("init",) if m.has_init else ()))
        outs = {}
        if m.write_y:
            outs["y"] = jax.ShapeDtypeStruct((B, N, H), dtypes["qkv"])
        outs["h_last"] = jax.ShapeDtypeStruct((B, H, *pair), f32)
        if m.write_h:
            outs["h_out"] = jax.ShapeDtypeStruct((B, N, H, *pair), f32)
    sums = {"sum_a": jax.ShapeDtypeStruct((B, m.chunks, H, *pair), f32),
            "sum_x": jax.ShapeDtypeStruct((B, m.chunks, H, *pair), f32)}
    if stage == "summary":
        outs = sums
    elif stage == "finish":
        ins = (*ins, "sum_a", "sum_x")
    elif stage == "onepass":    # the summaries are outputs the chunks exchange (dropped by mixer_stage)
        outs = {**outs, **sums}
    return ins, outs


def mixer_stage(*arrays, mixer: Mixer | tuple, stage: str):
    """Run one kernel of the mixer (``walk.stages``): "single" (chunks == 1), "onepass", or
    "summary" then "finish" (whose inputs end with the summary's two outputs). ``mixer`` may be
    the tuple of its fields.

    Forward inputs: z, qkv, [h0]; outputs [y], h_last, [h] (y if write_y, h if write_h).
    Backward inputs: z, qkv, h, dy, [g_last], [h0]; outputs dz, dqkv, [dh0].
    With ``real``, no z and no dz (qkv is qkva).
    """
    m = walks.as_key(Mixer, mixer)
    dtypes = {"qkv": arrays[0].dtype} if m.real else {"z": arrays[0].dtype, "qkv": arrays[1].dtype}
    ins, outs = _refs(m, stage, dtypes)
    results = walks.build(_MixerBody, m, stage, ins, outs)(*arrays)
    return results[:-2] if stage == "onepass" else results
