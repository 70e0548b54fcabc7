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

import logging
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from megareuse.data import preprocess as pp
from megareuse.data.hf_tokenizer import (EOS_NAMES, JsonTokenizer, TokenizerError, WholeTextTokenizer,  # noqa: F401
                                         load_tokenizer, tokenizer_file, tokenizer_vocab_size)
from megareuse.engine.checkpoint import META, file_sha256, read_meta
from megareuse.data.hf_tokenizer import read_json_object as _read_json_object
from megareuse.interop.errors import HFError

log = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]


def read_json_object(path: Path, what: str = "a JSON object") -> dict[str, Any]:
    """``path`` parsed as a JSON object, or HFError naming the file and what was wrong."""
    return _read_json_object(path, what, HFError)


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


def prepare_with_tokenizer(out_dir: PathLike, domains: pp.Domains, tokenizer_path: PathLike, *,
                           workers: int = 2, valid: Union[int, float] = 0.05, seed: int = 1234,
                           force: bool = False, progress: bool = True, keep_raw: bool = False,
                           corpus_options: Optional[Mapping[str, dict]] = None, **options) -> dict[str, Any]:
    """``megareuse.data.prepare`` with ``tokenizer_path``'s tokenizer (a file, an HF model
    directory or an imported checkpoint) instead of a new one; the other arguments (and
    ``options``: fmt, split, text_key, skip_bad) mean what they mean there. A tokenizer that
    cannot be loaded raises HFError before anything else is checked. Returns the
    ``prepare.json`` content."""
    file = load_tokenizer(tokenizer_path).path  # the file a directory names; checked here
    return pp.prepare(out_dir, domains, tokenizer=file, workers=workers, valid=valid, seed=seed, force=force,
                      progress=progress, keep_raw=keep_raw, corpus_options=corpus_options, **options)
