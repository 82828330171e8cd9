"""gate_loop_scan on torch tensors: the input checks, then the path ``gateloop_hybrid.routing``
chooses.

Backends (``routing.BACKENDS``; "auto" is resolved by the routing function only):

    "pallas"   Pallas GPU kernels (CUDA tensors; a GPU build of JAX): on Hopper and newer, Mosaic
               GPU kernels launched straight from torch (ops/mosaic.py); elsewhere, or for gate
               layouts those kernels do not take, Triton-lowered kernels through the bridge
    "jax"      jax.lax.associative_scan under jit through the bridge, with a reverse-scan backward
    "torch"    odd/even associative scan in plain torch
    "heinsen"  log-space scan in plain torch (see torch_scan.scan_heinsen for its precision limits)
    "loop"     a sequential loop in plain torch (slow; exact up to one rounding per step)

"auto" takes the Mosaic kernels for CUDA tensors of 32 bits and narrower where they pass their
self-test, else the Triton-lowered kernels where those pass theirs, else "jax" when JAX has a
backend for the tensors' device, else "torch" (each fallback warns once, saying why).
``gateloop_hybrid.explain("scan", ...)`` says which and why.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .. import _private, routing
from ..routing import jax_available
from . import torch_scan

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64,
                 torch.complex64, torch.complex128)
_TORCH_BACKENDS = {
    "loop": torch_scan.scan_loop,
    "torch": torch_scan.scan_odd_even,
    "heinsen": torch_scan.scan_heinsen,
}


def gate_loop_scan(a: Tensor, x: Tensor, h0: Tensor | None = None, *, reverse: bool = False,
                   backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Run h_t = a_t * h_{t-1} + x_t along dim 1 and return (h, h_last).

    Args:
        a: gates, (B, N, *Fa) with Fa broadcastable to F (each dim 1 or equal), e.g. one gate
           per head (B, N, 1, 1) against a (B, N, d, e) state. Real or complex.
        x: inputs, (B, N, *F). Real or complex (real x with complex a is fine).
        h0: state before the first step, (B, *F); zeros when None. With ``reverse`` the first
           step is the last time index.
        reverse: run from t = N-1 down to 0 (h_t = a_t * h_{t+1} + x_t).
        backend: one of BACKENDS; see the module docstring.

    Returns:
        h: (B, N, *F), every state; h_last: (B, *F), the state after the final step.
        Dtype: torch.promote_types of a, x (and h0). float16/bfloat16 accumulate in float32 and
        come back in their own dtype. Gradients flow to a, x and h0 (torch's complex convention).
        h_last is its own tensor, never a view of h.

    Non-finite inputs give non-finite outputs in every backend ("heinsen" gives NaN where the
    others give +-inf). Gradients of gradients (create_graph=True) work in every backend but
    "pallas", which raises (``bridge.DoubleBackwardError``; on the Mosaic kernels, torch's
    RuntimeError for a once-differentiable function). ``torch.vmap`` and ``torch.func``'s
    reverse-mode transforms work in every backend; forward mode (jvp, jacfwd) in "loop", "torch"
    and "heinsen" only (the JAX backends raise NotImplementedError).
    """
    if not isinstance(reverse, bool):
        raise TypeError(f"gate_loop_scan: reverse must be a bool, got {type(reverse).__name__} {reverse!r}")
    if torch.compiler.is_compiling():
        _check_inputs(a, x, h0)
        return _scan_untraced(reverse, backend, *((a, x) if h0 is None else (a, x, h0)))
    return _scan(reverse, backend, a, x, h0)


def _scan(reverse, backend, a, x, h0=None):
    facts = _facts(a, x, h0)
    path = routing.route("scan", backend, device=facts.device, dtype=facts.dtype_name,
                         kernel_takes=facts.kernel_takes, transforms=_private.functorch_active()).path
    out_dtype = facts.dtype
    compute = _compute_dtype(out_dtype)
    if path in _TORCH_BACKENDS:
        h0c = None if h0 is None else h0.to(compute)
        h, h_last = _TORCH_BACKENDS[path](a.to(compute), x.to(compute), h0c, reverse)
    elif path == "mosaic":
        from ..ops.mosaic import scan_mosaic
        h, h_last = scan_mosaic(a, x, h0, reverse)
    else:
        from ..ops import bridged
        h, h_last = bridged.scan(path, a, x, h0, reverse)
    if h.dtype != out_dtype:
        h, h_last = h.to(out_dtype), h_last.to(out_dtype)
    return h, h_last


class _Facts(NamedTuple):
    """What the checks found about one call signature, and what routing asks of it."""
    dtype: torch.dtype          # the output dtype (a, x and h0 promoted)
    dtype_name: str
    device: str
    kernel_takes: bool          # the Mosaic kernels take these shapes and dtypes


_FACTS: dict = {}
_MAX_FACTS = 1024


def _facts(a, x, h0) -> _Facts:
    """The checks' verdict on a call: worked out (or raised) on a signature's first call and
    looked up after, since checking costs several times a small call's launch. The signature
    holds every property the checks read: type, layout, shape, dtype and device of each tensor
    (a nested tensor has no shape, so it is always checked)."""
    try:
        signature = (type(a), a.layout, a.shape, a.dtype, a.device, type(x), x.layout, x.shape, x.dtype, x.device,
                     None if h0 is None else (type(h0), h0.layout, h0.shape, h0.dtype, h0.device))
        facts = _FACTS.get(signature)
    except (AttributeError, RuntimeError, TypeError):   # not tensors, nested, symbolic sizes
        signature = facts = None
    if facts is None:
        out_dtype = _check_inputs(a, x, h0)
        facts = _Facts(out_dtype, str(out_dtype).removeprefix("torch."), str(x.device), _mosaic_takes(a, x, h0))
        if signature is not None:
            if len(_FACTS) >= _MAX_FACTS:
                _FACTS.clear()
            _FACTS[signature] = facts
    return facts


def _mosaic_takes(a, x, h0) -> bool:
    """Whether the Mosaic kernels take these shapes and dtypes (asked only of CUDA tensors)."""
    if not x.is_cuda:
        return False
    from ..ops.mosaic import takes
    return takes(a, x, h0)


def _untraced_by_dynamo(fn):
    """Under torch.compile, the route and the bridged call run as plain Python (traced by
    AOTAutograd, not by Dynamo): a first call imports JAX, queries its devices and builds the
    bridged function (caches, weak references), none of which Dynamo can trace. So a first call
    compiles cold with fullgraph=True, inside torch.utils.checkpoint too. Without JAX, only the
    torch backends exist and Dynamo traces them (and importing torch._dynamo, about a second,
    is left to torch.compile; with JAX the bridge imports it anyway)."""
    return _private.untraced(fn) if jax_available() else fn


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _check_inputs(a, x, h0) -> torch.dtype:
    for name, t in (("a", a), ("x", x), ("h0", h0)):
        if t is None and name == "h0":
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"gate_loop_scan: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.is_nested or t.layout is not torch.strided:
            raise TypeError(f"gate_loop_scan: {name} must be a dense (strided) tensor, got "
                            f"{'a nested tensor' if t.is_nested else f'layout {t.layout}'}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"gate_loop_scan: {name} has dtype {t.dtype}; expected a floating or "
                            "complex dtype (float16, bfloat16, float32, float64, complex64, complex128)")
    if x.dim() < 2:
        raise ValueError(f"gate_loop_scan: x must be (batch, time, *features), got shape {tuple(x.shape)}")
    if a.dim() != x.dim():
        raise ValueError(f"gate_loop_scan: a and x must have the same number of dims (broadcast a "
                         f"with size-1 feature dims), got a {tuple(a.shape)} and x {tuple(x.shape)}")
    if a.shape[0] != x.shape[0]:
        raise ValueError(f"gate_loop_scan: batch sizes differ: a {tuple(a.shape)}, x {tuple(x.shape)}")
    if a.shape[1] != x.shape[1]:
        raise ValueError(f"gate_loop_scan: time lengths (dim 1) differ: a has {a.shape[1]} steps "
                         f"{tuple(a.shape)}, x has {x.shape[1]} {tuple(x.shape)}")
    if x.shape[1] == 0:
        raise ValueError(f"gate_loop_scan: x has no time steps, shape {tuple(x.shape)}")
    if any(sa not in (1, sx) for sa, sx in zip(a.shape[2:], x.shape[2:])):
        raise ValueError(f"gate_loop_scan: a's feature dims {tuple(a.shape[2:])} do not broadcast "
                         f"to x's {tuple(x.shape[2:])} (each must be 1 or equal)")
    expected_h0 = (x.shape[0], *x.shape[2:])
    if h0 is not None and tuple(h0.shape) != expected_h0:
        raise ValueError(f"gate_loop_scan: h0 must have shape (batch, *features) = {expected_h0}, "
                         f"got {tuple(h0.shape)}")
    devices = {t.device for t in (a, x, h0) if t is not None}
    if len(devices) > 1:
        raise ValueError("gate_loop_scan: a, x and h0 must be on one device, got "
                         + ", ".join(f"{n} on {t.device}" for n, t in (("a", a), ("x", x), ("h0", h0))
                                     if t is not None))
    return _out_dtype(a, x, h0)


def _out_dtype(a, x, h0) -> torch.dtype:
    dtype = torch.promote_types(a.dtype, x.dtype)
    return dtype if h0 is None else torch.promote_types(dtype, h0.dtype)


_scan_untraced = _untraced_by_dynamo(_scan)
