"""Existing tokenizers (an imported base model's, or data preprocessed elsewhere) behind
megareuse's ``Tokenizer`` interface.

``load_tokenizer(path)`` opens a tokenizer.model (sentencepiece) or a tokenizer.json (Hugging
Face ``tokenizers``), or the one held by a directory (tokenizer.model preferred):

* megareuse's own sentencepiece models (no dummy prefix) -> ``megareuse.data.Tokenizer``;
* foreign sentencepiece models (Llama-style, with a dummy prefix) -> ``WholeTextTokenizer``,
  which encodes each document in one sentencepiece call, as the model's own tokenizer does;
* tokenizer.json -> ``JsonTokenizer`` (needs the ``tokenizers`` package); its end-of-text token
  is tokenizer_config.json's ``eos_token`` next to it, else the first of ``EOS_NAMES`` in the
  vocabulary.

Every tokenizer has ``encode`` (no special tokens added), ``decode``, ``vocab_size``,
``eos_id``/``bos_id``/``pad_id``, ``sha256`` (of the file) and ``path``. Errors are
``TokenizerError`` (a ValueError; ``megareuse.interop.errors.HFError`` is a subclass), one line.
``tokenizer_vocab_size`` reads the number of ids of either file without ``tokenizers``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Union

from megareuse.atomic import file_sha256
from megareuse.data.tokenizer import Tokenizer
from megareuse.paths import check_input

PathLike = Union[str, os.PathLike]
EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|im_end|>")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")  # the order a directory is searched in


class TokenizerError(ValueError):
    """A tokenizer file cannot be opened or used; the message is one line."""


def read_json_object(path: Path, what: str = "a JSON object", error: type[ValueError] = TokenizerError) -> dict[str, Any]:
    """``path`` parsed as a JSON object, or ``error`` naming the file and what was wrong."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise error(f"{path} is not valid JSON ({str(exc).splitlines()[0]}); accepted {what}") from None
    if not isinstance(raw, dict):
        raise error(f"{path} holds a JSON {type(raw).__name__}, not an object; accepted {what}")
    return raw


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
            raise TokenizerError(f"{path} is not a sentencepiece model") from None
        return sp.get_piece_size()
    try:
        data = json.loads(path.read_text())
        vocab = data["model"]["vocab"]
        ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))
        ids += [t["id"] for t in data.get("added_tokens") or []]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise TokenizerError(f"{path} is not a tokenizer.json with a model.vocab") from None
    return max(ids) + 1


class JsonTokenizer:
    """A Hugging Face ``tokenizer.json`` with megareuse's Tokenizer interface (encode without
    special tokens, decode, vocab_size, eos/bos/pad ids, sha256, path)."""

    def __init__(self, path: PathLike):
        try:
            from tokenizers import Tokenizer as _HFTokenizer
        except ImportError:
            raise TokenizerError(f"{path}: tokenizer.json needs the tokenizers package: pip install tokenizers") from None
        self.path = Path(path)
        self.sha256 = file_sha256(self.path)
        try:
            self._tok = _HFTokenizer.from_file(str(self.path))
        except Exception as exc:  # the tokenizers library raises plain Exceptions for a bad file
            raise TokenizerError(f"{self.path} is not a tokenizer.json the tokenizers library reads "
                                 f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
        self.vocab_size = tokenizer_vocab_size(self.path)
        special = self._special_tokens()
        eos = special.get("eos_token") or next((n for n in EOS_NAMES if self._tok.token_to_id(n) is not None), None)
        if eos is None or self._tok.token_to_id(eos) is None:
            raise TokenizerError(f"{self.path}: no end-of-text token (tokenizer_config.json field eos_token = {eos!r}); "
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


def tokenizer_file(path: PathLike, field: str = "--tokenizer") -> Path:
    """The tokenizer file a path names: itself, or the tokenizer.model (else tokenizer.json) of
    a directory (an HF model, a megareuse checkpoint or data directory). ``field`` names the
    option or config field in the one-line error."""
    path = Path(path)
    accepted = ("a tokenizer.model / tokenizer.json file or a directory holding one (an imported "
                "checkpoint, an HF model directory)")
    if path.is_dir():
        for name in TOKENIZER_FILES:
            if (path / name).is_file():
                return path / name
        raise TokenizerError(f"{field} {str(path)!r} holds no tokenizer.model or tokenizer.json; accepted {accepted}")
    check_input(path, "file", field, accepted, TokenizerError)
    if path.suffix not in (".model", ".json"):
        raise TokenizerError(f"{field} {str(path)!r} is not a .model or .json file; accepted {accepted}")
    return path


class WholeTextTokenizer(Tokenizer):
    """A foreign sentencepiece model (e.g. Llama's, with ``add_dummy_prefix``): each document is
    encoded by sentencepiece in one call, as the model's own tokenizer does. megareuse's
    ``Tokenizer.encode`` cuts long text into line chunks (each would get a dummy-prefix space)
    and keeps a literal U+2581 as bytes, which suits its own tokenizers, not a base model's."""

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text))


AnyTokenizer = Union[Tokenizer, JsonTokenizer]


def load_tokenizer(path: PathLike, field: str = "--tokenizer") -> AnyTokenizer:
    """The tokenizer of ``tokenizer_file(path, field)``: megareuse's ``Tokenizer`` for models it
    trained (no dummy prefix), a ``WholeTextTokenizer`` for other sentencepiece models, a
    ``JsonTokenizer`` for tokenizer.json."""
    file = tokenizer_file(path, field)
    if file.suffix == ".json":
        return JsonTokenizer(file)
    try:
        tok = Tokenizer(file)
    except ValueError as exc:
        raise TokenizerError(f"{field} {str(file)!r}: {str(exc).splitlines()[0]}; accepted a sentencepiece model "
                             "with byte_fallback or a tokenizer.json") from None
    dummy_prefix = tok.piece(tok.encode("a")[0]).startswith("\u2581")  # Llama-style model
    return WholeTextTokenizer(file) if dummy_prefix else tok
