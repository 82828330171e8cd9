"""``jax2torch``: any JAX function as a differentiable torch function.

How one call runs:

    torch tensors --DLPack--> jax.Arrays --jitted forward--> outputs (+ residuals) --DLPack--> torch

- Arguments are a pytree: torch tensors are traced inputs, everything else is a static (hashable)
  value that selects a separate compiled function. Floating and complex tensors are
  differentiable; integer and bool tensors are not. Strided (dense) tensors only: sparse, nested
  and meta tensors are refused with a TypeError or ValueError naming the argument.
- Forward and backward are ``jax.jit`` functions built once per (function, argument structure,
  static values) and compiled by JAX once per shapes/dtypes/device. ``trace_count`` counts traces.
  The caches are bounded (``MAX_STATIC_VALUES`` argument structures and static values per function,
  ``MAX_SIGNATURES`` shapes/dtypes per static value, oldest dropped first); a function that keeps
  meeting new static values (a fresh object per call, NaN) warns once. A trace that fails leaves
  nothing cached: the next call traces again.
- With grad enabled, forward runs ``jax.vjp`` and hands the residuals of its pullback (the
  function's own ``custom_vjp`` residuals where it defines one) back as torch tensors, saved with
  ``save_for_backward``: a residual that *is* an input or an output is saved as that torch tensor,
  so nothing is stored twice and torch's version counter catches in-place edits. Backward
  rebuilds the pullback from them inside a jitted function; no JAX closure lives on the context.
- Double backward (``create_graph=True``): the backward is itself a bridged JAX function of the
  residuals and the cotangents, differentiated by JAX. Where some residuals are intermediate
  values (neither an input nor an output), the inputs are saved too and the gradient of the
  gradient is taken through a recomputed ``jax.vjp``. Where JAX cannot differentiate the
  backward (a kernel without a derivative rule, or ``jax2torch(fn, double_backward=False)``),
  it raises ``DoubleBackwardError``; it is never silently treated as a constant.
- Complex: torch's gradient is the conjugate of JAX's vjp of the conjugated cotangent.
- 64-bit tensors (float64, complex128, int64) run in JAX's x64 mode, never narrowed.
- Outputs never share memory with inputs or with each other (JAX returns an input unchanged
  when a function forwards it; the bridge copies such an output).
- Under ``torch.compile`` and for tensor subclasses (fake, functional tensors) the call goes
  through the ``jax_bridge::call`` custom op: opaque to the compiler, with a fake implementation
  from ``jax.eval_shape``. Under ``torch.func`` transforms (``vmap``, ``grad``, ``vjp``,
  ``jacrev``) it goes through an autograd.Function whose batching rule is ``jax.vmap`` of the
  function, itself bridged, and whose backward is bridged too. In eager mode it goes straight
  through a ``torch.autograd.Function``, which costs less per call.
  Forward-mode AD (``torch.func.jvp``, ``jacfwd``, dual tensors) is not supported: it raises
  NotImplementedError naming the function (a tangent is never dropped).
"""

from __future__ import annotations

import functools
import itertools
import math
import threading
import warnings
import weakref

import numpy as np
import torch
import torch.autograd.forward_ad as _forward_ad

from .convert import SUPPORTED_DTYPES, WIDE_DTYPES, check_device, check_dtype, check_layout, exchange, prepare
import jax
import jax.numpy as jnp

_DIFFERENTIABLE = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64,
                             torch.complex64, torch.complex128})
_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)

MAX_STATIC_VALUES = 32   # argument structures + static values kept per function
MAX_SIGNATURES = 64      # shapes/dtypes kept per static value

# Specs reachable by a string key, for the custom op (whose schema can only carry strings).
_SPECS: "weakref.WeakValueDictionary[str, _Spec]" = weakref.WeakValueDictionary()
_SIGNATURES: "weakref.WeakValueDictionary[str, _Signature]" = weakref.WeakValueDictionary()
# Specs and signatures whose keys a traced graph (torch.compile, export) holds: never dropped.
_PINNED: set = set()
_spec_ids = itertools.count()
_lock = threading.RLock()   # guards cache insertion and eviction (lookups need no lock)


class DoubleBackwardError(NotImplementedError):
    """A gradient of a bridged function's gradient was asked for (``create_graph=True``, a
    gradient penalty, ``torch.func.hessian``) but cannot be computed."""


def _is_float0(x) -> bool:
    return getattr(x, "dtype", None) == jax.dtypes.float0


class _Signature:
    """What one traced signature produced: output structure and where each residual lives."""

    def __init__(self):
        self.out_treedef = None
        self.out_avals = None           # list of jax.ShapeDtypeStruct
        self.res_treedef = None         # structure of the pullback (a jax.tree_util.Partial)
        self.res_sources = None         # per residual leaf: ("in", i) | ("out", j) | ("res", k)
        self.extra_avals = None
        self.diff = None                # positions of the differentiable tensor inputs
        self.in_avals = None
        self.bwd = None                 # jitted backward for this signature
        self.key = None                 # string key for the custom ops
        self.spec = None
        self._backward_fns: dict = {}   # the backward as a bridged function (double backward)

    @property
    def has_extras(self) -> bool:
        return any(kind == "res" for kind, _ in self.res_sources)

    def backward_fn(self, recompute: bool = False) -> "JaxFunction":
        """The backward as a bridged (so differentiable and vmappable) function:
        (residuals, cotangents) -> gradients, or with ``recompute``
        (inputs, cotangents) -> gradients through a fresh vjp."""
        fn = self._backward_fns.get(recompute)
        if fn is None:
            owner = self.spec.owner
            body = (functools.partial(_vjp_torch_convention, self.spec, self) if recompute
                    else functools.partial(_bwd_torch_convention, self))
            fn = self._backward_fns[recompute] = JaxFunction(
                body, f"{owner.name} (backward)", double_backward=owner.double_backward)
        return fn


class _Spec:
    """One wrapped function at one argument structure and one set of static values."""

    def __init__(self, owner: "JaxFunction", treedef, is_tensor, statics):
        self.owner = owner
        self.treedef = treedef
        self.is_tensor = is_tensor      # per leaf of the argument pytree
        self.statics = statics          # the non-tensor leaves, in order
        self.key = f"{owner.name}#{next(_spec_ids)}"
        self.signatures: dict = {}
        self._traced: dict = {}         # (with_vjp, avals) -> _Signature, filled when JAX traces
        self._vmapped: dict = {}        # (with_vjp, in_dims) -> bridged jax.vmap of the function
        _SPECS[self.key] = self
        self.plain = jax.jit(self._plain)
        self.vjp_fwd = jax.jit(self._vjp_fwd)

    # ---- traced functions (run by JAX at trace time only) ----

    def _call_fn(self, arrays):
        arrays = iter(arrays)
        statics = iter(self.statics)
        leaves = [next(arrays) if t else next(statics) for t in self.is_tensor]
        args, kwargs = jax.tree_util.tree_unflatten(self.treedef, leaves)
        self.owner.trace_count += 1
        return self.owner.fn(*args, **kwargs)

    @staticmethod
    def _traced_key(with_vjp, arrays):
        return (with_vjp, tuple((tuple(a.shape), jnp.dtype(a.dtype)) for a in arrays))

    def _flat_outputs(self, arrays, sig=None):
        out = self._call_fn(arrays)
        flat, treedef = jax.tree_util.tree_flatten(out)
        for i, leaf in enumerate(flat):
            if not isinstance(leaf, jax.Array):
                raise TypeError(f"{self.owner.name} returned a {type(leaf).__name__} at output leaf {i}; "
                                "a bridged function must return jax arrays (in any pytree)")
        if sig is not None:
            sig.out_treedef = treedef
            sig.out_avals = [jax.ShapeDtypeStruct(o.shape, o.dtype) for o in flat]
        return flat

    def _plain(self, *arrays):
        sig = _Signature()
        flat = self._flat_outputs(arrays, sig)
        self._traced[self._traced_key(False, arrays)] = sig    # recorded only once the trace worked
        return flat

    def _vjp_parts(self, arrays, sig=None):
        """(diff positions, flat outputs, pullback) of the function at ``arrays``."""
        diff = [i for i, x in enumerate(arrays) if _differentiable_dtype(x.dtype)]

        def f(*diff_arrays):
            full = list(arrays)
            for i, x in zip(diff, diff_arrays):
                full[i] = x
            return self._flat_outputs(full, sig)

        flat_out, pullback = jax.vjp(f, *(arrays[i] for i in diff))
        return diff, flat_out, pullback

    def _vjp_fwd(self, *arrays):
        sig = _Signature()
        diff, flat_out, pullback = self._vjp_parts(arrays, sig)
        res, res_treedef = jax.tree_util.tree_flatten(pullback)
        sources, extras = [], []
        for r in res:
            src = next((("in", i) for i, x in enumerate(arrays) if r is x), None) \
                or next((("out", j) for j, o in enumerate(flat_out) if r is o), None)
            if src is None:
                src = ("res", len(extras))
                extras.append(r)
            sources.append(src)
        sig.res_treedef, sig.res_sources = res_treedef, sources
        sig.extra_avals = [jax.ShapeDtypeStruct(e.shape, e.dtype) for e in extras]
        sig.diff = diff
        self._traced[self._traced_key(True, arrays)] = sig
        return flat_out, extras

    def _vjp_fwd_flat(self, res_sources, *arrays):
        """outputs + intermediate residuals as one flat list, nothing recorded (for jax.vmap)."""
        _, flat_out, pullback = self._vjp_parts(arrays)
        res = jax.tree_util.tree_leaves(pullback)
        return [*flat_out, *(r for (kind, _), r in zip(res_sources, res) if kind == "res")]

    def _plain_flat(self, *arrays):
        return self._flat_outputs(arrays)

    # ---- running ----

    def eager_signature(self, tensors, with_vjp: bool) -> _Signature:
        """``signature`` for eager calls (concrete shapes): one dict lookup when known."""
        sig = self.signatures.get((with_vjp, *[(t.shape, t.dtype) for t in tensors]))
        return sig if sig is not None else self.signature(tensors, with_vjp)

    def signature(self, tensors, with_vjp: bool) -> _Signature:
        key = (with_vjp, *((t.shape, t.dtype) for t in tensors))
        if any(isinstance(d, torch.SymInt) for t in tensors for d in t.shape):
            # Dynamic shapes under torch.compile: JAX compiles per concrete shape, so specialize.
            key = (with_vjp, *((tuple(int(d) for d in t.shape), t.dtype) for t in tensors))
        sig = self.signatures.get(key)
        if sig is None:
            sig = self._new_signature(key, tensors, with_vjp)
        return sig

    def _new_signature(self, key, tensors, with_vjp) -> _Signature:
        # Learn the output structure and the residual layout from JAX's trace of this signature
        # (eval_shape traces it unless a call already has; both record it). A failed trace
        # records nothing, so the next call traces again.
        in_avals = [jax.ShapeDtypeStruct(tuple(int(d) for d in t.shape), _jax_dtype(t.dtype))
                    for t in tensors]
        traced_key = self._traced_key(with_vjp, in_avals)
        wide = _needs_x64(tensors)
        if traced_key not in self._traced:
            with jax.enable_x64(wide):
                jax.eval_shape(self.vjp_fwd if with_vjp else self.plain, *in_avals)
        if traced_key not in self._traced:
            # JAX had this trace cached but the record was dropped with an old signature:
            # trace a fresh (uncached) copy to record it again.
            fresh = functools.partial(self._vjp_fwd if with_vjp else self._plain)
            with jax.enable_x64(wide):
                jax.eval_shape(fresh, *in_avals)
        with _lock:
            sig = self.signatures.get(key)
            if sig is not None:         # another thread got here first
                return sig
            sig = self._traced[traced_key]
            sig.in_avals = in_avals
            sig.spec = self
            if with_vjp:
                sig.bwd = jax.jit(functools.partial(_bwd_torch_convention, sig))
            sig.key = f"{self.key}/{next(_spec_ids)}"
            _SIGNATURES[sig.key] = sig
            while len(self.signatures) >= MAX_SIGNATURES:
                old_key = next((k for k, s in self.signatures.items() if s not in _PINNED), None)
                if old_key is None:
                    break
                old = self.signatures.pop(old_key)
                for k in [k for k, s in self._traced.items() if s is old]:
                    del self._traced[k]
                self.owner._warn_overflow("shapes")
            self.signatures[key] = sig
        return sig

    def run(self, tensors, with_vjp: bool, known: bool = False, keep_arrays: bool = False):
        """Outputs (and, with_vjp, the extra residuals) as torch tensors; with keep_arrays also
        the JAX arrays (inputs, outputs, extras) that they share memory with."""
        if not known:
            self.signature(tensors, with_vjp)   # first call per signature: learn its layout
        prepared = [prepare(t) for t in tensors]
        arrays = exchange.to_jax(prepared, one_computation=True)
        with jax.enable_x64(_needs_x64(tensors)):
            if with_vjp:
                outs, extras = self.vjp_fwd(*arrays)
            else:
                outs, extras = self.plain(*arrays), []
        converted, copied = _unshare(exchange.to_torch([*outs, *extras]), prepared)
        result = converted[:len(outs)], converted[len(outs):]
        if not keep_arrays:
            return result
        # a copied output no longer shares memory with its array: backward reads the saved tensors
        return (*result, None if copied else (arrays, outs, extras))

    def run_bwd(self, sig: _Signature, res, cts, wide: bool, res_arrays=None):
        """Input gradients as torch tensors. ``res_arrays``: the residuals' JAX arrays when the
        caller still holds them (saves re-importing the saved tensors)."""
        if res_arrays is None:
            prepared = [prepare(t) for t in (*res, *cts)]
            arrays = exchange.to_jax(prepared, one_computation=True)
            res_arrays, ct_arrays = arrays[:len(res)], arrays[len(res):]
        else:
            prepared = [prepare(t) for t in cts]
            ct_arrays = exchange.to_jax(prepared, one_computation=True)
        with jax.enable_x64(wide):
            grads = sig.bwd(res_arrays, ct_arrays)
        return _unshare(exchange.to_torch(grads), prepared)[0]

    # ---- torch.vmap: the function under jax.vmap, as another bridged function ----

    def vmapped(self, with_vjp: bool, in_dims: tuple, tensors) -> "JaxFunction":
        key = (with_vjp, in_dims)
        fn = self._vmapped.get(key)
        if fn is None:
            if with_vjp:
                unbatched = [t.select(d, 0) if d is not None else t for t, d in zip(tensors, in_dims)]
                sig = self.signature(unbatched, True)
                flat = functools.partial(self._vjp_fwd_flat, sig.res_sources)
            else:
                flat = self._plain_flat
            fn = JaxFunction(_VmapFlat(flat, in_dims), f"vmap({self.owner.name})",
                             double_backward=self.owner.double_backward)
            self._vmapped[key] = fn
        return fn


class _VmapFlat:
    """jax.vmap of a flat function over the given input axes, outputs batched on axis 0."""

    def __init__(self, flat, in_dims):
        self.flat, self.in_dims = flat, in_dims

    def __call__(self, *arrays):
        return jax.vmap(lambda *a: list(self.flat(*a)), in_axes=self.in_dims, out_axes=0)(*arrays)


def _bwd_torch_convention(sig: _Signature, res, cts):
    """The backward in torch's convention: pullback of the conjugated cotangents, conjugated."""
    pullback = jax.tree_util.tree_unflatten(sig.res_treedef, res)
    cts = [np.zeros(a.shape, jax.dtypes.float0) if not _differentiable_dtype(a.dtype)
           else jnp.conj(c) if jnp.iscomplexobj(c) else c
           for c, a in zip(cts, sig.out_avals)]
    grads = pullback(cts)
    return [jnp.conj(g) if jnp.iscomplexobj(g) else g for g in grads]


def _vjp_torch_convention(spec: _Spec, sig: _Signature, inputs, cts):
    """The same gradients as ``_bwd_torch_convention``, from the inputs (a fresh ``jax.vjp``)."""
    _, _, pullback = spec._vjp_parts(list(inputs))
    return _bwd_torch_convention(sig, jax.tree_util.tree_leaves(pullback), cts)


def _unshare(tensors, inputs):
    """Copies of any output that shares memory with an input or an earlier output (JAX returns
    an input array unchanged when a function forwards it), and whether any was copied."""
    seen = {t.data_ptr() for t in inputs if t.numel()}
    out, copied = [], False
    for t in tensors:
        if t.numel():
            ptr = t.data_ptr()
            if ptr in seen:
                t, copied = t.clone(), True
                ptr = t.data_ptr()
            seen.add(ptr)
        out.append(t)
    return out, copied


def _differentiable_dtype(dtype) -> bool:
    return jnp.issubdtype(dtype, jnp.inexact)


def _jax_wide(dtype) -> bool:
    """A JAX dtype that exists only in x64 mode (the JAX side of convert.WIDE_DTYPES)."""
    return jnp.dtype(dtype) in (jnp.dtype("float64"), jnp.dtype("complex128"), jnp.dtype("int64"))


def _needs_x64(tensors) -> bool:
    return any(t.dtype in WIDE_DTYPES for t in tensors)


@functools.lru_cache(maxsize=None)
def _jax_dtype(dtype: torch.dtype):
    return jnp.dtype(str(dtype).removeprefix("torch."))


def _double_backward(sig: _Signature, saved, cts, n_in: int):
    """Gradients that torch can differentiate again: the backward run as a bridged function."""
    spec = sig.spec
    name = spec.owner.name
    if not spec.owner.double_backward:
        raise DoubleBackwardError(
            f"{name}: a gradient of its gradient (double backward: create_graph=True, a gradient "
            f"penalty, torch.func.hessian) is not supported: {name} was wrapped with "
            "double_backward=False (its backward has no derivative)")
    n_res = len(sig.res_sources)
    args = (list(saved[n_res:]) if sig.has_extras else list(saved[:n_res])), list(cts)
    try:
        return sig.backward_fn(recompute=sig.has_extras)(*args)
    except DoubleBackwardError:
        raise
    except Exception as e:
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise DoubleBackwardError(
            f"{name}: a gradient of its gradient (double backward: create_graph=True, a gradient "
            f"penalty, torch.func.hessian) needs JAX to differentiate {name}'s backward, which "
            f"failed: {type(e).__name__}: {first}") from e


def _wants_double_backward(saved, cts) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (*saved, *cts))


def _saved_residuals(sig, tensors, outs, extras):
    """The residuals, each as the input, output or extra residual it is."""
    pick = {"in": tensors, "out": outs, "res": extras}
    return [pick[kind][i] for kind, i in sig.res_sources]


def _saved_for_backward(sig, tensors, outs, extras):
    """Residuals (as the torch tensors they are), then, where some residuals are intermediate
    values, the inputs as well (double backward recomputes from them)."""
    saved = _saved_residuals(sig, tensors, outs, extras)
    return saved + list(tensors) if sig.has_extras else saved


# --------------------------------------------------------------------------------------------
# Autograd in eager mode


class _BridgeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec: _Spec, sig: _Signature, *tensors):
        outs, extras, arrays = spec.run(tensors, with_vjp=True, known=True, keep_arrays=True)
        ctx.spec, ctx.sig, ctx.n_in = spec, sig, len(tensors)
        ctx.wide = _needs_x64(tensors)
        # The residuals are saved as torch tensors (torch's version counter guards them); their
        # JAX arrays (views of the same memory, no closures) are kept so backward need not
        # import them again.
        ctx.save_for_backward(*_saved_for_backward(sig, tensors, outs, extras))
        ctx.res_arrays = None if arrays is None else _saved_residuals(sig, *arrays)
        ctx.mark_non_differentiable(*(o for o in outs if o.dtype not in _DIFFERENTIABLE))
        return tuple(outs)

    @staticmethod
    def backward(ctx, *cts):
        saved = ctx.saved_tensors     # raises if a residual was modified in place since forward
        sig = ctx.sig
        if _wants_double_backward(saved, cts):
            grads = _double_backward(sig, saved, cts, ctx.n_in)
        else:
            grads = ctx.spec.run_bwd(sig, saved[:len(sig.res_sources)], cts, ctx.wide, ctx.res_arrays)
        ctx.res_arrays = None
        full = [None] * ctx.n_in
        for i, g in zip(sig.diff, grads):
            if ctx.needs_input_grad[2 + i]:
                full[i] = g
        return (None, None, *full)

    @staticmethod
    def jvp(ctx, *tangents):
        _no_forward_ad(ctx.spec.owner.name)


def _no_forward_ad(name):
    raise NotImplementedError(
        f"{name}: forward-mode AD (torch.func.jvp, jacfwd, hessian, forward_ad dual tensors) is not "
        "supported through the JAX bridge; use reverse mode (torch.func.jacrev(torch.func.jacrev(f)) "
        "for a Hessian)")


# --------------------------------------------------------------------------------------------
# torch.compile, torch.func, tensor subclasses: the same work as custom ops


@torch.library.custom_op("jax_bridge::call", mutates_args=())
def _op_call(tensors: list[torch.Tensor], spec_key: str, with_vjp: bool) -> list[torch.Tensor]:
    outs, extras = _SPECS[spec_key].run(tensors, with_vjp)
    return outs + extras


@_op_call.register_fake
def _(tensors, spec_key, with_vjp):
    spec = _SPECS[spec_key]
    sig = spec.signature(tensors, with_vjp)
    _PINNED.update((spec, sig))     # a traced graph holds their keys
    device = tensors[0].device if tensors else torch.device("cpu")
    avals = sig.out_avals + (sig.extra_avals if with_vjp else [])
    return [tensors[0].new_empty(a.shape, dtype=_torch_dtype(a.dtype), device=device) for a in avals]


@torch.library.custom_op("jax_bridge::call_bwd", mutates_args=())
def _op_call_bwd(res: list[torch.Tensor], cts: list[torch.Tensor], sig_key: str) -> list[torch.Tensor]:
    sig = _SIGNATURES[sig_key]
    return sig.spec.run_bwd(sig, res, cts, any(_jax_wide(a.dtype) for a in sig.in_avals))


@_op_call_bwd.register_fake
def _(res, cts, sig_key):
    sig = _SIGNATURES[sig_key]
    device = cts[0].device
    return [torch.empty(sig.in_avals[i].shape, dtype=_torch_dtype(sig.in_avals[i].dtype), device=device)
            for i in sig.diff]


def _setup_context(ctx, inputs, output):
    tensors, spec_key, with_vjp = inputs
    ctx.sig = None
    ctx.n_in = len(tensors)
    if with_vjp:
        sig = ctx.sig = _SPECS[spec_key].signature(tensors, with_vjp=True)
        n_out = len(sig.out_avals)
        ctx.save_for_backward(*_saved_for_backward(sig, tensors, output[:n_out], output[n_out:]))


def _backward(ctx, grads):
    sig = ctx.sig
    if sig is None:
        raise RuntimeError("jax_bridge::call ran without residuals but is being differentiated")
    n_out = len(sig.out_avals)
    device = next(g.device for g in grads if g is not None)
    cts = [g if g is not None else torch.zeros(a.shape, dtype=_torch_dtype(a.dtype), device=device)
           for g, a in zip(grads[:n_out], sig.out_avals)]
    saved = ctx.saved_tensors
    if _wants_double_backward(saved, cts):
        got = _double_backward(sig, saved, cts, ctx.n_in)
    else:
        got = _op_call_bwd(list(saved[:len(sig.res_sources)]), cts, sig.key)
    full = [None] * ctx.n_in
    for i, g in zip(sig.diff, got):
        full[i] = g
    return full, None, None


_op_call.register_autograd(_backward, setup_context=_setup_context)


def _batched_dims(in_dims, tensors):
    return tuple(None if d is None else d % t.dim() for d, t in zip(in_dims, tensors))


@functools.lru_cache(maxsize=None)
def _torch_dtype(dtype) -> torch.dtype:
    return getattr(torch, jnp.dtype(dtype).name)


# --------------------------------------------------------------------------------------------
# The public wrapper


class JaxFunction:
    """A JAX function callable with torch tensors. Made by :func:`jax2torch`."""

    def __init__(self, fn, name: str | None = None, *, double_backward: bool = True):
        self.fn = fn
        self.name = name or getattr(fn, "__name__", type(fn).__name__)
        self.double_backward = double_backward
        self.trace_count = 0
        self._specs: dict = {}
        self._positional: dict = {}     # number of tensor arguments -> spec, for f(t1, t2, ...)
        self._warned: set = set()
        self.key = f"{self.name}@{next(_spec_ids)}"
        _FUNCTIONS[self.key] = self
        functools.update_wrapper(self, fn, updated=())

    def _spec(self, args, kwargs):
        if not kwargs and all(type(x) is torch.Tensor for x in args):
            # The common call, f(t1, t2, ...): skip the pytree flatten and the static-value key.
            spec = self._positional.get(len(args))
            if spec is not None and all(x.dtype in SUPPORTED_DTYPES and (x.is_cuda or x.is_cpu)
                                        and x.layout is torch.strided and not x.is_nested for x in args):
                device = args[0].get_device() if args else None
                if all(x.get_device() == device for x in args):
                    return spec, list(args)
        leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
        is_tensor = tuple(isinstance(x, torch.Tensor) for x in leaves)
        statics = tuple(x for x, t in zip(leaves, is_tensor) if not t)
        try:
            # types too: 1, 1.0 and True are equal as keys but trace to different dtypes
            key = (treedef, is_tensor, tuple((type(x), x) for x in statics))
            spec = self._specs.get(key)
        except TypeError:
            bad = next(x for x in statics if not _hashable(x))
            raise TypeError(f"{self.name}: non-tensor argument {bad!r} of type {type(bad).__name__} "
                            "is not hashable; non-tensor arguments are static values and must be "
                            "hashable (pass arrays as torch tensors)") from None
        tensors = [x for x, t in zip(leaves, is_tensor) if t]
        _check_tensors(self.name, tensors, treedef, is_tensor)
        if spec is None:
            spec = self._new_spec(key, args, kwargs, treedef, is_tensor, statics)
        return spec, tensors

    def _new_spec(self, key, args, kwargs, treedef, is_tensor, statics) -> _Spec:
        unequal = [x for x in statics if not _equals_itself(x)]
        if unequal:
            self._warn_once("nan", f"{self.name}: static (non-tensor) argument {unequal[0]!r} is not "
                            "equal to itself (NaN?), so it can never match a cached trace: every call "
                            "with it traces and compiles again. Pass it as a tensor instead.")
        with _lock:
            spec = self._specs.get(key)
            if spec is not None:
                return spec
            spec = _Spec(self, treedef, is_tensor, statics)
            while len(self._specs) >= MAX_STATIC_VALUES:
                old_key = next((k for k, s in self._specs.items() if s not in _PINNED), None)
                if old_key is None:
                    break
                old = self._specs.pop(old_key)
                self._positional = {n: s for n, s in self._positional.items() if s is not old}
                self._warn_overflow("static values")
            self._specs[key] = spec
            if not kwargs and all(type(x) is torch.Tensor for x in args):
                self._positional[len(args)] = spec
        return spec

    def _warn_overflow(self, what: str):
        if what == "static values":
            message = (f"{self.name}: called with more than {MAX_STATIC_VALUES} different static "
                       "(non-tensor) argument values; each new value traces and compiles again, and "
                       "only the latest are kept. Non-tensor arguments are static: pass values that "
                       "compare equal from call to call (not a new object or NaN each call), or "
                       "pass numbers that change as tensors.")
        else:
            message = (f"{self.name}: called with more than {MAX_SIGNATURES} different input "
                       "shapes/dtypes; each new one traces and compiles again, and only the latest "
                       "are kept. Pad inputs to a few shapes to avoid recompiling.")
        self._warn_once(what, message)

    def _warn_once(self, key: str, message: str):
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=4)

    def __call__(self, *args, **kwargs):
        if torch.compiler.is_compiling():
            return _compiled_call(self.key, *args, **kwargs)
        spec, tensors = self._spec(args, kwargs)
        if _forward_ad._current_level >= 0 and any(_forward_ad.unpack_dual(t).tangent is not None
                                                   for t in tensors):
            _no_forward_ad(self.name)      # else the tangents would be dropped without a word
        if _needs_op(tensors):
            return _op_path(spec, tensors)
        with_vjp = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
        if with_vjp:
            sig = spec.eager_signature(tensors, True)
            outs = _BridgeFunction.apply(spec, sig, *tensors)
        else:
            sig = spec.eager_signature(tensors, False)
            outs, _ = spec.run(tensors, False, known=True)
        return jax.tree_util.tree_unflatten(sig.out_treedef, list(outs))

    def __repr__(self):
        return f"jax2torch({self.name})"


_FUNCTIONS: "weakref.WeakValueDictionary[str, JaxFunction]" = weakref.WeakValueDictionary()


def _needs_op(tensors) -> bool:
    """Whether a call must go through the custom op: under a torch.func transform, or with tensor
    subclasses (fake or functional tensors while torch traces) that hold no data of their own."""
    return torch._C._are_functorch_transforms_active() or \
        any(type(t) not in _PLAIN_TENSOR_TYPES for t in tensors)


def _op_path(spec, tensors):
    with_vjp = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if torch._C._are_functorch_transforms_active():
        # torch.func needs an autograd.Function with setup_context (the custom op's own autograd
        # has none) and a vmap rule that may call bridged functions again.
        flat = _FuncBridge.apply(spec.key, with_vjp, *tensors)
    else:
        flat = _op_call(tensors, spec.key, with_vjp)
    sig = spec.signature(tensors, with_vjp)
    return jax.tree_util.tree_unflatten(sig.out_treedef, list(flat[:len(sig.out_avals)]))


class _FuncBridge(torch.autograd.Function):
    """The bridged call under torch.func transforms. Its vmap rule is the bridged jax.vmap of the
    function; its backward, the bridged backward (itself differentiable and vmappable)."""

    @staticmethod
    def forward(spec_key, with_vjp, *tensors):
        return tuple(_op_call(list(tensors), spec_key, with_vjp))

    @staticmethod
    def setup_context(ctx, inputs, output):
        spec_key, with_vjp, *tensors = inputs
        ctx.sig, ctx.name = None, _SPECS[spec_key].owner.name
        if not with_vjp:
            ctx.mark_non_differentiable(*output)
            return
        sig = ctx.sig = _SPECS[spec_key].signature(tensors, with_vjp=True)
        ctx.n_in = len(tensors)
        n_out = len(sig.out_avals)
        ctx.save_for_backward(*_saved_for_backward(sig, tensors, output[:n_out], output[n_out:]))
        ctx.mark_non_differentiable(*output[n_out:], *(o for o in output[:n_out] if o.dtype not in _DIFFERENTIABLE))

    @staticmethod
    def vmap(info, in_dims, spec_key, with_vjp, *tensors):
        dims = _batched_dims(in_dims[2:], tensors)
        out = _SPECS[spec_key].vmapped(with_vjp, dims, tensors)(*tensors)
        return tuple(out), (0,) * len(out)

    @staticmethod
    def backward(ctx, *grads):
        sig = ctx.sig
        n_out = len(sig.out_avals)
        saved = ctx.saved_tensors
        device = next(t.device for t in (*grads, *saved) if t is not None)
        cts = [g if g is not None else torch.zeros(a.shape, dtype=_torch_dtype(a.dtype), device=device)
               for g, a in zip(grads[:n_out], sig.out_avals)]
        if _wants_double_backward(saved, cts):
            got = _double_backward(sig, saved, cts, ctx.n_in)
        else:
            got = sig.backward_fn()(list(saved[:len(sig.res_sources)]), cts)
        full = [None] * ctx.n_in
        for i, g in zip(sig.diff, got):
            full[i] = g
        return (None, None, *full)

    @staticmethod
    def jvp(ctx, *tangents):
        _no_forward_ad(ctx.name)


@torch._dynamo.nonstrict_trace   # dynamo runs this as plain Python (pytrees, caches), records the op
def _compiled_call(fn_key: str, *args, **kwargs):
    spec, tensors = _FUNCTIONS[fn_key]._spec(args, kwargs)
    return _op_path(spec, tensors)


def _hashable(x) -> bool:
    try:
        hash(x)
        return True
    except TypeError:
        return False


def _equals_itself(x) -> bool:
    try:
        return bool(x == x)
    except Exception:
        return True


def _check_tensors(name, tensors, treedef, is_tensor):
    if not tensors:
        return
    devices = {t.device for t in tensors}
    for i, t in enumerate(tensors):
        if t.dtype not in SUPPORTED_DTYPES or t.device.type not in ("cpu", "cuda") \
                or t.layout is not torch.strided or t.is_nested:
            label = _label(treedef, is_tensor, i)
            check_layout(t, f"{name}: argument {label}")
            check_dtype(t, f"{name}: argument {label}")
            check_device(t, f"{name}: argument {label}")
    if len(devices) > 1:
        parts = ", ".join(f"{_label(treedef, is_tensor, i)} on {t.device}" for i, t in enumerate(tensors))
        raise ValueError(f"{name}: all tensor arguments must be on one device, got {parts}")


def _label(treedef, is_tensor, tensor_index: int) -> str:
    """Human name of the tensor_index-th tensor leaf: its path in (args, kwargs)."""
    leaves = [object() for _ in is_tensor]
    args, kwargs = jax.tree_util.tree_unflatten(treedef, leaves)
    paths = jax.tree_util.tree_flatten_with_path((args, kwargs))[0]
    positions = [i for i, t in enumerate(is_tensor) if t]
    path, _ = paths[positions[tensor_index]]
    head, *rest = path
    top = "args" if getattr(head, "idx", None) == 0 else "kwargs"
    return top + "".join(str(p) for p in rest)


def jax2torch(fn=None, *, name: str | None = None, double_backward: bool = True):
    """Wrap a JAX function so that it takes and returns torch tensors, with autograd.

    ``fn`` takes and returns pytrees (tuples, lists, dicts) of arrays; call the wrapper with torch
    tensors in their place. Non-tensor arguments are static (hashable) values. Usable as
    ``jax2torch(fn)`` or as a decorator ``@jax2torch``.

    ``double_backward=False`` declares that ``fn``'s backward cannot be differentiated (say, a
    kernel without derivative rules): a gradient of its gradient then raises
    ``DoubleBackwardError`` up front instead of trying JAX.
    """
    if fn is None:
        return functools.partial(jax2torch, name=name, double_backward=double_backward)
    return JaxFunction(fn, name, double_backward=double_backward)
