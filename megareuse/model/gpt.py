"""A LLaMA-like decoder-only transformer: RMSNorm, RoPE, GQA attention, SwiGLU; optionally the
features of the families people reuse (q/k/v biases, per-head q/k norms, an explicit head_dim,
scaled RoPE: ``ModelConfig``, docs/hf.md).

The model knows nothing about parallelism: tensor parallelism swaps the named projections
(attention.wq/wk/wv/wo, feed_forward.w1/w3/w2, tok_embeddings, output) for sharded layers.

``GPT.forward(tokens, targets)`` returns the loss computed by the output head (``head.py``:
plain, chunked or fused cross-entropy, ``ModelConfig.loss``). Activation checkpointing
(``ModelConfig.activation_checkpointing``) recomputes the chosen blocks in the backward pass
instead of keeping their intermediate activations: "full" every block, "selective" every
``checkpoint_every``-th (blocks k-1, 2k-1, ...: torchtitan's selective layer checkpointing); only
while training with gradients enabled. Recomputation is exact (same ops, same inputs; nothing
random), so losses and gradients do not change.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from megareuse.config import ModelConfig
from megareuse.model.attention import Attention
from megareuse.model.head import LMHead, cross_entropy  # noqa: F401 (cross_entropy re-exported)
from megareuse.model.mlp import FeedForward
from megareuse.model.norm import RMSNorm
from megareuse.model.rope import RopeScaling, RotaryEmbedding

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
    """Token embedding -> n_layers Blocks -> final RMSNorm -> output head (fp32 logits, or the
    loss when given targets).

    With ``cfg.tie_embeddings`` the head's weight *is* the embedding matrix (one Parameter).
    Weights are initialised in ``__init__`` from torch's global RNG (so deterministic under
    ``torch.manual_seed``); call ``init_weights(seed)`` to re-initialise from a given seed.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.rope = RotaryEmbedding(cfg.head_size, cfg.max_seq_len, cfg.rope_theta, RopeScaling.of(cfg))
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        # an nn.Linear subclass: constructed and initialised exactly as the former nn.Linear head
        self.output = LMHead(cfg.d_model, cfg.vocab_size, cfg.loss, cfg.loss_chunk_tokens)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.init_weights()
        if cfg.attention in ("triton", "auto"):
            # norms, SwiGLU and RoPE follow the attention backend onto the fused kernels
            from megareuse_kernels.select import set_fused_kernels

            set_fused_kernels(self, cfg.attention)

    def compile_blocks(self) -> None:
        """torch.compile every block in place (``nn.Module.compile``: parameter names, state
        dicts and checkpoints stay as they are). The embedding and the head, whose loss has its
        own chunking, stay eager."""
        for layer in self.layers:
            layer.compile()

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

    def init_plan(self) -> list[tuple[str, nn.Module, float | None]]:
        """(module name, module, std) in the order ``_init_all`` initialises them: std is the
        N(0, std) of a drawn weight, None for a module reset by its own ``reset_parameters``
        (norms to ones, RoPE tables). A tied head is left out (drawn with the embedding). The
        sharded builder (megareuse/engine/build.py) replays the same draws one tensor at a time."""
        std = self.cfg.init_std
        scaled = std / math.sqrt(2 * self.cfg.n_layers)
        plan, seen = [], set()
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                if id(module.weight) in seen:  # tied head: already drawn with the embedding
                    continue
                seen.add(id(module.weight))
                plan.append((name, module, scaled if name.rsplit(".", 1)[-1] in OUTPUT_PROJECTIONS else std))
            elif isinstance(module, (RMSNorm, RotaryEmbedding)):
                plan.append((name, module, None))
        return plan

    def _init_all(self) -> None:
        for _, module, std in self.init_plan():
            if std is None:
                module.reset_parameters()
                continue
            nn.init.normal_(module.weight, 0.0, std)  # biases (q/k/v) start at zero
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """tokens LongTensor [B, T] (T <= max_seq_len) -> fp32 logits [B, T, vocab_size]; with
        ``targets`` [B, T] the fp32 mean next-token cross-entropy instead (-100 targets left out)."""
        T = tokens.shape[1]
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len={self.cfg.max_seq_len}")
        if targets is not None and targets.shape != tokens.shape:
            raise ValueError(f"targets {tuple(targets.shape)} and tokens {tuple(tokens.shape)} differ in shape")
        cos, sin = self.rope(T)
        h = self.tok_embeddings(tokens)
        for i, layer in enumerate(self.layers):
            if self._recomputed(i):
                h = checkpoint(layer, h, cos, sin, use_reentrant=False)
            else:
                h = layer(h, cos, sin)
        h = self.norm(h)
        return self.output(h).float() if targets is None else self.output(h, targets)

    def _recomputed(self, i: int) -> bool:
        """Whether block ``i`` runs under activation checkpointing in this forward."""
        mode = self.cfg.activation_checkpointing
        if mode == "none" or not (self.training and torch.is_grad_enabled()):
            return False
        return mode == "full" or (i + 1) % self.cfg.checkpoint_every == 0
