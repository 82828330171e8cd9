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
- GPUs under torchrun: each rank is a process that trains on its own GPU, cuda:LOCAL_RANK, but
  JAX opens every GPU it sees (a CUDA context of several hundred MiB on each, per process).
  ``restrict_gpus()`` (called once JAX is imported, before its GPU backend starts) makes JAX use
  the rank's GPU only, through JAX's ``jax_cuda_visible_devices``: LOCAL_RANK, or LOCAL_RANK modulo
  the number of GPUs where ranks share GPUs. GATELOOP_HYBRID_JAX_GPUS=all (or a comma-separated
  list of CUDA device indices) chooses otherwise; a ``jax_cuda_visible_devices`` the user set
  first is kept. The bridge finds JAX's device for a torch tensor by the GPU's CUDA device
  ordinal (``bridge.convert.jax_gpu_for``), which is the same whichever GPUs JAX sees.
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
        from ._jax_private import started_backends
        backends = started_backends()
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
_GPUS_VAR = "GATELOOP_HYBRID_JAX_GPUS"


def visible_gpus(env, gpus: int) -> str | None:
    """The value for JAX's ``jax_cuda_visible_devices`` in a process with this environment and
    this many GPUs, or None to leave JAX's default (every GPU). Pure, for tests.

    GATELOOP_HYBRID_JAX_GPUS wins ("all", or indices such as "1" or "0,2"); else, under torchrun
    (WORLD_SIZE and LOCAL_RANK set), the rank's GPU: LOCAL_RANK modulo ``gpus``; else None.
    """
    chosen = env.get(_GPUS_VAR, "").strip()
    if chosen:
        if chosen == "all":
            return None
        try:
            indices = [int(x) for x in chosen.split(",")]
        except ValueError:
            indices = [-1]
        if any(i < 0 for i in indices):
            raise ValueError(f"{_GPUS_VAR}={chosen!r}: expected 'all' or comma-separated CUDA device indices")
        return ",".join(map(str, indices))
    if "WORLD_SIZE" in env and env.get("LOCAL_RANK", "").isdigit() and gpus > 0:
        return str(int(env["LOCAL_RANK"]) % gpus)
    return None


def restrict_gpus() -> None:
    """Apply ``visible_gpus`` to JAX (see the module docstring). Takes effect only if JAX's GPU
    backend has not started; if it has, and a restriction was due, warns once."""
    import jax
    try:
        if jax.config.values.get("jax_cuda_visible_devices", "all") != "all":
            return      # the user's choice
        gpus = _gpu_count()
        value = visible_gpus(os.environ, gpus)
        if value is None:
            return
        from ._jax_private import started_backends
        started = started_backends()
    except (AttributeError, ImportError):   # the flag or the private module moved: keep JAX's default
        return
    if started:     # JAX starts all its backends at once: too late to choose
        if not any(name in ("cuda", "gpu", "rocm") for name in started):
            return
        warnings.warn(
            f"JAX started before gateloop_hybrid's bridge was imported, so it uses every GPU, not only GPU {value} "
            "of this rank (a CUDA context on each, in every process). Import bridge (or gateloop_hybrid) before "
            "using JAX.", RuntimeWarning, stacklevel=3)
        return
    jax.config.update("jax_cuda_visible_devices", value)


def _gpu_count() -> int:
    """CUDA devices visible to this process, as torch counts them (0 without CUDA)."""
    try:
        import torch
        return torch.cuda.device_count()
    except Exception:   # a broken CUDA install: JAX will say so itself
        return 0


def cpu_dispatch() -> None:
    """Inline (synchronous) CPU dispatch for JAX, see the module docstring. Takes effect only if
    JAX's CPU client does not exist yet."""
    if os.environ.get(_ASYNC_VAR, "") not in ("", "0"):
        return
    try:
        import jax
        from ._jax_private import started_backends
        if "cpu" in started_backends():
            return      # too late: the CPU client was created with the user's setting
        jax.config.update("jax_cpu_enable_async_dispatch", False)
    except Exception:   # the flag or the private module moved: keep JAX's default
        return
