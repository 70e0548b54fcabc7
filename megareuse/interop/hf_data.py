"""Data preparation with an existing tokenizer (an imported base model's), not a newly trained one.

``prepare_with_tokenizer(out_dir, domains, tokenizer)`` writes the layout of ``megareuse prepare``
(``megareuse.data.preprocess``): the tokenizer file copied byte for byte, ``<domain>_{train,valid}
.{bin,idx}`` and ``prepare.json``, into a temporary sibling renamed into place when complete. The
copied file has the same sha256 as the checkpoint's ``meta.json`` tokenizer entry, so stage 2
(``run.init_from``) accepts the data. ``tokenizer`` is a file (tokenizer.model or tokenizer.json),
an HF model directory or a megareuse checkpoint directory (sentencepiece preferred).

``hf_lineage`` finds, for any checkpoint (CPT or grown from an imported base), the imported
config.json and the directories holding its base's tokenizer files, for ``export_hf``.

The tokenizers themselves (``load_tokenizer``, ``JsonTokenizer``, ``WholeTextTokenizer``,
``tokenizer_file``, ``tokenizer_vocab_size``, ``EOS_NAMES``) live in
``megareuse.data.hf_tokenizer`` (re-exported here); the trainer opens data directories holding
either tokenizer file with the same ``load_tokenizer``.
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import numpy as np

from megareuse.data import preprocess as pp
from megareuse.data.indexed import best_dtype
from megareuse.data.hf_tokenizer import (EOS_NAMES, JsonTokenizer, TokenizerError, WholeTextTokenizer,  # noqa: F401
                                         load_tokenizer, tokenizer_file, tokenizer_vocab_size)
from megareuse.data.tokenizer import MIN_VOCAB
from megareuse.engine.checkpoint import META, file_sha256, read_meta
from megareuse.pools import quiet_worker
from megareuse.interop.errors import HFError

log = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]


def read_json_object(path: Path, what: str = "a JSON object") -> dict[str, Any]:
    """``path`` parsed as a JSON object, or HFError naming the file and what was wrong."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise HFError(f"{path} is not valid JSON ({str(exc).splitlines()[0]}); accepted {what}") from None
    if not isinstance(raw, dict):
        raise HFError(f"{path} holds a JSON {type(raw).__name__}, not an object; accepted {what}")
    return raw


def tokenizer_entry(model_dir: Path) -> Optional[dict[str, Any]]:
    """The meta.json ``tokenizer`` entry (file, sha256, vocab_size, source) for the tokenizer of
    an HF model directory (tokenizer.model first, else tokenizer.json); None when it has neither."""
    for name in ("tokenizer.model", "tokenizer.json"):
        path = Path(model_dir) / name
        if path.is_file():
            return {"file": name, "sha256": file_sha256(path), "vocab_size": tokenizer_vocab_size(path),
                    "source": str(path.resolve())}
    return None


def special_ids(tokenizer: Path) -> Optional[dict[str, Optional[int]]]:
    """bos/eos/pad token ids (config.json keys) of a sentencepiece model; absent ones are None."""
    if not Path(tokenizer).is_file():
        return None
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(Path(tokenizer).read_bytes())
    except RuntimeError:
        raise HFError(f"{tokenizer} is not a sentencepiece model; accepted the tokenizer.model the "
                      "checkpoint was trained with") from None
    ids = {"bos_token_id": sp.bos_id(), "eos_token_id": sp.eos_id(), "pad_token_id": sp.pad_id()}
    return {k: (None if v < 0 else v) for k, v in ids.items()}


def hf_lineage(src: Path, meta: dict) -> tuple[Optional[dict], list[Path]]:
    """The imported config.json (meta ``source.hf_config``) up the chain of ``init_from`` /
    ``growth.base`` checkpoints that share ``src``'s tokenizer, and the directories visited
    (``src`` first): a CPT or grown checkpoint exports with its HF base's token ids and files."""
    dirs, sha = [src], (meta.get("tokenizer") or {}).get("sha256")
    for _ in range(16):
        hf_config = (meta.get("source") or {}).get("hf_config")
        if hf_config:
            return hf_config, dirs
        parent = (meta.get("init_from") or {}).get("path") or (meta.get("growth") or {}).get("base")
        if not parent or not (Path(parent) / META).is_file() or Path(parent) in dirs:
            break
        meta = read_meta(Path(parent))
        if (meta.get("tokenizer") or {}).get("sha256") != sha:
            break
        dirs.append(Path(parent))
    return None, dirs


_WORKER = None


def _init_worker(path: str) -> None:
    global _WORKER
    _WORKER = load_tokenizer(path)


def _encode_job(job: tuple[str, str]) -> np.ndarray:
    """One document file -> its ids + EOS (in a worker process, or inline)."""
    path, dtype = job
    ids = _WORKER.encode(pp._read_text(Path(path)))
    ids.append(_WORKER.eos_id)
    return np.asarray(ids, dtype=dtype)


def _encoded(paths: list[Path], tok, workers: int, dtype: np.dtype) -> Iterator[np.ndarray]:
    """Each document's ids + EOS, in order; sentencepiece models use ``workers`` processes."""
    jobs = [(str(p), dtype.str) for p in paths]
    if isinstance(tok, JsonTokenizer) or workers == 1:  # tokenizers parallelises on its own
        global _WORKER
        _WORKER = tok
        yield from map(_encode_job, jobs)
        return
    ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    pool = ctx.Pool(workers, initializer=quiet_worker, initargs=(_init_worker, str(tok.path)))
    try:
        yield from pool.imap(_encode_job, jobs)
    finally:
        pool.terminate()
        pool.join()


def prepare_with_tokenizer(out_dir: PathLike, domains: pp.Domains, tokenizer_path: PathLike, *,
                           workers: int = 2, valid: Union[int, float] = 0.05, seed: int = 1234,
                           force: bool = False, progress: bool = True, keep_raw: bool = False,
                           corpus_options: Optional[Mapping[str, dict]] = None) -> dict[str, Any]:
    """``megareuse.data.prepare`` with ``tokenizer_path``'s tokenizer instead of a new one.

    ``domains`` maps names to document files (one document per file) or lists built-in domains;
    ``valid``, ``seed`` (train/valid split), ``force``, ``keep_raw`` and ``corpus_options`` mean
    what they mean for ``prepare``. Raises PrepareError / HFError (one line) before writing.
    Returns the ``prepare.json`` content.
    """
    out_dir = Path(out_dir)
    domains = [domains] if isinstance(domains, str) else domains
    tok = load_tokenizer(tokenizer_path)
    pp._validate(out_dir, domains, MIN_VOCAB, workers, valid, force)  # vocab: the tokenizer's own
    started = time.perf_counter()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    os.chmod(staging, 0o755)
    try:
        if not isinstance(domains, Mapping):
            domains = pp._build_corpora(staging / "raw", list(domains), corpus_options or {})
        files = {name: [Path(p) for p in paths] for name, paths in domains.items()}
        name = "tokenizer.json" if isinstance(tok, JsonTokenizer) else "tokenizer.model"
        shutil.copyfile(tok.path, staging / name)
        config = Path(tok.path).with_name("tokenizer_config.json")
        if isinstance(tok, JsonTokenizer) and config.is_file():
            shutil.copyfile(config, staging / config.name)
        dtype = best_dtype(tok.vocab_size)
        info = {"format": pp.FORMAT, "vocab_size": tok.vocab_size, "tokenizer": name,
                "tokenizer_sha256": tok.sha256, "tokenizer_source": str(Path(tok.path).resolve()),
                "tokenizer_trained": False, "eos_id": tok.eos_id, "bos_id": tok.bos_id,
                "pad_id": tok.pad_id, "dtype": dtype.name, "seed": seed, "valid": valid,
                "tokenizer_sample_bytes": 0, "domains": {}}
        for domain, paths in files.items():
            _write_domain(staging, domain, paths, tok, workers, dtype, valid, seed, progress, info)
        if not keep_raw and (staging / "raw").exists():
            shutil.rmtree(staging / "raw")
        (staging / pp.INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        pp._publish(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("prepared %s with %s in %.1f s", out_dir, tok, time.perf_counter() - started)
    return info


def _write_domain(stage: Path, domain: str, paths: Sequence[Path], tok, workers: int, dtype: np.dtype,
                  valid, seed: int, progress: bool, info: dict) -> None:
    """Tokenize one domain's documents into its train/valid indexed datasets (split as prepare)."""
    _, valid_ids = pp.split_documents(len(paths), valid, seed, domain)
    is_valid = np.zeros(len(paths), dtype=bool)
    is_valid[valid_ids] = True
    counts = pp.write_splits(stage, domain, _encoded(list(paths), tok, workers, dtype), is_valid, dtype)
    if progress:
        log.info("tokenized %s: %s", domain, counts)
    info["domains"][domain] = {"source_files": len(paths), "source_bytes": sum(p.stat().st_size for p in paths),
                               **counts, "valid_files": [paths[i].name for i in valid_ids]}
