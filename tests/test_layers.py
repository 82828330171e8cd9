"""The torch layers: seed README examples, backend parity of losses and gradients, the decoding
cache, every seed option, argument errors.

Small models and float64 throughout, so the suite stays fast on a 2-core CPU and the
comparisons are tight. Seed parity (same weights, same outputs) is in test_seed_parity.py.
"""

from __future__ import annotations

import pytest
import torch

import gateloop_hybrid
from gateloop_hybrid import (
    CausalFullAttention,
    GateLoopedAttention,
    RMSNorm,
    SimpleGateLoopLayer,
    Transformer,
)
from gateloop_hybrid.routing import BACKENDS, route

F64 = torch.float64
VOCAB = 29


def rel_err(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max().clamp(min=1e-300)).item()


def backend_or_skip(name, device="cpu"):
    """Skip, with the reason, a backend this machine cannot run (e.g. pallas without CUDA)."""
    try:
        route("scan", name, device=device)
    except (ImportError, ValueError) as e:
        pytest.skip(str(e))
    return name


OTHER_BACKENDS = [b for b in BACKENDS if b not in ("auto", "loop")]


# --- seed README examples ---------------------------------------------------------------------


def test_exports():
    assert set(gateloop_hybrid.__all__) >= {
        "gate_loop_scan", "Transformer", "GateLoopedAttention", "SimpleGateLoopLayer",
        "CausalFullAttention", "RMSNorm",
    }
    assert gateloop_hybrid.gate_loop_scan is gateloop_hybrid.scan.gate_loop_scan


def test_readme_transformer_example():
    model = Transformer(num_tokens=256, dim=624, depth=6, use_gate_looped_attn=True)
    ids = torch.randint(0, 256, (1, 1024))
    with torch.no_grad():
        logits = model(ids)
    assert logits.shape == (1, 1024, 256)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(
    "seq",
    [1024, pytest.param(65536, marks=pytest.mark.slow, id="readme-size")],
)
def test_readme_simple_gate_loop_example(seq):
    """The README runs (1, 65536, 512); that size takes ~10 s on 2 cores, so it is marked slow."""
    layer = SimpleGateLoopLayer(512)
    x = torch.randn(1, seq, 512)
    with torch.no_grad():
        out = layer(x)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


# --- every backend gives the same loss and gradients as the sequential reference (float64) ------


def small_transformer(**options):
    defaults = dict(dim=16, num_tokens=VOCAB, depth=2, gate_loop_heads=4, dim_head=8, heads=2)
    return Transformer(**{**defaults, **options}).to(F64)


def loss_and_grads(model, ids, **forward_kwargs):
    model.zero_grad()
    loss = model(ids, return_loss=True, **forward_kwargs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("backend", OTHER_BACKENDS)
@pytest.mark.parametrize(
    "options",
    [dict(), dict(ablate_complex=True, sub_ln=True), dict(checkpoint_gate_looped_attn=False, post_ln_norm=True)],
    ids=["default", "ablate-complex-subln", "nocheckpoint-postln"],
)
def test_transformer_backends_agree(backend, options):
    backend_or_skip(backend)
    torch.manual_seed(0)
    reference = small_transformer(scan_backend="loop", **options)
    model = small_transformer(scan_backend=backend, **options)
    model.load_state_dict(reference.state_dict())
    ids = torch.randint(0, VOCAB, (2, 24))

    ref_loss, ref_grads = loss_and_grads(reference, ids)
    loss, grads = loss_and_grads(model, ids)
    assert rel_err(loss, ref_loss) < 1e-10
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert grads.keys() == ref_grads.keys() == trainable
    for name in ref_grads:
        assert rel_err(grads[name], ref_grads[name]) < 1e-9, name


@pytest.mark.parametrize("backend", OTHER_BACKENDS)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_simple_gate_loop_backends_agree(backend, reverse):
    backend_or_skip(backend)
    torch.manual_seed(0)
    reference = SimpleGateLoopLayer(8, reverse=reverse, post_ln=True, scan_backend="loop").to(F64)
    layer = SimpleGateLoopLayer(8, reverse=reverse, post_ln=True, scan_backend=backend).to(F64)
    layer.load_state_dict(reference.state_dict())
    x = torch.randn(2, 33, 8, dtype=F64, requires_grad=True)
    cotangent = torch.randn(2, 33, 8, dtype=F64)

    def run(module):
        out = module(x)
        grads = torch.autograd.grad(out, [x, *module.parameters()], cotangent)
        return out, grads

    ref_out, ref_grads = run(reference)
    out, grads = run(layer)
    assert rel_err(out, ref_out) < 1e-10
    for g, rg in zip(grads, ref_grads):
        assert rel_err(g, rg) < 1e-9


# --- decoding with a cache equals the full-sequence forward ------------------------------------

CACHE_OPTIONS = [
    pytest.param(dict(), "torch", id="gateloop-torch"),
    pytest.param(dict(), "auto", id="gateloop-auto"),
    pytest.param(dict(gate_loop_heads=None, ablate_state_transition=True), "torch", id="gateloop-maxheads-ablated"),
    pytest.param(dict(use_gate_looped_attn=False, rotary_emb=True), "torch", id="softmax-rotary"),
    pytest.param(dict(use_gate_looped_attn=False, attn_softmax_normalize=False), "torch", id="linear-attn"),
    pytest.param(dict(use_gate_looped_attn=False, data_dependent_rel_pos=True, rotary_emb=True), "torch", id="ddrelpos"),
    pytest.param(dict(use_gate_looped_attn=False, post_ln_norm=True), "torch", id="softmax-postln"),
]


@pytest.mark.parametrize("options, backend", CACHE_OPTIONS)
def test_transformer_cache_matches_full_forward(options, backend):
    torch.manual_seed(0)
    model = small_transformer(scan_backend=backend, **options)
    ids = torch.randint(0, VOCAB, (2, 13))
    with torch.no_grad():
        full = model(ids)
        # a prompt, a chunk of 3, then one token at a time
        pieces, cache = [], None
        for chunk in ids.split([5, 3, 1, 1, 1, 1, 1], dim=1):
            logits, cache = model(chunk, cache=cache, return_cache=True)
            pieces.append(logits)
    assert len(cache) == 2
    assert rel_err(torch.cat(pieces, dim=1), full) < 1e-12


def test_gate_looped_attention_cache_state_and_gradients():
    """The cache is the complex state; gradients flow through it across chunks (checkpointed)."""
    torch.manual_seed(0)
    layer = GateLoopedAttention(12, heads=3, scan_backend="torch").to(F64)
    x = torch.randn(2, 10, 12, dtype=F64)
    full = layer(x)
    full_grads = torch.autograd.grad(full.square().sum(), list(layer.parameters()))

    first, state = layer(x[:, :6], return_cache=True)
    assert state.shape == (2, 3, 4, 4) and state.is_complex()
    second, state = layer(x[:, 6:], cache=state, return_cache=True)
    chunked = torch.cat([first, second], dim=1)
    assert rel_err(chunked, full) < 1e-12
    chunk_grads = torch.autograd.grad(chunked.square().sum(), list(layer.parameters()))
    for g, fg in zip(chunk_grads, full_grads):
        assert rel_err(g, fg) < 1e-12
    with pytest.raises(ValueError, match="cache must be the state"):
        layer(x[:, 6:], cache=state[:1])


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_simple_gate_loop_cache_continues(backend):
    """The cache is the scanned state (the seed's JAX path returned the unscanned (a, kv))."""
    torch.manual_seed(0)
    layer = SimpleGateLoopLayer(8, scan_backend=backend).to(F64)
    x = torch.randn(2, 12, 8, dtype=F64)
    with torch.no_grad():
        full, last = layer(x, return_cache=True)
        pieces, cache = [], None
        for chunk in x.split([4, 1, 1, 6], dim=1):
            out, cache = layer(chunk, cache=cache, return_cache=True)
            pieces.append(out)
    assert cache.shape == (2, 8)
    assert rel_err(cache, last) < 1e-12
    assert rel_err(torch.cat(pieces, dim=1), full) < 1e-12


def test_generate_costs_one_step_per_token(monkeypatch):
    import gateloop_hybrid.gate_loop as gate_loop
    from gateloop_hybrid import generation

    torch.manual_seed(0)
    model = small_transformer(scan_backend="torch")
    steps, decode_steps = [], []
    real_mixer, real_step = gate_loop.gate_loop_mixer, generation.decode_step

    def counting_mixer(qkv, *args, **kwargs):   # the positions each layer mixes per call
        steps.append(qkv.shape[1])
        return real_mixer(qkv, *args, **kwargs)

    def counting_step(model, tokens, *args, **kwargs):
        decode_steps.append(tokens.shape)
        return real_step(model, tokens, *args, **kwargs)

    monkeypatch.setattr(gate_loop, "gate_loop_mixer", counting_mixer)
    monkeypatch.setattr(generation, "decode_step", counting_step)
    prompt = torch.randint(0, VOCAB, (3, 7))
    out = model.generate(prompt, 5, temperature=0.0)
    assert out.shape == (3, 5) and out.dtype == prompt.dtype
    assert steps == [7] * len(model.layers)          # the prompt once, through the layers' forward
    assert decode_steps == [(3,)] * 4                 # then one decode step per further token


@pytest.mark.parametrize(
    "options", [dict(), dict(use_gate_looped_attn=False, rotary_emb=True)], ids=["gateloop", "softmax-rotary"]
)
def test_greedy_generate_matches_recomputing_the_prefix(options):
    torch.manual_seed(0)
    model = small_transformer(scan_backend="torch", **options)
    prompt = torch.randint(0, VOCAB, (2, 4))
    generated = model.generate(prompt, 6, temperature=0.0)
    seq = prompt
    with torch.no_grad():
        for _ in range(6):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, seq[:, 4:])
    assert torch.equal(model.generate(prompt, 6, top_k=1), generated)  # top_k=1 is greedy


def test_generate_sampling_respects_top_k():
    torch.manual_seed(0)
    model = small_transformer(scan_backend="torch")
    prompt = torch.randint(0, VOCAB, (64, 3))
    with torch.no_grad():
        logits = model(prompt)[:, -1]
    allowed = logits.topk(3, dim=-1).indices
    first = model.generate(prompt, 1, temperature=2.0, top_k=3)[:, 0]
    assert (allowed == first[:, None]).any(dim=-1).all()
    assert model.generate(prompt, 0).shape == (64, 0)


# --- every seed option constructs, runs forward and backward -----------------------------------

TRANSFORMER_OPTIONS = [
    dict(),
    dict(gate_loop_heads=4, dim_gate_looped_attn=24),
    dict(attn_add_swish_gating=False),
    dict(checkpoint_gate_looped_attn=False),
    dict(sub_ln=True, post_ln_norm=True),
    dict(ablate_complex=True),
    dict(ablate_state_transition=True),
    dict(frac_gradient_state_transition=0.5),
    dict(use_gate_looped_attn=False),
    dict(use_gate_looped_attn=False, rotary_emb=True, attn_add_swish_gating=False),
    dict(use_gate_looped_attn=False, attn_softmax_normalize=False, ff_mult=2),
    dict(use_gate_looped_attn=False, data_dependent_rel_pos=True),
    dict(use_gate_looped_attn=False, data_dependent_rel_pos=True, attn_softmax_normalize=True, ablate_complex=True),
]


@pytest.mark.parametrize("options", TRANSFORMER_OPTIONS, ids=lambda o: "-".join(o) or "default")
def test_transformer_options_run(options):
    torch.manual_seed(0)
    model = Transformer(dim=16, num_tokens=VOCAB, depth=1, dim_head=8, heads=2, scan_backend="torch", **options)
    ids = torch.randint(0, VOCAB, (2, 9))
    assert model(ids).shape == (2, 9, VOCAB)
    loss = model(ids, return_loss=True)
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        if p.requires_grad and p.grad is not None:
            assert torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize(
    "module",
    [
        lambda: GateLoopedAttention(16, scan_backend="torch"),
        lambda: GateLoopedAttention(16, heads=2, dim_inner=8, add_swish_gating=False, sub_ln=True,
                                    checkpoint_gate_looped_attn=False, scan_backend="torch"),
        lambda: GateLoopedAttention(16, add_swish_gating=False, scan_backend="torch"),  # identity out
        lambda: CausalFullAttention(16, dim_head=4, heads=2),
        lambda: CausalFullAttention(16, dim_head=4, heads=2, rotary_emb=True, add_swish_gating=True,
                                    data_dependent_rel_pos=True, frac_gradient_data_dependent_rel_pos=0.3),
        lambda: SimpleGateLoopLayer(16, scan_backend="torch"),
        lambda: SimpleGateLoopLayer(16, prenorm=False, post_ln=True, reverse=True, scan_backend="torch"),
        lambda: SimpleGateLoopLayer(16, use_heinsen=True),
        lambda: SimpleGateLoopLayer(16, use_jax_associative_scan=True),
        lambda: RMSNorm(16),
    ],
    ids=["gla", "gla-heads-subln", "gla-identity-out", "attn", "attn-all", "simple", "simple-all",
         "simple-heinsen", "simple-jax", "rmsnorm"],
)
def test_module_options_run(module):
    torch.manual_seed(0)
    layer = module()
    x = torch.randn(2, 9, 16, requires_grad=True)
    out = layer(x)
    assert out.shape == x.shape
    out.square().mean().backward()
    assert torch.isfinite(x.grad).all()


def test_autocast_bfloat16_runs():
    """Gates go complex in float32 even when the projections run in bfloat16."""
    torch.manual_seed(0)
    for options in (dict(), dict(use_gate_looped_attn=False, data_dependent_rel_pos=True, rotary_emb=True)):
        model = Transformer(dim=16, num_tokens=VOCAB, depth=1, dim_head=8, heads=2, scan_backend="torch", **options)
        ids = torch.randint(0, VOCAB, (2, 9))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids, return_loss=True)
        loss.backward()
        assert torch.isfinite(loss)


# --- argument errors ---------------------------------------------------------------------------


def test_backend_aliases():
    assert SimpleGateLoopLayer(8, use_heinsen=True).scan_backend == "heinsen"
    assert SimpleGateLoopLayer(8, use_jax_associative_scan=True).scan_backend == "jax"
    assert SimpleGateLoopLayer(8, use_heinsen=True, scan_backend="heinsen").scan_backend == "heinsen"
    assert SimpleGateLoopLayer(8, scan_backend="loop").scan_backend == "loop"
    with pytest.raises(ValueError, match="use_heinsen.*conflicts.*'torch'"):
        SimpleGateLoopLayer(8, use_heinsen=True, scan_backend="torch")
    with pytest.raises(ValueError, match="use_jax_associative_scan.*conflicts"):
        SimpleGateLoopLayer(8, use_jax_associative_scan=True, scan_backend="heinsen")
    with pytest.raises(ValueError, match="cannot both"):
        SimpleGateLoopLayer(8, use_heinsen=True, use_jax_associative_scan=True)


def test_unknown_backend_is_refused_at_construction():
    for build in (
        lambda: SimpleGateLoopLayer(8, scan_backend="cuda"),
        lambda: GateLoopedAttention(8, scan_backend="cuda"),
        lambda: Transformer(dim=8, num_tokens=VOCAB, depth=1, scan_backend="cuda"),
    ):
        with pytest.raises(ValueError, match="unknown scan_backend 'cuda'"):
            build()


def test_reverse_layer_refuses_cache():
    layer = SimpleGateLoopLayer(8, reverse=True)
    x = torch.randn(1, 4, 8)
    with pytest.raises(ValueError, match="reverse=True"):
        layer(x, return_cache=True)
    with pytest.raises(ValueError, match="reverse=True"):
        layer(x, cache=torch.zeros(1, 8))


def test_transformer_argument_errors():
    model = Transformer(dim=8, num_tokens=VOCAB, depth=2, scan_backend="torch")
    ids = torch.randint(0, VOCAB, (1, 5))
    with pytest.raises(ValueError, match="return_loss"):
        model(ids, return_loss=True, return_cache=True)
    _, cache = model(ids, return_cache=True)
    with pytest.raises(ValueError, match="2 layers"):
        model(ids[:, :1], cache=cache[:1])
    with pytest.raises(ValueError, match="divisible"):
        GateLoopedAttention(12, heads=5)
    with pytest.raises(ValueError, match="prompt_ids"):
        model.generate(ids[0], 3)


# --- wrong inputs, caches and sizes: one named error each ---------------------------------------

LAYERS = [
    pytest.param(lambda: GateLoopedAttention(16, scan_backend="torch"), id="gateloop"),
    pytest.param(lambda: CausalFullAttention(16, dim_head=4, heads=2), id="attention"),
    pytest.param(lambda: SimpleGateLoopLayer(16, scan_backend="torch"), id="simple"),
]


@pytest.mark.parametrize("build", LAYERS)
@pytest.mark.parametrize(
    "shape, dtype, error, match",
    [
        ((5, 16), torch.float32, ValueError, r"x must have shape \(batch, seq, 16\), got \(5, 16\)"),
        ((2, 2, 5, 16), torch.float32, ValueError, r"x must have shape \(batch, seq, 16\)"),
        ((2, 5, 8), torch.float32, ValueError, r"last dim = dim = 16\), got \(2, 5, 8\)"),
        ((2, 5, 16), torch.int64, TypeError, "floating-point"),
    ],
    ids=["2d", "4d", "width", "integers"],
)
def test_layers_name_a_wrong_input(build, shape, dtype, error, match):
    layer = build()
    with pytest.raises(error, match=match):
        layer(torch.zeros(shape, dtype=dtype))


def test_rmsnorm_names_a_wrong_width():
    with pytest.raises(ValueError, match=r"RMSNorm: x must have shape \(\.\.\., 16\)"):
        RMSNorm(16)(torch.zeros(3, 8))


@pytest.mark.parametrize(
    "build",
    [
        lambda: Transformer(dim=0, num_tokens=VOCAB, depth=1),
        lambda: Transformer(dim=8, num_tokens=VOCAB, depth=0),
        lambda: Transformer(dim=8, num_tokens=0, depth=1),
        lambda: Transformer(dim=8, num_tokens=VOCAB, depth=1, use_gate_looped_attn=False, heads=0),
        lambda: Transformer(dim=8, num_tokens=VOCAB, depth=1, gate_loop_heads=0),
        lambda: GateLoopedAttention(0),
        lambda: CausalFullAttention(8, dim_head=-1),
        lambda: SimpleGateLoopLayer(0),
        lambda: RMSNorm(2.5),
    ],
    ids=["dim", "depth", "num_tokens", "heads", "gate_loop_heads", "gla-dim", "dim_head", "simple-dim", "rms-dim"],
)
def test_sizes_below_one_are_refused_by_name(build):
    with pytest.raises(ValueError, match="must be an int >= 1"):
        build()


def test_attention_cache_misuse_is_named():
    torch.manual_seed(0)
    attn = small_transformer(use_gate_looped_attn=False)
    gateloop = small_transformer(scan_backend="torch")
    ids = torch.randint(0, VOCAB, (2, 5))
    with torch.no_grad():
        _, attn_cache = attn(ids, return_cache=True)
        _, gl_cache = gateloop(ids, return_cache=True)
        with pytest.raises(ValueError, match=r"cache k must have shape \(batch, heads, past, dim_head\) = \(3, 2"):
            attn(torch.randint(0, VOCAB, (3, 1)), cache=attn_cache)  # another batch size
        with pytest.raises(TypeError, match="a GateLoop state"):
            attn(ids[:, :1], cache=gl_cache)
        with pytest.raises(TypeError, match="an attention layer's"):
            gateloop(ids[:, :1], cache=attn_cache)
        with pytest.raises(ValueError, match="GateLoopedAttention: cache must be the state"):
            gateloop(torch.randint(0, VOCAB, (3, 1)), cache=gl_cache)
        with pytest.raises(TypeError, match="cache must be the list"):
            gateloop(ids[:, :1], cache=gl_cache[0])
    layer = SimpleGateLoopLayer(8, scan_backend="torch")
    with pytest.raises(ValueError, match=r"cache must have shape \(batch, dim\) = \(1, 8\)"):
        layer(torch.randn(1, 3, 8), cache=torch.zeros(2, 8))


def test_token_ids_are_checked():
    model = small_transformer(scan_backend="torch")
    with pytest.raises(ValueError, match=r"token ids in \[0, 29\]; this model has num_tokens=29"):
        model(torch.tensor([[0, 29]]))
    with pytest.raises(TypeError, match="integer token ids"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="seq >= 1"):
        model(torch.zeros(1, 0, dtype=torch.long))


@pytest.mark.parametrize("options", [dict(scan_backend="torch"), dict(use_gate_looped_attn=False)],
                         ids=["gateloop", "attention"])
def test_return_loss_needs_two_tokens_and_one_sequence(options):
    model = small_transformer(**options)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        model(torch.zeros(3, 1, dtype=torch.long), return_loss=True)
    with pytest.raises(ValueError, match="at least one sequence"):
        model(torch.zeros(0, 4, dtype=torch.long), return_loss=True)
    assert torch.isfinite(model(torch.zeros(3, 2, dtype=torch.long), return_loss=True))


def test_top_k_keeps_exactly_k_tokens_when_logits_tie():
    from gateloop_hybrid.generation import sample

    def draw(logits, top_k):          # one draw per row, each row its own seed
        seeds = torch.arange(logits.shape[0])
        return sample(logits, seeds, torch.zeros_like(seeds), 1.0, top_k)

    torch.manual_seed(0)
    equal = torch.zeros(2048, 16)
    assert draw(equal, 2).unique().numel() == 2
    # bf16 rounds 1.0, 1.001 and 1.002 to one value: the threshold form kept all of them
    close = torch.tensor([[3.0, 1.0, 1.001, 1.002, 0.0]]).to(torch.bfloat16).float().expand(4096, 5)
    picked = draw(close, 2).unique()
    assert picked.numel() == 2 and 0 in picked.tolist()
    model = small_transformer(scan_backend="torch")
    with torch.no_grad():
        model.to_logits[-1].weight.zero_()  # every logit equal
    out = model.generate(torch.zeros(512, 1, dtype=torch.long), 1, top_k=2)
    assert out.unique().numel() == 2


def test_generate_temperature_edges():
    torch.manual_seed(0)
    model = small_transformer(scan_backend="torch")
    prompt = torch.randint(0, VOCAB, (4, 3))
    greedy = model.generate(prompt, 5, temperature=0.0)
    assert torch.equal(model.generate(prompt, 5, temperature=1e-45), greedy)
    assert torch.equal(model.generate(prompt, 5, temperature=1e-300), greedy)
    for bad in (float("nan"), float("inf"), -1.0, "1"):
        with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
            model.generate(prompt, 2, temperature=bad)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="top_k must be None or an int >= 1"):
            model.generate(prompt, 2, top_k=bad)
    with pytest.raises(ValueError, match="num_tokens must be an int >= 0"):
        model.generate(prompt, 2.0)
    with torch.no_grad():
        model.to_logits[-1].weight.fill_(float("nan"))
    with pytest.raises(ValueError, match="logits at new token 0 are not finite"):
        model.generate(prompt, 2)


def test_generate_keeps_the_prompts_integer_type():
    torch.manual_seed(0)
    model = small_transformer(scan_backend="torch")
    for dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
        prompt = torch.randint(0, VOCAB, (2, 3), dtype=dtype)
        out = model.generate(prompt, 4, temperature=0.0)
        assert out.dtype == dtype
        assert torch.equal(out.long(), model.generate(prompt.long(), 4, temperature=0.0))
    big = Transformer(dim=8, num_tokens=300, depth=1, scan_backend="torch")
    with pytest.raises(TypeError, match="uint8 cannot hold the sampled token ids"):
        big.generate(torch.zeros(1, 2, dtype=torch.uint8), 1)
