"""The sharded, layout-free checkpoint format: every rank writes its own share, in parallel.

A checkpoint's training state is one set of single-device fp32 tensors, whatever layout wrote
it: the weights ``model.<key>`` and Adam's moments ``optim.exp_avg.<key>`` and
``optim.exp_avg_sq.<key>`` (``<key>`` a parameter of the single-device GPT). Each is stored as
rectangular chunks of the single-device tensor (engine/fragments.py says which chunks a rank
owns under TP x ZeRO: every element is written once, by the rank that holds it):

    state/__<rank>_0.distcp   rank <rank>'s chunks, each one torch.save'd tensor, back to back
                              (written, hashed and fsynced by that rank alone)
    state/index.json          every chunk: tensor, offsets, sizes, file, byte range (rank 0)
    state/.metadata           the same index as torch.distributed.checkpoint's Metadata, so that
                              ``dcp.load`` / ``FileSystemReader`` read the checkpoint too

Reading (``ShardedReader``) asks for a box of one tensor and reads only the chunks that overlap
it, one chunk in memory at a time: a rank resuming at another layout reads its new share, and
the one-process tools (evaluate, grow, export-hf, ``megareuse consolidate``) read whole tensors
one at a time (``ShardedWeights``).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import torch

STATE = "state"
INDEX = "index.json"
DCP_METADATA = ".metadata"
WEIGHT_PREFIX = "model."
MOMENTS = ("exp_avg", "exp_avg_sq")
FORMAT = "megareuse-sharded-1"


def fqn(key: str, moment: Optional[str] = None) -> str:
    """The stored name of parameter ``key``'s fp32 weight (``moment`` None) or Adam moment."""
    return WEIGHT_PREFIX + key if moment is None else f"optim.{moment}.{key}"


def rank_file(rank: int) -> str:
    return f"__{rank}_0.distcp"  # torch.distributed.checkpoint's own file naming


def is_sharded(ckpt_dir: Path) -> bool:
    return (Path(ckpt_dir) / STATE / INDEX).is_file()


def _owned(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` on the host, fp32, owning exactly its storage (torch.save writes a view's whole
    storage): a copy only where one is needed."""
    t = tensor.detach()
    if t.device.type != "cpu" or t.dtype != torch.float32:
        return t.to("cpu", torch.float32)
    if not t.is_contiguous() or t.storage_offset() or t.untyped_storage().nbytes() != t.numel() * 4:
        return t.clone()
    return t


class ChunkWriter:
    """One rank's chunk file: chunks appended as they come, sha256 and size counted as written,
    fsynced on ``close``, which returns the file's manifest entry with its chunks' index."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "wb")
        self._digest = hashlib.sha256()
        self._bytes = 0
        self.chunks: list[dict[str, Any]] = []

    def write(self, data) -> int:
        """The file-like side torch.save writes to: straight to the file, hashed and counted."""
        view = memoryview(data)
        self._fh.write(view)
        self._digest.update(view)
        self._bytes += view.nbytes
        return view.nbytes

    def flush(self) -> None:
        self._fh.flush()

    def add(self, name: str, offsets: Sequence[int], tensor: torch.Tensor) -> None:
        start = self._bytes
        try:
            torch.save(_owned(tensor), self)  # no second copy of the chunk in a buffer
        except RuntimeError as exc:
            # a write that failed (a full disk) or was interrupted (Ctrl-C) inside torch.save is
            # reported by torch's zip writer as its own "unexpected pos" error: raise the original
            if exc.__context__ is not None:
                raise exc.__context__ from None
            raise
        self.chunks.append({"fqn": name, "offsets": list(offsets), "sizes": list(tensor.shape),
                            "file": self.path.name, "offset": start, "length": self._bytes - start})

    def close(self) -> dict[str, Any]:
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        return {"bytes": self._bytes, "sha256": self._digest.hexdigest(), "chunks": self.chunks}

    def abort(self) -> None:
        self._fh.close()
        self.path.unlink(missing_ok=True)


def write_chunks(path: Path, chunks: Sequence[tuple[str, Sequence[int], torch.Tensor]]) -> dict[str, Any]:
    """Write ``chunks`` (name, offsets, tensor) to ``path``; its manifest entry with the index."""
    writer = ChunkWriter(path)
    try:
        for name, offsets, tensor in chunks:
            writer.add(name, offsets, tensor)
        return writer.close()
    except BaseException:
        writer.abort()
        raise


def write_index(state_dir: Path, shapes: Mapping[str, tuple[int, ...]], chunks: list[dict[str, Any]]) -> None:
    """Rank 0, once every rank's chunk file is written: index.json and DCP's .metadata. Every
    tensor must be covered exactly (a rank that wrote too little or overlapping chunks is a bug
    that would lose state: refused here, before the checkpoint is committed)."""
    from megareuse.atomic import write_synced

    covered: dict[str, int] = {name: 0 for name in shapes}
    for chunk in chunks:
        n = 1
        for s in chunk["sizes"]:
            n *= s
        covered[chunk["fqn"]] += n
    for name, shape in shapes.items():
        want = 1
        for s in shape:
            want *= s
        if covered[name] != want:
            raise RuntimeError(f"sharded checkpoint: {name} has {covered[name]} of its {want} elements "
                               "written by the ranks (an ownership bug): not committed")
    index = {"format": FORMAT, "tensors": {name: {"shape": list(shape), "dtype": "float32"}
                                           for name, shape in shapes.items()},
             "chunks": sorted(chunks, key=lambda c: (c["fqn"], c["offsets"]))}
    write_synced(state_dir / INDEX, lambda fh: fh.write(json.dumps(index).encode()))
    try:
        metadata = _dcp_metadata(index)
    except (ImportError, AttributeError, TypeError):  # a torch whose DCP classes differ: megareuse reads index.json
        return
    write_synced(state_dir / DCP_METADATA, lambda fh: pickle.dump(metadata, fh))


def _dcp_metadata(index: dict[str, Any]) -> Any:
    """torch.distributed.checkpoint's Metadata for ``index`` (its FileSystemReader reads each
    item as a torch.save'd tensor at (relative_path, offset, length), as written here)."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, MetadataIndex,
                                                       TensorProperties, TensorStorageMetadata)

    by_name: dict[str, list[ChunkStorageMetadata]] = {name: [] for name in index["tensors"]}
    storage = {}
    for c in index["chunks"]:
        by_name[c["fqn"]].append(ChunkStorageMetadata(torch.Size(c["offsets"]), torch.Size(c["sizes"])))
        storage[MetadataIndex(c["fqn"], c["offsets"])] = _StorageInfo(c["file"], c["offset"], c["length"])
    tensors = {name: TensorStorageMetadata(TensorProperties(dtype=torch.float32), torch.Size(info["shape"]),
                                           by_name[name]) for name, info in index["tensors"].items()}
    return Metadata(state_dict_metadata=tensors, storage_data=storage)


class ShardedReader:
    """Boxes of the stored tensors, read from the chunks that overlap them (the last chunk read
    is kept: the boxes of one rank's share usually fall in the same stored chunk)."""

    def __init__(self, ckpt_dir: Path):
        self.dir = Path(ckpt_dir) / STATE
        index = json.loads((self.dir / INDEX).read_text())
        if index.get("format") != FORMAT:
            raise ValueError(f"{self.dir / INDEX}: format {index.get('format')!r}, accepted {FORMAT!r}")
        self.tensors = {name: tuple(info["shape"]) for name, info in index["tensors"].items()}
        self.chunks: dict[str, list[dict[str, Any]]] = {name: [] for name in self.tensors}
        for chunk in index["chunks"]:
            self.chunks[chunk["fqn"]].append(chunk)
        self._cached: Optional[tuple[tuple[str, int], torch.Tensor]] = None

    def _load(self, chunk: dict[str, Any]) -> torch.Tensor:
        key = (chunk["file"], chunk["offset"])
        if self._cached is None or self._cached[0] != key:
            file = self.dir / chunk["file"]
            try:
                with open(file, "rb") as fh:
                    fh.seek(chunk["offset"])
                    data = fh.read(chunk["length"])
                tensor = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
                if not isinstance(tensor, torch.Tensor) or list(tensor.shape) != chunk["sizes"]:
                    raise ValueError(f"holds {type(tensor).__name__} {list(getattr(tensor, 'shape', []))}, "
                                     f"the index says {chunk['sizes']}")
            except Exception as exc:  # noqa: BLE001 - torch.load / pickle raise many kinds
                from megareuse.engine.checkpoint import CheckpointError
                first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
                raise CheckpointError(f"checkpoint error: {STATE}/{chunk['file']}: the chunk of {chunk['fqn']} at "
                                      f"byte {chunk['offset']} is not readable ({type(exc).__name__}: {first}); "
                                      "accepted a checkpoint written by megareuse") from None
            self._cached = (key, tensor)
        return self._cached[1]

    def read_into(self, name: str, offsets: Sequence[int], out: torch.Tensor) -> torch.Tensor:
        """Fill ``out`` with the box of tensor ``name`` starting at ``offsets`` (out's shape)."""
        if name not in self.tensors:
            raise KeyError(name)
        filled = 0
        for chunk in self.chunks[name]:
            lo = [max(o, c) for o, c in zip(offsets, chunk["offsets"])]
            hi = [min(o + s, c + cs) for o, s, c, cs in zip(offsets, out.shape, chunk["offsets"], chunk["sizes"])]
            if any(h <= l_ for l_, h in zip(lo, hi)):
                continue
            source, target = self._load(chunk), out
            for dim, (l_, h) in enumerate(zip(lo, hi)):
                source = source.narrow(dim, l_ - chunk["offsets"][dim], h - l_)
                target = target.narrow(dim, l_ - offsets[dim], h - l_)
            with torch.no_grad():
                target.copy_(source)
            filled += source.numel()
        if filled != out.numel():
            raise ValueError(f"{self.dir}: {name} box at {list(offsets)} of {list(out.shape)}: only "
                             f"{filled} of {out.numel()} elements are stored")
        return out

    def full(self, name: str) -> torch.Tensor:
        shape = self.tensors[name]
        return self.read_into(name, [0] * len(shape), torch.empty(shape, dtype=torch.float32))

    def names(self, prefix: str = "") -> list[str]:
        return [n for n in self.tensors if n.startswith(prefix)]


class ShardedWeights(Mapping[str, torch.Tensor]):
    """The single-device fp32 state dict of a sharded checkpoint, a tensor read when asked for
    (and not kept); ``aliases`` serve a tied head from the embedding, as in LazyTensors."""

    def __init__(self, ckpt_dir: Path, aliases: Optional[dict[str, str]] = None):
        self.reader = ShardedReader(ckpt_dir)
        self._names = [n[len(WEIGHT_PREFIX):] for n in self.reader.names(WEIGHT_PREFIX)]
        self._aliases = {a: t for a, t in (aliases or {}).items() if t in self._names and a not in self._names}

    def _stored(self, name: str) -> str:
        """The stored tensor serving ``name`` (a tied head's is the embedding's)."""
        name = self._aliases.get(name, name)
        if name not in self._names:
            raise KeyError(name)
        return WEIGHT_PREFIX + name

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.reader.full(self._stored(name))

    def read_box(self, name: str, offsets: Sequence[int], sizes: Sequence[int]) -> torch.Tensor:
        """Only the box of ``name`` at ``offsets`` of ``sizes`` (a TP rank's shard), read from
        the chunks that overlap it."""
        return self.reader.read_into(self._stored(name), offsets, torch.empty(tuple(sizes), dtype=torch.float32))

    def shape(self, name: str) -> tuple[int, ...]:
        return self.reader.tensors[self._stored(name)]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names + list(self._aliases))

    def __len__(self) -> int:
        return len(self._names) + len(self._aliases)

