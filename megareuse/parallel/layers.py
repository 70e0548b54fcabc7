"""Megatron-style tensor-parallel layers: column- and row-parallel linears, a vocab-parallel
embedding.

Each layer's ``.weight`` is this rank's shard only, so ``state_dict()`` holds shards. Layers are
built either directly (the shard drawn by ``init_method`` under the tracker's "model-parallel"
RNG, see ``random.py``) or from the FULL weight of a single-device ``nn.Linear`` /
``nn.Embedding`` (``from_linear`` / ``from_embedding``: the rank's slice is copied, nothing is
drawn), which is what makes a TP model comparable with the single-device one.

Parameter attributes (read by DeepSpeed's gradient-norm code, ``deepspeed.runtime.utils.
is_model_parallel_parameter``): a sharded weight has ``tensor_model_parallel = True`` (its
squared norm is summed over the TP group); a weight replicated across TP ranks has it False (it
is counted on TP rank 0 only). A shard held identically by several TP ranks (a replicated KV
head) is marked True on the first of those ranks only, so it is counted exactly once.
``partition_dim`` / ``partition_stride`` record how the full weight was cut (Megatron names).

At ``tp_size == 1`` every layer is plain ``F.linear`` / ``F.embedding``.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megareuse.model.norm import RMSNorm, rms_norm
from megareuse.parallel.mappings import copy_to_tp, gather_from_tp_last_dim, group_size, reduce_from_tp, \
    scatter_to_tp_last_dim
from megareuse.parallel.random import get_rng_tracker
from megareuse.parallel.state import ParallelState

InitMethod = Callable[[torch.Tensor], Any]


def normal_init(std: float = 0.02) -> InitMethod:
    """An init method drawing N(0, std) in place (the model's default init)."""
    return lambda w: nn.init.normal_(w, 0.0, std)


def skip_init(weight: torch.Tensor) -> None:
    """Init method that leaves the weight as allocated (the caller copies values in)."""


def shard_range(size: int, tp_size: int, tp_rank: int, what: str = "dimension") -> tuple[int, int]:
    """[start, stop) of rank ``tp_rank``'s equal slice of ``size``; ValueError if tp does not divide it."""
    if size % tp_size:
        raise ValueError(f"{what} {size} is not divisible by the tensor-parallel size tp={tp_size}")
    step = size // tp_size
    return tp_rank * step, (tp_rank + 1) * step


def set_tp_attributes(param: nn.Parameter, sharded: bool, partition_dim: int) -> None:
    """Mark ``param`` the way DeepSpeed and Megatron read it (see the module docstring)."""
    param.tensor_model_parallel = bool(sharded)
    param.partition_dim = partition_dim
    param.partition_stride = 1


def is_tp_sharded(param: torch.Tensor) -> bool:
    """True for a parameter whose gradient norm must be summed over the TP group."""
    return bool(getattr(param, "tensor_model_parallel", False))


def _init(weight: torch.Tensor, init_method: InitMethod, state: ParallelState) -> None:
    if init_method is skip_init:
        return
    with torch.no_grad():
        if state.tp_size == 1:
            init_method(weight)
        else:
            with get_rng_tracker().fork():
                init_method(weight)


class ColumnParallelLinear(nn.Module):
    """y = x A^T with A's output rows split across the TP group: rank r computes y[..., rows_r].

    The input is replicated (``copy_to_tp``: the backward pass sums the input gradient over the
    group); the output is this rank's slice, or the full output with ``gather_output=True``.
    ``copy_input=False`` leaves that ``copy_to_tp`` to the caller: the layer is one of several
    column-parallel projections of the same input (q/k/v, gate/up) and the caller applied
    ``copy_to_tp`` once to that input, so the backward pass all-reduces the SUM of their input
    gradients once instead of each one's separately (Megatron's fused QKV / gate-up
    communication; ``tensor_parallel.parallelize_model`` installs it). The layer's own math is
    the same either way; a layer with ``copy_input=False`` used alone leaves its input gradient
    partial (this rank's output slice only).

    ``out_range`` overrides the equal split with explicit [start, stop) rows of the full weight
    (used for replicated KV heads); ``replica_group`` is then the process group of the TP ranks
    holding the same rows: the weight's gradient is summed over it, since each rank only sees
    the uses made by its own query heads.
    """

    def __init__(self, in_features: int, out_features: int, state: ParallelState,
                 gather_output: bool = False, bias: bool = False, *,
                 init_method: Optional[InitMethod] = None, out_range: Optional[tuple[int, int]] = None,
                 replica_group: Optional[Any] = None, copy_input: bool = True, device=None, dtype=None):
        super().__init__()
        if out_range is None:
            out_range = shard_range(out_features, state.tp_size, state.tp_rank, "output features")
        elif gather_output:
            raise ValueError("gather_output=True needs the equal split (no out_range)")
        start, stop = out_range
        if not 0 <= start < stop <= out_features:
            raise ValueError(f"out_range {out_range} is not inside [0, {out_features})")
        self.in_features, self.out_features, self.state = in_features, out_features, state
        self.out_range, self.gather_output, self.copy_input = (start, stop), gather_output, bool(copy_input)
        self.replica_group = replica_group if group_size(replica_group) > 1 else None
        self.weight = nn.Parameter(torch.empty(stop - start, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(stop - start, device=device, dtype=dtype)) if bias else None
        owner = self.replica_group is None or dist.get_rank(group=self.replica_group) == 0
        for p in (self.weight, self.bias):
            if p is not None:
                set_tp_attributes(p, state.tp_size > 1 and owner, partition_dim=0)
        _init(self.weight, init_method or normal_init(), state)

    @classmethod
    def from_linear(cls, linear: nn.Linear, state: ParallelState, gather_output: bool = False, *,
                    out_range: Optional[tuple[int, int]] = None,
                    replica_group: Optional[Any] = None, copy_input: bool = True) -> "ColumnParallelLinear":
        """This rank's rows of a full single-device ``linear`` (values copied, nothing drawn)."""
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, state, gather_output,
                    bias=linear.bias is not None, init_method=skip_init, out_range=out_range,
                    replica_group=replica_group, copy_input=copy_input, device=w.device, dtype=w.dtype)
        start, stop = layer.out_range
        with torch.no_grad():
            layer.weight.copy_(w[start:stop])
            if linear.bias is not None:
                layer.bias.copy_(linear.bias[start:stop])
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.copy_input:
            x = copy_to_tp(x, self.state)
        weight, bias = self.weight, self.bias
        if self.replica_group is not None:
            weight = copy_to_tp(weight, self.replica_group)
            bias = None if bias is None else copy_to_tp(bias, self.replica_group)
        y = F.linear(x, weight, bias)
        return gather_from_tp_last_dim(y, self.state) if self.gather_output else y

    def extra_repr(self) -> str:
        start, stop = self.out_range
        return (f"in_features={self.in_features}, out_features={self.out_features}, rows=[{start}, {stop}), "
                f"tp={self.state.tp_size}, gather_output={self.gather_output}, "
                f"replicated={self.replica_group is not None}, bias={self.bias is not None}"
                + ("" if self.copy_input else ", copy_input=False"))


class RowParallelLinear(nn.Module):
    """y = x A^T with A's input columns split across the TP group; partial products are summed.

    With ``input_is_parallel=True`` (the usual case, after a column-parallel layer) x is already
    this rank's slice of the last dimension; otherwise it is split here. The bias (replicated)
    is added once, after the all-reduce.
    """

    def __init__(self, in_features: int, out_features: int, state: ParallelState,
                 input_is_parallel: bool = True, bias: bool = False, *,
                 init_method: Optional[InitMethod] = None, device=None, dtype=None):
        super().__init__()
        start, stop = shard_range(in_features, state.tp_size, state.tp_rank, "input features")
        self.in_features, self.out_features, self.state = in_features, out_features, state
        self.in_range, self.input_is_parallel = (start, stop), input_is_parallel
        self.weight = nn.Parameter(torch.empty(out_features, stop - start, device=device, dtype=dtype))
        set_tp_attributes(self.weight, state.tp_size > 1, partition_dim=1)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        if self.bias is not None:
            set_tp_attributes(self.bias, False, partition_dim=-1)
        _init(self.weight, init_method or normal_init(), state)

    @classmethod
    def from_linear(cls, linear: nn.Linear, state: ParallelState,
                    input_is_parallel: bool = True) -> "RowParallelLinear":
        """This rank's columns of a full single-device ``linear`` (values copied, nothing drawn)."""
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, state, input_is_parallel,
                    bias=linear.bias is not None, init_method=skip_init, device=w.device, dtype=w.dtype)
        start, stop = layer.in_range
        with torch.no_grad():
            layer.weight.copy_(w[:, start:stop])
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tp_last_dim(x, self.state)
        y = reduce_from_tp(F.linear(x, self.weight), self.state)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        start, stop = self.in_range
        return (f"in_features={self.in_features}, out_features={self.out_features}, cols=[{start}, {stop}), "
                f"tp={self.state.tp_size}, input_is_parallel={self.input_is_parallel}, "
                f"bias={self.bias is not None}")


class VocabParallelEmbedding(nn.Module):
    """Embedding table with its rows (the vocabulary) split across the TP group.

    Rank r holds ids [r*V/tp, (r+1)*V/tp). Each rank looks up the ids it holds, writes zeros for
    the others, and an all-reduce sums the partial results (exactly one rank contributes each
    row). Ids outside [0, V) give a zero vector at tp > 1 (and an index error at tp = 1).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, state: ParallelState, *,
                 init_method: Optional[InitMethod] = None, device=None, dtype=None):
        super().__init__()
        start, stop = shard_range(num_embeddings, state.tp_size, state.tp_rank, "vocabulary size")
        self.num_embeddings, self.embedding_dim, self.state = num_embeddings, embedding_dim, state
        self.vocab_range = (start, stop)
        self.weight = nn.Parameter(torch.empty(stop - start, embedding_dim, device=device, dtype=dtype))
        set_tp_attributes(self.weight, state.tp_size > 1, partition_dim=0)
        _init(self.weight, init_method or normal_init(), state)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, state: ParallelState) -> "VocabParallelEmbedding":
        """This rank's rows of a full single-device ``embedding`` (values copied, nothing drawn)."""
        w = embedding.weight
        layer = cls(embedding.num_embeddings, embedding.embedding_dim, state, init_method=skip_init,
                    device=w.device, dtype=w.dtype)
        start, stop = layer.vocab_range
        with torch.no_grad():
            layer.weight.copy_(w[start:stop])
        return layer

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.state.tp_size == 1:
            return F.embedding(ids, self.weight)
        start, stop = self.vocab_range
        outside = (ids < start) | (ids >= stop)
        local = (ids - start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tp(out, self.state)

    def extra_repr(self) -> str:
        start, stop = self.vocab_range
        return (f"{self.num_embeddings}, {self.embedding_dim}, rows=[{start}, {stop}), "
                f"tp={self.state.tp_size}")


class HeadNorm(RMSNorm):
    """A per-head RMSNorm (Qwen3's q_norm / k_norm) under tensor parallelism: the gain is
    replicated, but each rank applies it to its own heads only, so its gradient is partial. The
    forward reads the gain through ``copy_to_tp`` (identity forward, all-reduce of the gradient
    over the TP group). Under replicated KV heads the ranks sharing a KV head contribute the uses
    of their own query heads, so the plain sum over the group is still the full gradient. The
    gain is marked replicated (its norm counts on TP rank 0 only)."""

    def __init__(self, dim: int, eps: float, state: ParallelState, kernels: str = "torch", device=None, dtype=None):
        super().__init__(dim, eps, kernels)
        self.state = state
        if device is not None or dtype is not None:
            self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))
        set_tp_attributes(self.weight, False, partition_dim=-1)

    @classmethod
    def from_norm(cls, norm: RMSNorm, state: ParallelState) -> "HeadNorm":
        """The same gain (values copied) with the TP-summed gradient."""
        w = norm.weight
        layer = cls(norm.dim, norm.eps, state, norm.kernels, device=w.device, dtype=w.dtype)
        if not w.is_meta:
            with torch.no_grad():
                layer.weight.copy_(w)
        set_tp_attributes(layer.weight, False, partition_dim=-1)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = copy_to_tp(self.weight, self.state)
        if self.kernels != "torch":
            from megareuse_kernels import select

            out = select.rms_norm(x, weight, self.eps, self.kernels)
            if out is not None:
                return out
        return rms_norm(x, weight, self.eps)
