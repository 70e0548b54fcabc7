"""The reused families' model features (q/k/v biases, per-head q/k norms with an explicit
head_dim, llama3 RoPE scaling, a window no narrower than the sequence) trained under TP x DP
with ZeRO, activation checkpointing and the chunked loss, against the single-process run of the
same model (gloo, fp32). The TP=2 x DP=2 run saves; its consolidated checkpoint is evaluated on
one process and gives the run's own validation loss. ZeRO 0-2 are under ``-m slow``.
"""
import sys

import pytest

from distributed_utils import TRAIN, eval_losses, run_job, tiny_args, torchrun, train_losses
from megareuse.engine import checkpoint as ckpt
from megareuse.engine.evaluate import evaluate_checkpoint

RTOL = 1e-5
FEATURES = ["model.qkv_bias=true", "model.qk_norm=true", "model.head_dim=16", "model.rope_scaling=llama3",
            "model.rope_factor=8.0", "model.rope_original_max_seq_len=16", "model.sliding_window=32",
            "model.tie_embeddings=false"]


@pytest.fixture(scope="module")
def reference(prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("features_ref") / "run"
    proc = run_job([sys.executable, TRAIN, *tiny_args(prepared, out, *FEATURES)])
    assert proc.returncode == 0, proc.stdout[-3000:]
    return train_losses(out), eval_losses(out)


@pytest.mark.parametrize("stage, checkpointing, loss", [
    (3, "full", "chunked"),
    pytest.param(0, "none", "plain", marks=pytest.mark.slow),
    pytest.param(1, "selective", "chunked", marks=pytest.mark.slow),
    pytest.param(2, "full", "plain", marks=pytest.mark.slow),
])
def test_features_under_tp2_dp2_zero_match_one_process(prepared, tmp_path, reference, stage, checkpointing, loss):
    out = tmp_path / "run"
    proc = torchrun(4, tiny_args(prepared, out, *FEATURES, "parallel.tp=2", f"parallel.zero_stage={stage}",
                                 "run.micro_batch_size=4", f"model.activation_checkpointing={checkpointing}",
                                 f"model.loss={loss}", "model.loss_chunk_tokens=48", "run.save_interval=6"))
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "TP=2, DP=2, ZeRO-%d" % stage in proc.stdout
    losses, evals = train_losses(out), eval_losses(out)
    assert len(losses) == 6 and losses == pytest.approx(reference[0], rel=RTOL)
    for got, want in zip(evals, reference[1]):
        assert got["valid_loss/prose"] == pytest.approx(want["valid_loss/prose"], rel=RTOL)
    step = out / "checkpoints" / "step_00000006"
    model = ckpt.read_meta(step)["config"]["model"]
    assert (model["qkv_bias"], model["qk_norm"], model["head_dim"], model["rope_scaling"]) == (True, True, 16, "llama3")
    single = evaluate_checkpoint(step, max_tokens=512, batch_size=8)
    assert single["prose"] == pytest.approx(evals[-1]["valid_loss/prose"], rel=RTOL)
