"""Parallelism around the model.

- ``launch``: who am I in the job (launcher-environment discovery; imports no torch);
- ``state``: TP x DP process groups and DeepSpeed's ``mpu``;
- ``mappings``, ``layers``, ``cross_entropy``, ``random``: Megatron-style tensor parallelism;
- ``tensor_parallel``: parallelize a GPT, move state dicts between full and per-rank layouts.

The public names below are loaded lazily on first access, so ``import megareuse.parallel.launch``
stays light (no torch import).
"""
from __future__ import annotations

from megareuse._lazy import lazy_exports


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
__all__, __getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
