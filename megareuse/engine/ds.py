"""DeepSpeed glue: process-group start-up, the generated engine config, CPU op prebuild.

DeepSpeed owns data parallelism, ZeRO (stages 0-3), gradient accumulation and clipping; it gets
the tensor-parallel layout through an ``mpu`` object. On CPU, DeepSpeed's accelerator is the CPU
one (``DS_ACCELERATOR=cpu``), the backend gloo, and the optimizer torch's fused AdamW (no
DeepSpeed op compilation per run).
"""
from __future__ import annotations

import json
import logging
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from megareuse.config import Config, ConfigError, ModelConfig
from megareuse.model.flops import layer_param_count, param_count
from megareuse.parallel.launch import LaunchEnv


ALLOC_CONF_VARS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF", "PYTORCH_HIP_ALLOC_CONF")


def _select_accelerator() -> None:
    # must happen before deepspeed is imported anywhere in the process
    cuda = torch.cuda.is_available()
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cuda else "cpu")
    # the caching allocator grows segments in place instead of keeping many fixed-size blocks
    # (less fragmentation as activation and bucket sizes vary); read when CUDA first allocates,
    # so set here, before anything is put on the device. A user's own setting is left as it is
    # (PYTORCH_ALLOC_CONF is torch >= 2.9's name for it).
    if cuda and not any(k in os.environ for k in ALLOC_CONF_VARS):
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    # DeepSpeed's JIT-built ops go with this Python environment: two virtualenvs sharing torch's
    # default ~/.cache/torch_extensions rebuild the op over each other at every start-up
    if sys.prefix != sys.base_prefix and os.access(sys.prefix, os.W_OK):  # a virtualenv of our own
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))


def resolve_device(name: str, local_rank: int = 0, field: str = "run.device") -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"config error: {field} = 'cuda' but no CUDA device is available; "
                              "accepted cpu or auto here")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(name)


def resolve_backend(name: str) -> str:
    """The process group's backend string: "cpu:gloo,cuda:nccl" on CUDA (parallel/backend.py)."""
    from megareuse.parallel.backend import process_group_backend

    return process_group_backend(name)


def init_distributed(env: LaunchEnv, backend: str, timeout_s: float) -> None:
    """Start torch.distributed (through DeepSpeed) once per process; a no-op when started."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return
    env.export()
    _select_accelerator()
    import deepspeed
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)  # keep the progress line readable
    deepspeed.init_distributed(dist_backend=resolve_backend(backend), auto_mpi_discovery=False,
                               verbose=False, timeout=timedelta(seconds=timeout_s),
                               init_method="env://", rank=env.rank, world_size=env.world_size)



def shutdown_distributed() -> None:
    """End torch.distributed once every rank has finished a run: a process that exits with its
    process groups alive leaves their teardown to interpreter finalization, where a rank can
    abort ("terminate called without an active exception") after its work is done."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


BUCKET_MIN = 40_000_000  # elements: Megatron-LM's DDP bucket, max(40M, 1M x DP)
BUCKET_PER_DP_RANK = 1_000_000


def bucket_sizes(model: ModelConfig, tp: int = 1, dp: int = 1) -> dict[str, int]:
    """DeepSpeed's communication buckets and ZeRO-3 residency limits sized to the model and the
    data-parallel degree (elements, not bytes).

    Gradient reduce and parameter all-gather buckets follow Megatron-LM's DDP rule,
    max(40M, 1M x DP) elements: large enough that each collective runs at the network's
    bandwidth rather than its latency (the ring all-reduce's latency term grows with DP, hence
    the DP factor): llama_1b at TP=1 reduces its gradients in 28 collectives instead of the 262
    of the former d_model^2 buckets. DeepSpeed's own default is 5e8 (2 GB in fp32, held twice
    with ``overlap_comm``). A bucket never exceeds the rank's parameter count (parameters / TP),
    so a small model allocates no bucket larger than itself; it then reduces in one collective
    at the end of the backward pass (nothing to overlap, as with Megatron's rule).

    ZeRO-3: the prefetch bucket is one layer of this rank (the next layer is gathered while the
    current one computes); ``stage3_max_live_parameters`` and ``stage3_max_reuse_distance``
    (DeepSpeed: 1e9 elements each) would keep every gathered parameter of a model under a
    billion parameters resident from the second step on (measured: the whole 85M model per rank
    at 4 ranks, as much as ZeRO-2); they are set to this rank's largest unit (the embedding or
    one layer, under TP) plus the prefetch, so a rank holds its shard plus the units at work.
    Tensors of at most 10 d_model elements (the norms) stay whole on every rank."""
    rank_params = -(-param_count(model) // tp)
    bucket = min(max(BUCKET_MIN, BUCKET_PER_DP_RANK * dp), rank_params)
    layer = -(-layer_param_count(model) // tp)
    unit = max(layer, model.vocab_size * model.d_model // tp)
    prefetch = layer
    return {"reduce_bucket_size": bucket, "allgather_bucket_size": bucket,
            "stage3_prefetch_bucket_size": prefetch, "stage3_param_persistence_threshold": 10 * model.d_model,
            "stage3_max_live_parameters": unit + prefetch, "stage3_max_reuse_distance": unit}


def deepspeed_config(cfg: Config, dp_size: int) -> dict[str, Any]:
    """The engine config generated from the run config, with ``parallel.ds_config`` merged in.

    ZeRO's bucket sizes scale with the model and DP (``bucket_sizes``) and ``overlap_comm`` is on
    at ZeRO 1-3; a ds_config may set any of them.
    Batch keys always come from the run config (a ds_config that contradicts them is an error),
    so token accounting has one source of truth.
    """
    run = cfg.run
    generated: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": run.micro_batch_size,
        "gradient_accumulation_steps": run.grad_accum,
        "train_batch_size": run.micro_batch_size * run.grad_accum * dp_size,
        "gradient_clipping": cfg.optim.grad_clip,
        # ZeRO 1-3 reduce each bucket as soon as it is full, while the backward pass goes on
        # (overlap_comm; DeepSpeed's default only at ZeRO-3); ZeRO-1 still reduces once per step
        "zero_optimization": {"stage": cfg.parallel.zero_stage,
                              **bucket_sizes(cfg.model, cfg.parallel.tp, dp_size),
                              **({"overlap_comm": True} if cfg.parallel.zero_stage >= 1 else {})},
        "bf16": {"enabled": run.dtype == "bf16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }
    if cfg.parallel.ds_config is None:
        return generated
    path = Path(cfg.parallel.ds_config)
    try:
        extra = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"config error: parallel.ds_config = {str(path)!r}: not a readable JSON "
                          f"file ({exc})") from None
    if not isinstance(extra, dict):
        raise ConfigError(f"config error: parallel.ds_config = {str(path)!r} holds a JSON {type(extra).__name__}; "
                          "accepted a DeepSpeed config object")
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
        if key in extra and extra[key] not in ("auto", generated[key]):
            raise ConfigError(f"config error: parallel.ds_config sets {key} = {extra[key]!r} but the run "
                              f"config gives {generated[key]}; accepted 'auto' or leaving it out")
    merged = dict(generated)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        elif value != "auto":
            merged[key] = value
    zero_stage = merged.get("zero_optimization", {}).get("stage", 0)
    if zero_stage != cfg.parallel.zero_stage:
        raise ConfigError(f"config error: parallel.ds_config sets zero_optimization.stage = {zero_stage} "
                          f"but parallel.zero_stage = {cfg.parallel.zero_stage}; accepted the same stage")
    return merged


def prebuild_cpu_ops() -> None:
    """Compile DeepSpeed's CPU shared-memory communication op once (about a minute), so that
    the first distributed start-up of every later process finds it cached."""
    if torch.cuda.is_available():
        return
    _select_accelerator()
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None and builder.is_compatible():
        builder.load(verbose=False)


if __name__ == "__main__":
    if sys.argv[1:] == ["--prebuild"]:
        prebuild_cpu_ops()
        print("DeepSpeed CPU ops are built")
    else:
        sys.exit("usage: python -m megareuse.engine.ds --prebuild")
