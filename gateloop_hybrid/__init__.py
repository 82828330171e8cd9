"""GateLoop layers in PyTorch with the recurrence computed by a pluggable scan (JAX by default).

Drop-in for lucidrains/gateloop-transformer 0.2.5: same constructor and forward arguments,
same state-dict keys, plus ``scan_backend``. ``gateloop_hybrid.jax`` is the same model in pure
JAX (equinox), with weight conversion both ways. ``explain(op, backend, **facts)`` says which path
computes a call and why (``gateloop_hybrid.routing``).

The torch layers below are imported on first use, so that ``import gateloop_hybrid.jax`` does
not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# public name -> the submodule that defines it
_TORCH_API = {
    "gate_loop_scan": ".scan",
    "gate_loop_mixer": ".mixer",
    "simple_gate_loop_mixer": ".mixer",
    "Transformer": ".transformer",
    "GateLoopedAttention": ".gate_loop",
    "SimpleGateLoopLayer": ".gate_loop",
    "CausalFullAttention": ".attention",
    "RMSNorm": ".norms",
}

__all__ = [*_TORCH_API, "explain", "route", "BACKENDS"]

from .routing import BACKENDS, explain, route  # noqa: E402  (imports neither torch nor JAX)

if TYPE_CHECKING:
    from .attention import CausalFullAttention  # noqa: F401
    from .gate_loop import GateLoopedAttention, SimpleGateLoopLayer  # noqa: F401
    from .mixer import gate_loop_mixer, simple_gate_loop_mixer  # noqa: F401
    from .norms import RMSNorm  # noqa: F401
    from .scan import gate_loop_scan  # noqa: F401
    from .transformer import Transformer  # noqa: F401


def __getattr__(name: str):
    if name in _TORCH_API:
        return getattr(importlib.import_module(_TORCH_API[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
