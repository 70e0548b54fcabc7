"""Which part of each single-device tensor this rank holds, under any TP x DP x ZeRO layout, and
where it lives in DeepSpeed's engine: what a rank writes to, and reads from, a sharded checkpoint
(engine/sharded.py).

A parameter's TP shard is a box of the single-device tensor (``tensor_parallel.tp_box``). Over
data parallelism the rank owns a contiguous range of that shard's flattened elements:
- ZeRO-1/2: DeepSpeed's fragment of the parameter in this rank's fp32 partition
  (``param._hp_mapping``: its fp32 master and optimizer-state views);
- ZeRO-3: this rank's partition of the parameter (``ds_tensor``; the fp32 master and moments
  through DeepSpeed's ``safe_get_local_*`` views);
- ZeRO-0: every replica holds all of it; for writing, the DP ranks split it evenly (each writes
  1/DP), for reading every rank takes the whole shard.
A flat range of a 2-D shard is cut into at most three boxes (a partial first row, whole rows, a
partial last row), which are what the checkpoint stores. The values are views of the engine's own
tensors: writing reads them in place, reading copies into them in place.

DeepSpeed's internals (which fragment a rank holds, the wrappers' fp32 state) are reached
through engine/ds_internals.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import nn

from megareuse.config import ModelConfig
from megareuse.engine import ds_internals as ds
from megareuse.engine.sharded import MOMENTS, fqn
from megareuse.parallel.state import ParallelState
from megareuse.parallel.tensor_parallel import tp_box

Box = tuple[tuple[int, ...], tuple[int, ...], int, int]  # single-device offsets, sizes, flat [start, stop)


@dataclass
class Fragment:
    key: str  # the single-device parameter name
    param: nn.Parameter
    offsets: tuple[int, ...]  # this TP rank's shard: where it sits in the single-device tensor
    shape: tuple[int, ...]  # and its shape
    start: int  # [start, stop): the flat range of the shard this rank owns
    stop: int

    def boxes(self) -> list[Box]:
        """The owned range as boxes of the single-device tensor, with their flat [s, e) in the
        owned range (0 = ``start``)."""
        a, b = self.start, self.stop
        if len(self.shape) == 1:
            return [((self.offsets[0] + a,), (b - a,), 0, b - a)]
        if len(self.shape) != 2:
            raise ValueError(f"{self.key}: a {len(self.shape)}-D parameter; sharded checkpoints store 1-D and 2-D ones")
        cols = self.shape[1]
        out: list[Box] = []
        pos = a
        while pos < b:
            row, col = divmod(pos, cols)
            if col or b - pos < cols:  # a partial row
                n = min(cols - col, b - pos)
                out.append(((self.offsets[0] + row, self.offsets[1] + col), (1, n), pos - a, pos - a + n))
            else:  # whole rows
                rows = (b - pos) // cols
                out.append(((self.offsets[0] + row, self.offsets[1]), (rows, cols), pos - a, pos - a + rows * cols))
                n = rows * cols
            pos += n
        return out


def fragments(engine, cfg: ModelConfig, ps: ParallelState, writing: bool,
              whole: bool = False) -> Iterator[Fragment]:
    """This rank's fragment of every parameter (tied ones once), in model order: the parts it
    writes (``writing``: each element by one rank of the job) or the parts it must read
    (``whole``: of the model's parameter, its whole TP shard at ZeRO 0-2)."""
    from megareuse.engine.build import meta_model

    stage = ds.zero_stage(engine)
    shapes = {k: tuple(p.shape) for k, p in meta_model(cfg).named_parameters()}
    for key, param in engine.module.named_parameters():
        offsets, shape, primary = tp_box(key, shapes[key], cfg, ps)
        if writing and not primary:
            continue
        n = 1
        for s in shape:
            n *= s
        if stage in (1, 2) and not whole:
            mapping = ds.hp_fragment(param)
            if mapping is None:
                continue  # none of this parameter is in this rank's partition
            addr = mapping.lp_fragment_address
            start, stop = int(addr.start), int(addr.start + addr.numel)
        elif stage == 3:
            part = ds.zero3_partition_numel(param)
            start, stop = ps.dp_rank * part, min((ps.dp_rank + 1) * part, n)
        elif writing:
            part = -(-n // ps.dp_size)
            start, stop = ps.dp_rank * part, min((ps.dp_rank + 1) * part, n)
        else:
            start, stop = 0, n
        if start < stop:
            yield Fragment(key, param, offsets, shape, start, stop)


class EngineState:
    """Flat fp32 views of the fragments' master weights and Adam moments in one engine."""

    def __init__(self, engine):
        self.engine, self.stage = engine, ds.zero_stage(engine)
        self.base = ds.base_optimizer(engine)
        self.masters = ds.fp32_masters(engine) if self.stage == 0 else {}

    def prepare(self) -> None:
        """Link DeepSpeed's per-parameter optimizer views to the current state (ZeRO-1/2)."""
        ds.relink_fragments(self.engine)

    def view(self, frag: Fragment, moment: Optional[str]) -> torch.Tensor:
        """The fragment's fp32 master weight (``moment`` None) or Adam moment: a flat view of
        ``frag.stop - frag.start`` elements of the engine's own storage."""
        param, n = frag.param, frag.stop - frag.start
        if self.stage in (1, 2):
            mapping = ds.hp_fragment(param)
            return mapping.get_hp_fragment() if moment is None else mapping.get_optim_state_fragment(moment)
        if self.stage == 3:
            from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

            local = safe_get_local_fp32_param(param) if moment is None else safe_get_local_optimizer_state(param, moment)
            return local.reshape(-1).narrow(0, 0, n)
        master = self.masters.get(id(param), param)
        tensor = master if moment is None else self.base.state[master][moment]
        return tensor.detach().reshape(-1).narrow(0, frag.start, n)

    def after_weights(self, frag: Fragment) -> None:
        """ZeRO-0 in bf16: the model's bf16 copy follows its fp32 master."""
        master = self.masters.get(id(frag.param))
        if master is not None:
            with torch.no_grad():
                frag.param.reshape(-1).narrow(0, frag.start, frag.stop - frag.start).copy_(
                    master.reshape(-1).narrow(0, frag.start, frag.stop - frag.start))

    def model_view(self, frag: Fragment) -> torch.Tensor:
        """The fragment's range of the model's own (possibly bf16) parameter, flat."""
        param, n = frag.param, frag.stop - frag.start
        if self.stage == 3:
            return ds.zero3_partition(param).narrow(0, 0, n)
        return param.data.reshape(-1).narrow(0, frag.start, n)


def slots(moments: bool) -> tuple[Optional[str], ...]:
    return (None, *MOMENTS) if moments else (None,)


def state_shapes(engine, cfg: ModelConfig, moments: bool) -> dict[str, tuple[int, ...]]:
    """The stored tensors (sharded.fqn names) and their single-device shapes."""
    from megareuse.engine.build import meta_model

    shapes = {k: tuple(p.shape) for k, p in meta_model(cfg).named_parameters()}
    keys = [k for k, _ in engine.module.named_parameters()]
    return {fqn(k, m): shapes[k] for m in slots(moments) for k in keys}


def collect(engine, cfg: ModelConfig, ps: ParallelState, moments: bool,
            to_host: bool) -> list[tuple[str, tuple[int, ...], torch.Tensor]]:
    """(name, offsets, box) of every chunk this rank writes: views of the engine's tensors, or
    (``to_host``) copies in host memory, pinned on CUDA, for a write that goes on while training
    does. Nothing is gathered from another rank."""
    state = EngineState(engine)
    if moments:
        state.prepare()
    pin = to_host and torch.cuda.is_available()
    out = []
    for frag in fragments(engine, cfg, ps, writing=True):
        for moment in slots(moments):
            flat = state.view(frag, moment)
            for offsets, sizes, s, e in frag.boxes():
                box = flat.narrow(0, s, e - s).view(sizes)
                if to_host:
                    box = torch.empty(sizes, dtype=torch.float32, pin_memory=pin).copy_(box, non_blocking=pin)
                out.append((fqn(frag.key, moment), offsets, box))
    if pin:
        torch.cuda.synchronize()
    return out


def load(engine, cfg: ModelConfig, ps: ParallelState, reader, step: int, moments: bool = True) -> bool:
    """This rank's share of the fp32 master weights and (``moments``, when stored) the Adam
    moments, read from a sharded checkpoint into the engine in place; True when moments were
    loaded. ``step``: Adam's step count to continue from."""
    moments = moments and bool(reader.names("optim."))
    if moments:
        ds.ensure_state(engine, step)
    state = EngineState(engine)
    for frag in fragments(engine, cfg, ps, writing=False):
        for moment in slots(moments):
            flat = state.view(frag, moment)
            for offsets, sizes, s, e in frag.boxes():
                reader.read_into(fqn(frag.key, moment), offsets, flat.narrow(0, s, e - s).view(sizes))
            if moment is None:
                state.after_weights(frag)
    return moments


def load_model_weights(engine, cfg: ModelConfig, ps: ParallelState, reader) -> None:
    """The model's own parameters (bf16 or fp32: its TP shard at ZeRO 0-2, its partition at
    ZeRO-3) from a sharded checkpoint's fp32 weights: a rollback in a running job."""
    state = EngineState(engine)
    for frag in fragments(engine, cfg, ps, writing=False, whole=True):
        buffer = torch.empty(frag.stop - frag.start, dtype=torch.float32)
        for offsets, sizes, s, e in frag.boxes():
            reader.read_into(fqn(frag.key), offsets, buffer.narrow(0, s, e - s).view(sizes))
        with torch.no_grad():
            state.model_view(frag).copy_(buffer)
