"""The kernels package as the model sees it: lazy imports, backend selection and its logging,
fallbacks, and a model on the `triton` backend giving the loss and gradients of `sdpa`.

Kernel-by-kernel numerics are in test_kernels_attention.py, test_kernels_ops.py and
test_kernels_ce.py.
"""
import logging
import os
import subprocess
import sys

import pytest
import torch

from megareuse.config import ModelConfig
from megareuse.model import GPT, cross_entropy
from megareuse.model import attention as attn_mod

pytest.importorskip("triton")

from megareuse_kernels import common, select, triton_status  # noqa: E402

ON_GPU = os.environ.get("MEGAREUSE_TEST_GPU") == "1"
# head_dim 64 (d_model 128 / 2 heads): the Triton attention kernel takes it.
TINY = dict(vocab_size=67, d_model=128, n_layers=2, n_heads=2, n_kv_heads=1, ffn_hidden=96, max_seq_len=32)


@pytest.fixture(autouse=True)
def _fresh_log_and_poison(monkeypatch):
    monkeypatch.setattr(common, "_LOGGED", set())
    with common.poisoned_outputs():
        yield


def test_importing_the_model_does_not_import_triton():
    code = ("import sys, megareuse.model, megareuse_kernels, megareuse_kernels.select\n"
            "from megareuse.config import ModelConfig\n"
            "megareuse.model.GPT(ModelConfig(attention='auto'))\n"
            "assert 'triton' not in sys.modules, 'triton imported'\n")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def test_backends_registered_and_accepted_by_config():
    assert {"triton", "auto"} <= set(attn_mod.attention_backends())
    for name in ("triton", "auto"):
        ModelConfig(attention=name).validate()


@pytest.mark.skipif(ON_GPU, reason="CPU interpreter run")
def test_triton_status_under_interpreter():
    assert triton_status() == (True, "Triton interpreter (TRITON_INTERPRET=1, CPU)")


def _model_loss_and_grads(attention, kernels, toks, seed=0):
    torch.manual_seed(seed)
    model = GPT(ModelConfig(**TINY, attention=attention))
    select.set_fused_kernels(model, kernels)
    loss = cross_entropy(model(toks[:, :-1]), toks[:, 1:])
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.skipif(ON_GPU, reason="CPU interpreter run")
def test_model_on_triton_backend_matches_sdpa(caplog):
    """Interpreter, fp32: attention, RoPE, RMSNorm and SwiGLU all through the Triton kernels."""
    toks = torch.randint(0, 67, (2, 25), generator=torch.Generator().manual_seed(3))
    with caplog.at_level(logging.INFO, logger="megareuse.kernels"):
        loss_t, grads_t = _model_loss_and_grads("triton", "triton", toks)
    loss_s, grads_s = _model_loss_and_grads("sdpa", "torch", toks)
    used = caplog.text
    for op in ("Triton flash attention", "Triton fused rope", "Triton fused rms_norm", "Triton fused swiglu"):
        assert op in used, f"{op} was not used: {used}"
    torch.testing.assert_close(loss_t, loss_s, atol=1e-6, rtol=1e-6)
    assert grads_t.keys() == grads_s.keys()
    for name in grads_s:
        torch.testing.assert_close(grads_t[name], grads_s[name], atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.skipif(ON_GPU, reason="CPU path")
def test_auto_on_cpu_uses_sdpa_and_logs_once(caplog, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("Triton flash attention called on CPU in auto mode")

    monkeypatch.setattr("megareuse_kernels.flash_attention.flash_attention", boom)
    torch.manual_seed(0)
    auto, sdpa = GPT(ModelConfig(**TINY, attention="auto")), GPT(ModelConfig(**TINY))
    sdpa.load_state_dict(auto.state_dict())
    select.set_fused_kernels(auto, "auto")
    toks = torch.randint(0, 67, (2, 9))
    with caplog.at_level(logging.INFO, logger="megareuse.kernels"):
        out = auto(toks)
        auto(toks)
    torch.testing.assert_close(out, sdpa(toks), atol=0, rtol=0)  # the very same torch path
    lines = [r.getMessage() for r in caplog.records]
    assert lines.count("attention [auto]: torch path for cpu tensors (Triton is used on CUDA only)") == 1
    assert len(lines) == len(set(lines)) == 4  # attention, rope, rms_norm, swiglu: each once


def test_unsupported_head_dim_falls_back_to_sdpa_with_reason(caplog):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 10, 32, generator=g) for _ in range(3))
    if ON_GPU:
        q, k, v = q.cuda(), k.cuda(), v.cuda()
    with caplog.at_level(logging.WARNING, logger="megareuse.kernels"):
        out = attn_mod.triton_attention(q, k, v)
        attn_mod.triton_attention(q, k, v)
    torch.testing.assert_close(out, attn_mod.sdpa_attention(q, k, v), atol=0, rtol=0)
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs == ["attention [triton]: sdpa path: flash attention: head dim 32 is not supported; "
                    "accepted: 64, 128"]


def test_unknown_mode_and_missing_triton_raise(monkeypatch):
    with pytest.raises(ValueError, match="unknown kernel mode 'fast'; accepted: torch, triton, auto"):
        select.set_fused_kernels(torch.nn.Linear(2, 2), "fast")
    monkeypatch.setattr(select, "_triton_ok", lambda: (False, "no CUDA device"))
    with pytest.raises(ValueError, match="model.attention='triton' needs Triton kernels, which cannot run here: "
                                         "no CUDA device; use 'sdpa' or 'auto' instead"):
        GPT(ModelConfig(**TINY, attention="triton"))


def test_poisoned_outputs_are_nan():
    out = common.new_output((3,), torch.float32, torch.device("cpu"))
    assert torch.isnan(out).all()
    common.poison_outputs(False)
    assert common.new_output_like(torch.ones(2, 3).t()).stride() == (1, 3)  # layout kept


def test_auto_rms_norm_on_cpu_takes_the_torch_path():
    """auto never sends CPU tensors to Triton or apex (apex is CUDA-only and optional)."""
    x, w = torch.randn(2, 8), torch.ones(8)
    assert select.rms_norm(x, w, 1e-5, "auto") is None


@pytest.mark.skipif(ON_GPU, reason="CPU smoke run")
def test_benchmark_script_smoke(tmp_path):
    """benchmarks/kernel_speed.py end to end at tiny shapes (interpreter): every row timed, JSON written."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_speed.py"
    spec = importlib.util.spec_from_file_location("bench_kernels", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--smoke", "--json", str(tmp_path / "k.json")]) == 0
    result = json.loads((tmp_path / "k.json").read_text())
    kernels = {r["kernel"] for r in result["results"] if r["ms"] > 0}
    assert kernels == {"attention", "rms_norm", "swiglu", "rope", "linear+cross_entropy"}
    assert result["smoke"] and result["targets"] == {}
