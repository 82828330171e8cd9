"""The JAX scans as torch functions through the XLA bridge (``bridge.jax2torch``).

``scan("jax" | "triton", a, x, h0, reverse)``. The Triton-lowered kernels take complex tensors as
(re, im) float pairs: torch views them so for free (view_as_real), where JAX would need a
conversion pass; gradients come back in torch's convention.
"""

from __future__ import annotations

import functools

import torch


def scan(path: str, a, x, h0, reverse: bool):
    """(h, h_last) of the scan on the bridged JAX kernels ``path`` ("jax" or "triton")."""
    if path == "jax":
        return bridged("jax", reverse=reverse)(*((a, x) if h0 is None else (a, x, h0)))
    flags = dict(complex_a=a.is_complex(), complex_x=x.is_complex(),
                 complex_h0=h0 is not None and h0.is_complex(), reverse=reverse)
    pairs = lambda t: torch.view_as_real(t) if t is not None and t.is_complex() else t
    tensors = (pairs(a), pairs(x)) if h0 is None else (pairs(a), pairs(x), pairs(h0))
    h, h_last = bridged("triton", **flags)(*tensors)
    if a.is_complex() or x.is_complex() or flags["complex_h0"]:
        h, h_last = torch.view_as_complex(h), torch.view_as_complex(h_last)
    return h, h_last


_BRIDGED: dict = {}


def _make(name: str, static: tuple):
    from bridge import jax2torch
    if name == "jax":
        from ..kernels.jax_scan import scan_jax as fn
    else:
        from ..kernels.pallas_scan import scan_pallas_ri as fn
    # The Pallas backward kernels have no derivative rules: a gradient of a gradient raises.
    backend = "pallas" if name == "triton" else name       # the name users asked for
    return jax2torch(functools.partial(fn, **dict(static)), name=f"gate_loop_scan_{backend}",
                     double_backward=name != "triton")


def bridged(name: str, **static):
    """The JAX implementation ``name`` with its static arguments bound, wrapped as a torch function
    (built on first use). Called with tensors only, the bridge takes its shortest path."""
    key = (name, tuple(sorted(static.items())))
    if key not in _BRIDGED:
        _BRIDGED[key] = _make(*key)
    return _BRIDGED[key]


def cache_clear() -> None:
    """Forget every bridged function (each is rebuilt on its next call)."""
    _BRIDGED.clear()
