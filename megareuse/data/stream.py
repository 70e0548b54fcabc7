"""Streaming tokenization: chunks of a domain's sources -> worker processes -> token arrays in
input order -> the domain's train and valid indexed datasets.

``encode_chunks`` keeps at most ``2 * workers`` chunks in flight (a chunk is about 1 MiB of
input), so memory is bounded whatever the corpus size, and yields the results in input order.
``DomainWriter`` decides each document's split as it arrives (``ValidSplit``) and appends it.
"""
from __future__ import annotations

import collections
import multiprocessing
import os
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np

from megareuse.pools import quiet_worker

from .errors import PrepareError
from .indexed import IndexedDataset, IndexedDatasetBuilder
from .sources import Chunk, documents

SPLITS = ("train", "valid")
MAX_LISTED = 1000  # valid documents listed by location in prepare.json


@dataclass
class Encoded:
    """One chunk tokenized: its documents' ids (+ EOS each) back to back, their lengths and
    locations, and what was not a document."""
    tokens: np.ndarray
    lengths: np.ndarray
    where: list[str]
    nbytes: int
    records: list[int] = field(default_factory=list)  # each document's record index in the chunk
    skipped: list[int] = field(default_factory=list)  # records that are not documents (empty, bad)
    n_records: int = 0
    text_bytes: int = 0
    empty: int = 0
    bad: list[str] = field(default_factory=list)


class Encoder:
    """Turns a chunk into ``Encoded`` with one tokenizer (in a worker process, or inline).
    A bad record raises PrepareError naming its location, or is counted with ``skip_bad``."""

    def __init__(self, tokenizer, text_key: str, dtype: np.dtype, skip_bad: bool):
        self.tokenizer, self.text_key, self.dtype, self.skip_bad = tokenizer, text_key, np.dtype(dtype), skip_bad

    def __call__(self, chunk: Chunk) -> Encoded:
        out = Encoded(np.zeros(0, self.dtype), np.zeros(0, np.int64), [], chunk.nbytes)
        pieces, lengths = [], []
        eos = self.tokenizer.eos_id
        for record, (where, text, error) in enumerate(documents(chunk, self.text_key)):
            out.n_records += 1
            if text is not None:
                try:
                    size = len(text.encode("utf-8"))
                except UnicodeEncodeError as exc:  # a JSON "\ud800" escape: a lone surrogate
                    text, error = None, f"not valid UTF-8 text (a lone surrogate at character {exc.start})"
            if error is not None:
                if not self.skip_bad:
                    raise PrepareError(f"prepare: {where}: {error} (or pass --skip-bad to count and skip such records)")
                out.bad.append(f"{where}: {error}")
                out.skipped.append(record)
                continue
            if not text.strip():
                out.empty += 1
                out.skipped.append(record)
                continue
            ids = self.tokenizer.encode(text)
            ids.append(eos)
            pieces.append(np.asarray(ids, dtype=self.dtype))
            lengths.append(len(ids))
            out.where.append(where)
            out.records.append(record)
            out.text_bytes += size
        if pieces:
            out.tokens, out.lengths = np.concatenate(pieces), np.asarray(lengths, np.int64)
        return out


_ENCODER: Optional[Encoder] = None


def _init_worker(tokenizer_path: str, text_key: str, dtype: str, skip_bad: bool) -> None:
    global _ENCODER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process (HF tokenizers)
    from .hf_tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_path)
    if hasattr(tokenizer, "num_threads"):  # sentencepiece's batch encode would use every core
        tokenizer.num_threads = 1
    _ENCODER = Encoder(tokenizer, text_key, np.dtype(dtype), skip_bad)


def _encode(chunk: Chunk) -> Encoded:
    return _ENCODER(chunk)


def encode_chunks(chunks: Iterator[Chunk], tokenizer_path: Path, *, text_key: str, dtype: np.dtype,
                  workers: int, skip_bad: bool = False) -> Iterator[Encoded]:
    """Each chunk's ``Encoded``, in input order; ``workers`` > 1 tokenizes in that many processes
    with at most ``2 * workers`` chunks in flight."""
    if workers == 1:
        from .hf_tokenizer import load_tokenizer

        encoder = Encoder(load_tokenizer(tokenizer_path), text_key, dtype, skip_bad)
        yield from map(encoder, chunks)
        return
    ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    pool = ctx.Pool(workers, initializer=quiet_worker,
                    initargs=(_init_worker, str(tokenizer_path), text_key, np.dtype(dtype).str, skip_bad))
    pending: collections.deque = collections.deque()
    try:
        for chunk in chunks:
            pending.append(pool.apply_async(_encode, (chunk,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
    finally:  # every result was consumed, or we are failing: stop the workers
        pool.terminate()
        pool.join()


# --------------------------------------------------------------------------- the split
class ValidSplit:
    """Which documents are held out, decided as they stream by (in input order), deterministic
    under ``seed`` and the domain name.

    ``valid`` a fraction F: document k draws u_k from a seeded PCG64 stream and is held out when
    u_k < F; if none is by the end, the last document is (it is kept back one step for that),
    so every domain has one. ``valid`` a count N: N of the domain's ``records`` (counted in a
    first pass, ``sources.count_records``) are drawn without replacement; a drawn record that is
    not a document (empty, bad) passes its place to the next document. Memory: O(N)."""

    def __init__(self, valid: Union[int, float], seed: int, domain: str, records: Optional[int] = None):
        self.domain, self.valid = domain, valid
        rng = np.random.Generator(np.random.PCG64([seed, zlib.crc32(domain.encode())]))
        self.count = valid if isinstance(valid, int) else None
        if self.count is not None:
            if records is None or valid >= records:
                raise PrepareError(f"prepare: domain {domain!r} has {records} records; {valid} validation "
                                   "documents would leave none for training")
            self.chosen = set(rng.choice(records, valid, replace=False).tolist())
        self._rng, self._draws, self._k = rng, np.zeros(0), 0
        self.debt = 0  # drawn records that were not documents
        self.held: list = []  # fraction: the document kept back
        self.valid_seen = 0

    def _draw(self) -> float:
        if self._k % 4096 == 0:
            self._draws = self._rng.random(4096)
        u = float(self._draws[self._k % 4096])
        self._k += 1
        return u

    def skip(self, record: int) -> None:
        """``record`` (a domain-wide index) is not a document."""
        if self.count is not None and record in self.chosen:
            self.debt += 1

    def add(self, doc, record: int) -> list[tuple[str, object]]:
        """(split, document) pairs to write now, for document ``doc`` at domain-wide ``record``."""
        if self.count is not None:
            if record in self.chosen:
                return [("valid", doc)]
            if self.debt:
                self.debt -= 1
                return [("valid", doc)]
            return [("train", doc)]
        if self._draw() < self.valid:
            self.valid_seen += 1
            return [("valid", doc)]
        out = [("train", self.held.pop())] if self.held else []
        self.held.append(doc)
        return out

    def finish(self) -> list[tuple[str, object]]:
        """The document still held back, with its split."""
        split = "valid" if self.valid_seen == 0 else "train"
        out, self.held = [(split, doc) for doc in self.held], []
        return out


class DomainWriter:
    """Writes one domain's documents into ``<domain>_{train,valid}.{bin,idx}`` under ``stage``."""

    def __init__(self, stage: Path, domain: str, dtype: np.dtype, valid: Union[int, float], seed: int,
                 records: Optional[int] = None):
        self.stage, self.domain, self.valid = stage, domain, valid
        self.split = ValidSplit(valid, seed, domain, records)
        self.builders = {s: IndexedDatasetBuilder(stage / f"{domain}_{s}", dtype) for s in SPLITS}
        self.record = 0  # domain-wide index of the chunk's first record
        self.counts = {s: {"documents": 0, "tokens": 0} for s in SPLITS}
        self.valid_sources: list[str] = []
        self.empty, self.bad, self.bad_examples, self.text_bytes = 0, 0, [], 0

    def add(self, enc: Encoded) -> None:
        self.empty += enc.empty
        self.bad += len(enc.bad)
        self.bad_examples.extend(enc.bad[: max(0, 5 - len(self.bad_examples))])
        self.text_bytes += enc.text_bytes
        offsets = np.concatenate([[0], np.cumsum(enc.lengths)])
        skipped = iter(enc.skipped + [enc.n_records])  # records that are not documents, in order
        next_skip = next(skipped)
        runs: list[tuple[str, list]] = []  # consecutive documents of one split: one write each
        for i, where in enumerate(enc.where):
            while next_skip < enc.records[i]:
                self.split.skip(self.record + next_skip)
                next_skip = next(skipped)
            doc = (enc.tokens[offsets[i]:offsets[i + 1]], where)
            for split, doc in self.split.add(doc, self.record + enc.records[i]):
                if runs and runs[-1][0] == split:
                    runs[-1][1].append(doc)
                else:
                    runs.append((split, [doc]))
        for split, docs in runs:
            self._write(split, docs)
        while next_skip < enc.n_records:
            self.split.skip(self.record + next_skip)
            next_skip = next(skipped)
        self.record += enc.n_records

    def _write(self, split: str, docs: list) -> None:
        arrays = [d[0] for d in docs]
        self.builders[split].add_documents(np.concatenate(arrays), np.asarray([a.size for a in arrays]))
        self.counts[split]["documents"] += len(arrays)
        self.counts[split]["tokens"] += int(sum(a.size for a in arrays))
        if split == "valid":
            self.valid_sources.extend(d[1] for d in docs[: max(0, MAX_LISTED - len(self.valid_sources))])

    def close(self) -> dict:
        """Finish both splits (checking each has a document) and return the domain's counts."""
        for split, doc in self.split.finish():
            self._write(split, [doc])
        total = self.counts["train"]["documents"] + self.counts["valid"]["documents"]
        if total == 0:
            what = (f"all {self.empty} documents are empty (or whitespace only)" if not self.bad else
                    f"no document has text ({self.empty} empty, {self.bad} bad records skipped)")
            raise PrepareError(f"prepare: domain {self.domain!r}: {what}; accepted documents with text to tokenize")
        if self.counts["train"]["documents"] == 0:
            raise PrepareError(f"prepare: domain {self.domain!r} has {total} documents; {self.counts['valid']['documents']} "
                               f"validation documents (valid = {self.valid}) would leave none for training")
        for split in SPLITS:
            self.builders[split].finalize()
            if IndexedDataset(self.stage / f"{self.domain}_{split}").num_tokens != self.counts[split]["tokens"]:
                raise PrepareError(f"prepare: {self.domain}_{split} does not hold the tokens written")
        info = {**self.counts, "empty_documents_skipped": self.empty, "bad_records_skipped": self.bad,
                "text_bytes": self.text_bytes, "valid_sources": self.valid_sources}
        if self.bad_examples:
            info["bad_examples"] = self.bad_examples
        return info

    def abort(self) -> None:
        for builder in self.builders.values():
            builder.abort()
