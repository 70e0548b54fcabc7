"""No rank holds the whole model: sharded construction, streamed checkpoints, layout changes.

- single process: ``build_model`` (meta device -> materialised tensor by tensor) gives exactly
  the weights of ``torch.manual_seed(s); GPT(cfg)``;
- 4 gloo ranks through the real trainer (tests/rank_probe.py): TP=2 x DP=2 ZeRO-3 (and, under
  -m slow, TP=1 x DP=4 ZeRO-3 and TP=2 x DP=2 ZeRO-0) build the same weights, exactly; at ZeRO-3 each rank holds about
  a quarter of the parameters, and neither building nor saving raises a rank's peak resident
  memory by half the model's fp32 bytes, while the ZeRO-0 control does hold it all (so the
  meter can tell);
- resume at another layout: TP=2 x DP=2 ZeRO-2 stopped at step 3 and resumed as TP=1 x DP=4
  ZeRO-3 continues with the uninterrupted run's losses (Adam moments carried over).
"""
from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch

from distributed_utils import REPO, base_env, run_job, tiny_args, torchrun, train_losses
from megareuse.config import ModelConfig
from megareuse.engine.build import build_model
from megareuse.engine.sharded import ShardedReader
from megareuse.model import GPT, param_count
from megareuse.parallel.launch import free_port
from megareuse.parallel.state import single_process_state

PROBE = str(REPO / "tests" / "rank_probe.py")


@pytest.mark.parametrize("tied", [True, False])
def test_single_device_build_equals_gpt(tied):
    cfg = ModelConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64,
                      max_seq_len=16, tie_embeddings=tied)
    torch.manual_seed(3)
    reference = GPT(cfg).state_dict()
    after_gpt = torch.get_rng_state()
    model = build_model(cfg, single_process_state(), torch.device("cpu"), seed=3)
    assert torch.equal(torch.get_rng_state(), after_gpt)  # the global RNG ends where GPT(cfg) leaves it
    built = model.state_dict()
    assert built.keys() == reference.keys()
    assert all(torch.equal(built[k], reference[k]) for k in reference)
    assert (model.output.weight is model.tok_embeddings.weight) == tied
    assert not any(p.is_meta for p in model.parameters()) and not model.rope.cos.is_meta


def probe_run(prepared, out, *overrides, weights=False) -> list[dict]:
    """Train on 4 ranks under tests/rank_probe.py; every rank's probe records."""
    probe_dir = out.parent / f"{out.name}-probes"
    probe_dir.mkdir(parents=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=4", f"--master_port={free_port()}",
           PROBE, *tiny_args(prepared, out, *overrides)]
    proc = run_job(cmd, base_env(PROBE_WEIGHTS="1" if weights else "0", PROBE_DIR=probe_dir), timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return [json.loads(line) for file in sorted(probe_dir.glob("rank*.jsonl")) for line in file.read_text().splitlines()]


@pytest.mark.parametrize("layout", [("parallel.tp=2", "parallel.zero_stage=3"),
                                    pytest.param(("parallel.tp=1", "parallel.zero_stage=3"), marks=pytest.mark.slow),
                                    pytest.param(("parallel.tp=2", "parallel.zero_stage=0"), marks=pytest.mark.slow)])
def test_sharded_build_gives_the_single_device_weights(prepared, tmp_path, layout):
    found = probe_run(prepared, tmp_path / "run", *layout, "run.train_tokens=1024", weights=True)
    (check,) = [p for p in found if p["kind"] == "weights"]
    assert check["keys"] > 0 and check["unequal"] == []
    full = 4 * param_count(ModelConfig(vocab_size=512, d_model=32, n_heads=4, n_kv_heads=2, n_layers=2,
                                       ffn_hidden=64, max_seq_len=32))
    held = [p["param_bytes"] for p in found if p["kind"] == "build"]
    assert len(held) == 4
    share = 1 / 4 if layout[1] == "parallel.zero_stage=3" else 1 / 2  # 4 ranks, or TP=2 alone
    # a quarter (ZeRO-3 over 4 ranks) or a half (TP=2), plus the norms kept whole below DeepSpeed's
    # persistence threshold and the partition padding
    assert all(h <= share * full + 4 * 2000 for h in held), (held, full)


# a model big enough that its fp32 bytes (~90 MB) stand far above the per-rank noise of RSS
BIG = ("model.vocab_size=4096", "model.d_model=256", "model.n_heads=4", "model.n_kv_heads=4",
       "model.n_layers=20", "model.ffn_hidden=1024", "run.micro_batch_size=2", "run.train_tokens=256",
       "run.eval_tokens=64")


@pytest.mark.slow  # 64 s (two 4-rank runs of a 20-layer model); the default suite keeps the sharded build's weights check
def test_no_rank_materialises_the_full_model(prepared, tmp_path):
    full_mib = 4 * param_count(ModelConfig(vocab_size=4096, d_model=256, n_heads=4, n_layers=20,
                                           ffn_hidden=1024, max_seq_len=32)) / 2**20
    growth = {}
    for stage in (3, 0):
        found = probe_run(prepared, tmp_path / f"z{stage}", f"parallel.zero_stage={stage}", *BIG)
        for kind in ("build", "save"):
            rows = [p for p in found if p["kind"] == kind]
            assert len(rows) == 4, found
            growth[stage, kind] = max(p["peak_after"] - p["rss_before"] for p in rows)
    print(f"model {full_mib:.0f} MiB fp32; peak RSS growth per rank (MiB): {growth}")
    assert growth[0, "build"] >= 0.9 * full_mib  # the control: ZeRO-0 holds the whole model
    assert growth[3, "build"] < 0.6 * full_mib  # its quarter, one full tensor at a time, bookkeeping
    assert growth[3, "save"] < 0.5 * full_mib  # streamed: never the full state dict


@pytest.mark.slow  # 50 s; layout-free resume stays in the default suite through test_bf16 and test_distributed
def test_resume_at_another_layout_keeps_the_optimizer_state(prepared, tmp_path):
    common = ("run.save_interval=3", "run.keep_last=3", "run.train_tokens=3072")  # 6 steps of 16 x 32
    whole = tmp_path / "whole"
    first = torchrun(4, tiny_args(prepared, whole, *common, "parallel.tp=2", "parallel.zero_stage=2",
                                  "run.micro_batch_size=8"), timeout=300)
    assert first.returncode == 0, first.stdout[-3000:]
    moved = tmp_path / "moved"
    shutil.copytree(whole, moved)
    checkpoint = moved / "checkpoints" / "step_00000003"
    assert any(n.startswith("optim.") for n in ShardedReader(checkpoint).tensors)  # the Adam moments are stored
    second = torchrun(4, [*tiny_args(prepared, moved, *common, "parallel.tp=1", "parallel.zero_stage=3",
                                     "run.micro_batch_size=4"), "--resume", str(checkpoint)], timeout=300)
    assert second.returncode == 0, second.stdout[-3000:]
    assert "weights and optimizer state resharded to {'tp': 1, 'dp': 4, 'zero_stage': 3}" in second.stdout
    expected, got = train_losses(whole), train_losses(moved)
    assert len(expected) == len(got) == 6
    for a, b in zip(expected, got):
        assert abs(a - b) <= 1e-5 * abs(a), (expected, got)
