"""Layout-free state, streamed one tensor at a time: weights and Adam moments in the single-device
layout, written by global rank 0 while the ranks gather each tensor in turn, and read back into
an engine of any TP x DP x ZeRO layout.

Saving (collective): for every parameter, in model order, the data-parallel shards of its fp32
master value (or of an Adam moment) are gathered (DeepSpeed's ``safe_get_full_*`` at ZeRO 1-3;
at ZeRO-0 the parameter itself in fp32, its fp32 master copy in bf16, and the torch optimizer's
state keyed by whichever of the two it steps: ``fp32_masters``), the tensor-parallel
shards are gathered onto the first replica's TP rank 0, merged into the single-device tensor by
rank 0 and appended to the file. No rank holds more than one full tensor at a time.

Loading: each rank cuts its TP shard of each tensor from the lazily read file and hands it to
DeepSpeed's ``safe_set_full_*`` (which keeps this rank's ZeRO partition), so the optimizer state
continues exactly at a different layout (docs/distributed.md, "Changing the layout").
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Mapping, Optional

import torch
import torch.distributed as dist
from torch import nn

from megareuse.config import ModelConfig
from megareuse.engine.weights import TensorWriter
from megareuse.parallel.state import ParallelState
from megareuse.parallel.tensor_parallel import merge_state_dicts, shard_state_dict

MOMENTS = ("exp_avg", "exp_avg_sq")


def base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer doing the update (inside DeepSpeed's ZeRO / bf16 wrapper, if any)."""
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else opt


def optimizer_step(engine) -> int:
    """Adam's step count (0 before the first applied update); the same on every rank."""
    steps = [float(s["step"]) for s in base_optimizer(engine).state.values() if "step" in s]
    return int(max(steps)) if steps else 0


def _unique_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return list(model.named_parameters())  # shared (tied) parameters appear once, first name


def fp32_masters(engine) -> dict[int, torch.Tensor]:
    """id(model parameter) -> its fp32 master copy, for the ZeRO-0 low-precision wrapper.

    At ZeRO-0 in bf16 DeepSpeed wraps the optimizer in ``FP16_UnfusedOptimizer`` (its "DDP
    bf16" path): the model holds bf16 parameters, the torch optimizer steps fp32 clones of them
    (``fp32_groups``) and keys its Adam state by those clones, not by the model's parameters.
    Empty for every other wrapper (ZeRO 1-3 expose the masters through ``safe_get_full_*``;
    ZeRO-0 fp32 steps the model's own parameters)."""
    opt = engine.optimizer
    low, high = getattr(opt, "fp16_groups", None), getattr(opt, "fp32_groups", None)
    if low is None or high is None or hasattr(opt, "bit16_groups"):
        return {}
    return {id(lp): hp for lp_group, hp_group in zip(low, high) for lp, hp in zip(lp_group, hp_group)}


def precision(engine) -> str:
    """What the engine really holds, e.g. "bf16 parameters, fp32 master weights and moments":
    the model's parameters (a ZeRO-3 partition's own dtype) and the tensors the torch optimizer
    steps. For the start line, and the tests that a bf16 run is bf16 at every ZeRO stage."""
    def short(t: Optional[torch.Tensor]) -> str:
        return "none" if t is None else {torch.bfloat16: "bf16", torch.float32: "fp32"}.get(t.dtype, str(t.dtype))

    param = next(engine.module.parameters())
    held = getattr(param, "ds_tensor", None)
    stepped = [p for group in base_optimizer(engine).param_groups for p in group["params"]]
    stepped = stepped or list(getattr(engine.optimizer, "fp32_partitioned_groups_flat", []))  # ZeRO-3's
    low, high = short(param if held is None else held), short(stepped[0] if stepped else None)
    return f"{low} parameters, {high} master weights and moments" if low != high else f"{low} throughout"


def _is_zero(param: nn.Parameter) -> bool:
    return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")


def _full_over_dp(engine, param: nn.Parameter, key: Optional[str],
                  masters: Optional[dict[int, torch.Tensor]] = None) -> torch.Tensor:
    """This rank's TP shard of ``param`` (its fp32 master, or Adam moment ``key``), whole over DP."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if _is_zero(param):
        value = safe_get_full_fp32_param(param) if key is None else safe_get_full_optimizer_state(param, key)
        return value.reshape(getattr(param, "ds_shape", param.shape))
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


def _ensure_state(engine, step: int) -> None:
    """Create Adam's state (zeros, the given step) where the optimizer has none yet (its state
    is made lazily at the first update), and let DeepSpeed link its per-parameter views to it."""
    base = base_optimizer(engine)
    # ZeRO-3 keeps its fp32 sub-group partitions outside the torch optimizer's param groups
    flats = {id(p): p for group in base.param_groups for p in group["params"]}
    flats.update((id(p), p) for p in getattr(engine.optimizer, "fp32_partitioned_groups_flat", []))
    for p in flats.values():
        state = base.state[p]
        if not state:
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] = torch.tensor(float(step), dtype=torch.float32, device=p.device)
    relink_fragments(engine)


# (low-precision groups, fp32 partitions) attribute names of DeepSpeed's ZeRO-1/2 and bf16 wrappers
_FRAGMENT_GROUPS = (("bit16_groups", "single_partition_of_fp32_groups"), ("bf16_groups", "fp32_groups_flat_partition"))


def relink_fragments(engine) -> None:
    """Point every parameter's optimizer-state views (``_hp_mapping``) at the current state.

    DeepSpeed links them once, right after the first parameter group's first update, when the
    other groups (here: the no-weight-decay group) have no state yet; their views then stay
    empty and ``safe_get_full_optimizer_state`` fails. Linking again once all state exists fixes
    that. A no-op at ZeRO-0 fp32 and ZeRO-3 (which read the state directly)."""
    from deepspeed.utils import lazy_init_hp_params_optimizer_state

    opt, base = engine.optimizer, base_optimizer(engine)
    for lp_name, hp_name in _FRAGMENT_GROUPS:
        if hasattr(opt, lp_name) and hasattr(opt, hp_name):
            for lp_group, hp_flat in zip(getattr(opt, lp_name), getattr(opt, hp_name)):
                if base.state.get(hp_flat):
                    lazy_init_hp_params_optimizer_state(lp_group, hp_flat, base.state)
            return


def load_full(engine, model: nn.Module, cfg: ModelConfig, ps: ParallelState,
              moments: Mapping[str, torch.Tensor], step: int,
              weights: Optional[Mapping[str, torch.Tensor]] = None) -> None:
    """Set this rank's share of the Adam moments (and of the fp32 master weights, when given)
    from single-device tensors read lazily, at whatever layout the engine has."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    _ensure_state(engine, step)
    base = base_optimizer(engine)
    masters = fp32_masters(engine)
    for key, param in _unique_params(model):
        zero, master = _is_zero(param), masters.get(id(param))
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
