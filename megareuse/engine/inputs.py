"""Open a prepared data directory for training: tokenizer, training blend, validation sets.

Everything here is checked before a run writes anything: the directory, the tokenizer, each
domain's train/valid files (their integrity is checked by IndexedDataset), the vocabulary fit.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Union

from megareuse.config import DataConfig, ModelConfig
from megareuse.data import BlendedDataset, CorruptDatasetError, GPTDataset, IndexedDataset, Tokenizer


class DataError(ValueError):
    """The data directory does not hold what the config asks for."""


@dataclass
class TrainingData:
    tokenizer: Tokenizer
    train: Union[GPTDataset, BlendedDataset]
    valid: dict[str, GPTDataset]
    train_tokens_available: dict[str, int]


def _available_domains(root: Path) -> list[str]:
    return sorted(p.name[: -len("_train.idx")] for p in root.glob("*_train.idx"))


def _open_split(root: Path, domain: str, split: str, field: str) -> IndexedDataset:
    prefix = root / f"{domain}_{split}"
    if not prefix.with_suffix(".idx").is_file():
        accepted = ", ".join(_available_domains(root)) or "none found"
        raise DataError(f"data error: {field} names domain {domain!r} but {prefix}.idx does not "
                        f"exist; domains in {root}: {accepted}")
    try:
        return IndexedDataset(str(prefix))
    except CorruptDatasetError as exc:
        raise DataError(f"data error: {exc}") from None


def open_training_data(data: DataConfig, model: ModelConfig) -> TrainingData:
    root = Path(data.dir)
    if not root.is_dir():
        raise DataError(f"data error: data.dir = {data.dir!r} does not exist; "
                        f"create it with `megareuse prepare --out {data.dir}`")
    tok_path = root / "tokenizer.model"
    if not tok_path.is_file():
        raise DataError(f"data error: data.dir = {data.dir!r} has no tokenizer.model; "
                        f"accepted a directory written by `megareuse prepare`")
    tokenizer = Tokenizer(str(tok_path))
    if tokenizer.vocab_size > model.vocab_size:
        raise DataError(f"data error: model.vocab_size = {model.vocab_size} is smaller than the "
                        f"tokenizer's vocabulary ({tokenizer.vocab_size}) in {tok_path}; accepted "
                        f">= {tokenizer.vocab_size}")
    train_sets, weights, available = [], [], {}
    for i, (domain, weight) in enumerate(data.train.items()):
        indexed = _open_split(root, domain, "train", f"data.train.{domain}")
        available[domain] = int(indexed.sizes.sum())
        try:
            train_sets.append(GPTDataset(indexed, data.seq_len, seed=data.seed + i))
        except ValueError as exc:
            raise DataError(f"data error: {domain}_train: {exc}") from None
        weights.append(float(weight))
    train = train_sets[0] if len(train_sets) == 1 else BlendedDataset(train_sets, weights)
    valid = {}
    for domain in data.valid:
        indexed = _open_split(root, domain, "valid", "data.valid")
        try:
            valid[domain] = GPTDataset(indexed, data.seq_len, seed=0)
        except ValueError as exc:
            raise DataError(f"data error: {domain}_valid: {exc}") from None
    return TrainingData(tokenizer, train, valid, available)
