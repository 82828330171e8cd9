"""gateloop-transformer checkpoints load into our modules and give its outputs.

"The seed" below is lucidrains/gateloop-transformer 0.2.5, the package these layers replace, a
test-only dependency:
    pip install "gateloop-transformer==0.2.5" "rotary-embedding-torch>=0.5"
Tests that need it skip with the reason when it is not importable; the state-dict round trip
of our own modules runs regardless.

Everything runs in float64 and compares with a relative tolerance of 1e-9 (against the
largest magnitude of the reference), except the seed's Heinsen path, which computes in
complex64 whatever the input dtype.

Deliberate differences from the seed, tested elsewhere instead of here:
- the seed's JAX path (use_jax_associative_scan) needs jax2torch, which fails on current JAX,
  and returned the unscanned (a, kv) as its cache; ours returns the scanned state
  (tests/test_layers.py::test_simple_gate_loop_cache_continues);
- the seed's caches are (a, kv) tuples; ours is the state alone, so caches do not cross
  between the two packages (outputs do: see test_simple_cache_matches_seed).
"""

from __future__ import annotations

import importlib.metadata

import pytest
import torch

import gateloop_hybrid as ours

RTOL = 1e-9
DIM, VOCAB, DEPTH, SEQ = 16, 37, 2, 19
# parity is about the layers, so most tests use the plain-torch scan (no JIT compile per shape);
# test_transformer_matches_seed_default_backend covers the default ("auto") backend
BACKEND = "torch"

# the seed calls torch.utils.checkpoint without use_reentrant, which torch warns about
pytestmark = pytest.mark.filterwarnings("ignore:torch.utils.checkpoint:UserWarning")


@pytest.fixture(scope="module")
def seed():
    mod = pytest.importorskip(
        "gateloop_transformer",
        reason='seed not installed: pip install "gateloop-transformer==0.2.5" rotary-embedding-torch',
    )
    version = importlib.metadata.version("gateloop-transformer")
    if version != "0.2.5":
        pytest.skip(f"parity is pinned to gateloop-transformer 0.2.5, found {version}")
    return mod


def assert_close(actual, expected, rtol=RTOL, what="output"):
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = expected.abs().max().clamp(min=1e-300)
    err = ((actual - expected).abs().max() / scale).item()
    assert err <= rtol, f"{what}: relative error {err:.3e} > {rtol:.0e}"


def load_seed_weights(seed_module, our_module):
    """Cast both to float64 and copy the seed's state dict into ours with strict=True."""
    seed_module.double()
    our_module.double()
    our_module.load_state_dict(seed_module.state_dict(), strict=True)
    return seed_module, our_module


def record_outputs(model):
    """Forward hooks on every residual block; returns the list the outputs land in."""
    outs = []
    for attn, ff in model.layers:
        for block in (attn, ff):
            block.register_forward_hook(lambda mod, args, out: outs.append(out.detach().clone()))
    return outs


@pytest.mark.parametrize(
    "name", ["Transformer", "GateLoopedAttention", "SimpleGateLoopLayer", "CausalFullAttention"]
)
def test_signatures_extend_the_seeds(seed, name):
    """Same parameter names, kinds, order and defaults as the seed; ours may only add at the end."""
    import inspect

    for method in ("__init__", "forward"):
        theirs = list(inspect.signature(getattr(getattr(seed, name), method)).parameters.values())
        mine = list(inspect.signature(getattr(getattr(ours, name), method)).parameters.values())
        assert [(p.name, p.kind, p.default) for p in mine[: len(theirs)]] == [
            (p.name, p.kind, p.default) for p in theirs
        ], f"{name}.{method}"
        extra = {p.name for p in mine[len(theirs):]}
        allowed = {"scan_backend"} if method == "__init__" else {"cache", "return_cache"}
        if name == "Transformer" and method == "__init__":
            allowed.add("layer_pattern")            # hybrid stacks (gateloop_hybrid.hybrid)
        assert extra <= allowed, f"{name}.{method} adds {extra - allowed}"


TRANSFORMER_OPTIONS = [
    pytest.param({}, id="gateloop-maxheads"),
    pytest.param(dict(gate_loop_heads=4), id="gateloop-4heads"),
    pytest.param(dict(gate_loop_heads=2, dim_gate_looped_attn=24), id="gateloop-dim-inner"),
    pytest.param(dict(attn_add_swish_gating=False), id="gateloop-noswish-identity-out"),
    pytest.param(dict(attn_add_swish_gating=False, dim_gate_looped_attn=8), id="gateloop-noswish-proj"),
    pytest.param(dict(checkpoint_gate_looped_attn=False), id="gateloop-nocheckpoint"),
    pytest.param(dict(sub_ln=True), id="gateloop-subln"),
    pytest.param(dict(post_ln_norm=True), id="gateloop-postln"),
    pytest.param(dict(ablate_complex=True), id="gateloop-ablate-complex"),
    pytest.param(dict(ablate_state_transition=True), id="gateloop-ablate-transition"),
    pytest.param(dict(frac_gradient_state_transition=0.5), id="gateloop-frac-grad"),
    pytest.param(dict(use_gate_looped_attn=False), id="softmax"),
    pytest.param(dict(use_gate_looped_attn=False, rotary_emb=True), id="softmax-rotary"),
    pytest.param(dict(use_gate_looped_attn=False, attn_add_swish_gating=False), id="softmax-noswish"),
    pytest.param(dict(use_gate_looped_attn=False, attn_softmax_normalize=False), id="linear-attn"),
    pytest.param(dict(use_gate_looped_attn=False, data_dependent_rel_pos=True), id="ddrelpos"),
    pytest.param(
        dict(use_gate_looped_attn=False, data_dependent_rel_pos=True, rotary_emb=True, attn_softmax_normalize=True),
        id="ddrelpos-rotary-softmax",
    ),
    pytest.param(dict(use_gate_looped_attn=False, data_dependent_rel_pos=True, ablate_complex=True), id="ddrelpos-ablate-complex"),
    pytest.param(
        dict(use_gate_looped_attn=False, data_dependent_rel_pos=True, ablate_state_transition=True),
        id="ddrelpos-ablate-transition",
    ),
    pytest.param(dict(use_gate_looped_attn=False, post_ln_norm=True, rotary_emb=True), id="softmax-postln"),
]


@pytest.mark.parametrize("options", TRANSFORMER_OPTIONS)
def test_transformer_matches_seed(seed, options):
    check_transformer(seed, options, BACKEND)


def test_transformer_matches_seed_default_backend(seed):
    check_transformer(seed, {}, "auto")


def check_transformer(seed, options, backend):
    common = dict(dim=DIM, num_tokens=VOCAB, depth=DEPTH, dim_head=8, heads=2, **options)
    torch.manual_seed(0)
    theirs, mine = load_seed_weights(
        seed.Transformer(**common), ours.Transformer(**common, scan_backend=backend)
    )
    ids = torch.randint(0, VOCAB, (2, SEQ))

    their_blocks, my_blocks = record_outputs(theirs), record_outputs(mine)
    with torch.no_grad():
        expected, actual = theirs(ids), mine(ids)
    assert_close(actual, expected, what="logits")
    assert len(my_blocks) == len(their_blocks) == 2 * DEPTH
    for i, (m, t) in enumerate(zip(my_blocks, their_blocks)):
        assert_close(m, t, what=f"block {i} output")

    # loss and every parameter's gradient
    their_loss = theirs(ids, return_loss=True)
    my_loss = mine(ids, return_loss=True)
    assert_close(my_loss, their_loss, what="loss")
    their_loss.backward()
    my_loss.backward()
    their_grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    my_grads = {n: p.grad for n, p in mine.named_parameters() if p.requires_grad}
    assert my_grads.keys() == their_grads.keys()
    for name, grad in their_grads.items():
        if grad is None:  # e.g. the gate projection when the state transition is ablated
            assert my_grads[name] is None, f"{name} has a gradient here, none in the seed"
            continue
        assert_close(my_grads[name], grad, what=f"grad of {name}")


def test_transformer_forward_ablation_overrides_match_seed(seed):
    common = dict(dim=DIM, num_tokens=VOCAB, depth=1)
    torch.manual_seed(0)
    theirs, mine = load_seed_weights(
        seed.Transformer(**common), ours.Transformer(**common, scan_backend=BACKEND)
    )
    ids = torch.randint(0, VOCAB, (1, SEQ))
    with torch.no_grad():
        for flags in (dict(ablate_complex=True), dict(ablate_state_transition=True)):
            assert_close(mine(ids, **flags), theirs(ids, **flags), what=str(flags))


GATE_LOOPED_OPTIONS = [
    pytest.param({}, id="default"),
    pytest.param(dict(heads=2, dim_inner=24, sub_ln=True), id="heads-inner-subln"),
    pytest.param(dict(add_swish_gating=False), id="noswish"),
    pytest.param(dict(checkpoint_gate_looped_attn=False, frac_gradient_state_transition=0.3), id="nocheckpoint"),
]


@pytest.mark.parametrize("options", GATE_LOOPED_OPTIONS)
def test_gate_looped_attention_matches_seed(seed, options):
    torch.manual_seed(0)
    theirs, mine = load_seed_weights(
        seed.GateLoopedAttention(DIM, **options),
        ours.GateLoopedAttention(DIM, **options, scan_backend=BACKEND),
    )
    x = torch.randn(2, SEQ, DIM, dtype=torch.float64)
    for flags in ({}, dict(ablate_complex=True), dict(ablate_state_transition=True)):
        with torch.no_grad():
            assert_close(mine(x, **flags), theirs(x, **flags), what=str(flags))


CAUSAL_ATTENTION_OPTIONS = [
    pytest.param({}, id="default"),
    pytest.param(dict(rotary_emb=True, add_swish_gating=True), id="rotary-swish"),
    pytest.param(dict(data_dependent_rel_pos=True), id="ddrelpos"),
    pytest.param(dict(data_dependent_rel_pos=True, softmax_normalize=True, rotary_emb=True), id="ddrelpos-softmax"),
    pytest.param(dict(softmax_normalize=False, frac_gradient_data_dependent_rel_pos=0.2), id="linear"),
]


@pytest.mark.parametrize("options", CAUSAL_ATTENTION_OPTIONS)
def test_causal_full_attention_matches_seed(seed, options):
    torch.manual_seed(0)
    common = dict(dim_head=8, heads=2, **options)
    theirs, mine = load_seed_weights(
        seed.CausalFullAttention(DIM, **common), ours.CausalFullAttention(DIM, **common)
    )
    x = torch.randn(2, SEQ, DIM, dtype=torch.float64)
    for flags in ({}, dict(ablate_complex=True), dict(ablate_state_transition=True)):
        with torch.no_grad():
            assert_close(mine(x, **flags), theirs(x, **flags), what=str(flags))


SIMPLE_OPTIONS = [
    pytest.param({}, id="default"),
    pytest.param(dict(prenorm=False), id="noprenorm"),
    pytest.param(dict(post_ln=True), id="postln"),
    pytest.param(dict(reverse=True), id="reverse"),
    pytest.param(dict(prenorm=False, post_ln=True, reverse=True), id="all"),
]


@pytest.mark.parametrize("options", SIMPLE_OPTIONS)
def test_simple_gate_loop_matches_seed(seed, options):
    torch.manual_seed(0)
    theirs, mine = load_seed_weights(
        seed.SimpleGateLoopLayer(DIM, **options),
        ours.SimpleGateLoopLayer(DIM, **options, scan_backend=BACKEND),
    )
    x = torch.randn(2, SEQ, DIM, dtype=torch.float64, requires_grad=True)
    expected, actual = theirs(x), mine(x)
    assert_close(actual, expected)
    cotangent = torch.randn_like(expected)
    (their_dx,) = torch.autograd.grad(expected, x, cotangent)
    (my_dx,) = torch.autograd.grad(actual, x, cotangent)
    assert_close(my_dx, their_dx, what="input gradient")


def test_simple_gate_loop_heinsen_matches_seed(seed):
    """The seed's Heinsen path takes logs in complex64 even for float64 input: 1e-5 here."""
    torch.manual_seed(0)
    theirs, mine = load_seed_weights(
        seed.SimpleGateLoopLayer(DIM, use_heinsen=True), ours.SimpleGateLoopLayer(DIM, use_heinsen=True)
    )
    assert mine.scan_backend == "heinsen"
    x = torch.randn(2, SEQ, DIM, dtype=torch.float64)
    with torch.no_grad():
        assert_close(mine(x), theirs(x), rtol=1e-5)


def test_simple_cache_matches_seed(seed):
    """Chunked decoding gives the seed's outputs (the caches themselves differ in form)."""
    torch.manual_seed(0)
    theirs, mine = load_seed_weights(
        seed.SimpleGateLoopLayer(DIM), ours.SimpleGateLoopLayer(DIM, scan_backend=BACKEND)
    )
    x = torch.randn(2, SEQ, DIM, dtype=torch.float64)
    with torch.no_grad():
        their_cache = my_cache = None
        for chunk in x.split([7, 1, 11], dim=1):
            expected, their_cache = theirs(chunk, cache=their_cache, return_cache=True)
            actual, my_cache = mine(chunk, cache=my_cache, return_cache=True)
            assert_close(actual, expected)
        assert_close(my_cache, their_cache[1].reshape(2, DIM), what="final state")


@pytest.mark.parametrize("options", [dict(), dict(use_gate_looped_attn=False, rotary_emb=True)], ids=["gateloop", "softmax-rotary"])
def test_our_state_dict_loads_into_seed(seed, options):
    """The mapping is the identity both ways: our checkpoints load into the seed too."""
    common = dict(dim=DIM, num_tokens=VOCAB, depth=DEPTH, dim_head=8, heads=2, **options)
    torch.manual_seed(0)
    mine = ours.Transformer(**common, scan_backend=BACKEND).double()
    theirs = seed.Transformer(**common).double()
    theirs.load_state_dict(mine.state_dict(), strict=True)
    ids = torch.randint(0, VOCAB, (2, SEQ))
    with torch.no_grad():
        assert_close(mine(ids), theirs(ids))


# --- needs no seed ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [dict(), dict(use_gate_looped_attn=False, rotary_emb=True, data_dependent_rel_pos=True), dict(post_ln_norm=True, sub_ln=True)],
    ids=["gateloop", "softmax-rotary-ddrelpos", "postln-subln"],
)
def test_state_dict_round_trip(options, tmp_path):
    common = dict(dim=DIM, num_tokens=VOCAB, depth=DEPTH, dim_head=8, heads=2, **options)
    torch.manual_seed(0)
    model = ours.Transformer(**common, scan_backend=BACKEND)
    for p in model.parameters():  # move away from the initialisation
        p.data.add_(0.01 * torch.randn_like(p))
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    torch.manual_seed(1)
    fresh = ours.Transformer(**common, scan_backend=BACKEND)
    fresh.load_state_dict(torch.load(path, weights_only=True), strict=True)
    for (name, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), name
    ids = torch.randint(0, VOCAB, (2, SEQ))
    with torch.no_grad():
        assert torch.equal(model(ids), fresh(ids))


def test_state_dict_keys_are_the_seed_layout():
    """The seed's key names, spelled out, so a rename here is caught without the seed."""
    model = ours.Transformer(dim=8, num_tokens=11, depth=1, sub_ln=True)
    assert list(model.state_dict()) == [
        "token_emb.weight",
        "layers.0.0.fn.to_qkv.weight",
        "layers.0.0.fn.to_a.0.weight",
        "layers.0.0.fn.to_a.0.bias",
        "layers.0.0.fn.maybe_sub_ln.weight",
        "layers.0.0.fn.maybe_sub_ln.bias",
        "layers.0.0.fn.to_gates.0.weight",
        "layers.0.0.fn.to_out.weight",
        "layers.0.0.norm.gamma",
        "layers.0.1.fn.0.weight",
        "layers.0.1.fn.0.bias",
        "layers.0.1.fn.2.weight",
        "layers.0.1.fn.2.bias",
        "layers.0.1.norm.gamma",
        "to_logits.0.gamma",
        "to_logits.1.weight",
    ]
    attn = ours.Transformer(
        dim=8, num_tokens=11, depth=1, use_gate_looped_attn=False, rotary_emb=True,
        data_dependent_rel_pos=True, post_ln_norm=True, dim_head=4, heads=2,
    )
    assert list(attn.state_dict()) == [
        "token_emb.weight",
        "layers.0.0.fn.rotary_emb.freqs",
        "layers.0.0.fn.to_qkv.0.weight",
        "layers.0.0.fn.to_a.0.weight",
        "layers.0.0.fn.to_gates.0.weight",
        "layers.0.0.fn.to_out.1.weight",
        "layers.0.0.fn.to_out.1.bias",
        "layers.0.0.norm.weight",
        "layers.0.0.norm.bias",
        "layers.0.1.fn.0.weight",
        "layers.0.1.fn.0.bias",
        "layers.0.1.fn.2.weight",
        "layers.0.1.fn.2.bias",
        "layers.0.1.norm.weight",
        "layers.0.1.norm.bias",
        "to_logits.weight",
    ]
    assert list(ours.SimpleGateLoopLayer(8, post_ln=True).state_dict()) == [
        "norm.gamma",
        "to_qkva.0.weight",
        "maybe_post_ln.weight",
        "maybe_post_ln.bias",
    ]
