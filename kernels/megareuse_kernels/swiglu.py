"""Fused SwiGLU activation: out = silu(gate) * up, forward and backward in one pass each.

The FFN's two matmuls stay in torch (cuBLAS; and under tensor parallelism they are the
column-parallel layers); this kernel fuses the elementwise part between them. Eager torch
launches three kernels forward (sigmoid/silu, mul) and more backward, and keeps silu(gate) alive
for the backward; the fused version reads gate and up once, writes out once, saves only its two
inputs and recomputes the sigmoid in the backward:

    s = sigmoid(g);  d_up = d_out * g * s;  d_gate = d_out * up * s * (1 + g * (1 - s))

All arithmetic is fp32 in registers; results are rounded once to the input dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from megareuse_kernels.common import check, check_tensor, interpreting, new_output_like

BLOCK = 1024


@triton.jit
def _swiglu_fwd(G, U, OUT, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    g = tl.load(G + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=ok, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-g))
    tl.store(OUT + offs, (g * s * u).to(OUT.dtype.element_ty), mask=ok)


@triton.jit
def _swiglu_bwd(DOUT, G, U, DG, DU, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    do = tl.load(DOUT + offs, mask=ok, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=ok, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-g))
    tl.store(DU + offs, (do * g * s).to(DU.dtype.element_ty), mask=ok)
    tl.store(DG + offs, (do * u * s * (1.0 + g * (1.0 - s))).to(DG.dtype.element_ty), mask=ok)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


def _block() -> int:
    return 256 if interpreting() else BLOCK


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, same shape and dtype as ``gate``."""
    gate, up = _flat(gate), _flat(up)
    out = new_output_like(gate)
    n = gate.numel()
    if n:
        _swiglu_fwd[(triton.cdiv(n, _block()),)](gate, up, out, n, BLOCK=_block(), num_warps=4)
    return out


def swiglu_backward(dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(d_gate, d_up) for out = silu(gate) * up."""
    dout, gate, up = _flat(dout), _flat(gate), _flat(up)
    dg, du = new_output_like(gate), new_output_like(up)
    n = gate.numel()
    if n:
        _swiglu_bwd[(triton.cdiv(n, _block()),)](dout, gate, up, dg, du, n, BLOCK=_block(), num_warps=4)
    return dg, du


class FusedSwiGLU(torch.autograd.Function):
    """autograd.Function over the fused kernels (saves gate and up only)."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return swiglu_forward(gate, up)

    @staticmethod
    def backward(ctx, dout):
        gate, up = ctx.saved_tensors
        return swiglu_backward(dout, gate, up)


def unsupported_reason(gate: torch.Tensor, up: torch.Tensor) -> str | None:
    """Why (gate, up) cannot use the fused kernel, or None."""
    try:
        check_tensor(gate, "fused swiglu gate")
        check_tensor(up, "fused swiglu up")
    except ValueError as err:
        return str(err)
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.device != up.device:
        return (f"fused swiglu: gate {tuple(gate.shape)} {gate.dtype} {gate.device} and up {tuple(up.shape)} "
                f"{up.dtype} {up.device} must match in shape, dtype and device")
    return None


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Fused, differentiable silu(gate) * up."""
    check(unsupported_reason(gate, up))
    return FusedSwiGLU.apply(gate, up)
