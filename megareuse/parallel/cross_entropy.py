"""Cross-entropy over vocabulary-sharded logits, never materialising the full logits.

Rank r holds logits[..., r*V/tp : (r+1)*V/tp]. The loss of a token with target t is

    loss = log(sum_v exp(z_v - m)) - (z_t - m),   m = max_v z_v

computed with three all-reduces over the TP group, each on a tensor the size of the token batch
(not of the vocabulary): MAX of the local maxima, SUM of the local sums of exp, SUM of the target
logit (only the rank holding t contributes it). The gradient with respect to the local logits
is ``softmax - onehot(t)`` restricted to the local columns, scaled by the incoming gradient;
it needs no communication. Everything is done in fp32 (or fp64 when given fp64).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from megareuse.parallel.mappings import gather_from_tp_last_dim, group_size, resolve_group


def _all_reduce(x: torch.Tensor, op, group) -> None:
    if group_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, group, ignore_index):
        z = logits.to(torch.promote_types(logits.dtype, torch.float32))
        local_v = z.shape[-1]
        start = local_v * (dist.get_rank(group=group) if group_size(group) > 1 else 0)

        m = z.max(dim=-1).values
        _all_reduce(m, dist.ReduceOp.MAX, group)
        z = z - m.unsqueeze(-1)

        ignored = targets == ignore_index
        local_t = targets - start
        mine = (local_t >= 0) & (local_t < local_v) & ~ignored
        safe_t = local_t.masked_fill(~mine, 0)
        target_z = z.gather(-1, safe_t.unsqueeze(-1)).squeeze(-1).masked_fill(~mine, 0.0)
        _all_reduce(target_z, dist.ReduceOp.SUM, group)

        exp_z = z.exp()
        sum_exp = exp_z.sum(dim=-1)
        _all_reduce(sum_exp, dist.ReduceOp.SUM, group)

        loss = (sum_exp.log() - target_z).masked_fill(ignored, 0.0)
        ctx.save_for_backward(exp_z.div_(sum_exp.unsqueeze(-1)), safe_t, mine, ignored)
        ctx.in_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, safe_t, mine, ignored = ctx.saved_tensors
        grad = softmax  # saved buffer, used once: modified in place
        rows = grad.view(-1, grad.shape[-1])
        flat_idx = torch.arange(rows.shape[0], device=grad.device)
        rows[flat_idx, safe_t.reshape(-1)] -= mine.reshape(-1).to(grad.dtype)
        grad.mul_(grad_loss.masked_fill(ignored, 0.0).unsqueeze(-1))
        return grad.to(ctx.in_dtype), None, None, None


def vocab_parallel_cross_entropy(logits_local: torch.Tensor, targets: torch.Tensor, state: Any,
                                 reduction: str = "none", ignore_index: int = -100) -> torch.Tensor:
    """Cross-entropy of vocab-sharded logits [..., V/tp] against global token ids [...].

    ``state`` is a ParallelState (or a process group / None). ``reduction``: "none" gives the
    per-token loss [...] (0 where the target is ``ignore_index``), "mean" the mean over the
    non-ignored tokens (as torch's F.cross_entropy), "sum" their sum. The result is fp32 and
    the same on every rank of the TP group. To save memory the backward pass turns the saved
    softmax into the gradient in place, so the graph supports one backward pass (no
    ``retain_graph=True`` double backward through the loss).
    """
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"reduction={reduction!r}: accepted none, mean, sum")
    if logits_local.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits_local.shape)} and targets {tuple(targets.shape)} "
                         "disagree on the leading dimensions")
    loss = _VocabParallelCrossEntropy.apply(logits_local, targets, resolve_group(state), ignore_index)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (targets != ignore_index).sum()


def gather_logits(logits_local: torch.Tensor, state: Any) -> torch.Tensor:
    """Full logits [..., V] from vocab shards (all-gather; differentiable; for eval and tests)."""
    return gather_from_tp_last_dim(logits_local, state)
