"""The same contracts on a GPU: every backend, the layers and decoding on CUDA tensors; under
torchrun, each rank's JAX on its own GPU, and train.py on two GPUs.

Skipped without CUDA (CI has none); run on the GPU machine. References are the sequential loop
in float64 on the CPU.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gateloop_hybrid import GateLoopedAttention, SimpleGateLoopLayer, Transformer, gate_loop_scan
from gateloop_hybrid.scan import BACKENDS, resolve_backend

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
GPU_BACKENDS = [b for b in BACKENDS if b not in ("auto", "loop")]


def rel(a, b):
    a, b = a.detach().cpu().to(torch.complex128), b.detach().cpu().to(torch.complex128)
    return ((a - b).abs().norm() / b.abs().norm().clamp_min(1e-30)).item()


def test_auto_picks_a_jax_backend_on_cuda():
    assert resolve_backend("auto", "cuda") in ("pallas", "jax")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("shape,gate", [((2, 1000, 3, 5), "full"), ((3, 77, 4, 2, 2), "per_head"),
                                        ((1, 4097, 33), "full"), ((2, 5, 1, 1), "full")])
@pytest.mark.parametrize("complex_", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
def test_float32_scan_matches_float64_loop(backend, shape, gate, complex_, reverse):
    g = torch.Generator().manual_seed(hash((shape, complex_, reverse)) % 2**31)
    a_shape = shape if gate == "full" else (*shape[:3], 1, 1)
    a = torch.sigmoid(torch.randn(a_shape, generator=g, dtype=torch.float64) + 2)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if complex_:
        a = torch.polar(a, torch.rand(a_shape, generator=g, dtype=torch.float64) * 6.28 - 3.14)
        x = torch.complex(x, torch.randn(shape, generator=g, dtype=torch.float64))
    h0 = torch.randn((shape[0], *shape[2:]), generator=g, dtype=x.dtype)
    ct = torch.randn(shape, generator=g, dtype=x.dtype)
    ct_last = torch.randn(h0.shape, generator=g, dtype=x.dtype)

    def grads(device, dtype_map, backend):
        leaves = [t.to(device=device, dtype=dtype_map(t)).requires_grad_() for t in (a, x, h0)]
        h, last = gate_loop_scan(*leaves, reverse=reverse, backend=backend)
        loss = (h * ct.to(device=device, dtype=h.dtype).conj()).real.sum() \
            + (last * ct_last.to(device=device, dtype=h.dtype).conj()).real.sum()
        return [h, last, *torch.autograd.grad(loss, leaves)]

    ref = grads("cpu", lambda t: t.dtype, "loop")
    f32 = lambda t: torch.complex64 if t.is_complex() else torch.float32
    got = grads("cuda", f32, backend)
    tol = 5e-3 if backend == "heinsen" else 2e-5
    for name, r, o in zip(["h", "h_last", "da", "dx", "dh0"], ref, got):
        assert o.device.type == "cuda"
        assert rel(o, r) < tol, (name, rel(o, r))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_transformer_loss_and_grads_on_cuda(backend):
    torch.manual_seed(0)
    kw = dict(num_tokens=50, dim=32, depth=2, gate_loop_heads=8)
    ref = Transformer(**kw, scan_backend="loop").double()
    model = Transformer(**kw, scan_backend=backend).cuda()
    model.load_state_dict(ref.state_dict())
    ids = torch.randint(0, 50, (2, 129))
    loss_ref = ref(ids, return_loss=True)
    loss_ref.backward()
    loss = model(ids.cuda(), return_loss=True)
    loss.backward()
    assert abs(loss.item() - loss_ref.item()) < 1e-4 * abs(loss_ref.item())
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert rel(p.grad, q.grad) < 1e-3, name


@pytest.mark.parametrize("backend", ["jax", "pallas"])
def test_decoding_with_cache_on_cuda(backend):
    resolve_backend(backend, "cuda")
    torch.manual_seed(0)
    layer = GateLoopedAttention(32, heads=4, scan_backend=backend).cuda()
    x = torch.randn(2, 9, 32, device="cuda")
    full = layer(x)
    outs, cache = [], None
    for t in range(9):
        y, cache = layer(x[:, t:t + 1], cache=cache, return_cache=True)
        outs.append(y)
    assert rel(torch.cat(outs, 1), full) < 1e-5
    simple = SimpleGateLoopLayer(32, scan_backend=backend).cuda()
    y1, c = simple(x[:, :5], return_cache=True)
    y2 = simple(x[:, 5:], cache=c)
    assert rel(torch.cat([y1, y2], 1), simple(x)) < 1e-5


def test_bf16_autocast_training_step():
    model = Transformer(num_tokens=50, dim=64, depth=2).cuda()
    ids = torch.randint(0, 50, (2, 257), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(ids, return_loss=True)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())


# --- The Mosaic GPU kernels (Hopper and newer) ---------------------------------------------------

def _hopper():
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)


hopper = pytest.mark.skipif(not _hopper(), reason="needs a GPU of compute capability 9.0 or newer")


@hopper
def test_pallas_backend_runs_the_mosaic_kernels_on_hopper():
    from gateloop_hybrid import routing
    index = torch.cuda.current_device()
    for available in (routing.mosaic_available, routing.fused_mixer_available, routing.simple_mixer_available):
        assert available("cuda", index) is None, available.__name__
    assert routing.route("scan", "pallas", device=f"cuda:{index}").path == "mosaic"
    assert routing.route("mixer", device=f"cuda:{index}", dtype="bfloat16", heads=512).path == "fused"


@hopper
@pytest.mark.parametrize("shape,a_feat,complex_,reverse", [
    ((2, 1000, 256), (256,), False, False),
    ((1, 4097, 128), (128,), True, True),
    ((3, 77, 2, 128), (2, 1), True, False),        # one gate per head
    ((2, 301, 2, 128), (1, 128), False, True),     # gates repeat over heads
    ((1, 20001, 128), (128,), True, False),        # few CTAs: the walk is cut into time chunks
    ((1, 1, 128), (128,), False, True),
])
@pytest.mark.parametrize("one_pass", [False, True], ids=["two-pass", "one-pass"])
def test_mosaic_scan_matches_reference(monkeypatch, shape, a_feat, complex_, reverse, one_pass):
    from gateloop_hybrid.kernels import walk
    from gateloop_hybrid.ops import mosaic as mosaic_op
    from gateloop_hybrid.scan.reference import scan_reference
    monkeypatch.setattr(walk, "ONE_PASS", one_pass)
    monkeypatch.setattr(mosaic_op, "_PLANS", {})     # plans hold the walks chosen when made
    g = torch.Generator().manual_seed(len(shape) * 1000 + shape[1])
    a_shape = (*shape[:2], *a_feat)
    a = 0.5 + 0.49 * torch.rand(a_shape, generator=g, dtype=torch.float64)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if complex_:
        a = torch.polar(a, torch.rand(a_shape, generator=g, dtype=torch.float64) * 6.28 - 3.14)
        x = torch.complex(x, torch.randn(shape, generator=g, dtype=torch.float64))
    h0 = torch.randn((shape[0], *shape[2:]), generator=g, dtype=x.dtype)
    ct = torch.randn(shape, generator=g, dtype=x.dtype)
    ct_last = torch.randn(h0.shape, generator=g, dtype=x.dtype)
    f32 = lambda t: t.to(torch.complex64 if t.is_complex() else torch.float32)
    leaves = [f32(t).cuda().requires_grad_() for t in (a, x, h0)]
    h, last = gate_loop_scan(*leaves, reverse=reverse, backend="pallas")
    loss = (h * ct.cuda().to(h.dtype).conj()).real.sum() + (last * ct_last.cuda().to(h.dtype).conj()).real.sum()
    got = [h, last, *torch.autograd.grad(loss, leaves)]
    wide = [f32(t).to(x.dtype).requires_grad_() for t in (a, x, h0)]
    h_ref, last_ref = scan_reference(*wide, reverse=reverse)
    loss_ref = (h_ref * ct.conj()).real.sum() + (last_ref * ct_last.conj()).real.sum()
    want = [h_ref, last_ref, *torch.autograd.grad(loss_ref, wide)]
    for name, o, r in zip(["h", "h_last", "da", "dx", "dh0"], got, want):
        assert o.dtype == (torch.complex64 if r.is_complex() else torch.float32), name
        assert rel(o, r) < 2e-5, (name, rel(o, r))


def _graph_step(layer, x):
    layer.zero_grad(set_to_none=True)
    y = layer(x)
    y.float().pow(2).mean().backward()
    return y


@hopper
def test_cuda_graph_replays_a_simple_gate_loop_layer():
    """Forward and backward of SimpleGateLoopLayer captured by torch.cuda.graph replay to the
    eager values and gradients, on new input data."""
    torch.manual_seed(0)
    layer = SimpleGateLoopLayer(256, scan_backend="pallas").cuda()
    static_x = torch.randn(2, 300, 256, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            _graph_step(layer, static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    layer.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_y = _graph_step(layer, static_x)
    new_x = torch.randn_like(static_x)
    static_x.copy_(new_x)
    graph.replay()
    torch.cuda.synchronize()
    replayed = [static_y.clone()] + [p.grad.clone() for p in layer.parameters()]
    eager_y = _graph_step(layer, new_x)
    eager = [eager_y] + [p.grad for p in layer.parameters()]
    for got, want in zip(replayed, eager):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)


@hopper
def test_mosaic_scan_on_a_side_stream_and_compiled():
    a = torch.polar(torch.rand(2, 99, 256, device="cuda") * 0.5 + 0.5, torch.rand(2, 99, 256, device="cuda") * 6 - 3)
    x = torch.randn(2, 99, 256, device="cuda", dtype=torch.complex64)
    want, _ = gate_loop_scan(a, x, backend="pallas")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got, _ = gate_loop_scan(a, x, backend="pallas")
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(got, want)

    def f(a, x):
        h, last = gate_loop_scan(a, x, backend="pallas")
        return h.abs().pow(2).sum() + last.real.sum()
    leaves = [a.clone().requires_grad_(), x.clone().requires_grad_()]
    compiled = torch.compile(f, fullgraph=True)
    loss = compiled(*leaves)
    grads = torch.autograd.grad(loss, leaves)
    leaves_e = [a.clone().requires_grad_(), x.clone().requires_grad_()]
    loss_e = f(*leaves_e)
    grads_e = torch.autograd.grad(loss_e, leaves_e)
    assert torch.allclose(loss, loss_e, rtol=1e-5)
    for g, ge in zip(grads, grads_e):
        assert torch.allclose(g, ge, rtol=1e-4, atol=1e-5)


@hopper
@pytest.mark.parametrize("B,N,H,dtype,recompute", [
    (2, 1000, 256, torch.float32, False), (2, 1000, 256, torch.float32, True),
    (1, 3001, 128, torch.float32, True),     # cut into time chunks
    (2, 777, 128, torch.bfloat16, False),
])
@pytest.mark.parametrize("one_pass", [False, True], ids=["two-pass", "one-pass"])
def test_fused_mixer_matches_float64_composition(monkeypatch, B, N, H, dtype, recompute, one_pass):
    from gateloop_hybrid.kernels import walk
    from gateloop_hybrid.mixer import gate_loop_mixer
    from gateloop_hybrid.ops import mosaic as mosaic_op
    monkeypatch.setattr(walk, "ONE_PASS", one_pass)
    monkeypatch.setattr(mosaic_op, "_PLANS", {})     # plans hold the walks chosen when made
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(B, N, 3 * H, generator=g, dtype=torch.float64)
    z = 3 * torch.randn(B, N, 2 * H, generator=g, dtype=torch.float64)
    h0 = torch.randn(B, H, 1, 1, generator=g, dtype=torch.complex128)
    leaves = [qkv.to(dtype).cuda().requires_grad_(), z.to(dtype).cuda().requires_grad_(),
              h0.to(torch.complex64).cuda().requires_grad_()]
    errors = mixer_errors(leaves, lambda *t: gate_loop_mixer(*t, heads=H, frac_gradient=0.9, recompute=recompute),
                          lambda *t: gate_loop_mixer(*t, heads=H, frac_gradient=0.9, backend="loop"), g)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    assert max(errors.values()) < tol, errors


@hopper
@pytest.mark.parametrize("B,N,D,dtype", [
    (2, 1000, 256, torch.float32),
    (1, 3001, 128, torch.float32),     # cut into time chunks
    (2, 777, 128, torch.bfloat16),
])
def test_simple_mixer_fused_matches_float64_composition(B, N, D, dtype):
    """SimpleGateLoopLayer's real-gate kernels (auto takes them on CUDA) against the float64
    composition on the CPU: y, h_last and the gradients of qkva and h0."""
    from gateloop_hybrid import routing
    from gateloop_hybrid.mixer import simple_gate_loop_mixer
    from gateloop_hybrid.ops import mosaic as mosaic_op
    g = torch.Generator().manual_seed(0)
    qkva = 2 * torch.randn(B, N, 3 * D, generator=g, dtype=torch.float64)
    h0 = torch.randn(B, D, generator=g, dtype=torch.float64)
    leaves = [qkva.to(dtype).cuda().requires_grad_(), h0.to(dtype).cuda().requires_grad_()]
    assert routing.simple_mixer_available("cuda", leaves[0].device.index) is None   # its self-test passes
    plans = len(mosaic_op._PLANS)
    y, last = simple_gate_loop_mixer(*leaves)
    assert len(mosaic_op._PLANS) == plans + 1 and y.dtype == last.dtype == dtype   # the fused path
    wide = [t.detach().cpu().double().requires_grad_() for t in leaves]
    y_ref, last_ref = simple_gate_loop_mixer(*wide, backend="loop")
    cy = torch.randn(y_ref.shape, generator=g, dtype=torch.float64)
    cl = torch.randn(last_ref.shape, generator=g, dtype=torch.float64)
    loss = lambda y, hl: (y * cy.to(y)).sum() + (hl * cl.to(hl)).sum()
    grads = torch.autograd.grad(loss(y, last), leaves)
    refs = torch.autograd.grad(loss(y_ref, last_ref), wide)
    errors = {"y": rel(y, y_ref), "h_last": rel(last, last_ref), "qkva": rel(grads[0], refs[0]),
              "h0": rel(grads[1], refs[1])}
    assert max(errors.values()) < (2e-5 if dtype == torch.float32 else 2e-2), errors


@hopper
def test_simple_layer_fused_compiles_and_captures():
    """SimpleGateLoopLayer(256) on the fused kernels: eager against torch.compile(fullgraph=True,
    mode='reduce-overhead'), output and every gradient, third replay."""
    from gateloop_hybrid import SimpleGateLoopLayer
    torch.manual_seed(0)
    layer = SimpleGateLoopLayer(256).cuda()
    x = torch.randn(2, 301, 256, device="cuda")
    compiled = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
    results = {}
    for name, fn in (("eager", layer), ("graphs", compiled)):
        for _ in range(3):
            torch.compiler.cudagraph_mark_step_begin()
            out = fn(x)
            grads = torch.autograd.grad(out.square().sum(), list(layer.parameters()))
        results[name] = (out.detach().clone(), [g.clone() for g in grads])
    assert rel(results["eager"][0], results["graphs"][0]) < 1e-5
    for a, b in zip(results["eager"][1], results["graphs"][1]):
        assert rel(a, b) < 1e-4


def mixer_errors(leaves, mixer, reference, g):
    """Relative errors of mixer(qkv, z, h0) on the GPU against reference(...) on float64/complex128
    CPU copies of the same leaves: y, h_last and the gradients of a random linear loss."""
    y, last = mixer(*leaves)
    wide = [t.detach().cpu().to(torch.complex128 if t.is_complex() else torch.float64).requires_grad_()
            for t in leaves]
    y_ref, last_ref = reference(*wide)
    cy = torch.randn(y_ref.shape, generator=g, dtype=torch.float64)
    cl = torch.randn(last_ref.shape, generator=g, dtype=torch.complex128)
    loss = lambda y, hl: (y * cy.to(y)).sum() + (hl * cl.to(hl.device, hl.dtype).conj()).real.sum()
    grads = torch.autograd.grad(loss(y, last), leaves)
    refs = torch.autograd.grad(loss(y_ref, last_ref), wide)
    errors = {"y": rel(y, y_ref), "h_last": rel(last, last_ref)}
    errors.update({n: rel(a, b) for n, a, b in zip(("qkv", "z", "h0"), grads, refs)})
    return errors


@hopper
def test_gate_looped_attention_fused_equals_composition_and_captures():
    """The layer on the fused kernels (auto) against the same weights on the jax backend, then a
    Transformer step compiled with mode='reduce-overhead' (CUDA graphs) against eager."""
    torch.manual_seed(0)
    fused = GateLoopedAttention(256).cuda()
    composed = GateLoopedAttention(256, scan_backend="jax").cuda()
    composed.load_state_dict(fused.state_dict())
    x = torch.randn(2, 333, 256, device="cuda")
    outs, grads = [], []
    for layer in (fused, composed):
        out, last = layer(x, return_cache=True)
        (out.pow(2).sum() + last.abs().sum()).backward()
        outs.append((out, last))
        grads.append([p.grad for p in layer.parameters()])
    assert rel(outs[0][0], outs[1][0]) < 1e-5 and rel(outs[0][1], outs[1][1]) < 1e-5
    for g1, g2 in zip(*grads):
        assert rel(g1, g2) < 1e-4

    model = Transformer(dim=128, num_tokens=64, depth=2).cuda()
    assert_graphs_replay_like_eager(model, torch.randint(0, 64, (2, 257), device="cuda"), rtol=1e-4, atol=1e-6)


def assert_graphs_replay_like_eager(model, data, rtol, atol):
    """The model's loss and gradients under torch.compile(mode='reduce-overhead', fullgraph=True),
    the third replay, against eager (gradients to rtol/atol)."""
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    losses = {}
    for name, fn in (("eager", model), ("graphs", compiled)):
        for _ in range(3):
            torch.compiler.cudagraph_mark_step_begin()
            loss = fn(data, return_loss=True)
            grads = torch.autograd.grad(loss, list(model.parameters()))
        losses[name] = (loss.detach().clone(), [g.clone() for g in grads])
    assert torch.allclose(losses["eager"][0], losses["graphs"][0], rtol=1e-5)
    for a, b in zip(losses["eager"][1], losses["graphs"][1]):
        assert torch.allclose(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("B,N,H,D,dtype", [
    (2, 1001, 4, 64, torch.float32),      # 4096 state features per head: the Mosaic scan across chunks
    (1, 517, 3, 8, torch.float32),        # 64 per head: the Triton-lowered scan
    (2, 300, 2, 32, torch.bfloat16),
])
def test_chunked_mixer_matches_float64_materialized(B, N, H, D, dtype):
    """Wide heads on CUDA (the chunked form, auto backend for the scan across chunks) against the
    float64 materialized scan on the CPU: values, h_last and every gradient, with h0."""
    from gateloop_hybrid.mixer import composed_mixer, gate_loop_mixer
    g = torch.Generator().manual_seed(D)
    qkv = torch.randn(B, N, 3 * H * D, generator=g, dtype=torch.float64) / D ** 0.25
    z = 2 * torch.randn(B, N, 2 * H, generator=g, dtype=torch.float64)
    h0 = torch.randn(B, H, D, D, generator=g, dtype=torch.complex128)
    leaves = [qkv.to(dtype).cuda().requires_grad_(), z.float().cuda().requires_grad_(),
              h0.to(torch.complex64).cuda().requires_grad_()]
    errors = mixer_errors(leaves, lambda *t: gate_loop_mixer(*t, heads=H, frac_gradient=0.9),
                          lambda *t: composed_mixer(*t, heads=H, frac=0.9, backend="torch"), g)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert max(errors.values()) < tol, errors


def test_wide_heads_transformer_step_captures_in_cuda_graphs():
    """A Transformer with 8 heads of 16 (the chunked form) compiled with
    mode='reduce-overhead': loss and gradients of eager, replayed three times."""
    torch.manual_seed(0)
    model = Transformer(dim=128, num_tokens=64, depth=2, gate_loop_heads=8).cuda()
    assert_graphs_replay_like_eager(model, torch.randint(0, 64, (2, 300), device="cuda"), rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("setting", ["no-coalesce-analysis", "static-shapes"])
def test_attention_models_compile_one_after_another_under_bf16_autocast(setting):
    """A second attention model compiled in the same process at another shape (bf16 autocast,
    CUDA) trains like eager: (4, 4097) tokens, then (64, 257). torch 2.11's Inductor fails the
    second compile under the dynamic shapes it turns on (pytorch/pytorch#181563); the two
    settings docs/limits.md gives each avoid it: Inductor's coalescing analysis off
    (TORCHINDUCTOR_COALESCE_TILING_ANALYSIS=0), or torch.compile(dynamic=False)."""
    from torch._inductor import config as inductor_config
    torch._dynamo.reset()
    coalesce = setting != "no-coalesce-analysis"
    dynamic = False if setting == "static-shapes" else None
    with inductor_config.patch({"triton.coalesce_tiling_analysis": coalesce}):
        _compile_attention_at_two_shapes(dynamic)


def _compile_attention_at_two_shapes(dynamic):
    for shape in ((4, 4097), (64, 257)):
        torch.manual_seed(0)
        model = Transformer(dim=128, num_tokens=256, depth=2, use_gate_looped_attn=False, heads=2,
                            dim_head=64, ff_mult=5).cuda()
        ids = torch.randint(0, 256, shape, device="cuda")
        compiled = torch.compile(model, dynamic=dynamic)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got = compiled(ids, return_loss=True)
            want = model(ids, return_loss=True)
        got.backward()
        assert torch.allclose(got.float(), want.float(), rtol=2e-2)


@pytest.mark.parametrize("heads", [128, 8], ids=["fused", "chunked"])
def test_gateloop_models_compile_at_changing_shapes(heads):
    """A GateLoop Transformer on the GPU's kernels (one feature per head: the fused mixer; 8 heads
    of 16: the chunked form over the Mosaic scan) compiled with fullgraph=True at three shapes in
    one process. From the second shape on Dynamo makes the sizes dynamic, and the Mosaic ops
    specialize them; loss and gradients equal eager's."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Transformer(dim=128, num_tokens=64, depth=2, gate_loop_heads=heads).cuda()
    compiled = torch.compile(model, fullgraph=True)
    for shape in ((2, 300), (3, 129), (1, 517)):
        ids = torch.randint(0, 64, shape, device="cuda")
        losses, grads = [], []
        for fn in (model, compiled):
            loss = fn(ids, return_loss=True)
            losses.append(loss.detach())
            grads.append(torch.autograd.grad(loss, list(model.parameters())))
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
        for got, want in zip(grads[1], grads[0]):
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("attention", [False, True], ids=["gateloop", "attention"])
def test_train_compile_reduce_overhead_with_accumulation_trains_like_eager(tmp_path, attention):
    """train.py --compile reduce-overhead over several micro-batches a step, with uncompiled
    validation in between: the losses of an eager run (float32)."""
    repo = Path(__file__).resolve().parents[1]
    common = [sys.executable, str(repo / "train.py"), "--data", str(repo / "tests" / "data" / "devils_dictionary.txt"),
              "--dim", "128", "--depth", "2", "--gate-loop-heads", "128", "--seq-len", "256", "--batch-size", "2",
              "--grad-accum", "3", "--max-steps", "4", "--log-every", "1", "--val-every", "2", "--val-batches", "1",
              "--sample-every", "0", "--no-bf16", "--device", "cuda"] + (["--attention"] if attention else [])

    def losses(name, *extra):
        subprocess.run(common + ["--out-dir", str(tmp_path / name), *extra], check=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(repo)})
        records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return ([r["loss"] for r in records if r["kind"] == "train"],
                [r["loss"] for r in records if r["kind"] == "val"])
    eager, graphs = losses("eager"), losses("graphs", "--compile", "reduce-overhead")
    assert graphs[0] == pytest.approx(eager[0], rel=1e-3) and len(graphs[0]) == 4
    assert graphs[1] == pytest.approx(eager[1], rel=1e-3) and len(graphs[1]) == 2


# --- Several processes: each rank's JAX on its own GPU (torchrun) ---------------------------------

RANK_CHECK = r'''
import json, os, torch, torch.distributed as dist
dist.init_process_group("gloo")                 # gloo: ranks may share a GPU in this check
rank, size, local = dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"])
gpus = torch.cuda.device_count()
mine = local % gpus                             # the GPU the bridge restricts this rank's JAX to
dev = torch.device("cuda", mine)
torch.cuda.set_device((mine + 1) % gpus)        # torch's current device another GPU, where there is one
import bridge, jax, jax.numpy as jnp
from bridge.convert import jax_gpu_for
from gateloop_hybrid import gate_loop_scan
out = dict(rank=rank, mine=mine, gpus=gpus, pci_bus_id=torch.cuda.get_device_properties(mine).pci_bus_id,
           jax_gpus=[d.local_hardware_id for d in jax.devices("cuda")])
g = torch.Generator().manual_seed(rank)
a = torch.polar(0.5 + 0.5 * torch.rand(2, 300, 256, generator=g), torch.rand(2, 300, 256, generator=g) * 6 - 3)
x = torch.randn(2, 300, 256, generator=g, dtype=torch.complex64)
ref, _ = gate_loop_scan(a.to(torch.complex128), x.to(torch.complex128), backend="loop")
out["err"], out["devices"] = {}, []
for backend in ("jax", "pallas"):
    leaves = [a.to(dev).requires_grad_(), x.to(dev).requires_grad_()]
    h, last = gate_loop_scan(*leaves, backend=backend)
    grads = torch.autograd.grad(h.abs().sum(), leaves)
    out["devices"] += [str(t.device) for t in (h, last, *grads)]
    out["err"][backend] = ((h.detach().cpu().to(torch.complex128) - ref).abs().max() / ref.abs().max()).item()
out["to_torch"] = str(bridge.to_torch(jnp.arange(4.0)).device)
for turn in range(size):                        # one rank at a time: JAX's memory lands on this GPU
    if turn == rank:
        torch.cuda.synchronize(dev)
        free = torch.cuda.mem_get_info(dev)[0]
        big = jax.device_put(jnp.ones((256, 1024, 1024), jnp.float32), jax_gpu_for(mine, jax.devices("cuda")))
        big.block_until_ready()
        out["jax_gib_here"] = (free - torch.cuda.mem_get_info(dev)[0]) / 2**30
        del big
    dist.barrier()
print("RANK " + json.dumps(out), flush=True)
dist.destroy_process_group()
'''


def _torchrun(args, timeout=600):
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "GATELOOP_HYBRID_JAX_GPUS")}
    # the ranks import this checkout's packages, installed or not
    repo = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([repo, *filter(None, [env.get("PYTHONPATH")])])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_each_torchrun_rank_has_jax_on_its_own_gpu_and_scans_there(tmp_path):
    """Two ranks (on two GPUs, or sharing one): each rank's JAX sees exactly its GPU, the scan's
    outputs and gradients are on it whatever torch's current device, and JAX's memory is there."""
    script = tmp_path / "rank_check.py"
    script.write_text(RANK_CHECK)
    proc = _torchrun(["--nproc_per_node", "2", str(script)])
    ranks = sorted((json.loads(line[5:]) for line in proc.stdout.splitlines() if line.startswith("RANK ")),
                   key=lambda r: r["rank"])
    assert [r["rank"] for r in ranks] == [0, 1], proc.stdout
    for r in ranks:
        assert r["jax_gpus"] == [r["mine"]], r
        assert set(r["devices"]) == {f"cuda:{r['mine']}"} and r["to_torch"] == f"cuda:{r['mine']}", r
        assert max(r["err"].values()) < 1e-4, r
        assert r["jax_gib_here"] > 0.9, r
    if ranks[0]["gpus"] > 1:
        assert ranks[0]["mine"] != ranks[1]["mine"] and ranks[0]["pci_bus_id"] != ranks[1]["pci_bus_id"]


two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")


@two_gpus
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_train_py_on_two_gpus_trains_as_one_gpu_with_twice_the_batch(tmp_path, parallel):
    repo = Path(__file__).resolve().parents[1]
    tiny = ["--data", str(repo / "tests" / "data" / "devils_dictionary.txt"), "--dim", "64", "--depth", "2",
            "--seq-len", "128", "--grad-accum", "2", "--max-steps", "6", "--log-every", "1", "--val-every", "3",
            "--sample-every", "3", "--ckpt-every", "3", "--no-bf16", "--device", "cuda", "--lr", "1e-3"]
    _torchrun(["--nproc_per_node", "1", str(repo / "train.py"), "--out-dir", str(tmp_path / "one"), *tiny,
               "--batch-size", "8"])
    extra = ["--fsdp"] if parallel == "fsdp" else []
    _torchrun(["--nproc_per_node", "2", str(repo / "train.py"), "--out-dir", str(tmp_path / "two"), *tiny,
               "--batch-size", "4", *extra])

    def losses(name):
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"]
    assert losses("two") == pytest.approx(losses("one"), rel=1e-3)
    # the two-GPU checkpoint goes on on one GPU
    _torchrun(["--nproc_per_node", "1", str(repo / "train.py"), "--out-dir", str(tmp_path / "two"), "--resume",
               "--max-steps", "8", "--data", tiny[1]])


# --- wide heads on the Mosaic GPU kernels (kernels/mosaic_rotated.py) --------------------------


@hopper
def test_wide_head_kernels_pass_their_self_test_and_take_the_route():
    from gateloop_hybrid import routing
    index = torch.cuda.current_device()
    assert routing.rotated_available("cuda", index) is None
    route = routing.route("mixer", "pallas", device=f"cuda:{index}", dtype="bfloat16", heads=8, width=64)
    assert route.path == "rotated", route.why


@hopper
@pytest.mark.parametrize("b,n,h,d,dtype,with_h0,segments", [
    (2, 1000, 3, 64, torch.bfloat16, True, None),     # segments chosen for the GPU, a ragged chunk
    (1, 777, 2, 128, torch.float16, False, 3),        # d = 128: four blocks of value columns
    (1, 4096, 2, 64, torch.bfloat16, True, 1),        # one walk over 64 chunks
    (3, 333, 1, 128, torch.bfloat16, True, None),
    (2, 500, 4, 32, torch.bfloat16, True, None),      # d = 32, run as heads of 64
])
def test_wide_head_kernels_match_the_float64_rotated_form(b, n, h, d, dtype, with_h0, segments):
    """Values, h_last and every gradient (q, k, v, log|a|, phase, h0) within 2% of the largest
    (16-bit inputs), against the float64 torch form on the CPU."""
    check_wide_head_kernels(b, n, h, d, dtype, with_h0, segments)


@hopper
@pytest.mark.parametrize("grouped,stages", [(True, 2), (False, 1), (True, 1)])
@pytest.mark.parametrize("b,n,h,d,dtype,with_h0,segments", [
    (2, 1000, 3, 64, torch.bfloat16, True, None),
    (1, 777, 2, 128, torch.float16, False, 3),
])
def test_wide_head_kernels_grouped_or_one_stage_match_the_float64_rotated_form(
        monkeypatch, b, n, h, d, dtype, with_h0, segments, grouped, stages):
    """The same with each chunk's independent products issued together (GROUPED) and with one
    chunk in flight per walk (STAGES = 1, twice the segments)."""
    from gateloop_hybrid.kernels import mosaic_rotated
    monkeypatch.setattr(mosaic_rotated, "GROUPED", grouped)
    monkeypatch.setattr(mosaic_rotated, "STAGES", stages)
    check_wide_head_kernels(b, n, h, d, dtype, with_h0, segments)


def check_wide_head_kernels(b, n, h, d, dtype, with_h0, segments):
    from gateloop_hybrid.ops.rotated import rotated_heads_mosaic
    from gateloop_hybrid.rotated import rotated_heads
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(b, n, h, d, generator=g).to(dtype).float() / d ** 0.25 for _ in range(3))
    log_mag = -0.3 * torch.rand(b, n, h, generator=g)
    phase = torch.pi * (2 * torch.rand(b, n, h, generator=g) - 1)
    h0 = 0.1 * torch.randn(b, h, d, d, generator=g, dtype=torch.complex64) if with_h0 else None
    cpu = [q, k, v, log_mag, phase] + ([h0] if with_h0 else [])
    gpu = [t.cuda().to(dtype).requires_grad_() for t in cpu[:3]] + [t.cuda().requires_grad_() for t in cpu[3:]]
    wide = [t.to(torch.complex128 if t.is_complex() else torch.float64).requires_grad_() for t in cpu]
    wy = torch.randn(b, n, h, d, generator=g, dtype=torch.float64)
    wl = torch.randn(b, h, d, d, generator=g, dtype=torch.complex128)
    loss = lambda y, hl: (y.double() * wy.to(y.device)).sum() + (hl.to(torch.complex128) * wl.to(hl.device)).real.sum()
    y, hl = rotated_heads_mosaic(*gpu[:5], gpu[5] if with_h0 else None, segments=segments)
    got = [y, hl, *torch.autograd.grad(loss(y, hl), gpu)]
    y, hl = rotated_heads(*wide[:5], wide[5] if with_h0 else None)
    want = [y, hl, *torch.autograd.grad(loss(y, hl), wide)]
    names = ["y", "h_last", "dq", "dk", "dv", "dlog|a|", "dphase", "dh0"]
    errors = {name: float((a.detach().cpu().to(w.dtype) - w).abs().max() / w.abs().max())
              for name, a, w in zip(names, got, want)}
    assert max(errors.values()) < 2e-2, errors


@hopper
def test_wide_head_transformer_bf16_step_on_the_kernels_captures_in_cuda_graphs():
    """A Transformer with 2 heads of 64 under bf16 autocast on the wide-head kernels (backend
    'pallas'), compiled with mode='reduce-overhead': loss and gradients of eager, replayed three times."""
    torch.manual_seed(0)
    model = Transformer(dim=128, num_tokens=64, depth=2, gate_loop_heads=2, scan_backend="pallas").cuda()
    data = torch.randint(0, 64, (2, 300), device="cuda")
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    results = {}
    for name, fn in (("eager", model), ("graphs", compiled)):
        for _ in range(3):
            torch.compiler.cudagraph_mark_step_begin()
            with torch.autocast("cuda", torch.bfloat16):
                loss = fn(data, return_loss=True)
            grads = torch.autograd.grad(loss, list(model.parameters()))
        results[name] = (loss.detach().clone(), [g.clone() for g in grads])
    assert torch.allclose(results["eager"][0], results["graphs"][0], rtol=1e-3)
    for a, b in zip(results["eager"][1], results["graphs"][1]):
        assert rel(a, b) < 2e-2


# --- generation: the decode step captured in a CUDA graph ---------------------------------------


@pytest.mark.parametrize("kind", ["gateloop", "gateloop-wide", "attention"])
def test_captured_decode_step_equals_the_eager_step(kind):
    """Decoder(capture=True) replays decode step and draw from one CUDA graph: tokens and logits
    equal the eager Decoder's over 20 steps, with rows going inactive, in bf16."""
    from gateloop_hybrid.generation import DecodeState, Decoder, prefill
    kw = dict(use_gate_looped_attn=False, heads=2, dim_head=64) if kind == "attention" else (
        dict(gate_loop_heads=2) if kind == "gateloop-wide" else {})
    torch.manual_seed(0)
    model = Transformer(dim=128, num_tokens=64, depth=2, **kw).cuda().to(torch.bfloat16).eval()
    prompt = torch.randint(0, 64, (3, 17), device="cuda")
    runs = []
    for capture in (False, True):
        state = DecodeState(model, 3, 17 + 21)
        decoder = Decoder(model, state, torch.tensor([1, 2, 3], device="cuda"), temperature=0.7, top_k=10,
                          capture=capture)
        with torch.no_grad():
            prefill(model, prompt, state)
            token, got = prompt[:, -1], []
            for step in range(20):
                active = torch.tensor([True, step < 10, True], device="cuda")
                token, logits = decoder(token, active)
                token = token.clone()
                got.append((token, logits.clone()))
        runs.append((got, [t.clone() for t in state.tensors()]))
    for (t1, l1), (t2, l2) in zip(runs[0][0], runs[1][0]):
        assert torch.equal(t1, t2)
        torch.testing.assert_close(l1, l2, rtol=1e-2, atol=1e-2)
    for a, b in zip(runs[0][1], runs[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)


def test_generate_with_capture_equals_generate_without():
    torch.manual_seed(0)
    model = Transformer(dim=128, num_tokens=64, depth=2, gate_loop_heads=2).cuda().eval()
    prompt = torch.randint(0, 64, (4, 33), device="cuda")
    want = model.generate(prompt, 24, temperature=0.8, top_p=0.9, seed=5)
    got = model.generate(prompt, 24, temperature=0.8, top_p=0.9, seed=5, capture=True)
    assert torch.equal(got, want)


# --- a later position never reaches the past, on the GPU paths ------------------------------


OVERFLOW_CASES = [(dtype, heads, d, "auto") for dtype in (torch.float32, torch.bfloat16, torch.float16)
                  for heads, d in ((128, 1), (8, 16), (4, 64))]
OVERFLOW_CASES += [(dtype, heads, d, "pallas") for dtype in (torch.bfloat16, torch.float16)
                   for heads, d in ((4, 64), (2, 128))]


@hopper
@pytest.mark.parametrize("dtype,heads,d,backend", OVERFLOW_CASES)
def test_an_overflow_at_t_leaves_earlier_outputs_bit_identical_on_cuda(dtype, heads, d, backend):
    """gate_loop_mixer on CUDA (the fused kernels with one feature per head, the chunked form
    with the Mosaic scan across chunks for wider heads, and with backend "pallas" the wide-head
    kernels): k at t the largest finite value, so that q_s . k_t and k_t v_t overflow; every
    output before t equals a clean run bit for bit."""
    from gateloop_hybrid import explain
    from gateloop_hybrid.mixer import gate_loop_mixer
    n, t = 300, 211
    g = torch.Generator().manual_seed(d)
    qkv = torch.randn(2, n, 3 * heads * d, generator=g).to(dtype).cuda()
    z = torch.randn(2, n, 2 * heads, generator=g).to(dtype).cuda()
    bad = qkv.clone()
    bad[:, t, heads * d:2 * heads * d] = torch.finfo(dtype).max
    why = explain("mixer", backend, device="cuda:0", dtype=str(dtype).removeprefix("torch."), heads=heads, width=d)
    clean, _ = gate_loop_mixer(qkv, z, heads=heads, backend=backend)
    y, _ = gate_loop_mixer(bad, z, heads=heads, backend=backend)
    assert not torch.isfinite(y[:, t:]).all(), why
    assert torch.equal(y[:, :t], clean[:, :t]), why


@hopper
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_step_leaves_earlier_states_unchanged_on_the_mosaic_scan(bad):
    from gateloop_hybrid.ops.mosaic import scan_mosaic
    g = torch.Generator().manual_seed(7)
    n, t = 3001, 2000                                  # long enough to be cut into time chunks
    a = torch.polar(0.5 + 0.5 * torch.rand(1, n, 128, generator=g), torch.rand(1, n, 128, generator=g)).cuda()
    x = torch.randn(1, n, 128, generator=g, dtype=torch.complex64).cuda()
    clean, _ = scan_mosaic(a, x)
    x_bad = x.clone()
    x_bad[:, t] = bad
    h, _ = scan_mosaic(a, x_bad)
    assert torch.equal(h[:, :t], clean[:, :t])


@hopper
def test_the_real_gate_kernels_are_causal_under_overflow():
    from gateloop_hybrid.mixer import simple_gate_loop_mixer
    g = torch.Generator().manual_seed(8)
    qkva = torch.randn(2, 300, 3 * 128, generator=g).half().cuda()
    bad = qkva.clone()
    bad[:, 200, :256] = torch.finfo(torch.float16).max     # q and kv: q h overflows float16
    clean, _ = simple_gate_loop_mixer(qkva)
    y, _ = simple_gate_loop_mixer(bad)
    assert torch.equal(y[:, :200], clean[:, :200])
