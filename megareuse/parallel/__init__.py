"""Parallelism around the model.

- ``launch``: who am I in the job (launcher-environment discovery; imports no torch);
- ``state``: TP x DP process groups and DeepSpeed's ``mpu``;
- ``mappings``, ``layers``, ``cross_entropy``, ``random``: Megatron-style tensor parallelism;
- ``tensor_parallel``: parallelize a GPT, move state dicts between full and per-rank layouts.

The public names below are loaded lazily on first access, so ``import megareuse.parallel.launch``
stays light (no torch import).
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "state": ["ParallelState", "init_parallel_state", "single_process_state", "grid_ranks", "MPU"],
    "mappings": ["copy_to_tp", "reduce_from_tp", "scatter_to_tp_last_dim", "gather_from_tp_last_dim"],
    "layers": ["ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding", "is_tp_sharded",
               "normal_init", "shard_range"],
    "cross_entropy": ["vocab_parallel_cross_entropy", "gather_logits"],
    "random": ["RNGStatesTracker", "get_rng_tracker", "model_parallel_seed"],
    "tensor_parallel": ["parallelize_model", "check_tp_compatible", "shard_state_dict", "merge_state_dicts",
                        "gather_full_state_dict", "loss_fn", "clip_grad_norm_"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = list(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
