"""Autograd-aware collectives over a tensor-parallel group (Megatron's "mappings").

Each function is a pair of conjugate operations, one in the forward pass and its adjoint in the
backward pass:

==========================  =====================  =====================
function                    forward                backward
==========================  =====================  =====================
copy_to_tp                  identity               all-reduce (sum)
reduce_from_tp              all-reduce (sum)       identity
scatter_to_tp_last_dim      keep own slice         all-gather
gather_from_tp_last_dim     all-gather             keep own slice
==========================  =====================  =====================

They take the group explicitly: a ``ParallelState`` (meaning its ``tp_group``) or any process
group (e.g. a subgroup), and are the identity when the group has one rank or is ``None``, so
layers built on them are plain math at tp = 1. All reductions are sums; the result is the same
on every rank of the group.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist

from megareuse.parallel.state import ParallelState

Group = Optional[Any]


def resolve_group(group: Any) -> Group:
    """A ParallelState means its TP group; anything else is taken as a process group (or None)."""
    return group.tp_group if isinstance(group, ParallelState) else group


def group_size(group: Group) -> int:
    """Ranks in ``group``; 1 for ``None`` (no distributed job)."""
    return 1 if group is None else dist.get_world_size(group=group)


def _all_reduce(x: torch.Tensor, group: Group) -> torch.Tensor:
    if group_size(group) == 1:
        return x
    out = x.contiguous().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


def _split_last_dim(x: torch.Tensor, group: Group) -> torch.Tensor:
    n = group_size(group)
    if n == 1:
        return x
    if x.shape[-1] % n:
        raise ValueError(f"last dimension {x.shape[-1]} is not divisible by the group size {n}")
    rank = dist.get_rank(group=group)
    return x.chunk(n, dim=-1)[rank].contiguous()


def _gather_last_dim(x: torch.Tensor, group: Group) -> torch.Tensor:
    n = group_size(group)
    if n == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=-1)


class _CopyToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterLastDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_last_dim(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_last_dim(grad, ctx.group), None


class _GatherLastDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_last_dim(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _split_last_dim(grad, ctx.group), None


def copy_to_tp(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Enter a TP region: forward identity, backward sums the gradient over ``group``.

    Used on the replicated input of a column-parallel layer (each rank's partial input gradient
    covers only its output slice) — once for all the layers reading the same input (q/k/v,
    gate/up: one all-reduce of their summed gradients, ``tensor_parallel.SharedInputCopy``) —
    and on a weight replicated over a subgroup whose ranks each see only part of its uses
    (replicated KV heads).
    """
    group = resolve_group(group)
    return x if group_size(group) == 1 else _CopyToGroup.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Leave a TP region: forward sums partial results over ``group``, backward identity."""
    group = resolve_group(group)
    return x if group_size(group) == 1 else _ReduceFromGroup.apply(x, group)


def scatter_to_tp_last_dim(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Keep this rank's equal slice of the last dimension; backward all-gathers it."""
    group = resolve_group(group)
    return x if group_size(group) == 1 else _ScatterLastDim.apply(x, group)


def gather_from_tp_last_dim(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Concatenate every rank's slice along the last dimension (rank order); backward splits."""
    group = resolve_group(group)
    return x if group_size(group) == 1 else _GatherLastDim.apply(x, group)
