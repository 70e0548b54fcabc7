"""``megareuse prepare``: a corpus per domain -> tokenizer + Megatron indexed datasets.

Each domain's input is a list of sources (files or globs in any format of ``sources.FORMATS``:
jsonl, jsonl.gz, jsonl.zst, parquet, text, HF ``save_to_disk`` directories) or a built-in
corpus (``corpora.DOMAINS``). Everything streams (``stream.py``): sources are read in ~1 MiB
chunks, tokenized by worker processes in order, and appended to the output, so memory does not
grow with the corpus. The tokenizer is trained (sentencepiece, on a sample read from the start
of every source) or reused (``tokenizer=``: a tokenizer.model or tokenizer.json, copied).

Output directory layout::

    tokenizer.model                 one sentencepiece model shared by every domain
                                    (or tokenizer.json [+ tokenizer_config.json] when reused)
    <domain>_train.{bin,idx}        documents (tokens + EOS each) of the training split
    <domain>_valid.{bin,idx}        held-out documents (at least one per domain)
    prepare.json                    what was done: vocab, tokenizer sha256, counts per split

Everything is written into a temporary sibling directory that is renamed to ``out_dir`` only
when complete, so an interrupted run never leaves a directory that looks prepared. Options and
paths are validated before anything is written; a bad record (not JSON, no text key, invalid
UTF-8) raises ``PrepareError`` naming file and line, or is counted with ``skip_bad``; either way
a failed run leaves nothing behind.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np
from tqdm import tqdm

from megareuse.atomic import publish_dir
from megareuse.paths import output_dir_problem

from . import sources as src
from .corpora import DOMAINS, CorpusError
from .errors import PrepareError
from .indexed import IndexedDataset, best_dtype
from .stream import DomainWriter, encode_chunks
from .tokenizer import MAX_VOCAB, MIN_VOCAB, text_chunks, train_tokenizer

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
Domains = Union[Mapping[str, Sequence[PathLike]], Sequence[str]]
SPLITS = ("train", "valid")
INFO_FILE = "prepare.json"
FORMAT = "megareuse-prepared/1"


# --------------------------------------------------------------------------- layout helpers
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


# --------------------------------------------------------------------------- validation
DOMAIN_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]*"


def _validate(out_dir: Path, domains: Domains, vocab_size, workers, valid, force, split, text_key) -> None:
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
    if split not in src.TEXT_SPLITS:
        raise PrepareError(f"prepare: split = {split!r}: accepted " + ", ".join(src.TEXT_SPLITS))
    if not isinstance(text_key, str) or not text_key:
        raise PrepareError(f"prepare: text_key = {text_key!r}: accepted a non-empty key name")
    if not domains:
        raise PrepareError("prepare: no domains given")
    names = list(domains)
    for name in names:
        if not isinstance(name, str) or not re.fullmatch(DOMAIN_NAME, name):
            raise PrepareError(f"prepare: domain name {name!r}: accepted letters, digits, '_', '-', '.' "
                               "(starting with a letter or digit)")
        if not isinstance(domains, Mapping) and name not in DOMAINS:
            raise PrepareError(f"prepare: unknown domain {name!r}; built-in domains: " + ", ".join(DOMAINS))
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


def resolve_domains(domains: Mapping[str, Union[PathLike, Sequence[PathLike]]],
                    fmt: Optional[str] = None) -> dict[str, list[src.Source]]:
    """Each domain's sources: its paths and globs resolved in the order given (a file matched
    twice is read once), each with its format (``fmt``, or detected from the name)."""
    out = {}
    for name, items in domains.items():
        items = [items] if isinstance(items, (str, os.PathLike)) else list(items)
        if not items:
            raise PrepareError(f"prepare: domain {name!r} has no input; accepted files, globs or directories")
        seen, sources = set(), []
        for item in items:
            for source in src.resolve_sources(os.fspath(item), fmt, name):
                key = source.path.resolve()
                if key not in seen:
                    seen.add(key)
                    sources.append(source)
        out[name] = sources
    return out


# --------------------------------------------------------------------------- main entry
def prepare(out_dir: PathLike, domains: Domains, *, vocab_size: int = 2048, workers: int = 2,
            valid: Union[int, float] = 0.05, seed: int = 1234,
            sample_bytes: int = 8_000_000, force: bool = False, progress: bool = True,
            keep_raw: bool = False, corpus_options: Optional[Mapping[str, dict]] = None,
            tokenizer: Optional[PathLike] = None, fmt: Optional[str] = None, split: str = "file",
            text_key: str = "text", skip_bad: bool = False) -> dict:
    """Tokenize each domain's corpus into train/valid indexed datasets with one shared tokenizer.

    ``domains`` maps a domain name to its inputs (files, globs, HF dataset directories; each a
    document per file for text, a document per record otherwise: see ``sources``), or lists
    built-in domain names (``corpora.DOMAINS``) to build first, with keyword arguments from
    ``corpus_options[name]``; their raw text is kept under ``out_dir/raw`` only if ``keep_raw``.
    ``fmt`` forces a format, ``split`` ("file" or "lines") says what a text document is,
    ``text_key`` names the text field of jsonl/parquet/HF records, ``skip_bad`` counts and skips
    bad records instead of failing. ``valid`` is a fraction of each domain's documents (at least
    one) or a document count, drawn under ``seed`` (``stream.ValidSplit``). ``tokenizer`` reuses
    a tokenizer file (or a directory holding one); otherwise a sentencepiece BPE of
    ``vocab_size`` trains on up to ``sample_bytes`` of text. An existing non-empty ``out_dir`` is
    an error unless ``force`` (then it is replaced once the new one is complete). Returns the
    ``prepare.json`` content.
    """
    out_dir = Path(out_dir)
    domains = [domains] if isinstance(domains, str) else domains
    _validate(out_dir, domains, vocab_size, workers, valid, force, split, text_key)
    reused = None
    if tokenizer is not None:
        from .hf_tokenizer import TokenizerError, load_tokenizer
        try:
            reused = load_tokenizer(tokenizer)
        except TokenizerError as exc:
            raise PrepareError(f"prepare: {exc}") from None
    resolved = resolve_domains(domains, fmt) if isinstance(domains, Mapping) else None
    started = time.perf_counter()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    os.chmod(staging, 0o755)  # mkdtemp makes it 0700
    try:
        if resolved is None:
            resolved = {name: [src.Source(p, "text") for p in paths] for name, paths in
                        _build_corpora(staging / "raw", list(domains), corpus_options or {}).items()}
        options = dict(split=split, text_key=text_key)
        info = _tokenizer_info(staging, resolved, reused, vocab_size, seed, sample_bytes, options)
        info.update({"seed": seed, "valid": valid, "text_key": text_key, "split": split,
                     "python": platform.python_version(), "domains": {}})
        for name, sources in resolved.items():
            info["domains"][name] = _prepare_domain(staging, name, sources, info, workers, valid, seed,
                                                    skip_bad, progress, options)
        if not keep_raw and (staging / "raw").exists():
            shutil.rmtree(staging / "raw")
        (staging / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
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


# --------------------------------------------------------------------------- tokenizer
def _tokenizer_info(stage: Path, resolved: dict[str, list[src.Source]], reused, vocab_size: int,
                    seed: int, sample_bytes: int, options: dict) -> dict:
    """Train (or copy) the tokenizer into ``stage``; the prepare.json fields that describe it."""
    if reused is None:
        sample = tokenizer_sample(resolved, sample_bytes, options)
        try:
            tok = train_tokenizer(sample, stage / "tokenizer", vocab_size, seed=seed,
                                  max_sentences=max(1, len(sample)))
        except ValueError as exc:
            raise PrepareError(f"prepare: {exc}") from None
        name, extra = "tokenizer.model", {"tokenizer_trained": True,
                                          "tokenizer_sample_bytes": sum(len(c.encode("utf-8")) for c in sample)}
    else:
        tok = reused
        name = "tokenizer.json" if Path(tok.path).suffix == ".json" else "tokenizer.model"
        shutil.copyfile(tok.path, stage / name)
        config = Path(tok.path).with_name("tokenizer_config.json")
        if name == "tokenizer.json" and config.is_file():
            shutil.copyfile(config, stage / config.name)
        extra = {"tokenizer_trained": False, "tokenizer_source": str(Path(tok.path).resolve()),
                 "tokenizer_sample_bytes": 0}
        log.info("prepare: reusing %s (vocab %d); each document ends with eos id %d%s", tok.path, tok.vocab_size,
                 tok.eos_id, f" {tok.eos_token}" if getattr(tok, "eos_token", None) else "")
    return {"format": FORMAT, "vocab_size": tok.vocab_size, "tokenizer": name,
            "tokenizer_sha256": tok.sha256, **extra, "eos_id": tok.eos_id, "bos_id": tok.bos_id,
            "pad_id": tok.pad_id, "dtype": best_dtype(tok.vocab_size).name}


def tokenizer_sample(resolved: dict[str, list[src.Source]], sample_bytes: int, options: dict) -> list[str]:
    """Tokenizer training text: an equal byte budget per domain, split evenly between its
    sources, read from the start of each (documents cut into the trainer's line chunks)."""
    sample = []
    budget = max(1, sample_bytes // len(resolved))
    for sources in resolved.values():
        per_source = max(1, budget // len(sources))
        for source in sources:
            used = 0
            for piece in _source_pieces(source, min(src.CHUNK_BYTES, max(1 << 16, per_source)), options):
                if used >= per_source:
                    break
                sample.append(piece)
                used += len(piece.encode("utf-8", "replace"))
    return sample


def _source_pieces(source: src.Source, chunk_bytes: int, options: dict):
    """A source's documents in order, as the tokenizer trainer's line chunks (bad records: none)."""
    for chunk in src.read_chunks(source, chunk_bytes=chunk_bytes, **options):
        for _, text, _ in src.documents(chunk, options["text_key"]):
            yield from text_chunks(text or "")


# --------------------------------------------------------------------------- one domain
def _prepare_domain(stage: Path, name: str, sources: list[src.Source], info: dict, workers: int, valid,
                    seed: int, skip_bad: bool, progress: bool, options: dict) -> dict:
    dtype = np.dtype(info["dtype"])
    total = sum(s.size() for s in sources)
    records = None  # a validation count draws from the records, counted first
    if isinstance(valid, int):
        records = sum(src.count_records(s, **options) for s in sources)
    writer = DomainWriter(stage, name, dtype, valid, seed, records)
    size = src.CHUNK_BYTES  # read at call time (tests make it small)
    chunks = src.batched((c for s in sources for c in src.read_chunks(s, chunk_bytes=size, **options)), size)
    encoded = encode_chunks(chunks, stage / info["tokenizer"], text_key=options["text_key"], dtype=dtype,
                            workers=workers, skip_bad=skip_bad)
    bar = tqdm(total=total, desc=f"prepare {name}", unit="B", unit_scale=True, disable=not progress,
               dynamic_ncols=True)
    started, docs, tokens, shown = time.perf_counter(), 0, 0, 0.0
    try:
        for enc in encoded:
            writer.add(enc)
            docs, tokens = docs + len(enc.where), tokens + int(enc.tokens.size)
            bar.update(enc.nbytes)
            now = time.perf_counter()
            if now - shown > 0.5:
                rate = max(now - started, 1e-9)
                bar.set_postfix_str(f"{docs / rate:,.0f} docs/s, {tokens / rate:,.0f} tok/s", refresh=False)
                shown = now
        counts = writer.close()
    except BaseException:
        encoded.close()  # stops the worker pool now
        writer.abort()
        raise
    finally:
        bar.close()
    if counts["bad_records_skipped"]:
        log.warning("prepare: domain %r: skipped %d bad records (first: %s)", name,
                    counts["bad_records_skipped"], counts["bad_examples"][0])
    out = {"source_files": len(sources), "source_bytes": total,
           "formats": sorted({s.format for s in sources}), **counts}
    if all(s.format == "text" for s in sources) and options["split"] == "file":
        out["valid_files"] = [Path(w).name for w in counts["valid_sources"]]
    return out


def _publish(staging: Path, out_dir: Path) -> None:
    """Move the finished staging directory to ``out_dir`` (replacing an old one)."""
    if out_dir.is_dir() and not out_dir.is_symlink() and not any(out_dir.iterdir()):
        out_dir.rmdir()
    publish_dir(staging, out_dir, previous=out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}"))
