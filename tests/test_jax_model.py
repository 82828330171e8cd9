"""gateloop_hybrid.jax, the model in pure JAX, against the torch layers in float64.

Outputs and the gradients of every parameter (compared by torch name) agree to 1e-9 relative
to the largest magnitude, across the seed's options, on small random models and odd lengths;
cached decoding continues the full sequence; weights cross torch -> JAX -> torch with
strict=True; a gateloop-transformer 0.2.5 checkpoint converts and gives its logits; importing
the subpackage imports no torch.

JAX's x64 mode is switched on per test (the ``x64`` fixture) and restored after. The torch
models use the plain-torch scan (no bridge); the JAX models run jax_scan, jitted (one compile per
configuration costs about a second; op-by-op dispatch compiles every primitive and costs more).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

jax = pytest.importorskip("jax")
eqx = pytest.importorskip("equinox", reason="the jax extra: pip install 'gateloop-hybrid[jax]'")
import jax.numpy as jnp  # noqa: E402

import gateloop_hybrid as th  # noqa: E402
import gateloop_hybrid.jax as glj  # noqa: E402

RTOL = 1e-9
DIM, VOCAB, DEPTH, BATCH, SEQ = 16, 37, 2, 2, 7

# the seed calls torch.utils.checkpoint without use_reentrant, which torch warns about
pytestmark = [pytest.mark.filterwarnings("ignore:torch.utils.checkpoint:UserWarning"),
              pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield



def assert_close(actual, expected, rtol=RTOL, what="output"):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = max(np.abs(expected).max(), 1e-300)
    err = np.abs(actual - expected).max() / scale
    assert err <= rtol, f"{what}: relative error {err:.3e} > {rtol:.0e}"


def random_ids(seed, shape=(BATCH, SEQ)):
    return np.random.default_rng(seed).integers(0, VOCAB, shape)


def torch_model(options, seed=0):
    torch.manual_seed(seed)
    return th.Transformer(**options, scan_backend="torch").double()


@eqx.filter_jit
def logits_and_grads(model, ids, cot):
    """(sum(logits * cot), logits) and its gradient with respect to every array of the model."""
    def loss(model):
        logits = model(ids)
        return jnp.sum(logits * cot), logits
    return eqx.filter_value_and_grad(loss, has_aux=True)(model)


@eqx.filter_jit
def forward(model, ids):
    return model(ids)


@eqx.filter_jit
def cached(model, ids, cache):
    return model(ids, cache=cache, return_cache=True)


def check_grads(jax_grads, torch_module):
    """Every parameter's gradient, by torch name; a torch gradient of None is zero in JAX."""
    got = glj.named_parameters(jax_grads)
    want = dict(torch_module.named_parameters())
    assert list(got) == list(want)
    for name, p in want.items():
        if p.grad is None:
            assert np.all(np.asarray(got[name]) == 0), f"{name}: no gradient in torch, nonzero in JAX"
        else:
            assert_close(got[name], p.grad, what=f"grad of {name}")


@pytest.mark.parametrize("name", ["Transformer", "GateLoopedAttention", "SimpleGateLoopLayer",
                                  "CausalFullAttention", "RMSNorm"])
def test_signatures_are_the_torch_layers_plus_a_key(name):
    """Same parameter names, kinds and defaults as the torch layer; the JAX one adds only ``key``."""
    import inspect

    methods = [("__init__", "__init__"), ("forward", "__call__")]
    if name == "Transformer":
        methods.append(("generate", "generate"))
    # torch's generate runs on a decode state with more options (docs/generation.md); the JAX one
    # takes the core arguments, and requires num_tokens where torch also takes max_new_tokens
    torch_only = {"max_new_tokens", "top_p", "eos_token", "stream", "seed", "lengths", "capture", "compile"}
    for torch_method, jax_method in methods:
        theirs = inspect.signature(getattr(getattr(th, name), torch_method)).parameters.values()
        mine = inspect.signature(getattr(getattr(glj, name), jax_method)).parameters.values()
        if torch_method == "__init__":     # hybrid stacks are built by the torch model only
            theirs = [p for p in theirs if p.name != "layer_pattern"]
        if torch_method == "generate":
            theirs = [p for p in theirs if p.name not in torch_only]
            describe = lambda params: [(p.name, p.kind, None if p.name == "num_tokens" else p.default)
                                       for p in params]
        else:
            describe = lambda params: [(p.name, p.kind, p.default) for p in params]
        assert describe(p for p in mine if p.name != "key") == describe(theirs), f"{name}.{jax_method}"
        keys = [p for p in mine if p.name == "key"]
        assert all(p.kind is p.KEYWORD_ONLY for p in keys), f"{name}.{jax_method}"


TRANSFORMER_OPTIONS = [
    pytest.param({}, id="gateloop-one-feature-per-head"),
    pytest.param(dict(gate_loop_heads=2, sub_ln=True, frac_gradient_state_transition=0.5), id="gateloop-wide-subln"),
    pytest.param(dict(gate_loop_heads=4, attn_add_swish_gating=False, dim_gate_looped_attn=24, post_ln_norm=True,
                      checkpoint_gate_looped_attn=False), id="gateloop-noswish-inner-postln"),
    pytest.param(dict(gate_loop_heads=4, ablate_complex=True), id="gateloop-ablate-complex"),
    pytest.param(dict(gate_loop_heads=4, ablate_state_transition=True), id="gateloop-ablate-transition"),
    pytest.param(dict(use_gate_looped_attn=False, rotary_emb=True), id="softmax-rotary-swish"),
    pytest.param(dict(use_gate_looped_attn=False, data_dependent_rel_pos=True, attn_add_swish_gating=False,
                      frac_gradient_state_transition=0.3), id="ddrelpos-linear"),
    pytest.param(dict(use_gate_looped_attn=False, data_dependent_rel_pos=True, attn_softmax_normalize=True,
                      ablate_complex=True, post_ln_norm=True), id="ddrelpos-softmax-ablate-postln"),
]


@pytest.mark.parametrize("options", TRANSFORMER_OPTIONS)
def test_transformer_outputs_and_gradients_match_torch(x64, options):
    options = dict(dim=DIM, num_tokens=VOCAB, depth=DEPTH, heads=2, dim_head=8, **options)
    tm = torch_model(options)
    jm = glj.from_torch_state_dict(tm.state_dict(), **options)
    ids = random_ids(1)
    cot = np.random.default_rng(2).standard_normal((BATCH, SEQ, VOCAB))

    (value, logits), grads = logits_and_grads(jm, jnp.asarray(ids), jnp.asarray(cot))
    expected = tm(torch.from_numpy(ids))
    (expected * torch.from_numpy(cot)).sum().backward()
    assert_close(logits, expected.detach(), what="logits")
    assert_close(value, (expected.detach() * torch.from_numpy(cot)).sum(), what="loss")
    check_grads(grads, tm)


def test_loss_and_its_gradients_match_torch(x64):
    options = dict(dim=DIM, num_tokens=VOCAB, depth=DEPTH, gate_loop_heads=4)
    tm = torch_model(options)
    jm = glj.from_torch_state_dict(tm.state_dict(), **options)
    ids = random_ids(3, (3, 9))
    loss, grads = eqx.filter_jit(eqx.filter_value_and_grad(lambda m, ids: m(ids, return_loss=True)))(
        jm, jnp.asarray(ids))
    expected = tm(torch.from_numpy(ids), return_loss=True)
    expected.backward()
    assert_close(loss, expected.detach(), what="loss")
    check_grads(grads, tm)


SIMPLE_OPTIONS = [
    pytest.param({}, id="prenorm"),
    pytest.param(dict(prenorm=False, post_ln=True, use_jax_associative_scan=True), id="postln"),
    pytest.param(dict(reverse=True), id="reverse"),
]


@pytest.mark.parametrize("options", SIMPLE_OPTIONS)
def test_simple_gate_loop_layer_matches_torch(x64, options):
    torch.manual_seed(0)
    layer = th.SimpleGateLoopLayer(DIM, **options).double()
    skeleton = eqx.filter_eval_shape(glj.SimpleGateLoopLayer, DIM, **options, key=jax.random.key(0))
    jlayer = glj.load_state_dict(skeleton, layer.state_dict())
    x = np.random.default_rng(4).standard_normal((BATCH, SEQ, DIM))
    cot = np.random.default_rng(5).standard_normal((BATCH, SEQ, DIM))

    (value, (gx, gl)) = jax.jit(jax.value_and_grad(lambda x, m: jnp.sum(m(x) * cot), argnums=(0, 1)))(
        jnp.asarray(x), jlayer)
    tx = torch.from_numpy(x).requires_grad_()
    out = layer(tx)
    (out * torch.from_numpy(cot)).sum().backward()
    assert_close(jlayer(jnp.asarray(x)), out.detach())
    assert_close(gx, tx.grad, what="grad of x")
    check_grads(gl, layer)


@pytest.mark.parametrize("n,chunk,with_h0", [(77, 16, True), (77, 16, False), (5, 64, True), (1, 64, True)])
def test_chunked_heads_equal_the_materialized_scan(x64, n, chunk, with_h0):
    """Wide heads in chunked form against the per-token (d, e) states, float64: y, the final state
    and the gradients of q, k, v, log|a|, arg a and h0, across chunks (odd n, a padded last chunk)."""
    from gateloop_hybrid.jax.gate_loop import _chunked_heads, _gate_looped_heads
    rng = np.random.default_rng(n + chunk)
    b, h, d = 2, 3, 4
    q, k, v = (jnp.asarray(rng.standard_normal((b, n, h, d))) for _ in range(3))
    log_mag = jnp.asarray(np.log(rng.uniform(0.5, 1.0, (b, n, h))))
    phase = jnp.asarray(rng.uniform(-np.pi, np.pi, (b, n, h)))
    h0 = jnp.asarray(rng.standard_normal((b, h, d, d)) + 1j * rng.standard_normal((b, h, d, d))) if with_h0 else None
    wy, wh = rng.standard_normal((b, n, h, d)), rng.standard_normal((b, h, d, d))

    def chunked(q, k, v, lm, ph, h0):
        return _chunked_heads(q, k, v, lm, ph, h0, "jax", chunk=chunk)

    def materialized(q, k, v, lm, ph, h0):
        a = (jnp.exp(lm) * jnp.exp(1j * ph))[..., None, None]
        return _gate_looped_heads(q, k, v, a, h0, "jax")

    def loss(fn):
        return lambda *args: (lambda y, hl: jnp.sum(y * wy) + jnp.sum(hl.real * wh - hl.imag * wh))(*fn(*args))
    leaves = (q, k, v, log_mag, phase, h0)
    argnums = tuple(range(6 if with_h0 else 5))
    for got, want in zip(jax.jit(chunked)(*leaves), jax.jit(materialized)(*leaves)):
        assert_close(got, want)
    grads = jax.jit(jax.grad(loss(chunked), argnums))(*leaves)
    wants = jax.jit(jax.grad(loss(materialized), argnums))(*leaves)
    for name, got, want in zip(("q", "k", "v", "log|a|", "arg a", "h0"), grads, wants):
        assert_close(got, want, what=f"grad of {name}")


def test_wide_heads_over_several_chunks_match_torch(x64):
    """A Transformer with wide heads at 150 tokens (three chunks of 64, the last padded): logits
    and every parameter's gradient against torch's."""
    options = dict(dim=DIM, num_tokens=VOCAB, depth=1, gate_loop_heads=4)
    model = torch_model(options)
    jmodel = glj.from_torch_state_dict(model.state_dict(), **options)
    ids = random_ids(7, (1, 150))
    cot = np.random.default_rng(8).standard_normal((1, 150, VOCAB))
    (_, logits), grads = logits_and_grads(jmodel, jnp.asarray(ids), jnp.asarray(cot))
    want = model(torch.from_numpy(ids))
    (want * torch.from_numpy(cot)).sum().backward()
    assert_close(logits, want.detach())
    check_grads(grads, model)


def test_gates_at_zero_preactivation_have_torchs_finite_gradients(x64):
    """Gate pre-activations of exactly 0 (bf16 projections produce them): the gate is sigmoid(0)
    with phase 0 and every gradient finite and equal to torch's, where hypot and arctan2 alone
    would give NaN."""
    torch.manual_seed(0)
    layer = th.GateLoopedAttention(DIM, scan_backend="torch").double()
    with torch.no_grad():
        proj = layer.to_a[0]                    # rows (head, re/im): some heads' z exactly 0
        proj.weight.view(-1, 2, DIM)[::3].zero_()
        proj.bias.view(-1, 2)[::3].zero_()
    skeleton = eqx.filter_eval_shape(glj.GateLoopedAttention, DIM, key=jax.random.key(0))
    jlayer = glj.load_state_dict(skeleton, layer.state_dict())
    x = np.random.default_rng(4).standard_normal((BATCH, SEQ, DIM))
    cot = np.random.default_rng(5).standard_normal((BATCH, SEQ, DIM))

    gx, gl = jax.jit(jax.grad(lambda x, m: jnp.sum(m(x) * cot), argnums=(0, 1)))(jnp.asarray(x), jlayer)
    tx = torch.from_numpy(x).requires_grad_()
    (layer(tx) * torch.from_numpy(cot)).sum().backward()
    assert np.isfinite(np.asarray(gx)).all()
    assert_close(gx, tx.grad, what="grad of x")
    check_grads(gl, layer)


@pytest.mark.parametrize("options", [
    pytest.param(dict(gate_loop_heads=4), id="gateloop"),
    pytest.param(dict(use_gate_looped_attn=False, rotary_emb=True, data_dependent_rel_pos=True,
                      attn_softmax_normalize=True), id="attention"),
])
def test_cache_continues_the_sequence_and_matches_torchs(x64, options):
    options = dict(dim=DIM, num_tokens=VOCAB, depth=DEPTH, heads=2, dim_head=8, **options)
    tm = torch_model(options)
    jm = glj.from_torch_state_dict(tm.state_dict(), **options)
    ids = jnp.asarray(random_ids(6))
    full, _ = cached(jm, ids, None)
    first, cache = cached(jm, ids[:, :4], None)
    rest, cache = cached(jm, ids[:, 4:6], cache)
    last, cache = cached(jm, ids[:, 6:], cache)
    assert_close(jnp.concatenate([first, rest, last], axis=1), full, what="chunked logits")

    with torch.no_grad():
        _, torch_cache = tm(torch.from_numpy(np.array(ids)), return_cache=True)
    theirs = jax.tree_util.tree_leaves(torch_cache, is_leaf=torch.is_tensor)
    mine = jax.tree_util.tree_leaves(cache)
    assert len(mine) == len(theirs) == DEPTH * (1 if "gate_loop_heads" in options else 2)
    for m, t in zip(mine, theirs):
        assert_close(m, t, what="cache")


def test_simple_gate_loop_cache_continues(x64):
    layer = glj.SimpleGateLoopLayer(DIM, key=jax.random.key(0))
    x = jnp.asarray(np.random.default_rng(7).standard_normal((BATCH, SEQ, DIM)))
    call = eqx.filter_jit(lambda layer, x, cache: layer(x, cache=cache, return_cache=True))
    out, state = call(layer, x[:, :3], None)
    rest, _ = call(layer, x[:, 3:], state)
    assert_close(jnp.concatenate([out, rest], axis=1), call(layer, x, None)[0])


def test_greedy_generate_matches_torch(x64):
    options = dict(dim=DIM, num_tokens=VOCAB, depth=DEPTH, gate_loop_heads=4)
    tm = torch_model(options)
    jm = glj.from_torch_state_dict(tm.state_dict(), **options)
    prompt = random_ids(8, (2, 5))
    expected = tm.generate(torch.from_numpy(prompt), 6, temperature=0.0)
    got = jm.generate(jnp.asarray(prompt), 6, temperature=0.0)
    np.testing.assert_array_equal(np.asarray(got), expected.numpy())

    sampled = jm.generate(jnp.asarray(prompt, jnp.int32), 4, temperature=1.0, top_k=3, key=jax.random.key(1))
    again = jm.generate(jnp.asarray(prompt, jnp.int32), 4, temperature=1.0, top_k=3, key=jax.random.key(1))
    assert sampled.shape == (2, 4) and sampled.dtype == jnp.int32
    np.testing.assert_array_equal(sampled, again)
    with pytest.raises(ValueError, match="PRNG key"):
        jm.generate(jnp.asarray(prompt), 2)


def test_torch_jax_torch_round_trip_loads_strictly(x64):
    options = dict(dim=DIM, num_tokens=VOCAB, depth=DEPTH, gate_loop_heads=4, sub_ln=True)
    tm = torch_model(options)
    jm = glj.from_torch_state_dict(tm.state_dict(), **options)
    back = glj.to_torch_state_dict(jm)
    assert list(back) == list(tm.state_dict())
    fresh = torch_model(options, seed=1)
    fresh.load_state_dict(back, strict=True)
    for name, value in tm.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name
    ids = torch.from_numpy(random_ids(9))
    with torch.no_grad():
        assert torch.equal(fresh(ids), tm(ids))


def test_native_float32_model_converts_to_torch():
    """A model made in JAX (float32, its own init) gives the torch model's logits once converted."""
    options = dict(dim=DIM, num_tokens=VOCAB, depth=DEPTH, use_gate_looped_attn=False, heads=2, dim_head=8,
                   rotary_emb=True)
    jm = glj.Transformer(**options, key=jax.random.key(3))
    tm = th.Transformer(**options)
    tm.load_state_dict(glj.to_torch_state_dict(jm), strict=True)
    ids = random_ids(10)
    with torch.no_grad():
        assert_close(forward(jm, jnp.asarray(ids)), tm(torch.from_numpy(ids)), rtol=1e-5)


def test_seed_checkpoint_converts_and_gives_its_logits(x64):
    seed = pytest.importorskip("gateloop_transformer", reason="the test extra: gateloop-transformer 0.2.5")
    for options in (dict(gate_loop_heads=4, sub_ln=True),
                    dict(use_gate_looped_attn=False, rotary_emb=True, heads=2, dim_head=8)):
        options = dict(dim=DIM, num_tokens=VOCAB, depth=DEPTH, **options)
        torch.manual_seed(0)
        theirs = seed.Transformer(**options).double()
        jm = glj.from_torch_state_dict(theirs.state_dict(), **options)
        ids = random_ids(11)
        with torch.no_grad():
            assert_close(forward(jm, jnp.asarray(ids)), theirs(torch.from_numpy(ids)), what=str(options))


def test_bad_input_is_named():
    options = dict(dim=DIM, num_tokens=VOCAB, depth=1, gate_loop_heads=4)
    sd = th.Transformer(**options).state_dict()
    with pytest.raises(ValueError, match="missing: layers.1"):
        glj.from_torch_state_dict(sd, **dict(options, depth=2))
    with pytest.raises(ValueError, match=r"shape differs: layers.0.0.fn.to_a.0.weight"):
        glj.from_torch_state_dict(sd, **dict(options, gate_loop_heads=2))
    with pytest.raises(ValueError, match="a torch backend"):
        glj.from_torch_state_dict(sd, **options, scan_backend="torch")
    jm = glj.from_torch_state_dict(sd, **options)
    with pytest.raises(ValueError, match=r"token ids in \[0, 40\]"):
        jm(jnp.array([[0, 40]]))
    with pytest.raises(TypeError, match="integer token ids"):
        jm(jnp.ones((1, 3)))
    with pytest.raises(ValueError, match=r"cache must be the state"):
        jm(jnp.array([[1]]), cache=[jnp.zeros((1, 4, 2, 2), jnp.complex64)], return_cache=True)


def test_pallas_backend_matches_jax_in_interpret_mode(monkeypatch):
    """scan_backend="pallas" runs the Pallas kernels (here in Pallas's interpret mode on the CPU):
    float32 complex gates, real inputs, a cache; same loss, gradients and state as "jax"."""
    import functools

    import gateloop_hybrid.jax.gate_loop as gate_loop
    import gateloop_hybrid.kernels.pallas_scan as pallas_scan

    options = dict(dim=DIM, num_tokens=VOCAB, depth=1, gate_loop_heads=4)
    model = glj.Transformer(**options, key=jax.random.key(0))
    skeleton = eqx.filter_eval_shape(glj.Transformer, **options, scan_backend="pallas", key=jax.random.key(0))
    on_pallas = glj.load_state_dict(skeleton, glj.to_numpy_state_dict(model))
    ids = jnp.asarray(random_ids(12))
    with pytest.raises(ValueError, match="runs on a GPU"):
        on_pallas(ids)
    monkeypatch.setattr(gate_loop, "_default_backend", lambda: "gpu")
    monkeypatch.setattr(pallas_scan, "scan_pallas", functools.partial(pallas_scan.scan_pallas, interpret=True))
    loss_and_grads = eqx.filter_jit(eqx.filter_value_and_grad(lambda m, ids: m(ids, return_loss=True)))
    (want, want_grads), (got, got_grads) = loss_and_grads(model, ids), loss_and_grads(on_pallas, ids)
    assert_close(got, want, rtol=1e-6, what="loss")
    for name, g in glj.named_parameters(want_grads).items():
        assert_close(glj.named_parameters(got_grads)[name], g, rtol=1e-5, what=f"grad of {name}")
    # a cache continues through the kernels' h0
    _, state = cached(on_pallas, ids[:, :4], None)
    rest, _ = cached(on_pallas, ids[:, 4:], state)
    assert_close(rest, forward(model, ids)[:, 4:], rtol=1e-5, what="continued logits")


def test_bf16_training_step_keeps_float32_weights():
    from gateloop_hybrid.jax import training

    model = glj.Transformer(dim=DIM, num_tokens=VOCAB, depth=1, gate_loop_heads=4, key=jax.random.key(0))
    optimizer = training.make_optimizer(lr=1e-2, clip=0.5)
    batches = jnp.asarray(random_ids(13, (2, BATCH, SEQ + 1)))
    float32_loss = training.make_loss()
    want = (float32_loss(model, batches[0]) + float32_loss(model, batches[1])) / 2
    step = training.make_train_step(optimizer, compute_dtype=jnp.bfloat16)
    new, state, loss = step(model, optimizer.init(training.trainable(model)), batches)  # donates model
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(training.trainable(new))} == {jnp.dtype("float32")}
    assert training.torch_adam_state(state)["token_emb.weight"]["step"] == 1
    assert float(loss) == pytest.approx(float(want), rel=2e-2)  # the loss before the step, in bf16
    assert float(float32_loss(new, batches[0])) != float(want)


def test_importing_the_jax_model_imports_no_torch():
    code = ("import sys, gateloop_hybrid.jax, gateloop_hybrid.jax.training\n"
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))\n"
            "assert 'bridge' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
