"""Cross-entropy kernels and a chunked linear + cross-entropy that never holds all the logits.

Two row kernels do the work, one program per row on a GPU (16 rows in the interpreter),
streaming over the vocabulary in blocks:

- ``_ce_stats``: the row's maximum, sum of exp(logit - max) (online, one read of the row) and
  the target's logit when the target falls in this shard's vocabulary range;
- ``_ce_grad``: d logits = (softmax - onehot) * scale, written in place over the logits.

Splitting the statistics from the gradient is what makes the vocab-parallel layout work:
with the output matrix sharded by vocabulary rows over a tensor-parallel group (Megatron's
``VocabParallelEmbedding`` / vocab-parallel cross-entropy layout: rank r owns rows
[r * V/tp, (r + 1) * V/tp)), each rank computes local statistics, three all-reduces (MAX of the
maxima, SUM of the rescaled sums, SUM of the target logits, which only the owner contributes)
give the global log-sum-exp, and each rank then writes the gradient of its own logit slice.

``linear_cross_entropy(hidden, weight, targets)`` = mean CE of ``hidden @ weight.T``: rows are
processed in chunks; a chunk's logits [chunk, V] are formed by one matmul, reduced to losses,
turned in place into their gradient, and immediately folded into d hidden (chunk @ weight)
and d weight (chunk^T @ hidden, accumulated in fp32). The gradients are thus computed during
the forward (when gradients are needed) and only scaled by the incoming gradient in the
backward; peak memory is one chunk of logits plus the fp32 weight gradient, instead of
several [N, V] tensors (bf16 logits, their fp32 copy, softmax / gradient).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from megareuse_kernels.common import check_tensor, interpreting, new_output

LOGITS_PER_CHUNK = 1 << 25  # default chunk: ~32M logits (64 MiB in bf16)


@triton.jit
def _ce_stats(LOGITS, TARGETS, MAX, SUMEXP, TGT, stride_row, N, V, vocab_start, ignore_index,
              ROWS: tl.constexpr, BLOCK_V: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < N
    base = LOGITS + tl.minimum(rows, N - 1).to(tl.int64) * stride_row  # clamped: no all -inf rows
    cols0 = tl.arange(0, BLOCK_V)
    m = tl.full([ROWS], float("-inf"), tl.float32)
    s = tl.zeros([ROWS], tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + cols0
        x = tl.load(base[:, None] + cols[None, :], mask=cols[None, :] < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), 1)
        m = m_new
    target = tl.load(TARGETS + rows, mask=row_ok, other=ignore_index)
    local = target - vocab_start
    owned = (local >= 0) & (local < V) & (target != ignore_index)
    t_logit = tl.load(base + tl.where(owned, local, 0)).to(tl.float32)
    tl.store(MAX + rows, m, mask=row_ok)
    tl.store(SUMEXP + rows, s, mask=row_ok)
    tl.store(TGT + rows, tl.where(owned, t_logit, 0.0), mask=row_ok)


@triton.jit
def _ce_grad(LOGITS, DLOGITS, TARGETS, LSE, SCALE, stride_row, stride_grad, N, V, vocab_start, ignore_index,
             ROWS: tl.constexpr, BLOCK_V: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < N
    target = tl.load(TARGETS + rows, mask=row_ok, other=ignore_index)
    local = target - vocab_start
    scale = tl.where(target == ignore_index, 0.0, tl.load(SCALE).to(tl.float32))
    lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
    src = LOGITS + rows.to(tl.int64)[:, None] * stride_row
    dst = DLOGITS + rows.to(tl.int64)[:, None] * stride_grad
    cols0 = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        cols = start + cols0
        ok = row_ok[:, None] & (cols[None, :] < V)
        x = tl.load(src + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        g = tl.exp(x - lse[:, None]) - tl.where(cols[None, :] == local[:, None], 1.0, 0.0)
        tl.store(dst + cols[None, :], (g * scale[:, None]).to(DLOGITS.dtype.element_ty), mask=ok)


def _tiles(V: int) -> tuple[int, int, int]:
    """(rows per program, vocabulary block, warps): one row per program on a GPU."""
    if interpreting():
        return 16, min(triton.next_power_of_2(V), 256), 4
    return 1, min(triton.next_power_of_2(V), 4096), 8 if V >= 8192 else 4


def _group_info(process_group, vocab_start: int | None, v_local: int) -> int:
    if process_group is None:
        return 0 if vocab_start is None else int(vocab_start)
    import torch.distributed as dist

    return dist.get_rank(process_group) * v_local if vocab_start is None else int(vocab_start)


def row_lse_and_target(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, vocab_start: int = 0,
                       process_group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-sum-exp, target logit) per row of logits [N, V_local], fp32, combined over the group.

    Without a group the logits are the full vocabulary (``vocab_start`` shifts the targets).
    With a tensor-parallel ``process_group`` they are this rank's vocabulary slice and the
    statistics are all-reduced so that every rank gets the global values.
    """
    N, V = logits.shape
    mx, se, tg = (new_output((N,), torch.float32, logits.device) for _ in range(3))
    if N:
        rows, block_v, warps = _tiles(V)
        _ce_stats[(triton.cdiv(N, rows),)](logits, targets, mx, se, tg, logits.stride(0), N, V, vocab_start,
                                           ignore_index, ROWS=rows, BLOCK_V=block_v, num_warps=warps)
    if process_group is not None:
        import torch.distributed as dist

        gmax = mx.clone()
        dist.all_reduce(gmax, op=dist.ReduceOp.MAX, group=process_group)
        se = se * torch.exp(mx - gmax)
        dist.all_reduce(se, op=dist.ReduceOp.SUM, group=process_group)
        dist.all_reduce(tg, op=dist.ReduceOp.SUM, group=process_group)
        mx = gmax
    return mx + torch.log(se), tg


def softmax_grad_(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, scale: torch.Tensor,
                  ignore_index: int = -100, vocab_start: int = 0, out: torch.Tensor | None = None) -> torch.Tensor:
    """(softmax(logits) - onehot(targets)) * scale, rows with ignored targets zero; ``out`` may be logits."""
    N, V = logits.shape
    out = new_output((N, V), logits.dtype, logits.device) if out is None else out
    if N:
        rows, block_v, warps = _tiles(V)
        _ce_grad[(triton.cdiv(N, rows),)](logits, out, targets, lse, scale, logits.stride(0), out.stride(0), N, V,
                                          vocab_start, ignore_index, ROWS=rows, BLOCK_V=block_v, num_warps=warps)
    return out


def _loss_scale(targets: torch.Tensor, ignore_index: int, reduction: str) -> tuple[torch.Tensor, torch.Tensor]:
    valid = targets != ignore_index
    if reduction == "mean":
        return valid, 1.0 / valid.sum().clamp(min=1).to(torch.float32).reshape(1)
    if reduction == "sum":
        return valid, torch.ones(1, dtype=torch.float32, device=targets.device)
    raise ValueError(f"cross entropy: reduction {reduction!r} is not supported; accepted: mean, sum")


class CrossEntropy(torch.autograd.Function):
    """CE over given logits [N, V]; the gradient is formed in the backward by ``_ce_grad``."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index, reduction):
        valid, scale = _loss_scale(targets, ignore_index, reduction)
        lse, tg = row_lse_and_target(logits, targets, ignore_index)
        ctx.save_for_backward(logits, targets, lse, scale)
        ctx.ignore_index = ignore_index
        return (torch.where(valid, lse - tg, 0.0).sum() * scale).squeeze(0)

    @staticmethod
    def backward(ctx, grad):
        logits, targets, lse, scale = ctx.saved_tensors
        dlogits = softmax_grad_(logits, targets, lse, (scale * grad).reshape(1), ctx.ignore_index)
        return dlogits, None, None, None


class LinearCrossEntropy(torch.autograd.Function):
    """CE of hidden @ weight.T, chunked over rows, gradients formed during the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, reduction, chunk_size, process_group, vocab_start,
                with_grad):
        h2, t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
        N, V = h2.shape[0], weight.shape[0]
        start_v = _group_info(process_group, vocab_start, V)
        valid, scale = _loss_scale(t, ignore_index, reduction)
        need_h, need_w = with_grad and ctx.needs_input_grad[0], with_grad and ctx.needs_input_grad[1]
        grad_h = new_output(h2.shape, h2.dtype, h2.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        losses = new_output((N,), torch.float32, h2.device)
        for lo in range(0, N, chunk_size):
            hi = min(N, lo + chunk_size)
            hc = h2[lo:hi]
            logits = hc @ weight.t()  # [chunk, V_local], the only logits alive at a time
            lse, tg = row_lse_and_target(logits, t[lo:hi], ignore_index, start_v, process_group)
            losses[lo:hi] = torch.where(valid[lo:hi], lse - tg, 0.0)
            if need_h or need_w:
                dlogits = softmax_grad_(logits, t[lo:hi], lse, scale, ignore_index, start_v, out=logits)
                if need_h:
                    torch.mm(dlogits, weight, out=grad_h[lo:hi])
                if need_w:
                    if grad_w.dtype == dlogits.dtype:
                        grad_w.addmm_(dlogits.t(), hc)
                    else:
                        grad_w += dlogits.t() @ hc
        if need_h and process_group is not None:
            import torch.distributed as dist

            dist.all_reduce(grad_h, op=dist.ReduceOp.SUM, group=process_group)  # hidden is replicated
        ctx.save_for_backward(grad_h if need_h else None, grad_w.to(weight.dtype) if need_w else None)
        ctx.hidden_shape = hidden.shape
        return (losses.sum() * scale).squeeze(0)

    @staticmethod
    def backward(ctx, grad):
        grad_h, grad_w = ctx.saved_tensors
        dh = None if grad_h is None else (grad_h * grad.to(grad_h.dtype)).view(ctx.hidden_shape)
        dw = None if grad_w is None else grad_w * grad.to(grad_w.dtype)
        return dh, dw, None, None, None, None, None, None, None


def _check_targets(targets: torch.Tensor, n: int, what: str) -> None:
    if targets.dtype not in (torch.int64, torch.int32) or targets.numel() != n:
        raise ValueError(f"{what}: targets must be int64/int32 with {n} elements, got {targets.dtype} "
                         f"{tuple(targets.shape)}")


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                  reduction: str = "mean") -> torch.Tensor:
    """Triton CE over logits [..., V] (any float dtype accepted by the kernels); mean or sum."""
    check_tensor(logits, "cross entropy logits")
    logits2 = logits.reshape(-1, logits.shape[-1])
    logits2 = logits2 if logits2.stride(-1) == 1 else logits2.contiguous()
    _check_targets(targets, logits2.shape[0], "cross entropy")
    return CrossEntropy.apply(logits2, targets.reshape(-1).contiguous(), int(ignore_index), reduction)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100, reduction: str = "mean", chunk_size: int | None = None,
                         process_group=None, vocab_start: int | None = None) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T`` without materialising the [N, V] logits.

    hidden [..., d], weight [V_local, d] (same dtype), targets [...] of global vocabulary ids.
    ``chunk_size`` rows are processed at a time (default: about 32M logits per chunk). With a
    tensor-parallel ``process_group``, ``weight`` is this rank's vocabulary shard starting at
    ``vocab_start`` (default rank * V_local, Megatron's layout); the loss and the gradient of
    ``hidden`` (all-reduced here) are then those of the full vocabulary on every rank, so do NOT
    also pass ``hidden`` through a copy-to-tensor-parallel-region mapping.
    """
    check_tensor(hidden, "linear cross entropy hidden")
    check_tensor(weight, "linear cross entropy weight")
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1] or hidden.dtype != weight.dtype:
        raise ValueError(f"linear cross entropy: hidden {tuple(hidden.shape)} {hidden.dtype} and weight "
                         f"{tuple(weight.shape)} {weight.dtype} must be [..., d] and [V, d] of one dtype")
    n = hidden.numel() // hidden.shape[-1]
    _check_targets(targets, n, "linear cross entropy")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"linear cross entropy: reduction {reduction!r} is not supported; accepted: mean, sum")
    if chunk_size is None:
        chunk_size = max(1, LOGITS_PER_CHUNK // weight.shape[0])
    if chunk_size <= 0:
        raise ValueError(f"linear cross entropy: chunk_size must be positive, got {chunk_size}")
    return LinearCrossEntropy.apply(hidden, weight, targets.reshape(-1).contiguous(), int(ignore_index), reduction,
                                    int(chunk_size), process_group, vocab_start, torch.is_grad_enabled())
