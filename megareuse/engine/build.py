"""Build a run's model so that no rank ever holds more than its own shard of it.

The steps (torchtitan's order): the model's shapes on the meta device (no memory) ->
tensor parallelism applied to the meta model (each projection becomes this rank's shard, still
meta) -> materialisation, one tensor at a time, in the model's own initialisation order -> under
ZeRO-3, each module's parameters partitioned over data parallelism as soon as they exist.

Where the values come from (``WeightSource``):
- ``SeededInit``: the same draws as ``torch.manual_seed(seed); GPT(cfg)`` on one device, replayed
  with a generator seeded alike. Each weight is drawn whole (the draws of a slice depend on the
  whole tensor's shape), its shard is kept and the rest freed, so a rank's peak is its shard plus
  one full tensor, and the gathered weights equal the single-device model's exactly;
- ``CheckpointWeights``: a checkpoint's consolidated weights, read lazily tensor by tensor.
"""
from __future__ import annotations

import copy
from typing import Any, Mapping, Optional, Protocol

import torch
from torch import nn

from megareuse.config import ModelConfig
from megareuse.model import GPT
from megareuse.model.rope import RotaryEmbedding
from megareuse.parallel.state import MPU, ParallelState
from megareuse.parallel.tensor_parallel import parallelize_model, shard_state_dict, tp_box


class WeightSource(Protocol):
    def full(self, key: str, shape: tuple[int, ...], std: Optional[float]) -> Optional[torch.Tensor]:
        """The single-device tensor of state-dict ``key`` (None: keep the module's reset value).
        ``std`` is the init's N(0, std) for a drawn weight, 0 for a bias (zeros), None for a
        tensor the module resets itself (norm gains)."""


class SeededInit:
    """Replays ``torch.manual_seed(seed); GPT(cfg)``: the global RNG is seeded, the draws each
    module's constructor makes (nn.Linear's and nn.Embedding's default init, overwritten later
    but consuming the stream) are replayed on throwaway copies, then ``full`` draws GPT's own
    N(0, std) init in ``GPT.init_plan`` order. Leaves the global RNG where GPT(cfg) leaves it."""

    def __init__(self, seed: int, reference: GPT):
        torch.manual_seed(seed)
        for module in reference.modules():
            if any(True for _ in module.parameters(recurse=False)) and hasattr(module, "reset_parameters"):
                scratch = copy.deepcopy(module).to_empty(device="cpu")
                scratch.reset_parameters()
                del scratch

    def full(self, key: str, shape: tuple[int, ...], std: Optional[float]) -> Optional[torch.Tensor]:
        if std is None:
            return None
        if std == 0:  # a bias: zeros, as GPT.init_weights sets them (no draw)
            return torch.zeros(shape)
        return nn.init.normal_(torch.empty(shape), 0.0, std)


class CheckpointWeights:
    """Tensors of a single-device state dict (e.g. ``weights.open_weights``), read when asked."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self.tensors = tensors

    def full(self, key: str, shape: tuple[int, ...], std: Optional[float]) -> Optional[torch.Tensor]:
        try:
            value = self.tensors[key]
        except KeyError:
            raise KeyError(f"the checkpoint's weights have no {key}") from None
        if tuple(value.shape) != tuple(shape):
            raise ValueError(f"the checkpoint's {key} has shape {tuple(value.shape)}, the model {tuple(shape)}")
        return value

    def shard(self, key: str, shape: tuple[int, ...], cfg: ModelConfig, pstate: ParallelState) -> torch.Tensor:
        """This TP rank's shard of ``key``: only its box read from a sharded checkpoint (a rank
        of TP=8 reads an eighth of the weights), else cut from the whole tensor."""
        read_box = getattr(self.tensors, "read_box", None)
        if read_box is None or pstate.tp_size == 1:
            full = self.full(key, shape, None)
            return shard_state_dict({key: full}, cfg, pstate)[key] if pstate.tp_size > 1 else full
        try:
            stored = tuple(self.tensors.shape(key))
        except KeyError:
            raise KeyError(f"the checkpoint's weights have no {key}") from None
        if stored != tuple(shape):
            raise ValueError(f"the checkpoint's {key} has shape {stored}, the model {tuple(shape)}")
        offsets, sizes, _ = tp_box(key, shape, cfg, pstate)
        return read_box(key, offsets, sizes)


def meta_model(cfg: ModelConfig) -> GPT:
    """The single-device model's structure without storage."""
    with torch.device("meta"):
        return GPT(cfg)


def build_model(cfg: ModelConfig, pstate: ParallelState, device: torch.device, source: Optional[WeightSource] = None,
                zero3_config: Optional[dict[str, Any]] = None, seed: int = 0,
                dtype: torch.dtype = torch.float32) -> GPT:
    """This rank's part of the model, materialised on ``device`` from ``source``.

    ``source`` None: the seeded initialisation of ``seed`` (``SeededInit``). With ``zero3_config`` (the DeepSpeed config of a ZeRO-3 run) each module's parameters are
    partitioned over the data-parallel group right after they are materialised. Collective
    (TP subgroups; ZeRO-3 partitioning broadcasts).

    ``dtype``: the parameters' compute dtype (bf16 for a bf16 run). Each value is drawn or read
    in fp32 and rounded once when placed. It matters at ZeRO-3: ``zero.Init(module=...)``
    partitions parameters in whatever dtype they have, and DeepSpeed's engine never casts a
    ZeRO-3 model, so fp32 parameters would stay fp32 (partitions, all-gathers and matmuls) in a
    bf16 run. At ZeRO 0-2 the engine casts the model itself; building in bf16 there only saves
    the fp32 copy. The optimizers' fp32 masters are made from these bf16 values (DeepSpeed's
    rule at every stage); a resumed run sets them from the checkpoint's fp32 weights."""
    reference = meta_model(cfg)  # single-device structure: the draw order and full shapes
    source = SeededInit(seed, reference) if source is None else source
    model = meta_model(cfg)
    if pstate.tp_size > 1:
        parallelize_model(model, pstate)
    zero3 = _zero3_partitioner(zero3_config, pstate)
    done: dict[int, nn.Parameter] = {}
    for name, ref_module, std in reference.init_plan():
        module = model.get_submodule(name)
        if isinstance(module, RotaryEmbedding):
            module.to_empty(device=device)
            module.reset_parameters()
            continue
        reset = False
        for leaf, ref_param in ref_module.named_parameters(recurse=False):
            key = f"{name}.{leaf}"
            if isinstance(source, CheckpointWeights):
                value = source.shard(key, tuple(ref_param.shape), cfg, pstate)
            else:
                full = source.full(key, tuple(ref_param.shape), _std(leaf, std))
                if full is None:  # reset by the module itself (norm gains): a replicated tensor
                    value, reset = torch.empty(ref_param.shape, device=device), True
                else:
                    value = shard_state_dict({key: full}, cfg, pstate)[key] if pstate.tp_size > 1 else full
                    del full
            _place(module, leaf, value.to(device=device, dtype=dtype), done)
        if reset:
            with torch.no_grad():
                module.reset_parameters()
        if zero3 is not None:
            zero3(module)
    _retie(model, done)
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:
        raise RuntimeError(f"build_model left {leftover[:3]} unmaterialised")
    return model


def _std(leaf: str, std: Optional[float]) -> Optional[float]:
    """The init of one tensor of a planned module: its weight's std, 0 (zeros) for a linear's bias."""
    if leaf == "bias" and std is not None:
        return 0.0
    return std if leaf == "weight" else None


def _place(module: nn.Module, leaf: str, value: torch.Tensor, done: dict[int, nn.Parameter]) -> None:
    """Swap the meta parameter ``module.<leaf>`` for ``value``, keeping its attributes (the TP
    marks DeepSpeed reads) and, for a parameter shared by several modules, its identity."""
    old = module._parameters[leaf]
    new = nn.Parameter(value, requires_grad=old.requires_grad)
    for attr, attr_value in vars(old).items():
        setattr(new, attr, attr_value)
    done[id(old)] = new
    module._parameters[leaf] = new


def _retie(model: nn.Module, done: dict[int, nn.Parameter]) -> None:
    """Point every module still holding a meta parameter that was materialised elsewhere (a tied
    head) at the materialised one."""
    for module in model.modules():
        for leaf, param in list(module._parameters.items()):
            if param is not None and param.is_meta and id(param) in done:
                module._parameters[leaf] = done[id(param)]


def _zero3_partitioner(ds_config: Optional[dict[str, Any]], pstate: ParallelState):
    """A function partitioning one module's (materialised) parameters, ZeRO-3 style."""
    if ds_config is None:
        return None
    import deepspeed

    mpu = MPU(pstate)

    def partition(module: nn.Module) -> None:
        if any(True for _ in module.parameters(recurse=False)):
            deepspeed.zero.Init(module=module, config_dict_or_path=ds_config, mpu=mpu,
                               data_parallel_group=pstate.dp_group, mem_efficient_linear=False)
    return partition
