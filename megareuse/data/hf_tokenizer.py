"""Existing tokenizers (an imported base model's, or data preprocessed elsewhere) behind
megareuse's ``Tokenizer`` interface.

``load_tokenizer(path)`` opens a tokenizer.model (sentencepiece) or a tokenizer.json (Hugging
Face ``tokenizers``), or the one held by a directory (tokenizer.model preferred):

* megareuse's own sentencepiece models (no dummy prefix) -> ``megareuse.data.Tokenizer``;
* foreign sentencepiece models (Llama-style, with a dummy prefix) -> ``WholeTextTokenizer``,
  which encodes each document in one sentencepiece call, as the model's own tokenizer does;
* tokenizer.json -> ``JsonTokenizer`` (needs the ``tokenizers`` package, >= 0.15), e.g. the
  byte-level BPE tokenizers of Llama 3 and Qwen2/2.5/3 (a Split regex + ByteLevel pre-tokenizer,
  ByteLevel decoder: ``decode(encode(text)) == text`` for any text; Qwen's NFC normalizer gives
  composed characters back for decomposed ones, as the model's own tokenizer does).

The special tokens of a tokenizer.json come from tokenizer_config.json beside it, as transformers'
``AutoTokenizer`` reads them (a string or an AddedToken object ``{"content": ...}``):

* EOS, the id appended to every prepared document, is its ``eos_token``; without one, the first of
  ``EOS_NAMES`` in the vocabulary. config.json / generation_config.json ``eos_token_id`` (an int,
  or a list of generation stop ids: Llama 3.1 Instruct lists three) are not read: they say when
  generation stops, while ``eos_token`` is what ``AutoTokenizer(...).eos_token_id`` and Megatron-LM's
  ``preprocess_data.py --append-eod`` use. An instruct model names its end-of-turn token there
  (``<|eot_id|>``, ``<|im_end|>``); to end documents with another, edit ``eos_token`` (prepare
  copies tokenizer_config.json with the tokenizer, so the copy says which EOS the data has).
* ``bos_token`` / ``pad_token``: their ids, -1 where there is none (Qwen: ``bos_token: null``).

Every tokenizer has ``encode`` (no special tokens added: no BOS from a post-processor such as
Llama 3's TemplateProcessing), ``decode``, ``vocab_size`` (ids of the model vocabulary and the
added tokens), ``eos_id``/``bos_id``/``pad_id``, ``sha256`` (of the file) and ``path``.
``JsonTokenizer.encode`` reads special tokens that occur literally in a text ("<|endoftext|>" in a
web page) as text, never as their special id (``encode_special_tokens``, what transformers calls
``split_special_tokens=True``), so a document cannot end early or carry a fake chat turn; added
tokens that are not special (Qwen's ``<tool_call>``) are matched as the model's tokenizer does.
Errors are ``TokenizerError`` (a ValueError; ``megareuse.interop.errors.HFError`` is a subclass),
one line. ``tokenizer_vocab_size`` reads the number of ids of either file without ``tokenizers``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Union

from megareuse.atomic import file_sha256
from megareuse.data.tokenizer import Tokenizer
from megareuse.errors import UserError
from megareuse.paths import check_input

PathLike = Union[str, os.PathLike]
EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|im_end|>")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")  # the order a directory is searched in


class TokenizerError(UserError, ValueError):
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
    special tokens, literal special-token text kept as text; decode, vocab_size, eos/bos/pad ids,
    sha256, path)."""

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
        if not hasattr(self._tok, "encode_special_tokens"):
            import tokenizers

            raise TokenizerError(f"{self.path}: tokenizers {tokenizers.__version__} cannot encode special-token "
                                 "text as text; accepted tokenizers >= 0.15: pip install -U tokenizers")
        self._tok.encode_special_tokens = True  # "<|endoftext|>" inside a document is text
        self.vocab_size = tokenizer_vocab_size(self.path)
        special = self._special_tokens()
        self.eos_token = self._eos_token(special["eos_token"])
        self.eos_id = self._tok.token_to_id(self.eos_token)
        self.bos_id = self._id(special["bos_token"])
        self.pad_id = self._id(special["pad_token"])

    def _special_tokens(self) -> dict[str, Optional[str]]:
        """eos/bos/pad token strings of tokenizer_config.json beside the file (None: not set)."""
        config = self.path.with_name("tokenizer_config.json")
        raw = read_json_object(config, "a tokenizer_config.json") if config.is_file() else {}
        out = {}
        for key in ("eos_token", "bos_token", "pad_token"):
            value = raw.get(key)
            value = value.get("content") if isinstance(value, dict) else value
            if value is not None and not isinstance(value, str):
                raise TokenizerError(f"{config}: field {key} = {value!r}; accepted a token string, an AddedToken "
                                     "object {\"content\": \"...\"} or null")
            out[key] = value
        return out

    def _eos_token(self, named: Optional[str]) -> str:
        """tokenizer_config.json's eos_token, else the first of EOS_NAMES in the vocabulary."""
        accepted = f"accepted a token of the vocabulary, e.g. {', '.join(EOS_NAMES)}"
        if named is not None:
            if self._tok.token_to_id(named) is None:
                raise TokenizerError(f"{self.path}: tokenizer_config.json field eos_token = {named!r} is not in "
                                     f"the vocabulary; {accepted}")
            return named
        found = next((n for n in EOS_NAMES if self._tok.token_to_id(n) is not None), None)
        if found is None:
            raise TokenizerError(f"{self.path}: no end-of-text token (no tokenizer_config.json field eos_token, "
                                 f"and none of {', '.join(EOS_NAMES)} in the vocabulary); accepted eos_token naming "
                                 "a token of the vocabulary")
        return found

    def _id(self, token: Optional[str]) -> int:
        found = self._tok.token_to_id(token) if token else None
        return -1 if found is None else found

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``: no special tokens added, special-token strings in it encoded as text."""
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
