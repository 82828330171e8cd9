"""The Mosaic GPU scan kernels through their torch op (mosaic_op.scan_mosaic), run on CPU in
Pallas's Mosaic GPU interpret mode, against the float64 reference: values and all gradients,
real and complex (and mixed), h0, reverse, odd lengths, gates broadcast per head or per feature
block, and the walk cut into time chunks. The same tests run on a GPU in tests/test_cuda.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("jax")
pytest.importorskip("absl")      # Mosaic GPU's Python side needs absl-py

from gateloop_hybrid.kernels import mosaic_scan, walk  # noqa: E402
from gateloop_hybrid.ops import mosaic as mosaic_op  # noqa: E402
from gateloop_hybrid.scan.reference import scan_reference  # noqa: E402


def make(B, N, x_feat, a_feat, ca, cx, c0, h0, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    mag = 0.5 + 0.49 * torch.rand(B, N, *a_feat, generator=g, dtype=torch.float64)
    a = torch.polar(mag, 6 * torch.rand(B, N, *a_feat, generator=g, dtype=torch.float64) - 3) if ca else mag
    x = torch.randn(B, N, *x_feat, generator=g, dtype=torch.complex128 if cx else torch.float64)
    hh = torch.randn(B, *x_feat, generator=g, dtype=torch.complex128 if c0 else torch.float64) if h0 else None
    low = lambda t: None if t is None else t.to(torch.complex64 if t.is_complex() else dtype)
    return low(a), low(x), low(hh)


def check(a, x, h0, reverse, tol):
    leaves = [t.clone().requires_grad_() for t in (a, x, h0) if t is not None]
    h, h_last = mosaic_op.scan_mosaic(leaves[0], leaves[1], leaves[2] if h0 is not None else None, reverse)
    wide = [t.detach().to(torch.complex128 if t.is_complex() else torch.float64).requires_grad_() for t in leaves]
    h_ref, last_ref = scan_reference(wide[0], wide[1], wide[2] if h0 is not None else None, reverse)
    assert h.shape == h_ref.shape and h.is_complex() == h_ref.is_complex()
    g = torch.Generator().manual_seed(1)
    ch = torch.randn(h_ref.shape, generator=g, dtype=h_ref.dtype)
    cl = torch.randn(last_ref.shape, generator=g, dtype=h_ref.dtype)
    loss = lambda h, hl: (h * ch.to(h.dtype).conj()).real.sum() + (hl * cl.to(hl.dtype).conj()).real.sum()
    grads = torch.autograd.grad(loss(h, h_last), leaves)
    refs = torch.autograd.grad(loss(h_ref, last_ref), wide)
    rel = lambda got, want: ((got.detach().to(want.dtype) - want).abs().norm() / want.abs().norm()).item()
    errors = {"h": rel(h, h_ref), "h_last": rel(h_last, last_ref)}
    for name, got, want in zip(("a", "x", "h0"), grads, refs):
        assert got.shape == want.shape and got.dtype == leaves[["a", "x", "h0"].index(name)].dtype, name
        errors[name] = rel(got, want)
    assert max(errors.values()) < tol, errors


CASES = {
    # name: (B, N, x features, a features, complex a, complex x, complex h0, h0, reverse)
    "real-h0": (2, 37, (128,), (128,), False, False, False, True, False),
    "real-rev-n1": (1, 1, (128,), (128,), False, False, False, True, True),
    "complex-h0-rev": (1, 23, (128,), (128,), True, True, True, True, True),
    "complex-gate-real-x": (1, 19, (2, 128), (2, 1), True, False, False, False, False),
    "real-gate-complex-x-h0": (2, 21, (128,), (1,), False, True, True, True, True),
    "gate-per-feature-block": (1, 17, (2, 128), (1, 128), False, False, False, True, False),
}


@pytest.mark.parametrize("name", list(CASES))
def test_values_and_gradients(name):
    B, N, xf, af, ca, cx, c0, h0, rev = CASES[name]
    check(*make(B, N, xf, af, ca, cx, c0, h0), rev, 2e-5)


@pytest.mark.parametrize("complex_,n,chunks,one_pass,rows", [
    (False, 29, 3, False, 1), (True, 29, 3, False, 1), (True, 9, 4, False, 1),
    (False, 29, 3, True, 2),        # one pass: two batch rows of two feature tiles, each its own chunks
    (True, 30, 4, True, 1)])
def test_walk_cut_into_time_chunks(monkeypatch, complex_, n, chunks, one_pass, rows):
    """Forward and backward through the summary and finishing kernels, or the one-pass kernel,
    chunks of unequal length (9 steps asked in 4 chunks run as 3 of 3)."""
    monkeypatch.setattr(walk, "choose_walk", lambda B, N, F, cplx, sms, backward: (chunks, 4))
    monkeypatch.setattr(walk, "ONE_PASS", one_pass)
    feat = (rows, 128) if rows > 1 else (128,)
    check(*make(rows, n, feat, feat, complex_, complex_, complex_, True), complex_, 2e-5)


def test_one_pass_walks_are_one_kernel_with_at_most_a_chunk_per_multiprocessor(monkeypatch):
    a, x, h0 = make(1, 300, (128,), (128,), False, False, False, True)
    monkeypatch.setattr(walk, "choose_walk", lambda B, N, F, cplx, sms, backward: (200, 4))
    monkeypatch.setattr(walk, "ONE_PASS", True)
    plan = mosaic_op._Plan(a, x, h0, False, bind=False)
    assert walk.stages(plan.fwd_walk) == walk.stages(plan.bwd_walk) == ("onepass",)
    assert plan.fwd_walk.chunks == 100      # at most 132 chunks, none empty: 100 of 3 steps
    monkeypatch.setattr(walk, "ONE_PASS", False)
    plan = mosaic_op._Plan(a, x, h0, False, bind=False)
    assert walk.stages(plan.fwd_walk) == ("summary", "finish") and plan.fwd_walk.chunks == 150


def test_chunks_cover_the_walk():
    for n in range(1, 60):
        for asked in range(1, 70):
            c = walk.fit_chunks(n, asked)
            span = -(-n // c)
            assert 1 <= c <= n and (c - 1) * span < n <= c * span
    with pytest.raises(ValueError, match="cover"):
        mosaic_scan.Walk(1, 9, 128, 1, 128, False, False, False, False, False, False, False, False, chunks=4)


def test_bfloat16_inputs_accumulate_in_float32():
    a, x, h0 = make(1, 33, (128,), (128,), False, False, False, True, dtype=torch.bfloat16)
    h, h_last = mosaic_op.scan_mosaic(a, x, h0)
    assert h.dtype == torch.bfloat16
    h_ref, _ = scan_reference(a, x, h0)
    assert ((h.double() - h_ref).norm() / h_ref.norm()).item() < 1e-2


def test_second_derivative_raises():
    a, x, _ = make(1, 5, (128,), (128,), False, False, False, False)
    a.requires_grad_()
    h, _ = mosaic_op.scan_mosaic(a, x)
    (ga,) = torch.autograd.grad(h.pow(2).sum(), a, create_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        ga.sum().backward()


@pytest.mark.parametrize("a_feat,x_feat,want", [
    ((4, 1), (4, 128), (4, 128)),            # one gate per head
    ((1, 1), (4, 128), (1, 512)),            # one gate per step
    ((1, 128), (4, 128), (128, 1)),          # gates repeat over heads
    ((4, 128), (4, 128), (512, 1)),          # no broadcast
    ((4, 1, 8), (4, 3, 8), None),            # broadcast dim inside the gate block
])
def test_gate_layout(a_feat, x_feat, want):
    assert mosaic_op.gate_layout((2, 3, *a_feat), (2, 3, *x_feat)) == want


def test_supported_shapes():
    a, x, _ = make(1, 4, (100,), (100,), False, False, False, False)
    assert not mosaic_op.supported(a, x)          # features not a multiple of 128
    a, x, _ = make(1, 4, (2, 64), (2, 1), False, False, False, False)
    assert not mosaic_op.supported(a, x)          # a head of 64 splits a tile of 128
    a, x, _ = make(1, 4, (2, 128), (2, 1), False, False, False, False)
    assert mosaic_op.supported(a, x)
    assert not mosaic_op.supported(a.double(), x.double())


def test_walk_choice():
    # one pass when B * F / 128 CTAs nearly fill 132 multiprocessors; chunks otherwise
    assert walk.choose_walk(16, 1024, 1024, False, 132) == (1, 32)
    assert walk.choose_walk(16, 1024, 1024, True, 132, backward=True) == (1, 16)
    chunks, block = walk.choose_walk(1, 65536, 512, True, 132)
    assert chunks == 264 and block == 8
    assert walk.choose_walk(4, 4096, 1024, False, 132, backward=True) == (33, 32)
    assert walk.choose_walk(1, 8, 128, False, 132)[0] == 1    # too short to cut
    assert walk.choose_walk(1, 4097, 128, True, 132) == (64, 8)    # at most N // 64 chunks
    assert walk.span(dataclasses.replace(mosaic_scan.Walk(1, 2, 128, 1, 128, False, False, False, False, False,
                                                          False, False, False), chunks=2)) == 1


@pytest.mark.parametrize("used", ["h", "h_last"])
def test_gradient_through_one_output_only(used):
    """Backward with no cotangent for the other output (its walk starts from zero, or zeros
    stand in for the missing states' cotangent)."""
    a, x, h0 = make(1, 13, (128,), (128,), True, True, True, True)
    leaves = [t.clone().requires_grad_() for t in (a, x, h0)]
    out = mosaic_op.scan_mosaic(*leaves)[0 if used == "h" else 1]
    grads = torch.autograd.grad((out.abs() ** 2).sum(), leaves)
    wide = [t.detach().to(torch.complex128).requires_grad_() for t in (a, x, h0)]
    ref = scan_reference(*wide)[0 if used == "h" else 1]
    refs = torch.autograd.grad((ref.abs() ** 2).sum(), wide)
    for got, want in zip(grads, refs):
        assert ((got.to(want.dtype) - want).norm() / want.norm()).item() < 2e-5


def test_self_test_runs_apart_from_the_callers_thread_state():
    """The first gate_loop_scan call on a GPU runs the kernels' self-test; it often comes from
    inside a checkpointed layer or under no_grad, whose state must not reach it."""
    from gateloop_hybrid.routing import isolated

    def state():
        x = torch.ones(2, requires_grad=True)
        (x * x).sum().backward()        # would be caught by the caller's saved-tensor hooks
        return torch.is_grad_enabled(), x.grad.tolist()

    saved = []
    with torch.no_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        assert isolated(state) == (True, [2.0, 2.0])
    assert saved == []


def test_compiled_with_dynamic_shapes(monkeypatch):
    """gate_loop_scan on the Mosaic kernels under torch.compile(dynamic=True, fullgraph=True): the
    walk's sizes arrive as SymInts and are specialized (as after a recompile at a new shape);
    values and gradients equal eager's. Complex gates per head against a (d, e) state, the chunked
    mixer's call."""
    from gateloop_hybrid import routing
    from gateloop_hybrid.scan import gate_loop_scan
    monkeypatch.setattr(routing, "route", lambda *args, **kwargs: routing.Route("mosaic", "forced by a test"))

    def f(a, x):
        h, h_last = gate_loop_scan(a, x)
        return h.abs().sum() + h_last.real.sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=True)
    for B, N in ((2, 5), (1, 7)):
        a, x, _ = make(B, N, (2, 8, 16), (2, 1, 1), True, True, False, False, seed=N)
        leaves = [a.requires_grad_(), x.requires_grad_()]
        want = torch.autograd.grad(f(*leaves), leaves)
        got = torch.autograd.grad(compiled(*leaves), leaves)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)

