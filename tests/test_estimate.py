"""`megareuse estimate` against hand counts, against what PyTorch saves for backward, and against
what the DeepSpeed engine actually allocates on CPU (one process, and two ranks TP=2 / DP=2).

Allocation is measured as the set of live tensor storages (gc), new since before the model was
built: parameters = the module's parameter storages; gradients = what backward added; optimizer
= what the engine holds beyond the parameters (fp32 master copies) plus what the step added
(exp_avg, exp_avg_sq, the 4-byte ``step`` scalars). These must equal the estimate to the byte
(ZeRO: plus the optimizer's 4-byte gradient-norm tensor);
the ZeRO-2 gradient partition may exceed it by the part of the one parameter straddling the
partition boundary (DeepSpeed keeps whole tensors), bounded here by 1%. Activations are the
bytes of the unique storages autograd saves (saved-tensor hooks), which must equal the estimate
up to the token ids (16 b (s + 1) + 64 bytes: the batch and a contiguous copy of the targets; at
TP=2, the vocab-parallel loss's int64 targets and masks).
"""
import gc
import json
import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from megareuse.config import Config  # noqa: E402
from megareuse.engine.estimate import LOGIT_COPIES, estimate, estimate_all_stages, format_estimate, \
    rank_tensors  # noqa: E402

# vocab 64, d 8, 2 layers, 2 heads of 4, one KV head, SwiGLU 16, tied: counted by hand below
HAND = dict(vocab_size=64, d_model=8, n_layers=2, n_heads=2, n_kv_heads=1, ffn_hidden=16, max_seq_len=16)
# the ZeRO optimizer also keeps its global gradient norm as a 4-byte fp32 tensor (not estimated)
GRAD_NORM_SCALAR = 4
SMALL = dict(vocab_size=512, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=32)


def make_cfg(model, **sections) -> Config:
    raw = {"model": model, "data": {"seq_len": model["max_seq_len"]}, "run": {"micro_batch_size": 4}}
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    return Config.from_dict(raw).validate()


# --------------------------------------------------------------------------- (1) closed form
def test_hand_counted_model_states():
    # tp=1: embedding 64*8 = 512; per layer wq 64 + wk 32 + wv 32 + wo 64 + w1 128 + w3 128 + w2 128
    # + two norms 16 = 592; 2 layers + final norm 8: 512 + 1184 + 8 = 1704 (20 tensors, 40 in norms)
    # tp=2: embedding 256; per layer wq 32, wk 32 and wv 32 (the single KV head replicated), wo 32,
    # w1 64, w3 64, w2 64, norms 16 = 336; 256 + 672 + 8 = 936 (896 in matrices, 40 in norms)
    assert sum(t[1] for t in rank_tensors(make_cfg(HAND).model, 1)) == 1704
    assert sum(t[1] for t in rank_tensors(make_cfg(HAND).model, 2)) == 936
    fp32 = {"run": {"dtype": "fp32"}}
    cases = [  # (tp, world, stage, dtype, params, grads, optimizer) in bytes
        (1, 1, 0, "fp32", 4 * 1704, 4 * 1704, 8 * 1704 + 4 * 20),
        (1, 2, 0, "bf16", 2 * 1704, 2 * 1704, (4 + 8) * 1704 + 4 * 20),
        (2, 4, 0, "fp32", 4 * 936, 4 * 936, 8 * 936 + 4 * 20),
        (2, 4, 1, "fp32", 4 * 936, 4 * 936, 12 * 468 + 4 * 2),  # groups 896 and 40, both / DP=2
        (2, 4, 2, "bf16", 2 * 936, 2 * 468, 12 * 468 + 4 * 2),
        # DP=3 pads each group to a multiple of 2*3: 1664 -> 1668, 40 -> 42; partition 1710/3 = 570
        (1, 3, 1, "fp32", 4 * 1710, 4 * 1704, 12 * 570 + 4 * 2),
        (1, 3, 2, "fp32", 4 * 1710, 4 * 570, 12 * 570 + 4 * 2),
    ]
    for tp, world, stage, dtype, params, grads, optimizer in cases:
        cfg = make_cfg(HAND, parallel={"tp": tp, "zero_stage": stage}, run={"dtype": dtype})
        est = estimate(cfg, world)
        assert (est.params, est.grads, est.optimizer) == (params, grads, optimizer), (tp, world, stage, dtype)
    # ZeRO-3, DP=2, the generated buckets (reduce bucket capped at the rank's parameters, 1704 / 2 =
    # 852; prefetch one layer, 296; persistence threshold 80): every tensor but the 256-element embedding shard is kept whole besides its
    # partition (sum of ceil(n/2) = 468; whole: 936 - 256 = 680); the embedding is gathered for
    # use (256, the largest sharded unit, within 256 + prefetch)
    est = estimate(make_cfg(HAND, parallel={"tp": 2, "zero_stage": 3}, **fp32), 4)
    assert (est.params, est.grads, est.optimizer) == (4 * (468 + 680), 4 * 468, 12 * 468 + 8)
    assert est.buffers == 4 * 852 + 4 * 256 and est.step_transient == 0
    # the embedding's backward on gloo (a CPU config): its gradient, DeepSpeed's flat reduce input,
    # reduce_scatter_tensor's full copy and its output half; NCCL: the first two only
    assert est.comm_transient == int((2 + 1 + 1 / 2) * 4 * 256)
    nccl = estimate(make_cfg(HAND, parallel={"tp": 2, "zero_stage": 3, "backend": "nccl"}, **fp32), 4)
    assert nccl.comm_transient == 2 * 4 * 256
    # ZeRO-2 at DP=3: the step's all-gather of the larger padded group (1668) copied once by gloo
    z2 = estimate(make_cfg(HAND, parallel={"tp": 1, "zero_stage": 2}, **fp32), 3)
    assert z2.comm_transient == 4 * 1668
    assert estimate(make_cfg(HAND, parallel={"tp": 1, "zero_stage": 2, "backend": "nccl"}, **fp32), 3).comm_transient == 0


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_rank_tensors_match_the_shards_with_features(tp):
    from megareuse.model import GPT
    from megareuse.parallel.tensor_parallel import shard_state_dict

    model = {**SMALL, **FEATURES, "n_heads": 4, "n_kv_heads": 2, "tie_embeddings": False}
    cfg = make_cfg(model).model
    full = GPT(cfg).state_dict()
    shard = shard_state_dict(full, cfg, (tp, tp - 1))
    assert {name: numel for name, numel, _ in rank_tensors(cfg, tp)} == {k: v.numel() for k, v in shard.items()}


def test_zero3_reads_ds_config_and_tables(tmp_path):
    ds = tmp_path / "z3.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3, "reduce_bucket_size": 1000,
                                                    "stage3_param_persistence_threshold": 0,
                                                    "stage3_prefetch_bucket_size": 10}}))
    cfg = make_cfg(HAND, parallel={"tp": 1, "zero_stage": 3, "ds_config": str(ds)}, run={"dtype": "bf16"})
    est = estimate(cfg, 2)
    # parts: 512/2 + 2 * (32 + 16 + 16 + 32 + 64 * 3 + 4 + 4) + 4 = 852; largest gathered unit:
    # a layer's 592 parameters (norms included: threshold 0) + prefetch 10
    assert (est.params, est.grads, est.optimizer) == (2 * 852, 2 * 852, 12 * 852 + 8)
    assert est.buffers == 2 * 1000 + 2 * 602 and est.step_transient == 4 * 852
    text = format_estimate(est, gpu_memory_gib=0.001)
    assert "ZeRO-3" in text and "NO" in text and "largest micro-batch 0" in text
    table = estimate_all_stages(cfg, 2, gpu_memory_gib=80)
    assert table.count("yes") == 8 and "| ZeRO-0 | ZeRO-1 | ZeRO-2 | ZeRO-3 |" in table
    # TinyLlama-1.1B at TP=2 x DP=4: the shipped config's count, FLOPs = 6N + attention per token
    big = Config.from_dict({"model": yaml_model("llama_1b"), "data": {"seq_len": 2048},
                            "run": {"dtype": "bf16", "micro_batch_size": 4, "train_tokens": 10**9},
                            "parallel": {"tp": 2, "zero_stage": 1}}).validate()
    est = estimate(big, 8)
    assert est.n_params == 1_100_048_384 and est.tokens_per_step == 4 * 2048 * 4
    assert est.flops_per_step == (6 * (968_976_384 + 32000 * 2048) + 12 * 22 * 2048 * 2048) * 32768
    assert est.params == 2 * est.params_per_rank and est.optimizer == 12 * -(-est.params_per_rank // 4) + 8


def yaml_model(name):
    import yaml
    return yaml.safe_load((REPO / "configs" / "model" / f"{name}.yaml").read_text())["model"]


# --------------------------------------------------------------------------- activations
def saved_bytes(fn, exclude):
    """Bytes of the unique storages autograd saves while running fn (minus ``exclude``)."""
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in exclude:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


# the reused families' features: q/k/v biases, per-head q/k norms, an explicit head_dim, RoPE scaling
FEATURES = {"qkv_bias": True, "qk_norm": True, "head_dim": 16, "rope_scaling": "linear", "rope_factor": 2.0}


@pytest.mark.parametrize("dtype,attention,features", [("fp32", "sdpa", {}), ("bf16", "sdpa", {}), ("bf16", "eager", {}),
                                                      ("fp32", "sdpa", FEATURES), ("bf16", "eager", FEATURES)])
def test_activations_match_saved_tensors(dtype, attention, features):
    from torch.utils.checkpoint import checkpoint

    from megareuse.model.gpt import GPT, cross_entropy
    cfg = make_cfg({**SMALL, "attention": attention, **features}, run={"dtype": dtype, "micro_batch_size": 3})
    est = estimate(cfg, 1)
    torch.manual_seed(0)
    model = GPT(cfg.model).to(torch.bfloat16 if dtype == "bf16" else torch.float32)
    exclude = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    b, s = 3, cfg.data.seq_len
    tokens = torch.randint(0, cfg.model.vocab_size, (b, s + 1))
    slack = 16 * b * (s + 1) + 64  # token ids: the batch and a contiguous copy of the targets
    got = saved_bytes(lambda: cross_entropy(model(tokens[:, :-1]), tokens[:, 1:]), exclude)
    assert 0 <= got - (est.activations_no_ckpt + est.logits) <= slack, (got, est)

    def checkpointed():  # GPT.forward with every block recomputed in backward
        cos, sin = model.rope(s)
        h = model.tok_embeddings(tokens[:, :-1])
        for layer in model.layers:
            h = checkpoint(layer, h, cos, sin, use_reentrant=True)
        return cross_entropy(model.output(model.norm(h)).float(), tokens[:, 1:])

    got = saved_bytes(checkpointed, exclude)  # + one layer while it is recomputed
    want = est.activations_ckpt - est.activations_per_layer + est.logits
    assert 0 <= got - want <= slack, (got, want)
    assert est.total == est.model_states + est.buffers + est.activations_no_ckpt + LOGIT_COPIES * est.logits


# --------------------------------------------------------------------------- (2) the real engine
def _live() -> dict:
    gc.collect()
    out = {}
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and not obj.is_meta:
                storage = obj.untyped_storage()
                out[storage.data_ptr()] = storage.nbytes()
        except Exception:  # tensors without storage (sparse, wrappers)
            continue
    out.pop(0, None)
    return out


def measure_engine(cfg: Config, state) -> dict:
    """Build the trainer's engine for cfg, take one step, return bytes by kind (module doc)."""
    import deepspeed

    from megareuse.engine.ds import deepspeed_config
    from megareuse.model.gpt import GPT
    from megareuse.parallel.state import MPU
    from megareuse.parallel.tensor_parallel import loss_fn, parallelize_model
    before = _live()
    torch.manual_seed(0)
    model = GPT(cfg.model)
    if state.tp_size > 1:
        parallelize_model(model, state)
    groups = [{"params": [p for p in model.parameters() if p.dim() >= 2]},
              {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(groups, lr=1e-3, fused=True),
                                      mpu=MPU(state), config=deepspeed_config(cfg, state.dp_size))
    built = {k: v for k, v in _live().items() if k not in before}
    params = {p.untyped_storage().data_ptr() for p in engine.module.parameters()}
    buffers = {t.untyped_storage().data_ptr() for t in engine.module.buffers()}
    tokens = torch.randint(0, cfg.model.vocab_size, (cfg.run.micro_batch_size, cfg.data.seq_len + 1))
    loss = loss_fn(engine(tokens[:, :-1]), tokens[:, 1:], state)
    engine.backward(loss)
    mine = {tokens.untyped_storage().data_ptr(), loss.untyped_storage().data_ptr()}
    after_backward = {k: v for k, v in _live().items() if k not in before and k not in built and k not in mine}
    engine.step()
    after_step = {k: v for k, v in _live().items() if k not in before and k not in built and k not in mine}
    held = sum(v for k, v in built.items() if k not in params and k not in buffers)
    result = {"params": sum(built[k] for k in params), "grads": sum(after_backward.values()),
              "optimizer": held + sum(after_step.values())}
    del engine, model, loss
    gc.collect()
    return result


@pytest.fixture(scope="module")
def single_process():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from megareuse.engine.ds import init_distributed
    from megareuse.parallel.launch import discover
    from megareuse.parallel.state import init_parallel_state
    init_distributed(discover(), "gloo", 60)
    return init_parallel_state(1)


@pytest.mark.parametrize("stage,dtype", [(0, "fp32"), (0, "bf16"), (1, "fp32"), (2, "bf16")])
def test_engine_allocations_match_estimate(single_process, stage, dtype):
    cfg = make_cfg(SMALL, parallel={"zero_stage": stage}, run={"dtype": dtype})
    est = estimate(cfg, 1)
    got = measure_engine(cfg, single_process)
    assert (got["params"], got["grads"]) == (est.params, est.grads), (got, est)
    assert got["optimizer"] - est.optimizer == GRAD_NORM_SCALAR * (stage > 0), (got, est)


# --------------------------------------------------------------------------- (3) two ranks
def test_two_ranks_tp2_and_dp2_zero2(tmp_path):
    from distributed_utils import base_env, run_job
    from megareuse.parallel.launch import free_port
    out = tmp_path / "measured.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           __file__, "--worker", str(out)]
    proc = run_job(cmd, base_env(), timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:]
    measured = json.loads(out.read_text())
    for case, (cfg, world) in worker_cases().items():
        est = estimate(cfg, world)
        for rank in ("0", "1"):
            got = measured[case][rank]
            assert got["params"] == est.params, (case, rank, got, est)
            assert got["optimizer"] - est.optimizer == GRAD_NORM_SCALAR, (case, rank, got, est)
            assert 0 <= got["grads"] - est.grads <= 0.01 * est.grads, (case, rank, got, est)
            if "saved" in got:  # TP activations: replicated norms, sharded heads / FFN / vocabulary
                want = est.activations_no_ckpt + est.logits
                # token ids: the batch 8 b (s + 1), the vocab-parallel loss's int64 targets and two masks 10 b s
                slack = 8 * 4 * 33 + 10 * 4 * 32 + 128
                assert 0 <= got["saved"] - want <= slack, (case, rank, got["saved"], want)


def worker_cases() -> dict:
    """TP=2 with one KV head (replicated on both ranks), ZeRO-1; DP=2 ZeRO-2 (bf16)."""
    return {"tp2_zero1": (make_cfg({**SMALL, "n_kv_heads": 1}, parallel={"tp": 2, "zero_stage": 1},
                                   run={"dtype": "fp32"}), 2),
            "dp2_zero2": (make_cfg(SMALL, parallel={"tp": 1, "zero_stage": 2}, run={"dtype": "bf16"}), 2)}


def _worker(out: str) -> None:
    import torch.distributed as dist

    from megareuse.engine.ds import init_distributed
    from megareuse.parallel.launch import discover
    from megareuse.parallel.state import init_parallel_state
    from megareuse.parallel.tensor_parallel import loss_fn, parallelize_model
    from megareuse.model.gpt import GPT
    torch.set_num_threads(1)
    init_distributed(discover(), "gloo", 60)
    results = {}
    for case, (cfg, _) in worker_cases().items():
        state = init_parallel_state(cfg.parallel.tp)
        got = measure_engine(cfg, state)
        if state.tp_size > 1:
            model = parallelize_model(GPT(cfg.model), state)
            exclude = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
            tokens = torch.randint(0, cfg.model.vocab_size, (cfg.run.micro_batch_size, cfg.data.seq_len + 1))
            got["saved"] = saved_bytes(lambda: loss_fn(model(tokens[:, :-1]), tokens[:, 1:], state), exclude)
        gathered = [None, None]
        dist.all_gather_object(gathered, got)
        results[case] = {str(r): g for r, g in enumerate(gathered)}
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(results))
    dist.barrier()


# --------------------------------------------------------------------------- (4) the command
def run_cmd(argv):
    from megareuse.cli import main
    return main(["estimate", *argv])  # the real entry point: its one exit path turns errors into 2


def test_cli_prints_tables_and_refuses_bad_input(capsys):
    config = str(REPO / "configs" / "model" / "llama_1b.yaml")
    assert run_cmd(["--config", config, "--world-size", "8", "--gpu-memory-gib", "80", "data.seq_len=2048",
                    "run.dtype=bf16", "run.micro_batch_size=4", "parallel.tp=2"]) == 0
    out = capsys.readouterr().out
    assert "1,100,048,384 parameters" in out and "TP 2 x DP 4" in out and "fits in 80 GiB" in out
    bad = [(["model.n_layer=3"], "unknown key 'model.n_layer'"),
           (["--world-size", "6", "parallel.tp=4"], "world size 6 is not divisible by parallel.tp = 4"),
           (["parallel.tp=3"], "parallel.tp = 3"),
           (["--world-size", "0"], "--world-size = 0")]
    for extra, message in bad:
        assert run_cmd(["--config", config, *extra]) == 2
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("megareuse estimate: ") and message in lines[0], lines
        assert captured.out == ""


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker(sys.argv[2])
