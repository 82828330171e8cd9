"""Arguments checked by type: one clear error naming the argument, never a silent reading of a
truthy string or a non-finite fraction, in the torch layers, the mixers, the scan and the JAX model."""

from __future__ import annotations

import math

import pytest
import torch

from gateloop_hybrid import GateLoopedAttention, SimpleGateLoopLayer, gate_loop_mixer, gate_loop_scan
from gateloop_hybrid.mixer import simple_gate_loop_mixer

NOT_BOOLS = ["False", "no", "", 1.0, [True]]
BAD_FRACTIONS = [math.nan, math.inf, -math.inf, -0.1, 1.5, "0.5", True]


@pytest.mark.parametrize("backend", ["loop", "torch", "heinsen", "auto"])
@pytest.mark.parametrize("value", NOT_BOOLS)
def test_scan_refuses_a_reverse_that_is_not_a_bool(backend, value):
    a, x = torch.rand(1, 4, 2), torch.randn(1, 4, 2)
    with pytest.raises(TypeError, match="reverse must be a bool"):
        gate_loop_scan(a, x, reverse=value, backend=backend)


@pytest.mark.parametrize("value", NOT_BOOLS)
def test_mixers_refuse_options_that_are_not_bools(value):
    qkv, z = torch.randn(1, 5, 12), torch.randn(1, 5, 4)
    for name in ("ablate_complex", "ablate_state_transition", "recompute"):
        with pytest.raises(TypeError, match=f"{name} must be a bool"):
            gate_loop_mixer(qkv, z, heads=2, **{name: value})
    with pytest.raises(TypeError, match="reverse must be a bool"):
        simple_gate_loop_mixer(torch.randn(1, 5, 6), reverse=value)


@pytest.mark.parametrize("value", BAD_FRACTIONS)
def test_a_fraction_is_finite_and_in_range(value):
    with pytest.raises(ValueError, match="frac_gradient_state_transition must be a finite number in"):
        GateLoopedAttention(8, frac_gradient_state_transition=value)
    with pytest.raises(ValueError, match="frac_gradient must be a finite number in"):
        gate_loop_mixer(torch.randn(1, 5, 12), torch.randn(1, 5, 4), heads=2, frac_gradient=value)


def test_layers_refuse_options_that_are_not_bools():
    with pytest.raises(TypeError, match="checkpoint_gate_looped_attn must be a bool"):
        GateLoopedAttention(8, checkpoint_gate_looped_attn="False")
    with pytest.raises(TypeError, match="reverse must be a bool"):
        SimpleGateLoopLayer(8, reverse="False")
    with pytest.raises(TypeError, match="return_cache must be a bool"):
        GateLoopedAttention(8)(torch.randn(1, 3, 8), return_cache="yes")
    # the seed's values keep working
    GateLoopedAttention(8, frac_gradient_state_transition=0)
    GateLoopedAttention(8, frac_gradient_state_transition=1)


def test_the_mosaic_scan_refuses_an_empty_batch_clearly():
    pytest.importorskip("jax")
    from gateloop_hybrid.ops.mosaic import scan_mosaic
    with pytest.raises(ValueError, match="a batch of at least one row"):
        scan_mosaic(torch.rand(0, 5, 128), torch.randn(0, 5, 128))
    h, h_last = gate_loop_scan(torch.rand(0, 5, 128), torch.randn(0, 5, 128), backend="torch")
    assert h.shape == (0, 5, 128) and h_last.shape == (0, 128)


def test_the_jax_model_names_what_it_refuses():
    jax = pytest.importorskip("jax")
    pytest.importorskip("equinox")
    import jax.numpy as jnp
    import gateloop_hybrid.jax as glj
    model = glj.Transformer(num_tokens=16, dim=8, depth=1, key=jax.random.key(0))
    with pytest.raises(TypeError, match=r"x is a torch.Tensor \(torch.int64"):
        model(torch.zeros(1, 4, dtype=torch.int64))
    layer = glj.GateLoopedAttention(dim=8, heads=2, key=jax.random.key(0))
    x = jnp.ones((1, 3, 8))
    with pytest.raises(TypeError, match="cache must be the complex state"):
        layer(x, cache=jnp.zeros((1, 2, 4, 4)), return_cache=True)
    with pytest.raises(TypeError, match="cache is a torch.Tensor"):
        layer(x, cache=torch.zeros(1, 2, 4, 4, dtype=torch.complex64), return_cache=True)
    with pytest.raises(TypeError, match="ablate_complex must be a bool"):
        layer(x, ablate_complex="False")
    state = {k: v.to(torch.complex64) for k, v in glj.to_torch_state_dict(model).items()}
    with pytest.raises(TypeError, match="holds complex weights"):
        glj.from_torch_state_dict(state, num_tokens=16, dim=8, depth=1)
