"""SwiGLU feed-forward block (Shazeer, 2020, "GLU Variants Improve Transformer"), LLaMA naming.

A SwiGLU FFN with hidden width F has 3 * d_model * F weights; LLaMA picks F ~ 8/3 * d_model
(rounded up to a multiple) so that it costs about as much as a 4 * d_model GELU MLP.
``swiglu_hidden`` computes that width for configs that want the LLaMA rule; the model itself
always uses ``ModelConfig.ffn_hidden`` as given. ``FeedForward.kernels`` ("torch" by default,
"triton" or "auto") fuses silu(gate) * up into one Triton kernel (``megareuse_kernels``; in
"auto" mode only after it passed its one-time check on the device, ``verify.py``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def swiglu_hidden(d_model: int, multiple_of: int = 32, multiplier: float = 1.0) -> int:
    """LLaMA's SwiGLU width: int(multiplier * 8 d_model / 3) rounded up to ``multiple_of``."""
    if d_model <= 0 or multiple_of <= 0 or multiplier <= 0:
        raise ValueError(f"swiglu_hidden needs positive arguments, got {d_model}, {multiple_of}, {multiplier}")
    hidden = int(multiplier * 8 * d_model / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class FeedForward(nn.Module):
    """out = w2(silu(w1 x) * w3 x).

    w1 (gate) and w3 (up) are d_model -> hidden, w2 (down) is hidden -> d_model, all bias-free.
    Under tensor parallelism w1/w3 become column-parallel and w2 row-parallel; this module
    only ever calls them, so it needs no change.
    """

    def __init__(self, d_model: int, hidden: int, kernels: str = "torch"):
        super().__init__()
        self.w1 = nn.Linear(d_model, hidden, bias=False)
        self.w3 = nn.Linear(d_model, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d_model, bias=False)
        self.d_model, self.hidden = d_model, hidden
        self.kernels = kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels != "torch":
            from megareuse_kernels import select

            act = select.swiglu(self.w1(x), self.w3(x), self.kernels)
            if act is not None:
                return self.w2(act)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def extra_repr(self) -> str:
        fused = "" if self.kernels == "torch" else f", kernels={self.kernels!r}"
        return f"d_model={self.d_model}, hidden={self.hidden}{fused}"
