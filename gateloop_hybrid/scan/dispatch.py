"""gate_loop_scan on torch tensors: the input checks, the backend choice and the call.

Backends (the only place "auto" is resolved is ``resolve_backend``):

    "pallas"   Pallas GPU kernels (CUDA tensors; a GPU build of JAX): on Hopper and newer, Mosaic
               GPU kernels launched straight from torch (mosaic_op.py); elsewhere, or for gate
               layouts those kernels do not take, Triton-lowered kernels through the bridge
    "jax"      jax.lax.associative_scan under jit through the bridge, with a reverse-scan backward
    "torch"    odd/even associative scan in plain torch
    "heinsen"  log-space scan in plain torch (see torch_scan.scan_heinsen for its precision limits)
    "loop"     a sequential loop in plain torch (slow; exact up to one rounding per step)

"auto" picks "pallas" for CUDA tensors (32 bits and narrower) when its kernels pass a self-test
on the GPU, else "jax" when JAX is installed and has a backend for the tensors' device, else
"torch" (each fallback warns once, saying why).
"""

from __future__ import annotations

import functools
import importlib.util
import threading
import warnings

import torch
from torch import Tensor

from . import torch_scan

BACKENDS = ("auto", "pallas", "jax", "torch", "heinsen", "loop")
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
    _check_inputs(a, x, h0)
    if torch.compiler.is_compiling():
        return _scan_untraced(reverse, backend, *((a, x) if h0 is None else (a, x, h0)))
    return _scan(reverse, backend, a, x, h0)


def _scan(reverse, backend, a, x, h0=None):
    out_dtype = _out_dtype(a, x, h0)
    name = resolve_backend(backend, x.device, out_dtype)
    compute = _compute_dtype(out_dtype)
    if name in _TORCH_BACKENDS:
        h0c = None if h0 is None else h0.to(compute)
        h, h_last = _TORCH_BACKENDS[name](a.to(compute), x.to(compute), h0c, reverse)
    elif name == "pallas":
        h, h_last = _pallas(a, x, h0, reverse)
    else:
        h, h_last = _bridged(name, reverse=reverse)(*((a, x) if h0 is None else (a, x, h0)))
    if h.dtype != out_dtype:
        h, h_last = h.to(out_dtype), h_last.to(out_dtype)
    return h, h_last


def _untraced_by_dynamo(fn):
    """Under torch.compile, the backend choice and the bridged call run as plain Python (traced by
    AOTAutograd, not by Dynamo): a first call imports JAX, queries its devices and builds the
    bridged function (caches, weak references), none of which Dynamo can trace. So a first call
    compiles cold with fullgraph=True, inside torch.utils.checkpoint too. Without JAX, only the
    torch backends exist and Dynamo traces them (and importing torch._dynamo, about a second,
    is left to torch.compile; with JAX the bridge imports it anyway)."""
    if not jax_available():
        return fn
    import torch._dynamo
    return torch._dynamo.nonstrict_trace(fn)


def _pallas(a, x, h0, reverse):
    """Mosaic GPU kernels launched straight from torch where the GPU and shapes allow (Hopper
    and newer), else the Triton-lowered Pallas kernels through the bridge. Both take complex
    tensors as (re, im) float pairs: torch views them so for free (view_as_real), where JAX
    would need a conversion pass; gradients come back in torch's convention."""
    # Under torch.func transforms the bridged kernels run (batched by jax.vmap); the Mosaic op has
    # no vmap rule.
    if mosaic_available(x.device) and not torch._C._are_functorch_transforms_active():
        out = _mosaic_op().try_scan_mosaic(a, x, h0, reverse)
        if out is not None:
            return out
    flags = dict(complex_a=a.is_complex(), complex_x=x.is_complex(),
                 complex_h0=h0 is not None and h0.is_complex(), reverse=reverse)
    pairs = lambda t: torch.view_as_real(t) if t is not None and t.is_complex() else t
    tensors = (pairs(a), pairs(x)) if h0 is None else (pairs(a), pairs(x), pairs(h0))
    h, h_last = _bridged("pallas", **flags)(*tensors)
    if a.is_complex() or x.is_complex() or flags["complex_h0"]:
        h, h_last = torch.view_as_complex(h), torch.view_as_complex(h_last)
    return h, h_last


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


# ---------------------------------------------------------------------------------------------
# Backend choice


def _memo(fn):
    """functools.cache as a plain dict lookup: torch.compile traces through it without warning
    (it warns on every lru_cache wrapper it meets in a compiled model)."""
    cache = {}

    @functools.wraps(fn)
    def memoized(*args, **kwargs):
        key = (args, tuple(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = fn(*args, **kwargs)
        return cache[key]
    memoized.cache_clear = cache.clear
    return memoized


@_memo
def jax_available() -> bool:
    return importlib.util.find_spec("jax") is not None


@_memo
def jax_has_device(device_type: str) -> bool:
    """Whether JAX has a backend for torch's device type ("cpu" or "cuda")."""
    if not jax_available():
        return False
    import bridge  # noqa: F401  (sets JAX's GPU memory policy before JAX starts)
    import jax
    try:
        return len(jax.devices("cpu" if device_type == "cpu" else "cuda")) > 0
    except RuntimeError:
        return False


@_memo
def pallas_available() -> bool:
    """Whether the Pallas kernels run here: JAX has a CUDA device and the kernels pass a small
    self-test on it (once per process; a failure warns once and "auto" takes "jax")."""
    if not jax_has_device("cuda"):
        return False
    import jax
    problem = pallas_self_test(jax.devices("cuda")[0])
    if problem:
        _warn_once("pallas", f"gate_loop_scan: the Pallas kernels failed their self-test on this GPU "
                   f"({problem}); backend='auto' uses 'jax' instead.")
    return not problem


def _mosaic_op():
    from . import mosaic_op
    return mosaic_op


@_memo
def mosaic_available(device: torch.device) -> bool:
    """Whether the Mosaic GPU kernels run on ``device``: a CUDA GPU of compute capability 9.0 or
    newer, JAX's CUDA plugin with the kernel launcher, and a passing self-test (once per device;
    a failure warns once and the Triton-lowered kernels take over)."""
    if device.type != "cuda" or not jax_has_device("cuda"):
        return False
    if torch.cuda.get_device_capability(device) < (9, 0):
        return False
    problem = isolated(mosaic_self_test, device)
    if problem:
        _warn_once(f"mosaic-{device}", f"gate_loop_scan: the Mosaic GPU kernels failed their self-test on "
                   f"{device} ({problem}); backend='pallas' uses the Triton-lowered kernels instead.")
    return not problem


def isolated(fn, *args):
    """fn(*args) on a fresh thread, so that none of the caller's thread-local state reaches it:
    grad mode, autocast, the saved-tensor hooks of torch.utils.checkpoint (a first call often
    comes from inside a checkpointed layer), torch.compile's fake tensors, the current stream."""
    result = []
    worker = threading.Thread(target=lambda: result.append(fn(*args)), name="gateloop_hybrid self-test")
    worker.start()
    worker.join()
    if not result:
        raise RuntimeError(f"{getattr(fn, '__name__', fn)} raised on its thread (see the message above)")
    return result[0]


def mosaic_self_test(device) -> str | None:
    """None if the Mosaic GPU scan matches the float64 reference on a small odd-length complex
    case with h0 on ``device`` (values and gradients), else what went wrong."""
    try:
        from .reference import scan_reference
        g = torch.Generator().manual_seed(0)
        a = torch.polar(0.5 + 0.5 * torch.rand(2, 37, 128, generator=g),
                        6 * torch.rand(2, 37, 128, generator=g) - 3)
        x = torch.randn(2, 37, 128, generator=g, dtype=torch.complex64)
        h0 = torch.randn(2, 128, generator=g, dtype=torch.complex64)
        with torch.enable_grad():      # the first call may come under no_grad
            leaves = [t.to(device).requires_grad_() for t in (a, x, h0)]
            h, h_last = _mosaic_op().scan_mosaic(*leaves)
            grads = torch.autograd.grad(h.abs().sum() + h_last.real.sum(), leaves)
            ref_leaves = [t.detach().cpu().to(torch.complex128).requires_grad_() for t in leaves]
            h_ref, last_ref = scan_reference(*ref_leaves)
            ref_grads = torch.autograd.grad(h_ref.abs().sum() + last_ref.real.sum(), ref_leaves)
        for got, want in zip((h, h_last, *grads), (h_ref, last_ref, *ref_grads)):
            if not torch.allclose(got.detach().cpu().to(torch.complex128), want, rtol=1e-4, atol=1e-4):
                return "results differ from the float64 reference"
    except Exception as e:     # any failure to compile or run means: do not pick it
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    return None


def pallas_self_test(device, interpret: bool = False) -> str | None:
    """None if the Pallas scan matches the associative scan on a small odd-sized case on
    ``device`` (values and gradients), else what went wrong."""
    try:
        import bridge  # noqa: F401  (sets JAX's GPU memory policy in case this starts JAX)
        import jax
        import jax.numpy as jnp
        from .jax_scan import scan_jax
        from .pallas_scan import scan_pallas
        n = 2 * 37 * 3
        a = jax.device_put((0.5 + 0.4 * jnp.sin(jnp.arange(n, dtype=jnp.float32)) ** 2).reshape(2, 37, 3), device)
        x = jax.device_put(jnp.cos(jnp.arange(n, dtype=jnp.float32)).reshape(2, 37, 3), device)
        loss = lambda fn: lambda a, x: jnp.sum(fn(a, x)[0] * x)
        got = jax.value_and_grad(loss(lambda a, x: scan_pallas(a, x, interpret=interpret)), (0, 1))(a, x)
        want = jax.value_and_grad(loss(scan_jax), (0, 1))(a, x)
        for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
            if not bool(jnp.allclose(g, w, rtol=1e-4, atol=1e-4)):
                return "results differ from the associative scan"
    except Exception as e:     # any failure to compile or run means: do not pick it
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    return None


_warned: set = set()


def _warn_once(key: str, message: str):
    if torch.compiler.is_compiling():
        return      # Dynamo cannot trace warnings.warn; the eager path says it
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def resolve_backend(backend: str, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32) -> str:
    """The backend ``backend`` names for tensors of ``dtype`` on ``device``; "auto" is resolved
    here only."""
    if backend not in BACKENDS:
        raise ValueError(f"gate_loop_scan: unknown backend {backend!r}; choose one of {BACKENDS}")
    device_type = torch.device(device).type
    if backend in ("jax", "pallas") and not jax_available():
        raise ImportError(f"gate_loop_scan: backend={backend!r} needs JAX, which is not installed. "
                          "Install it with: pip install 'gateloop-hybrid[cuda]' on a CUDA machine "
                          "(JAX with its CUDA plugin) or pip install jax on CPU.")
    if backend == "pallas" and device_type != "cuda":
        raise ValueError(f"gate_loop_scan: backend='pallas' runs on CUDA tensors only, got {device_type} "
                         "tensors (use backend='jax' or 'auto')")
    if backend != "auto":
        return backend
    if device_type == "cuda" and dtype not in (torch.float64, torch.complex128) and pallas_available():
        return "pallas"     # the kernels compute in float32; 64-bit inputs take the jax backend
    if jax_has_device(device_type):
        return "jax"
    why = ("JAX is not installed" if not jax_available()
           else f"JAX has no {device_type} backend (install a CUDA build: pip install 'gateloop-hybrid[cuda]')")
    _warn_once(f"auto-{device_type}", f"gate_loop_scan: backend='auto' uses 'torch' on {device_type} "
               f"because {why}.")
    return "torch"


@_memo
def _bridged(name: str, **static):
    """The JAX implementation ``name`` with its static arguments bound, wrapped as a torch function
    (built on first use). Called with tensors only, the bridge takes its shortest path."""
    from bridge import jax2torch
    if name == "jax":
        from .jax_scan import scan_jax as fn
    else:
        from .pallas_scan import scan_pallas_ri as fn
    # The Pallas backward kernels have no derivative rules: a gradient of a gradient raises.
    return jax2torch(functools.partial(fn, **static), name=f"gate_loop_scan_{name}",
                     double_backward=name != "pallas")


_scan_untraced = _untraced_by_dynamo(_scan)
