"""Closed-form parameter and FLOP counts from a ModelConfig (no module is built).

Conventions (used by the scaling-law code):
- ``non_embedding_param_count`` is the N of Kaplan et al. (2020) and of the reuse paper's
  compute C = 6 N D: every parameter except the token embedding and the output head
  (all attention and SwiGLU matrices plus the RMSNorm weights, including the final norm).
- ``flops_per_token`` is the PaLM (Chowdhery et al. 2022, App. B) / Chinchilla accounting of
  training FLOPs (forward + backward = 3x forward, a multiply-add = 2 FLOPs).
"""
from __future__ import annotations

import math

from megareuse.config import ModelConfig


LAYER_WEIGHTS = ("attention_norm.weight", "attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
                 "attention.wo.weight", "ffn_norm.weight", "feed_forward.w1.weight", "feed_forward.w3.weight",
                 "feed_forward.w2.weight")  # one block's weights, in HF's file order
QKV_BIASES = ("attention.wq.bias", "attention.wk.bias", "attention.wv.bias")  # model.qkv_bias
QK_NORMS = ("attention.q_norm.weight", "attention.k_norm.weight")  # model.qk_norm


def layer_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name (inside ``layers.N.``) -> shape of one block's tensors, the optional ones included
    when the config has them."""
    d, f, q, kv = cfg.d_model, cfg.ffn_hidden, cfg.n_heads * cfg.head_size, cfg.kv_heads * cfg.head_size
    layer = dict(zip(LAYER_WEIGHTS, [(d,), (q, d), (kv, d), (kv, d), (d, q), (d,), (f, d), (f, d), (d, f)]))
    if cfg.qkv_bias:
        layer.update(zip(QKV_BIASES, [(q,), (kv,), (kv,)]))
    if cfg.qk_norm:
        layer.update({name: (cfg.head_size,) for name in QK_NORMS})
    return layer


def weight_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of every tensor of ``GPT(cfg).state_dict()`` (closed form; a tied head is
    listed too: it is the embedding)."""
    layer = layer_shapes(cfg)
    shapes = {"tok_embeddings.weight": (cfg.vocab_size, cfg.d_model)}
    for i in range(cfg.n_layers):
        shapes.update({f"layers.{i}.{name}": shape for name, shape in layer.items()})
    shapes.update({"norm.weight": (cfg.d_model,), "output.weight": (cfg.vocab_size, cfg.d_model)})
    return shapes


def layer_param_count(cfg: ModelConfig) -> int:
    """Parameters of one transformer block (attention, MLP and their two norms)."""
    return sum(math.prod(shape) for shape in layer_shapes(cfg).values())


def non_embedding_param_count(cfg: ModelConfig) -> int:
    """All parameters except the token embedding and the output head (Kaplan's N)."""
    return cfg.n_layers * layer_param_count(cfg) + cfg.d_model  # + final norm


def param_count(cfg: ModelConfig, embedding: bool = True) -> int:
    """Exact number of unique parameters of ``GPT(cfg)``.

    The token embedding (vocab_size x d_model) counts once when tied to the output head;
    an untied head adds another vocab_size x d_model. ``embedding=False`` returns
    ``non_embedding_param_count(cfg)`` (drops the embedding and the head).
    """
    if not embedding:
        return non_embedding_param_count(cfg)
    table = cfg.vocab_size * cfg.d_model
    return non_embedding_param_count(cfg) + table * (1 if cfg.tie_embeddings else 2)


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> int:
    """Training FLOPs per token (forward + backward), PaLM / Chinchilla accounting:

        6 * N + 12 * n_layers * (n_heads * head_dim) * seq_len

    with N = non_embedding_param_count(cfg) + vocab_size * d_model (the output-head matmul;
    the embedding lookup is free, tied or not). The first term is the weight matmuls (the few
    RMSNorm weights inside N are included, a negligible overcount); the second is
    QK^T and attention @ V: 2 matmuls x 2 FLOPs x 3 (fwd + bwd) x n_heads*head_dim x seq_len
    per layer. The causal mask is *not* credited: the attention term counts the full
    seq_len x seq_len score matrix (as PaLM's MFU does), not half of it. GQA does not reduce
    the attention term (it is set by the query heads). ``seq_len`` defaults to max_seq_len.
    """
    T = cfg.max_seq_len if seq_len is None else seq_len
    n = non_embedding_param_count(cfg) + cfg.vocab_size * cfg.d_model
    return 6 * n + 12 * cfg.n_layers * cfg.n_heads * cfg.head_size * T


def forward_flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> int:
    """Forward-only FLOPs per token: one third of ``flops_per_token`` (evaluation cost)."""
    return flops_per_token(cfg, seq_len) // 3
