"""gate_loop_mixer: the token mixing of one GateLoop layer, from its projections to its output.

Dimension letters: b batch, n time, h heads, d head dimension (d = e), I inner dimension (h d).

    a_t = sigmoid(|z_t|) exp(i arg z_t)          one complex gate per head and step
    h_t = a_t h_{t-1} + k_t v_t^T                (h, d, e) complex state
    y_t = q_t . Re(h_t)

With one feature per head (d = 1, GateLoop's default) on a GPU that runs the Mosaic GPU kernels,
all of it is one forward kernel and one backward kernel that read the projections as the layer's
Linear layers wrote them (mosaic_mixer.py): the gates and the complex state never go to memory,
except the states that backward reads when it does not recompute them. Elsewhere with d = 1 it is
the composition of torch ops around ``gate_loop_scan``; with d > 1 it is the chunked form
(chunked.py), which never forms a (d, e) state per token.

simple_gate_loop_mixer is SimpleGateLoopLayer's: one real gate per feature, fused the same way.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .chunked import chunked_heads, gate_preactivation, log_gates
from .scan import gate_loop_scan, jax_available, mosaic_available
from .scan.dispatch import _warn_once, isolated

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
    fused = (d == 1 and backend in ("auto", "pallas") and not (ablate_complex or ablate_state_transition)
             and qkv.is_cuda and qkv.dtype != torch.float64 and z.dtype != torch.float64
             and (h0 is None or h0.dtype == torch.complex64) and _mosaic_runs(qkv.device))
    if fused:
        b, n = qkv.shape[:2]
        h0_flat = None if h0 is None else h0.reshape(b, heads)
        args = (qkv, z) if h0_flat is None else (qkv, z, h0_flat)
        run = _fused_untraced if torch.compiler.is_compiling() else _fused
        out = run(float(frac_gradient), bool(recompute), *args)
        if out is not None:
            y, h_last = out
            return y, h_last.view(b, heads, 1, 1)
    return _composed(qkv, z, h0, heads, frac_gradient, ablate_complex, ablate_state_transition,
                     recompute, backend)


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
    out_dtype = qkva.dtype if h0 is None else torch.promote_types(qkva.dtype, h0.dtype)
    fused = (not reverse and backend in ("auto", "pallas") and qkva.is_cuda and out_dtype != torch.float64
             and _simple_fused_runs_on(qkva.device.type, qkva.device.index))
    if fused:
        run = _simple_fused_untraced if torch.compiler.is_compiling() else _simple_fused
        out = run(qkva) if h0 is None else run(qkva, h0)
        if out is not None:
            y, h_last = out
            return y.to(out_dtype), h_last.to(out_dtype)
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


def _mosaic_runs(device) -> bool:
    return _mosaic_runs_on(device.type, device.index)


def _assume_constant(fn):
    """Under torch.compile, run at trace time as plain Python and keep the result as a constant
    (the choice is made once per device; its self-test is not traceable)."""
    import torch._dynamo
    return torch._dynamo.assume_constant_result(fn)


@_assume_constant
def _mosaic_runs_on(device_type: str, index) -> bool:
    return jax_available() and mosaic_available(torch.device(device_type, index))


def _fused(frac, recompute, qkv, z, h0=None):
    if torch._C._are_functorch_transforms_active():    # the Mosaic ops have no vmap rule
        return None
    from .scan.mosaic_op import try_mixer_mosaic
    return try_mixer_mosaic(qkv, z, h0, frac, recompute)


def _untraced(fn):
    """Run by AOTAutograd but not traced by Dynamo (the kernels' plans and launches are plain
    Python, as gate_loop_scan's are)."""
    if not jax_available():
        return fn
    import torch._dynamo
    return torch._dynamo.nonstrict_trace(fn)


_fused_untraced = _untraced(_fused)


@_assume_constant
def _simple_fused_runs_on(device_type: str, index) -> bool:
    return _simple_fused_runs(torch.device(device_type, index))


@functools.cache
def _simple_fused_runs(device: torch.device) -> bool:
    """Whether the real-gate kernels run on ``device``: the Mosaic GPU kernels do, and these pass a
    self-test there (once per device; a failure warns once and the composition takes over)."""
    if not (jax_available() and mosaic_available(device)):
        return False
    problem = isolated(_simple_mixer_self_test, device)
    if problem:
        _warn_once(f"simple-mixer-{device}", f"simple_gate_loop_mixer: the fused kernels failed their "
                   f"self-test on {device} ({problem}); SimpleGateLoopLayer uses gate_loop_scan instead.")
    return not problem


def _simple_mixer_self_test(device) -> Optional[str]:
    """None if the real-gate kernels match the float64 composition on a small odd-length case with
    h0 on ``device`` (values and gradients), else what went wrong."""
    try:
        from .scan.mosaic_op import try_simple_mixer_mosaic
        g = torch.Generator().manual_seed(0)
        qkva = torch.randn(2, 37, 3 * 128, generator=g)
        h0 = torch.randn(2, 128, generator=g)
        with torch.enable_grad():      # the first call may come under no_grad
            leaves = [t.to(device).requires_grad_() for t in (qkva, h0)]
            y, h_last = try_simple_mixer_mosaic(*leaves)
            grads = torch.autograd.grad(y.square().sum() + h_last.sum(), leaves)
            wide = [t.detach().cpu().double().requires_grad_() for t in leaves]
            y_ref, last = simple_gate_loop_mixer(*wide, backend="loop")      # the composition
            refs = torch.autograd.grad(y_ref.square().sum() + last.sum(), wide)
        for got, want in zip((y, h_last, *grads), (y_ref, last, *refs)):
            if not torch.allclose(got.detach().cpu().double(), want, rtol=1e-4, atol=1e-4):
                return "results differ from the float64 composition"
    except Exception as e:     # any failure to compile or run means: do not pick it
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    return None


def _simple_fused(qkva, h0=None):
    if torch._C._are_functorch_transforms_active():
        return None
    from .scan.mosaic_op import try_simple_mixer_mosaic
    return try_simple_mixer_mosaic(qkva, h0)


_simple_fused_untraced = _untraced(_simple_fused)


def gates(z: Tensor, frac_gradient: float = 1.0, ablate_complex: bool = False,
          ablate_state_transition: bool = False) -> Tensor:
    """Complex gates a = sigmoid(|z|) exp(i arg z) from (..., 2) pre-activations, as (...) complex
    (float32 or wider)."""
    z = gate_preactivation(z, frac_gradient, ablate_complex)
    if ablate_state_transition:
        return torch.ones_like(z.real) + 0.0j
    # sigmoid on the magnitude, identity on the phase
    return torch.polar(z.abs().sigmoid(), z.angle())


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


def _composed(qkv, z, h0, heads, frac, ablate_complex, ablate_state_transition, recompute, backend,
              materialize=None):
    """The mixer as torch ops around gate_loop_scan: the scan of every k v^T with one feature per
    head, the chunked form (chunked.py) with more, unless ``materialize`` says otherwise."""
    b, n = qkv.shape[:2]
    q, k, v = (t.unflatten(-1, (heads, -1)) for t in qkv.chunk(3, dim=-1))  # each (b, n, h, d)
    if materialize is None:
        materialize = q.shape[-1] == 1
    if materialize:
        a = gates(z.reshape(b, n, heads, 1, 1, 2), frac, ablate_complex, ablate_state_transition)
        fn, args = _heads_scan, (q, k, v, a, h0, backend)
    else:
        log_mag, phase = log_gates(z.reshape(b, n, heads, 2), frac, ablate_complex, ablate_state_transition)
        fn, args = _heads_chunked, (q, k, v, log_mag, phase, h0, backend)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (qkv, z, h0))
    if needs_grad and recompute:
        y, h_last = checkpoint(fn, *args, use_reentrant=False)
    else:
        y, h_last = fn(*args)
    return y.flatten(-2), h_last


def _heads_chunked(q, k, v, log_mag, phase, h0, backend):
    return chunked_heads(q, k, v, log_mag, phase, h0, backend=backend)
