"""Generation over a static state (gateloop_hybrid/generation.py): the decode step against the
full forward for every layer kind and both head forms, prefill with rows of different lengths,
the sampler on the device, and generate's arguments."""

from __future__ import annotations

import pytest
import torch

from gateloop_hybrid import Transformer
from gateloop_hybrid import generation
from gateloop_hybrid.generation import DecodeState, decode_step, prefill, sample

VOCAB = 37

MODELS = {
    "gateloop": dict(),
    "gateloop-wide": dict(gate_loop_heads=2),
    "gateloop-sub-ln-no-gating": dict(gate_loop_heads=4, sub_ln=True, attn_add_swish_gating=False),
    "gateloop-post-ln": dict(post_ln_norm=True),
    "gateloop-ablations": dict(ablate_complex=True, ablate_state_transition=True),
    "attention": dict(use_gate_looped_attn=False, heads=2, dim_head=8),
    "attention-rotary": dict(use_gate_looped_attn=False, heads=2, dim_head=8, rotary_emb=True),
    "attention-rel-pos": dict(use_gate_looped_attn=False, heads=2, dim_head=8, data_dependent_rel_pos=True),
    "attention-linear": dict(use_gate_looped_attn=False, heads=2, dim_head=8, attn_softmax_normalize=False),
    "hybrid-gm": dict(layer_pattern="gm", heads=2, dim_head=8),
    "hybrid-am-rotary": dict(layer_pattern="am", heads=2, dim_head=8, rotary_emb=True),
}


def make(kind, seed=0):
    torch.manual_seed(seed)
    return Transformer(dim=16, num_tokens=VOCAB, depth=2, scan_backend="torch", **MODELS[kind]).eval()


@pytest.mark.parametrize("kind", list(MODELS))
def test_decoding_token_by_token_equals_the_full_forward(kind):
    """Logits after a prefill of 5 tokens, then after each of 7 decode steps, against the full
    forward's logits at the same positions (float32, 1e-5)."""
    model = make(kind)
    ids = torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
        state = DecodeState(model, 3, 12)
        got = [prefill(model, ids[:, :5], state)]
        for t in range(5, 12):
            got.append(decode_step(model, ids[:, t], state))
    for i, logits in enumerate(got):
        torch.testing.assert_close(logits, full[:, 4 + i], rtol=1e-5, atol=1e-5)
    assert state.position.tolist() == [12, 12, 12]


@pytest.mark.parametrize("kind", ["gateloop", "gateloop-wide", "attention-rotary"])
def test_padded_rows_equal_the_same_rows_alone(kind):
    """Prompts of lengths 3, 9 and 6 in one batch (padding with arbitrary ids): each row's logits
    and its sampled tokens (seeded per row) equal those of the row run alone."""
    model = make(kind)
    g = torch.Generator().manual_seed(2)
    lengths = [3, 9, 6]
    prompts = [torch.randint(0, VOCAB, (n,), generator=g) for n in lengths]
    batch = torch.randint(0, VOCAB, (3, 9), generator=g)            # padding: random ids
    for i, p in enumerate(prompts):
        batch[i, :len(p)] = p
    with torch.no_grad():
        state = DecodeState(model, 3, 9)
        logits = prefill(model, batch, state, torch.tensor(lengths))
        for i, p in enumerate(prompts):
            torch.testing.assert_close(logits[i], model(p[None])[0, -1], rtol=1e-5, atol=1e-5)
    together = model.generate(batch, 8, temperature=0.8, top_k=20, seed=[11, 12, 13], lengths=lengths)
    for i, p in enumerate(prompts):
        alone = model.generate(p[None], 8, temperature=0.8, top_k=20, seed=[11 + i])
        assert torch.equal(together[i], alone[0]), i


def test_greedy_generation_equals_recomputing_the_prefix_for_every_kind():
    for kind in MODELS:
        model = make(kind)
        prompt = torch.randint(0, VOCAB, (2, 4), generator=torch.Generator().manual_seed(3))
        generated = model.generate(prompt, 6, temperature=0.0)
        seq = prompt
        with torch.no_grad():
            for _ in range(6):
                seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
        assert torch.equal(generated, seq[:, 4:]), kind


def test_a_rows_tokens_depend_on_its_seed_only():
    model = make("gateloop")
    prompt = torch.randint(0, VOCAB, (4, 5), generator=torch.Generator().manual_seed(4))
    a = model.generate(prompt, 10, seed=7)
    assert torch.equal(a, model.generate(prompt, 10, seed=7))
    assert not torch.equal(a, model.generate(prompt, 10, seed=8))
    # row 2 of a batch seeded 7 draws from seed 9: alone with seed 9 it draws the same
    assert torch.equal(a[2], model.generate(prompt[2:3], 10, seed=9)[0])
    torch.manual_seed(5)
    b = model.generate(prompt, 10)
    torch.manual_seed(5)
    assert torch.equal(b, model.generate(prompt, 10))                # None: torch's generator


def test_sampling_follows_the_softmax():
    """Over many rows with different seeds, Gumbel-max draws match softmax(logits / T)."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5]).expand(40000, 5)
    seeds = torch.arange(40000)
    for temperature in (1.0, 0.5, 2.0):
        drawn = sample(logits, seeds, torch.zeros_like(seeds), temperature)
        freq = torch.bincount(drawn, minlength=5).double() / drawn.numel()
        want = (logits[0].double() / temperature).softmax(-1)
        assert (freq - want).abs().max() < 0.01, (temperature, freq, want)
    again = sample(logits, seeds, torch.ones_like(seeds), 1.0)          # the next token index
    assert not torch.equal(again, sample(logits, seeds, torch.zeros_like(seeds), 1.0))


def test_top_k_and_top_p_keep_their_candidates():
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(4000, 30, generator=g)
    seeds = torch.arange(4000)
    counter = torch.zeros_like(seeds)
    top3 = logits.topk(3, dim=-1).indices
    drawn = sample(logits, seeds, counter, 1.5, top_k=3)
    assert (top3 == drawn[:, None]).any(-1).all()
    probs, order = logits.softmax(-1).sort(-1, descending=True)
    nucleus = (probs.cumsum(-1) - probs) < 0.6                          # the set whose mass reaches 0.6
    drawn = sample(logits, seeds, counter, 1.0, top_p=0.6)
    rank = (order == drawn[:, None]).long().argmax(-1)
    assert nucleus.gather(-1, rank[:, None]).all()
    assert torch.equal(sample(logits, seeds, counter, 1.0, top_p=1e-9), logits.argmax(-1))   # the top token only
    assert torch.equal(sample(logits, seeds, counter, 0.0), logits.argmax(-1))


def test_eos_stops_a_row_and_stream_sees_each_step():
    model = make("gateloop")
    with torch.no_grad():
        model.to_logits[-1].weight.zero_()
        model.to_logits[-1].weight[5] = 1.0                            # token 5 most likely everywhere
    prompt = torch.randint(0, VOCAB, (2, 3), generator=torch.Generator().manual_seed(7))
    seen = []
    out = model.generate(prompt, 40, temperature=0.0, eos_token=5, stream=seen.append)
    assert out.shape == (2, 40) and (out == 5).all()
    assert len(seen) <= 17 and all(t.shape == (2,) and t.device.type == "cpu" for t in seen)
    out = model.generate(prompt, 4, max_new_tokens=None, temperature=0.0, eos_token=6)
    assert out.shape == (2, 4)


def test_generate_refuses_bad_arguments_by_name():
    model = make("gateloop")
    prompt = torch.zeros(2, 3, dtype=torch.long)
    cases = [
        (dict(num_tokens=2, max_new_tokens=2), "once, as num_tokens or max_new_tokens"),
        (dict(max_new_tokens=-1), "max_new_tokens must be an int >= 0"),
        (dict(num_tokens=2, top_p=0.0), "top_p must be None or a number in"),
        (dict(num_tokens=2, top_p=1.5), "top_p must be None or a number in"),
        (dict(num_tokens=2, eos_token=VOCAB), "eos_token must be None or a token id"),
        (dict(num_tokens=2, lengths=[1, 4]), r"lengths must lie in \[1, 3\]"),
        (dict(num_tokens=2, lengths=[1.0, 2.0]), "lengths must be 2 ints"),
        (dict(num_tokens=2, seed=[1, 2, 3]), "seed must be None, an int, or 2 ints"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            model.generate(prompt, **kwargs)
    with pytest.raises(TypeError, match="stream must be a callable"):
        model.generate(prompt, 2, stream=3)
    with pytest.raises(TypeError, match="capture must be a bool"):
        model.generate(prompt, 2, capture=1)


def test_the_state_is_fixed_in_size():
    """A GateLoop model's state does not grow with the context; attention's holds max_len keys."""
    gl, att = make("gateloop-wide"), make("attention")
    assert DecodeState(gl, 2, 10).nbytes() == DecodeState(gl, 2, 100000).nbytes()
    assert DecodeState(att, 2, 100).nbytes() > DecodeState(att, 2, 10).nbytes()
    with pytest.raises(ValueError, match="exceeds max_len"):
        DecodeState(att, 1, 4).load(att(torch.zeros(1, 6, dtype=torch.long), return_cache=True)[1], 6)


def test_decoder_eager_step_advances_the_counter_and_state():
    model = make("attention-rotary")
    state = DecodeState(model, 2, 8)
    seeds = torch.tensor([1, 2])
    decoder = generation.Decoder(model, state, seeds, temperature=0.0)
    with torch.no_grad():
        prefill(model, torch.zeros(2, 3, dtype=torch.long), state)
        tokens, logits = decoder(torch.tensor([4, 5]), torch.tensor([True, False]))
    assert tokens.shape == (2,) and logits.shape == (2, VOCAB)
    assert state.position.tolist() == [4, 3] and decoder.counter.tolist() == [1, 1]


def test_a_compiled_decoder_draws_what_the_eager_one_draws():
    """Decoder(compile=True): step and draw through torch.compile(fullgraph=True) give the eager
    decoder's tokens and logits, and the same state, with a row going inactive."""
    model = make("gateloop-wide")
    runs = []
    for compile_ in (False, True):
        torch._dynamo.reset()
        state = DecodeState(model, 2, 8)
        decoder = generation.Decoder(model, state, torch.tensor([3, 4]), temperature=0.8, top_k=5,
                                     compile=compile_)
        with torch.no_grad():
            prefill(model, torch.ones(2, 3, dtype=torch.long), state)
            token, got = torch.tensor([4, 5]), []
            for step in range(3):
                token, logits = decoder(token, torch.tensor([True, step < 1]))
                got.append((token.clone(), logits.clone()))
        runs.append((got, [t.clone() for t in state.tensors()]))
    for (t1, l1), (t2, l2) in zip(runs[0][0], runs[1][0]):
        assert torch.equal(t1, t2)
        torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-5)
    for a, b in zip(runs[0][1], runs[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_generate_hands_capture_and_compile_to_the_decoder(monkeypatch):
    seen = []
    real = generation.Decoder

    def spy(*args, **kwargs):
        seen.append((kwargs["capture"], kwargs["compile"]))
        return real(*args, **{**kwargs, "compile": False})
    monkeypatch.setattr(generation, "Decoder", spy)
    model = make("gateloop")
    model.generate(torch.ones(1, 3, dtype=torch.long), 2, compile=True)
    assert seen == [(False, True)]
    with pytest.raises(TypeError, match="compile must be a bool"):
        model.generate(torch.ones(1, 3, dtype=torch.long), 2, compile="yes")


def test_save_pretrained_and_from_pretrained_round_trip(tmp_path):
    model = make("gateloop-wide")
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    again = Transformer.from_pretrained(tmp_path / "m", scan_backend="loop")
    assert again.config["scan_backend"] == "loop" and again.config["gate_loop_heads"] == 2
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        torch.testing.assert_close(again(ids), model(ids), rtol=0, atol=0)
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v)
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        Transformer.from_pretrained(tmp_path / "nothing")
    (tmp_path / "m" / "config.json").write_text('{"model": "other"}')
    with pytest.raises(ValueError, match="not a gateloop_hybrid Transformer"):
        Transformer.from_pretrained(tmp_path / "m")
