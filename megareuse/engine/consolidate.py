"""The consolidated single-device state: one file of every fp32 weight (and Adam moment).

- ``consolidate``: `megareuse consolidate`, a sharded checkpoint's weights (and moments) as one
  safetensors file, streamed one tensor at a time (what DeepSpeed's zero_to_fp32 gives).
- The format checkpoints had before the sharded one (engine/sharded.py): ``model.safetensors`` and
  ``optimizer.safetensors``, written by global rank 0 while the ranks gather each tensor in turn
  (``write_full``: DeepSpeed's ``safe_get_full_*`` over ZeRO, a gather over TP; kept for
  benchmarks/checkpoint_save.py's comparison and for tests that write such a checkpoint), and
  read back into an engine of any TP x DP x ZeRO layout (``load_full``, through DeepSpeed's
  ``safe_set_full_*``): older checkpoints keep loading.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Mapping, Optional

import torch
import torch.distributed as dist
from torch import nn

from megareuse.config import ModelConfig
from megareuse.engine.ds_internals import (base_optimizer, ensure_state, fp32_masters, is_zero_param, param_shape,
                                            relink_fragments)
from megareuse.engine.sharded import MOMENTS, WEIGHT_PREFIX, ShardedReader, is_sharded
from megareuse.engine.weights import TensorWriter
from megareuse.parallel.state import ParallelState
from megareuse.parallel.tensor_parallel import merge_state_dicts, shard_state_dict



def _unique_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return list(model.named_parameters())  # shared (tied) parameters appear once, first name


def _full_over_dp(engine, param: nn.Parameter, key: Optional[str],
                  masters: Optional[dict[int, torch.Tensor]] = None) -> torch.Tensor:
    """This rank's TP shard of ``param`` (its fp32 master, or Adam moment ``key``), whole over DP."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if is_zero_param(param):
        value = safe_get_full_fp32_param(param) if key is None else safe_get_full_optimizer_state(param, key)
        return value.reshape(param_shape(param))
    master = (masters or {}).get(id(param), param)
    if key is None:
        return master.detach()
    return base_optimizer(engine).state[master][key]


def _merge_tp(key: str, shard: torch.Tensor, cfg: ModelConfig, ps: ParallelState) -> Optional[torch.Tensor]:
    """The single-device tensor on global rank 0 (None elsewhere); collective over the TP group
    of the first data-parallel replica only."""
    if ps.tp_size == 1:
        return shard if ps.rank == 0 else None
    if ps.dp_rank != 0:
        return None
    shard = shard.detach().float().contiguous()
    parts = [torch.empty_like(shard) for _ in range(ps.tp_size)] if ps.tp_rank == 0 else None
    dist.gather(shard, parts, dst=ps.tp_src_rank, group=ps.tp_group)
    if ps.tp_rank != 0:
        return None
    return merge_state_dicts([{key: p} for p in parts], cfg, ps.tp_size)[key]


def stream_full(engine, model: nn.Module, cfg: ModelConfig, ps: ParallelState,
                moment: Optional[str] = None) -> Iterator[tuple[str, Optional[torch.Tensor]]]:
    """(key, single-device fp32 tensor on rank 0 / None elsewhere) per parameter; collective."""
    masters = fp32_masters(engine)
    for key, param in _unique_params(model):
        yield key, _merge_tp(key, _full_over_dp(engine, param, moment, masters).float(), cfg, ps)


def state_specs(model: nn.Module, cfg: ModelConfig, moments: bool) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Names and single-device shapes of the tensors ``write_full`` writes, in order."""
    from megareuse.engine.build import meta_model

    shapes = dict((k, tuple(p.shape)) for k, p in meta_model(cfg).named_parameters())
    keys = [k for k, _ in _unique_params(model)]
    groups = [f"{m}/" for m in MOMENTS] if moments else [""]
    return {g + k: (shapes[k], torch.float32) for g in groups for k in keys}


def write_full(path: Optional[Path], engine, model: nn.Module, cfg: ModelConfig, ps: ParallelState,
               moments: bool) -> Optional[tuple[int, str]]:
    """Stream the fp32 weights (``moments`` False) or the Adam moments to ``path`` (a
    safetensors file, written by rank 0: pass None elsewhere). Returns (bytes, sha256) on rank 0.
    Collective over every rank."""
    specs = state_specs(model, cfg, moments)
    if moments:
        relink_fragments(engine)
    writer = TensorWriter(path, specs) if ps.rank == 0 else None
    try:
        for moment in (MOMENTS if moments else (None,)):
            prefix = "" if moment is None else f"{moment}/"
            for key, full in stream_full(engine, model, cfg, ps, moment):
                if writer is not None:
                    writer.write(prefix + key, full)
        return writer.close() if writer is not None else None
    except BaseException:
        if writer is not None:
            writer.__exit__(RuntimeError, None, None)
        raise


def load_full(engine, model: nn.Module, cfg: ModelConfig, ps: ParallelState,
              moments: Mapping[str, torch.Tensor], step: int,
              weights: Optional[Mapping[str, torch.Tensor]] = None) -> None:
    """Set this rank's share of the Adam moments (and of the fp32 master weights, when given)
    from single-device tensors read lazily, at whatever layout the engine has."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    ensure_state(engine, step)
    base = base_optimizer(engine)
    masters = fp32_masters(engine)
    for key, param in _unique_params(model):
        zero, master = is_zero_param(param), masters.get(id(param))
        sources = [(m, moments[f"{m}/{key}"]) for m in MOMENTS]
        if weights is not None and (zero or master is not None):  # the model built a rounded copy
            sources.append((None, weights[key]))
        for moment, full in sources:
            shard = shard_state_dict({key: full}, cfg, ps)[key] if ps.tp_size > 1 else full
            if zero:
                target = torch.as_tensor(shard, dtype=torch.float32).to(param.device)
                if moment is None:
                    safe_set_full_fp32_param(param, target)
                else:
                    safe_set_full_optimizer_state(param, target, moment)
                continue
            with torch.no_grad():
                if moment is None:  # ZeRO-0 bf16: the fp32 master, and the model's bf16 copy of it
                    master.copy_(shard)
                    param.copy_(shard)
                else:
                    base.state[param if master is None else master][moment].copy_(shard)


def consolidate(ckpt_dir: Path, out: Path, moments: bool = False) -> tuple[int, int]:
    """``megareuse consolidate``: a checkpoint's single-device fp32 weights (and, with
    ``moments``, Adam's moments as ``exp_avg.<key>`` / ``exp_avg_sq.<key>``) as one safetensors
    file, streamed one tensor at a time: what DeepSpeed's zero_to_fp32 gives from its own
    checkpoints. Returns (tensors, bytes). Refuses an existing ``out``."""
    from megareuse.engine.checkpoint import CheckpointError, verify_checkpoint

    ckpt_dir, out = Path(ckpt_dir), Path(out)
    problem = verify_checkpoint(ckpt_dir)
    if problem is None and not is_sharded(ckpt_dir):
        problem = "it holds no sharded state (state/index.json): its model.safetensors is already consolidated"
    if problem:
        raise CheckpointError(f"consolidate error: --from {str(ckpt_dir)!r}: {problem}; accepted a checkpoint "
                              "directory written by megareuse train")
    if out.exists():
        raise CheckpointError(f"consolidate error: --out {str(out)!r} exists; accepted a new file path")
    if not out.parent.is_dir():
        raise CheckpointError(f"consolidate error: --out {str(out)!r}: its directory does not exist")
    reader = ShardedReader(ckpt_dir)
    names = reader.names(WEIGHT_PREFIX) + (reader.names("optim.") if moments else [])
    if moments and len(names) == len(reader.names(WEIGHT_PREFIX)):
        raise CheckpointError(f"consolidate error: --optimizer: {ckpt_dir} holds no optimizer state "
                              "(saved before the first update); accepted without --optimizer")
    stored = {n: (n[len(WEIGHT_PREFIX):] if n.startswith(WEIGHT_PREFIX) else n[len("optim."):]) for n in names}
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    with TensorWriter(tmp, {stored[n]: (reader.tensors[n], torch.float32) for n in names},
                      metadata={"format": "pt", "source": str(ckpt_dir)}) as writer:
        for n in names:
            writer.write(stored[n], reader.full(n))
        size = writer.close()[0]
    os.replace(tmp, out)
    return len(names), size
