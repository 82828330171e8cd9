"""The one place that decides which path computes a call.

    route(op, backend, device=, dtype=, heads=, width=, reverse=, ablation=, kernel_takes=,
          transforms=, framework=) -> Route(path, why)
    explain(...)  -> why, in words

``op`` is what the caller computes:

    "scan"          gate_loop_scan (also the scan inside the composed and chunked mixers)
    "mixer"         gate_loop_mixer, GateLoopedAttention's mixing
    "simple_mixer"  simple_gate_loop_mixer, SimpleGateLoopLayer's mixing

and ``path`` is what runs:

    "fused"     one forward and one backward Mosaic GPU kernel for the whole mixer
                (kernels/mosaic_mixer.py; one feature per head, or SimpleGateLoopLayer's real gates)
    "rotated"   heads of 32, 64 or 128 features with backend "pallas": the wide-head Mosaic GPU kernels
                (kernels/mosaic_rotated.py, ops/rotated.py), scalar-decay linear attention on rotated keys
    "chunked"   other heads wider than one feature: the chunked form (chunked.py), torch ops around a
                scan over chunks
    "composed"  torch ops around gate_loop_scan
    "mosaic"    the scan as Mosaic GPU kernels launched from torch (kernels/mosaic_scan.py, ops/mosaic.py)
    "triton"    the scan as Triton-lowered Pallas kernels (kernels/pallas_scan.py), through the bridge
                from torch
    "jax"       jax.lax.associative_scan under jit (kernels/jax_scan.py), through the bridge from torch
    "torch", "heinsen", "loop"   the scan in plain torch (scan/torch_scan.py)

Every availability check and self-test sits here, each testing the kernel it admits: the Mosaic
scan, the fused mixer, the real-gate mixer, the wide-head kernels and the Triton-lowered scan are
each run once per device
against their float64 reference (ops/selftest.py) before "auto" takes them; a failure warns once
and the next path takes over. The facts are plain values (strings, ints, bools), so that the
JAX model asks here without importing torch, and torch.compile can keep a route as a constant.

Set the logger ``gateloop_hybrid.routing`` to DEBUG to see each new decision with its reason.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import threading
import warnings
from typing import NamedTuple

BACKENDS = ("auto", "pallas", "jax", "torch", "heinsen", "loop")
JAX_BACKENDS = ("auto", "jax", "pallas")        # what the JAX model can run
TORCH_ONLY = ("torch", "heinsen", "loop")
OPS = ("scan", "mixer", "simple_mixer")
_WIDE_DTYPES = ("float64", "complex128")
_HALF_DTYPES = ("bfloat16", "float16")          # what the wide-head kernels take
_WIDE_HEADS = (32, 64, 128)                     # the head widths the wide-head kernels take (32 as 64)
_KERNEL_TILE = 128                              # the Mosaic kernels' features per CTA
CHUNK = 64                                      # the chunked form's chunk length (torch and JAX)

log = logging.getLogger(__name__)


class Route(NamedTuple):
    path: str
    why: str


def check_backend(backend, *, name: str = "scan_backend", where: str = "", framework: str = "torch") -> str:
    """``backend`` if it names a backend ``framework`` runs, else one clear error naming the
    argument (``name``) and, if given, the function (``where``)."""
    allowed = JAX_BACKENDS if framework == "jax" else BACKENDS
    if not isinstance(backend, str) or backend not in allowed:
        extra = (" (a torch backend; the JAX model runs 'auto', 'jax' or 'pallas')"
                 if framework == "jax" and backend in TORCH_ONLY else "")
        raise ValueError(f"{where + ': ' if where else ''}unknown {name} {backend!r}{extra}; "
                         f"choose one of {allowed}")
    return backend


def route(op: str, backend: str = "auto", *, device: str = "cpu", dtype: str = "float32",
          heads: int = 1, width: int = 1, reverse: bool = False, ablation: bool = False,
          kernel_takes: bool = True, transforms: bool = False, framework: str = "torch") -> Route:
    """The path that computes ``op`` for these facts, and why.

    Args:
        op: "scan", "mixer" or "simple_mixer".
        backend: the backend asked for (one of BACKENDS; JAX_BACKENDS for framework "jax").
        device: "cpu", "cuda" or "cuda:<index>" (torch's device; for the JAX model, JAX's default
            backend, "cpu" or "gpu").
        dtype: the inputs' (promoted) dtype name, e.g. "bfloat16".
        heads, width: heads and features per head (mixers).
        reverse: the recurrence runs from the last position to the first.
        ablation: an ablation flag is set (ablate_complex or ablate_state_transition).
        kernel_takes: whether the kernels take these shapes and dtypes (the scan's gate layout,
            the mixer's h0 dtype): a shape fact the caller knows.
        transforms: a torch.func transform (vmap, grad) is active; the Mosaic ops have no vmap rule.
        framework: "torch" (the layers, gate_loop_scan, gate_loop_mixer) or "jax" (the JAX model).
    """
    key = (op, backend, str(device), str(dtype).removeprefix("torch."), int(heads), int(width),
           bool(reverse), bool(ablation), bool(kernel_takes), bool(transforms), framework)
    return _route(*key)


def resolve_backend(backend: str, device="cpu", dtype="float32") -> str:
    """The backend (a name in BACKENDS) that ``backend`` resolves to for a scan of ``dtype`` on
    ``device``, as ``route`` decides ("pallas" for either kind of Pallas kernel)."""
    path = route("scan", backend, device=str(device), dtype=str(dtype)).path
    return "pallas" if path in ("mosaic", "triton") else path


def explain(op: str, backend: str = "auto", **facts) -> str:
    """Why ``route`` takes the path it takes for these facts, in one line."""
    path, why = route(op, backend, **facts)
    return f"{op} with backend={backend!r} -> {path!r}: {why}"


@functools.lru_cache(maxsize=1024)
def _route(op, backend, device, dtype, heads, width, reverse, ablation, kernel_takes, transforms,
           framework) -> Route:
    if op not in OPS:
        raise ValueError(f"route: unknown op {op!r}; choose one of {OPS}")
    where = {"scan": "gate_loop_scan", "mixer": "gate_loop_mixer", "simple_mixer": "simple_gate_loop_mixer"}[op]
    check_backend(backend, name="backend", where=where, framework=framework)
    device_type, _, index = device.partition(":")
    index = int(index) if index else 0
    if op == "mixer" and width > 1 and framework == "jax":
        chosen = Route("chunked", f"heads of {width} features take the chunked form (a scan over chunks, "
                                  "never a (d, d) state per token)")
    elif op == "mixer" and width > 1:
        chosen = _wide_route(backend, device_type, index, dtype, width, kernel_takes, transforms)
    elif framework == "jax":
        chosen = _jax_route(op, backend, device_type)
    elif op == "scan":
        chosen = _scan_route(backend, device_type, index, dtype, kernel_takes, transforms, where)
    else:
        chosen = _mixer_route(op, backend, device_type, index, dtype, heads, width, reverse, ablation,
                              kernel_takes, transforms)
    log.debug("%s(backend=%r, device=%s, dtype=%s, heads=%d, width=%d) -> %r: %s",
              where, backend, device, dtype, heads, width, *chosen)
    return chosen


def _mixer_route(op, backend, device_type, index, dtype, heads, width, reverse, ablation, kernel_takes,
                 transforms) -> Route:
    blockers = []
    if backend not in ("auto", "pallas"):
        blockers.append(f"backend {backend!r} asks for torch ops around the scan")
    if device_type != "cuda":
        blockers.append(f"the fused kernels run on CUDA tensors, these are on {device_type}")
    if dtype in _WIDE_DTYPES:
        blockers.append(f"the fused kernels compute in float32; {dtype} inputs keep their precision")
    if heads % _KERNEL_TILE:
        blockers.append(f"the fused kernels take a multiple of {_KERNEL_TILE} features, got {heads}")
    if ablation:
        blockers.append("an ablation is set")
    if reverse:
        blockers.append("the fused kernels run forward in time only")
    if not kernel_takes:
        blockers.append("the kernels do not take these tensors (an empty batch, or h0's dtype)")
    if transforms:
        blockers.append("a torch.func transform is active (the fused ops have no vmap rule)")
    if not blockers:
        check = fused_mixer_available if op == "mixer" else simple_mixer_available
        problem = check(device_type, index)
        if problem is None:
            return Route("fused", "one forward and one backward Mosaic GPU kernel (self-test passed on "
                                  f"{device_type}:{index})")
        blockers.append(problem)
    return Route("composed", "torch ops around gate_loop_scan: " + "; ".join(blockers))


def _wide_route(backend, device_type, index, dtype, width, kernel_takes, transforms) -> Route:
    blockers = []
    if backend == "auto":
        # not yet by default: untimed on a GPU, and their gate gradients in bf16 are within 1% of
        # the largest against the chunked form's 0.5% (docs/wide_heads.md, precision)
        blockers.append("the wide-head kernels run with backend 'pallas' only, for now")
    elif backend != "pallas":
        blockers.append(f"backend {backend!r} asks for torch ops around the scan")
    if device_type != "cuda":
        blockers.append(f"the wide-head kernels run on CUDA tensors, these are on {device_type}")
    if dtype not in _HALF_DTYPES:
        blockers.append(f"the wide-head kernels take bfloat16 or float16, got {dtype}")
    if width not in _WIDE_HEADS:
        blockers.append(f"the wide-head kernels take heads of {_WIDE_HEADS} features, got {width}")
    if not kernel_takes:
        blockers.append("the kernels do not take these tensors (an empty batch, or h0's dtype)")
    if transforms:
        blockers.append("a torch.func transform is active (the kernels have no vmap rule)")
    if not blockers:
        problem = rotated_available(device_type, index)
        if problem is None:
            return Route("rotated", "the wide-head Mosaic GPU kernels (self-test passed on "
                                    f"{device_type}:{index})")
        blockers.append(problem)
    return Route("chunked", f"heads of {width} features take the chunked form (a scan over chunks, never a "
                            "(d, d) state per token): " + "; ".join(blockers))


def _scan_route(backend, device_type, index, dtype, kernel_takes, transforms, where) -> Route:
    if backend in TORCH_ONLY:
        return Route(backend, f"backend {backend!r} asked for")
    if not jax_available():
        if backend != "auto":
            raise ImportError(f"{where}: backend={backend!r} needs JAX, which is not installed. Install it "
                              "with: pip install 'gateloop-hybrid[cuda]' on a CUDA machine (JAX with its "
                              "CUDA plugin) or pip install jax on CPU.")
        _warn_once(f"auto-{device_type}", f"{where}: backend='auto' uses 'torch' on {device_type} because "
                   "JAX is not installed.")
        return Route("torch", "JAX is not installed")
    if backend == "pallas" and device_type != "cuda":
        raise ValueError(f"{where}: backend='pallas' runs on CUDA tensors only, got {device_type} tensors "
                         "(use backend='jax' or 'auto')")
    if backend == "jax":
        return Route("jax", "backend 'jax' asked for")
    if backend == "pallas" or (device_type == "cuda" and dtype not in _WIDE_DTYPES):
        mosaic_why = _mosaic_blockers(device_type, index, kernel_takes, transforms)
        if mosaic_why is None:
            return Route("mosaic", f"Mosaic GPU kernels (self-test passed on cuda:{index})")
        problem = pallas_available()
        if backend == "pallas" or problem is None:
            return Route("triton", f"Triton-lowered Pallas kernels ({mosaic_why}"
                                   + ("" if problem is None else f"; their self-test: {problem}") + ")")
        mosaic_why = f"{mosaic_why}; the Triton-lowered kernels: {problem}"
    else:
        mosaic_why = (f"{dtype} inputs keep their precision" if device_type == "cuda"
                      else f"no GPU kernels for {device_type} tensors")
    if jax_has_device(device_type):
        return Route("jax", f"jax.lax.associative_scan through the bridge ({mosaic_why})")
    _warn_once(f"auto-{device_type}", f"{where}: backend='auto' uses 'torch' on {device_type} because JAX "
               f"has no {device_type} backend (install a CUDA build: pip install 'gateloop-hybrid[cuda]').")
    return Route("torch", f"JAX has no {device_type} backend")


def _mosaic_blockers(device_type, index, kernel_takes, transforms) -> str | None:
    """None if the Mosaic scan can run this call, else why not."""
    if device_type != "cuda":
        return f"the Mosaic kernels run on CUDA tensors, these are on {device_type}"
    if not kernel_takes:
        return "the Mosaic kernels do not take these shapes or dtypes"
    if transforms:
        return "a torch.func transform is active (the Mosaic ops have no vmap rule)"
    return mosaic_available(device_type, index)


def _jax_route(op, backend, device_type) -> Route:
    if op == "mixer":
        return Route("composed", "the scan of every k v^T (one feature per head)")
    if backend == "pallas":
        if device_type != "gpu":
            raise ValueError(f"scan_backend='pallas' runs on a GPU; JAX's default backend here is "
                             f"{device_type!r} (use 'jax' or 'auto')")
        return Route("triton", "backend 'pallas' asked for: Triton-lowered Pallas kernels")
    return Route("jax", "jax.lax.associative_scan")


# ---------------------------------------------------------------------------------------------
# Availability, each checked once per process or device


def _memo(fn):
    """functools.cache as a plain dict lookup (torch.compile traces through it without warning)."""
    cache = {}

    @functools.wraps(fn)
    def memoized(*args):
        if args not in cache:
            cache[args] = fn(*args)
        return cache[args]
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


def _device_problem(device_type: str, index: int) -> str | None:
    """Why the Mosaic kernels cannot run on this device at all, or None."""
    if device_type != "cuda" or not jax_has_device("cuda"):
        return "JAX has no CUDA backend here"
    import torch
    major, minor = torch.cuda.get_device_capability(index)
    if major < 9:
        return f"cuda:{index} is sm_{major}{minor}; the Mosaic kernels need Hopper (sm_90) or newer"
    return None


def _self_tested(name: str, test: str, what: str):
    """An availability check for one kernel: None where its self-test passes on the device, else
    why not (a failing self-test warns once)."""
    @_memo
    def available(device_type: str, index: int) -> str | None:
        problem = _device_problem(device_type, index)
        if problem is not None:
            return problem
        from .ops import selftest
        import torch
        problem = isolated(getattr(selftest, test), torch.device(device_type, index))
        if problem:
            _warn_once(f"{name}-{device_type}:{index}", f"{what} failed their self-test on "
                       f"{device_type}:{index} ({problem}); the next path takes over.")
            return f"their self-test failed: {problem}"
        return None
    available.__name__ = name
    available.__doc__ = f"None if {what} run on the device and pass their self-test, else why not."
    return available


mosaic_available = _self_tested("mosaic_available", "mosaic_scan", "the Mosaic GPU scan kernels")
fused_mixer_available = _self_tested("fused_mixer_available", "fused_mixer", "the fused mixer kernels")
simple_mixer_available = _self_tested("simple_mixer_available", "simple_mixer",
                                      "SimpleGateLoopLayer's fused kernels")
rotated_available = _self_tested("rotated_available", "rotated_heads", "the wide-head kernels")


@_memo
def pallas_available() -> str | None:
    """None if the Triton-lowered Pallas scan passes its self-test on JAX's first CUDA device
    (once per process; a failure warns once), else why not."""
    if not jax_has_device("cuda"):
        return "JAX has no CUDA backend here"
    from .ops import selftest
    import jax
    problem = selftest.triton_scan(jax.devices("cuda")[0])
    if problem:
        _warn_once("pallas", f"gate_loop_scan: the Triton-lowered Pallas kernels failed their self-test "
                   f"on this GPU ({problem}); the next path takes over.")
        return f"their self-test failed: {problem}"
    return None


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


_warned: set = set()


def _warn_once(key: str, message: str):
    if importlib.util.find_spec("torch") is not None:
        import torch
        if torch.compiler.is_compiling():
            return      # Dynamo cannot trace warnings.warn; the eager path says it
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
