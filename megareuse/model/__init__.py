"""The LLaMA-like model, its attention backends, and closed-form size / FLOP counts."""
from megareuse.model.attention import register_attention_backend
from megareuse.model.flops import flops_per_token, forward_flops_per_token, non_embedding_param_count, param_count
from megareuse.model.gpt import GPT, cross_entropy

__all__ = ["GPT", "cross_entropy", "param_count", "non_embedding_param_count", "flops_per_token",
           "forward_flops_per_token", "register_attention_backend"]
