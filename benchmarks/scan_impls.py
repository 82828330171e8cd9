"""The implementations that benchmarks/scan_speed.py times, behind one small interface.

Every implementation computes h_t = a_t * h_{t-1} + x_t along dim 1 of (B, N, D) tensors.
An `Impl` says whether it can run a case (`skip_reason`) and, given the case's torch tensors,
returns a `Prepared` with two zero-argument callables:

    fwd()     -> output whose completion `wait` blocks on (h, in whatever form the impl keeps it)
    fwdbwd()  -> the gradients wrt a and x for the cotangent ct (same form)

and converters `h_of` / `grads_of` that turn those outputs into torch tensors of shape
(B, N, D) in torch's complex convention, used (outside the timed region) for the error check.

Dimension letters: B batch, N sequence length (time), D features; C = D in accelerated-scan's
(B, C, T) layout.

Groups:
    gate_loop_scan  each backend of gateloop_hybrid.scan.gate_loop_scan, called from torch
    native          jitted JAX on JAX arrays: gateloop_hybrid.kernels.jax_scan, and plain
                    jax.lax.associative_scan with JAX's own autodiff backward
    baseline        a plain torch Python loop (the design's baseline)
    peer            accelerated-scan and flash-linear-attention's HGRN kernels, when installed

A peer that is not installed or cannot run a case is reported, never raised: `skip_reason`
returns a sentence, and `prepare` / the calls may raise, which the runner records.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Any, Callable

import torch

from harness import device_wait

COMPLEX = (torch.complex64, torch.complex128)


@dataclass
class Case:
    B: int
    N: int
    D: int
    dtype: str                                  # "float32" | "bfloat16" | "complex64"
    core: bool = True                           # False: a point of the default N sweep

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def is_complex(self) -> bool:
        return self.torch_dtype in COMPLEX

    @property
    def numel(self) -> int:
        return self.B * self.N * self.D

    @property
    def tensor_bytes(self) -> int:
        """Bytes of one (B, N, D) tensor in the case's dtype (the unit of the floor)."""
        return self.numel * torch.empty((), dtype=self.torch_dtype).element_size()

    def label(self) -> str:
        return f"{self.dtype} B={self.B} N={self.N} D={self.D}"


@dataclass
class Prepared:
    fwd: Callable[[], Any]
    fwdbwd: Callable[[], Any]
    h_of: Callable[[Any], torch.Tensor]
    grads_of: Callable[[Any], tuple[torch.Tensor, torch.Tensor]]
    wait: Callable[[Any], None]
    uses_jax: bool = False
    # "fwd"/"fwdbwd" -> bytes, or None: XLA's memory_analysis of the compiled call (JAX natively)
    static_memory: Callable[[str], int | None] | None = None


def _import(name: str):
    """(module, None) or (None, 'not installed: ...') without raising."""
    try:
        return importlib.import_module(name), None
    except Exception as e:                         # ImportError, or a broken dependency
        return None, f"not importable: {type(e).__name__}: {first_line(e)}"


def first_line(e: BaseException, limit: int = 140) -> str:
    s = str(e).strip().splitlines()
    s = s[0] if s else ""
    return s if len(s) <= limit else s[: limit - 3] + "..."


class Impl:
    key: str = ""            # short name for --backends
    name: str = ""           # row label
    group: str = ""
    python_loop: bool = False  # one kernel launch per time step: capped by --loop-max-n
    sweep: bool = True         # False: a comparison row, run on the core (main) shapes only

    def skip_reason(self, case: Case, device: torch.device) -> str | None:
        return None

    def prepare(self, a: torch.Tensor, x: torch.Tensor, ct: torch.Tensor) -> Prepared:
        raise NotImplementedError


# --------------------------------------------------------------------------------------------
# torch-side implementations: a function (a, x) -> h of torch tensors, autograd for backward


class TorchFnImpl(Impl):
    """Any torch function (a, x) -> h; forward under no_grad, backward by torch.autograd.grad."""

    def fn(self, a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def prepare(self, a, x, ct):
        wait = device_wait(a.device)
        a_r = a.detach().requires_grad_(True)
        x_r = x.detach().requires_grad_(True)

        def fwd():
            with torch.no_grad():
                return self.fn(a, x)

        def fwdbwd():
            h = self.fn(a_r, x_r)
            return torch.autograd.grad(h, (a_r, x_r), ct)

        return Prepared(fwd, fwdbwd, h_of=lambda h: h, grads_of=lambda g: (g[0], g[1]), wait=wait)


class GateLoopBackend(TorchFnImpl):
    group = "gate_loop_scan"

    def __init__(self, backend: str, scan_module):
        self.backend = backend
        self.key = backend
        self.name = f"gate_loop_scan[{backend}]"
        self.python_loop = backend == "loop"
        self._scan = scan_module.gate_loop_scan
        self._resolve = getattr(scan_module, "resolve_backend", None)

    def skip_reason(self, case, device):
        if self._resolve is not None:
            try:
                self._resolve(self.backend, device)
            except Exception as e:                 # e.g. pallas on CPU, jax not installed
                return f"{type(e).__name__}: {first_line(e, 200)}"
        return None

    def fn(self, a, x):
        return self._scan(a, x, backend=self.backend)[0]


class TorchLoop(TorchFnImpl):
    """The design's baseline: the recurrence as a plain Python loop over time, in torch."""

    key = "torch-loop"
    name = "torch python loop"
    group = "baseline"
    python_loop = True

    def fn(self, a, x):
        # unbind, not a[:, t]: the backward of N index ops would write N full-size gradients
        h = torch.zeros_like(x[:, 0])
        hs = []
        for a_t, x_t in zip(a.unbind(1), x.unbind(1)):
            h = a_t * h + x_t
            hs.append(h)
        return torch.stack(hs, dim=1)


# --------------------------------------------------------------------------------------------
# JAX natively: the same jitted scan the "jax" backend uses, on JAX arrays, no bridge


def _lax_associative_scan(a, x):
    """Plain jax.lax.associative_scan of the recurrence, (h, h_last), JAX's own autodiff;
    float32 at least inside."""
    import jax
    import jax.numpy as jnp

    out = jnp.result_type(a.dtype, x.dtype)
    dt = jnp.float32 if out in (jnp.bfloat16, jnp.float16) else out

    def combine(left, right):
        return right[0] * left[0], right[0] * left[1] + right[1]

    _, h = jax.lax.associative_scan(combine, (a.astype(dt), x.astype(dt)), axis=1)
    return h.astype(out), h[:, -1].astype(out)


class JaxNative(Impl):
    """A JAX scan, jitted, called on JAX arrays (no torch, no bridge).

    jax_scan.scan_jax, with its hand-written reverse-scan backward (what the "jax" backend runs);
    pallas_scan.scan_pallas (the "pallas" backend's kernels); or, with autodiff, plain
    jax.lax.associative_scan differentiated by JAX itself, for comparison.
    """

    group = "native"

    def __init__(self, autodiff: bool = False, pallas: bool = False):
        self.key = "jax-autodiff" if autodiff else "pallas-native" if pallas else "jax-native"
        self.sweep = not autodiff
        self._scan, self._err = None, None
        if autodiff:
            self.name = "jax.lax.associative_scan, JAX autodiff (jit)"
            self._scan = _lax_associative_scan
            if importlib.util.find_spec("jax") is None:
                self._err = "not importable: jax is not installed"
            return
        # The kernels the "pallas" / "jax" backends run, on JAX arrays: the gap to
        # gate_loop_scan[pallas] / [jax] is the bridge's cost (and, for pallas, view_as_real's pairing).
        module, fn = ("pallas_scan", "scan_pallas") if pallas else ("jax_scan", "scan_jax")
        self.name = f"{'pallas' if pallas else 'jax'} native ({module}.{fn}, jit)"
        mod, self._err = _import(f"gateloop_hybrid.kernels.{module}")
        if mod is not None:
            self._scan = getattr(mod, fn)

    def skip_reason(self, case, device):
        if self._err is None and self.key == "pallas-native" and device.type != "cuda":
            return "GPU only (Pallas kernels)"
        return self._err

    def prepare(self, a, x, ct):
        import jax

        scan = self._scan

        def h_only(a, x):
            return scan(a, x)[0]

        fwd_j = jax.jit(h_only)

        def vjp(a, x, ct):
            _, pullback = jax.vjp(h_only, a, x)
            return pullback(ct)

        fwdbwd_j = jax.jit(vjp)

        to_j = _to_jax
        aj, xj = to_j(a), to_j(x)
        # JAX's complex vjp is torch's conjugated: feed conj(ct), conjugate the result (untimed)
        ctj = to_j(ct.conj().resolve_conj() if ct.is_complex() else ct)

        def static_memory(which):       # after the first call, so jit's cache has it
            f, args = (fwd_j, (aj, xj)) if which == "fwd" else (fwdbwd_j, (aj, xj, ctj))
            m = f.lower(*args).compile().memory_analysis()
            return None if m is None else int(m.temp_size_in_bytes + m.output_size_in_bytes)

        def grads_of(g):
            da, dx = (_to_torch(t) for t in g)
            if da.is_complex():
                da, dx = da.conj(), dx.conj()
            return da, dx

        return Prepared(
            fwd=lambda: fwd_j(aj, xj),
            fwdbwd=lambda: fwdbwd_j(aj, xj, ctj),
            h_of=_to_torch,
            grads_of=grads_of,
            wait=lambda out: jax.block_until_ready(out),
            uses_jax=True,
            static_memory=static_memory,
        )


def _to_jax(t: torch.Tensor):
    """A JAX array with the tensor's values on the same device (DLPack; copied to own it)."""
    import jax
    import jax.numpy as jnp

    return jnp.array(jax.dlpack.from_dlpack(t.detach().contiguous()), copy=True)


def _to_torch(arr) -> torch.Tensor:
    return torch.from_dlpack(arr)


# --------------------------------------------------------------------------------------------
# accelerated-scan (proger/accelerated-scan): Triton kernels on (B, C, T) contiguous tensors


class AcceleratedScan(Impl):
    group = "peer"

    def __init__(self, kind: str, with_transposes: bool):
        self.kind = kind                           # "scalar" | "complex"
        self.with_transposes = with_transposes
        self.key = f"accel-{kind}" + ("+T" if with_transposes else "")
        self.name = f"accelerated-scan {kind}" + (" +transposes" if with_transposes else " (B,C,T)")
        mod, self._err = _import(f"accelerated_scan.{kind}")
        self._scan = getattr(mod, "scan", None) if mod else None

    def skip_reason(self, case, device):
        if self._err:
            return self._err
        if device.type != "cuda":
            return "needs CUDA (Triton kernels)"
        if self.kind == "scalar" and case.is_complex:
            return "real gates only (see accelerated-scan complex)"
        if self.kind == "complex" and not case.is_complex:
            return "complex gates only (see accelerated-scan scalar)"
        return None

    def prepare(self, a, x, ct):
        wait = device_wait(a.device)
        scan = self._scan

        def bct(t):        # (B, N, D) -> contiguous (B, C=D, T=N)
            return t.transpose(1, 2).contiguous()

        def bnd(t):        # back to contiguous (B, N, D)
            return t.transpose(1, 2).contiguous()

        if self.with_transposes:
            a_r = a.detach().requires_grad_(True)
            x_r = x.detach().requires_grad_(True)

            def fwd():
                with torch.no_grad():
                    return bnd(scan(bct(a), bct(x)))

            def fwdbwd():
                h = bnd(scan(bct(a_r), bct(x_r)))
                return torch.autograd.grad(h, (a_r, x_r), ct)

            return Prepared(fwd, fwdbwd, h_of=lambda h: h, grads_of=lambda g: (g[0], g[1]),
                            wait=wait)

        # kernel alone: inputs, output and cotangent already in (B, C, T)
        a_t, x_t, ct_t = bct(a), bct(x), bct(ct)
        a_tr = a_t.detach().requires_grad_(True)
        x_tr = x_t.detach().requires_grad_(True)

        def fwd():
            with torch.no_grad():
                return scan(a_t, x_t)

        def fwdbwd():
            h = scan(a_tr, x_tr)
            return torch.autograd.grad(h, (a_tr, x_tr), ct_t)

        return Prepared(fwd, fwdbwd, h_of=lambda h: h.transpose(1, 2),
                        grads_of=lambda g: (g[0].transpose(1, 2), g[1].transpose(1, 2)), wait=wait)


# --------------------------------------------------------------------------------------------
# flash-linear-attention (fla-core): HGRN kernels, real gates given as log gates g = log a


class FlaHGRN(Impl):
    group = "peer"

    def __init__(self, kind: str):
        self.kind = kind                           # "chunk" | "fused_recurrent"
        self.key = "fla-chunk" if kind == "chunk" else "fla-recurrent"
        self.name = f"fla {kind}_hgrn (log gates)"
        mod, self._err = _import("fla.ops.hgrn")
        self._fn = getattr(mod, f"{kind}_hgrn", None) if mod else None

    def skip_reason(self, case, device):
        if self._err:
            return self._err
        if device.type != "cuda":
            return "needs CUDA (Triton kernels)"
        if case.is_complex:
            return "real gates only (HGRN takes log gates; fla has no complex kernels)"
        return None

    def prepare(self, a, x, ct):
        wait = device_wait(a.device)
        fn = self._fn
        g = torch.log(a.float()).to(a.dtype)       # the peer's own input form, made untimed
        g_r = g.detach().requires_grad_(True)
        x_r = x.detach().requires_grad_(True)

        def fwd():
            with torch.no_grad():
                return fn(x, g)[0]

        def fwdbwd():
            o = fn(x_r, g_r)[0]
            return torch.autograd.grad(o, (g_r, x_r), ct)

        def grads_of(gr):                          # dL/da = dL/dg / a
            dg, dx = gr
            return dg.double() / a.double(), dx

        return Prepared(fwd, fwdbwd, h_of=lambda h: h, grads_of=grads_of, wait=wait)


# --------------------------------------------------------------------------------------------


def build(device: torch.device) -> tuple[list[Impl], list[str]]:
    """All implementations, in table order, and notes on what could not be set up."""
    notes: list[str] = []
    impls: list[Impl] = []
    scan_mod, err = _import("gateloop_hybrid.scan")
    if err:
        notes.append(f"gateloop_hybrid.scan {err}: no gate_loop_scan backends")
    else:
        backends = [b for b in getattr(scan_mod, "BACKENDS", ()) if b != "auto"]
        impls += [GateLoopBackend(b, scan_mod) for b in backends]
    impls += [JaxNative(), JaxNative(pallas=True), JaxNative(autodiff=True)]
    impls.append(TorchLoop())
    impls += [AcceleratedScan("scalar", False), AcceleratedScan("scalar", True),
              AcceleratedScan("complex", False), AcceleratedScan("complex", True)]
    impls += [FlaHGRN("chunk"), FlaHGRN("fused_recurrent")]
    return impls, notes
