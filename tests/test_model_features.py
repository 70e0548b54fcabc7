"""ModelConfig's features of the reused families: validation (one line naming the field), RoPE
scaling against transformers' own frequency functions, the sharded build replaying GPT's init
with biases and per-head norms, activation checkpointing, and checkpoints written before the
fields existed still matching a default model."""
import dataclasses

import pytest
import torch

from megareuse.config import ConfigError, ModelConfig
from megareuse.engine.build import build_model
from megareuse.model import GPT
from megareuse.model.rope import RopeScaling, rope_cos_sin
from megareuse.parallel.state import single_process_state
from megareuse.engine.init_source import model_diff

BASE = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=48, max_seq_len=16)
FEATURES = dict(head_dim=16, qkv_bias=True, qk_norm=True, rope_scaling="llama3", rope_factor=8.0,
                rope_original_max_seq_len=8, sliding_window=16, tie_embeddings=False)


@pytest.mark.parametrize("change, field", [
    ({"sliding_window": 8}, "model.sliding_window = 8: accepted null or at least max_seq_len=16"),
    ({"head_dim": 7}, "model.head_dim = 7: accepted null"),
    ({"rope_scaling": "yarn"}, "model.rope_scaling = 'yarn': accepted one of none, linear, llama3"),
    ({"rope_scaling": "linear", "rope_factor": 0.5}, "model.rope_factor = 0.5"),
    ({"rope_scaling": "llama3", "rope_low_freq_factor": 4.0}, "model.rope_low_freq_factor = 4.0"),
    ({"qk_norm": "yes"}, "model.qk_norm = 'yes': accepted true or false"),
    ({"d_model": 30, "n_heads": 4}, "model.n_heads = 4: accepted a divisor of d_model=30 (or set model.head_dim)"),
])
def test_bad_features_are_one_line_naming_the_field(change, field):
    with pytest.raises(ConfigError) as err:
        ModelConfig(**{**BASE, **change}).validate()
    assert field in str(err.value) and "\n" not in str(err.value)


def test_explicit_head_dim_need_not_divide_d_model():
    cfg = ModelConfig(**{**BASE, "d_model": 30, "n_heads": 4, "head_dim": 8})
    cfg.validate()
    model = GPT(cfg)
    assert model.layers[0].attention.wq.weight.shape == (32, 30) and cfg.head_size == 8


@pytest.mark.parametrize("kind, params", [
    ("linear", {"factor": 4.0}),
    ("llama3", {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
])
def test_rope_scaling_matches_transformers(kind, params):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = transformers.LlamaConfig(hidden_size=256, num_attention_heads=2, max_position_embeddings=512,
                                      rope_parameters={"rope_type": kind, "rope_theta": 500000.0, **params})
    want, scale = ROPE_INIT_FUNCTIONS[kind](config, "cpu")
    ours = RopeScaling(kind, params["factor"], params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0),
                       params.get("original_max_position_embeddings", 8192))
    base = 1.0 / 500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128)
    got = ours.apply(base)
    assert scale == 1.0 and not torch.allclose(got, base)  # the scaling changes something
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-6, atol=0)
    cos, _ = rope_cos_sin(32, 128, 500000.0, scaling=ours)
    assert torch.allclose(cos[5, :64], torch.cos(5 * got).float())


def test_sharded_build_replays_the_seeded_init_with_features():
    cfg = ModelConfig(**{**BASE, **FEATURES})
    torch.manual_seed(3)
    ref = GPT(cfg).state_dict()
    built = build_model(cfg, single_process_state(), torch.device("cpu"), seed=3).state_dict()
    assert built.keys() == ref.keys()
    assert all(torch.equal(built[k], v) for k, v in ref.items())
    assert not ref["layers.0.attention.wq.bias"].any() and ref["layers.0.attention.q_norm.weight"].eq(1).all()


def test_activation_checkpointing_gives_the_same_gradients():
    cfg = ModelConfig(**{**BASE, **FEATURES})
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    grads = []
    for mode in ("none", "full"):
        torch.manual_seed(1)
        model = GPT(dataclasses.replace(cfg, activation_checkpointing=mode)).train()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias") or "q_norm" in name or "k_norm" in name:
                    p.add_(torch.randn_like(p))
        model(tokens, tokens).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert all(torch.equal(grads[0][k], grads[1][k]) for k in grads[0])
    assert grads[0]["layers.1.attention.k_norm.weight"].abs().sum() > 0


def test_old_checkpoints_without_the_fields_match_a_default_model():
    current = dataclasses.asdict(ModelConfig(**BASE))
    saved = {k: v for k, v in current.items() if k not in FEATURES and k not in ("rope_low_freq_factor",
                                                                               "rope_high_freq_factor")}
    assert model_diff(saved, current) == []
    featured = dataclasses.asdict(ModelConfig(**{**BASE, "qk_norm": True}))
    assert model_diff(saved, featured) == ["model.qk_norm: checkpoint False vs config True"]
