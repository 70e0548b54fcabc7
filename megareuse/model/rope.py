"""Rotary position embeddings (Su et al., 2021) in the "rotate half" layout of HF Llama.

Frequencies f_i = theta^(-2i/D) for i < D/2 are duplicated to [f, f] along the head dimension,
and a head vector x at position m becomes x * cos(m f) + rotate_half(x) * sin(m f), where
rotate_half([x1, x2]) = [-x2, x1]. Dimension i is thus paired with dimension i + D/2.
``apply_rope(..., kernels="triton" | "auto")`` uses the fused kernel of ``megareuse_kernels``
(imported on first use) where ``megareuse_kernels.select`` says it applies ("auto": only after
the kernel passed its one-time check on the device, ``megareuse_kernels.verify``).
"""
from __future__ import annotations

import torch
from torch import nn


def rope_cos_sin(max_seq_len: int, head_dim: int, theta: float = 10000.0,
                 device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (cos, sin), each [max_seq_len, head_dim], for positions 0..max_seq_len-1.

    Angles are computed in float64 and the tables cast to ``dtype`` (fp32 by default).
    """
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
    pos = torch.arange(max_seq_len, dtype=torch.float64, device=device)
    angles = torch.outer(pos, inv_freq)  # [T, D/2]
    angles = torch.cat([angles, angles], dim=-1)  # [T, D]: [f, f]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] on the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kernels: str = "torch") -> torch.Tensor:
    """Rotate x [B, H, T, D] by position; cos/sin are [T, D] (rows 0..T-1 of the tables).

    ``kernels`` ("torch", "triton", "auto") selects the fused Triton kernel where supported.
    """
    if kernels != "torch":
        from megareuse_kernels import select

        out = select.rope(x, cos, sin, kernels)
        if out is not None:
            return out
    cos = cos.to(x.dtype)
    sin = sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


class RotaryEmbedding(nn.Module):
    """Holds the cos/sin tables as non-persistent buffers (never in a state_dict)."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0):
        super().__init__()
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta
        cos, sin = rope_cos_sin(max_seq_len, head_dim, theta)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def reset_parameters(self) -> None:
        """Recompute the tables in place (e.g. after materialising a meta-device model)."""
        cos, sin = rope_cos_sin(self.max_seq_len, self.head_dim, self.theta, device=self.cos.device)
        self.cos, self.sin = cos, sin

    def forward(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (cos, sin) for positions 0..seq_len-1, each [seq_len, head_dim]."""
        if seq_len > self.max_seq_len:
            raise ValueError(f"sequence length {seq_len} exceeds max_seq_len={self.max_seq_len}")
        return self.cos[:seq_len], self.sin[:seq_len]
