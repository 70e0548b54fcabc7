"""What the names in ``data.train`` / ``data.valid`` point at, and which tokenizer the run uses.

A key is either a *domain* of ``data.dir`` (written by ``megareuse prepare``: files
``<data.dir>/<domain>_<split>.{bin,idx}``) or the *path prefix* of any Megatron ``.bin/.idx``
pair (as Megatron-LM's tools/preprocess_data.py writes, e.g. ``/data/slimpj_text_document``):

* a key holding a path separator (``/``), or ending in ``.bin`` / ``.idx`` (stripped), is a
  prefix; a relative prefix resolves against the current directory; the same files serve the
  train and the valid split (name another prefix in ``data.valid`` for held-out data);
* any other key (``prose``, ``wiki.en``: dots are allowed) is a domain of ``data.dir``.

The tokenizer: ``data.tokenizer`` (a tokenizer.model / tokenizer.json file, or a directory
holding one) when set, else ``data.dir``'s own (the file prepare.json's ``tokenizer`` field
names, else tokenizer.model, else tokenizer.json). When every key is a prefix and
``data.tokenizer`` is set, ``data.dir`` is never opened (it need not exist).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from megareuse.config import DataConfig
from megareuse.data.hf_tokenizer import TOKENIZER_FILES, AnyTokenizer, TokenizerError, load_tokenizer
from megareuse.data.indexed import index_path
from megareuse.data.preprocess import INFO_FILE
from megareuse.errors import UserError
from megareuse.paths import input_problem

log = logging.getLogger(__name__)
PREFIX_SUFFIXES = (".bin", ".idx")


class DataError(UserError, ValueError):
    """The data the config names is not there or does not fit; the message is one line."""


@dataclass(frozen=True)
class SplitSource:
    """Where one ``data.train`` / ``data.valid`` key's split lives."""
    key: str      # as written in the config: the domain's name in metrics and records
    prefix: Path  # the .bin/.idx path prefix
    is_prefix: bool  # a Megatron path prefix (True) or a domain of data.dir (False)


@dataclass(frozen=True)
class TokenizerSource:
    """The run's tokenizer and where it came from."""
    tokenizer: AnyTokenizer
    file: Path   # the tokenizer file (its name is kept in checkpoints)
    origin: str  # "data.tokenizer" or "data.dir"

    @property
    def name(self) -> str:
        return self.file.name


def is_prefix_key(key: str) -> bool:
    """True for a key naming a Megatron path prefix, False for a domain of data.dir."""
    return "/" in key or os.sep in key or key.endswith(PREFIX_SUFFIXES)


def prefix_path(key: str) -> Path:
    """The absolute path prefix of a prefix key (.bin/.idx stripped, relative to the cwd)."""
    for suffix in PREFIX_SUFFIXES:
        if key.endswith(suffix):
            key = key[: -len(suffix)]
            break
    return Path(os.path.abspath(os.path.expanduser(key)))


def split_source(root: Path, key: str, split: str) -> SplitSource:
    if is_prefix_key(key):
        return SplitSource(key, prefix_path(key), True)
    return SplitSource(key, root / f"{key}_{split}", False)


def available_domains(root: Path) -> list[str]:
    return sorted(p.name[: -len("_train.idx")] for p in root.glob("*_train.idx"))


def check_split_exists(source: SplitSource, root: Path, field: str) -> None:
    """One line naming ``field`` when the source's .idx or .bin is missing."""
    for suffix in (".idx", ".bin"):
        path = Path(f"{source.prefix}{suffix}")
        problem = input_problem(path, "file")
        if problem is None:
            continue
        if source.is_prefix:
            raise DataError(f"data error: {field} names the path prefix {source.key!r} but {path} {problem}; "
                            "accepted the prefix of a .bin/.idx pair (Megatron's <name>_text_document) or a "
                            "domain of data.dir (a name without '/')")
        accepted = ", ".join(available_domains(root)) or "none found"
        hint = (f"; ./{source.key} would name the .bin/.idx pair in the current directory"
                if index_path(prefix_path(source.key)).is_file() else "")
        raise DataError(f"data error: {field} names domain {source.key!r} but {path} {problem}; "
                        f"domains in {root}: {accepted} (or a Megatron path prefix holding '/'){hint}")


def _dir_tokenizer(root: Path) -> Optional[Path]:
    """The tokenizer file data.dir holds, if any (without reading prepare.json)."""
    return next((root / n for n in TOKENIZER_FILES if (root / n).exists()), None) if root.is_dir() else None


def data_root(keys: Iterable[str], data: DataConfig) -> Optional[Path]:
    """data.dir, checked, when the run needs it (a domain key, or the tokenizer); None when every
    key is a Megatron prefix and data.tokenizer is set. Prefixes without data.tokenizer need a
    tokenizer in data.dir: the error then names data.tokenizer."""
    all_prefixes = all(is_prefix_key(k) for k in keys)
    if all_prefixes and data.tokenizer is not None:
        return None
    if all_prefixes and _dir_tokenizer(Path(data.dir)) is None:
        problem = input_problem(Path(data.dir), "directory") or "holds no tokenizer.model or tokenizer.json"
        raise DataError(f"data error: data.tokenizer is not set and data.dir = {data.dir!r} {problem}, so the "
                        "Megatron path prefixes in data.train / data.valid have no tokenizer; accepted "
                        "data.tokenizer = a tokenizer.model / tokenizer.json file or a directory holding one")
    return check_data_dir(data)


def check_data_dir(data: DataConfig) -> Path:
    root = Path(data.dir)
    problem = input_problem(root, "directory")
    if problem == "does not exist":
        raise DataError(f"data error: data.dir = {data.dir!r} does not exist; create it with "
                        f"`megareuse prepare --out {data.dir}` (or name Megatron path prefixes in data.train / "
                        "data.valid and set data.tokenizer)")
    if problem is not None:
        raise DataError(f"data error: data.dir = {data.dir!r} {problem}; accepted a directory "
                        "written by `megareuse prepare`")
    return root


def _prepare_info(root: Path) -> Optional[dict]:
    info_path = root / INFO_FILE
    if not info_path.is_file():
        return None
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"data error: {info_path} is not valid JSON ({str(exc).splitlines()[0]}); accepted the "
                        "prepare.json written by `megareuse prepare`") from None
    recorded = info.get("tokenizer_sha256") if isinstance(info, dict) else None
    name = info.get("tokenizer", "tokenizer.model") if isinstance(info, dict) else None
    if (not isinstance(info, dict) or (recorded is not None and not isinstance(recorded, str))
            or name not in TOKENIZER_FILES):
        raise DataError(f"data error: {info_path} is not a prepare.json object with a tokenizer_sha256 string and "
                        f"a tokenizer field in {', '.join(TOKENIZER_FILES)}; accepted the prepare.json written by "
                        "`megareuse prepare`")
    return info


def check_prepared_tokenizer(root: Path, tok_path: Path, sha256: str) -> None:
    """When the directory's prepare.json records the sha256 of the tokenizer file ``tok_path``
    is (by name), the file must be that one: a replaced tokenizer would train on ids it did not
    write."""
    info = _prepare_info(root)
    if info is None:
        return
    recorded = info.get("tokenizer_sha256")
    if info.get("tokenizer", "tokenizer.model") != tok_path.name or recorded in (None, sha256):
        return
    raise DataError(f"data error: {tok_path} has sha256 {sha256[:12]}... but {root / INFO_FILE} records "
                    f"tokenizer_sha256 {recorded[:12]}... (the token ids were written with another tokenizer); "
                    f"accepted the {tok_path.name} the directory was prepared with (prepare it again)")


def _load(path: Path, field: str, value: str) -> AnyTokenizer:
    try:
        return load_tokenizer(path, field=field)
    except TokenizerError as exc:
        message = str(exc).splitlines()[0]
        if not message.startswith(field):
            message = f"{field} = {value!r}: {message}"
        raise DataError(f"data error: {message}") from None


def open_tokenizer(data: DataConfig, root: Optional[Path]) -> TokenizerSource:
    """data.tokenizer when set, else data.dir's tokenizer (``root``; None when it was not opened)."""
    if data.tokenizer is not None:
        tok = _load(Path(data.tokenizer), "data.tokenizer", data.tokenizer)
        if root is not None and (root / INFO_FILE).is_file():
            recorded = (_prepare_info(root) or {}).get("tokenizer_sha256")
            if recorded not in (None, tok.sha256):
                log.warning("data.tokenizer %s (sha256 %s...) is not the tokenizer %s was prepared with (%s...); "
                            "data.tokenizer wins", tok.path, tok.sha256[:12], root, recorded[:12])
        return TokenizerSource(tok, Path(tok.path), "data.tokenizer")
    if root is None:
        raise DataError("data error: data.tokenizer is not set and data.dir was not opened; accepted "
                        "data.tokenizer = a tokenizer.model / tokenizer.json file or a directory holding one")
    info = _prepare_info(root)
    names = [info["tokenizer"]] if info is not None and "tokenizer" in info else list(TOKENIZER_FILES)
    found = next((root / n for n in names if (root / n).exists()), None)
    if found is None:
        raise DataError(f"data error: data.dir = {str(root)!r} has no {' or '.join(names)} and data.tokenizer is not "
                        "set; accepted a directory written by `megareuse prepare`, or data.tokenizer = a "
                        "tokenizer.model / tokenizer.json file or a directory holding one")
    problem = input_problem(found, "file")
    if problem is not None:
        raise DataError(f"data error: {found} {problem}; accepted a tokenizer.model / tokenizer.json file")
    tok = _load(found, "data.dir", str(root))
    check_prepared_tokenizer(root, found, tok.sha256)
    return TokenizerSource(tok, found, "data.dir")


def check_ids_fit(source: SplitSource, field: str, ids: Optional[tuple[int, int]], tok: TokenizerSource) -> None:
    """Token ids must lie in the tokenizer's range: ids beyond it mean another tokenizer wrote them."""
    size = tok.tokenizer.vocab_size
    if ids is not None and (ids[0] < 0 or ids[1] >= size):
        raise DataError(f"data error: {field} = {source.key!r}: {source.prefix}.bin holds token ids "
                        f"{ids[0]}..{ids[1]} but the tokenizer {tok.file} ({tok.origin}) has {size} (accepted "
                        f"ids 0..{size - 1}); was it prepared with another tokenizer? (set data.tokenizer to it)")


__all__ = ["DataError", "SplitSource", "TokenizerSource", "available_domains", "check_data_dir",
           "check_ids_fit", "check_prepared_tokenizer", "check_split_exists", "is_prefix_key",
           "data_root", "open_tokenizer", "prefix_path", "split_source"]
