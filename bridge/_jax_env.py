"""JAX's process-wide settings that the bridge chooses, each unless the user chose first.

- GPU memory: JAX reserves 75% of GPU memory on its first operation unless told otherwise
  (measured on an H200: 105 of 140 GiB), which starves torch in the same process. The bridge sets
  XLA_PYTHON_CLIENT_PREALLOCATE=false before JAX is imported; if JAX started its GPU backend
  before this ran, it warns once.
- CPU dispatch: JAX runs CPU computations on a worker thread and returns at once; a bridged call
  on CPU tensors must wait for the result anyway (torch reads it), so the hand-off to the worker
  and back is pure latency (about 100-250 us a call on a 2-core machine). ``cpu_dispatch()``
  (called once JAX is imported) makes JAX run CPU computations inline, unless JAX's CPU backend
  already started or GATELOOP_HYBRID_JAX_CPU_ASYNC=1 is set.
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


_ASYNC_VAR = "GATELOOP_HYBRID_JAX_CPU_ASYNC"


def cpu_dispatch() -> None:
    """Inline (synchronous) CPU dispatch for JAX, see the module docstring. Takes effect only if
    JAX's CPU client does not exist yet."""
    if os.environ.get(_ASYNC_VAR, "") not in ("", "0"):
        return
    try:
        import jax
        from jax._src import xla_bridge
        if "cpu" in (getattr(xla_bridge, "_backends", None) or {}):
            return      # too late: the CPU client was created with the user's setting
        jax.config.update("jax_cpu_enable_async_dispatch", False)
    except Exception:   # the flag or the private module moved: keep JAX's default
        return
