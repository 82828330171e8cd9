"""Each GPU kernel against its float64 reference on a small odd-length case with an initial state,
values and gradients. ``gateloop_hybrid.routing`` runs each once per device before "auto" takes
the kernel; each returns None when the kernel passes, else what went wrong (any failure to
compile or run counts: the kernel is then not taken).
"""

from __future__ import annotations

import torch

_TOL = dict(rtol=1e-4, atol=1e-4)


def _why(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def _allclose(got, want) -> bool:
    return torch.allclose(got, want, **_TOL)


def _compare(run, reference, inputs, loss, device, close=_allclose) -> str | None:
    """run and reference on ``inputs`` (CPU tensors): run's values and gradients on ``device``
    against reference's in float64 (complex128 for complex inputs) on the CPU, each pair by
    ``close(got, want)`` (default: within _TOL)."""
    try:
        with torch.enable_grad():      # the first call may come under no_grad
            leaves = [t.to(device).requires_grad_() for t in inputs]
            outs = run(*leaves)
            grads = torch.autograd.grad(loss(*outs), leaves)
            wide = [t.detach().cpu().to(torch.complex128 if t.is_complex() else torch.float64).requires_grad_()
                    for t in inputs]
            refs = reference(*wide)
            ref_grads = torch.autograd.grad(loss(*refs), wide)
        for got, want in zip((*outs, *grads), (*refs, *ref_grads)):
            if not close(got.detach().cpu().to(want.dtype), want.detach()):
                return "results differ from the float64 reference"
    except Exception as e:  # noqa: BLE001  (any failure to compile or run means: do not take it)
        return _why(e)
    return None


def mosaic_scan(device) -> str | None:
    """The Mosaic GPU scan, complex gates and inputs with h0."""
    from ..scan.reference import scan_reference
    from .mosaic import scan_mosaic
    g = torch.Generator().manual_seed(0)
    a = torch.polar(0.5 + 0.5 * torch.rand(2, 37, 128, generator=g), 6 * torch.rand(2, 37, 128, generator=g) - 3)
    x = torch.randn(2, 37, 128, generator=g, dtype=torch.complex64)
    h0 = torch.randn(2, 128, generator=g, dtype=torch.complex64)
    return _compare(scan_mosaic, scan_reference, (a, x, h0),
                    lambda h, h_last: h.abs().sum() + h_last.real.sum(), device)


def fused_mixer(device) -> str | None:
    """The fused mixer with one feature per head, against the composition, with h0."""
    from ..mixer import composed_mixer
    from .mosaic import try_mixer_mosaic
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 37, 3 * 128, generator=g)
    z = torch.randn(2, 37, 2 * 128, generator=g)
    h0 = torch.randn(2, 128, generator=g, dtype=torch.complex64)

    def run(qkv, z, h0):
        return try_mixer_mosaic(qkv, z, h0, 0.9, False)

    def reference(qkv, z, h0):
        y, h_last = composed_mixer(qkv, z, h0.view(2, 128, 1, 1), heads=128, frac=0.9, backend="loop")
        return y, h_last.view(2, 128)
    return _compare(run, reference, (qkv, z, h0),
                    lambda y, h_last: y.square().sum() + h_last.abs().sum(), device)


def simple_mixer(device) -> str | None:
    """SimpleGateLoopLayer's real-gate kernels, against the composition, with h0."""
    from ..mixer import composed_simple_mixer
    from .mosaic import try_simple_mixer_mosaic
    g = torch.Generator().manual_seed(0)
    qkva = torch.randn(2, 37, 3 * 128, generator=g)
    h0 = torch.randn(2, 128, generator=g)
    return _compare(try_simple_mixer_mosaic, lambda qkva, h0: composed_simple_mixer(qkva, h0, backend="loop"),
                    (qkva, h0), lambda y, h_last: y.square().sum() + h_last.sum(), device)


def rotated_heads(device) -> str | None:
    """The wide-head kernels (bfloat16 q, k, v, d = 64, a ragged last chunk, h0) against the
    float64 rotated form: values and every gradient within 2% of the largest."""
    from ..rotated import rotated_heads as reference
    from .rotated import rotated_heads_mosaic
    g = torch.Generator().manual_seed(0)
    q, k, v = ((0.3 * torch.randn(1, 100, 2, 64, generator=g)).bfloat16().float() for _ in range(3))
    log_mag = -0.3 * torch.rand(1, 100, 2, generator=g)
    phase = torch.pi * (2 * torch.rand(1, 100, 2, generator=g) - 1)
    h0 = 0.1 * torch.randn(1, 2, 64, 64, generator=g, dtype=torch.complex64)
    weights = torch.cos(torch.arange(q.numel(), dtype=torch.float64)).view(q.shape)

    def run(q, k, v, log_mag, phase, h0):       # q, k, v hold bf16 values: the cast is exact
        return rotated_heads_mosaic(q.bfloat16(), k.bfloat16(), v.bfloat16(), log_mag, phase, h0)

    def loss(y, h_last):
        h_last = h_last.to(torch.complex128)
        return (y.double() * weights.to(y.device)).sum() + h_last.real.sum() + 0.5 * h_last.imag.sum()

    def close(got, want):
        return float((got - want).abs().max()) <= 2e-2 * float(want.abs().max())
    return _compare(run, reference, (q, k, v, log_mag, phase, h0), loss, device, close)


def triton_scan(device, interpret: bool = False) -> str | None:
    """The Triton-lowered Pallas scan against the associative scan, on a JAX device."""
    try:
        import bridge  # noqa: F401  (sets JAX's GPU memory policy in case this starts JAX)
        import jax
        import jax.numpy as jnp
        from ..kernels.jax_scan import scan_jax
        from ..kernels.pallas_scan import scan_pallas
        n = 2 * 37 * 3
        a = jax.device_put((0.5 + 0.4 * jnp.sin(jnp.arange(n, dtype=jnp.float32)) ** 2).reshape(2, 37, 3), device)
        x = jax.device_put(jnp.cos(jnp.arange(n, dtype=jnp.float32)).reshape(2, 37, 3), device)
        loss = lambda fn: lambda a, x: jnp.sum(fn(a, x)[0] * x)
        got = jax.value_and_grad(loss(lambda a, x: scan_pallas(a, x, interpret=interpret)), (0, 1))(a, x)
        want = jax.value_and_grad(loss(scan_jax), (0, 1))(a, x)
        for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
            if not bool(jnp.allclose(g, w, **_TOL)):
                return "results differ from the associative scan"
    except Exception as e:  # noqa: BLE001
        return _why(e)
    return None
