"""Whole models under torch.compile(fullgraph=True), in one process: training steps at changing
shapes and token-by-token decoding, for the GateLoop and the attention Transformer, against eager.
The CUDA graph (mode="reduce-overhead") runs are in test_cuda.py."""

from __future__ import annotations

import pytest
import torch

from gateloop_hybrid import Transformer

VOCAB = 32


def make(kind: str) -> Transformer:
    torch.manual_seed(0)
    if kind == "gateloop":      # one feature per head, the default
        return Transformer(dim=32, num_tokens=VOCAB, depth=2, scan_backend="torch")
    if kind == "gateloop-wide":  # 8 heads of 4: the chunked form
        return Transformer(dim=32, num_tokens=VOCAB, depth=2, gate_loop_heads=8, scan_backend="torch")
    return Transformer(dim=32, num_tokens=VOCAB, depth=2, use_gate_looped_attn=False, heads=2, dim_head=16)


def loss_and_grads(fn, model, ids):
    loss = fn(ids, return_loss=True)
    return loss.detach(), torch.autograd.grad(loss, list(model.parameters()))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_models_train_compiled_at_changing_shapes_in_one_process(backend):
    """Both models, one after the other in one process, each at three shapes (a new model of a
    class compiled at another shape once broke Inductor), against eager. GateLoop with wide heads
    under aot_eager only: Inductor takes minutes to compile its chunked form on a CPU."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(1)
    kinds = ("gateloop", "attention", "attention") + (("gateloop-wide",) if backend == "aot_eager" else ())
    for kind in kinds:
        model = make(kind)
        compiled = torch.compile(model, fullgraph=True, backend=backend)
        # the second shape makes the sequence dynamic; Inductor's compiles are the slow part on a CPU
        shapes = ((2, 33), (3, 17), (1, 40))
        if backend == "inductor" or kind == "gateloop-wide":
            shapes = shapes[:2]
        for shape in shapes:
            ids = torch.randint(0, VOCAB, shape, generator=g)
            want_loss, want = loss_and_grads(model, model, ids)
            got_loss, got = loss_and_grads(compiled, model, ids)
            torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["gateloop", "gateloop-wide", "attention"])
def test_generate_with_a_compiled_forward(kind):
    """generate() calls the model's forward once for the prompt and once per token; compiled
    with fullgraph=True (a growing attention cache included) it picks the same tokens."""
    torch._dynamo.reset()
    model = make(kind).eval()
    prompt = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    want = model.generate(prompt, 6, temperature=0.0)
    model.forward = torch.compile(model.forward, fullgraph=True, backend="aot_eager")
    got = model.generate(prompt, 6, temperature=0.0)
    assert torch.equal(got, want)
