"""The GateLoop recurrence h_t = a_t * h_{t-1} + x_t, one API, several backends.

    gate_loop_scan(a, x, h0=None, *, reverse=False, backend="auto") -> (h, h_last)

on torch tensors, with the backend choice (``resolve_backend``), lives in ``dispatch``; the
implementations beside it are ``torch_scan`` (plain torch), ``jax_scan`` and ``pallas_scan``
(pure JAX, no torch), ``mosaic_scan`` (Mosaic GPU kernels, pure JAX) and ``reference`` (float64).

The names below are loaded from ``dispatch`` on first use, so that the pure-JAX modules
(``gateloop_hybrid.scan.jax_scan``, used by ``gateloop_hybrid.jax``) import without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__all__ = [
    "BACKENDS",
    "gate_loop_scan",
    "resolve_backend",
    "jax_available",
    "jax_has_device",
    "pallas_available",
    "mosaic_available",
    "pallas_self_test",
    "mosaic_self_test",
    "isolated",
]

if TYPE_CHECKING:
    from .dispatch import (BACKENDS, gate_loop_scan, isolated, jax_available, jax_has_device,  # noqa: F401
                           mosaic_available, mosaic_self_test, pallas_available, pallas_self_test,
                           resolve_backend)


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module(".dispatch", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
