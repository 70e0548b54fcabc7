"""The output head: final hidden states -> logits, or -> the mean next-token cross-entropy.

The loss is computed by the head module itself (``GPT.forward(tokens, targets)``) so that (1) the
head's weight is only used inside its own module's forward, which is where DeepSpeed ZeRO-3
gathers a partitioned parameter, and (2) it can be formed without the full [N, V] logits
(N = B*T tokens). ``ModelConfig.loss`` picks the implementation:

- ``plain``: logits = h W^T for all tokens, then fp32 cross-entropy (the reference; the [N, V]
  fp32 logits and their log-softmax are held for the backward);
- ``chunked``: ``chunked_linear_cross_entropy`` below, torch only, any device;
- ``fused``: the Triton kernel ``megareuse_kernels.cross_entropy.linear_cross_entropy`` (CUDA, or
  CPU under TRITON_INTERPRET=1), which forms the gradients during the forward;
- ``auto``: fused for CUDA tensors when Triton runs here and the kernel passed its one-time
  check against a float64 reference on that device, dtype and vocabulary size
  (``megareuse_kernels.verify``; a failure is logged once and never retried in the process),
  else chunked; plain when all N tokens fit in one chunk (chunking would only add its backward
  recomputation). The GPU configs ship ``chunked`` explicitly until benchmarks/gpu.sh has
  recorded the fused kernel's parity on a GPU (docs/kernels.md).

Chunked design: the forward keeps only the per-token log-sum-exp; the backward recomputes each
chunk's logits (one extra [chunk, d] x [d, V] matmul per chunk) and turns them into
d logits = softmax - onehot in place. So at most one chunk of logits exists at any time, forward
or backward, nothing beyond (hidden, weight, [N] statistics) is held between the two, and an
evaluation forward does no gradient work. (Forming the gradients in the forward, as the Triton
kernel does, saves that matmul but holds the [N, d] and fp32 [V, d] gradients until backward.)

Both chunked and fused take the vocabulary-sharded layout of tensor parallelism: ``weight`` is
rows [vocab_start, vocab_start + V_local) of the full matrix, the statistics (max, sum of exp,
target logit) are all-reduced over ``process_group`` so that the loss is the full-vocabulary one,
and the hidden gradient is all-reduced too: pass the replicated hidden states as they are (no
copy-to-tensor-parallel mapping). The model itself never passes a group.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) over all tokens, computed in fp32 (fp64 stays fp64).

    logits [..., V], targets [...] (same leading shape); targets equal to ``ignore_index``
    are left out of the mean.
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=ignore_index)


def _all_reduce(x: torch.Tensor, op, group) -> None:
    if group is not None:
        dist.all_reduce(x, op=op, group=group)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Mean CE of hidden @ weight.T, ``chunk`` rows at a time; logits recomputed in the backward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, chunk, group, vocab_start):
        h2, t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
        acc = torch.promote_types(hidden.dtype, torch.float32)  # statistics in fp32 (fp64 stays)
        local = t - vocab_start
        owned = (local >= 0) & (local < weight.shape[0]) & (t != ignore_index)
        safe_t = local.masked_fill(~owned, 0)
        lse = torch.empty(t.shape[0], dtype=acc, device=hidden.device)
        target_z = torch.empty_like(lse)
        for lo in range(0, t.shape[0], chunk):
            z = (h2[lo:lo + chunk] @ weight.t()).to(acc)  # [chunk, V_local]: the only logits alive
            lse[lo:lo + chunk] = torch.logsumexp(z, dim=-1)
            target_z[lo:lo + chunk] = z.gather(1, safe_t[lo:lo + chunk, None]).squeeze(1)
        target_z.masked_fill_(~owned, 0.0)
        if group is not None:  # combine the shards' log-sum-exps; only the owner has the target
            m = lse.clone()
            _all_reduce(m, dist.ReduceOp.MAX, group)
            s = (lse - m).exp()
            _all_reduce(s, dist.ReduceOp.SUM, group)
            lse = m + s.log()
            _all_reduce(target_z, dist.ReduceOp.SUM, group)
        valid = t != ignore_index
        count = valid.sum()
        ctx.save_for_backward(hidden, weight, safe_t, owned, valid, lse, count)
        ctx.chunk, ctx.group = chunk, group
        return torch.where(valid, lse - target_z, 0.0).sum() / count

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, safe_t, owned, valid, lse, count = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        h2 = hidden.reshape(-1, hidden.shape[-1])
        row_scale = valid.to(lse.dtype) * (grad.to(lse.dtype) / count)  # d loss / d row loss
        grad_h = torch.empty_like(h2) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device) if need_w else None
        for lo in range(0, h2.shape[0], ctx.chunk):
            hc, rows = h2[lo:lo + ctx.chunk], slice(lo, lo + ctx.chunk)
            g = (hc @ weight.t()).to(lse.dtype).sub_(lse[rows, None]).exp_()  # softmax, in place
            g.scatter_add_(1, safe_t[rows, None], -owned[rows, None].to(g.dtype))  # - onehot
            g = g.mul_(row_scale[rows, None]).to(weight.dtype)
            if need_h:
                grad_h[rows] = g @ weight
            if need_w:
                grad_w += (g.t() @ hc).to(grad_w.dtype)
        if need_h:
            _all_reduce(grad_h, dist.ReduceOp.SUM, ctx.group)  # hidden is replicated over the group
        dh = grad_h.view(hidden.shape) if need_h else None
        dw = grad_w.to(weight.dtype) if need_w else None
        return dh, dw, None, None, None, None, None


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                 ignore_index: int = -100, chunk_size: int = 1024,
                                 process_group: Optional[Any] = None, vocab_start: int = 0) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets``, never holding more than
    ``chunk_size`` rows of logits (torch only; any device and float dtype).

    hidden [..., d], weight [V_local, d], targets [...] of global vocabulary ids; ``ignore_index``
    targets are left out of the mean (NaN when all are). With ``process_group`` the weight is a
    vocabulary shard starting at ``vocab_start`` (see the module docstring).
    """
    if hidden.shape[-1] != weight.shape[-1] or hidden.shape[:-1] != targets.shape:
        raise ValueError(f"chunked cross entropy: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)} "
                         f"and targets {tuple(targets.shape)} must be [..., d], [V, d] and [...]")
    if chunk_size <= 0:
        raise ValueError(f"chunked cross entropy: chunk_size must be positive, got {chunk_size}")
    if process_group is not None and dist.get_world_size(group=process_group) == 1:
        process_group = None
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, int(ignore_index), int(chunk_size),
                                            process_group, int(vocab_start))


def resolve_loss(impl: str, hidden: torch.Tensor, chunk_tokens: int, vocab: Optional[int] = None) -> str:
    """``impl`` with "auto" resolved for ``hidden`` [..., d]: "fused" on CUDA when Triton runs and
    the kernel is verified there for a ``vocab``-row output matrix (``select.fused_loss``);
    otherwise "chunked", or "plain" when all tokens fit in one chunk (chunking would then save
    at most a chunk's logits and cost its recomputation in the backward)."""
    if impl != "auto":
        return impl
    from megareuse_kernels import select

    if select.fused_loss(hidden, vocab):
        return "fused"
    return "plain" if hidden.numel() // hidden.shape[-1] <= chunk_tokens else "chunked"


def linear_cross_entropy(impl: str, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_size: int, process_group: Optional[Any] = None,
                         vocab_start: int = 0) -> torch.Tensor:
    """Mean CE of ``hidden @ weight.T`` by the "chunked" or "fused" implementation (one contract)."""
    if impl == "chunked":
        return chunked_linear_cross_entropy(hidden, weight, targets, chunk_size=chunk_size,
                                            process_group=process_group, vocab_start=vocab_start)
    if impl == "fused":
        from megareuse_kernels.cross_entropy import linear_cross_entropy as fused

        return fused(hidden, weight, targets, chunk_size=chunk_size, process_group=process_group,
                     vocab_start=vocab_start)
    raise ValueError(f"linear cross entropy: unknown implementation {impl!r}; accepted: chunked, fused")


class LMHead(nn.Linear):
    """The bias-free d_model -> vocab_size output projection (an ``nn.Linear``: same parameter
    ``weight`` [V, d], same construction and initialisation), whose ``forward(h, targets)`` also
    computes the loss with the configured implementation (``loss``; chunks of ``chunk_tokens``).
    """

    def __init__(self, d_model: int, vocab_size: int, loss: str = "plain", chunk_tokens: int = 1024,
                 device=None, dtype=None):
        super().__init__(d_model, vocab_size, bias=False, device=device, dtype=dtype)
        self.loss, self.chunk_tokens = loss, chunk_tokens
        if loss == "fused":
            from megareuse_kernels.select import require_triton

            require_triton("model.loss='fused'")

    def forward(self, h: torch.Tensor, targets: Optional[torch.Tensor] = None) -> torch.Tensor:
        """h [..., d] -> logits [..., V] (h's dtype); with targets [...]: the fp32 mean loss."""
        if targets is None:
            return super().forward(h)
        impl = resolve_loss(self.loss, h, self.chunk_tokens, self.out_features)
        if impl == "plain":
            return cross_entropy(super().forward(h), targets)
        return linear_cross_entropy(impl, h, self.weight, targets, self.chunk_tokens)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, loss={self.loss!r}, chunk_tokens={self.chunk_tokens}"
