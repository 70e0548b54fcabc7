"""A LLaMA-like decoder-only transformer: RMSNorm, RoPE, GQA attention, SwiGLU, no biases.

The model knows nothing about parallelism: tensor parallelism swaps the named projections
(attention.wq/wk/wv/wo, feed_forward.w1/w3/w2, tok_embeddings, output) for sharded layers.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from megareuse.config import ModelConfig
from megareuse.model.attention import Attention
from megareuse.model.mlp import FeedForward
from megareuse.model.norm import RMSNorm
from megareuse.model.rope import RotaryEmbedding

# Linear layers whose output is added to the residual stream get the scaled init.
OUTPUT_PROJECTIONS = ("wo", "w2")


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer_id: int = 0):
        super().__init__()
        self.layer_id = layer_id
        self.attention_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg.d_model, cfg.ffn_hidden)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.feed_forward(self.ffn_norm(x))


class GPT(nn.Module):
    """Token embedding -> n_layers Blocks -> final RMSNorm -> output head (fp32 logits).

    With ``cfg.tie_embeddings`` the head's weight *is* the embedding matrix (one Parameter).
    Weights are initialised in ``__init__`` from torch's global RNG (so deterministic under
    ``torch.manual_seed``); call ``init_weights(seed)`` to re-initialise from a given seed.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.init_weights()
        if cfg.attention in ("triton", "auto"):
            # norms, SwiGLU and RoPE follow the attention backend onto the fused kernels
            from megareuse_kernels.select import set_fused_kernels

            set_fused_kernels(self, cfg.attention)

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """N(0, init_std) for embeddings and linears; N(0, init_std / sqrt(2 n_layers)) for the
        residual output projections (wo, w2; GPT-2 / Megatron scaled init); norms to ones.

        With ``seed`` the draws come from a forked RNG seeded with it (global RNG untouched).
        Also recomputes the RoPE tables (needed after materialising a meta-device model).
        """
        if seed is None:
            self._init_all()
            return
        devices = sorted({p.device.index or 0 for p in self.parameters() if p.device.type == "cuda"})
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            self._init_all()

    def _init_all(self) -> None:
        std = self.cfg.init_std
        scaled = std / math.sqrt(2 * self.cfg.n_layers)
        seen: set[int] = set()
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                if id(module.weight) in seen:  # tied head: already drawn with the embedding
                    continue
                seen.add(id(module.weight))
                leaf = name.rsplit(".", 1)[-1]
                nn.init.normal_(module.weight, 0.0, scaled if leaf in OUTPUT_PROJECTIONS else std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (RMSNorm, RotaryEmbedding)):
                module.reset_parameters()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens LongTensor [B, T] (T <= max_seq_len) -> fp32 logits [B, T, vocab_size]."""
        T = tokens.shape[1]
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len={self.cfg.max_seq_len}")
        cos, sin = self.rope(T)
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, cos, sin)
        return self.output(self.norm(h)).float()

    def num_params(self) -> int:
        """Unique parameters actually held (a tied embedding counts once)."""
        return sum(p.numel() for p in self.parameters())


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) over all tokens, computed in fp32.

    logits [..., V], targets [...] (same leading shape); targets equal to ``ignore_index``
    are left out of the mean.
    """
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=ignore_index)
