"""Rotary position embeddings (Su et al., 2021) in the "rotate half" layout of HF Llama.

Frequencies f_i = theta^(-2i/D) for i < D/2 are duplicated to [f, f] along the head dimension,
and a head vector x at position m becomes x * cos(m f) + rotate_half(x) * sin(m f), where
rotate_half([x1, x2]) = [-x2, x1]. Dimension i is thus paired with dimension i + D/2.
``apply_rope(..., kernels="triton" | "auto")`` uses the fused kernel of ``megareuse_kernels``
(imported on first use) where ``megareuse_kernels.select`` says it applies ("auto": only after
the kernel passed its one-time check on the device, ``megareuse_kernels.verify``).

Scaling (``RopeScaling``, from ``ModelConfig.rope_scaling``): "linear" divides every frequency by
``factor`` (position interpolation, Chen et al. 2023); "llama3" (Llama 3.1/3.2) divides only the
low frequencies, those whose wavelength 2 pi / f exceeds original / low_freq_factor, keeps those
whose wavelength is below original / high_freq_factor, and interpolates smoothly in between,
as transformers' ``_compute_llama3_parameters`` does. Both keep the attention scale at 1. Only the
tables change, so the fused kernels, which read them, need nothing else.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn


@dataclass(frozen=True)
class RopeScaling:
    """How the RoPE frequencies are stretched: kind "none", "linear" or "llama3"."""
    kind: str = "none"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192

    @classmethod
    def of(cls, cfg) -> "RopeScaling":
        """The scaling a ``ModelConfig`` asks for."""
        return cls(cfg.rope_scaling, cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor,
                   cfg.rope_original_max_seq_len)

    def apply(self, inv_freq: torch.Tensor) -> torch.Tensor:
        """The scaled frequencies (same dtype and device)."""
        if self.kind == "none":
            return inv_freq
        if self.kind == "linear":
            return inv_freq / self.factor
        if self.kind != "llama3":
            raise ValueError(f"RoPE scaling {self.kind!r}: accepted none, linear, llama3")
        wavelen = 2 * math.pi / inv_freq
        low_wavelen = self.original_max_seq_len / self.low_freq_factor  # longer: divided by factor
        high_wavelen = self.original_max_seq_len / self.high_freq_factor  # shorter: kept
        smooth = (self.original_max_seq_len / wavelen - self.low_freq_factor) / (
            self.high_freq_factor - self.low_freq_factor)
        blended = (1 - smooth) * inv_freq / self.factor + smooth * inv_freq
        out = torch.where(wavelen > low_wavelen, inv_freq / self.factor, inv_freq)
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, blended, out)


def rope_cos_sin(max_seq_len: int, head_dim: int, theta: float = 10000.0,
                 device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32,
                 scaling: Optional[RopeScaling] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (cos, sin), each [max_seq_len, head_dim], for positions 0..max_seq_len-1.

    Angles are computed in float64 and the tables cast to ``dtype`` (fp32 by default).
    """
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
    inv_freq = (scaling or RopeScaling()).apply(inv_freq)
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

    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0,
                 scaling: Optional[RopeScaling] = None):
        super().__init__()
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta
        self.scaling = scaling or RopeScaling()
        cos, sin = rope_cos_sin(max_seq_len, head_dim, theta, scaling=self.scaling)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def reset_parameters(self) -> None:
        """Recompute the tables in place (e.g. after materialising a meta-device model)."""
        cos, sin = rope_cos_sin(self.max_seq_len, self.head_dim, self.theta, device=self.cos.device,
                                scaling=self.scaling)
        self.cos, self.sin = cos, sin

    def forward(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (cos, sin) for positions 0..seq_len-1, each [seq_len, head_dim]."""
        if seq_len > self.max_seq_len:
            raise ValueError(f"sequence length {seq_len} exceeds max_seq_len={self.max_seq_len}")
        return self.cos[:seq_len], self.sin[:seq_len]
