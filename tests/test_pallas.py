"""Pallas scan kernels (interpret mode on CPU) against the float64 reference (scan/reference.py).

Every case drives both outputs (h, h_last) with random cotangents and compares h, h_last and the
gradients of a, x and h0 by name. Cases cover real and complex (and real x with complex a),
reverse, odd lengths (1, 3, 63, 1000), gates broadcast over feature dims, bfloat16 inputs, both
kernels ("walk" and "lookback") and both entry points (complex arrays in JAX's convention, float
pairs in torch's).
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import torch  # noqa: E402

from gateloop_hybrid.kernels import pallas_scan as ps  # noqa: E402
from gateloop_hybrid.scan.reference import scan_reference, scan_reference_vjp  # noqa: E402


def reference(a, x, h0, gh, gl, reverse, torch_convention):
    """(h, h_last, [da, dx, dh0]) from the float64 reference, for cotangents (gh, gl) in torch's
    complex convention or in JAX's (conj of torch's gradient of the conjugated cotangents)."""
    wide = lambda v: None if v is None else torch.from_numpy(
        np.asarray(v, np.complex128 if np.iscomplexobj(v) else np.float64))
    conj = (lambda v: v) if torch_convention else np.conj
    a, x, h0 = wide(a), wide(x), wide(h0)
    h, hl = scan_reference(a, x, h0, reverse)
    grads = scan_reference_vjp(a, x, h0, h, wide(conj(gh)), wide(conj(gl)), reverse)
    return h.numpy(), hl.numpy(), [None if g is None else conj(g.numpy()) for g in grads]


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    N: int
    F: tuple
    Fa: tuple
    dtypes: tuple            # (a, x, h0) as "f32", "bf16", "c64", or None for no h0
    reverse: bool
    method: str
    pairs: bool = False      # the float-pair entry point (torch's convention)
    B: int = 2
    config: tuple = ()       # extra KernelConfig fields


CASES = [
    Case("real_long_walk", 1000, (6,), (6,), ("f32", "f32", "f32"), False, "walk"),
    # incl_every: most tiles publish only aggregates, so the look-back walks several windows
    Case("real_bcast_rev_lookback", 63, (3, 5), (3, 1), ("f32", "f32", "f32"), True, "lookback",
         config=(("incl_every", 3), ("window", 2))),
    Case("real_n1_scalar_gate", 1, (7,), (1,), ("f32", "f32", "f32"), False, "walk"),
    Case("complex_bcast_walk", 63, (3, 4), (1, 4), ("c64", "c64", "c64"), False, "walk",
         config=(("column_per_lane", 1),)),
    Case("complex_long_rev_lookback", 1000, (5,), (5,), ("c64", "c64", "c64"), True, "lookback",
         config=(("incl_every", 7), ("window", 4))),
    Case("complex_gate_real_x_n3", 3, (4,), (4,), ("c64", "f32", None), True, "lookback", B=3),
    Case("bf16_walk", 63, (9,), (9,), ("bf16", "bf16", "bf16"), True, "walk"),
    Case("pairs_complex_lookback", 63, (2, 3), (2, 1), ("c64", "c64", "c64"), False, "lookback",
         pairs=True),
    Case("pairs_real_gate_complex_x_rev", 3, (5,), (5,), ("f32", "c64", "f32"), True, "walk",
         pairs=True, config=(("column_per_lane", 2),)),
]

_NP = {"f32": np.float32, "bf16": jnp.bfloat16, "c64": np.complex64}


def _rand(rng, shape, kind, gate=False):
    if gate:   # |a| in (0.6, 1): long memory, the hard regime for accumulated error
        mag = rng.uniform(0.6, 1.0, shape) * rng.choice([-1.0, 1.0], shape)
        if kind == "c64":
            return (mag * np.exp(1j * rng.uniform(-np.pi, np.pi, shape))).astype(np.complex64)
        return mag.astype(_NP[kind])
    v = rng.normal(size=shape)
    if kind == "c64":
        v = v + 1j * rng.normal(size=shape)
    return v.astype(_NP[kind])


def _pairs(v):
    return np.stack([v.real, v.imag], -1).astype(np.float32) if np.iscomplexobj(v) else v


def _tol(case):
    return 2e-2 if "bf16" in case.dtypes else 2e-5


def _rel_err(got, want):
    got, want = np.asarray(got, np.complex128), np.asarray(want, np.complex128)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_values_and_gradients(case):
    rng = np.random.default_rng(zlib.crc32(case.name.encode()))
    B, N = case.B, case.N
    ka, kx, k0 = case.dtypes
    a = _rand(rng, (B, N, *case.Fa), ka, gate=True)
    x = _rand(rng, (B, N, *case.F), kx)
    h0 = None if k0 is None else _rand(rng, (B, *case.F), k0)
    out_complex = "c64" in case.dtypes
    gh = _rand(rng, (B, N, *case.F), "c64" if out_complex else "f32")
    gl = _rand(rng, (B, *case.F), "c64" if out_complex else "f32")
    cfg = ps.KernelConfig(method=case.method, block_t=16, block_d=4, **dict(case.config))

    if case.pairs:
        def run(a, x, h0, gh, gl):
            fn = lambda a, x, h0: ps.scan_pallas_ri(
                a, x, h0, complex_a=ka == "c64", complex_x=kx == "c64", complex_h0=k0 == "c64",
                reverse=case.reverse, interpret=True, config=cfg)
            out, vjp = jax.vjp(fn, a, x, h0)
            return out, vjp((gh, gl))
        args = (_pairs(a), _pairs(x), None if h0 is None else _pairs(h0),
                _pairs(gh).astype(np.float32), _pairs(gl).astype(np.float32))
        (h, hl), grads = jax.jit(run)(*args)
        to_c = lambda v, kind: (np.asarray(v)[..., 0] + 1j * np.asarray(v)[..., 1]) if kind == "c64" \
            else np.asarray(v)
        h, hl = to_c(h, "c64" if out_complex else "f32"), to_c(hl, "c64" if out_complex else "f32")
        grads = [None if g is None else to_c(g, k) for g, k in zip(grads, (ka, kx, k0))]
    else:
        def run(a, x, h0, gh, gl):
            fn = lambda a, x, h0: ps.scan_pallas(a, x, h0, case.reverse, True, cfg)
            out, vjp = jax.vjp(fn, a, x, h0)
            return out, vjp((gh.astype(out[0].dtype), gl.astype(out[0].dtype)))
        (h, hl), grads = jax.jit(run)(a, x, h0, gh, gl)

    h_ref, hl_ref, want = reference(a, x, h0, gh, gl, case.reverse, torch_convention=case.pairs)

    assert np.all(np.isfinite(np.asarray(h, np.complex128)))
    errors = {"h": _rel_err(h, h_ref), "h_last": _rel_err(hl, hl_ref)}
    for name, g, w in zip(("da", "dx", "dh0"), grads, want):
        assert (g is None) == (w is None), name
        if g is not None:
            assert np.asarray(g).shape == np.asarray(w).shape, (name, np.asarray(g).shape)
            assert np.iscomplexobj(g) == np.iscomplexobj(w), name
            errors[name] = _rel_err(g, w)
    bad = {k: v for k, v in errors.items() if not v < _tol(case)}
    assert not bad, f"relative errors above {_tol(case)}: {bad} (all: {errors})"


def test_rejects_bad_inputs():
    x = jnp.ones((2, 5, 3), jnp.float32)
    with pytest.raises(ValueError, match="broadcast"):
        ps.scan_fwd(jnp.ones((2, 5, 2)), x, interpret=True)
    with pytest.raises(ValueError, match="h0"):
        ps.scan_fwd(jnp.ones((2, 5, 3)), x, jnp.ones((2, 4)), interpret=True)
    with pytest.raises(ValueError, match="power of 2"):
        ps.scan_fwd(jnp.ones((2, 5, 3)), x, interpret=True, config=ps.KernelConfig(block_t=12))
