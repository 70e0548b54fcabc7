"""Verification on first use (megareuse_kernels/verify.py) and the safe kernel defaults.

- the real kernels pass their check (CPU interpreter, fp32, small shapes; with
  MEGAREUSE_TEST_GPU=1 on CUDA at the 1.1B config's shape classes, fp32 and bf16);
- a kernel that returns wrong values (forward or only backward), NaN, a wrong shape, or raises
  fails its check with the reason;
- in ``auto`` mode a failed check sends the op to its torch path (SDPA, torch SwiGLU, the
  chunked loss) with exactly one logged line however many calls follow; verdicts are cached per
  (op, device, dtype, shape key); ``triton`` mode is not verified;
- a model on ``auto`` verifies inside an activation-checkpointed block and then matches ``sdpa``;
- no shipped config selects a Triton kernel by default, and the GPU configs take the chunked loss.

``auto`` uses torch for CPU tensors, so the selection tests patch ``select.use_triton`` to let
CPU tensors (interpreter) through; the check itself takes the device explicitly.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from megareuse.config import ModelConfig, load_config
from megareuse.model import GPT, param_count
from megareuse.model import attention as attn_mod
from megareuse.model.head import LMHead, chunked_linear_cross_entropy, resolve_loss
from megareuse.model.mlp import FeedForward

pytest.importorskip("triton")

from megareuse_kernels import common, select, verify  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
ON_GPU = os.environ.get("MEGAREUSE_TEST_GPU") == "1"
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
LOGGER = "megareuse.kernels"
# (op, key): small shape classes in the interpreter; on a GPU the 1.1B config's (head dim 64,
# group 8, d_model 2048, FFN 5632, vocabulary 32000)
CPU_CASES = [("attention", (64, 2, True)), ("rope", (64, torch.float32)), ("rms_norm", (96, torch.float32)),
             ("swiglu", (111,)), ("linear_cross_entropy", (300,))]
GPU_CASES = [("attention", (64, 8, True)), ("rope", (64, torch.float32)), ("rms_norm", (2048, None)),
             ("swiglu", (5632,)), ("linear_cross_entropy", (32000,))]


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    """Each test starts with no verdicts and no logged messages, and NaN-poisoned kernel outputs."""
    monkeypatch.setattr(verify, "_RESULTS", {})
    monkeypatch.setattr(common, "_LOGGED", set())
    with common.poisoned_outputs():
        yield


def counted(monkeypatch, op: str) -> list:
    """Wrap ``op``'s check so that each run is recorded; returns the list of (device, dtype, key)."""
    calls, check = [], verify.CHECKS[op]

    def run(device, dtype, key):
        calls.append((str(device), dtype, key))
        return check.run(device, dtype, key)

    monkeypatch.setitem(verify.CHECKS, op, verify.Check(run, check.describe, check.fallback))
    return calls


def let_cpu_through(monkeypatch):
    """``auto`` takes the Triton path for CPU tensors too (interpreter), as it does for CUDA ones."""
    if not ON_GPU:
        monkeypatch.setattr(select, "use_triton", lambda mode, op, t: mode != "torch")


def kernel_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


# ------------------------------------------------------------------ the check itself
def _cases():
    if not ON_GPU:
        return [(op, key, torch.float32) for op, key in CPU_CASES]
    return [(op, key, dtype) for op, key in GPU_CASES for dtype in (torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("op, key, dtype", _cases(), ids=lambda v: str(v).replace("torch.", ""))
def test_real_kernels_pass_their_check(op, key, dtype, monkeypatch):
    if op == "rms_norm" and key[1] is None:  # the model's weight has the activations' dtype
        key = (key[0], dtype)
    if ON_GPU:  # one tile shape: the budget of gpu.sh; the autotuned ones are in test_kernels_attention
        monkeypatch.setenv("MEGAREUSE_FLASH_AUTOTUNE", "0")
    verdict = verify.run_check(op, DEVICE, dtype, key)
    assert verdict.ok, verdict
    assert 0 <= verdict.error <= verify.TOLERANCE[dtype] and verdict.bound == verify.tolerance(DEVICE, dtype)


def test_check_catches_a_wrong_forward(monkeypatch):
    monkeypatch.setattr("megareuse_kernels.swiglu.swiglu", lambda g, u: F.silu(g) * u * 1.01)
    verdict = verify.run_check("swiglu", DEVICE, torch.float32, (40,))
    assert not verdict.ok and 0.009 < verdict.error < 0.011, verdict


def test_check_catches_a_wrong_backward_only(monkeypatch):
    """Right values, wrong gradient: d up = 1 instead of silu(gate)."""
    monkeypatch.setattr("megareuse_kernels.swiglu.swiglu", lambda g, u: F.silu(g) * u.detach() + (u - u.detach()))
    verdict = verify.run_check("swiglu", DEVICE, torch.float32, (40,))
    assert not verdict.ok and verdict.detail == "dup" and verdict.error > 0.1, verdict


def _raises(*args):
    raise RuntimeError("PTX assembly aborted\nsecond line")


@pytest.mark.parametrize("fake, error, detail", [
    (_raises, "nan", "it raised RuntimeError: PTX assembly aborted"),
    (lambda g, u: F.silu(g) * u * float("nan"), "inf", "out"),
    (lambda g, u: (F.silu(g) * u)[:, :-1], "nan", "it raised RuntimeError: Mismatch in shape"),
], ids=["raises", "nan", "shape"])
def test_check_catches_exceptions_non_finite_and_wrong_shapes(monkeypatch, fake, error, detail):
    monkeypatch.setattr("megareuse_kernels.swiglu.swiglu", fake)
    verdict = verify.run_check("swiglu", "cpu", torch.float32, (40,))
    assert not verdict.ok and str(verdict.error) == error and verdict.detail.startswith(detail), verdict
    assert "\n" not in verdict.detail  # one line


def test_rel_error_refuses_a_shape_mismatch_and_flags_non_finite():
    want = torch.ones(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"shape \(3, 2\) != reference \(2, 3\)"):
        verify.rel_error(torch.ones(3, 2), want)
    assert verify.rel_error(torch.full((2, 3), float("inf")), want) == float("inf")
    assert verify.rel_error(torch.full((2, 3), 1.5), 2 * want) == 0.25


def test_check_leaves_the_global_rng_and_grad_mode_alone():
    state = torch.get_rng_state()
    with torch.no_grad():
        assert verify.verified("swiglu", DEVICE, torch.float32, (40,))
        assert not torch.is_grad_enabled()
    assert torch.equal(torch.get_rng_state(), state)


# ------------------------------------------------------------------ selection in auto mode
def test_failed_check_falls_back_to_torch_with_one_line(monkeypatch, caplog):
    let_cpu_through(monkeypatch)
    monkeypatch.setattr("megareuse_kernels.swiglu.swiglu", lambda g, u: F.silu(g) * u * 1.5)
    calls = counted(monkeypatch, "swiglu")
    torch.manual_seed(0)
    ffn = FeedForward(16, 40, kernels="auto").to(DEVICE)
    x = torch.randn(2, 5, 16, device=DEVICE)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        outs = [ffn(x) for _ in range(5)]
    want = ffn.w2(F.silu(ffn.w1(x)) * ffn.w3(x))  # the torch path, not the broken kernel
    for out in outs:
        torch.testing.assert_close(out, want, atol=0, rtol=0)
    assert len(calls) == 1
    lines = kernel_lines(caplog)
    assert len(lines) == 1 and caplog.records[0].levelno == logging.WARNING, lines
    assert lines[0].startswith(f"swiglu [auto]: torch path on {DEVICE}") and "float32; width 40" in lines[0]
    assert "max relative error 5.0e-01 in " in lines[0], lines[0]


def test_failed_attention_check_goes_to_sdpa_with_one_line(monkeypatch, caplog):
    let_cpu_through(monkeypatch)
    monkeypatch.setattr("megareuse_kernels.flash_attention.flash_attention", _raises)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, 12, 64, generator=g).to(DEVICE) for n in (4, 2, 2))
    with caplog.at_level(logging.INFO, logger=LOGGER):
        outs = [attn_mod.auto_attention(q, k, v) for _ in range(3)]
    for out in outs:  # SDPA itself, which agrees with the explicit softmax
        torch.testing.assert_close(out, attn_mod.sdpa_attention(q, k, v), atol=0, rtol=0)
        torch.testing.assert_close(out, attn_mod.eager_attention(q, k, v), atol=1e-5, rtol=1e-5)
    assert kernel_lines(caplog) == [
        f"attention [auto]: sdpa path on {DEVICE} (float32; head_dim 64, group 2, causal): the Triton kernel's "
        "check failed: it raised RuntimeError: PTX assembly aborted"]


def test_verdicts_are_cached_per_key_and_triton_mode_is_not_checked(monkeypatch, caplog):
    let_cpu_through(monkeypatch)
    calls = counted(monkeypatch, "swiglu")
    g = torch.Generator().manual_seed(1)
    gate, up = (torch.randn(3, 40, generator=g).to(DEVICE) for _ in range(2))
    with caplog.at_level(logging.INFO, logger=LOGGER):
        for _ in range(4):
            out = select.swiglu(gate, up, "auto")
            torch.testing.assert_close(out.double(), F.silu(gate.double()) * up.double(), atol=1e-6, rtol=1e-6)
        select.swiglu(gate[:, :24], up[:, :24], "auto")  # another width: another check
        select.swiglu(gate.half(), up.half(), "auto")  # another dtype: another check
        select.swiglu(gate, up, "triton")  # explicit opt-in: the kernel, unchecked
    assert calls == [(str(DEVICE), torch.float32, (40,)), (str(DEVICE), torch.float32, (24,)),
                     (str(DEVICE), torch.float16, (40,))]
    assert {k[3] for k in verify.results()} == {(40,), (24,)}
    verified = [line for line in kernel_lines(caplog) if "Triton kernel verified" in line]
    assert len(verified) == 3 and verified[0].startswith(f"swiglu [auto]: Triton kernel verified on {DEVICE}")


def test_auto_loss_is_fused_only_when_verified(monkeypatch, caplog):
    let_cpu_through(monkeypatch)
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 24, 32, generator=g).to(DEVICE)
    assert resolve_loss("auto", hidden, chunk_tokens=16, vocab=300) == "fused"
    # a kernel whose loss is 10% off: the check fails, auto falls back to the chunked loss
    monkeypatch.setattr(verify, "_RESULTS", {})
    monkeypatch.setattr("megareuse_kernels.cross_entropy.linear_cross_entropy",
                        lambda h, w, t, **kw: 1.1 * chunked_linear_cross_entropy(h, w, t, chunk_size=16))
    torch.manual_seed(0)
    head = LMHead(32, 300, loss="auto", chunk_tokens=16).to(DEVICE)
    targets = torch.randint(0, 300, (2, 24), generator=g).to(DEVICE)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        losses = [head(hidden, targets) for _ in range(3)]
    want = F.cross_entropy((hidden.double() @ head.weight.double().t()).reshape(-1, 300), targets.reshape(-1))
    for loss in losses:
        torch.testing.assert_close(loss.double(), want, atol=1e-5, rtol=1e-5)
    lines = kernel_lines(caplog)
    assert len(lines) == 1 and lines[0].startswith(
        f"linear_cross_entropy [auto]: chunked loss path on {DEVICE} (float32; vocab 300): the Triton kernel "
        "failed its check against float64 torch: max relative error 1.0e-01 in "), lines
    assert resolve_loss("auto", hidden, chunk_tokens=16, vocab=300) == "chunked"
    assert resolve_loss("auto", hidden, chunk_tokens=48, vocab=300) == "plain"  # one chunk holds all


TINY = dict(vocab_size=67, d_model=128, n_layers=2, n_heads=2, n_kv_heads=1, ffn_hidden=96, max_seq_len=32)


@pytest.mark.skipif(ON_GPU, reason="interpreter run (the GPU budget goes to the real shapes)")
def test_model_on_auto_verifies_inside_checkpointed_blocks_and_matches_sdpa(monkeypatch, caplog):
    let_cpu_through(monkeypatch)
    toks = torch.randint(0, 67, (2, 21), generator=torch.Generator().manual_seed(3))
    results = {}
    for attention in ("auto", "sdpa"):
        torch.manual_seed(0)
        model = GPT(ModelConfig(**TINY, attention=attention, activation_checkpointing="full", loss="plain"))
        with caplog.at_level(logging.INFO, logger=LOGGER):
            loss = model(toks[:, :-1], toks[:, 1:])
            loss.backward()
        results[attention] = loss.detach(), {n: p.grad for n, p in model.named_parameters()}
    lines = kernel_lines(caplog)
    for op in ("attention", "rope", "rms_norm", "swiglu"):
        assert sum(line.startswith(f"{op} [auto]: Triton kernel verified on cpu") for line in lines) == 1, lines
    for used in ("Triton flash attention", "Triton fused rope", "Triton fused rms_norm", "Triton fused swiglu"):
        assert any(used in line for line in lines), (used, lines)
    (loss_a, grads_a), (loss_s, grads_s) = results["auto"], results["sdpa"]
    torch.testing.assert_close(loss_a, loss_s, atol=1e-6, rtol=1e-6)
    for name in grads_s:
        torch.testing.assert_close(grads_a[name], grads_s[name], atol=1e-6, rtol=1e-4, msg=name)


# ------------------------------------------------------------------ the shipped configs
def _shipped_configs():
    """(name, Config) of every model and train config, and of each experiment's base run."""
    configs = REPO / "configs"
    for path in sorted(configs.glob("model/*.yaml")) + sorted(configs.glob("train/*.yaml")):
        yield path.relative_to(REPO).as_posix(), load_config(path)
    for path in sorted(configs.glob("experiments/*.yaml")):
        exp = yaml.safe_load(path.read_text())
        base = path.parent / exp["train_config"]
        yield path.relative_to(REPO).as_posix(), load_config(base, exp.get("overrides", []))


def test_no_shipped_config_selects_an_unverified_kernel_by_default():
    """Triton kernels are opt-in until benchmarks/gpu.sh has recorded their parity on a GPU: every
    shipped config takes SDPA (or eager) attention, hence torch RoPE / RMSNorm / SwiGLU, and the
    GPU-sized ones (100M+ parameters or run.device cuda) the torch chunked (or plain) loss."""
    seen = []
    for name, cfg in _shipped_configs():
        assert cfg.model.attention in ("sdpa", "eager"), (name, cfg.model.attention)
        if cfg.run.device == "cuda" or param_count(cfg.model) >= 10**8:
            assert cfg.model.loss in ("chunked", "plain"), (name, cfg.model.loss)
            seen.append(name)
    assert {"configs/model/llama_1b.yaml", "configs/model/llama_350m.yaml", "configs/train/llama_1b.yaml",
            "configs/experiments/cpt_1b.yaml", "configs/experiments/growth_1b.yaml"} <= set(seen), seen
