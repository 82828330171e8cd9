"""The GateLoop recurrence h_t = a_t * h_{t-1} + x_t on torch tensors, one API, several backends.

    gate_loop_scan(a, x, h0=None, *, reverse=False, backend="auto") -> (h, h_last)

``api`` holds it (checks, then the path ``gateloop_hybrid.routing`` chooses); beside it are the
plain-torch backends (``torch_scan``) and the float64 reference every kernel is checked against
(``reference``). The JAX kernels live in ``gateloop_hybrid.kernels``, their torch ops in
``gateloop_hybrid.ops``.
"""

from ..routing import BACKENDS, resolve_backend
from .api import gate_loop_scan

__all__ = ["BACKENDS", "gate_loop_scan", "resolve_backend"]
