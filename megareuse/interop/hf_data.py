"""Data preparation with an existing tokenizer (an imported base model's), not a newly trained one.

``prepare_with_tokenizer(out_dir, domains, tokenizer)`` writes the layout of ``megareuse prepare``
(``megareuse.data.preprocess``): the tokenizer file copied byte for byte, ``<domain>_{train,valid}
.{bin,idx}`` and ``prepare.json``, into a temporary sibling renamed into place when complete. The
copied file has the same sha256 as the checkpoint's ``meta.json`` tokenizer entry, so stage 2
(``run.init_from``) accepts the data. ``tokenizer`` is a file (tokenizer.model or tokenizer.json),
an HF model directory or a megareuse checkpoint directory (sentencepiece preferred).

``hf_lineage`` finds, for any checkpoint (CPT or grown from an imported base), the imported
config.json and the directories holding its base's tokenizer files, for ``export_hf``.

Sentencepiece models must load in ``megareuse.data.Tokenizer`` (it needs byte_fallback, as
Llama's tokenizer has; the trainer opens data.dir/tokenizer.model with it). Foreign ones (with a
dummy prefix) encode each document whole (``WholeTextTokenizer``). tokenizer.json-only models go through ``JsonTokenizer`` (needs the
``tokenizers`` package); the data is written, but ``megareuse train`` currently opens only
``data.dir/tokenizer.model`` (megareuse/engine/inputs.py), so training on it needs that hook.
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
from megareuse.data.tokenizer import MIN_VOCAB, Tokenizer
from megareuse.engine.checkpoint import META, file_sha256, read_meta
from megareuse.pools import quiet_worker
from megareuse.paths import check_input
from megareuse.interop.errors import HFError

log = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]
EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|im_end|>")


def tokenizer_vocab_size(path: PathLike) -> int:
    """Number of ids of a tokenizer.model (sentencepiece) or tokenizer.json file, read directly
    (no ``tokenizers`` needed): the largest id + 1 over the model vocabulary and added tokens."""
    path = Path(path)
    if path.suffix == ".model":
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(path.read_bytes())
        except RuntimeError:
            raise HFError(f"{path} is not a sentencepiece model") from None
        return sp.get_piece_size()
    try:
        data = json.loads(path.read_text())
        vocab = data["model"]["vocab"]
        ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))
        ids += [t["id"] for t in data.get("added_tokens") or []]
    except (ValueError, KeyError, TypeError):
        raise HFError(f"{path} is not a tokenizer.json with a model.vocab") from None
    return max(ids) + 1




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


class JsonTokenizer:
    """A Hugging Face ``tokenizer.json`` with megareuse's Tokenizer interface (encode without
    special tokens, decode, vocab_size, eos/bos/pad ids, sha256, path)."""

    def __init__(self, path: PathLike):
        try:
            from tokenizers import Tokenizer as _HFTokenizer
        except ImportError:
            raise HFError(f"{path}: tokenizer.json needs the tokenizers package: pip install tokenizers") from None
        self.path = Path(path)
        self.sha256 = file_sha256(self.path)
        try:
            self._tok = _HFTokenizer.from_file(str(self.path))
        except Exception as exc:  # the tokenizers library raises plain Exceptions for a bad file
            raise HFError(f"{self.path} is not a tokenizer.json the tokenizers library reads "
                          f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
        self.vocab_size = tokenizer_vocab_size(self.path)
        special = self._special_tokens()
        eos = special.get("eos_token") or next((n for n in EOS_NAMES if self._tok.token_to_id(n) is not None), None)
        if eos is None or self._tok.token_to_id(eos) is None:
            raise HFError(f"{self.path}: no end-of-text token (tokenizer_config.json field eos_token = {eos!r}); "
                          f"accepted a token of the vocabulary, e.g. {', '.join(EOS_NAMES)}")
        self.eos_id = self._tok.token_to_id(eos)
        self.bos_id = self._id(special.get("bos_token"))
        self.pad_id = self._id(special.get("pad_token"))

    def _special_tokens(self) -> dict[str, Optional[str]]:
        config = self.path.with_name("tokenizer_config.json")
        raw = read_json_object(config, "a tokenizer_config.json") if config.is_file() else {}
        out = {}
        for key in ("eos_token", "bos_token", "pad_token"):
            value = raw.get(key)
            out[key] = value.get("content") if isinstance(value, dict) else value
        return out

    def _id(self, token: Optional[str]) -> int:
        found = self._tok.token_to_id(token) if token else None
        return -1 if found is None else found

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, no special tokens added."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"JsonTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


def tokenizer_file(path: PathLike) -> Path:
    """The tokenizer file a path names: itself, or the tokenizer.model (else tokenizer.json) of
    an HF model directory or a megareuse checkpoint directory."""
    path = Path(path)
    if path.is_dir():
        for name in ("tokenizer.model", "tokenizer.json"):
            if (path / name).is_file():
                return path / name
        raise HFError(f"--tokenizer {str(path)!r} holds no tokenizer.model or tokenizer.json; accepted an "
                      "imported checkpoint, an HF model directory or a tokenizer file")
    check_input(path, "file", "--tokenizer", "an imported checkpoint, an HF model directory or a tokenizer.model / "
                "tokenizer.json file", HFError)
    if path.suffix not in (".model", ".json"):
        raise HFError(f"--tokenizer {str(path)!r}: accepted an existing tokenizer.model / tokenizer.json file "
                      "or a directory holding one")
    return path


class WholeTextTokenizer(Tokenizer):
    """A foreign sentencepiece model (e.g. Llama's, with ``add_dummy_prefix``): each document is
    encoded by sentencepiece in one call, as the model's own tokenizer does. megareuse's
    ``Tokenizer.encode`` cuts long text into line chunks (each would get a dummy-prefix space)
    and keeps a literal U+2581 as bytes, which suits its own tokenizers, not a base model's."""

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text))


def load_tokenizer(path: PathLike) -> Union[Tokenizer, JsonTokenizer]:
    """The tokenizer of ``tokenizer_file(path)``: megareuse's ``Tokenizer`` for models it trained
    (no dummy prefix), a ``WholeTextTokenizer`` for other sentencepiece models, a
    ``JsonTokenizer`` for tokenizer.json."""
    file = tokenizer_file(path)
    if file.suffix == ".json":
        return JsonTokenizer(file)
    try:
        tok = Tokenizer(file)
    except ValueError as exc:
        raise HFError(f"{exc}; megareuse's trainer opens data.dir/tokenizer.model with the same class") from None
    dummy_prefix = tok.piece(tok.encode("a")[0]).startswith("\u2581")  # Llama-style model
    return WholeTextTokenizer(file) if dummy_prefix else tok


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
