"""Every private JAX and torch call the package makes, in one place, because they move.

Each is imported where it is first used (importing this module imports neither framework), and
a missing one raises ``PrivateAPIMissing`` naming the installed version and the versions it was
checked against, rather than an AttributeError deep inside a kernel.

JAX (checked with jax 0.10.2 and 0.11.2):
- ``mosaic_interpret_params``: Pallas's Mosaic GPU interpret mode, which runs the Mosaic kernels
  on the CPU (tests);
- ``triton_lowering``: the Triton dialect and Pallas's Triton lowering, which the Triton-lowered
  scan hooks to annotate its software pipelines.

torch (checked with torch 2.11 and 2.13):
- ``functorch_active``: whether a torch.func transform is running (the Mosaic ops have no vmap rule);
- ``untraced``: ``torch._dynamo.nonstrict_trace``, a function torch.compile runs as plain Python;
- ``trace_time_constant``: ``torch._dynamo.assume_constant_result``, a function run once at trace
  time whose result is kept as a constant.
"""

from __future__ import annotations

import importlib

CHECKED = {"jax": ("0.10.2", "0.11.2"), "torch": ("2.11", "2.13")}


class PrivateAPIMissing(ImportError):
    """A private JAX or torch API this package relies on is not in the installed version."""


def _missing(framework: str, what: str, error: Exception) -> PrivateAPIMissing:
    try:
        version = importlib.import_module(framework).__version__
    except Exception:  # noqa: BLE001  (the message matters more than the version)
        version = "unknown"
    lo, hi = CHECKED[framework]
    return PrivateAPIMissing(f"{what} is not available in {framework} {version} (checked with "
                             f"{framework} {lo} to {hi}): {type(error).__name__}: {error}")


# ---------------------------------------------------------------------------------------------
# JAX


def mosaic_interpret_params():
    """``plgpu.kernel(..., interpret=mosaic_interpret_params())`` runs the kernel on the CPU."""
    try:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    except ImportError as e:
        raise _missing("jax", "Pallas's Mosaic GPU interpret mode", e) from None
    return InterpretGPUParams()


def triton_lowering():
    """(mlir ir, Triton dialect, Pallas's Triton lowering module, its pallas_call registration),
    or None on a JAX build without the Triton dialect (CPU-only wheels)."""
    try:
        from jax._src.lib.mlir import ir
        from jax._src.lib.triton import dialect
        from jax._src.pallas.triton import lowering, pallas_call_registration
    except ImportError:
        return None
    return ir, dialect, lowering, pallas_call_registration


# ---------------------------------------------------------------------------------------------
# torch


def functorch_active() -> bool:
    import torch
    return torch._C._are_functorch_transforms_active()


def untraced(fn):
    """fn, run by AOTAutograd but not traced by Dynamo: torch.compile records what it does to
    tensors and runs its Python (plans, caches, kernel launches) as it is."""
    import torch._dynamo
    return torch._dynamo.nonstrict_trace(fn)


def trace_time_constant(fn):
    """fn, run at trace time as plain Python with its result kept as a constant: for choices made
    once per device whose self-tests Dynamo cannot trace."""
    import torch._dynamo
    return torch._dynamo.assume_constant_result(fn)

