"""Hybrid stacks (gateloop_hybrid/hybrid.py): a per-layer pattern of GateLoop, attention and
attention after a SimpleGateLoopLayer, with every block holding a GateLoop block's parameters.
Decoding token by token equals the full forward for the patterns in test_generation.py."""

from __future__ import annotations

import pytest
import torch

from gateloop_hybrid import CausalFullAttention, GateLoopedAttention, Transformer
from gateloop_hybrid.hybrid import AugmentedAttention, parameters_of

KW = dict(num_tokens=29, depth=4, heads=2, dim_head=8, scan_backend="torch")


def model(pattern=None, seed=0, **kw):
    torch.manual_seed(seed)
    return Transformer(16, **{**KW, **kw}, layer_pattern=pattern)


def test_a_pattern_gives_one_mixer_per_letter_repeated_to_the_depth():
    kinds = [type(attn.fn) for attn, _ in model("ga").layers]
    assert kinds == [GateLoopedAttention, CausalFullAttention] * 2
    kinds = [type(attn.fn) for attn, _ in model("gamg").layers]
    assert kinds == [GateLoopedAttention, CausalFullAttention, AugmentedAttention, GateLoopedAttention]
    assert model("m").layer_pattern == "mmmm"


@pytest.mark.parametrize("pattern", ["a", "m", "ga", "gmam", "g"])
@pytest.mark.parametrize("gate_loop_heads", [None, 4])
def test_every_block_holds_a_gateloop_blocks_parameters(pattern, gate_loop_heads):
    dim = 16
    reference = parameters_of(model(None, gate_loop_heads=gate_loop_heads).layers[0])
    for block in model(pattern, gate_loop_heads=gate_loop_heads).layers:
        assert abs(parameters_of(block) - reference) <= 16 * dim + 8, (pattern, parameters_of(block), reference)


def test_the_pattern_g_is_the_plain_gateloop_model_weight_for_weight():
    """Same keys, shapes and initial values: the seed's checkpoints load into either."""
    plain, pattern = model(None).state_dict(), model("g").state_dict()
    assert list(plain) == list(pattern)
    assert all(torch.equal(plain[k], pattern[k]) for k in plain)
    attention = Transformer(16, **KW, use_gate_looped_attn=False)
    assert list(attention.state_dict()) == list(Transformer(16, **{**KW, "ff_mult": 4}, layer_pattern="a")
                                                .state_dict())


@pytest.mark.parametrize("pattern", ["gm", "am", "ga"])
def test_a_cache_continues_the_sequence(pattern):
    m = model(pattern).eval()
    x = torch.randint(0, 29, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = m(x)
        first, cache = m(x[:, :7], return_cache=True)
        rest = m(x[:, 7:], cache=cache)
    torch.testing.assert_close(torch.cat([first, rest], 1), full, rtol=1e-5, atol=1e-5)


def test_every_parameter_of_a_hybrid_gets_a_gradient():
    m = model("gm")
    loss = m(torch.randint(0, 29, (2, 9)), return_loss=True)
    loss.backward()
    missing = [name for name, p in m.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert missing == []


def test_a_hybrid_saves_and_loads_with_its_pattern(tmp_path):
    m = model("ma").eval()
    loaded = Transformer.from_pretrained(m.save_pretrained(tmp_path / "hybrid")).eval()
    assert loaded.layer_pattern == "mama"
    x = torch.randint(0, 29, (1, 6))
    with torch.no_grad():
        assert torch.equal(loaded(x), m(x))


@pytest.mark.parametrize("pattern,kw,error,match", [
    ("gx", {}, ValueError, r"layer_pattern 'gx'.*got \['x'\]"),
    ("", {}, ValueError, "got nothing"),
    ("gag", {}, ValueError, "3 letters, which do not divide depth=4"),
    (["g", "a"], {}, TypeError, "must be a string"),
    ("ga", {"use_gate_looped_attn": False}, ValueError, "not both"),
])
def test_bad_patterns_are_refused_by_name(pattern, kw, error, match):
    with pytest.raises(error, match=match):
        Transformer(16, **{**KW, **kw}, layer_pattern=pattern)


def test_an_augmented_layer_refuses_a_cache_of_another_layer():
    m = model("m")
    with pytest.raises(TypeError, match="AugmentedAttention: cache must be the"):
        m.layers[0][0].fn(torch.randn(1, 3, 16), cache=torch.zeros(1, 16))


def test_train_takes_a_pattern_and_refuses_it_where_it_cannot_hold():
    from gateloop_hybrid import training
    cfg, _ = training.parse_train_args(["--layer-pattern", "gm", "--depth", "4", "--dim", "32", "--gate-loop-heads", "32",
                                        "--heads", "2", "--dim-head", "16"])
    training.check_config(cfg)
    built = Transformer(**cfg.model_kwargs())
    assert built.layer_pattern == "gmgm"
    for argv, match in ((["--layer-pattern", "ga", "--attention"], "not with --attention"),
                        (["--layer-pattern", "gz"], "must be letters g"),
                        (["--layer-pattern", "gam", "--depth", "4"], "divides --depth 4"),
                        (["--layer-pattern", "ga", "--framework", "jax"], "torch model only")):
        cfg, _ = training.parse_train_args(argv)
        with pytest.raises(training.ConfigError, match=match):
            training.check_config(cfg)
