"""Megatron-LM compatible indexed token datasets (the ``MMIDIDX`` .bin/.idx pair).

``<prefix>.bin`` holds the tokens of every sequence back to back. ``<prefix>.idx`` is, in
little-endian order::

    magic             9 bytes   b"MMIDIDX\\x00\\x00"
    version           uint64    1
    dtype code        uint8     1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64,
                                7 float32, 8 uint16
    sequence count    uint64    S
    document count    uint64    D (= number of documents + 1)
    sizes             int32[S]  tokens per sequence
    pointers          int64[S]  byte offset of each sequence in .bin
    document indices  int64[D]  0, then one past each document's last sequence

Files written by Megatron-LM's ``tools/preprocess_data.py`` load here unchanged and ours load
in Megatron-LM. Opening validates the whole index against the header and the .bin size and
raises ``CorruptDatasetError`` (one line naming the file) instead of ever reading garbage.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Iterable, Union

import numpy as np

from megareuse.atomic import fsync_dir, write_text_atomic
from megareuse.errors import UserError
from megareuse.paths import input_problem

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_SIZE = len(MAGIC) + 8 + 1 + 8 + 8  # 34 bytes
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
          7: np.float32, 8: np.uint16}
CODES = {np.dtype(v): k for k, v in DTYPES.items()}

PathLike = Union[str, os.PathLike]


class CorruptDatasetError(UserError, ValueError):
    """An indexed dataset file is missing, truncated or inconsistent (one-line message)."""


def best_dtype(vocab_size: int) -> np.dtype:
    """Megatron's choice: uint16 when ``vocab_size < 65500``, else int32."""
    return np.dtype(np.uint16 if vocab_size < 65500 else np.int32)


def data_path(prefix: PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}.bin")


def index_path(prefix: PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}.idx")


def ids_path(prefix: PathLike) -> Path:
    """``<prefix>.ids.json``: the token id range of the pair, keyed by the files' sizes and
    mtimes, written by the builder beside its output (a stale or missing one is rescanned)."""
    return Path(f"{os.fspath(prefix)}.ids.json")


def cache_dir() -> Path:
    """The per-user cache of what readers compute from their inputs (which they never write to):
    ``$MEGAREUSE_CACHE_DIR``, else ``$XDG_CACHE_HOME/megareuse``, else ``~/.cache/megareuse``."""
    if os.environ.get("MEGAREUSE_CACHE_DIR"):
        return Path(os.environ["MEGAREUSE_CACHE_DIR"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "megareuse"
    try:
        return Path.home() / ".cache" / "megareuse"
    except RuntimeError:  # no HOME and no password entry (some containers): a cache under the temp dir
        return Path(tempfile.gettempdir()) / f"megareuse-cache-{os.getuid()}"


def cached_ids_path(prefix: PathLike) -> Path:
    """Where a reader caches the token id range it scanned: named by the resolved prefix's hash."""
    digest = hashlib.sha256(os.fsencode(Path(prefix).resolve())).hexdigest()[:32]
    return cache_dir() / "token-ranges" / f"{digest}.json"


def _files_key(prefix: PathLike) -> dict:
    b, i = data_path(prefix).stat(), index_path(prefix).stat()
    return {"bin_bytes": b.st_size, "bin_mtime_ns": b.st_mtime_ns, "idx_mtime_ns": i.st_mtime_ns}


def _read_ids(path: Path, key: dict) -> tuple[int, int] | None:
    """The range recorded in ``path`` when it was recorded for the files as they are (``key``)."""
    try:
        cached = json.loads(path.read_text())
        if {k: cached.get(k) for k in key} == key:
            return int(cached["min"]), int(cached["max"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return None


def _write_ids(path: Path, key: dict, lo: int, hi: int) -> None:
    """Best effort (an unwritable place just means scanning again next time)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps({**key, "min": lo, "max": hi}))
    except OSError:
        pass


class IndexedDatasetBuilder:
    """Stream sequences into ``<prefix>.bin``; ``finalize()`` writes the index.

    Both files are written under temporary names (fsynced) and renamed into place only by
    ``finalize()``, so readers never see a half-written pair. Use as a context manager to
    discard the temporary files when an exception escapes. Memory stays bounded whatever the
    corpus size: the sequence sizes and document boundaries go to temporary side files (in
    blocks) and are streamed into the index at the end.
    """

    BLOCK = 1 << 16  # sizes / boundaries buffered before a side-file write

    def __init__(self, prefix: PathLike, dtype=np.uint16):
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODES:
            raise ValueError(f"indexed: dtype {self.dtype} has no Megatron code; use one of "
                             + ", ".join(str(d) for d in CODES))
        self.prefix = Path(prefix)
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        tag = f".tmp-{os.getpid()}-{id(self)}"
        self._bin_tmp = data_path(self.prefix).with_name(data_path(self.prefix).name + tag)
        self._idx_tmp = index_path(self.prefix).with_name(index_path(self.prefix).name + tag)
        self._sizes_tmp = self._idx_tmp.with_name(self._idx_tmp.name + ".sizes")
        self._docs_tmp = self._idx_tmp.with_name(self._idx_tmp.name + ".docs")
        self._bin = open(self._bin_tmp, "wb")
        self._sizes_file = open(self._sizes_tmp, "wb")
        self._docs_file = open(self._docs_tmp, "wb")
        self._sizes: list[int] = []  # not yet spilled
        self._docs: list[int] = [0]
        self.num_sequences = 0
        self.num_documents = 0
        self._last_boundary = 0
        self.finalized = False
        self._lo, self._hi = None, None  # token id range written so far

    def _check_ids(self, arr: np.ndarray) -> None:
        if arr.size and np.issubdtype(self.dtype, np.integer):
            info = np.iinfo(self.dtype)
            lo, hi = int(arr.min()), int(arr.max())
            if lo < info.min or hi > info.max:
                raise ValueError(f"indexed: token ids [{lo}, {hi}] do not fit {self.dtype}")
            self._lo = lo if self._lo is None else min(lo, self._lo)
            self._hi = hi if self._hi is None else max(hi, self._hi)

    def add_item(self, tokens: Iterable[int]) -> None:
        """Append one sequence (part of the current document)."""
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise ValueError(f"indexed: a sequence must be 1-D, got shape {arr.shape}")
        if arr.size > np.iinfo(np.int32).max:
            raise ValueError(f"indexed: a sequence of {arr.size} tokens exceeds int32 sizes")
        self._check_ids(arr)
        self._bin.write(arr.astype(self.dtype, copy=False).tobytes(order="C"))
        self._sizes.append(int(arr.size))
        self.num_sequences += 1
        self._spill()

    def end_document(self) -> None:
        """Close the current document (a no-op when it holds no sequence)."""
        if self._last_boundary != self.num_sequences:
            self._docs.append(self.num_sequences)
            self._last_boundary = self.num_sequences
            self.num_documents += 1
            self._spill()

    def add_document(self, tokens: Iterable[int]) -> None:
        """Append one document stored as one sequence."""
        self.add_item(tokens)
        self._docs.append(self.num_sequences)
        self._last_boundary = self.num_sequences
        self.num_documents += 1

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append ``len(lengths)`` documents, one sequence each, given back to back in ``tokens``
        (one write: the fast path for a tokenized batch)."""
        tokens, lengths = np.asarray(tokens), np.asarray(lengths, dtype=np.int64)
        if tokens.ndim != 1 or lengths.ndim != 1 or int(lengths.sum()) != tokens.size or (lengths < 0).any():
            raise ValueError(f"indexed: lengths (sum {int(lengths.sum())}) do not split {tokens.size} tokens")
        if lengths.size and int(lengths.max()) > np.iinfo(np.int32).max:
            raise ValueError(f"indexed: a sequence of {int(lengths.max())} tokens exceeds int32 sizes")
        self.end_document()
        self._check_ids(tokens)
        self._bin.write(tokens.astype(self.dtype, copy=False).tobytes(order="C"))
        self._sizes.extend(lengths.tolist())
        first = self.num_sequences
        self.num_sequences += int(lengths.size)
        self._docs.extend(range(first + 1, self.num_sequences + 1))
        self.num_documents += int(lengths.size)
        self._last_boundary = self.num_sequences
        self._spill()

    def _spill(self, force: bool = False) -> None:
        if force or len(self._sizes) >= self.BLOCK:
            self._sizes_file.write(np.asarray(self._sizes, dtype=np.int32).tobytes())
            self._sizes = []
        if force or len(self._docs) >= self.BLOCK:
            self._docs_file.write(np.asarray(self._docs, dtype=np.int64).tobytes())
            self._docs = []

    def finalize(self) -> None:
        """Write the index, fsync both files and rename them into place (.bin first)."""
        self.end_document()
        self._spill(force=True)
        self._sizes_file.close()
        self._docs_file.close()
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        with open(self._idx_tmp, "wb") as f:
            f.write(MAGIC)
            f.write(struct.pack("<Q", VERSION))
            f.write(struct.pack("<B", CODES[self.dtype]))
            f.write(struct.pack("<Q", self.num_sequences))
            f.write(struct.pack("<Q", self.num_documents + 1))
            _copy_file(self._sizes_tmp, f)
            offset = 0  # pointers: byte offset of each sequence, computed block by block
            for sizes in _blocks(self._sizes_tmp, np.int32):
                ends = offset + np.cumsum(sizes.astype(np.int64) * self.dtype.itemsize)
                f.write(np.concatenate([[offset], ends[:-1]]).astype(np.int64).tobytes())
                offset = int(ends[-1])
            _copy_file(self._docs_tmp, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(self._bin_tmp, data_path(self.prefix))
        os.replace(self._idx_tmp, index_path(self.prefix))
        self._remove_side_files()
        if self._lo is not None:
            _write_ids(ids_path(self.prefix), _files_key(self.prefix), self._lo, self._hi)
        fsync_dir(self.prefix.parent)
        self.finalized = True

    def _remove_side_files(self) -> None:
        for tmp in (self._sizes_tmp, self._docs_tmp):
            tmp.unlink(missing_ok=True)

    def abort(self) -> None:
        """Discard the temporary files (nothing at the final names is touched)."""
        for fh in (self._bin, self._sizes_file, self._docs_file):
            if not fh.closed:
                fh.close()
        for tmp in (self._bin_tmp, self._idx_tmp):
            if tmp.exists():
                tmp.unlink()
        self._remove_side_files()

    def __enter__(self) -> "IndexedDatasetBuilder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or not self.finalized:
            self.abort()


def _blocks(path: Path, dtype, count: int = 1 << 20):
    """``path``'s values of ``dtype``, ``count`` at a time."""
    with open(path, "rb") as fh:
        while data := fh.read(count * np.dtype(dtype).itemsize):
            yield np.frombuffer(data, dtype=dtype)


def _copy_file(path: Path, out, block: int = 1 << 22) -> None:
    with open(path, "rb") as fh:
        while data := fh.read(block):
            out.write(data)


class IndexedDataset:
    """A validated, memory-mapped view of ``<prefix>.bin`` / ``<prefix>.idx``.

    ``ds[i]`` is sequence i (a read-only array), ``ds.get(i, offset, length)`` part of it, and
    ``ds.tokens`` the whole token stream: validation guarantees the sequences are stored back
    to back in index order, so the stream is exactly the .bin file.
    """

    def __init__(self, prefix: PathLike):
        self.prefix = Path(prefix)
        idx_file, bin_file = index_path(prefix), data_path(prefix)
        for path in (idx_file, bin_file):
            problem = input_problem(path, "file")
            if problem is not None:
                raise CorruptDatasetError(f"{path} {problem}; accepted the .bin/.idx pair written by "
                                          "`megareuse prepare`")
        self.dtype, seq_count, doc_count = self._read_header(idx_file)
        expected = HEADER_SIZE + seq_count * (4 + 8) + doc_count * 8
        actual = idx_file.stat().st_size
        if actual != expected:
            what = "is truncated" if actual < expected else "has trailing bytes"
            raise CorruptDatasetError(f"{idx_file} {what}: {actual} bytes, header "
                                      f"({seq_count} sequences, {doc_count} document indices) "
                                      f"expects {expected}")
        index = np.memmap(idx_file, mode="r", dtype=np.uint8)
        off = HEADER_SIZE
        self.sizes = np.frombuffer(index, np.int32, seq_count, off)
        self.pointers = np.frombuffer(index, np.int64, seq_count, off + 4 * seq_count)
        self.document_indices = np.frombuffer(index, np.int64, doc_count, off + 12 * seq_count)
        total_bytes = self._check_index(idx_file, seq_count)
        bin_size = bin_file.stat().st_size
        if bin_size != total_bytes:
            what = "is truncated" if bin_size < total_bytes else "is longer than its index"
            raise CorruptDatasetError(f"{bin_file} {what}: {bin_size} bytes, index expects "
                                      f"{total_bytes}")
        itemsize = self.dtype.itemsize
        self.num_tokens = total_bytes // itemsize
        if self.num_tokens:
            self.tokens = np.memmap(bin_file, mode="r", dtype=self.dtype, shape=(self.num_tokens,))
        else:  # numpy cannot map an empty file
            self.tokens = np.empty(0, dtype=self.dtype)

    def _read_header(self, idx_file: Path):
        with open(idx_file, "rb") as f:
            head = f.read(HEADER_SIZE)
        if head[:len(MAGIC)] != MAGIC:
            raise CorruptDatasetError(f"{idx_file} is not a Megatron MMIDIDX index "
                                      f"(bad magic {head[:len(MAGIC)]!r})")
        if len(head) < HEADER_SIZE:
            raise CorruptDatasetError(f"{idx_file} is truncated: {len(head)} bytes, header "
                                      f"needs {HEADER_SIZE}")
        version, code, seq_count, doc_count = struct.unpack("<QBQQ", head[len(MAGIC):])
        if version != VERSION:
            raise CorruptDatasetError(f"{idx_file} has index version {version}, expected {VERSION}")
        if code not in DTYPES:
            raise CorruptDatasetError(f"{idx_file} has unknown dtype code {code} "
                                      f"(known: {sorted(DTYPES)})")
        if seq_count >= 2**40 or doc_count >= 2**40:
            raise CorruptDatasetError(f"{idx_file} has implausible counts: {seq_count} "
                                      f"sequences, {doc_count} document indices")
        return np.dtype(DTYPES[code]), seq_count, doc_count

    def _check_index(self, idx_file: Path, seq_count: int) -> int:
        """Validate sizes/pointers/document indices; return the .bin size they imply."""
        sizes, pointers, docs = self.sizes, self.pointers, self.document_indices
        if seq_count and int(sizes.min()) < 0:
            raise CorruptDatasetError(f"{idx_file} has a negative sequence size at "
                                      f"{int(np.argmin(sizes))}")
        nbytes = sizes.astype(np.int64) * self.dtype.itemsize
        expected = np.zeros(seq_count, dtype=np.int64)
        if seq_count > 1:
            np.cumsum(nbytes[:-1], out=expected[1:])
        bad = np.flatnonzero(pointers != expected)
        if bad.size:
            i = int(bad[0])
            raise CorruptDatasetError(f"{idx_file} has corrupt pointers: pointer[{i}] = "
                                      f"{int(pointers[i])}, sizes imply {int(expected[i])}")
        if len(docs) == 0 or docs[0] != 0 or docs[-1] != seq_count:
            first = int(docs[0]) if len(docs) else None
            last = int(docs[-1]) if len(docs) else None
            raise CorruptDatasetError(f"{idx_file} has corrupt document indices: must run from 0 "
                                      f"to {seq_count}, got {first}..{last}")
        if len(docs) > 1 and np.any(np.diff(docs) < 0):
            raise CorruptDatasetError(f"{idx_file} has corrupt document indices: not monotone")
        return int(nbytes.sum())

    def token_range(self, chunk: int = 1 << 26) -> tuple[int, int] | None:
        """(smallest, largest) token id in the .bin, None when it is empty. Read from the builder's
        ``<prefix>.ids.json`` or this user's cache when one matches the files, else scanned in
        chunks of the memory map (about a second per GB) and cached in ``cache_dir()``: the data's
        own directory is never written."""
        if not self.num_tokens:
            return None
        key = _files_key(self.prefix)
        cache = cached_ids_path(self.prefix)
        for path in (ids_path(self.prefix), cache):
            if (found := _read_ids(path, key)) is not None:
                return found
        lo, hi = self._scan(chunk)
        _write_ids(cache, key, lo, hi)
        return lo, hi

    def _scan(self, chunk: int) -> tuple[int, int]:
        lo, hi = None, None
        for start in range(0, self.num_tokens, chunk):
            part = self.tokens[start:start + chunk]
            a, b = part.min(), part.max()
            lo = a if lo is None else min(lo, a)
            hi = b if hi is None else max(hi, b)
        if np.issubdtype(self.dtype, np.floating):
            lo, hi = float(lo), float(hi)
            if not (np.isfinite(lo) and np.isfinite(hi) and lo == int(lo) and hi == int(hi)):
                raise CorruptDatasetError(f"{data_path(self.prefix)} holds non-integer token values "
                                          f"(range [{lo}, {hi}])")
        return int(lo), int(hi)

    def __len__(self) -> int:
        return len(self.sizes)

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    def __getitem__(self, idx):
        """Sequence ``idx`` (int, negative allowed) or a list of sequences for a slice."""
        if isinstance(idx, slice):
            return [self[i] for i in range(*idx.indices(len(self)))]
        return self.get(idx)

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of sequence ``idx`` (a memmap view)."""
        n = len(self)
        if not -n <= idx < n:
            raise IndexError(f"sequence {idx} out of range for {self.prefix} ({n} sequences)")
        idx %= n
        size = int(self.sizes[idx])
        length = size - offset if length is None else length
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"tokens [{offset}, {offset + length}) out of range for sequence "
                             f"{idx} of {self.prefix} ({size} tokens)")
        start = int(self.pointers[idx]) // self.dtype.itemsize + offset
        return self.tokens[start:start + length]

    def document(self, doc: int) -> np.ndarray:
        """All tokens of document ``doc`` (its sequences are contiguous in the stream)."""
        first, last = int(self.document_indices[doc]), int(self.document_indices[doc + 1])
        start = int(self.pointers[first]) // self.dtype.itemsize if first < last else 0
        return self.tokens[start:start + int(self.sizes[first:last].sum())]

    def __repr__(self) -> str:
        return (f"IndexedDataset({str(self.prefix)!r}, sequences={len(self)}, "
                f"documents={self.num_documents}, tokens={self.num_tokens}, dtype={self.dtype})")
