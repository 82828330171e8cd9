"""``MosaicKernel``: a Pallas Mosaic GPU kernel launched on torch tensors, with no XLA, PJRT or
DLPack at call time.

``bridge.jax2torch`` runs any JAX function but pays for JAX's dispatch on every call. A function
that is one Mosaic GPU kernel needs none of it: its compiled module can be launched on torch's
pointers and torch's stream directly. That is what this launcher does.

How a call runs (eager):

    key = (shape, dtype, device per tensor; static keyword values)  -> one dict lookup
    outputs = torch.empty(...)            torch's caching allocator, on the inputs' device
    buffers[:] = input then output pointers (a ctypes array kept per key)
    launch(function, torch's current stream of that device, buffers)

The first call per key lowers the function for CUDA (``jax.jit(...).lower``), takes the Mosaic GPU
module out of it and compiles it for that device; later calls reuse it (at most ``max_entries``
keys per kernel, least recently used evicted and unloaded). Since launches go to torch's current
stream and Mosaic GPU passes its TMA descriptors as kernel parameters, calls work on side streams
and are recorded by ``torch.cuda.graph`` capture as plain kernel nodes (call once before capturing,
so that compiling happens outside the capture; a captured kernel is never unloaded).

Under ``torch.compile`` a call is the one custom op ``bridge_mosaic::launch(key, inputs)``: ``key``
is a string naming the kernel and its static values, made while Dynamo traces (each static value
is specialized on, so a new value recompiles), and a fake implementation from ``jax.eval_shape``
gives the outputs' shapes. ``fullgraph=True`` and ``mode="reduce-overhead"`` see one opaque op with
torch-allocated outputs; the first call may come from inside the compiled function.

CPU tensors run ``interpret_fn`` (the same kernel in Pallas interpret mode) through
``bridge.jax2torch``, so the whole path (cache, custom op, fake implementation, compile) is
testable without a GPU.

Limits: the function calls exactly one single-device ``plgpu.kernel`` and does nothing else (no jnp
work around it); its inputs go to the kernel in order and it returns kernel results; no
input/output aliasing, except the grid-wide semaphores of ``pl.get_global``, which the launcher
zeroes before every launch; inputs are contiguous, 16-byte aligned tensors of ``SUPPORTED_DTYPES`` (never
copied or cast); Hopper or newer GPUs; jaxlib >= 0.11.1 with its CUDA plugin; not differentiable
(wrap calls in your own ``torch.autograd.Function``).
"""

from __future__ import annotations

import collections
import ctypes
import functools
import inspect
import itertools
import weakref
from typing import NamedTuple

import torch
from torch.fx.experimental.symbolic_shapes import guard_scalar

from . import _mosaic_abi
from ._mosaic_abi import MosaicGpuUnavailable, interpret_params  # noqa: F401  (re-exported)
from .function import _hashable, jax2torch
import jax
import jax.numpy as jnp

# Dtypes passed as they are (no casts); 64-bit types are left out since JAX narrows them by default.
SUPPORTED_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16,
                              torch.int8, torch.int16, torch.int32, torch.uint8})
_ALIGNMENT = 16                 # bytes; TMA needs 16-byte aligned global addresses
_LAUNCH_DEVICES = ("cuda",)     # device types launched natively; cpu goes to interpret_fn

_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)    # (index) -> cudaStream_t
_current_device = getattr(torch._C, "_cuda_getDevice", None)          # () -> index
_is_capturing = getattr(torch._C, "_cuda_isCurrentStreamCapturing", None)  # () -> bool

# Kernels reachable by a string key, for the custom op (whose schema carries strings, not objects).
_KERNELS: "weakref.WeakValueDictionary[str, MosaicKernel]" = weakref.WeakValueDictionary()
_kernel_ids = itertools.count()


class CacheInfo(NamedTuple):
    entries: int        # compiled keys held now
    compiles: int       # keys built so far (lowered and compiled, or interpreted functions made)


class _Launch:
    """One kernel compiled for one key on one CUDA device."""

    def __init__(self, name: str, module: _mosaic_abi.KernelModule, device: torch.device):
        self.name = name
        self.device, self.index = device, device.index
        self.compiled = _mosaic_abi.compile(module.module_bytes, self.index)
        self.function, self.launch = self.compiled.function, self.compiled.launch
        self.n_in = module.n_inputs
        self.outputs = [(shape, getattr(torch, dtype)) for shape, dtype in module.results]
        # None: the outputs are the kernel's results in order (the common case)
        self.returned = None if module.returned == tuple(range(len(self.outputs))) else module.returned
        # semaphores (pl.get_global): zeroed for every launch, passed as operand and as result
        self.zeroed = module.zeroed
        self.buffers = (ctypes.c_void_p * (self.n_in + len(self.zeroed) + len(self.outputs)))()
        self.captured = False   # launched during CUDA graph capture: never unloaded

    def __call__(self, tensors) -> tuple:
        ptrs = [t.data_ptr() for t in tensors]
        for p in ptrs:
            if p % _ALIGNMENT:
                raise ValueError(_misaligned(self.name, tensors))
        device = self.device
        outs = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in self.outputs]
        if self.zeroed:
            for i in self.zeroed:
                outs[i].zero_()
            ptrs += [outs[i].data_ptr() for i in self.zeroed]
        ptrs += [o.data_ptr() for o in outs]
        self.buffers[:] = ptrs
        index = self.index
        if _current_device() == index:
            self._launch(index)
        else:
            with torch.cuda.device(index):
                self._launch(index)
        returned = self.returned
        return tuple(outs) if returned is None else tuple([outs[i] for i in returned])

    def _launch(self, index):
        if not self.captured and _is_capturing():
            self.captured = True
        self.launch(self.function, _raw_stream(index), self.buffers)

    def close(self) -> None:
        # Kept loaded (never freed) when a CUDA graph captured it, since the graph may replay it,
        # and when evicted during a capture, where synchronizing is not allowed.
        if self.captured or _is_capturing():
            return
        torch.cuda.synchronize(self.device)
        self.compiled.unload()


class _Interpreted:
    """One kernel for one key on CPU: the interpret-mode function through jax2torch."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, tensors) -> tuple:
        with torch.no_grad():
            return tuple(jax.tree_util.tree_leaves(self.fn(*tensors)))

    def close(self) -> None:
        pass


def _misaligned(name, tensors) -> str:
    bad = next(i for i, t in enumerate(tensors) if t.data_ptr() % _ALIGNMENT)
    return (f"{name}: argument {bad} starts at an address that is not {_ALIGNMENT}-byte aligned (a view with a storage "
            "offset?); the launcher never copies: pass .clone()")


class MosaicKernel:
    """A function holding one Pallas Mosaic GPU kernel, callable with torch tensors.

    ``fn(*arrays, **static)`` calls exactly one ``plgpu.kernel`` on its arrays and returns (a pytree
    of) its results. Call the wrapper with torch tensors for the arrays and hashable keyword values
    for ``static``; it returns a tuple of tensors (the outputs' leaves). ``interpret_fn``: the same
    kernel built with Pallas GPU interpret mode, run for CPU tensors.
    """

    max_entries = 64    # compiled keys kept per kernel (per instance: set kernel.max_entries)

    def __init__(self, fn, *, name: str, interpret_fn=None):
        self.fn, self.name, self.interpret_fn = fn, name, interpret_fn
        self._entries: collections.OrderedDict = collections.OrderedDict()
        self._structs: dict = {}
        self._op_keys: dict = {}        # static key -> op key
        self._op_statics: dict = {}     # op key -> static dict
        self._compiles = 0
        self._registry_key = f"{name}#{next(_kernel_ids)}"
        _KERNELS[self._registry_key] = self
        # Unload what this kernel compiled once it is garbage (not at interpreter exit).
        weakref.finalize(self, _close_all, self._entries).atexit = False

    def __repr__(self):
        return f"MosaicKernel({self.name})"

    # ---- calling ----

    def __call__(self, *tensors, **static) -> tuple:
        if tracing():
            # One opaque op; the string key (a constant to the compiler) names kernel and statics.
            # Not differentiable, as in eager mode: inputs are detached so that AOTAutograd does not
            # look for a backward (the caller's autograd.Function supplies gradients).
            key = _constant_op_key(self._registry_key, **{k: _constant(v) for k, v in static.items()})
            inputs = [t.detach() if t.requires_grad else t for t in tensors]
            return tuple(_launch_op(key, inputs))
        return self._run(tensors, static)

    def _run(self, tensors, static) -> tuple:
        try:
            key = (tuple([(t.shape, t.dtype, t.device) for t in tensors]),
                   _static_key(static) if static else ())
            entry = self._entries[key]
            if not all([t.is_contiguous() for t in tensors]):
                raise LookupError
        except Exception:       # a miss, or an argument to explain: the slow path sorts it out
            entry = self._resolve(tensors, static)
        else:
            self._entries.move_to_end(key)
        return entry(tensors)

    def _resolve(self, tensors, static):
        """Check the arguments and return their entry, built if it is new."""
        device = self._check(tensors)
        skey = self._static_key_checked(static)
        key = (tuple((t.shape, t.dtype, t.device) for t in tensors), skey)
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            return entry
        self._check_signature(tensors, static)
        if device.type in _LAUNCH_DEVICES:
            structs = [jax.ShapeDtypeStruct(tuple(t.shape), _jax_dtype(t.dtype)) for t in tensors]
            module = _mosaic_abi.lower(functools.partial(self.fn, **static), structs, self.name)
            entry = _Launch(self.name, module, device)
        else:
            entry = _Interpreted(jax2torch(functools.partial(self.interpret_fn, **static),
                                           name=f"{self.name} (interpret)"))
        self._compiles += 1
        self._entries[key] = entry
        while len(self._entries) > self.max_entries:
            _, old = self._entries.popitem(last=False)
            old.close()
        return entry

    def bind(self, *tensors, **static) -> "BoundKernel":
        """This kernel for the shapes, dtypes and device of ``tensors`` and these static values,
        as a callable ``bound(tensors) -> outputs`` that skips building the key and checking the
        arguments: the cheapest eager call, for callers that already guarantee both (contiguous
        tensors of exactly those shapes, dtypes and device). Compiles now if needed."""
        self._resolve(tensors, static)
        key = (tuple((t.shape, t.dtype, t.device) for t in tensors), self._static_key_checked(static))
        return BoundKernel(self, key, dict(static))

    def out_structs(self, *tensors, **static) -> tuple:
        """The outputs' ``jax.ShapeDtypeStruct``s for these inputs (``jax.eval_shape``; no GPU needed)."""
        shapes = tuple((tuple(int(d) for d in t.shape), t.dtype) for t in tensors)
        key = (shapes, self._static_key_checked(static))
        structs = self._structs.get(key)
        if structs is None:
            self._check_signature(tensors, static)
            args = [jax.ShapeDtypeStruct(shape, _jax_dtype(dtype)) for shape, dtype in shapes]
            out = jax.eval_shape(functools.partial(self.fn, **static), *args)
            structs = self._structs[key] = tuple(jax.tree_util.tree_leaves(out))
        return structs

    def cache_info(self) -> CacheInfo:
        return CacheInfo(len(self._entries), self._compiles)

    def cache_clear(self) -> None:
        """Drop every compiled key (unloading modules that no CUDA graph captured)."""
        _close_all(self._entries)

    # ---- checks (on a cache miss, so each explains one problem) ----

    def _check(self, tensors) -> torch.device:
        name = self.name
        if not tensors:
            raise ValueError(f"{name}: pass at least one tensor (outputs go on the inputs' device)")
        for i, t in enumerate(tensors):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}: argument {i} is a {type(t).__name__}, expected a torch.Tensor "
                                "(static values go in keyword arguments)")
            if t.is_nested or t.layout != torch.strided:
                kind = "nested" if t.is_nested else f"{t.layout}"
                raise ValueError(f"{name}: argument {i} is a {kind} tensor; the launcher takes dense "
                                 "strided tensors")
            if t.dtype not in SUPPORTED_DTYPES:
                raise TypeError(f"{name}: argument {i} has dtype {t.dtype}, which the launcher does not take "
                                f"(supported: {', '.join(sorted(str(d)[6:] for d in SUPPORTED_DTYPES))}); "
                                "convert it explicitly")
            device = t.device.type
            if device not in _LAUNCH_DEVICES:
                if device != "cpu":
                    raise ValueError(f"{name}: argument {i} is on device {t.device}; the launcher takes CUDA "
                                     "tensors (or CPU tensors with interpret_fn)")
                if self.interpret_fn is None:
                    raise ValueError(f"{name}: argument {i} is on the CPU; Mosaic GPU kernels run on CUDA "
                                     "tensors (CPU tensors need interpret_fn, the kernel in Pallas interpret mode)")
            if not t.is_contiguous():
                raise ValueError(f"{name}: argument {i} is not contiguous (shape {tuple(t.shape)}, strides "
                                 f"{t.stride()}); the launcher never copies: pass .contiguous()")
        devices = [t.device for t in tensors]
        if len(set(devices)) > 1:
            where = ", ".join(f"argument {i} on {d}" for i, d in enumerate(devices))
            raise ValueError(f"{name}: all tensors must be on one device, got {where}")
        return devices[0]

    def _static_key_checked(self, static):
        try:
            return _static_key(static) if static else ()
        except TypeError:
            bad = next(k for k, v in static.items() if not _hashable(v))
            raise TypeError(f"{self.name}: static argument {bad!r} has unhashable type "
                            f"{type(static[bad]).__name__}; static values select a compiled kernel and must "
                            "be hashable (a tuple, not a list)") from None

    def _check_signature(self, tensors, static):
        try:
            signature = inspect.signature(self.fn)
        except (TypeError, ValueError):
            return
        try:
            signature.bind(*tensors, **static)
        except TypeError as e:
            raise TypeError(f"{self.name}: called with {len(tensors)} tensors and static "
                            f"{sorted(static)}: {e}") from None

    # ---- torch.compile ----

    def _op_key(self, static) -> str:
        skey = self._static_key_checked(static)
        op_key = self._op_keys.get(skey)
        if op_key is None:
            op_key = self._op_keys[skey] = f"{self._registry_key}/{len(self._op_keys)}"
            self._op_statics[op_key] = dict(static)
        return op_key


class BoundKernel:
    """A MosaicKernel bound to one key (see ``MosaicKernel.bind``). It looks its compiled entry up
    on every call, so an entry evicted from the kernel's cache is rebuilt, never used unloaded."""

    __slots__ = ("kernel", "key", "static")

    def __init__(self, kernel: MosaicKernel, key, static):
        self.kernel, self.key, self.static = kernel, key, static

    def __call__(self, tensors) -> tuple:
        entries = self.kernel._entries
        entry = entries.get(self.key)
        if entry is None:
            entry = self.kernel._resolve(tensors, self.static)
        else:
            entries.move_to_end(self.key)
        return entry(tensors)


def _static_key(static) -> tuple:
    # types too: 1, 1.0 and True are equal as keys but trace differently
    key = tuple((k, type(v), v) for k, v in sorted(static.items()))
    hash(key)
    return key


def _close_all(entries) -> None:
    while entries:
        entries.popitem()[1].close()


@functools.lru_cache(maxsize=None)
def _jax_dtype(dtype: torch.dtype):
    return jnp.dtype(str(dtype).removeprefix("torch."))


def _lookup(op_key: str):
    kernel = _KERNELS[op_key.rsplit("/", 1)[0]]
    return kernel, kernel._op_statics[op_key]


@torch.library.custom_op("bridge_mosaic::launch", mutates_args=())
def _launch_op(key: str, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    kernel, static = _lookup(key)
    return list(kernel._run(inputs, static))


@_launch_op.register_fake
def _(key, inputs):
    kernel, static = _lookup(key)
    kernel._check(inputs)
    return [inputs[0].new_empty(s.shape, dtype=getattr(torch, jnp.dtype(s.dtype).name))
            for s in kernel.out_structs(*inputs, **static)]


def tracing() -> bool:
    """Whether torch.compile is tracing: Dynamo, or AOTAutograd running code that Dynamo left
    untraced (``torch._dynamo.nonstrict_trace``), where tensors are fakes without data and a call
    must be the custom op."""
    return torch.compiler.is_compiling() or torch._guards.TracingContext.try_get() is not None


def _constant(v):
    """A static value as a plain constant while Dynamo traces. After a recompile Dynamo turns int
    and float arguments, and sizes taken from dynamic shapes, into symbols (automatic dynamic), but
    a kernel is compiled for one value: guard_scalar specializes on it (a guard on the value, so a
    new value recompiles)."""
    kind = type(v)
    if kind in (int, float, bool, torch.SymInt, torch.SymFloat, torch.SymBool):
        return guard_scalar(v)
    if kind is tuple:
        return tuple(_constant(x) for x in v)
    return v


@torch._dynamo.assume_constant_result   # run at trace time (plain Python); its string is a constant
def _constant_op_key(kernel_key: str, **static) -> str:
    return _KERNELS[kernel_key]._op_key(static)
