"""Tensor parallelism against single-device math.

Two multi-process jobs (2 and 4 gloo ranks on CPU, spawned, each bounded in time) run every
distributed check inside one process group and save their results to files; the parent process
computes the single-device references (a plain GPT built from the same seed, torch's
F.cross_entropy) and asserts. Nothing is compared against its own code path.

Tolerance: fp32 with rtol = 1e-5 and atol = 1e-5 x (largest magnitude of the reference tensor).
TP changes only the summation order (row-parallel partial products, the embedding and
vocab-parallel cross-entropy sums are added across ranks, gradients of replicated inputs are
all-reduced), which moves results by a few fp32 ulps of the intermediate values: measured worst
cases are ~2.5e-7 (logits) and ~7e-7 (gradients) of the tensor's largest entry. The atol term is
needed for gradient entries that cancel to near zero, where a purely relative bound means
nothing; a real sharding bug gives errors of order 1. Weight shards, state-dict round trips and
the gradients of replicated norm weights across TP ranks must match exactly.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megareuse.config import ModelConfig
from megareuse.model import GPT, cross_entropy
from megareuse.parallel import (MPU, ColumnParallelLinear, ParallelState, check_tp_compatible,
                                clip_grad_norm_, gather_full_state_dict, gather_logits, init_parallel_state,
                                loss_fn, merge_state_dicts, model_parallel_seed, parallelize_model,
                                shard_state_dict, vocab_parallel_cross_entropy)

JOB_TIMEOUT_S = 120
BASE = dict(vocab_size=64, d_model=32, n_layers=2, ffn_hidden=48, max_seq_len=16)
# name -> (config overrides, tp); the first three run in the 2-rank job, the rest in the 4-rank one
CASES = {
    "tp2_mha_tied": (dict(n_heads=4, tie_embeddings=True), 2),
    "tp2_gqa_split_untied": (dict(n_heads=4, n_kv_heads=2, tie_embeddings=False), 2),
    "tp2_gqa_replicated_tied": (dict(n_heads=4, n_kv_heads=1, tie_embeddings=True), 2),
    "tp4_mha_untied": (dict(n_heads=4, tie_embeddings=False), 4),
    "tp4_gqa_split_tied": (dict(d_model=64, n_heads=8, n_kv_heads=4, tie_embeddings=True), 4),
    "tp4_gqa_replicated_untied": (dict(d_model=64, n_heads=8, n_kv_heads=2, tie_embeddings=False), 4),
    "tp2xdp2_gqa_replicated_tied": (dict(n_heads=4, n_kv_heads=1, tie_embeddings=True), 2),
    # the reused families' features: q/k/v biases (Qwen2), per-head q/k norms and an explicit
    # head_dim != d_model / n_heads (Qwen3), llama3 RoPE scaling (Llama 3.1)
    "tp2_features_split": (dict(n_heads=4, n_kv_heads=2, head_dim=16, qkv_bias=True, qk_norm=True,
                                rope_scaling="llama3", rope_factor=8.0, rope_original_max_seq_len=8,
                                tie_embeddings=True), 2),
    "tp4_features_replicated": (dict(n_heads=4, n_kv_heads=2, head_dim=4, qkv_bias=True, qk_norm=True,
                                     rope_scaling="linear", rope_factor=2.0, tie_embeddings=False), 4),
}
JOBS = {2: ["tp2_mha_tied", "tp2_gqa_split_untied", "tp2_gqa_replicated_tied", "tp2_features_split"],
        4: ["tp4_mha_untied", "tp4_gqa_split_tied", "tp4_gqa_replicated_untied",
            "tp2xdp2_gqa_replicated_tied", "tp4_features_replicated"]}


def cfg_of(name: str) -> ModelConfig:
    return ModelConfig(**{**BASE, **CASES[name][0]})


def seeded_model(cfg: ModelConfig, seed: int) -> GPT:
    """GPT(cfg) from ``seed``; biases and per-head norm gains drawn too (they start at 0 and 1,
    which would hide a wrong cut of them). Models with those features run in float64: the
    per-head norms make some gradients tiny, below fp32's reduction-order noise at 1e-5."""
    torch.manual_seed(seed)
    model = GPT(cfg)
    if cfg.qk_norm or cfg.qkv_bias:
        model.double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") or name.endswith("q_norm.weight") or name.endswith("k_norm.weight"):
                p.add_(torch.randn_like(p) * 0.5)
    return model


def batch(cfg: ModelConfig, seed: int):
    gen = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, cfg.vocab_size, (2, cfg.max_seq_len + 1), generator=gen)
    return seq[:, :-1], seq[:, 1:]


def ce_inputs(seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 7, 64, generator=g) * 4 + 1000.0  # large offset: stability
    targets = torch.randint(0, 64, (3, 7), generator=g)
    targets[0, :3] = -100
    weights = torch.rand(3, 7, generator=g)
    return logits, targets, weights


def assert_close(actual, expected, what):
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * max(scale, 1e-12),
                               msg=lambda m: f"{what}: {m}")


# --------------------------------------------------------------------------- inside the ranks
def rank_case(name: str, state: ParallelState, seed: int = 11) -> dict:
    """Build the full GPT from ``seed``, parallelize, one forward/backward; report everything."""
    cfg = cfg_of(name)
    model = seeded_model(cfg, seed)
    full_sd = {k: v.clone() for k, v in model.state_dict().items()}
    parallelize_model(model, state)
    tokens, targets = batch(cfg, 100 + state.dp_rank)
    logits = model(tokens)
    loss = loss_fn(logits, targets, state)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    local_sd, expected = model.state_dict(), shard_state_dict(full_sd, cfg, state)
    out = dict(
        logits=gather_logits(logits.detach(), state), loss=loss.item(),
        grads=gather_full_state_dict(model, state, grads), weights=gather_full_state_dict(model, state),
        shards_exact=local_sd.keys() == expected.keys()
        and all(torch.equal(local_sd[k], expected[k]) for k in expected),
        local_shapes={k: tuple(v.shape) for k, v in local_sd.items()},
        norm_grads={n: g.clone() for n, g in grads.items() if n.endswith("norm.weight")},
        tied=model.output.weight is model.tok_embeddings.weight,
        grad_norm=clip_grad_norm_(model.parameters(), 0.0, state).item(),
    )
    torch.manual_seed(seed + 1)  # different weights, then the full checkpoint loaded at this TP degree
    other = parallelize_model(GPT(cfg), state)
    other.load_state_dict(shard_state_dict(full_sd, cfg, state))
    out["reloaded_logits"] = gather_logits(other(tokens).detach(), state)
    return out


def rank_cross_entropy(state: ParallelState) -> dict:
    logits, targets, weights = ce_inputs()
    local = logits.chunk(state.tp_size, dim=-1)[state.tp_rank].clone().requires_grad_()
    per_token = vocab_parallel_cross_entropy(local, targets, state)
    (per_token * weights).sum().backward()
    local_mean = local.detach().clone().requires_grad_()
    mean = vocab_parallel_cross_entropy(local_mean, targets, state, reduction="mean")
    mean.backward()
    return dict(per_token=per_token.detach(), grad=gather_logits(local.grad, state),
                mean=mean.item(), mean_grad=gather_logits(local_mean.grad, state))


def rank_rng(state: ParallelState) -> dict:
    model_parallel_seed(1234, state)
    layer = ColumnParallelLinear(8, 4 * state.tp_size, state)  # shard drawn under the TP fork
    after_init = torch.rand(4)  # default stream: must be untouched by the fork
    torch.manual_seed(1234)
    control = torch.rand(4)
    return dict(shard=layer.weight.detach().clone(), default_after=after_init, control=control)


def rank_layout(state: ParallelState) -> dict:
    mpu = MPU(state)
    return dict(tp_ranks=state.tp_ranks, dp_ranks=state.dp_ranks,
                mpu=(mpu.get_model_parallel_rank(), mpu.get_model_parallel_world_size(),
                     mpu.get_tensor_model_parallel_rank(), mpu.get_tensor_model_parallel_world_size(),
                     mpu.get_tensor_model_parallel_src_rank(), mpu.get_data_parallel_rank(),
                     mpu.get_data_parallel_world_size(), tuple(mpu.get_data_parallel_group_ranks()),
                     mpu.get_pipeline_model_parallel_world_size(),
                     dist.get_world_size(mpu.get_model_parallel_group()),
                     dist.get_world_size(mpu.get_data_parallel_group())))


def rank_job(world: int) -> dict:
    result = {}
    try:
        init_parallel_state(3)
    except ValueError as exc:
        result["bad_tp_error"] = str(exc)
    full_tp = init_parallel_state(world)
    result["layout"] = rank_layout(full_tp)
    result["ce"] = rank_cross_entropy(full_tp)
    result["rng"] = rank_rng(full_tp)
    for name in JOBS[world]:
        tp = CASES[name][1]
        state = full_tp if tp == world else init_parallel_state(tp)
        if tp != world:
            result["layout_tp2"] = rank_layout(state)
        result[name] = rank_case(name, state)
    return result


def rank_main(rank: int, world: int, tmp: str) -> None:
    torch.set_num_threads(1)  # 2-4 ranks share 2 cores
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    try:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world,
                                timeout=timedelta(seconds=60))
        result = rank_job(world)
        dist.barrier()
        torch.save(result, f"{tmp}/rank{rank}.pt")
        dist.destroy_process_group()
    except BaseException:
        with open(f"{tmp}/rank{rank}.err", "w") as f:
            f.write(traceback.format_exc())
        os._exit(1)


def run_job(world: int, tmp) -> list[dict]:
    """Fork ``world`` ranks, wait (bounded), kill stragglers, return each rank's results."""
    ctx = mp.get_context("spawn")  # a clean child: the test process may hold a process group
    procs = [ctx.Process(target=rank_main, args=(r, world, str(tmp)), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline and any(p.exitcode is None for p in procs):
        if any(p.exitcode not in (None, 0) for p in procs):
            break  # one rank failed: the others would wait for it until the gloo timeout
        time.sleep(0.05)
    timed_out = any(p.exitcode is None for p in procs)
    for p in procs:
        if p.exitcode is None:
            p.kill()
        p.join(5)
    errors = [(tmp / f"rank{r}.err").read_text() for r in range(world) if (tmp / f"rank{r}.err").exists()]
    if errors or timed_out or any(p.exitcode != 0 for p in procs):
        raise AssertionError(f"{world}-rank job failed (timed out: {timed_out}, exit codes "
                             f"{[p.exitcode for p in procs]}):\n" + "\n".join(errors))
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    return {world: run_job(world, tmp_path_factory.mktemp(f"tp{world}")) for world in (2, 4)}


# --------------------------------------------------------------------------- references
def reference(name: str, dp_rank: int = 0, seed: int = 11) -> dict:
    cfg = cfg_of(name)
    model = seeded_model(cfg, seed)
    tokens, targets = batch(cfg, 100 + dp_rank)
    logits = model(tokens)
    loss = cross_entropy(logits, targets)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    norm = torch.sqrt(sum(g.pow(2).sum() for g in grads.values()))
    return dict(logits=logits.detach(), loss=loss.item(), grads=grads, weights=model.state_dict(),
                grad_norm=norm.item())


# --------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", list(CASES))
def test_matches_single_device(jobs, name):
    tp = CASES[name][1]
    world = 2 if name in JOBS[2] else 4
    for rank, res in enumerate(jobs[world]):
        got, ref = res[name], reference(name, dp_rank=rank // tp)
        assert_close(got["logits"], ref["logits"], f"{name} rank {rank} logits")
        assert_close(got["reloaded_logits"], ref["logits"],
                     f"{name} rank {rank} logits after loading the full checkpoint")
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5)
        assert got["grads"].keys() == ref["grads"].keys()
        for key, grad in ref["grads"].items():
            assert_close(got["grads"][key], grad, f"{name} rank {rank} grad {key}")
        assert got["weights"].keys() == ref["weights"].keys()
        assert all(torch.equal(got["weights"][k], v) for k, v in ref["weights"].items())
        assert got["shards_exact"]
        assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)
        assert got["tied"] == cfg_of(name).tie_embeddings
        cfg = cfg_of(name)
        assert got["local_shapes"]["output.weight"] == (cfg.vocab_size // tp, cfg.d_model)
        assert got["local_shapes"]["layers.0.attention.wq.weight"] == (cfg.n_heads * cfg.head_size // tp, cfg.d_model)
        if cfg.qkv_bias:
            assert got["local_shapes"]["layers.0.attention.wq.bias"] == (cfg.n_heads * cfg.head_size // tp,)
        if cfg.qk_norm:
            assert got["local_shapes"]["layers.0.attention.k_norm.weight"] == (cfg.head_size,)


@pytest.mark.parametrize("name", list(CASES))
def test_replicated_norm_grads_identical_across_tp(jobs, name):
    tp = CASES[name][1]
    results = jobs[2 if name in JOBS[2] else 4]
    for base in range(0, len(results), tp):
        first = results[base][name]["norm_grads"]
        per_layer = 4 if cfg_of(name).qk_norm else 2  # + q_norm, k_norm: summed over the TP group
        assert first and len(first) == per_layer * cfg_of(name).n_layers + 1
        for res in results[base + 1: base + tp]:
            for key, grad in first.items():
                assert torch.equal(res[name]["norm_grads"][key], grad), key


@pytest.mark.parametrize("world", [2, 4])
def test_vocab_parallel_cross_entropy_matches_torch(jobs, world):
    logits, targets, weights = ce_inputs()
    full = logits.clone().requires_grad_()
    ref = F.cross_entropy(full.reshape(-1, 64), targets.reshape(-1), reduction="none").reshape(3, 7)
    (ref * weights).sum().backward()
    full_mean = logits.clone().requires_grad_()
    ref_mean = F.cross_entropy(full_mean.reshape(-1, 64), targets.reshape(-1))
    ref_mean.backward()
    for res in jobs[world]:
        ce = res["ce"]
        assert_close(ce["per_token"], ref.detach(), "per-token loss")
        assert_close(ce["grad"], full.grad, "gradient")
        assert ce["mean"] == pytest.approx(ref_mean.item(), rel=1e-5)
        assert_close(ce["mean_grad"], full_mean.grad, "mean gradient")


@pytest.mark.parametrize("world", [2, 4])
def test_layout_mpu_and_errors(jobs, world):
    for rank, res in enumerate(jobs[world]):
        assert "tp=3" in res["bad_tp_error"] and f"world size {world}" in res["bad_tp_error"]
        lay = res["layout"]
        assert lay["tp_ranks"] == tuple(range(world)) and lay["dp_ranks"] == (rank,)
        assert lay["mpu"] == (rank, world, rank, world, 0, 0, 1, (rank,), 1, world, 1)
    if world == 4:  # TP=2 x DP=2: contiguous TP groups, strided DP groups
        for rank, res in enumerate(jobs[4]):
            lay, tp_rank, dp_rank = res["layout_tp2"], rank % 2, rank // 2
            assert lay["tp_ranks"] == (2 * dp_rank, 2 * dp_rank + 1)
            assert lay["dp_ranks"] == (tp_rank, tp_rank + 2)
            dp_peers = (tp_rank, tp_rank + 2)
            assert lay["mpu"] == (tp_rank, 2, tp_rank, 2, 2 * dp_rank, dp_rank, 2, dp_peers, 1, 2, 2)


@pytest.mark.parametrize("world", [2, 4])
def test_rng_tracker(jobs, world):
    results = jobs[world]
    shards = [res["rng"]["shard"] for res in results]
    assert all(not torch.equal(shards[0], s) for s in shards[1:])  # TP ranks draw different shards
    for res in results:  # the default stream is the same on every rank and untouched by fork()
        assert torch.equal(res["rng"]["default_after"], res["rng"]["control"])


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_shard_merge_round_trip(name, tp):
    cfg = cfg_of(name)
    torch.manual_seed(3)
    full = GPT(cfg).state_dict()
    shards = [shard_state_dict(full, cfg, (tp, r)) for r in range(tp)]
    assert all(s.keys() == full.keys() for s in shards)
    merged = merge_state_dicts(shards, cfg, tp)
    assert merged.keys() == full.keys()
    assert all(torch.equal(merged[k], v) for k, v in full.items())
    if cfg.tie_embeddings:
        assert merged["output.weight"] is merged["tok_embeddings.weight"]
    # at tp > n_kv_heads, consecutive ranks hold the same KV head's rows
    kv, hd = cfg.kv_heads, cfg.head_size
    for r in range(tp):
        head = r // (tp // kv) if tp > kv else None
        if head is not None:
            assert torch.equal(shards[r]["layers.0.attention.wk.weight"],
                               full["layers.0.attention.wk.weight"][head * hd:(head + 1) * hd])


def _fake_state(tp: int) -> ParallelState:
    return ParallelState(tp_size=tp, dp_size=1, tp_rank=0, dp_rank=0, rank=0, world_size=tp)


@pytest.mark.parametrize("overrides, tp, words", [
    (dict(d_model=48, n_heads=6), 4, ["n_heads=6", "tp=4"]),
    (dict(vocab_size=66, n_heads=4), 4, ["vocab_size=66", "tp=4"]),
    (dict(n_heads=4, ffn_hidden=50), 4, ["ffn_hidden=50", "tp=4"]),
    (dict(d_model=48, n_heads=12, n_kv_heads=3), 4, ["n_kv_heads=3", "tp=4", "dividing"]),
])
def test_incompatible_config_errors(overrides, tp, words):
    cfg = ModelConfig(**{**BASE, **overrides})
    cfg.validate()
    with pytest.raises(ValueError) as err:
        parallelize_model(GPT(cfg), _fake_state(tp))  # fails before any collective
    assert all(w in str(err.value) for w in words) and "\n" not in str(err.value)
    with pytest.raises(ValueError):
        check_tp_compatible(cfg, tp)


@pytest.mark.parametrize("max_norm", [0.05, 1e6, 0.0, float("inf")])
def test_clip_grad_norm_single_device_matches_torch(max_norm):
    """At tp = 1 the foreach norm and clip equal torch.nn.utils.clip_grad_norm_ computed in float64
    (max_norm 0 or inf: the norm only, gradients untouched)."""
    torch.manual_seed(0)
    cfg = ModelConfig(**{**BASE, "n_heads": 4})
    model = GPT(cfg)
    model(*batch(cfg, 1)).backward()
    params = [p for p in model.parameters() if p.grad is not None]
    before = [p.grad.detach().double().clone() for p in params]
    want = torch.linalg.vector_norm(torch.stack([g.norm() for g in before]))
    single = ParallelState(tp_size=1, dp_size=1, tp_rank=0, dp_rank=0, rank=0, world_size=1)
    got = clip_grad_norm_(model.parameters(), max_norm, single)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    scale = min(1.0, max_norm / (want.item() + 1e-6)) if 0 < max_norm < float("inf") else 1.0
    for p, g in zip(params, before):
        torch.testing.assert_close(p.grad.double(), g * scale, rtol=1e-6, atol=1e-12)
    if scale < 1:  # clipped: the new norm is max_norm
        assert torch.linalg.vector_norm(torch.stack([p.grad.double().norm() for p in params])).item() == \
            pytest.approx(max_norm, rel=1e-5)
