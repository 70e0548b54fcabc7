"""Fused RMSNorm, SwiGLU and RoPE vs independent float64 references, forward and backward.

Interpreter on CPU (fp32, fp16), CUDA with MEGAREUSE_TEST_GPU=1 (bf16 too). Outputs and
gradients are NaN-poisoned before the kernels write them. Inputs are random, never zeros; row
counts and widths are deliberately not powers of two (ragged blocks).
Tolerance: max |out - ref| / max |ref| per tensor below TOL[dtype].
"""
import os

import pytest
import torch

pytest.importorskip("triton")

from megareuse_kernels import rmsnorm, rope, swiglu  # noqa: E402
from megareuse_kernels.common import poisoned_outputs  # noqa: E402

DEVICE = "cuda" if os.environ.get("MEGAREUSE_TEST_GPU") == "1" else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture(autouse=True)
def _poison():
    with poisoned_outputs():
        yield


def rel_err(got, want):
    assert torch.isfinite(got).all(), "non-finite values (unwritten NaN-poisoned elements?)"
    return ((got.double() - want).abs().max() / want.abs().max()).item()


def rand(*shape, dtype=torch.float32, seed=0, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift
    return t.to(device=DEVICE, dtype=dtype).requires_grad_()


def grads_vs_reference(fn, ref_fn, tensors, dtype, seed=9):
    """Run fn on ``tensors`` and ref_fn on float64 copies; return relative errors of out and grads."""
    out = fn(*tensors)
    dout = rand(*out.shape, dtype=torch.float64, seed=seed).detach()
    out.backward(dout.to(dtype))
    copies = [t.detach().double().requires_grad_() for t in tensors]
    ref = ref_fn(*copies)
    ref.backward(dout)
    assert out.dtype == dtype and out.shape == ref.shape
    errs = {"out": rel_err(out, ref)}
    errs.update({f"d{i}": rel_err(t.grad, c.grad) for i, (t, c) in enumerate(zip(tensors, copies))})
    return errs


# ----------------------------------------------------------------------------- RMSNorm
def ref_rms_norm(x, w, eps=1e-5):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 7, 96), (5, 200)], ids=["3d-96", "2d-200"])
def test_rms_norm_matches_float64(dtype, shape):
    x = rand(*shape, dtype=dtype, seed=1, scale=2.0, shift=0.3)
    w = rand(shape[-1], dtype=dtype, seed=2, shift=1.0)
    errs = grads_vs_reference(lambda a, b: rmsnorm.rms_norm(a, b, 1e-5), ref_rms_norm, [x, w], dtype)
    assert max(errs.values()) < TOL[dtype], errs


@pytest.mark.parametrize("programs", [1, 3, 16])
def test_rms_norm_weight_grad_reduced_over_all_rows(programs):
    """dw = sum over every row, however the rows are split among programs (17 rows)."""
    x, w = rand(17, 40, seed=3).detach(), rand(40, seed=4, shift=1.0).detach()
    dy = rand(17, 40, seed=5).detach()
    _, rstd = rmsnorm.rms_norm_forward(x, w, 1e-5)
    dx, dw = rmsnorm.rms_norm_backward(dy, x, w, rstd, programs=programs)
    x64 = x.double().requires_grad_()
    w64 = w.double().requires_grad_()
    ref_rms_norm(x64, w64).backward(dy.double())
    assert rel_err(dw, w64.grad) < 1e-5 and rel_err(dx, x64.grad) < 1e-5


def test_rms_norm_fp32_weight_with_half_input():
    """The model's case under mixed precision: fp16 activations, fp32 gain (weight.to(x.dtype))."""
    x, w = rand(4, 64, dtype=torch.float16, seed=6), rand(64, seed=7, shift=1.0)
    errs = grads_vs_reference(lambda a, b: rmsnorm.rms_norm(a, b), ref_rms_norm, [x, w], torch.float16)
    assert w.grad.dtype == torch.float32 and max(errs.values()) < TOL[torch.float16], errs


def test_rms_norm_rejects_mismatch():
    with pytest.raises(ValueError, match="does not match input"):
        rmsnorm.rms_norm(rand(2, 8), rand(9))
    with pytest.raises(ValueError, match="dtype float64 is not supported; accepted: float16, bfloat16, float32"):
        rmsnorm.rms_norm(rand(2, 8, dtype=torch.float64), rand(8))


# ----------------------------------------------------------------------------- SwiGLU
def ref_swiglu(g, u):
    return g * torch.sigmoid(g) * u


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_swiglu_matches_float64(dtype):
    g, u = rand(3, 5, 111, dtype=dtype, seed=1, scale=3.0), rand(3, 5, 111, dtype=dtype, seed=2)
    errs = grads_vs_reference(swiglu.swiglu, ref_swiglu, [g, u], dtype)
    assert max(errs.values()) < TOL[dtype], errs


def test_swiglu_non_contiguous_inputs_and_errors():
    g = rand(7, 30, seed=3).detach().t().requires_grad_()  # [30, 7], transposed
    u = rand(30, 7, seed=4)
    errs = grads_vs_reference(swiglu.swiglu, ref_swiglu, [g, u], torch.float32)
    assert max(errs.values()) < TOL[torch.float32], errs
    with pytest.raises(ValueError, match="must match in shape"):
        swiglu.swiglu(rand(3, 4), rand(4, 3))


# ----------------------------------------------------------------------------- RoPE
def ref_rope(x, theta=10000.0):
    """Complex rotation in float64: (x_i, x_{i+D/2}) as z_i, times e^{i m theta^(-2i/D)}."""
    D, T = x.shape[-1], x.shape[-2]
    f = theta ** (-torch.arange(0, D, 2, dtype=torch.float64, device=x.device) / D)
    ang = torch.arange(T, dtype=torch.float64, device=x.device)[:, None] * f
    z = torch.complex(x[..., : D // 2], x[..., D // 2:]) * torch.polar(torch.ones_like(ang), ang)
    return torch.cat([z.real, z.imag], -1)


def tables(T, D):
    from megareuse.model.rope import rope_cos_sin

    cos, sin = rope_cos_sin(T, D)
    return cos.to(DEVICE), sin.to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [64, 24])
def test_rope_out_of_place_matches_float64(dtype, D):
    x = rand(2, 3, 37, D, dtype=dtype, seed=D)
    cos, sin = tables(37, D)
    x_before = x.detach().clone()
    errs = grads_vs_reference(lambda a: rope.apply_rope(a, cos, sin), ref_rope, [x], dtype)
    assert max(errs.values()) < TOL[dtype], errs
    assert torch.equal(x.detach(), x_before)  # out of place leaves x alone


def test_rope_in_place_on_model_layout_view():
    """In place on a transposed [B, T, H, D] view (the model's q), gradient through the view."""
    base = rand(2, 19, 4, 64, seed=8)
    cos, sin = tables(19, 64)
    proj = base * 1.0  # a non-leaf, like a projection output
    x = proj.transpose(1, 2)
    out = rope.apply_rope(x, cos, sin, inplace=True)
    assert out.data_ptr() == x.data_ptr()
    dout = rand(*out.shape, seed=10).detach()
    out.backward(dout)
    b64 = base.detach().double().requires_grad_()
    ref = ref_rope(b64.transpose(1, 2))
    ref.backward(dout.double())
    assert rel_err(out, ref) < 1e-5 and rel_err(base.grad, b64.grad) < 1e-5


def test_rope_rejects_bad_tables():
    x = rand(1, 2, 8, 16)
    cos, sin = tables(9, 16)
    with pytest.raises(ValueError, match=r"cos/sin must be \[T, D\] = \[8, 16\]"):
        rope.apply_rope(x, cos, sin)
