"""Keep JAX from taking most of the GPU: runs before the bridge first imports jax.

JAX reserves 75% of GPU memory on its first operation unless told otherwise (measured on an
H200: 105 of 140 GiB), which starves torch in the same process. The bridge turns that off unless
the user chose a setting; if JAX started its GPU backend before this ran, it warns once.
"""

import os
import sys
import warnings

_VAR = "XLA_PYTHON_CLIENT_PREALLOCATE"
_user_choice = os.environ.get(_VAR)
os.environ.setdefault(_VAR, "false")


def _jax_gpu_started_with_preallocation() -> bool:
    if "jax" not in sys.modules or _user_choice is not None:
        return False
    try:
        from jax._src import xla_bridge
        backends = getattr(xla_bridge, "_backends", None) or {}
    except Exception:   # private API moved: say nothing rather than guess
        return False
    return any(name in ("cuda", "gpu", "rocm") for name in backends)


if _jax_gpu_started_with_preallocation():
    warnings.warn(
        "JAX started its GPU backend before gateloop_hybrid's bridge was imported, with "
        f"{_VAR} unset: it has reserved 75% of GPU memory, which torch in this process cannot use. "
        f"Import bridge (or gateloop_hybrid) before using JAX, or set {_VAR}=false.",
        RuntimeWarning, stacklevel=2)
