"""Growth operators against independent references.

References are never the growth code itself: the base model's own logits and per-layer residual
stream (forward hooks), the base's layers applied in layer-map order, closed forms for the
noise, and negative controls that must fail (zero-padding without rescaled gains/eps, naive
query-head tiling under GQA, exact copies that never diverge).

Tolerances: fp32 logits and loss within 1e-5 (measured worst case ~1.5e-6 on these models with
|logits| up to ~3, the same order as the base model's own fp32-vs-fp64 error); fp64 within 1e-12;
identity insertion bitwise (adding an exact zero).
"""
from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from megareuse.config import Config, ModelConfig
from megareuse.engine.checkpoint import CheckpointError, read_meta, save_checkpoint, verify_checkpoint
from megareuse.engine.weights import load_state_dict
from megareuse.model import GPT, cross_entropy, param_count
from megareuse.parallel import (gather_full_state_dict, gather_logits, init_parallel_state,
                                merge_state_dicts, parallelize_model, shard_state_dict)
from megareuse.reuse.growth import grow, grow_checkpoint, grow_width, insert_identity, stack_depth, tile

BASE = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, ffn_hidden=48, max_seq_len=16)
VARIANTS = {"mha_tied": dict(tie_embeddings=True), "mha_untied": dict(tie_embeddings=False),
            "gqa_tied": dict(n_kv_heads=2, tie_embeddings=True),
            "gqa_untied": dict(n_kv_heads=2, tie_embeddings=False)}
SEQ_LENS = (1, 5, 16)


def base_model(overrides: dict, seed: int = 0, dtype=torch.float32) -> tuple[ModelConfig, GPT]:
    """A GPT with trained-like scales: matrices 0.5 * N(0, 1/fan_in), norm gains in [0.5, 1.5)
    (non-trivial gains make the zero-padding control bite); logits come out O(1)."""
    cfg = ModelConfig(**{**BASE, **overrides})
    torch.manual_seed(seed)
    model = GPT(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]) if p.dim() == 2
                    else 0.5 + torch.rand(p.shape, generator=gen))
    return cfg, model.to(dtype).eval()


def build(cfg: ModelConfig, sd: dict, dtype=torch.float32) -> GPT:
    model = GPT(cfg).to(dtype)
    model.load_state_dict(sd)  # strict: the grown state dict has exactly GPT(cfg)'s keys and shapes
    return model.eval()


def tokens(T: int, seed: int = 1, batch: int = 3) -> torch.Tensor:
    return torch.randint(0, BASE["vocab_size"], (batch, T), generator=torch.Generator().manual_seed(seed + T))


def trace(model: GPT, toks: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(logits before the fp32 cast, residual stream after every block), via forward hooks."""
    seen: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda m, i, o: seen.append(o.detach())) for layer in model.layers]
    hooks.append(model.output.register_forward_hook(lambda m, i, o: seen.append(o.detach())))
    try:
        with torch.no_grad():
            model(toks)
    finally:
        for h in hooks:
            h.remove()
    return seen[-1], seen[:-1]


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


# --------------------------------------------------------------------------- width
@pytest.mark.parametrize("noise", [0.0, 1e-2])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_width_exact_fp32(variant, noise):
    cfg, base = base_model(VARIANTS[variant])
    for k in (2, 3) if variant == "gqa_untied" else (2,):
        wcfg, wsd = grow_width(cfg, base.state_dict(), k, noise=noise, seed=3)
        assert (wcfg.d_model, wcfg.n_heads, wcfg.kv_heads, wcfg.ffn_hidden) == \
            (k * cfg.d_model, k * cfg.n_heads, k * cfg.kv_heads, k * cfg.ffn_hidden)
        assert wcfg.head_size == cfg.head_size and wcfg.tie_embeddings is False
        wide = build(wcfg, wsd)
        for T in SEQ_LENS:
            toks = tokens(T)
            (ref, ref_h), (got, got_h) = trace(base, toks), trace(wide, toks)
            assert max_err(got, ref) <= 1e-5, (k, T)
            targets = tokens(T, seed=9)
            assert abs(cross_entropy(got, targets).item() - cross_entropy(ref, targets).item()) <= 1e-5
            for h, hw in zip(ref_h, got_h):  # wide residual stream = [h; h; ...] after every block
                assert max_err(hw, torch.cat([h] * k, dim=-1)) <= 1e-5


@pytest.mark.parametrize("noise", [0.0, 1e-2])
@pytest.mark.parametrize("variant", ["mha_tied", "gqa_untied"])
def test_width_exact_fp64(variant, noise):
    cfg, base = base_model(VARIANTS[variant], dtype=torch.float64)
    wcfg, wsd = grow_width(cfg, base.state_dict(), 2, noise=noise, seed=3)
    assert all(v.dtype == torch.float64 for v in wsd.values())
    wide = build(wcfg, wsd, torch.float64)
    for T in SEQ_LENS:
        (ref, ref_h), (got, got_h) = trace(base, tokens(T)), trace(wide, tokens(T))
        assert max_err(got, ref) <= 1e-12
        for h, hw in zip(ref_h, got_h):
            assert max_err(hw, torch.cat([h, h], dim=-1)) <= 1e-12


def test_noise_closed_form():
    """k=2: the column blocks are W/2 + N and W/2 - N; std(N) = noise x rms(W/2)."""
    w = torch.randn(200, 300, dtype=torch.float64)
    out = tile(w, 2, 2, noise=0.05, gen=torch.Generator().manual_seed(0))
    left, right = out[:, :300], out[:, 300:]
    assert max_err(left + right, w.repeat(2, 1)) <= 1e-12  # noise cancels on duplicated inputs
    n = (left - right) / 2
    assert abs(n.std().item() / (0.05 * (w / 2).pow(2).mean().sqrt().item()) - 1) < 0.02
    assert not torch.equal(n[:200], n[200:])  # row blocks draw independent noise
    assert torch.equal(tile(w, 2, 2), w.repeat(2, 2) / 2)


def _halves(key: str, t: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The two width copies of a grown weight: embedding columns, otherwise row blocks."""
    if key == "tok_embeddings.weight":
        return t[:, :cfg.d_model], t[:, cfg.d_model:]
    return t.chunk(2, dim=0)


@pytest.mark.parametrize("variant", ["gqa_tied", "mha_untied"])
def test_symmetry_broken_by_noise_only(variant):
    """One real AdamW step on the grown model: with noise the copies get different gradients and
    updates; without (negative control) they stay bitwise identical, i.e. forever."""
    cfg, base = base_model(VARIANTS[variant])
    keys = ["tok_embeddings.weight", "layers.0.feed_forward.w1.weight", "layers.1.attention.wq.weight",
            "layers.1.feed_forward.w2.weight", "layers.0.attention.wo.weight"]
    seq = tokens(17, seed=4, batch=4)
    for noise in (0.0, 1e-2):
        wcfg, wsd = grow_width(cfg, base.state_dict(), 2, noise=noise, seed=0)
        wide = build(wcfg, wsd).train()
        before = {k: v.clone() for k, v in wide.state_dict().items()}
        opt = torch.optim.AdamW(wide.parameters(), lr=1e-2, weight_decay=0.0)
        cross_entropy(wide(seq[:, :-1]), seq[:, 1:]).backward()
        grads = dict((n, p.grad.clone()) for n, p in wide.named_parameters())
        opt.step()
        after = wide.state_dict()
        for key in keys + ["norm.weight", "layers.1.ffn_norm.weight"]:
            g0, g1 = _halves(key, grads[key], cfg)
            rel = ((g0 - g1).norm() / g0.norm()).item()
            assert (rel == 0.0) if noise == 0 else (rel > 1e-3), (key, noise, rel)
        for key in keys:
            d0, d1 = _halves(key, after[key] - before[key], cfg)
            w0, w1 = _halves(key, after[key], cfg)
            if noise == 0:
                assert torch.equal(w0, w1) and torch.equal(d0, d1), key
            else:
                assert (d0 - d1).abs().max() > 1e-6, key  # the step itself moved the copies apart


def zero_pad(cfg: ModelConfig, sd: dict, rescale_gain: bool, rescale_eps: bool) -> tuple[ModelConfig, dict]:
    """Width x2 by zero-padding (MHA): new units and heads are zero. RMSNorm then sees
    mean([h; 0]^2) = mean(h^2) / 2, which needs gain x sqrt(1/2) and eps / 2 to stay exact."""
    d = cfg.d_model
    wcfg = ModelConfig(**{**cfg.__dict__, "d_model": 2 * d, "n_heads": 2 * cfg.n_heads,
                          "ffn_hidden": 2 * cfg.ffn_hidden, "tie_embeddings": False,
                          "norm_eps": cfg.norm_eps / 2 if rescale_eps else cfg.norm_eps})
    out = {}
    for key, w in sd.items():
        if key.endswith("norm.weight"):
            out[key] = torch.cat([w * (math.sqrt(0.5) if rescale_gain else 1.0), torch.zeros_like(w)])
        elif key in ("tok_embeddings.weight", "output.weight"):
            out[key] = torch.cat([w, torch.zeros_like(w)], dim=1)
        else:
            out[key] = torch.zeros(2 * w.shape[0], 2 * w.shape[1])
            out[key][:w.shape[0], :w.shape[1]] = w
    return wcfg, out


def test_zero_padding_negative_control():
    cfg, base = base_model(dict(tie_embeddings=False, norm_eps=1e-2))  # a visible eps
    toks = tokens(16)
    ref = base(toks)
    errors = {}
    for gain, eps in ((False, False), (True, False), (True, True)):
        wcfg, wsd = zero_pad(cfg, base.state_dict(), gain, eps)
        errors[gain, eps] = max_err(build(wcfg, wsd)(toks), ref)
    assert errors[True, True] <= 1e-5, errors
    assert errors[False, False] > 1e-2 and errors[True, False] > 1e-4, errors


def test_gqa_naive_head_tiling_negative_control():
    """Keeping n_kv_heads and tiling query heads naively sends copies to the wrong KV head."""
    cfg, base = base_model(VARIANTS["gqa_untied"])
    wcfg, wsd = grow_width(cfg, base.state_dict(), 2)
    naive = dict(wsd)
    for i in range(cfg.n_layers):
        for name in ("wk", "wv"):
            w = base.state_dict()[f"layers.{i}.attention.{name}.weight"]
            naive[f"layers.{i}.attention.{name}.weight"] = w.repeat(1, 2) / 2  # KV heads not copied
    ncfg = ModelConfig(**{**wcfg.__dict__, "n_kv_heads": cfg.n_kv_heads})
    toks = tokens(16)
    assert max_err(build(wcfg, wsd)(toks), base(toks)) <= 1e-5
    assert max_err(build(ncfg, naive)(toks), base(toks)) > 1e-2


# --------------------------------------------------------------------------- depth
def composed_logits(base: GPT, layer_map: list[int], toks: torch.Tensor) -> torch.Tensor:
    """Reference for stacking: the base's own modules applied in layer-map order."""
    cos, sin = base.rope(toks.shape[1])
    h = base.tok_embeddings(toks)
    for j in layer_map:
        h = base.layers[j](h, cos, sin)
    return base.output(base.norm(h))


@pytest.mark.parametrize("variant", ["mha_tied", "gqa_untied"])
@pytest.mark.parametrize("factor,layer_map,expected", [
    (2, None, [0, 1, 0, 1]), (4, None, [0, 1] * 4), (None, "0,0,1,1", [0, 0, 1, 1]),
    (None, [1, 0, 1], [1, 0, 1])])
def test_stack_layer_map_exact(variant, factor, layer_map, expected):
    cfg, base = base_model(VARIANTS[variant])
    scfg, ssd = stack_depth(cfg, base.state_dict(), factor=factor, layer_map=layer_map)
    assert scfg.n_layers == len(expected) and scfg.tie_embeddings == cfg.tie_embeddings
    bsd = base.state_dict()
    for i, j in enumerate(expected):
        for name, w in base.layers[j].state_dict().items():
            assert torch.equal(ssd[f"layers.{i}.{name}"], w), (i, j, name)
    for key in ("tok_embeddings.weight", "norm.weight", "output.weight"):
        assert torch.equal(ssd[key], bsd[key])
    toks = tokens(16)
    assert max_err(build(scfg, ssd)(toks), composed_logits(base, expected, toks)) <= 1e-6


@pytest.mark.parametrize("variant", ["mha_tied", "gqa_untied"])
@pytest.mark.parametrize("factor,layer_map,new", [(2, None, [1, 3]), (None, [0, 1, 0, 1], [2, 3]),
                                                  (3, None, [1, 2, 4, 5])])
def test_identity_insertion(variant, factor, layer_map, new):
    cfg, base = base_model(VARIANTS[variant])
    icfg, isd = insert_identity(cfg, base.state_dict(), factor=factor, layer_map=layer_map)
    model = build(icfg, isd).train()
    for T in SEQ_LENS:
        assert max_err(model(tokens(T)), base(tokens(T))) <= 1e-6
    seq = tokens(17, seed=4, batch=4)
    cross_entropy(model(seq[:, :-1]), seq[:, 1:]).backward()
    for i in new:
        block = model.layers[i]
        for proj in (block.attention.wo, block.feed_forward.w2):
            assert torch.count_nonzero(proj.weight) == 0 and proj.weight.grad.abs().max() > 1e-4
        for inner in (block.attention.wq, block.feed_forward.w1):  # non-zero weights behind a zero
            assert inner.weight.abs().min() > 0 and torch.count_nonzero(inner.weight.grad) == 0
    torch.optim.AdamW(model.parameters(), lr=1e-2).step()
    assert all(torch.count_nonzero(model.layers[i].attention.wo.weight) > 0 for i in new)  # learning


@pytest.mark.parametrize("depth_method", ["identity", "stack"])
def test_width_and_depth_together(depth_method):
    cfg, base = base_model(VARIANTS["gqa_tied"])
    gcfg, gsd = grow(cfg, base.state_dict(), width=2, depth=2, depth_method=depth_method, noise=1e-2, seed=5)
    assert (gcfg.n_layers, gcfg.d_model, gcfg.n_heads, gcfg.kv_heads) == (4, 64, 8, 4)
    toks = tokens(16)
    ref = base(toks) if depth_method == "identity" else composed_logits(base, [0, 1, 0, 1], toks)
    assert max_err(build(gcfg, gsd)(toks), ref) <= 1e-5


# --------------------------------------------------------------------------- tensor parallelism
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tp2_shards_grow_like_full(variant):
    """A checkpoint gathered from TP=2 shards grows exactly like the single-device weights."""
    cfg, base = base_model(VARIANTS[variant])
    full = base.state_dict()
    merged = merge_state_dicts([shard_state_dict(full, cfg, (2, r)) for r in range(2)], cfg, 2)
    args = dict(width=2, depth=2, depth_method="identity", noise=1e-2, seed=7)
    (c1, g1), (c2, g2) = grow(cfg, full, **args), grow(cfg, merged, **args)
    assert c1 == c2 and g1.keys() == g2.keys() and all(torch.equal(g1[k], g2[k]) for k in g1)


def _tp_rank(rank: int, tmp: str) -> None:
    torch.set_num_threads(1)  # 2-4 ranks share 2 cores
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    try:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=2,
                                timeout=timedelta(seconds=60))
        state = init_parallel_state(2)
        cfg, base = base_model(VARIANTS["gqa_tied"])
        gathered = gather_full_state_dict(parallelize_model(base, state), state)  # what a TP run saves
        gcfg, gsd = grow(cfg, gathered, width=2, depth=2, depth_method="identity", noise=1e-2, seed=7)
        grown = parallelize_model(build(gcfg, gsd), state)  # the grown model trained at TP=2
        logits = gather_logits(grown(tokens(16)).detach(), state)
        torch.save(dict(sd=gsd, logits=logits), f"{tmp}/rank{rank}.pt")
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        with open(f"{tmp}/rank{rank}.err", "w") as f:
            f.write(traceback.format_exc())
        os._exit(1)


def test_tp2_gloo_gathered_growth(tmp_path):
    ctx = mp.get_context("spawn")  # a clean child: the test process may hold a process group
    procs = [ctx.Process(target=_tp_rank, args=(r, str(tmp_path)), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and any(p.exitcode is None for p in procs):
        if any(p.exitcode not in (None, 0) for p in procs):
            break
        time.sleep(0.05)
    for p in procs:
        if p.exitcode is None:
            p.kill()
        p.join(5)
    errors = [f.read_text() for f in tmp_path.glob("rank*.err")]
    assert not errors and all(p.exitcode == 0 for p in procs), "\n".join(errors)
    cfg, base = base_model(VARIANTS["gqa_tied"])
    _, expected = grow(cfg, base.state_dict(), width=2, depth=2, depth_method="identity", noise=1e-2, seed=7)
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        assert all(torch.equal(got["sd"][k], expected[k]) for k in expected)
        assert max_err(got["logits"], base(tokens(16))) <= 1e-5


# --------------------------------------------------------------------------- checkpoints
def fake_base_checkpoint(root, variant="gqa_tied", D1=4096):
    cfg, base = base_model(VARIANTS[variant])
    full = Config(model=cfg).to_dict()
    tok = root / "src-tokenizer.model"
    tok.write_bytes(b"fake sentencepiece model")
    meta = {"stage": "base", "tokens_seen": D1, "D1": D1, "D2": 0, "config": full,
            "layout": {"tp": 2, "dp": 1, "zero_stage": 0},
            "tokenizer": {"file": "tokenizer.model", "sha256": "ab" * 32, "vocab_size": cfg.vocab_size,
                          "source": str(tok)}, "git_revision": "unknown"}
    tensors = {"model": base.state_dict(), "trainer": {"step": 16}}
    path = save_checkpoint(root / "base" / "checkpoints", 16, tensors, meta,
                           extra_files={"tokenizer.model": tok})
    return path, cfg, base


def test_grow_checkpoint_end_to_end(tmp_path):
    src, cfg, base = fake_base_checkpoint(tmp_path)
    out = grow_checkpoint(src, tmp_path / "grown" / "init", width=2, depth=2, depth_method="identity",
                          noise=1e-3, seed=1)
    assert out == tmp_path / "grown" / "init" and verify_checkpoint(out) is None
    files = sorted(p.name for p in out.iterdir())
    assert files == ["manifest.json", "meta.json", "model.safetensors", "tokenizer.model"]
    assert not list((tmp_path / "grown").glob(".tmp-*"))  # staging removed; no optimizer state carried
    meta = read_meta(out)
    gcfg = Config.from_dict(meta["config"]).model
    assert (gcfg.d_model, gcfg.n_layers, gcfg.tie_embeddings) == (64, 4, False)
    assert max_err(build(gcfg, load_state_dict(out, gcfg.tie_embeddings))(tokens(16)), base(tokens(16))) <= 1e-5
    stage = (meta["stage"], meta["tokens_seen"], meta["D1"], meta["D2"], meta["step"])
    assert stage == ("grow", 0, 4096, 0, 0)
    assert meta["params"] == param_count(gcfg) and meta["tokenizer"]["sha256"] == "ab" * 32
    g = meta["growth"]
    assert (g["base"], g["base_D1"], g["operator"], g["width_factor"], g["depth_factor"]) == \
        (str(src.resolve()), 4096, "width+identity", 2, 2)
    assert (g["layer_map"], g["noise"], g["seed"], g["untied_head"]) == ([0, 0, 1, 1], 1e-3, 1, True)
    assert g["base_params"] == param_count(cfg)
    assert (out / "tokenizer.model").read_bytes() == (src / "tokenizer.model").read_bytes()
    before = json.dumps(sorted(p.name for p in out.iterdir()))
    with pytest.raises(FileExistsError, match="already exists"):
        grow_checkpoint(src, out, depth=2)
    assert json.dumps(sorted(p.name for p in out.iterdir())) == before


def test_bad_inputs_write_nothing(tmp_path):
    src, cfg, base = fake_base_checkpoint(tmp_path)
    out = tmp_path / "new" / "init"
    bad = [(dict(width=1.414), "width=1.414: accepted a positive integer"),
           (dict(width=0), "width=0"), (dict(depth="two"), "depth='two'"),
           (dict(depth=2, layer_map="0,5"), r"indices in \[0, 1\]"),
           (dict(layer_map="0,x"), "layer_map='0,x'"),
           (dict(depth=2, layer_map=[0, 1, 0]), "depth=2 needs 4"),
           (dict(depth=2, depth_method="grow"), "depth_method='grow'"),
           (dict(layer_map=[1, 0, 0, 1], depth_method="identity"), "first occurrences"),
           (dict(width=2, noise=-1.0), "noise=-1.0"),
           (dict(depth=2, noise=0.1), "noise=0.1: accepted 0 when width=1"),
           (dict(), "change nothing"), (dict(width=2, seed=-1), "seed=-1")]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message) as info:
            grow_checkpoint(src, out, **kwargs)
        assert "\n" not in str(info.value)
    (src / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="not usable"):
        grow_checkpoint(src, out, width=2)
    assert not (tmp_path / "new").exists()
    with pytest.raises(ValueError, match="does not fit the model config"):
        grow_width(ModelConfig(**{**BASE, "n_layers": 3}), base.state_dict(), 2)
    with pytest.raises(ValueError, match=r"tok_embeddings.weight has shape \(64, 32\)"):
        grow_width(ModelConfig(**{**BASE, "d_model": 64}), base.state_dict(), 2)
