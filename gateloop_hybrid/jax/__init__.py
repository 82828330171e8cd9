"""The GateLoop Transformer in pure JAX (equinox), with weights that cross to and from torch.

    import jax, gateloop_hybrid.jax as glj
    model = glj.Transformer(dim=64, num_tokens=256, depth=2, key=jax.random.key(0))
    logits = model(ids)                                   # ids: (b, n) integers -> (b, n, 256)
    model = glj.from_torch_state_dict(torch_model.state_dict(), dim=64, num_tokens=256, depth=2)
    torch_model.load_state_dict(glj.to_torch_state_dict(model))

The layers take the torch layers' constructor and forward arguments (plus a PRNG ``key``), act
on whole batches (b, n, D) as those do, keep the same caches, and hold their weights under the
torch state dict's names. The recurrence runs through ``gateloop_hybrid.kernels.jax_scan`` ("jax")
or the Pallas GPU kernels ("pallas"). Imports no torch (``to_torch_state_dict`` does, when
called). Training: ``gateloop_hybrid.jax.training``.
"""

from __future__ import annotations

try:
    import equinox  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the installation
    raise ImportError("gateloop_hybrid.jax needs equinox: pip install 'gateloop-hybrid[jax]' "
                      f"(equinox and optax) ({e})") from None

from .attention import CausalFullAttention
from .convert import (from_torch_state_dict, load_state_dict, named_parameters, to_numpy_state_dict,
                      to_torch_state_dict)
from .gate_loop import GateLoopedAttention, SimpleGateLoopLayer
from .norms import RMSNorm
from .transformer import Transformer

__all__ = [
    "Transformer",
    "GateLoopedAttention",
    "SimpleGateLoopLayer",
    "CausalFullAttention",
    "RMSNorm",
    "from_torch_state_dict",
    "to_torch_state_dict",
    "to_numpy_state_dict",
    "load_state_dict",
    "named_parameters",
]
