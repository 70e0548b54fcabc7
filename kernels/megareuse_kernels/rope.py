"""Fused rotary position embedding (rotate-half layout), forward and backward, in or out of place.

For x [B, H, T, D] (any strides with a unit last-dimension stride, e.g. the model's transposed
[B, T, H, D] projections) and tables cos/sin [T, D] in the ``[f, f]`` layout produced by
``megareuse.model.rope.rope_cos_sin``, dimension i pairs with i + D/2:

    out[:D/2] = x1 * cos - x2 * sin,    out[D/2:] = x2 * cos + x1 * sin

Only the first half of each table row is read (the second half repeats it). The backward is the
rotation by the opposite angle (sin -> -sin), so it is the same kernel with a flag. The math is
fp32 in registers (the torch version multiplies in the input dtype, so half-precision results
differ from it by rounding only). With ``inplace=True`` the result overwrites x, which autograd
is told about (``mark_dirty``); the gradient is then computed out of place.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from megareuse_kernels.common import check, check_tensor, new_output_like, next_power_of_2


@triton.jit
def _rope_kernel(X, OUT, COS, SIN, sxb, sxh, sxt, sob, soh, sot, sct, sst, H, T, HALF,
                 BLOCK_T: tl.constexpr, BLOCK_HALF: tl.constexpr, BACKWARD: tl.constexpr):
    pid_t = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_HALF)
    ok = (rows[:, None] < T) & (cols[None, :] < HALF)
    x_ptr = X + b * sxb + h * sxh + rows[:, None] * sxt + cols[None, :]
    x1 = tl.load(x_ptr, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + HALF, mask=ok, other=0.0).to(tl.float32)
    c = tl.load(COS + rows[:, None] * sct + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    s = tl.load(SIN + rows[:, None] * sst + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    if BACKWARD:
        s = -s
    o_ptr = OUT + b * sob + h * soh + rows[:, None] * sot + cols[None, :]
    tl.store(o_ptr, (x1 * c - x2 * s).to(OUT.dtype.element_ty), mask=ok)
    tl.store(o_ptr + HALF, (x2 * c + x1 * s).to(OUT.dtype.element_ty), mask=ok)


def _launch(x: torch.Tensor, out: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> None:
    B, H, T, D = x.shape
    half = D // 2
    block_half = next_power_of_2(half)
    block_t = max(1, min(64, 4096 // block_half, next_power_of_2(T)))
    if x.numel():
        _rope_kernel[(triton.cdiv(T, block_t), B * H)](
            x, out, cos, sin, *x.stride()[:3], *out.stride()[:3], cos.stride(0), sin.stride(0), H, T, half,
            BLOCK_T=block_t, BLOCK_HALF=block_half, BACKWARD=backward, num_warps=4)


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def rope_forward(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """Rotate x by position (no autograd); writes into x when ``inplace``."""
    if inplace and x.stride(-1) != 1:
        raise ValueError("fused rope: inplace needs a unit stride on the last dimension of x")
    x = _unit_last(x)
    out = x if inplace else new_output_like(x)
    _launch(x, out, _unit_last(cos), _unit_last(sin), backward=False)
    return out


def rope_backward(dout: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Gradient of the rotation: rotate dout by the opposite angle (out of place)."""
    dout = _unit_last(dout)
    dx = new_output_like(dout)
    _launch(dout, dx, _unit_last(cos), _unit_last(sin), backward=True)
    return dx


class FusedRoPE(torch.autograd.Function):
    """autograd.Function over the kernel; saves only the cos/sin tables."""

    @staticmethod
    def forward(ctx, x, cos, sin, inplace):
        out = rope_forward(x, cos, sin, inplace)
        if inplace:
            ctx.mark_dirty(x)
        ctx.save_for_backward(cos, sin)
        return out

    @staticmethod
    def backward(ctx, dout):
        cos, sin = ctx.saved_tensors
        return rope_backward(dout, cos, sin), None, None, None


def unsupported_reason(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> str | None:
    """Why (x, cos, sin) cannot use the fused kernel, or None."""
    try:
        check_tensor(x, "fused rope input")
        check_tensor(cos, "fused rope cos table")
        check_tensor(sin, "fused rope sin table")
    except ValueError as err:
        return str(err)
    if x.dim() != 4 or x.shape[-1] % 2:
        return f"fused rope: x must be [B, H, T, D] with an even D, got {tuple(x.shape)}"
    want = (x.shape[2], x.shape[3])
    if tuple(cos.shape) != want or tuple(sin.shape) != want:
        return f"fused rope: cos/sin must be [T, D] = {list(want)}, got {list(cos.shape)}, {list(sin.shape)}"
    if not (x.device == cos.device == sin.device):
        return f"fused rope: x on {x.device}, tables on {cos.device}, {sin.device}"
    return None


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """Fused, differentiable RoPE of x [B, H, T, D] with [T, D] tables (see module docstring)."""
    check(unsupported_reason(x, cos, sin))
    return FusedRoPE.apply(x, cos, sin, bool(inplace))
