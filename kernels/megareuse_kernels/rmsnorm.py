"""Fused RMSNorm forward and backward: y = (x * rstd).to(x.dtype) * w, rstd = 1/sqrt(mean(x^2) + eps).

Matches ``megareuse.model.norm.rms_norm``: statistics in fp32, the normalised value rounded to
the input dtype before the gain is applied (LLaMA's convention).

Forward: one program per row; the whole row (N <= 16384 features) sits in registers, is read
once and written once; the fp32 ``rstd`` per row is kept for the backward (4 bytes per row).

Backward: a fixed grid of programs (a few per SM); each walks a strided set of rows, writes
dx = rstd * (g - x_hat * mean(g * x_hat)) with g = dy * w, and accumulates its share of
dw = sum_rows dy * x_hat in fp32 registers. The partial sums [programs, N] are then reduced in
fp32 by torch and cast to the weight's dtype, so the weight gradient is summed exactly once
over every row regardless of how rows were split among programs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from megareuse_kernels.common import check, check_tensor, multiprocessor_count, new_output, next_power_of_2, rows_2d

MAX_FEATURES = 16384  # whole row in registers: beyond this the forward would spill


@triton.jit
def _rmsnorm_fwd(X, W, Y, RSTD, stride_x, stride_y, N, eps, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    ok = cols < N
    x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=ok, other=0.0).to(Y.dtype.element_ty).to(tl.float32)  # weight.to(x.dtype)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / N + eps)
    normed = (x * rstd).to(Y.dtype.element_ty).to(tl.float32)  # rounded like the torch module
    tl.store(Y + row * stride_y + cols, (normed * w).to(Y.dtype.element_ty), mask=ok)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rmsnorm_bwd(DY, X, W, RSTD, DX, DW_PARTIAL, stride_dy, stride_x, stride_dx, M, N,
                 BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    ok = cols < N
    w = tl.load(W + cols, mask=ok, other=0.0).to(DX.dtype.element_ty).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    for r in range(pid, M, n_prog):
        row = tl.cast(r, tl.int64)
        x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=ok, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        x_hat = x * rstd
        g = dy * w
        dx = rstd * (g - x_hat * (tl.sum(g * x_hat, 0) / N))
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=ok)
        dw += dy * x_hat.to(X.dtype.element_ty).to(tl.float32)
    tl.store(DW_PARTIAL + pid * N + cols, dw, mask=ok)


def _warps(block_n: int) -> int:
    return min(16, max(1, block_n // 256))


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y with x's shape, rstd [rows] fp32)."""
    x2 = rows_2d(x)
    M, N = x2.shape
    y = new_output((M, N), x.dtype, x.device)
    rstd = new_output((M,), torch.float32, x.device)
    block = next_power_of_2(N)
    if M:
        _rmsnorm_fwd[(M,)](x2, weight, y, rstd, x2.stride(0), y.stride(0), N, eps, BLOCK_N=block,
                           num_warps=_warps(block))
    return y.view(x.shape), rstd


def rms_norm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                      programs: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx with x's shape, dw with weight's dtype); ``programs`` overrides the grid size."""
    x2, dy2 = rows_2d(x), rows_2d(dy)
    M, N = x2.shape
    dx = new_output((M, N), x.dtype, x.device)
    if programs is None:
        programs = 4 * multiprocessor_count(x.device)
    programs = max(1, min(programs, M))
    partial = new_output((programs, N), torch.float32, x.device)
    block = next_power_of_2(N)
    if M:
        _rmsnorm_bwd[(programs,)](dy2, x2, weight, rstd, dx, partial, dy2.stride(0), x2.stride(0), dx.stride(0),
                                  M, N, BLOCK_N=block, num_warps=_warps(block))
        dw = partial.sum(0)
    else:
        dw = torch.zeros(N, dtype=torch.float32, device=x.device)
    return dx.view(x.shape), dw.to(weight.dtype)


class FusedRMSNorm(torch.autograd.Function):
    """autograd.Function over the fused kernels (saves x, weight and the fp32 rstd)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd = rms_norm_forward(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = rms_norm_backward(dy, x, weight, rstd)
        return dx, (dw if ctx.needs_input_grad[1] else None), None


def unsupported_reason(x: torch.Tensor, weight: torch.Tensor) -> str | None:
    """Why (x, weight) cannot use the fused kernel, or None."""
    try:
        check_tensor(x, "fused rms_norm input")
        check_tensor(weight, "fused rms_norm weight")
    except ValueError as err:
        return str(err)
    if weight.dim() != 1 or x.dim() == 0 or x.shape[-1] != weight.shape[0]:
        return f"fused rms_norm: weight {tuple(weight.shape)} does not match input {tuple(x.shape)} last dim"
    if x.shape[-1] > MAX_FEATURES:
        return f"fused rms_norm: {x.shape[-1]} features exceed the supported maximum {MAX_FEATURES}"
    if x.device != weight.device:
        return f"fused rms_norm: input on {x.device} but weight on {weight.device}"
    return None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Fused RMSNorm over the last dimension of ``x`` with gain ``weight`` (differentiable)."""
    check(unsupported_reason(x, weight))
    return FusedRMSNorm.apply(x, weight.contiguous(), float(eps))
