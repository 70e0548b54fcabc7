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
