"""Tensor files written one tensor at a time, and read lazily (safetensors format).

A checkpoint's consolidated weights (``model.safetensors``) and its layout-free optimizer state
(``optimizer.safetensors``) are streamed: the header (names, dtypes, shapes, offsets) is known
from the model config before any tensor exists, so the writer puts it first and then appends each
tensor's bytes as it arrives, hashing and counting as it goes. No process ever needs the whole
state dict in memory to write it, and the sha256 the manifest records is computed while writing,
not by a second pass over the file.

Readers (``open_tensors``) are lazy: a tensor is read from the file when asked for (safetensors'
``safe_open``), so loading a shard of a large checkpoint touches only that shard's bytes. Old
checkpoints hold ``model.pt`` (one torch.save'd dict); ``open_tensors`` reads those too,
memory-mapped.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Iterator, Mapping, Optional

import torch

from megareuse.config import ModelConfig
from megareuse.model.flops import weight_shapes

_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
           torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}


class TensorWriter:
    """Write a safetensors file whose tensors arrive one by one, in the order of ``specs``.

    ``specs`` maps name -> (shape, dtype). ``write(name, tensor)`` must be called for every name,
    in order; ``close()`` fsyncs and returns (bytes, sha256) of the finished file. Used as a
    context manager, a failure leaves no half-written file under ``path`` (it is removed).
    """

    def __init__(self, path: Path, specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
                 metadata: Optional[dict[str, str]] = None):
        self.path = Path(path)
        header: dict[str, object] = {"__metadata__": dict(metadata or {})} if metadata else {}
        offset = 0
        self._order: list[tuple[str, tuple[int, ...], torch.dtype, int]] = []
        for name, (shape, dtype) in specs.items():
            nbytes = _numel(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._order.append((name, tuple(shape), dtype, nbytes))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors aligns the data to 8 bytes
        self._digest = hashlib.sha256()
        self._bytes = 0
        self._next = 0
        self._fh = open(self.path, "wb")
        self._emit(struct.pack("<Q", len(raw)) + raw)

    def _emit(self, data) -> None:
        self._fh.write(data)
        self._digest.update(data)
        self._bytes += len(data)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected, shape, dtype, nbytes = self._order[self._next]
        if name != expected or tuple(tensor.shape) != shape:
            raise ValueError(f"tensor file {self.path.name}: got {name} {tuple(tensor.shape)}, expected "
                             f"{expected} {shape}")
        data = tensor.detach().to("cpu", dtype).contiguous().reshape(-1).view(torch.uint8).numpy()
        assert data.nbytes == nbytes
        self._emit(memoryview(data))
        self._next += 1

    def close(self) -> tuple[int, str]:
        if self._next != len(self._order):
            raise ValueError(f"tensor file {self.path.name}: {len(self._order) - self._next} tensors never written")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        return self._bytes, self._digest.hexdigest()

    def __enter__(self) -> "TensorWriter":
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is not None:
            self._fh.close()
            self.path.unlink(missing_ok=True)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


class LazyTensors(Mapping[str, torch.Tensor]):
    """name -> tensor, each read from the file when first asked for (and not kept)."""

    def __init__(self, path: Path, aliases: Optional[dict[str, str]] = None):
        from safetensors import safe_open

        self.path = Path(path)
        self._file = safe_open(str(self.path), framework="pt", device="cpu")
        self._names = list(self._file.keys())
        self._aliases = {a: t for a, t in (aliases or {}).items() if t in self._names and a not in self._names}

    def __getitem__(self, name: str) -> torch.Tensor:
        name = self._aliases.get(name, name)
        if name not in self._names:
            raise KeyError(name)
        return self._file.get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._file.get_slice(self._aliases.get(name, name)).get_shape())

    def __iter__(self) -> Iterator[str]:
        return iter(self._names + list(self._aliases))

    def __len__(self) -> int:
        return len(self._names) + len(self._aliases)


WEIGHTS = "model.safetensors"
LEGACY_WEIGHTS = "model.pt"
OPTIMIZER = "optimizer.safetensors"
TIED = {"output.weight": "tok_embeddings.weight"}


def weights_file(ckpt_dir: Path) -> Optional[Path]:
    """The file naming a checkpoint directory's weights: its sharded state's index
    (engine/sharded.py, what training writes), or a consolidated weights file (grow, import-hf,
    older checkpoints); None when it has none."""
    from megareuse.engine.sharded import INDEX, STATE

    for name in (f"{STATE}/{INDEX}", WEIGHTS, LEGACY_WEIGHTS):
        if (Path(ckpt_dir) / name).is_file():
            return Path(ckpt_dir) / name
    return None


def open_weights(ckpt_dir: Path, tied: bool, model: Optional[ModelConfig] = None) -> Mapping[str, torch.Tensor]:
    """The single-device state dict of a checkpoint, read lazily. With ``tied`` embeddings the
    head's key "output.weight" is served from "tok_embeddings.weight" (stored once). With
    ``model`` the tensors' names and shapes are checked against it first. A file that is not
    what it should be raises CheckpointError naming it."""
    from megareuse.engine.checkpoint import CheckpointError
    path = weights_file(ckpt_dir)
    if path is None:
        raise CheckpointError(f"checkpoint error: {ckpt_dir} holds no weights (no state/, {WEIGHTS} or "
                              f"{LEGACY_WEIGHTS}); accepted a checkpoint written by megareuse")
    try:
        if path.name != WEIGHTS and path.name != LEGACY_WEIGHTS:
            from megareuse.engine.sharded import ShardedWeights
            sd = ShardedWeights(ckpt_dir, TIED if tied else None)
        elif path.name == LEGACY_WEIGHTS:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        else:
            sd = LazyTensors(path, TIED if tied else None)
    except Exception as exc:  # safetensors' and torch's own errors for a damaged file
        raise CheckpointError(f"checkpoint error: {path} is not a readable weights file "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    if model is not None:
        problem = weights_problem(sd, model, tied)
        if problem is not None:
            raise CheckpointError(f"checkpoint error: {path} does not fit the model of its meta.json: {problem}")
    return sd


def weights_problem(sd: Mapping[str, torch.Tensor], model: ModelConfig, tied: bool) -> Optional[str]:
    """None when ``sd`` holds exactly the weights of ``GPT(model)``, else the first difference.
    With ``tied`` the head may be left out (it is the embedding). The one check of names and
    shapes that loading, growth and export-hf share."""
    want = weight_shapes(model)
    stored = set(sd)  # names only: ``in`` on LazyTensors would read the tensor
    names = set(stored)
    if tied:
        names |= {alias for alias, target in TIED.items() if target in names}
    missing, extra = sorted(set(want) - names), sorted(names - set(want))
    if missing:
        return f"no tensor {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
    if extra:
        return f"unexpected tensor {extra[0]}" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
    for name, shape in want.items():
        key = name if name in stored else TIED.get(name, name)  # a tied head stored once
        got = tuple(sd.shape(key)) if callable(getattr(sd, "shape", None)) else tuple(sd[key].shape)
        if got != shape:
            return f"{name} has shape {got}, the config gives {shape}"
    return None


def load_state_dict(ckpt_dir: Path, tied: bool, device: str | torch.device = "cpu",
                    model: Optional[ModelConfig] = None) -> dict[str, torch.Tensor]:
    """The whole single-device state dict in memory (for one-process tools: evaluate, grow)."""
    lazy = open_weights(ckpt_dir, tied, model)
    out = {name: lazy[name].to(device) for name in lazy if not (tied and name in TIED)}
    if tied:  # one tensor, as in a tied GPT's state dict
        out.update((alias, out[target]) for alias, target in TIED.items() if target in out)
    return out


def write_state_dict(path: Path, state_dict: Mapping[str, torch.Tensor], tied: bool) -> tuple[int, str]:
    """Write a single-device state dict (a tied head stored once); returns (bytes, sha256)."""
    items = {k: v for k, v in state_dict.items() if not (tied and k in TIED)}
    with TensorWriter(path, {k: (tuple(v.shape), v.dtype) for k, v in items.items()}) as writer:
        for name, value in items.items():
            writer.write(name, value)
        return writer.close()
