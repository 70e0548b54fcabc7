"""Growth of models with the reused families' features (qkv_bias, qk_norm, explicit head_dim,
GQA, llama3 RoPE scaling, sliding_window) against independent references.

As in tests/test_growth.py the references are never the growth code: the base model's own
logits and per-layer residual stream, the base's own blocks applied in layer-map order, and a
negative control (exact copies never diverge). Biases and q/k norm gains are drawn at random
(signed biases, gains in [0.5, 1.5)): zeros or ones would hide a wrong copy rule.
Tolerances as in tests/test_growth.py: fp32 within 1e-5, fp64 within 1e-12, identity bitwise.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from megareuse.config import Config, ModelConfig
from megareuse.engine.checkpoint import read_meta, save_checkpoint, verify_checkpoint
from megareuse.engine.weights import load_state_dict, weights_problem
from megareuse.model import GPT, cross_entropy
from megareuse.model.flops import QK_NORMS, QKV_BIASES
from megareuse.reuse import growth
from megareuse.reuse.growth import grow, grow_checkpoint, grow_width, insert_identity, stack_depth
from test_growth import BASE, SEQ_LENS, build, composed_logits, max_err, tokens, trace

LLAMA3 = dict(rope_scaling="llama3", rope_factor=8.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
              rope_original_max_seq_len=64)  # wavelengths 6, 63, 628, 6283 (hd 8): kept, blended, divided x2
FEATURES = {
    "bias": dict(qkv_bias=True, tie_embeddings=False),
    "qknorm_hd12": dict(qk_norm=True, head_dim=12),  # head_dim != d_model / n_heads = 8
    "gqa_both": dict(n_kv_heads=2, qkv_bias=True, qk_norm=True),
    "llama3": dict(LLAMA3, sliding_window=16),
    "all": dict(LLAMA3, n_kv_heads=2, qkv_bias=True, qk_norm=True, head_dim=12, sliding_window=32,
                tie_embeddings=False),
}
# what growth must carry over unchanged (width changes d_model, heads, ffn, the tie; depth n_layers)
CARRIED = ("head_dim", "qkv_bias", "qk_norm", "sliding_window", "rope_scaling", "rope_factor",
           "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_seq_len", "rope_theta",
           "max_seq_len", "norm_eps", "vocab_size")


def feature_model(overrides: dict, seed: int = 0, dtype=torch.float32) -> tuple[ModelConfig, GPT]:
    """A GPT with trained-like scales: matrices 0.5 * N(0, 1/fan_in), norm gains (q/k norms
    included) in [0.5, 1.5), q/k/v biases 0.5 * N(0, 1) (signed, non-zero)."""
    cfg = ModelConfig(**{**BASE, **overrides})
    cfg.validate()
    torch.manual_seed(seed)
    model = GPT(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))
            elif name.endswith(".bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
    return cfg, model.to(dtype).eval()


def feature_tensors(cfg: ModelConfig, sd: dict) -> list[str]:
    names = (QKV_BIASES if cfg.qkv_bias else ()) + (QK_NORMS if cfg.qk_norm else ())
    return [f"layers.{i}.{name}" for i in range(cfg.n_layers) for name in names]


def assert_carried(base: ModelConfig, grown: ModelConfig) -> None:
    for name in CARRIED:
        assert getattr(grown, name) == getattr(base, name), name
    assert grown.head_size == base.head_size
    grown.validate()


def test_feature_models_are_what_they_claim():
    """The fixtures exercise the features: non-zero biases, non-unit gains, scaled RoPE tables."""
    for variant, overrides in FEATURES.items():
        cfg, model = feature_model(overrides)
        sd = model.state_dict()
        for key in feature_tensors(cfg, sd):
            t = sd[key]
            assert t.abs().min() > 0 and (t - 1).abs().max() > 0.1, (variant, key)
        assert len(feature_tensors(cfg, sd)) == cfg.n_layers * (3 * cfg.qkv_bias + 2 * cfg.qk_norm)
        if cfg.rope_scaling != "none":
            plain = GPT(dataclasses.replace(cfg, rope_scaling="none"))
            assert max_err(model.rope.cos, plain.rope.cos) > 0.1, variant
    assert ModelConfig(**{**BASE, **FEATURES["qknorm_hd12"]}).head_size == 12 != BASE["d_model"] // BASE["n_heads"]


# --------------------------------------------------------------------------- width
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)], ids=["fp32", "fp64"])
@pytest.mark.parametrize("noise", [0.0, 1e-2])
@pytest.mark.parametrize("variant", list(FEATURES))
def test_width_exact(variant, noise, dtype, tol):
    cfg, base = feature_model(FEATURES[variant], dtype=dtype)
    bsd = base.state_dict()
    for k in (2, 3) if variant == "all" else (2,):
        wcfg, wsd = grow_width(cfg, bsd, k, noise=noise, seed=3)
        assert (wcfg.d_model, wcfg.n_heads, wcfg.kv_heads, wcfg.ffn_hidden) == \
            (k * cfg.d_model, k * cfg.n_heads, k * cfg.kv_heads, k * cfg.ffn_hidden)
        assert wcfg.n_kv_heads is None if cfg.n_kv_heads is None else wcfg.n_kv_heads == k * cfg.n_kv_heads
        assert_carried(cfg, wcfg)  # head_dim None stays None (d/h = kd/kh), explicit stays explicit
        for key in feature_tensors(cfg, bsd):
            if key.endswith(".bias"):  # copied with their rows: [b; b], never divided or noised
                assert torch.equal(wsd[key], bsd[key].repeat(k)), key
            else:  # one gain per head dim, shared by all heads: unchanged
                assert torch.equal(wsd[key], bsd[key]), key
        wide = build(wcfg, wsd, dtype)
        for T in SEQ_LENS:
            toks = tokens(T)
            (ref, ref_h), (got, got_h) = trace(base, toks), trace(wide, toks)
            assert max_err(got, ref) <= tol, (k, T, max_err(got, ref))
            targets = tokens(T, seed=9)
            assert abs(cross_entropy(got, targets).item() - cross_entropy(ref, targets).item()) <= tol
            for h, hw in zip(ref_h, got_h):  # wide residual stream = [h; h; ...] after every block
                assert max_err(hw, torch.cat([h] * k, dim=-1)) <= tol


def _halves(key: str, t: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    if key == "tok_embeddings.weight":
        return t[:, :cfg.d_model], t[:, cfg.d_model:]
    return t.chunk(2, dim=0)


@pytest.mark.parametrize("variant", ["gqa_both", "all"])
def test_symmetry_broken_by_noise_only(variant):
    """With noise the twin copies (biases included) get different gradients at the first step and
    differ after two AdamW steps; without (negative control) they stay identical up to float
    rounding. (Adam's first update is about lr * sign(g): twin biases whose gradients differ but
    share signs move together at step 1 and apart from step 2 on. The control's rounding: the
    bias gradient is a column sum over tokens, which CPU kernels may round differently for twin
    columns, measured <= 1e-7 relative with head_dim 12, 0 with head_dim 8; with noise the twins
    differ by >= 6e-3 relative.)"""
    cfg, base = feature_model(FEATURES[variant])
    keys = ["layers.0.attention.wq.bias", "layers.0.attention.wk.bias", "layers.1.attention.wv.bias",
            "layers.1.attention.wq.weight", "layers.0.attention.wk.weight", "layers.0.feed_forward.w1.weight"]
    seq = tokens(17, seed=4, batch=4)
    for noise in (0.0, 1e-2):
        wcfg, wsd = grow_width(cfg, base.state_dict(), 2, noise=noise, seed=0)
        wide = build(wcfg, wsd).train()
        opt = torch.optim.AdamW(wide.parameters(), lr=1e-2, weight_decay=0.0)
        cross_entropy(wide(seq[:, :-1]), seq[:, 1:]).backward()
        grads = {n: p.grad.clone() for n, p in wide.named_parameters()}
        assert grads["layers.0.attention.q_norm.weight"].abs().max() > 0  # shared gains learn too
        opt.step()
        opt.zero_grad()
        cross_entropy(wide(seq[:, 1:]), seq[:, :-1]).backward()
        opt.step()
        after = wide.state_dict()
        for key in keys:
            g0, g1 = _halves(key, grads[key], cfg)
            rel = ((g0 - g1).norm() / g0.norm()).item()
            assert (rel <= 1e-6) if noise == 0 else (rel > 1e-3), (key, noise, rel)
            w0, w1 = _halves(key, after[key], cfg)
            apart = (w0 - w1).abs().max().item()
            assert (apart <= 1e-6) if noise == 0 else (apart > 1e-5), (key, noise, apart)


# --------------------------------------------------------------------------- depth
@pytest.mark.parametrize("variant", list(FEATURES))
@pytest.mark.parametrize("factor,layer_map,expected", [(2, None, [0, 1, 0, 1]), (None, "1,0,0,1", [1, 0, 0, 1])])
def test_stack_copies_features(variant, factor, layer_map, expected):
    cfg, base = feature_model(FEATURES[variant])
    scfg, ssd = stack_depth(cfg, base.state_dict(), factor=factor, layer_map=layer_map)
    assert scfg.n_layers == len(expected) and scfg.tie_embeddings == cfg.tie_embeddings
    assert_carried(cfg, scfg)
    for i, j in enumerate(expected):
        block = base.layers[j].state_dict()  # biases and q/k norms included
        assert set(block) >= {n for n in QKV_BIASES if cfg.qkv_bias} | {n for n in QK_NORMS if cfg.qk_norm}
        for name, w in block.items():
            assert torch.equal(ssd[f"layers.{i}.{name}"], w), (i, j, name)
    toks = tokens(16)
    assert max_err(build(scfg, ssd)(toks), composed_logits(base, expected, toks)) <= 1e-6


@pytest.mark.parametrize("variant", list(FEATURES))
@pytest.mark.parametrize("factor,layer_map,new", [(2, None, [1, 3]), (None, [0, 1, 0, 1], [2, 3])])
def test_identity_insertion_exact_with_features(variant, factor, layer_map, new):
    """Inserted blocks keep their (non-zero) q/k/v biases and q/k norms; wo has no bias, so zero
    wo and w2 still make the residual branch add exactly 0."""
    cfg, base = feature_model(FEATURES[variant])
    icfg, isd = insert_identity(cfg, base.state_dict(), factor=factor, layer_map=layer_map)
    assert_carried(cfg, icfg)
    model = build(icfg, isd).train()
    for T in SEQ_LENS:
        with torch.no_grad():
            assert torch.equal(model(tokens(T)), base(tokens(T))), T
    seq = tokens(17, seed=4, batch=4)
    cross_entropy(model(seq[:, :-1]), seq[:, 1:]).backward()
    for i in new:
        block = model.layers[i]
        if cfg.qkv_bias:
            assert block.attention.wo.bias is None and block.attention.wq.bias.abs().min() > 0
        with torch.no_grad():  # the branch itself is exactly zero
            x = torch.randn(2, 5, cfg.d_model)
            cos, sin = model.rope(5)
            assert torch.count_nonzero(block.attention(block.attention_norm(x), cos, sin)) == 0
        for proj in (block.attention.wo, block.feed_forward.w2):
            assert torch.count_nonzero(proj.weight) == 0 and proj.weight.grad.abs().max() > 1e-4


@pytest.mark.parametrize("variant", ["gqa_both", "all"])
@pytest.mark.parametrize("depth_method", ["identity", "stack"])
def test_width_and_depth_together(variant, depth_method):
    cfg, base = feature_model(FEATURES[variant])
    gcfg, gsd = grow(cfg, base.state_dict(), width=2, depth=2, depth_method=depth_method, noise=1e-2, seed=5)
    assert (gcfg.n_layers, gcfg.d_model, gcfg.n_heads, gcfg.kv_heads) == (4, 64, 8, 2 * cfg.kv_heads)
    assert_carried(cfg, gcfg)
    grown = build(gcfg, gsd)
    for T in SEQ_LENS:  # identity: the base itself; stack: the base's blocks in map order
        toks = tokens(T)
        ref = base(toks) if depth_method == "identity" else composed_logits(base, [0, 1, 0, 1], toks)
        assert max_err(grown(toks), ref) <= 1e-5


# --------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("field,value,message", [
    ("sliding_window", 8, r"model.sliding_window = 8: accepted null or at least max_seq_len=16"),
    ("rope_scaling", "yarn", r"model.rope_scaling = 'yarn': accepted one of none, linear, llama3"),
    ("head_dim", 7, r"model.head_dim = 7: accepted null \(d_model / n_heads\) or a positive even integer")])
def test_invalid_base_config_refused(field, value, message):
    """A base config the model cannot run exactly (a real sliding window, unknown RoPE scaling, an
    odd head dim) is refused in one line by every operator before any tensor is built."""
    cfg, base = feature_model(FEATURES["all"])
    bad = dataclasses.replace(cfg, **{field: value})
    ops = [lambda: grow_width(bad, base.state_dict(), 2), lambda: stack_depth(bad, base.state_dict(), 2),
           lambda: insert_identity(bad, base.state_dict(), 2),
           lambda: grow(bad, base.state_dict(), width=2, depth=2, depth_method="identity")]
    for op in ops:
        with pytest.raises(ValueError, match=message) as info:
            op()
        assert "\n" not in str(info.value)


def test_tensor_without_width_rule_refused(monkeypatch):
    """A block tensor growth has no rule for (a feature added to the model only) is refused by name
    rather than tiled blindly; depth growth moves every tensor of a block and needs no rule."""
    cfg, base = feature_model(FEATURES["bias"])
    rules = {k: v for k, v in growth.WIDTH_RULES.items() if k != "attention.wk.bias"}
    monkeypatch.setattr(growth, "WIDTH_RULES", rules)
    with pytest.raises(ValueError, match=r"tensor 'layers.0.attention.wk.bias' has no width-growth rule") as info:
        grow_width(cfg, base.state_dict(), 2)
    assert "\n" not in str(info.value)
    stack_depth(cfg, base.state_dict(), 2)


def test_head_dim_fixed_by_widened_config():
    """The grown head dim equals the base's for every valid config: derived (None stays None) and
    explicit (stays explicit), MHA and GQA, any factor."""
    for overrides in (dict(), dict(head_dim=12), dict(head_dim=8), dict(n_kv_heads=2, head_dim=6)):
        cfg = ModelConfig(**{**BASE, **overrides})
        for k in (2, 3, 5):
            wide = growth.widened_config(cfg, k)
            assert wide.head_size == cfg.head_size and wide.head_dim == cfg.head_dim
            assert wide.kv_heads == k * cfg.kv_heads and wide.n_heads // wide.kv_heads == cfg.n_heads // cfg.kv_heads


# --------------------------------------------------------------------------- checkpoints (megareuse grow)
def feature_checkpoint(root, variant: str):
    cfg, base = feature_model(FEATURES[variant])
    tok = root / "src-tokenizer.model"
    tok.write_bytes(b"fake sentencepiece model")
    meta = {"stage": "base", "tokens_seen": 4096, "D1": 4096, "D2": 0, "config": Config(model=cfg).to_dict(),
            "layout": {"tp": 1, "dp": 1, "zero_stage": 0},
            "tokenizer": {"file": "tokenizer.model", "sha256": "ab" * 32, "vocab_size": cfg.vocab_size,
                          "source": str(tok)}, "git_revision": "unknown"}
    path = save_checkpoint(root / "base" / "checkpoints", 16, {"model": base.state_dict(), "trainer": {"step": 16}},
                           meta, extra_files={"tokenizer.model": tok})
    return path, cfg, base


@pytest.mark.parametrize("variant,depth_method", [("all", "identity"), ("gqa_both", "stack")])
def test_grow_checkpoint_with_features(tmp_path, variant, depth_method):
    """What `megareuse grow` runs: the written weights fit the grown config (weights_problem),
    the config carries every feature, and the grown checkpoint's logits are the base's."""
    src, cfg, base = feature_checkpoint(tmp_path, variant)
    out = grow_checkpoint(src, tmp_path / "grown" / "init", width=2, depth=2, depth_method=depth_method,
                          noise=1e-3, seed=1)
    assert verify_checkpoint(out) is None
    gcfg = Config.from_dict(read_meta(out)["config"]).model
    assert (gcfg.d_model, gcfg.n_layers, gcfg.kv_heads, gcfg.tie_embeddings) == (64, 4, 2 * cfg.kv_heads, False)
    assert_carried(cfg, gcfg)
    sd = load_state_dict(out, gcfg.tie_embeddings, model=gcfg)
    assert weights_problem(sd, gcfg, tied=gcfg.tie_embeddings) is None
    assert len(feature_tensors(gcfg, sd)) == 4 * (3 * cfg.qkv_bias + 2 * cfg.qk_norm) > 0
    toks = tokens(16)
    ref = base(toks) if depth_method == "identity" else composed_logits(base, [0, 1, 0, 1], toks)
    assert max_err(build(gcfg, sd)(toks), ref) <= 1e-5
