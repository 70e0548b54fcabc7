"""Where documents come from: the input formats of ``megareuse prepare --input DOMAIN=PATH``.

Formats (``FORMATS``), detected from the file name or given with ``--format``:

* ``jsonl``, ``jsonl.gz``, ``jsonl.zst``: one JSON object per line, the document in ``text_key``
  (blank lines are ignored);
* ``parquet``: one document per row of the string column ``text_key`` (needs pyarrow);
* ``text``: a document per file (``split="file"``) or per non-blank line (``split="lines"``);
* ``hf``: a directory written by HF ``datasets`` ``Dataset.save_to_disk`` (its Arrow files are
  read with pyarrow; the ``datasets`` package is not needed).

Everything streams: a file is read in chunks of about ``chunk_bytes`` (whole lines, whole rows),
never whole, so memory does not grow with the corpus; only a single document must fit. A chunk
carries where it came from (file, first line or row), so a bad record is reported as
``file:line``. ``documents(chunk, text_key)`` turns a chunk into (location, text) pairs, or
(location, error) for a record that is not a document; the worker processes that tokenize call
it, and so does the tokenizer-training sample.
"""
from __future__ import annotations

import glob
import gzip
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

from .errors import PrepareError

FORMATS = ("jsonl", "jsonl.gz", "jsonl.zst", "parquet", "text", "hf")
TEXT_SPLITS = ("file", "lines")
CHUNK_BYTES = 1 << 20
_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".jsonl.gz": "jsonl.gz",
             ".json.gz": "jsonl.gz", ".ndjson.gz": "jsonl.gz", ".jsonl.zst": "jsonl.zst",
             ".json.zst": "jsonl.zst", ".ndjson.zst": "jsonl.zst", ".parquet": "parquet"}
_UNREADABLE = (".gz", ".zst", ".bz2", ".xz", ".zip", ".tar", ".arrow", ".bin", ".idx")


@dataclass(frozen=True)
class Source:
    """One input file (or HF dataset directory) of a domain, in a known format."""
    path: Path
    format: str

    def size(self) -> int:
        """Bytes on disk (the Arrow files of an HF directory)."""
        if self.format == "hf":
            return sum(p.stat().st_size for p in _hf_arrow_files(self.path))
        return self.path.stat().st_size


@dataclass
class Chunk:
    """A piece of a source: raw lines (``kind`` "jsonl"/"lines"), texts ("texts", rows of a
    table) or whole-file documents ("files"). ``first`` is the 1-based line or row number of the
    first record; ``nbytes`` the source bytes it advances (for progress)."""
    kind: str
    file: str
    first: int
    data: Union[bytes, list]
    nbytes: int


# --------------------------------------------------------------------------- finding inputs
def parse_input(spec: str) -> tuple[str, str]:
    """``DOMAIN=PATH_OR_GLOB`` -> (domain, pattern)."""
    domain, sep, pattern = spec.partition("=")
    if not sep or not domain or not pattern:
        raise PrepareError(f"prepare: --input {spec!r}: accepted DOMAIN=PATH_OR_GLOB, e.g. "
                           "web=data/shard-*.jsonl.zst")
    return domain, pattern


def detect_format(path: Path) -> str:
    """The format of ``path`` from its name (a directory: an HF dataset)."""
    if path.is_dir():
        if _is_hf_dir(path):
            return "hf"
        raise PrepareError(f"prepare: input {path} is a directory; accepted a file, a glob (e.g. {path}/*.jsonl) "
                           "or a directory written by datasets' save_to_disk")
    name = path.name.lower()
    for suffix in sorted(_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return _SUFFIXES[suffix]
    if name.endswith(_UNREADABLE):
        raise PrepareError(f"prepare: cannot tell the format of {path}; accepted --format "
                           + ", ".join(FORMATS))
    return "text"


def resolve_sources(pattern: str, fmt: Optional[str], domain: str) -> list[Source]:
    """The sources a path or glob names, sorted (``**`` recurses); directories inside a glob are
    skipped unless they are HF datasets."""
    if fmt is not None and fmt not in FORMATS:
        raise PrepareError(f"prepare: --format {fmt!r}: accepted " + ", ".join(FORMATS))
    if glob.has_magic(pattern):
        paths = [Path(p) for p in sorted(glob.glob(pattern, recursive=True))]
        paths = [p for p in paths if p.is_file() or _is_hf_dir(p)]
        if not paths:
            raise PrepareError(f"prepare: input {pattern} (domain {domain!r}) matches no file")
    else:
        paths = [Path(pattern)]
        if not paths[0].exists():
            raise PrepareError(f"prepare: input file {pattern} (domain {domain!r}) does not exist")
    sources = []
    for path in paths:
        kind = fmt or detect_format(path)
        if path.is_dir() and kind != "hf":
            raise PrepareError(f"prepare: input {path} (domain {domain!r}) is a directory; accepted a file, a glob "
                               "(e.g. DIR/*.jsonl) or a directory written by datasets' save_to_disk")
        if kind == "hf":
            _hf_arrow_files(path)  # checks the directory now
        elif not os.access(path, os.R_OK):
            raise PrepareError(f"prepare: input {path} (domain {domain!r}) is not readable")
        sources.append(Source(path, kind))
    return sources


def _is_hf_dir(path: Path) -> bool:
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def _hf_arrow_files(path: Path) -> list[Path]:
    """The Arrow files of a ``save_to_disk`` directory, in its state.json order."""
    if (path / "dataset_dict.json").is_file():
        splits = ", ".join(sorted(p.name for p in path.iterdir() if p.is_dir())) or "none"
        raise PrepareError(f"prepare: {path} is a DatasetDict; accepted one split's directory "
                           f"(splits: {splits}), e.g. {path / 'train'}")
    state = path / "state.json"
    if not path.is_dir() or not state.is_file():
        raise PrepareError(f"prepare: {path} is not a directory written by datasets' save_to_disk "
                           "(no state.json); accepted --format hf for such a directory")
    try:
        files = [path / entry["filename"] for entry in json.loads(state.read_text())["_data_files"]]
    except (ValueError, KeyError, TypeError):
        raise PrepareError(f"prepare: {state} has no _data_files list; accepted a save_to_disk "
                           "directory") from None
    missing = [f for f in files if not f.is_file()]
    if missing or not files:
        raise PrepareError(f"prepare: {path}: Arrow file {missing[0] if missing else '(none)'} is missing")
    return files


# --------------------------------------------------------------------------- reading chunks
def read_chunks(source: Source, *, split: str = "file", text_key: str = "text",
                chunk_bytes: int = CHUNK_BYTES) -> Iterator[Chunk]:
    """The chunks of one source, in order."""
    kind = source.format
    if kind in ("jsonl", "jsonl.gz", "jsonl.zst"):
        yield from _line_chunks(source.path, kind, "jsonl", chunk_bytes)
    elif kind == "text" and split == "lines":
        yield from _line_chunks(source.path, kind, "lines", chunk_bytes)
    elif kind == "text":
        yield Chunk("files", str(source.path), 0, [str(source.path)], source.path.stat().st_size)
    elif kind == "parquet":
        yield from _parquet_chunks(source.path, text_key, chunk_bytes)
    elif kind == "hf":
        yield from _hf_chunks(source.path, text_key, chunk_bytes)
    else:
        raise PrepareError(f"prepare: format {kind!r}: accepted " + ", ".join(FORMATS))


class _Counting(io.RawIOBase):
    """A raw file that counts the bytes read through it (compressed bytes, for progress)."""

    def __init__(self, path: Path):
        self._fh = open(path, "rb")
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self._fh.readinto(buffer)
        self.count += n or 0
        return n

    def close(self) -> None:
        self._fh.close()
        super().close()


def _open_stream(path: Path, kind: str, raw: _Counting):
    if kind == "jsonl.gz":
        return gzip.GzipFile(fileobj=io.BufferedReader(raw), mode="rb")
    if kind == "jsonl.zst":
        try:
            import zstandard
        except ImportError:
            raise PrepareError(f"prepare: {path}: .zst input needs the zstandard package: "
                               "pip install 'megareuse[corpus]'") from None
        return zstandard.ZstdDecompressor().stream_reader(raw, read_size=1 << 20)
    return raw


def _line_chunks(path: Path, kind: str, chunk_kind: str, chunk_bytes: int) -> Iterator[Chunk]:
    """Whole lines, about ``chunk_bytes`` at a time (a longer line is read to its end)."""
    raw = _Counting(path)
    stream = _open_stream(path, kind, raw)
    line, rest, reported = 1, b"", 0
    try:
        while True:
            try:
                block = stream.read(chunk_bytes)
            except (OSError, EOFError, ValueError) as exc:  # gzip/zstd: corrupt or truncated
                raise PrepareError(f"prepare: {path}: cannot decompress after line {line} "
                                   f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
            if not block:
                break
            data = rest + block
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                rest = data
                continue
            data, rest = data[:cut], data[cut:]
            yield Chunk(chunk_kind, str(path), line, data, raw.count - reported)
            reported = raw.count
            line += data.count(b"\n")
        if rest:
            yield Chunk(chunk_kind, str(path), line, rest, raw.count - reported)
    finally:
        stream.close()
        raw.close()


def _arrow_text_column(schema, text_key: str, where: Path) -> None:
    import pyarrow as pa

    if text_key not in schema.names:
        raise PrepareError(f"prepare: {where} has no column {text_key!r} (columns: "
                           f"{', '.join(schema.names)}); accepted --text-key naming a string column")
    kind = schema.field(text_key).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise PrepareError(f"prepare: {where}: column {text_key!r} is {kind}, not a string column; "
                           "accepted --text-key naming a string column")


def _pyarrow(path: Path):
    try:
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise PrepareError(f"prepare: {path}: parquet and HF datasets need pyarrow: "
                           "pip install 'megareuse[corpus]'") from None


def _parquet_chunks(path: Path, text_key: str, chunk_bytes: int) -> Iterator[Chunk]:
    _pyarrow(path)
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for a file that is not parquet
        raise PrepareError(f"prepare: {path} is not a parquet file ({str(exc).splitlines()[0]})") from None
    _arrow_text_column(table.schema_arrow, text_key, path)
    rows = max(1, table.metadata.num_rows)
    per_row = max(1, path.stat().st_size // rows)
    batch = max(1, min(8192, chunk_bytes // per_row))
    first = 1
    for record_batch in table.iter_batches(batch_size=batch, columns=[text_key]):
        texts = record_batch.column(0).to_pylist()
        yield Chunk("texts", str(path), first, texts, len(texts) * per_row)
        first += len(texts)


def _hf_chunks(path: Path, text_key: str, chunk_bytes: int) -> Iterator[Chunk]:
    _pyarrow(path)
    import pyarrow as pa

    first = 1
    for arrow in _hf_arrow_files(path):
        with pa.OSFile(str(arrow)) as fh:
            reader = pa.ipc.open_stream(fh)
            _arrow_text_column(reader.schema, text_key, arrow)
            for record_batch in reader:
                texts = record_batch.column(record_batch.schema.get_field_index(text_key)).to_pylist()
                yield Chunk("texts", str(arrow), first, texts, record_batch.nbytes)
                first += len(texts)


def count_records(source: Source, *, split: str = "file", text_key: str = "text") -> int:
    """How many records ``documents`` will yield for ``source`` (non-blank lines, rows, or 1 for
    a whole-file document): a pass that reads (and decompresses) but does not parse."""
    if source.format == "text" and split == "file":
        return 1
    if source.format == "parquet":
        _pyarrow(source.path)
        import pyarrow.parquet as pq

        return pq.ParquetFile(source.path).metadata.num_rows
    if source.format == "hf":
        _pyarrow(source.path)
        import pyarrow as pa

        total = 0
        for arrow in _hf_arrow_files(source.path):
            with pa.OSFile(str(arrow)) as fh:
                total += sum(batch.num_rows for batch in pa.ipc.open_stream(fh))
        return total
    kind = "lines" if source.format == "text" else "jsonl"
    return sum(sum(1 for line in chunk.data.split(b"\n") if line.strip())
               for chunk in _line_chunks(source.path, source.format, kind, 1 << 22))


def batched(chunks: Iterator[Chunk], chunk_bytes: int = CHUNK_BYTES) -> Iterator[Chunk]:
    """Merge consecutive whole-file chunks up to ``chunk_bytes`` (one small file per task would
    cost more in messages than in tokenizing); other chunks pass through."""
    pending: Optional[Chunk] = None
    for chunk in chunks:
        if chunk.kind == "files" and pending is not None and pending.nbytes + chunk.nbytes <= chunk_bytes:
            pending.data.extend(chunk.data)
            pending.nbytes += chunk.nbytes
            continue
        if pending is not None:
            yield pending
            pending = None
        if chunk.kind == "files":
            pending = Chunk("files", chunk.file, 0, list(chunk.data), chunk.nbytes)
        else:
            yield chunk
    if pending is not None:
        yield pending


# --------------------------------------------------------------------------- records -> documents
def documents(chunk: Chunk, text_key: str = "text") -> Iterator[tuple[str, Optional[str], Optional[str]]]:
    """(location, text, error) for each record of ``chunk``: text None and error set for a record
    that is not a document (bad JSON, no text key, invalid UTF-8); blank lines yield nothing."""
    if chunk.kind == "files":
        for name in chunk.data:
            try:
                yield name, Path(name).read_bytes().decode("utf-8"), None
            except UnicodeDecodeError as exc:
                yield name, None, f"not valid UTF-8 (byte {exc.start})"
        return
    if chunk.kind == "texts":
        for i, text in enumerate(chunk.data):
            where = f"{chunk.file}:row {chunk.first + i}"
            yield (where, text, None) if isinstance(text, str) else (where, None, f"{text_key!r} is null")
        return
    for i, line in enumerate(chunk.data.split(b"\n")):
        where = f"{chunk.file}:{chunk.first + i}"
        if chunk.kind == "lines":
            if line.strip():
                yield _decoded(where, line)
            continue
        if not line.strip():
            continue
        yield _json_text(where, line, text_key)


def _decoded(where: str, line: bytes) -> tuple[str, Optional[str], Optional[str]]:
    try:
        return where, line.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        return where, None, f"not valid UTF-8 (byte {exc.start} of the line)"


def _json_text(where: str, line: bytes, text_key: str) -> tuple[str, Optional[str], Optional[str]]:
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as exc:
        return where, None, f"not valid UTF-8 (byte {exc.start} of the line)"
    except ValueError as exc:
        return where, None, f"not a JSON line ({str(exc).splitlines()[0]})"
    if not isinstance(record, dict):
        return where, None, f"a JSON {type(record).__name__}, not an object with a {text_key!r} key"
    if text_key not in record:
        keys = ", ".join(list(record)[:8]) or "none"
        return where, None, f"no {text_key!r} key (keys: {keys}); accepted --text-key naming one"
    text = record[text_key]
    if not isinstance(text, str):
        return where, None, f"{text_key!r} is a JSON {type(text).__name__}, not a string"
    return where, text, None


def describe(sources: Sequence[Source]) -> str:
    """A short summary for logs: '3 jsonl.zst files, 1 parquet file'."""
    counts: dict[str, int] = {}
    for s in sources:
        counts[s.format] = counts.get(s.format, 0) + 1
    return ", ".join(f"{n} {k} {'file' if n == 1 else 'files'}" for k, n in counts.items())
