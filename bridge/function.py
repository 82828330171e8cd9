"""``jax2torch``: any JAX function as a differentiable torch function.

How one call runs:

    torch tensors --DLPack--> jax.Arrays --jitted forward--> outputs (+ residuals) --DLPack--> torch

- Arguments are a pytree: torch tensors are traced inputs, everything else is a static (hashable)
  value that selects a separate compiled function. Floating and complex tensors are
  differentiable; integer and bool tensors are not.
- Forward and backward are ``jax.jit`` functions built once per (function, argument structure,
  static values) and compiled by JAX once per shapes/dtypes/device. ``trace_count`` counts traces.
- With grad enabled, forward runs ``jax.vjp`` and hands the residuals of its pullback (the
  function's own ``custom_vjp`` residuals where it defines one) back as torch tensors, saved with
  ``save_for_backward``: a residual that *is* an input or an output is saved as that torch tensor,
  so nothing is stored twice and torch's version counter catches in-place edits. Backward
  rebuilds the pullback from them inside a jitted function; no JAX closure lives on the context.
- Complex: torch's gradient is the conjugate of JAX's vjp of the conjugated cotangent.
- 64-bit tensors (float64, complex128, int64) run in JAX's x64 mode, never narrowed.
- Under ``torch.compile`` the call goes through the ``jax_bridge::call`` custom op (opaque to
  the compiler, with a fake implementation from ``jax.eval_shape``); in eager mode it goes straight
  through a ``torch.autograd.Function``, which costs less per call.
"""

from __future__ import annotations

import functools
import itertools
import weakref

import numpy as np
import torch

from .convert import SUPPORTED_DTYPES, WIDE_DTYPES, check_device, check_dtype, exchange, prepare
import jax
import jax.numpy as jnp

_DIFFERENTIABLE = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64,
                             torch.complex64, torch.complex128})

# Specs reachable by a string key, for the custom op (whose schema can only carry strings).
_SPECS: "weakref.WeakValueDictionary[str, _Spec]" = weakref.WeakValueDictionary()
_SIGNATURES: "weakref.WeakValueDictionary[str, _Signature]" = weakref.WeakValueDictionary()
_spec_ids = itertools.count()


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

    def _record(self, with_vjp, arrays) -> _Signature:
        key = (with_vjp, tuple((a.shape, jnp.dtype(a.dtype)) for a in arrays))
        sig = self._traced[key] = _Signature()
        return sig

    def _plain(self, *arrays):
        sig = self._record(False, arrays)
        out = self._call_fn(arrays)
        flat, treedef = jax.tree_util.tree_flatten(out)
        self._record_outputs(sig, flat, treedef)
        return flat

    def _record_outputs(self, sig, flat, treedef):
        for i, leaf in enumerate(flat):
            if not isinstance(leaf, jax.Array):
                raise TypeError(f"{self.owner.name} returned a {type(leaf).__name__} at output leaf {i}; "
                                "a bridged function must return jax arrays (in any pytree)")
        sig.out_treedef = treedef
        sig.out_avals = [jax.ShapeDtypeStruct(o.shape, o.dtype) for o in flat]

    def _vjp_fwd(self, *arrays):
        sig = self._record(True, arrays)
        diff = [i for i, x in enumerate(arrays) if _differentiable_dtype(x.dtype)]

        def f(*diff_arrays):
            full = list(arrays)
            for i, x in zip(diff, diff_arrays):
                full[i] = x
            out = self._call_fn(full)
            flat, treedef = jax.tree_util.tree_flatten(out)
            self._record_outputs(sig, flat, treedef)
            return flat

        flat_out, pullback = jax.vjp(f, *(arrays[i] for i in diff))
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
        return flat_out, extras

    def _make_bwd(self, sig: _Signature):
        def bwd(res, cts):
            pullback = jax.tree_util.tree_unflatten(sig.res_treedef, res)
            cts = [np.zeros(a.shape, jax.dtypes.float0) if not _differentiable_dtype(a.dtype)
                   else jnp.conj(c) if jnp.iscomplexobj(c) else c
                   for c, a in zip(cts, sig.out_avals)]
            grads = pullback(cts)
            return [jnp.conj(g) if jnp.iscomplexobj(g) else g for g in grads]
        return jax.jit(bwd)

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
            # Learn the output structure and the residual layout from JAX's trace of this
            # signature (eval_shape traces it unless a call already has; both record it).
            in_avals = [jax.ShapeDtypeStruct(tuple(int(d) for d in t.shape), _jax_dtype(t.dtype))
                        for t in tensors]
            traced_key = (with_vjp, tuple((a.shape, a.dtype) for a in in_avals))
            if traced_key not in self._traced:
                with jax.enable_x64(_needs_x64(tensors)):
                    jax.eval_shape(self.vjp_fwd if with_vjp else self.plain, *in_avals)
            sig = self._traced[traced_key]
            sig.in_avals = in_avals
            if with_vjp:
                sig.bwd = self._make_bwd(sig)
            sig.key = f"{self.key}/{len(self.signatures)}"
            _SIGNATURES[sig.key] = sig
            self.signatures[key] = sig
        return sig

    def run(self, tensors, with_vjp: bool, known: bool = False, keep_arrays: bool = False):
        """Outputs (and, with_vjp, the extra residuals) as torch tensors; with keep_arrays also
        the JAX arrays (inputs, outputs, extras) that they share memory with."""
        if not known:
            self.signature(tensors, with_vjp)   # first call per signature: learn its layout
        arrays = exchange.to_jax([prepare(t) for t in tensors], one_computation=True)
        with jax.enable_x64(_needs_x64(tensors)):
            if with_vjp:
                outs, extras = self.vjp_fwd(*arrays)
            else:
                outs, extras = self.plain(*arrays), []
        converted = exchange.to_torch([*outs, *extras])
        result = converted[:len(outs)], converted[len(outs):]
        return (*result, (arrays, outs, extras)) if keep_arrays else result

    def run_bwd(self, sig: _Signature, res, cts, wide: bool, res_arrays=None):
        """Input gradients as torch tensors. ``res_arrays``: the residuals' JAX arrays when the
        caller still holds them (saves re-importing the saved tensors)."""
        if res_arrays is None:
            arrays = exchange.to_jax([prepare(t) for t in (*res, *cts)], one_computation=True)
            res_arrays, ct_arrays = arrays[:len(res)], arrays[len(res):]
        else:
            ct_arrays = exchange.to_jax([prepare(t) for t in cts], one_computation=True)
        with jax.enable_x64(wide):
            grads = sig.bwd(res_arrays, ct_arrays)
        return exchange.to_torch(grads)


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


# --------------------------------------------------------------------------------------------
# Autograd in eager mode


def _saved_residuals(sig, tensors, outs, extras):
    pick = {"in": tensors, "out": outs, "res": extras}
    return [pick[kind][i] for kind, i in sig.res_sources]


class _BridgeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec: _Spec, sig: _Signature, *tensors):
        outs, extras, (in_arr, out_arr, extra_arr) = spec.run(tensors, with_vjp=True, known=True,
                                                              keep_arrays=True)
        ctx.spec, ctx.sig, ctx.n_in = spec, sig, len(tensors)
        ctx.wide = _needs_x64(tensors)
        # The residuals are saved as torch tensors (torch's version counter guards them); their
        # JAX arrays (views of the same memory, no closures) are kept so backward need not
        # import them again.
        ctx.save_for_backward(*_saved_residuals(sig, tensors, outs, extras))
        ctx.res_arrays = _saved_residuals(sig, in_arr, out_arr, extra_arr)
        ctx.mark_non_differentiable(*(o for o in outs if o.dtype not in _DIFFERENTIABLE))
        return tuple(outs)

    @staticmethod
    def backward(ctx, *cts):
        res = ctx.saved_tensors     # raises if a residual was modified in place since forward
        grads = ctx.spec.run_bwd(ctx.sig, res, cts, ctx.wide, ctx.res_arrays)
        ctx.res_arrays = None
        full = [None] * ctx.n_in
        for i, g in zip(ctx.sig.diff, grads):
            if ctx.needs_input_grad[2 + i]:
                full[i] = g
        return (None, None, *full)


# --------------------------------------------------------------------------------------------
# torch.compile: the same work as custom ops


@torch.library.custom_op("jax_bridge::call", mutates_args=())
def _op_call(tensors: list[torch.Tensor], spec_key: str, with_vjp: bool) -> list[torch.Tensor]:
    outs, extras = _SPECS[spec_key].run(tensors, with_vjp)
    return outs + extras


@_op_call.register_fake
def _(tensors, spec_key, with_vjp):
    sig = _SPECS[spec_key].signature(tensors, with_vjp)
    device = tensors[0].device if tensors else torch.device("cpu")
    avals = sig.out_avals + (sig.extra_avals if with_vjp else [])
    return [tensors[0].new_empty(a.shape, dtype=_torch_dtype(a.dtype), device=device) for a in avals]


@torch.library.custom_op("jax_bridge::call_bwd", mutates_args=())
def _op_call_bwd(res: list[torch.Tensor], cts: list[torch.Tensor], sig_key: str) -> list[torch.Tensor]:
    sig = _SIGNATURES[sig_key]
    spec = _SPECS[sig_key.rsplit("/", 1)[0]]
    return spec.run_bwd(sig, res, cts, any(_jax_wide(a.dtype) for a in sig.in_avals))


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
        ctx.save_for_backward(*_saved_residuals(sig, tensors, output[:n_out], output[n_out:]))


def _backward(ctx, grads):
    sig = ctx.sig
    if sig is None:
        raise RuntimeError("jax_bridge::call ran without residuals but is being differentiated")
    n_out = len(sig.out_avals)
    device = next(g.device for g in grads if g is not None)
    cts = [g if g is not None else torch.zeros(a.shape, dtype=_torch_dtype(a.dtype), device=device)
           for g, a in zip(grads[:n_out], sig.out_avals)]
    got = _op_call_bwd(list(ctx.saved_tensors), cts, sig.key)
    full = [None] * ctx.n_in
    for i, g in zip(sig.diff, got):
        full[i] = g
    return full, None, None


_op_call.register_autograd(_backward, setup_context=_setup_context)


@functools.lru_cache(maxsize=None)
def _torch_dtype(dtype) -> torch.dtype:
    return getattr(torch, jnp.dtype(dtype).name)


# --------------------------------------------------------------------------------------------
# The public wrapper


class JaxFunction:
    """A JAX function callable with torch tensors. Made by :func:`jax2torch`."""

    def __init__(self, fn, name: str | None = None):
        self.fn = fn
        self.name = name or getattr(fn, "__name__", type(fn).__name__)
        self.trace_count = 0
        self._specs: dict = {}
        self._positional: dict = {}     # number of tensor arguments -> spec, for f(t1, t2, ...)
        self.key = f"{self.name}@{next(_spec_ids)}"
        _FUNCTIONS[self.key] = self
        functools.update_wrapper(self, fn, updated=())

    def _spec(self, args, kwargs):
        if not kwargs and all(type(x) is torch.Tensor for x in args):
            # The common call, f(t1, t2, ...): skip the pytree flatten and the static-value key.
            spec = self._positional.get(len(args))
            if spec is not None and all(x.dtype in SUPPORTED_DTYPES and (x.is_cuda or x.is_cpu) for x in args):
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
        if spec is None:
            spec = self._specs[key] = _Spec(self, treedef, is_tensor, statics)
            if not kwargs and all(type(x) is torch.Tensor for x in args):
                self._positional[len(args)] = spec
        tensors = [x for x, t in zip(leaves, is_tensor) if t]
        _check_tensors(self.name, tensors, treedef, is_tensor)
        return spec, tensors

    def __call__(self, *args, **kwargs):
        if torch.compiler.is_compiling():
            return _compiled_call(self.key, *args, **kwargs)
        spec, tensors = self._spec(args, kwargs)
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


@torch._dynamo.nonstrict_trace   # dynamo runs this as plain Python (pytrees, caches), records the op
def _compiled_call(fn_key: str, *args, **kwargs):
    spec, tensors = _FUNCTIONS[fn_key]._spec(args, kwargs)
    with_vjp = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    flat = _op_call(tensors, spec.key, with_vjp)
    sig = spec.signature(tensors, with_vjp)
    return jax.tree_util.tree_unflatten(sig.out_treedef, list(flat[:len(sig.out_avals)]))


def _hashable(x) -> bool:
    try:
        hash(x)
        return True
    except TypeError:
        return False


def _check_tensors(name, tensors, treedef, is_tensor):
    if not tensors:
        return
    devices = {t.device for t in tensors}
    for i, t in enumerate(tensors):
        if t.dtype not in SUPPORTED_DTYPES or t.device.type not in ("cpu", "cuda"):
            label = _label(treedef, is_tensor, i)
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


def jax2torch(fn=None, *, name: str | None = None):
    """Wrap a JAX function so that it takes and returns torch tensors, with autograd.

    ``fn`` takes and returns pytrees (tuples, lists, dicts) of arrays; call the wrapper with torch
    tensors in their place. Non-tensor arguments are static (hashable) values. Usable as
    ``jax2torch(fn)`` or as a decorator ``@jax2torch``.
    """
    if fn is None:
        return functools.partial(jax2torch, name=name)
    return JaxFunction(fn, name)
