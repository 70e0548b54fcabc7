"""Which torch.distributed backend serves which device, and an audit of the collectives a run makes.

On CUDA the process group is ``"cpu:gloo,cuda:nccl"``: NCCL for device tensors (gradients,
activations under TP, the step's loss) and gloo beside it for the host tensors of the trainer's
control traffic (the stop-signal agreement, evaluation totals, a failed-save flag) and for
object collectives. A pure ``nccl`` group rejects every CPU tensor, and a world of one rank
never calls the all-reduce, so a one-GPU run cannot show it: hence ``CollectiveAudit``, which
records each collective's tensor devices and fails on a combination the backends of a CUDA run
would reject, run on CPU with the backend string a CUDA run would request.

Groups made later with ``dist.new_group`` (TP, DP, KV-sharing subgroups; DeepSpeed's own)
inherit the world's backend string when they name none, so every group carries both.
"""
from __future__ import annotations

import contextlib
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist

from megareuse.config import ConfigError, ParallelConfig

HOST_AND_NCCL = "cpu:gloo,cuda:nccl"


def process_group_backend(name: str, cuda: Optional[bool] = None) -> str:
    """The backend string ``init_process_group`` gets for ``parallel.backend = name``.

    ``cuda``: whether this process trains on CUDA (default: whether CUDA is available).
    "auto" and "nccl" on CUDA -> "cpu:gloo,cuda:nccl" (NCCL alone cannot carry host tensors);
    "auto" elsewhere and "gloo" -> "gloo" (gloo takes CPU and CUDA tensors alike);
    "nccl" without CUDA is refused in one line."""
    if name not in ParallelConfig.BACKENDS:
        raise ConfigError(f"config error: parallel.backend = {name!r}: accepted one of "
                          f"{', '.join(ParallelConfig.BACKENDS)}")
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if name == "gloo":
        return "gloo"
    if cuda:
        return HOST_AND_NCCL
    if name == "nccl":
        raise ConfigError("config error: parallel.backend = 'nccl' but no CUDA device is available; "
                          "accepted auto or gloo here")
    return "gloo"


def backend_map(spec: str) -> dict[str, str]:
    """Device type -> backend of a backend string, as torch reads it: "cpu:gloo,cuda:nccl" ->
    {"cpu": "gloo", "cuda": "nccl"}; a single "nccl" serves CUDA only, "gloo" CPU and CUDA."""
    spec = spec.strip().lower()
    if ":" not in spec:
        return {"cuda": "nccl"} if spec == "nccl" else {"cpu": spec, "cuda": spec}
    pairs = (part.split(":", 1) for part in spec.split(",") if part.strip())
    return {device.strip(): backend.strip() for device, backend in pairs}


def rejection(spec: str, device_type: str) -> Optional[str]:
    """Why a group of backend string ``spec`` cannot run a collective on a ``device_type``
    tensor (None: it can)."""
    if device_type in backend_map(spec):
        return None
    return f"a {device_type} tensor in a collective over a {spec!r} group (no backend for {device_type})"


# --------------------------------------------------------------------------- the audit
_TENSOR_COLLECTIVES = ("all_reduce", "broadcast", "reduce", "all_gather", "gather", "scatter",
                       "reduce_scatter", "all_gather_into_tensor", "reduce_scatter_tensor",
                       "all_to_all_single", "all_to_all")


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


@dataclass
class Call:
    op: str
    devices: tuple[str, ...]
    dtype: str
    problem: Optional[str]
    caller: str  # the calling function's name (e.g. "agreed", "all_reduce" of DeepSpeed's comm)


@dataclass
class CollectiveAudit:
    """Wraps torch.distributed's tensor collectives for the duration of a ``with`` block and
    records every call: op, tensor device types, and the problem, if any, that a group of
    backend string ``spec`` would have with it (``rejection``). ``device_of`` maps a tensor to
    the device type to judge it by (default: its own)."""
    spec: str
    device_of: Callable[[torch.Tensor], str] = lambda t: t.device.type
    calls: list[Call] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def problems(self) -> list[str]:
        return [f"{c.op}: {c.problem}" for c in self.calls if c.problem]

    def _record(self, op: str, args: tuple, kwargs: dict, caller: str) -> None:
        found = [t for v in (*args, *kwargs.values()) for t in _tensors(v)]
        devices = tuple(sorted({self.device_of(t) for t in found}))
        problem = next((p for d in devices if (p := rejection(self.spec, d))), None)
        with self._lock:
            self.calls.append(Call(op, devices, str(found[0].dtype) if found else "", problem, caller))

    @contextlib.contextmanager
    def installed(self) -> Iterator["CollectiveAudit"]:
        originals = {name: getattr(dist, name) for name in _TENSOR_COLLECTIVES if hasattr(dist, name)}

        def wrap(name: str, fn: Callable) -> Callable:
            def audited(*args, **kwargs):
                self._record(name, args, kwargs, sys._getframe(1).f_code.co_name)
                return fn(*args, **kwargs)
            return audited
        for name, fn in originals.items():
            setattr(dist, name, wrap(name, fn))
        try:
            yield self
        finally:
            for name, fn in originals.items():
                setattr(dist, name, fn)
