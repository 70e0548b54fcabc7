"""The vocabulary-parallel output head: the model's ``LMHead`` under tensor parallelism.

A ``ColumnParallelLinear`` over the vocabulary with ``gather_output=False`` (rank r holds rows
[r*V/tp, (r+1)*V/tp) of the head weight). Without targets it returns this rank's logit slice,
as before, for ``tensor_parallel.loss_fn``; with targets it returns the full-vocabulary mean
cross-entropy (the same on every TP rank) by the head's configured implementation:

- plain: the local logits -> ``vocab_parallel_cross_entropy`` (three all-reduces of [N] tensors);
- chunked / fused: ``megareuse.model.head.linear_cross_entropy`` with the TP group, which
  all-reduces the statistics and the hidden gradient itself, so the input does not go through
  ``copy_to_tp`` (that would sum the hidden gradient twice).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megareuse.model.head import LMHead, linear_cross_entropy, resolve_loss
from megareuse.parallel.cross_entropy import vocab_parallel_cross_entropy
from megareuse.parallel.layers import ColumnParallelLinear
from megareuse.parallel.state import ParallelState


def checked_on(h: torch.Tensor) -> bool:
    """Whether ``auto`` may pick the fused loss for ``h`` after a per-rank check (CUDA only)."""
    return h.device.type == "cuda"


class VocabParallelHead(ColumnParallelLinear):
    """Column-parallel head (vocabulary split, output not gathered) that can compute the loss."""

    loss, chunk_tokens = "plain", 1024  # set from the LMHead by from_linear
    _fused_everywhere: Optional[bool] = None  # auto on CUDA: every TP rank's fused check passed

    @classmethod
    def from_linear(cls, linear: LMHead, state: ParallelState) -> "VocabParallelHead":
        """This rank's vocabulary rows of a full ``LMHead`` (or ``nn.Linear``), same loss settings."""
        head = super().from_linear(linear, state, gather_output=False)
        head.loss = getattr(linear, "loss", cls.loss)
        head.chunk_tokens = getattr(linear, "chunk_tokens", cls.chunk_tokens)
        return head

    def forward(self, h: torch.Tensor, targets: Optional[torch.Tensor] = None) -> torch.Tensor:
        """h [..., d] -> local logits [..., V/tp]; with targets [...]: the fp32 mean loss."""
        if targets is None:
            return super().forward(h)
        impl = self._agreed(resolve_loss(self.loss, h, self.chunk_tokens, self.weight.shape[0]), h)
        if impl == "plain":
            return vocab_parallel_cross_entropy(super().forward(h), targets, self.state, "mean")
        group = self.state.tp_group if self.state.tp_size > 1 else None
        return linear_cross_entropy(impl, h, self.weight, targets, self.chunk_tokens, group, self.out_range[0])

    def _agreed(self, impl: str, h: torch.Tensor) -> str:
        """``auto`` on CUDA picks the fused kernel after a check each rank runs for itself
        (megareuse_kernels/verify.py); the TP ranks must pick alike, since the fused and the
        chunked loss all-reduce at different points. Decided once, on the first call, by a host
        all-reduce (MIN) over the TP group: fused only where every rank's check passed."""
        if self.loss != "auto" or self.state.tp_size == 1 or not checked_on(h):
            return impl
        if self._fused_everywhere is None:
            flag = torch.tensor([int(impl == "fused")], dtype=torch.int32, device="cpu")
            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.state.tp_group)
            self._fused_everywhere = bool(flag.item())
        if impl == "fused" and not self._fused_everywhere:
            return "plain" if h.numel() // h.shape[-1] <= self.chunk_tokens else "chunked"
        return impl

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, loss={self.loss!r}, chunk_tokens={self.chunk_tokens}"
