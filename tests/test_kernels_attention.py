"""Triton flash attention vs an independent float64 reference: forward and backward, causal and
not, GQA, ragged last blocks, head dims 64 and 128, strided inputs, and the refusals.

On CPU this runs under the Triton interpreter (TRITON_INTERPRET=1, set by conftest) in fp32 and
fp16; with MEGAREUSE_TEST_GPU=1 on a CUDA machine it runs there, bf16 included. Kernel outputs
are pre-filled with NaN, so an element a kernel fails to write fails the comparison.
Tolerance: max |out - ref| / max |ref| below TOL[dtype] for the output; for the gradients
max |dX - dX_ref| / (max |dq_ref| + max |dk_ref| + max |dv_ref|), one scale for all three: at
T=1 the exact dq and dk are zero (one key: the softmax is constant) and the kernel's
rounding-level values would be infinitely wrong relative to themselves.
"""
import math
import os

import pytest
import torch

pytest.importorskip("triton")

from megareuse_kernels import flash_attention as fa  # noqa: E402
from megareuse_kernels.common import poisoned_outputs  # noqa: E402

DEVICE = "cuda" if os.environ.get("MEGAREUSE_TEST_GPU") == "1" else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@pytest.fixture(autouse=True)
def _poison():
    with poisoned_outputs():
        yield


def reference(q, k, v, causal):
    """float64 softmax(q k^T / sqrt(D) [causal]) v; query head h reads kv head h // (H / Hkv)."""
    q, k, v = q.double(), k.double(), v.double()
    H, Hkv, T = q.shape[1], k.shape[1], q.shape[2]
    group = torch.arange(H) // (H // Hkv)
    s = q @ k[:, group].transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril().to(s.device), -math.inf)
    return s.softmax(-1) @ v[:, group]


def rel_err(got, want, scale=None):
    """max |got - want| / scale, scale = max |want| unless given."""
    assert torch.isfinite(got).all(), "non-finite values (unwritten NaN-poisoned elements?)"
    scale = want.abs().max() if scale is None else scale
    return ((got.double() - want).abs().max() / scale).item()


def inputs(B, H, Hkv, T, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, n, T, D, generator=g, dtype=torch.float64) for n in (H, Hkv, Hkv))
    return [t.to(device=DEVICE, dtype=dtype).requires_grad_() for t in (q, k, v)]


def check_against_reference(q, k, v, causal, dtype):
    out = fa.flash_attention(q, k, v, causal=causal)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(DEVICE)
    out.backward(dout.to(dtype))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference(q64, k64, v64, causal)
    ref.backward(dout)
    assert out.shape == q.shape and out.dtype == dtype
    grads = [("dq", q.grad, q64.grad), ("dk", k.grad, k64.grad), ("dv", v.grad, v64.grad)]
    grad_scale = sum(want.abs().max() for _, _, want in grads)
    errors = {"out": rel_err(out, ref)}
    errors.update((name, rel_err(got, want, grad_scale)) for name, got, want in grads)
    assert max(errors.values()) < TOL[dtype], errors


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("heads", [(4, 2), (2, 2)], ids=["gqa", "mha"])
def test_matches_float64_reference(dtype, causal, heads):
    """T=77: several 16/32-row tiles in the interpreter and a ragged last block."""
    check_against_reference(*inputs(1, heads[0], heads[1], 77, 64, dtype), causal, dtype)


def test_head_dim_128_and_single_kv_head():
    check_against_reference(*inputs(1, 4, 1, 21, 128, torch.float32, seed=3), True, torch.float32)


@pytest.mark.parametrize("T", [1, 5, 32])
def test_short_and_exact_multiple_lengths(T):
    check_against_reference(*inputs(1, 2, 1, T, 64, torch.float32, seed=T), True, torch.float32)


def test_strided_model_layout_and_output_layout():
    """q/k/v as transposed views of [B, T, H, D] (what the model passes) go in without copies."""
    g = torch.Generator().manual_seed(5)
    base = [torch.randn(2, 40, n, 64, generator=g).to(DEVICE) for n in (4, 2, 2)]
    q, k, v = (b.transpose(1, 2).requires_grad_() for b in base)
    assert not q.is_contiguous()
    check_against_reference(q, k, v, True, torch.float32)


def test_causal_mask_blocks_the_future():
    q, k, v = inputs(1, 2, 2, 40, 64, torch.float32, seed=11)
    out = fa.flash_attention(q, k, v).detach()
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[:, :, 30:] += 3.0
    v2[:, :, 30:] -= 3.0
    out2 = fa.flash_attention(q.detach(), k2, v2)
    torch.testing.assert_close(out2[:, :, :30], out[:, :, :30], atol=1e-6, rtol=0)
    assert (out2[:, :, 30:] - out[:, :, 30:]).abs().max() > 1e-2


def test_error_metric_catches_a_wrong_kernel_result():
    """The comparison used above fails on a causal/full mix-up and on one unwritten element."""
    q, k, v = inputs(1, 2, 2, 20, 64, torch.float32)
    ref = reference(q.detach(), k.detach(), v.detach(), causal=True)
    assert rel_err(fa.flash_attention(q, k, v, causal=False).detach(), ref) > TOL[torch.float32]
    out = fa.flash_attention(q, k, v, causal=True).detach().clone()
    out[0, 1, 19, 63] = float("nan")
    with pytest.raises(AssertionError, match="non-finite"):
        rel_err(out, ref)


@pytest.mark.parametrize("shape, match", [
    ((1, 2, 2, 16, 32), "head dim 32 is not supported; accepted: 64, 128"),
    ((1, 2, 2, 16, 96), "head dim 96 is not supported"),
    ((1, 3, 2, 16, 64), "n_heads=3 is not a multiple of n_kv_heads=2"),
])
def test_unsupported_shapes_raise_one_line(shape, match):
    B, H, Hkv, T, D = shape
    q, k, v = inputs(B, H, Hkv, T, D, torch.float32)
    assert fa.unsupported_reason(q, k, v) is not None
    with pytest.raises(ValueError, match=match):
        fa.flash_attention(q, k, v)


def test_unsupported_dtype_and_lengths_raise():
    q, k, v = inputs(1, 2, 2, 16, 64, torch.float64)
    with pytest.raises(ValueError, match="dtype torch.float64 is not supported; accepted: float16, bfloat16"):
        fa.flash_attention(q, k, v)
    q, k, v = inputs(1, 2, 2, 16, 64, torch.float32)
    with pytest.raises(ValueError, match="query length 8 != key length 16"):
        fa.flash_attention(q[:, :, :8], k, v)


@pytest.mark.skipif(DEVICE == "cuda", reason="interpreter-only refusal")
def test_bfloat16_refused_by_the_interpreter():
    q, k, v = inputs(1, 2, 2, 16, 64, torch.bfloat16)
    with pytest.raises(ValueError, match="bfloat16 is not supported by the Triton interpreter"):
        fa.flash_attention(q, k, v)


@pytest.mark.skipif(DEVICE == "cuda", reason="interpreter stand-in for the CUDA autotuner")
def test_autotuned_launch_path(monkeypatch):
    """The CUDA launch path (triton.autotune, grid from META) with one config per kernel."""
    monkeypatch.setattr(fa, "_autotune_enabled", lambda: True)
    monkeypatch.setattr(fa, "_TUNE_SPACE", {k: [v] for k, v in fa._INTERPRETER_CONFIG.items()})
    fa._tuned.cache_clear()
    try:
        check_against_reference(*inputs(1, 4, 2, 45, 64, torch.float32, seed=2), True, torch.float32)
    finally:
        fa._tuned.cache_clear()
