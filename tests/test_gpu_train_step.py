"""bf16 training steps on CUDA through the real trainer (DeepSpeed bf16 engine), per attention backend.

Skipped unless MEGAREUSE_TEST_GPU=1 and a CUDA device is present (benchmarks/gpu.sh runs it). The
25M configuration (head dim 64, the Triton kernel's), sequence 256, micro-batch 4, ZeRO-0, the same
seed and batches for every run:

- each attention backend (sdpa, eager, triton, auto) trains three steps with finite losses, and
  its losses equal sdpa's within bf16 tolerance (2%: the same initialisation and data, the
  attention's rounding alone differs);
- the fused (Triton) linear + cross-entropy head gives the plain head's losses within the same
  tolerance.

Data: the prepared directory named by MEGAREUSE_TEST_DATA (gpu.sh prepares one for the
benchmarks), else the session's ``prepared`` fixture.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "model" / "llama_25m.yaml"
STEPS = 3
RTOL = 2e-2


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


pytestmark = pytest.mark.skipif(os.environ.get("MEGAREUSE_TEST_GPU") != "1" or not _cuda(),
                                reason="needs MEGAREUSE_TEST_GPU=1 and a CUDA device")


@pytest.fixture(scope="module")
def data_dir(request):
    named = os.environ.get("MEGAREUSE_TEST_DATA")
    if named:
        return Path(named)
    return request.getfixturevalue("prepared")


def losses(data: Path, out: Path, *overrides: str) -> list[float]:
    import torch

    from megareuse.config import load_config
    from megareuse.engine.trainer import Trainer

    seq, micro = 256, 4
    cfg = load_config(str(CONFIG), [
        f"data.dir={data}", f"run.out_dir={out}", "data.train={prose: 1.0}", "data.valid=[prose]",
        f"data.seq_len={seq}", f"model.max_seq_len={seq}", f"run.micro_batch_size={micro}", "run.grad_accum=1",
        f"run.train_tokens={STEPS * seq * micro}", "run.device=cuda", "run.dtype=bf16", "parallel.zero_stage=0",
        "schedule.warmup_steps=1", "run.seed=0", "run.log_interval=1", *overrides])
    trainer = Trainer(cfg, emit=lambda _s: None)
    try:
        got = [float(trainer.train_step()[0]) for _ in range(STEPS)]
    finally:
        del trainer
        torch.cuda.empty_cache()
    return got


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    return losses(data_dir, tmp_path_factory.mktemp("sdpa") / "run", "model.attention=sdpa", "model.loss=plain")


@pytest.mark.parametrize("backend", ["sdpa", "eager", "triton", "auto"])
def test_bf16_train_step_per_attention_backend(backend, data_dir, reference, tmp_path):
    got = losses(data_dir, tmp_path / "run", f"model.attention={backend}", "model.loss=plain")
    assert all(math.isfinite(x) for x in got), got
    assert all(math.isfinite(x) for x in reference), reference
    assert got == pytest.approx(reference, rel=RTOL), (backend, got, reference)


def test_bf16_train_step_fused_loss_equals_plain(data_dir, reference, tmp_path):
    got = losses(data_dir, tmp_path / "run", "model.attention=sdpa", "model.loss=fused")
    assert all(math.isfinite(x) for x in got), got
    assert got == pytest.approx(reference, rel=RTOL), (got, reference)


def test_default_async_save_on_cuda_stages_pinned_shares_and_resumes_bit_exactly(data_dir, tmp_path):
    """On CUDA a checkpoint is saved in the background by default (``run.async_save`` null): each
    rank's share of the fp32 state is copied to pinned host memory and written while training
    goes on; the checkpoint resumes bit for bit (ZeRO-2, bf16)."""
    import shutil

    import torch

    from megareuse.engine import fragments
    from megareuse.engine.metrics import read_metrics
    from megareuse.engine.sharded import ShardedReader
    from megareuse.engine.trainer import Trainer

    staged = []
    real = fragments.collect

    def watching(engine, cfg, ps, moments, to_host):
        chunks = real(engine, cfg, ps, moments, to_host)
        staged.append(to_host and all(t.device.type == "cpu" and t.is_pinned() for _, _, t in chunks))
        return chunks

    fragments.collect = watching
    try:
        lines = []
        out = tmp_path / "async"
        Trainer(_config(data_dir, out, "parallel.zero_stage=2", "run.async_save=null"), emit=lines.append).run()
    finally:
        fragments.collect = real
    assert staged and all(staged), staged  # every save staged to pinned host memory
    assert any("finished in the background" in line for line in lines), lines
    assert any(n.startswith("optim.") for n in ShardedReader(out / "checkpoints" / "step_00000002").tensors)
    part = tmp_path / "part"
    shutil.copytree(out, part)
    Trainer(_config(data_dir, part, "parallel.zero_stage=2"), resume=str(part / "checkpoints" / "step_00000002"),
            emit=lambda _s: None).run()
    whole = [r["loss"] for r in read_metrics(out) if r["kind"] == "train"]
    assert [r["loss"] for r in read_metrics(part) if r["kind"] == "train"] == whole
    torch.cuda.empty_cache()


def _config(data: Path, out: Path, *overrides: str):
    from megareuse.config import load_config
    from megareuse.engine.trainer import Trainer

    seq, micro = 256, 4
    cfg = load_config(str(CONFIG), [
        f"data.dir={data}", f"run.out_dir={out}", "data.train={prose: 1.0}", "data.valid=[prose]",
        f"data.seq_len={seq}", f"model.max_seq_len={seq}", f"run.micro_batch_size={micro}", "run.grad_accum=1",
        f"run.train_tokens={4 * seq * micro}", "run.device=cuda", "run.dtype=bf16", "run.save_interval=2",
        "run.eval_tokens=2048", "run.eval_interval=100", "schedule.warmup_steps=1", "run.seed=0",
        "run.log_interval=1", "run.async_save=false", "model.attention=sdpa", *overrides])
    return cfg


@pytest.mark.parametrize("stage", [0, 3])
def test_bf16_train_step_saves_and_resumes_bit_exactly(stage, data_dir, tmp_path):
    """bf16 at ZeRO-0 (it crashed at its first save) and ZeRO-3 (it computed in fp32) on CUDA:
    bf16 parameters with fp32 masters, a checkpoint at step 2, and a resume from it that gives the
    same losses bit for bit (one GPU: the world is one rank)."""
    import shutil

    import torch
    import torch.distributed as dist

    from megareuse.engine.ds_internals import precision
    from megareuse.engine.metrics import read_metrics
    from megareuse.engine.trainer import Trainer

    out = tmp_path / "run"
    first = Trainer(_config(data_dir, out, f"parallel.zero_stage={stage}"), emit=lambda _s: None)
    assert precision(first.engine) == "bf16 parameters, fp32 master weights and moments"
    config = dist.get_backend_config()
    assert "cuda:nccl" in config and "cpu:gloo" in config, config  # host collectives have gloo
    host, device = torch.ones(1), torch.ones(1, device="cuda")
    dist.all_reduce(host), dist.all_reduce(device)  # both sides of the group answer
    first.run()
    whole = [r["loss"] for r in read_metrics(out) if r["kind"] == "train"]
    part = tmp_path / "part"
    shutil.copytree(out, part)
    again = Trainer(_config(data_dir, part, f"parallel.zero_stage={stage}"),
                    resume=str(part / "checkpoints" / "step_00000002"), emit=lambda _s: None)
    again.run()
    assert [r["loss"] for r in read_metrics(part) if r["kind"] == "train"] == whole
    del first, again
    torch.cuda.empty_cache()
