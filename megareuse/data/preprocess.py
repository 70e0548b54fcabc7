"""``megareuse prepare``: text files per domain -> tokenizer + Megatron indexed datasets.

Output directory layout::

    tokenizer.model                 one sentencepiece model shared by every domain
    <domain>_train.{bin,idx}        documents (tokens + EOS each) of the training split
    <domain>_valid.{bin,idx}        held-out documents (at least one per domain)
    prepare.json                    what was done: vocab, tokenizer sha256, counts per split

Everything is written into a temporary sibling directory that is renamed to ``out_dir`` only
when complete, so an interrupted run never leaves a directory that looks prepared. Inputs are
validated before anything is written; bad input raises ``PrepareError`` (one line).
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
import platform
import re
import shutil
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence, Union

import numpy as np
from tqdm import tqdm

from .corpora import DOMAINS, CorpusError
from .indexed import IndexedDataset, IndexedDatasetBuilder, best_dtype
from .tokenizer import MAX_VOCAB, MIN_VOCAB, Tokenizer, text_chunks, train_tokenizer
from megareuse.pools import quiet_worker
from megareuse.paths import output_dir_problem

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
Domains = Union[Mapping[str, Sequence[PathLike]], Sequence[str]]
SPLITS = ("train", "valid")
INFO_FILE = "prepare.json"
FORMAT = "megareuse-prepared/1"


class PrepareError(ValueError):
    """Bad input to prepare, or a prepared directory that cannot be used (one line)."""


# --------------------------------------------------------------------------- layout helpers
def write_splits(stage: Path, domain: str, encoded: Iterable[np.ndarray], is_valid: np.ndarray,
                 dtype: np.dtype) -> dict:
    """Write a domain's tokenized documents (in order; ``is_valid[k]`` puts document k in the
    valid split) as <domain>_{train,valid}.{bin,idx}, reopen them to validate, return counts."""
    counts = {s: {"documents": 0, "tokens": 0} for s in SPLITS}
    with IndexedDatasetBuilder(domain_prefix(stage, domain, "train"), dtype) as train_b, \
            IndexedDatasetBuilder(domain_prefix(stage, domain, "valid"), dtype) as valid_b:
        for k, ids in enumerate(encoded):
            split = "valid" if is_valid[k] else "train"
            (valid_b if is_valid[k] else train_b).add_document(ids)
            counts[split]["documents"] += 1
            counts[split]["tokens"] += int(ids.size)
        train_b.finalize()
        valid_b.finalize()
    for split in SPLITS:  # reopen: validates what was written
        if IndexedDataset(domain_prefix(stage, domain, split)).num_tokens != counts[split]["tokens"]:
            raise PrepareError(f"prepare: {domain}_{split} does not hold the tokens written")
    return counts


def domain_prefix(data_dir: PathLike, domain: str, split: str) -> Path:
    """Path prefix (no extension) of one domain's split in a prepared directory."""
    return Path(data_dir) / f"{domain}_{split}"


def load_prepared(data_dir: PathLike) -> dict:
    """Read ``prepare.json`` of a prepared directory (raises PrepareError if absent)."""
    path = Path(data_dir) / INFO_FILE
    if not path.is_file():
        raise PrepareError(f"{data_dir} is not a prepared data directory (no {INFO_FILE}); "
                           f"run `megareuse prepare` first")
    return json.loads(path.read_text())


def open_domain(data_dir: PathLike, domain: str, split: str) -> IndexedDataset:
    """The IndexedDataset of ``domain``/``split``, with a clear error for unknown domains."""
    info = load_prepared(data_dir)
    if domain not in info["domains"]:
        raise PrepareError(f"{data_dir} has no domain {domain!r}; it has "
                           + ", ".join(sorted(info["domains"])))
    if split not in SPLITS:
        raise PrepareError(f"split {split!r}: accepted one of {', '.join(SPLITS)}")
    return IndexedDataset(domain_prefix(data_dir, domain, split))


def split_documents(n_docs: int, valid: Union[int, float], seed: int,
                    domain: str) -> tuple[list[int], list[int]]:
    """Deterministic (train, valid) document indices, each sorted, valid non-empty."""
    n_valid = valid if isinstance(valid, int) else max(1, round(n_docs * valid))
    if n_valid > n_docs - 1:
        raise PrepareError(f"prepare: domain {domain!r} has {n_docs} documents; {n_valid} "
                           f"validation documents would leave none for training")
    rng = np.random.Generator(np.random.PCG64([seed, zlib.crc32(domain.encode())]))
    chosen = set(rng.permutation(n_docs)[:n_valid].tolist())
    return ([i for i in range(n_docs) if i not in chosen], sorted(chosen))


# --------------------------------------------------------------------------- validation
def _validate(out_dir: Path, domains: Domains, vocab_size, workers, valid, force) -> None:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) \
            or not MIN_VOCAB <= vocab_size <= MAX_VOCAB:
        raise PrepareError(f"prepare: vocab_size = {vocab_size!r}: accepted an integer in "
                           f"[{MIN_VOCAB}, {MAX_VOCAB}]")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise PrepareError(f"prepare: workers = {workers!r}: accepted an integer >= 1")
    if isinstance(valid, bool) or not (isinstance(valid, int) and valid >= 1
                                       or isinstance(valid, float) and 0 < valid < 1):
        raise PrepareError(f"prepare: valid = {valid!r}: accepted a fraction in (0, 1) or a "
                           f"document count >= 1")
    if not domains:
        raise PrepareError("prepare: no domains given")
    if isinstance(domains, Mapping):
        for name, files in domains.items():
            if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
                raise PrepareError(f"prepare: domain name {name!r}: accepted letters, digits, "
                                   f"'_', '-', '.'")
            if isinstance(files, (str, os.PathLike)) or len(files) < 2:
                raise PrepareError(f"prepare: domain {name!r} needs a list of at least 2 "
                                   f"document files (one train, one valid)")
            for path in files:
                if not Path(path).is_file():
                    raise PrepareError(f"prepare: input file {path} (domain {name!r}) does not "
                                       f"exist")
            if not any(_has_text(Path(path)) for path in files):  # stops at the first with text
                raise PrepareError(f"prepare: domain {name!r}: all {len(files)} document files are empty "
                                   "(or whitespace only); accepted documents with text to tokenize")
    else:
        for name in domains:
            if name not in DOMAINS:
                raise PrepareError(f"prepare: unknown domain {name!r}; built-in domains: "
                                   + ", ".join(DOMAINS))
    problem = output_dir_problem(out_dir)
    if problem is not None:
        raise PrepareError(f"prepare: --out {out_dir} {problem}; accepted a writable directory")
    if out_dir.exists() and any(out_dir.iterdir()):
        if not force:
            raise PrepareError(f"prepare: {out_dir} already exists and is not empty; remove it or "
                               f"pass force=True (--force)")
        if not (out_dir / "prepare.json").is_file():  # --force replaces prepared data, nothing else
            raise PrepareError(f"prepare: --force would replace {out_dir}, which is not a prepared data "
                               "directory (no prepare.json); accepted a new path, an empty directory or "
                               "an earlier `megareuse prepare` output")


def _has_text(path: Path) -> bool:
    """Whether a document file holds anything but whitespace (read in 1 MiB blocks, stopping at
    the first non-blank byte)."""
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            if block.strip():
                return True
    return False


def _read_text(path: Path) -> str:
    """File text exactly (no newline translation); PrepareError for non-UTF-8."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PrepareError(f"prepare: {path} is not valid UTF-8 (byte {exc.start})") from None


# --------------------------------------------------------------------------- workers
_WORKER_TOKENIZER: Optional[Tokenizer] = None


def _init_worker(model_path: str) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = Tokenizer(model_path)


def _encode_file(job: tuple[str, str]) -> np.ndarray:
    path, dtype = job
    tok = _WORKER_TOKENIZER
    ids = tok.encode(_read_text(Path(path)))
    ids.append(tok.eos_id)
    return np.asarray(ids, dtype=dtype)


def _pool(workers: int, model_path: Path):
    """A worker pool (fork on Linux: no re-import; spawn elsewhere)."""
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    ctx = multiprocessing.get_context(method)
    return ctx.Pool(workers, initializer=quiet_worker, initargs=(_init_worker, str(model_path)))


# --------------------------------------------------------------------------- main entry
def prepare(out_dir: PathLike, domains: Domains, *, vocab_size: int = 2048, workers: int = 2,
            valid: Union[int, float] = 0.05, seed: int = 1234,
            sample_bytes: int = 8_000_000, force: bool = False, progress: bool = True,
            keep_raw: bool = False, corpus_options: Optional[Mapping[str, dict]] = None) -> dict:
    """Train one shared tokenizer and write per-domain train/valid indexed datasets.

    ``domains`` maps a domain name to its document files (one document per file, in order),
    or lists built-in domain names (``corpora.DOMAINS``) to build first, with keyword
    arguments from ``corpus_options[name]``; their raw text is kept under ``out_dir/raw``
    only if ``keep_raw``. ``valid`` is a fraction of each domain's documents (at least one) or
    a document count. The tokenizer trains on up to ``sample_bytes`` of text, split evenly
    between domains (seeded chunk sample). An existing non-empty ``out_dir`` is an error
    unless ``force`` (then it is replaced once the new one is complete). Returns the
    ``prepare.json`` content.
    """
    out_dir = Path(out_dir)
    domains = [domains] if isinstance(domains, str) else domains
    _validate(out_dir, domains, vocab_size, workers, valid, force)
    started = time.perf_counter()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    os.chmod(staging, 0o755)  # mkdtemp makes it 0700
    try:
        if not isinstance(domains, Mapping):
            domains = _build_corpora(staging / "raw", list(domains), corpus_options or {})
        info = _prepare_into(staging, {k: [Path(p) for p in v] for k, v in domains.items()},
                             vocab_size, workers, valid, seed, sample_bytes, progress)
        if not keep_raw and (staging / "raw").exists():
            shutil.rmtree(staging / "raw")
        _publish(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("prepared %s in %.1f s", out_dir, time.perf_counter() - started)
    return info


def prepare_default(out_dir: PathLike, *, domains: Sequence[str] = ("prose", "code"),
                    code_max_bytes: int = 5_000_000, **kwargs) -> dict:
    """Prepare built-in domains (default: prose = Shakespeare + KJV, code = stdlib);
    ``kwargs`` go to ``prepare`` (vocab_size, workers, valid, seed, force, progress, ...)."""
    return prepare(out_dir, list(domains),
                   corpus_options={"code": {"max_bytes": code_max_bytes}}, **kwargs)


def _build_corpora(raw: Path, names: list[str], options: Mapping[str, dict]) -> dict:
    files = {}
    for name in names:
        try:
            files[name] = DOMAINS[name](raw / name, **options.get(name, {}))
        except CorpusError as exc:
            raise PrepareError(str(exc)) from None
        if len(files[name]) < 2:
            raise PrepareError(f"prepare: built-in domain {name!r} produced "
                               f"{len(files[name])} documents, need at least 2")
    return files


def _tokenizer_sample(texts: dict[str, list[str]], sample_bytes: int, seed: int) -> list[str]:
    """Seeded chunks of each domain's text, up to an equal byte budget per domain."""
    budget = max(1, sample_bytes // len(texts))
    sample = []
    for name, docs in texts.items():
        chunks = [c for doc in docs for c in text_chunks(doc)]
        rng = np.random.Generator(np.random.PCG64([seed, zlib.crc32(name.encode())]))
        taken, used = [], 0
        for i in rng.permutation(len(chunks)):
            if used >= budget:
                break
            taken.append(int(i))
            used += len(chunks[i].encode("utf-8"))
        sample.extend(chunks[i] for i in sorted(taken))
    return sample


def _prepare_into(stage: Path, files: dict[str, list[Path]], vocab_size: int, workers: int,
                  valid, seed: int, sample_bytes: int, progress: bool) -> dict:
    texts = {name: [_read_text(p) for p in paths] for name, paths in files.items()}
    splits = {name: split_documents(len(paths), valid, seed, name) for name, paths in files.items()}
    sample = _tokenizer_sample(texts, sample_bytes, seed)
    try:
        tok = train_tokenizer(sample, stage / "tokenizer", vocab_size, seed=seed,
                              max_sentences=len(sample))
    except ValueError as exc:
        raise PrepareError(f"prepare: {exc}") from None
    del texts
    dtype = best_dtype(tok.vocab_size)
    info = {"format": FORMAT, "vocab_size": tok.vocab_size, "tokenizer": "tokenizer.model",
            "tokenizer_sha256": tok.sha256, "eos_id": tok.eos_id, "bos_id": tok.bos_id,
            "pad_id": tok.pad_id, "dtype": dtype.name, "seed": seed, "valid": valid,
            "tokenizer_sample_bytes": sum(len(c.encode("utf-8")) for c in sample),
            "python": platform.python_version(), "domains": {}}
    pool = _pool(workers, tok.path) if workers > 1 else None
    if pool is None:
        _init_worker(str(tok.path))
    try:
        for name, paths in files.items():
            train_ids, valid_ids = splits[name]
            is_valid = np.zeros(len(paths), dtype=bool)
            is_valid[valid_ids] = True
            jobs = [(str(p), dtype.str) for p in paths]
            encoded = pool.imap(_encode_file, jobs) if pool else map(_encode_file, jobs)
            bar = tqdm(encoded, total=len(jobs), desc=f"tokenize {name}", unit="doc", disable=not progress)
            counts = write_splits(stage, name, bar, is_valid, dtype)
            info["domains"][name] = {
                "source_files": len(paths),
                "source_bytes": sum(p.stat().st_size for p in paths),
                **counts,
                "valid_files": [paths[i].name for i in valid_ids]}
    finally:
        if pool is not None:  # every result was consumed, or we are failing: stop workers
            pool.terminate()
            pool.join()
    (stage / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return info


def _publish(staging: Path, out_dir: Path) -> None:
    """Move the finished staging directory to ``out_dir`` (replacing an old one)."""
    old = None
    if out_dir.exists():
        if out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        else:
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
    os.replace(staging, out_dir)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()
