"""gate_loop_mixer: the token mixing of one GateLoop layer, from its projections to its output.

Dimension letters: b batch, n time, h heads, d head dimension (d = e), I inner dimension (h d).

    a_t = sigmoid(|z_t|) exp(i arg z_t)          one complex gate per head and step
    h_t = a_t h_{t-1} + k_t v_t^T                (h, d, e) complex state
    y_t = q_t . Re(h_t)

Which form computes a call is ``routing.route("mixer", ...)``'s choice:

    "fused"     one feature per head (d = 1, GateLoop's default) on a GPU that runs the Mosaic GPU
                kernels: one forward and one backward kernel that read the projections as the
                layer's Linear layers wrote them (kernels/mosaic_mixer.py); the gates and the
                complex state never go to memory, except the states that backward reads when it
                does not recompute them
    "composed"  torch ops around ``gate_loop_scan`` (composed_mixer), the fused kernels' reference
    "rotated"   heads of 32, 64 or 128 features in bfloat16 or float16, with backend "pallas", on a GPU that
                runs the Mosaic GPU kernels: scalar-decay linear attention on rotated keys
                (ops/rotated.py), each head's (2d, d) state on chip; rotated.py is its torch reference
    "chunked"   other heads wider than one feature: chunked.py (q k^T weighted by the gates' decay
                and cosine, in chunks), which never forms a (d, e) state per token (on an H100
                inside the compiled training step it ran 10% faster than rotated.py's torch form)

simple_gate_loop_mixer is SimpleGateLoopLayer's: one real gate per feature, fused the same way.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from . import _private, routing
from .checks import check_options
from .chunked import chunked_heads
from .gates import gates, log_gates
from .scan import gate_loop_scan

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def gate_loop_mixer(
    qkv: Tensor,
    z: Tensor,
    h0: Optional[Tensor] = None,
    *,
    heads: int,
    frac_gradient: float = 1.0,
    ablate_complex: bool = False,
    ablate_state_transition: bool = False,
    recompute: bool = False,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """GateLoop's mixer: gates from z, the complex scan of k v^T, and y = q Re(h).

    Args:
        qkv: (b, n, 3 I), q, k and v side by side (one Linear's output), I = heads * d.
        z: (b, n, 2 heads), each head's gate pre-activation as (re, im).
        h0: (b, heads, d, d) complex state to continue from (a cache), or None.
        heads: number of heads h.
        frac_gradient: fraction of z's gradient passed back (the seed's
            frac_gradient_state_transition); the values are unchanged.
        ablate_complex: use only the real part of z.
        ablate_state_transition: a = 1 (a cumulative sum of k v^T).
        recompute: backward recomputes the states instead of keeping them from forward (the
            seed's checkpoint_gate_looped_attn).
        backend: the ``gate_loop_scan`` backend; "auto" and "pallas" take the fused kernels where
            they run (CUDA, Hopper or newer, d = 1, heads a multiple of 128, 16- or 32-bit inputs,
            no ablation).

    Returns:
        y (b, n, I) in qkv's dtype, and the final state (b, heads, d, d), complex (complex64 for
        16- and 32-bit inputs). Differentiable in qkv, z and h0; the fused kernels once only (a
        second derivative raises).
    """
    d = _check(qkv, z, h0, heads)
    check_options("gate_loop_mixer", frac_gradient=frac_gradient, ablate_complex=ablate_complex,
                   ablate_state_transition=ablate_state_transition, recompute=recompute)
    path = _route("mixer", backend, qkv.device.type, qkv.device.index,
                  str(torch.promote_types(qkv.dtype, z.dtype)), heads, d, False,
                  ablate_complex or ablate_state_transition,
                  qkv.shape[0] > 0 and (h0 is None or h0.dtype == torch.complex64))
    if path == "fused":
        b, n = qkv.shape[:2]
        h0_flat = None if h0 is None else h0.reshape(b, heads)
        args = (qkv, z) if h0_flat is None else (qkv, z, h0_flat)
        run = _fused_untraced if torch.compiler.is_compiling() else _fused
        y, h_last = run(float(frac_gradient), bool(recompute), *args)
        return y, h_last.view(b, heads, 1, 1)
    if path == "rotated":       # the kernels recompute in backward: recompute changes nothing there
        return _wide_kernels(qkv, z, h0, heads, frac_gradient, ablate_complex, ablate_state_transition)
    return composed_mixer(qkv, z, h0, heads=heads, frac=frac_gradient, ablate_complex=ablate_complex,
                          ablate_state_transition=ablate_state_transition, recompute=recompute,
                          backend=backend, chunked=path == "chunked")


def simple_gate_loop_mixer(
    qkva: Tensor,
    h0: Optional[Tensor] = None,
    *,
    reverse: bool = False,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """SimpleGateLoopLayer's mixer, per feature and real: a = sigmoid(za), h_t = a_t h_{t-1} + kv_t,
    y_t = q_t h_t.

    Args:
        qkva: (b, n, 3 D), q, kv and the gate pre-activation za side by side (one Linear's output).
        h0: (b, D) real state to continue from (a cache), or None.
        reverse: run the recurrence from the last position to the first.
        backend: the ``gate_loop_scan`` backend; "auto" and "pallas" take one fused forward and one
            backward Mosaic GPU kernel where they run (CUDA, Hopper or newer, D a multiple of 128,
            16- or 32-bit inputs, not reversed).

    Returns:
        y (b, n, D) and the final state (b, D), both in the dtype ``gate_loop_scan`` gives the
        composition (qkva's, promoted with h0's). Differentiable in qkva and h0; the fused kernels
        once only (a second derivative raises).
    """
    _check_simple(qkva, h0)
    check_options("simple_gate_loop_mixer", reverse=reverse)
    out_dtype = qkva.dtype if h0 is None else torch.promote_types(qkva.dtype, h0.dtype)
    path = _route("simple_mixer", backend, qkva.device.type, qkva.device.index, str(out_dtype),
                  qkva.shape[-1] // 3, 1, reverse, False, qkva.shape[0] > 0)
    if path == "fused":
        run = _simple_fused_untraced if torch.compiler.is_compiling() else _simple_fused
        y, h_last = run(qkva) if h0 is None else run(qkva, h0)
        return y.to(out_dtype), h_last.to(out_dtype)
    return composed_simple_mixer(qkva, h0, reverse=reverse, backend=backend)


def composed_simple_mixer(qkva: Tensor, h0: Optional[Tensor] = None, *, reverse: bool = False,
                          backend: str = "auto") -> tuple[Tensor, Tensor]:
    """simple_gate_loop_mixer as torch ops around gate_loop_scan (the fused kernels' reference)."""
    q, kv, za = qkva.chunk(3, dim=-1)
    h, h_last = gate_loop_scan(za.sigmoid(), kv, h0, reverse=reverse, backend=backend)
    return q * h, h_last


def _check_simple(qkva, h0) -> None:
    if not isinstance(qkva, Tensor):
        raise TypeError(f"simple_gate_loop_mixer: qkva must be a torch.Tensor, got {type(qkva).__name__}")
    if qkva.dtype not in _DTYPES:
        raise TypeError(f"simple_gate_loop_mixer: qkva has dtype {qkva.dtype}; expected float16, bfloat16, "
                        "float32 or float64")
    if qkva.dim() != 3 or qkva.shape[-1] % 3 or qkva.shape[1] == 0:
        raise ValueError(f"simple_gate_loop_mixer: qkva must be (batch, time >= 1, 3 * dim), got shape "
                         f"{tuple(qkva.shape)}")
    if h0 is not None:
        b, dim = qkva.shape[0], qkva.shape[2] // 3
        if not isinstance(h0, Tensor) or h0.dtype not in _DTYPES:
            raise TypeError(f"simple_gate_loop_mixer: h0 must be a real float tensor (the state), got "
                            f"{getattr(h0, 'dtype', type(h0).__name__)}")
        if tuple(h0.shape) != (b, dim):
            raise ValueError(f"simple_gate_loop_mixer: h0 must be (batch, dim) = {(b, dim)}, got {tuple(h0.shape)}")
        if h0.device != qkva.device:
            raise ValueError(f"simple_gate_loop_mixer: h0 is on {h0.device}, qkva on {qkva.device}")


def _check(qkv, z, h0, heads) -> int:
    """d, after checking every argument (one error naming the argument and the shapes)."""
    for name, t in (("qkv", qkv), ("z", z)):
        if not isinstance(t, Tensor):
            raise TypeError(f"gate_loop_mixer: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"gate_loop_mixer: {name} has dtype {t.dtype}; expected float16, bfloat16, "
                            "float32 or float64")
        if t.dim() != 3:
            raise ValueError(f"gate_loop_mixer: {name} must be (batch, time, features), got shape {tuple(t.shape)}")
    if not isinstance(heads, int) or heads < 1:
        raise ValueError(f"gate_loop_mixer: heads must be a positive int, got {heads!r}")
    b, n, width = qkv.shape
    if width % (3 * heads):
        raise ValueError(f"gate_loop_mixer: qkv's last dim ({width}) must be 3 * heads * d with heads={heads}, "
                         f"got shape {tuple(qkv.shape)}")
    if tuple(z.shape) != (b, n, 2 * heads):
        raise ValueError(f"gate_loop_mixer: z must be (batch, time, 2 * heads) = {(b, n, 2 * heads)}, "
                         f"got {tuple(z.shape)}")
    if n == 0:
        raise ValueError(f"gate_loop_mixer: qkv has no time steps, shape {tuple(qkv.shape)}")
    if z.device != qkv.device:
        raise ValueError(f"gate_loop_mixer: qkv is on {qkv.device}, z on {z.device}")
    d = width // (3 * heads)
    if h0 is not None:
        if not isinstance(h0, Tensor) or not h0.is_complex():
            raise TypeError(f"gate_loop_mixer: h0 must be a complex tensor (the state), got "
                            f"{getattr(h0, 'dtype', type(h0).__name__)}")
        if tuple(h0.shape) != (b, heads, d, d):
            raise ValueError(f"gate_loop_mixer: h0 must be (batch, heads, d, d) = {(b, heads, d, d)}, "
                             f"got {tuple(h0.shape)}")
        if h0.device != qkv.device:
            raise ValueError(f"gate_loop_mixer: h0 is on {h0.device}, qkv on {qkv.device}")
    return d


@_private.trace_time_constant
def _route(op, backend, device_type, index, dtype, heads, width, reverse, ablation, kernel_takes) -> str:
    """routing.route's path for a mixer call, from plain values: under torch.compile it runs once at
    trace time and the path is kept as a constant (the self-tests behind it are not traceable)."""
    device = device_type if index is None else f"{device_type}:{index}"
    return routing.route(op, backend, device=device, dtype=dtype, heads=heads, width=width, reverse=reverse,
                         ablation=ablation, kernel_takes=kernel_takes,
                         transforms=_private.functorch_active()).path


def _fused(frac, recompute, qkv, z, h0=None):
    from .ops.mosaic import try_mixer_mosaic
    return try_mixer_mosaic(qkv, z, h0, frac, recompute)


def _simple_fused(qkva, h0=None):
    from .ops.mosaic import try_simple_mixer_mosaic
    return try_simple_mixer_mosaic(qkva, h0)


# Run by AOTAutograd but not traced by Dynamo: the kernels' plans and launches are plain Python,
# as gate_loop_scan's are.
_fused_untraced = _private.untraced(_fused) if routing.jax_available() else _fused
_simple_fused_untraced = _private.untraced(_simple_fused) if routing.jax_available() else _simple_fused


def _heads_scan(q: Tensor, k: Tensor, v: Tensor, a: Tensor, h0: Optional[Tensor], backend: str):
    """y_t = q_t . Re(h_t) with h_t = a_t h_{t-1} + k_t v_t^T, per (batch, head).

    q, k, v: (b, n, h, d) real. a: (b, n, h, 1, 1) complex (one gate per head, never expanded).
    h0: (b, h, d, e) complex or None. Returns y (b, n, h, e) and the final state (b, h, d, e).
    Time stays dim 1 and the features (h, d, e) stay contiguous, the layout the projections
    produce: no transposes around the scan, and coalesced rows for the GPU kernels.
    """
    kv = torch.einsum("b n h d, b n h e -> b n h d e", k, v)  # real; the scan promotes to complex
    h, h_last = gate_loop_scan(a, kv, h0, backend=backend)  # (b, n, h, d, e) complex
    y = torch.einsum("b n h d, b n h d e -> b n h e", q, h.real.to(q.dtype))
    return y, h_last


def composed_mixer(qkv: Tensor, z: Tensor, h0: Optional[Tensor], *, heads: int, frac: float = 1.0,
                   ablate_complex: bool = False, ablate_state_transition: bool = False, recompute: bool = False,
                   backend: str = "auto", chunked: bool = False) -> tuple[Tensor, Tensor]:
    """The mixer as torch ops around gate_loop_scan (the fused kernels' reference): the scan of
    every k v^T, or with ``chunked`` the chunked form (chunked.py)."""
    b, n = qkv.shape[:2]
    q, k, v = _split_heads(qkv, heads)
    if chunked:
        log_mag, phase = log_gates(z.reshape(b, n, heads, 2), frac, ablate_complex, ablate_state_transition)
        fn, args = _heads_chunked, (q, k, v, log_mag, phase, h0, backend)
    else:
        a = gates(z.reshape(b, n, heads, 1, 1, 2), frac, ablate_complex, ablate_state_transition)
        fn, args = _heads_scan, (q, k, v, a, h0, backend)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (qkv, z, h0))
    if needs_grad and recompute:
        y, h_last = checkpoint(fn, *args, use_reentrant=False)
    else:
        y, h_last = fn(*args)
    return y.flatten(-2), h_last


def _heads_chunked(q, k, v, log_mag, phase, h0, backend):
    return chunked_heads(q, k, v, log_mag, phase, h0, backend=backend)


def _split_heads(qkv: Tensor, heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v (b, n, h, d), views of qkv (b, n, 3 h d)."""
    return tuple(t.unflatten(-1, (heads, -1)) for t in qkv.chunk(3, dim=-1))


def _wide_kernels(qkv, z, h0, heads, frac, ablate_complex, ablate_state_transition):
    """(y (b, n, I), h_last) on the wide-head kernels (ops/rotated.py): the gates as the chunked
    form takes them (float32 for 16-bit z); the kernels read q, k and v in place from qkv."""
    from .ops.rotated import rotated_qkv_mosaic
    b, n = qkv.shape[:2]
    log_mag, phase = log_gates(z.reshape(b, n, heads, 2), frac, ablate_complex, ablate_state_transition)
    y, h_last = rotated_qkv_mosaic(qkv, log_mag.float(), phase.float(), h0, heads=heads)
    return y.flatten(-2), h_last
