"""RMSNorm (Zhang & Sennrich, 2019), as used by LLaMA.

Unlike LayerNorm there is no mean subtraction and no bias: each vector is divided by its
root mean square over the last dimension and multiplied by a learned per-channel gain.
``RMSNorm.kernels`` ("torch" by default, "triton" or "auto") lets the module use the fused
Triton kernel (or apex's FusedRMSNorm in "auto" mode when apex is importable) of
``megareuse_kernels``; see ``megareuse_kernels.select.set_fused_kernels``. In "auto" mode the
Triton kernel runs only after passing its one-time check on the device (``verify.py``).
"""
from __future__ import annotations

import torch
from torch import nn


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """Functional RMSNorm: x / sqrt(mean(x^2, -1) + eps) [* weight].

    The statistics are computed in fp32 (fp64 stays fp64) and the normalised value is cast
    back to ``x.dtype`` before the gain is applied, as in the LLaMA reference code; this keeps
    bf16 training stable without materialising an fp32 copy of the output.
    """
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return normed if weight is None else normed * weight.to(x.dtype)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2, last dim) + eps) * weight, weight initialised to ones.

    Under tensor parallelism the activations it sees are replicated, so this module is used
    unchanged on every rank.
    """

    def __init__(self, dim: int, eps: float = 1e-5, kernels: str = "torch"):
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.kernels = kernels
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels != "torch":
            from megareuse_kernels import select

            out = select.rms_norm(x, self.weight, self.eps, self.kernels)
            if out is not None:
                return out
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        fused = "" if self.kernels == "torch" else f", kernels={self.kernels!r}"
        return f"{self.dim}, eps={self.eps}{fused}"
