"""What comes later never changes what came before, whatever its value.

- Finite inputs whose products overflow at position t (q . k, or k v, beyond the dtype's range)
  leave every output before t bit-identical to a clean run, in float32, bfloat16 and float16, for
  every mixer form and head width that runs on the CPU, and for the JAX model's.
- A non-finite input at t reaches no output of an earlier chunk. (Inside its own chunk the chunked
  form's product scores @ v holds it with weight zero and can turn earlier rows of that chunk into
  nan, as flash attention's diagonal block does; docs/limits.md says so.)
- Every scan backend: a non-finite step at t leaves the states before t unchanged.

The GPU kernels get the same checks in test_cuda.py.
"""

from __future__ import annotations

import pytest
import torch

from gateloop_hybrid import GateLoopedAttention
from gateloop_hybrid.mixer import gate_loop_mixer, simple_gate_loop_mixer
from gateloop_hybrid.routing import CHUNK
from gateloop_hybrid.scan import gate_loop_scan

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def mixer_inputs(b, n, heads, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(b, n, 3 * heads * d, generator=g).to(dtype)
    z = torch.randn(b, n, 2 * heads, generator=g)
    return qkv, z


def overflow_k(qkv, t, dtype):
    """k at position t the largest finite value: q_s . k_t overflows wherever |q_s . 1| > 1."""
    bad = qkv.clone()
    width = qkv.shape[-1] // 3
    bad[:, t, width:2 * width] = torch.finfo(dtype).max
    assert torch.isfinite(bad).all()
    return bad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,d", [(4, 1), (2, 4), (2, 8), (1, 16)])
@pytest.mark.parametrize("t", [CHUNK + 9])
def test_an_overflowing_product_leaves_earlier_outputs_bit_identical(dtype, heads, d, t):
    n = 2 * CHUNK + 5
    qkv, z = mixer_inputs(2, n, heads, d, dtype)
    clean, _ = gate_loop_mixer(qkv, z, heads=heads, backend="torch")
    y, _ = gate_loop_mixer(overflow_k(qkv, t, dtype), z, heads=heads, backend="torch")
    assert not torch.isfinite(y[:, t:]).all()        # the overflow happened, at and after t
    assert torch.equal(y[:, :t], clean[:, :t])


@pytest.mark.parametrize("backend", ["loop", "torch", "heinsen", "jax"])
@pytest.mark.parametrize("d", [1, 4])
def test_an_overflow_is_causal_on_every_scan_backend(backend, d):
    if backend == "jax":
        pytest.importorskip("jax")
    n, t, heads = 90, 70, 2
    qkv, z = mixer_inputs(1, n, heads, d, torch.float16, seed=1)
    clean, _ = gate_loop_mixer(qkv, z, heads=heads, backend=backend)
    y, _ = gate_loop_mixer(overflow_k(qkv, t, torch.float16), z, heads=heads, backend=backend)
    assert torch.equal(y[:, :t], clean[:, :t])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", ["v", "z"])
@pytest.mark.parametrize("d", [2, 8])
def test_a_non_finite_input_reaches_no_earlier_chunk(bad, where, d):
    heads, n, t = 2, 2 * CHUNK + 22, CHUNK + 30          # t in the second chunk
    qkv, z = mixer_inputs(2, n, heads, d, torch.float32, seed=2)
    clean, _ = gate_loop_mixer(qkv, z, heads=heads, backend="torch")
    qkv_bad, z_bad = qkv.clone(), z.clone()
    if where == "v":
        qkv_bad[:, t, 2 * heads * d] = bad
    else:
        z_bad[:, t, 0] = bad
    y, _ = gate_loop_mixer(qkv_bad, z_bad, heads=heads, backend="torch")
    assert torch.equal(y[:, :CHUNK], clean[:, :CHUNK])
    # inside its chunk, the rows before t may not be finite: only the earlier chunks are promised


@pytest.mark.parametrize("heads", [8, 4])            # d = 4 and d = 8 at dim 32
def test_a_layer_never_lets_a_later_token_reach_the_past(heads):
    torch.manual_seed(0)
    layer = GateLoopedAttention(dim=32, heads=heads, scan_backend="torch")
    n, t = 2 * CHUNK + 10, CHUNK + 40
    x = torch.randn(2, n, 32)
    clean = layer(x)
    for bad in (float("inf"), float("nan")):
        x_bad = x.clone()
        x_bad[:, t] = bad
        assert torch.equal(layer(x_bad)[:, :CHUNK], clean[:, :CHUNK])


@pytest.mark.parametrize("backend", ["loop", "torch", "heinsen", "jax"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("reverse", [False, True])
def test_scan_states_before_a_non_finite_step_are_unchanged(backend, bad, reverse):
    if backend == "jax":
        pytest.importorskip("jax")
    g = torch.Generator().manual_seed(3)
    n, t = 37, 20
    a = torch.polar(0.5 + 0.5 * torch.rand(2, n, 3, generator=g), torch.rand(2, n, 3, generator=g))
    x = torch.randn(2, n, 3, generator=g, dtype=torch.complex64)
    clean, _ = gate_loop_scan(a, x, reverse=reverse, backend=backend)
    x_bad = x.clone()
    x_bad[:, t] = bad
    h, _ = gate_loop_scan(a, x_bad, reverse=reverse, backend=backend)
    before = slice(t + 1, None) if reverse else slice(0, t)
    assert torch.equal(h[:, before], clean[:, before])


def test_the_simple_mixer_is_causal_under_overflow():
    g = torch.Generator().manual_seed(4)
    qkva = torch.randn(2, 50, 3 * 8, generator=g).half()
    bad = qkva.clone()
    bad[:, 30, :16] = 6e4                              # q and kv huge: q h overflows float16
    clean, _ = simple_gate_loop_mixer(qkva, backend="torch")
    y, _ = simple_gate_loop_mixer(bad, backend="torch")
    assert torch.equal(y[:, :30], clean[:, :30])


def test_the_jax_models_wide_heads_are_causal():
    jax = pytest.importorskip("jax")
    eqx = pytest.importorskip("equinox")
    import jax.numpy as jnp
    from gateloop_hybrid.jax import GateLoopedAttention as JaxGateLoopedAttention
    from gateloop_hybrid.jax.gate_loop import _chunked_heads
    # jitted, as the JAX model runs: one program serves the clean and the poisoned inputs alike,
    # where op-by-op dispatch would compile each of its primitives (about 200) on its own
    layer_call = eqx.filter_jit(lambda layer, x: layer(x))
    chunked = jax.jit(lambda q, k, v, log_mag, phase: _chunked_heads(q, k, v, log_mag, phase, None, "jax"))
    layer = JaxGateLoopedAttention(dim=32, heads=4, key=jax.random.key(0))
    n, t = 2 * CHUNK + 10, CHUNK + 40
    x = jax.random.normal(jax.random.key(1), (2, n, 32))
    clean = layer_call(layer, x)
    for bad in (jnp.inf, jnp.nan):
        assert bool(jnp.array_equal(layer_call(layer, x.at[:, t].set(bad))[:, :CHUNK], clean[:, :CHUNK]))
    g = jax.random.split(jax.random.key(2), 4)
    q, k, v = (jax.random.normal(g[i], (1, n, 2, 8)) for i in range(3))
    log_mag, phase = -jax.random.uniform(g[3], (2, 1, n, 2)) / 4
    clean, _ = chunked(q, k, v, log_mag, phase)
    y, _ = chunked(q, k.at[:, t].set(jnp.finfo(jnp.float32).max), v, log_mag, phase)
    assert not bool(jnp.isfinite(y[:, t:]).all())
    assert bool(jnp.array_equal(y[:, :t], clean[:, :t]))
