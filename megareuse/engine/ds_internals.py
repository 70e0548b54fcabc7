"""Every DeepSpeed attribute megareuse reaches that is not DeepSpeed's public API, in one place.

DeepSpeed's public surface (``initialize``, ``engine.backward/step``, ``safe_get_full_*`` /
``safe_set_full_*`` / ``safe_get_local_*``, ``save_checkpoint`` / ``load_checkpoint``) does not say
which part of a parameter a rank holds, where the torch optimizer inside the ZeRO or bf16 wrapper
keeps Adam's state, or how to turn off its own gradient clipping or its single-rank all-reduce.
The helpers below read those internals (names as of DeepSpeed 0.19; tests/test_sharded_format.py,
test_reshard_matrix.py and test_bf16.py exercise each at every ZeRO stage), so a DeepSpeed
upgrade that renames one breaks this file, not the trainer, the checkpointer or the format.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn


def zero_stage(engine) -> int:
    return int(engine.zero_optimization_stage())


def param_shape(param: nn.Parameter) -> tuple[int, ...]:
    """A parameter's real shape (a ZeRO-3 parameter's ``shape`` is empty while partitioned)."""
    return tuple(getattr(param, "ds_shape", param.shape))


def hp_fragment(param: nn.Parameter):
    """ZeRO-1/2: DeepSpeed's record of the part of ``param`` in this rank's fp32 partition
    (``lp_fragment_address``: its flat range of the parameter; views of the fp32 master and of the
    optimizer state), or None when none of it is here."""
    return getattr(param, "_hp_mapping", None)


def zero3_partition_numel(param: nn.Parameter) -> int:
    """ZeRO-3: the elements of one rank's partition of ``param`` (padded; the last may hold fewer)."""
    return param.ds_tensor.numel()


def zero3_partition(param: nn.Parameter) -> torch.Tensor:
    """ZeRO-3: this rank's partition of the model's own (bf16 or fp32) parameter, flat."""
    return param.ds_tensor.reshape(-1)


def fp32_partitions(engine) -> list[torch.Tensor]:
    """ZeRO-3's flat fp32 sub-group partitions (kept outside the torch optimizer's param groups)."""
    return list(getattr(engine.optimizer, "fp32_partitioned_groups_flat", []))


def measure_clipping_outside(engine) -> float:
    """Turn DeepSpeed's own gradient clipping off (the trainer clips while it measures the norm);
    the max norm it had."""
    max_norm = engine.gradient_clipping()
    engine._config.gradient_clipping = 0.0
    return max_norm


def skip_gradient_allreduce(engine) -> None:
    """One data-parallel rank: no copy of every gradient into a flat buffer and all-reduce over a
    group of one each step."""
    engine.enable_backward_allreduce = False


def load_engine_state(engine, path: Path) -> None:
    """DeepSpeed's own engine state from checkpoint ``path`` (the format before the sharded
    state: ``deepspeed/``). Its files passed their checksums, so a file DeepSpeed cannot read
    was written so: a CheckpointError naming it, not DeepSpeed's traceback."""
    from megareuse.engine.checkpoint import CheckpointError

    try:
        engine.load_checkpoint(str(path / "deepspeed"), tag="state")
    except Exception as exc:  # noqa: BLE001 - torch.load / pickle / DeepSpeed raise many kinds
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise CheckpointError(
            f"checkpoint error: {path / 'deepspeed'}: DeepSpeed cannot load its engine state "
            f"({type(exc).__name__}: {first}); accepted a checkpoint written by megareuse "
            f"(delete or move {path.name} to resume from an older one)") from exc


def base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer doing the update (inside DeepSpeed's ZeRO / bf16 wrapper, if any)."""
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else opt


def optimizer_step(engine) -> int:
    """Adam's step count (0 before the first applied update); the same on every rank."""
    steps = [float(s["step"]) for s in base_optimizer(engine).state.values() if "step" in s]
    return int(max(steps)) if steps else 0


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
    stepped = stepped or fp32_partitions(engine)  # ZeRO-3's
    low, high = short(param if held is None else held), short(stepped[0] if stepped else None)
    return f"{low} parameters, {high} master weights and moments" if low != high else f"{low} throughout"


def is_zero_param(param: nn.Parameter) -> bool:
    return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")


def ensure_state(engine, step: int) -> None:
    """Create Adam's state (zeros, the given step) where the optimizer has none yet (its state
    is made lazily at the first update), and let DeepSpeed link its per-parameter views to it."""
    base = base_optimizer(engine)
    # ZeRO-3 keeps its fp32 sub-group partitions outside the torch optimizer's param groups
    flats = {id(p): p for group in base.param_groups for p in group["params"]}
    flats.update((id(p), p) for p in fp32_partitions(engine))
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


