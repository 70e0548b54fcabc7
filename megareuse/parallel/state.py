"""Process-group layout for tensor x data parallelism, and the ``mpu`` object DeepSpeed reads.

world = TP x DP (pipeline parallelism is not implemented; the MPU reports a pipeline size of 1).
Global rank ``r`` sits at ``tp_rank = r % tp`` and ``dp_rank = r // tp``:

- TP groups are contiguous ranks ``[k*tp, (k+1)*tp)`` (one node's devices in the usual launch);
- DP groups are strided ranks ``{j, j+tp, j+2*tp, ...}`` (the same shard of every replica).

``torch.distributed.new_group`` is collective over the whole world: every rank must create every
group, in the same order, even groups it does not belong to. ``init_parallel_state`` does that;
``ParallelState.subgroup`` does it for extra groups (e.g. the ranks sharing a replicated KV head).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Optional, Sequence

import torch.distributed as dist


@dataclass(frozen=True)
class ParallelState:
    """This rank's place in the TP x DP grid and the process groups it belongs to.

    ``tp_group`` / ``dp_group`` are ``None`` only in the single-process state (no
    torch.distributed); code that communicates must check ``tp_size > 1`` first, so every layer
    degrades to plain single-device math at ``tp_size == 1``.
    """

    tp_size: int
    dp_size: int
    tp_rank: int
    dp_rank: int
    rank: int
    world_size: int
    tp_group: Optional[Any] = None
    dp_group: Optional[Any] = None
    tp_ranks: tuple[int, ...] = (0,)
    dp_ranks: tuple[int, ...] = (0,)
    # groups created later by ``subgroup``, keyed by their rank lists (same on every rank)
    # collectives of every group made here time out after this (torch's default for new groups
    # is 30 min with gloo, not the world group's timeout)
    timeout: Optional[timedelta] = None
    _subgroups: dict = field(default_factory=dict, compare=False, repr=False, hash=False)

    def __deepcopy__(self, memo: dict) -> "ParallelState":
        return self  # process groups are process-wide handles: a copied layer shares them

    @property
    def distributed(self) -> bool:
        """True when the state describes a torch.distributed job (even a 1-rank one)."""
        return self.tp_group is not None or self.dp_group is not None

    @property
    def tp_src_rank(self) -> int:
        """Global rank of TP rank 0 in this rank's TP group (a broadcast source)."""
        return self.tp_ranks[0]

    def subgroup(self, partition: Sequence[Sequence[int]]) -> Optional[Any]:
        """Create (once) one process group per rank list in ``partition``; return this rank's.

        ``partition`` must be the same on every rank (new_group is collective over the world),
        and is a list of disjoint global-rank lists. Returns ``None`` when this rank is in none of
        them or when the job is not distributed.
        """
        if not self.distributed:
            return None
        key = tuple(tuple(int(r) for r in ranks) for ranks in partition)
        if key not in self._subgroups:
            mine = None
            for ranks in key:
                group = dist.new_group(ranks=list(ranks), timeout=self.timeout)
                if self.rank in ranks:
                    mine = group
            self._subgroups[key] = mine
        return self._subgroups[key]


def single_process_state() -> ParallelState:
    """The state of a plain one-process run: tp = dp = 1, no process groups."""
    return ParallelState(tp_size=1, dp_size=1, tp_rank=0, dp_rank=0, rank=0, world_size=1)


def grid_ranks(world_size: int, tp_size: int) -> tuple[list[list[int]], list[list[int]]]:
    """(TP groups, DP groups) as global-rank lists, in creation order. Pure; no communication."""
    if tp_size <= 0 or world_size % tp_size:
        raise ValueError(f"tensor-parallel size tp={tp_size} must be a positive divisor of the "
                         f"world size {world_size}")
    dp_size = world_size // tp_size
    tp_groups = [list(range(k * tp_size, (k + 1) * tp_size)) for k in range(dp_size)]
    dp_groups = [list(range(j, world_size, tp_size)) for j in range(tp_size)]
    return tp_groups, dp_groups


def init_parallel_state(tp_size: int, timeout_s: Optional[float] = None) -> ParallelState:
    """Create the TP and DP groups of the running torch.distributed job (collective).

    Call once, after ``torch.distributed`` is initialised, on every rank with the same
    ``tp_size``; ``timeout_s`` bounds every collective on the groups (None: torch's default). Raises ValueError (before any group is created) when tp does not divide the
    world size. Without torch.distributed, ``tp_size == 1`` returns ``single_process_state()``.
    """
    if not (dist.is_available() and dist.is_initialized()):
        if tp_size == 1:
            return single_process_state()
        raise ValueError(f"tensor-parallel size tp={tp_size} needs torch.distributed to be "
                         f"initialised (world size 1 without it)")
    world, rank = dist.get_world_size(), dist.get_rank()
    tp_groups, dp_groups = grid_ranks(world, tp_size)
    tp_group = dp_group = None
    timeout = None if timeout_s is None else timedelta(seconds=timeout_s)
    for ranks in tp_groups:
        group = dist.new_group(ranks=ranks, timeout=timeout)
        if rank in ranks:
            tp_group, tp_ranks = group, tuple(ranks)
    for ranks in dp_groups:
        group = dist.new_group(ranks=ranks, timeout=timeout)
        if rank in ranks:
            dp_group, dp_ranks = group, tuple(ranks)
    return ParallelState(tp_size=tp_size, dp_size=world // tp_size, tp_rank=rank % tp_size,
                         dp_rank=rank // tp_size, rank=rank, world_size=world, tp_group=tp_group,
                         dp_group=dp_group, tp_ranks=tp_ranks, dp_ranks=dp_ranks, timeout=timeout)


class MPU:
    """The model-parallel unit ``deepspeed.initialize(mpu=...)`` expects, over a ParallelState.

    DeepSpeed 0.19 calls the legacy ``get_model_parallel_*`` names (ZeRO grad-norm, checkpoint
    file names), the newer ``get_tensor_model_parallel_*`` names (via ``deepspeed.utils.bwc``),
    ``get_data_parallel_*`` (ZeRO partitioning, gradient all-reduce, the data sampler) and
    ``get_pipeline_model_parallel_*`` (checkpoint metadata). Model parallel == tensor parallel
    here (no pipeline). Deliberately absent: ``initialize_sequence_parallel`` (its presence makes
    DeepSpeed assume Ulysses sequence parallelism and ignore the DP group) and the
    ``get_sequence_parallel_*`` family (DeepSpeed then assumes a sequence-parallel size of 1).
    """

    def __init__(self, state: ParallelState):
        if not state.distributed:
            raise ValueError("MPU needs a distributed ParallelState (from init_parallel_state)")
        self.state = state

    # tensor (== model) parallel
    def get_tensor_model_parallel_rank(self) -> int:
        return self.state.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.state.tp_size

    def get_tensor_model_parallel_group(self):
        return self.state.tp_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.state.tp_src_rank

    def get_model_parallel_rank(self) -> int:
        return self.state.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.state.tp_size

    def get_model_parallel_group(self):
        return self.state.tp_group

    # data parallel
    def get_data_parallel_rank(self) -> int:
        return self.state.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.state.dp_size

    def get_data_parallel_group(self):
        return self.state.dp_group

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(self.state.dp_ranks)

    # pipeline parallel (not implemented: one stage)
    def get_pipeline_model_parallel_rank(self) -> int:
        return 0

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def __repr__(self) -> str:
        s = self.state
        return f"MPU(tp={s.tp_size}, dp={s.dp_size}, tp_rank={s.tp_rank}, dp_rank={s.dp_rank})"
