"""Causal multi-head / grouped-query self-attention with a pluggable kernel registry.

A backend is a function ``fn(q, k, v, causal=True)`` taking q [B, H, T, D] and k, v
[B, Hkv, T, D] (H a multiple of Hkv; query head h reads kv head h // (H // Hkv)) and returning
[B, H, T, D] scaled by 1/sqrt(D). Built in: "sdpa" (PyTorch's fused kernel), "eager"
(an explicit fp32 softmax reference), "triton" (the flash-attention kernel of
``megareuse_kernels``, falling back to SDPA with a logged reason for shapes it does not take) and
"auto" (Triton for supported CUDA inputs once the kernel has passed its one-time check against a
float64 reference on that device, dtype and shape class, ``megareuse_kernels.verify``; SDPA
otherwise; the choice is logged once). The Triton backends import triton only when first
called. Others plug in with ``register_attention_backend``.

With "triton" / "auto" the module's RoPE also uses the fused kernel (``Attention.kernels``).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from megareuse.config import ModelConfig
from megareuse.model.norm import RMSNorm
from megareuse.model.rope import apply_rope

AttentionFn = Callable[..., torch.Tensor]
_BACKENDS: dict[str, AttentionFn] = {}
_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, Hkv, T, D] -> [B, Hkv * n_rep, T, D], each kv head repeated n_rep times in place."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """torch.nn.functional.scaled_dot_product_attention (flash / memory-efficient / math)."""
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1 and _SDPA_HAS_GQA:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """Reference: softmax(q k^T / sqrt(D) + causal mask) v, computed in fp32 (or fp64 if given)."""
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    dtype = torch.promote_types(q.dtype, torch.float32)
    scores = q.to(dtype) @ k.to(dtype).transpose(-2, -1) / math.sqrt(q.shape[-1])
    if causal:
        T, S = scores.shape[-2:]
        upper = torch.ones(T, S, dtype=torch.bool, device=q.device).triu(S - T + 1)
        scores = scores.masked_fill(upper, float("-inf"))
    return (scores.softmax(dim=-1) @ v.to(dtype)).to(q.dtype)


def triton_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """Triton flash attention; inputs it does not support go to SDPA (the reason logged once)."""
    from megareuse_kernels import select

    out = select.attention(q, k, v, causal, "triton")
    return sdpa_attention(q, k, v, causal) if out is None else out


def auto_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """Triton flash attention on CUDA when importable, supported and verified on this device
    (``megareuse_kernels.verify``), SDPA otherwise (logged once)."""
    from megareuse_kernels import select

    out = select.attention(q, k, v, causal, "auto")
    return sdpa_attention(q, k, v, causal) if out is None else out


def register_attention_backend(name: str, fn: AttentionFn) -> None:
    """Make ``fn`` selectable as ``model.attention: <name>``.

    The name is also appended to ``ModelConfig.ATTENTION_BACKENDS`` so that config validation
    accepts it. Re-registering a name replaces its function.
    """
    if not name or not callable(fn):
        raise ValueError(f"register_attention_backend needs a name and a callable, got {name!r}, {fn!r}")
    _BACKENDS[name] = fn
    if name not in ModelConfig.ATTENTION_BACKENDS:
        ModelConfig.ATTENTION_BACKENDS = tuple(ModelConfig.ATTENTION_BACKENDS) + (name,)


def attention_backends() -> tuple[str, ...]:
    """Names of the registered backends."""
    return tuple(_BACKENDS)


def get_attention_backend(name: str) -> AttentionFn:
    """Look a backend up by name; unknown names raise ValueError listing the accepted ones."""
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown attention backend {name!r}; accepted: {', '.join(_BACKENDS)}") from None


register_attention_backend("sdpa", sdpa_attention)
register_attention_backend("eager", eager_attention)
register_attention_backend("triton", triton_attention)
register_attention_backend("auto", auto_attention)
_FUSED_MODE = {"triton": "triton", "auto": "auto"}  # backend -> kernel mode of the module's RoPE


class Attention(nn.Module):
    """Causal self-attention with RoPE and grouped-query heads.

    wq: d_model -> n_heads*head_dim, wk/wv: d_model -> n_kv_heads*head_dim,
    wo: n_heads*head_dim -> d_model. Bias-free unless ``cfg.qkv_bias`` (biases on q, k, v, never
    on o: Qwen2's layout). With ``cfg.qk_norm`` each head's q and k are RMS-normalised over the
    head dimension before RoPE, one gain of size head_dim per projection shared by all heads
    (Qwen3's ``q_norm`` / ``k_norm``). Head counts are read from the projection outputs at run
    time, so a tensor-parallel wrapper can swap wq/wk/wv for column-parallel and wo for
    row-parallel layers (each rank then holds a slice of the heads) without touching this code.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_dim = cfg.head_size
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.kv_heads
        self.backend = cfg.attention
        get_attention_backend(self.backend)  # fail at construction, not first forward
        self.kernels = _FUSED_MODE.get(self.backend, "torch")  # RoPE: "torch", "triton" or "auto"
        if self.backend == "triton":
            from megareuse_kernels.select import require_triton

            require_triton("model.attention='triton'")
        self.wq = nn.Linear(cfg.d_model, self.n_heads * self.head_dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(self.n_heads * self.head_dim, cfg.d_model, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, T, d_model], cos/sin [T, head_dim] -> [B, T, d_model]."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, -1, self.head_dim)  # [B, T, H, D]
        k = self.wk(x).view(B, T, -1, self.head_dim)  # [B, T, Hkv, D]
        v = self.wv(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, H, T, D]
        q, k = apply_rope(q, cos, sin, self.kernels), apply_rope(k, cos, sin, self.kernels)
        out = get_attention_backend(self.backend)(q, k, v, causal=True)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))

    def extra_repr(self) -> str:
        return (f"n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, backend={self.backend!r}, "
                f"kernels={self.kernels!r}")
