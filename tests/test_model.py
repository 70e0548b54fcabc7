"""Model tests: every check compares against an independent reference (float64 formulas
written here), never the code against itself. Tiny configs; the file runs in seconds on CPU."""
import math

import pytest
import torch

from megareuse.config import ModelConfig
from megareuse.model import GPT, cross_entropy, flops_per_token, non_embedding_param_count, param_count
from megareuse.model import attention as attn_mod
from megareuse.model.flops import forward_flops_per_token
from megareuse.model.norm import RMSNorm
from megareuse.model.rope import apply_rope, rope_cos_sin

TINY = dict(vocab_size=67, d_model=32, n_layers=2, n_heads=4, ffn_hidden=48, max_seq_len=16)


def make(seed=0, **kw):
    torch.manual_seed(seed)
    return GPT(ModelConfig(**{**TINY, **kw})).eval()


def tokens(B=2, T=12, V=67, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- references
def ref_rope(x, theta=10000.0):
    """Complex-number RoPE in float64: dims (i, i + D/2) form z_i, rotated by e^{i m f_i}."""
    D = x.shape[-1]
    f = theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = torch.arange(x.shape[-2], dtype=torch.float64)[:, None] * f
    z = torch.complex(x[..., : D // 2], x[..., D // 2:]) * torch.polar(torch.ones_like(ang), ang)
    return torch.cat([z.real, z.imag], -1)


def ref_forward(model, toks):
    """Functional float64 forward of GPT written from the LLaMA equations."""
    cfg, P = model.cfg, {k: v.double() for k, v in model.state_dict().items()}
    norm = lambda x, w: x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.norm_eps) * w
    B, T = toks.shape
    H, Hkv, hd = cfg.n_heads, cfg.kv_heads, cfg.head_size
    h = P["tok_embeddings.weight"][toks]
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(cfg.n_layers):
        p = lambda n: P[f"layers.{i}.{n}"]
        x = norm(h, p("attention_norm.weight"))
        q = (x @ p("attention.wq.weight").T).view(B, T, H, hd).transpose(1, 2)
        k = (x @ p("attention.wk.weight").T).view(B, T, Hkv, hd).transpose(1, 2)
        v = (x @ p("attention.wv.weight").T).view(B, T, Hkv, hd).transpose(1, 2)
        q, k = ref_rope(q, cfg.rope_theta), ref_rope(k, cfg.rope_theta)
        group = torch.arange(H) // (H // Hkv)  # query head -> kv head
        s = (q @ k[:, group].transpose(-1, -2)) / math.sqrt(hd)
        a = torch.where(mask, s, -math.inf).softmax(-1) @ v[:, group]
        h = h + a.transpose(1, 2).reshape(B, T, H * hd) @ p("attention.wo.weight").T
        x = norm(h, p("ffn_norm.weight"))
        g, u = x @ p("feed_forward.w1.weight").T, x @ p("feed_forward.w3.weight").T
        h = h + (g * torch.sigmoid(g) * u) @ p("feed_forward.w2.weight").T
    return norm(h, P["norm.weight"]) @ P["output.weight"].T


# ----------------------------------------------------------------------------- model
@pytest.mark.parametrize("kw", [{}, {"n_kv_heads": 2}, {"n_kv_heads": 1, "tie_embeddings": False},
                                {"attention": "eager", "n_kv_heads": 2}])
def test_forward_matches_float64_reference(kw):
    model, x = make(**kw), tokens()
    out = model(x)
    assert out.shape == (2, 12, 67) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref_forward(model, x), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_causal_mask(backend):
    model, x = make(attention=backend), tokens()
    base = model(x)
    for t in (0, 5, 11):
        y = x.clone()
        y[:, t] = (y[:, t] + 1) % 67
        out = model(y)
        torch.testing.assert_close(out[:, :t], base[:, :t], atol=1e-6, rtol=0)
        assert (out[:, t] - base[:, t]).abs().max() > 1e-4


def test_gqa_with_all_heads_equals_mha():
    mha, gqa, x = make(seed=3), make(seed=4, n_kv_heads=4), tokens()
    gqa.load_state_dict(mha.state_dict())
    torch.testing.assert_close(gqa(x), mha(x), atol=0, rtol=0)


@pytest.mark.parametrize("kv", [1, 2])
def test_gqa_equals_mha_with_repeated_kv_weights(kv):
    """GQA == MHA whose k/v heads are copies, kv head j serving query heads j*r .. j*r+r-1."""
    gqa, mha, r, hd = make(n_kv_heads=kv), make(seed=9), 4 // kv, 8
    sd = dict(gqa.state_dict())
    for name in list(sd):
        if name.endswith(("wk.weight", "wv.weight")):
            sd[name] = sd[name].view(kv, 1, hd, 32).expand(kv, r, hd, 32).reshape(4 * hd, 32)
    mha.load_state_dict(sd)
    torch.testing.assert_close(gqa(tokens()), mha(tokens()), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kv", [None, 2, 1])
def test_sdpa_and_eager_agree(kv):
    sdpa, eager = make(n_kv_heads=kv), make(n_kv_heads=kv, attention="eager")
    eager.load_state_dict(sdpa.state_dict())
    torch.testing.assert_close(sdpa(tokens()), eager(tokens()), atol=1e-5, rtol=1e-5)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 9, 8, generator=g) for n in (4, kv or 4, kv or 4))
    for causal in (True, False):
        torch.testing.assert_close(attn_mod.sdpa_attention(q, k, v, causal), attn_mod.eager_attention(q, k, v, causal),
                                   atol=1e-5, rtol=1e-5)


def test_eager_attention_float64_closed_form():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 4, 3, dtype=torch.float64, generator=g) for _ in range(3))
    out = attn_mod.eager_attention(q, k, v, causal=True)
    for h in range(2):
        for i in range(4):
            w = [math.exp(sum(q[0, h, i, d].item() * k[0, h, j, d].item() for d in range(3)) / math.sqrt(3))
                 for j in range(i + 1)]
            expect = [sum(w[j] * v[0, h, j, d].item() for j in range(i + 1)) / sum(w) for d in range(3)]
            assert out[0, h, i].tolist() == pytest.approx(expect, rel=1e-12, abs=1e-12)


def test_unknown_backend_and_long_sequence_raise():
    with pytest.raises(ValueError, match="sdpa.*eager"):
        attn_mod.get_attention_backend("flash9")
    with pytest.raises(ValueError, match="flash9"):
        GPT(ModelConfig(**TINY, attention="flash9"))
    with pytest.raises(ValueError, match="max_seq_len"):
        make()(tokens(T=17))
    make()(tokens(T=16))  # exactly max_seq_len is fine


def test_register_backend(monkeypatch):
    monkeypatch.setattr(ModelConfig, "ATTENTION_BACKENDS", ModelConfig.ATTENTION_BACKENDS)
    monkeypatch.setattr(attn_mod, "_BACKENDS", dict(attn_mod._BACKENDS))
    calls = []
    attn_mod.register_attention_backend("mine", lambda q, k, v, causal=True: calls.append(1) or
                                        attn_mod.eager_attention(q, k, v, causal))
    ModelConfig(**TINY, attention="mine").validate()  # config validation accepts the new name
    torch.testing.assert_close(make(attention="mine")(tokens()), make()(tokens()), atol=1e-5, rtol=1e-5)
    assert len(calls) == TINY["n_layers"]


def test_tied_weights_shared():
    tied, untied = make(), make(tie_embeddings=False)
    assert tied.output.weight is tied.tok_embeddings.weight
    assert untied.output.weight is not untied.tok_embeddings.weight
    cross_entropy(tied(tokens()), tokens(seed=2)).backward()
    with torch.no_grad():
        tied.tok_embeddings.weight[3, 0] = 7.0
    assert tied.output.weight[3, 0].item() == 7.0


def test_loss_at_init_is_log_vocab():
    model = make(vocab_size=512)
    loss = cross_entropy(model(tokens(B=4, T=16, V=512)), tokens(B=4, T=16, V=512, seed=5))
    assert loss.dtype == torch.float32 and abs(loss.item() - math.log(512)) < 0.05
    logits, t = torch.randn(3, 5, 11, dtype=torch.float64), torch.randint(0, 11, (3, 5))
    expect = -(logits.log_softmax(-1).gather(-1, t[..., None])).mean()
    assert cross_entropy(logits, t).item() == pytest.approx(expect.item(), rel=1e-6)


def test_init_scaled_and_deterministic():
    cfg, std = ModelConfig(vocab_size=64, d_model=256, n_layers=8, n_heads=4, ffn_hidden=512, max_seq_len=8), 0.02
    torch.manual_seed(0)
    m = GPT(cfg)
    for name, p in m.named_parameters():
        if name.endswith(("wo.weight", "w2.weight")):
            assert p.std().item() == pytest.approx(std / math.sqrt(16), rel=0.03), name
        elif p.dim() == 2:
            assert p.std().item() == pytest.approx(std, rel=0.03), name
            assert abs(p.mean().item()) < 3e-3
        else:
            assert torch.equal(p, torch.ones_like(p)), name
    torch.manual_seed(0)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), GPT(cfg).state_dict().values()))
    small, _ = make(), torch.manual_seed(123)
    expect_next = torch.rand(1)
    torch.manual_seed(123)
    small.init_weights(seed=5)
    a = [p.clone() for p in small.parameters()]
    assert torch.equal(torch.rand(1), expect_next)  # init_weights(seed) leaves the global RNG alone
    small.init_weights(seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a, small.parameters()))
    small.init_weights(seed=6)
    assert not torch.equal(a[0], small.tok_embeddings.weight)


def test_bf16_forward_returns_fp32():
    out = make().to(torch.bfloat16)(tokens())
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


# ----------------------------------------------------------------------------- parts
def test_rmsnorm_float64_formula():
    norm = RMSNorm(10, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 7, 10) * 4
    x64, w = x.double(), norm.weight.double()
    expect = x64 / torch.sqrt((x64 ** 2).mean(-1, keepdim=True) + 1e-5) * w
    torch.testing.assert_close(norm(x).double(), expect, atol=1e-6, rtol=1e-6)
    assert "weight" in norm.state_dict() and torch.equal(RMSNorm(4).weight, torch.ones(4))


def test_rope_reference_norms_and_relative_position():
    D, T = 16, 40
    cos, sin = rope_cos_sin(T, D, 500.0, dtype=torch.float64)
    x = torch.randn(2, 3, T, D, dtype=torch.float64)
    rot = apply_rope(x, cos, sin)
    torch.testing.assert_close(rot, ref_rope(x, 500.0), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(rot.norm(dim=-1), x.norm(dim=-1), atol=1e-10, rtol=1e-10)
    q, k = torch.randn(D, dtype=torch.float64), torch.randn(D, dtype=torch.float64)
    qs = apply_rope(q.expand(T, D), cos, sin)  # q at every position
    ks = apply_rope(k.expand(T, D), cos, sin)
    scores = qs @ ks.T  # scores[m, n] = q_m . k_n
    for delta in (-7, 0, 3, 20):
        diag = torch.diagonal(scores, offset=-delta)  # entries with m - n == delta
        assert diag.std().item() < 1e-9 and diag.numel() > 1
    assert (scores[5, 0] - scores[5, 2]).abs().item() > 1e-3  # does depend on the offset
    assert not any("rope" in k or "cos" in k for k in make().state_dict())  # non-persistent
    c32, s32 = rope_cos_sin(T, D, 500.0)  # default fp32 tables: the model's
    assert c32.dtype == torch.float32 and torch.allclose(c32.double(), cos, atol=1e-7)


# ----------------------------------------------------------------------------- counts
def closed_form_params(V, d, L, H, Hkv, hd, F, tied):
    return V * d + L * (2 * d + d * (H * hd) * 2 + 2 * d * (Hkv * hd) + 3 * d * F) + d + (0 if tied else V * d)


@pytest.mark.parametrize("kw", [{}, {"tie_embeddings": False}, {"n_kv_heads": 2}, {"n_kv_heads": 1, "tie_embeddings": False}])
def test_param_count(kw):
    model = make(**kw)
    cfg = model.cfg
    unique = {id(p): p.numel() for p in model.parameters()}
    expect = closed_form_params(67, 32, 2, 4, kw.get("n_kv_heads") or 4, 8, 48, cfg.tie_embeddings)
    assert param_count(cfg) == sum(unique.values()) == expect
    non_emb = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("tok_embeddings", "output")))
    assert non_embedding_param_count(cfg) == param_count(cfg, embedding=False) == non_emb


def test_flops_per_token():
    cfg = ModelConfig(**{**TINY, "n_kv_heads": 2})
    N = 2 * (2 * 32 + 32 * 32 * 2 + 2 * 32 * 16 + 3 * 32 * 48) + 32 + 67 * 32
    assert flops_per_token(cfg, 16) == 6 * N + 12 * 2 * 32 * 16
    assert flops_per_token(cfg) == flops_per_token(cfg, cfg.max_seq_len)
    assert forward_flops_per_token(cfg, 10) * 3 == flops_per_token(cfg, 10)
