"""Open a prepared data directory for training: tokenizer, training blend, validation sets.

Everything here is checked before a run writes anything: the directory, the tokenizer, each
domain's train/valid files (their integrity is checked by IndexedDataset), the vocabulary fit.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from megareuse.config import DataConfig, ModelConfig
from megareuse.data import BlendedDataset, CorruptDatasetError, GPTDataset, IndexedDataset, Tokenizer
from megareuse.data.preprocess import INFO_FILE
from megareuse.paths import input_problem


class DataError(ValueError):
    """The data directory does not hold what the config asks for."""


@dataclass
class TrainingData:
    tokenizer: Tokenizer
    train: Union[GPTDataset, BlendedDataset]
    train_domains: list[str]  # in the blend's dataset order
    valid: dict[str, GPTDataset]
    train_tokens_available: dict[str, int]

    def samples_per_domain(self, samples: int) -> dict[str, int]:
        """How many of the first ``samples`` training samples came from each domain."""
        if isinstance(self.train, BlendedDataset):
            return {d: int(c) for d, c in zip(self.train_domains, self.train.counts(samples))}
        return {self.train_domains[0]: samples}


def _available_domains(root: Path) -> list[str]:
    return sorted(p.name[: -len("_train.idx")] for p in root.glob("*_train.idx"))


def _open_split(root: Path, domain: str, split: str, field: str, vocab_size: int) -> IndexedDataset:
    prefix = root / f"{domain}_{split}"
    if not prefix.with_suffix(".idx").is_file():
        accepted = ", ".join(_available_domains(root)) or "none found"
        raise DataError(f"data error: {field} names domain {domain!r} but {prefix}.idx does not "
                        f"exist; domains in {root}: {accepted}")
    try:
        indexed = IndexedDataset(str(prefix))
        ids = indexed.token_range()
    except CorruptDatasetError as exc:
        raise DataError(f"data error: {exc}") from None
    if ids is not None and (ids[0] < 0 or ids[1] >= vocab_size):
        raise DataError(f"data error: {prefix}.bin holds token ids {ids[0]}..{ids[1]} but the tokenizer "
                        f"in {root} has {vocab_size} (accepted ids 0..{vocab_size - 1}); was it "
                        "prepared with another tokenizer?")
    return indexed


def _open_tokenizer(root: Path, field: str) -> Tokenizer:
    tok_path = root / "tokenizer.model"
    problem = input_problem(tok_path, "file")
    if problem == "does not exist":
        raise DataError(f"data error: {field} = {str(root)!r} has no tokenizer.model; "
                        f"accepted a directory written by `megareuse prepare`")
    if problem is not None:
        raise DataError(f"data error: {tok_path} {problem}; accepted a sentencepiece tokenizer.model file")
    try:
        tokenizer = Tokenizer(str(tok_path))
    except ValueError as exc:
        raise DataError(f"data error: {str(exc).splitlines()[0]}; accepted the tokenizer.model "
                        "written by `megareuse prepare` (or any sentencepiece model)") from None
    _check_prepared_tokenizer(root, tok_path, tokenizer.sha256)
    return tokenizer


def _check_prepared_tokenizer(root: Path, tok_path: Path, sha256: str) -> None:
    """When the directory's prepare.json records the tokenizer's sha256, tokenizer.model must be
    that file: a replaced tokenizer would train on ids it did not write."""
    info_path = root / INFO_FILE
    if not info_path.is_file():
        return
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"data error: {info_path} is not valid JSON ({str(exc).splitlines()[0]}); accepted the "
                        "prepare.json written by `megareuse prepare`") from None
    recorded = info.get("tokenizer_sha256") if isinstance(info, dict) else None
    if not isinstance(info, dict) or (recorded is not None and not isinstance(recorded, str)):
        raise DataError(f"data error: {info_path} is not a prepare.json object with a tokenizer_sha256 string; "
                        "accepted the prepare.json written by `megareuse prepare`")
    if info.get("tokenizer", "tokenizer.model") != "tokenizer.model" or recorded in (None, sha256):
        return
    raise DataError(f"data error: {tok_path} has sha256 {sha256[:12]}... but {info_path} records "
                    f"tokenizer_sha256 {recorded[:12]}... (the token ids were written with another tokenizer); "
                    "accepted the tokenizer.model the directory was prepared with (prepare it again)")


def open_training_data(data: DataConfig, model: ModelConfig,
                       train_weights: dict[str, float] | None = None) -> TrainingData:
    """Open the tokenizer, the training blend (``train_weights`` or ``data.train``) and the
    validation sets, checking each."""
    root = Path(data.dir)
    problem = input_problem(root, "directory")
    if problem == "does not exist":
        raise DataError(f"data error: data.dir = {data.dir!r} does not exist; "
                        f"create it with `megareuse prepare --out {data.dir}`")
    if problem is not None:
        raise DataError(f"data error: data.dir = {data.dir!r} {problem}; accepted a directory "
                        "written by `megareuse prepare`")
    tokenizer = _open_tokenizer(root, "data.dir")
    if tokenizer.vocab_size > model.vocab_size:
        raise DataError(f"data error: model.vocab_size = {model.vocab_size} is smaller than the "
                        f"tokenizer's vocabulary ({tokenizer.vocab_size}) in {root / 'tokenizer.model'}; "
                        f"accepted >= {tokenizer.vocab_size}")
    train_sets, weights, available = [], [], {}
    blend = data.train if train_weights is None else train_weights
    for i, (domain, weight) in enumerate(blend.items()):
        field = f"data.train.{domain}" if domain in data.train else f"data.replay (base domain {domain})"
        indexed = _open_split(root, domain, "train", field, tokenizer.vocab_size)
        available[domain] = int(indexed.sizes.sum())
        try:
            train_sets.append(GPTDataset(indexed, data.seq_len, seed=data.seed + i))
        except ValueError as exc:
            raise DataError(f"data error: {domain}_train: {exc}") from None
        weights.append(float(weight))
    train = train_sets[0] if len(train_sets) == 1 else BlendedDataset(train_sets, weights)
    valid = {}
    for domain in data.valid:
        indexed = _open_split(root, domain, "valid", "data.valid", tokenizer.vocab_size)
        try:
            valid[domain] = GPTDataset(indexed, data.seq_len, seed=0)
        except ValueError as exc:
            raise DataError(f"data error: {domain}_valid: {exc}") from None
    return TrainingData(tokenizer, train, list(blend), valid, available)
