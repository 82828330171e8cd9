"""Whole models under torch.compile(fullgraph=True), in one process: training steps at changing
shapes and token-by-token decoding, for the GateLoop and the attention Transformer, against eager.
One layer each: compiling is the cost here, and it grows with depth. The CUDA graph
(mode="reduce-overhead") runs and GateLoop under Inductor at changing shapes on the GPU are in
test_cuda.py."""

from __future__ import annotations

import pytest
import torch

from gateloop_hybrid import Transformer

VOCAB = 32


def make(kind: str) -> Transformer:
    torch.manual_seed(0)
    if kind == "gateloop":      # one feature per head, the default
        return Transformer(dim=32, num_tokens=VOCAB, depth=1, scan_backend="torch")
    if kind == "gateloop-wide":  # 8 heads of 4: the chunked form
        return Transformer(dim=32, num_tokens=VOCAB, depth=1, gate_loop_heads=8, scan_backend="torch")
    return Transformer(dim=32, num_tokens=VOCAB, depth=1, use_gate_looped_attn=False, heads=2, dim_head=16)


def loss_and_grads(fn, model, ids):
    loss = fn(ids, return_loss=True)
    return loss.detach(), torch.autograd.grad(loss, list(model.parameters()))


def check_against_eager(model, compiled, shape, generator):
    ids = torch.randint(0, VOCAB, shape, generator=generator)
    want_loss, want = loss_and_grads(model, model, ids)
    got_loss, got = loss_and_grads(compiled, model, ids)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


REUSE = "reuse"     # this shape must run on a graph already compiled (a dynamic one), not compile again

# GateLoop's torch scan fixes the sequence length in its graph (its recursion guards on it: a new
# length compiles again), so its dynamic graph takes a new batch size at the same length.
PLANS = {
    # three shapes each: the first compiles a static graph, the second a dynamic one, the third reuses it
    "aot_eager": [("gateloop", [(2, 33), (3, 17), (4, 17, REUSE)]),
                  ("attention", [(2, 33), (3, 17), (4, 20, REUSE)]),
                  ("attention", [(3, 17), (4, 20)]),
                  ("gateloop-wide", [(2, 33), (3, 17), (4, 20, REUSE)])],
    # attention compiled after GateLoop, at another shape: Dynamo compiles it dynamic at once
    "inductor": [("gateloop", [(2, 33)]),
                 ("attention", [(3, 17), (4, 20, REUSE)]),
                 ("attention", [(2, 33)])],
}


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_models_train_compiled_at_changing_shapes_in_one_process(backend):
    """Models one after the other in one process, at changing shapes, against eager; a new model of
    a class compiled at another shape once broke Inductor. Under aot_eager: GateLoop (one feature
    per head, and wide heads: the chunked form) and attention. Under Inductor, whose compiles take
    20 to 70 s of CPU each on a CPU (its C++ builds included; cold cache, 2-core machine): GateLoop
    at one shape, then attention at others. GateLoop's dynamic graph under Inductor is in
    test_cuda.py (the GPU's kernels)."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(1)
    for kind, shapes in PLANS[backend]:
        model = make(kind)
        compiled = torch.compile(model, fullgraph=True, backend=backend)
        for batch, length, *reuse in shapes:
            with torch.compiler.set_stance("fail_on_recompile" if reuse else "default"):
                check_against_eager(model, compiled, (batch, length), g)


@pytest.mark.parametrize("kind", ["gateloop", "gateloop-wide", "attention"])
def test_generate_with_a_compiled_forward(kind):
    """generate() runs the prompt through the model's forward; compiled with fullgraph=True it
    picks the same tokens."""
    torch._dynamo.reset()
    model = make(kind).eval()
    prompt = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    want = model.generate(prompt, 6, temperature=0.0)
    model.forward = torch.compile(model.forward, fullgraph=True, backend="aot_eager")
    got = model.generate(prompt, 6, temperature=0.0)
    assert torch.equal(got, want)
