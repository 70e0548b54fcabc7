"""Open the data a run names for training: tokenizer, training blend, validation sets (evaluation
opens the tokenizer and validation sets alone, never a training split).

Everything here is checked before a run writes anything: each ``data.train`` / ``data.valid``
key (a domain of ``data.dir`` or a Megatron path prefix, see ``megareuse.engine.data_sources``),
the tokenizer (``data.tokenizer`` or data.dir's tokenizer.model / tokenizer.json), each split's
files (their integrity is checked by IndexedDataset), the vocabulary fit.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from megareuse.config import DataConfig, ModelConfig
from megareuse.data import BlendedDataset, CorruptDatasetError, GPTDataset, IndexedDataset
from megareuse.data.hf_tokenizer import AnyTokenizer
from megareuse.engine.data_sources import (DataError, TokenizerSource, check_ids_fit, check_prepared_tokenizer,
                                           check_split_exists, data_root, open_tokenizer, split_source)

__all__ = ["DataError", "TrainingData", "check_prepared_tokenizer", "open_training_data", "open_validation_data",
           "tokenizer_files"]


@dataclass
class TrainingData:
    tokenizer: AnyTokenizer
    train: Union[GPTDataset, BlendedDataset]
    train_domains: list[str]  # in the blend's dataset order
    valid: dict[str, GPTDataset]
    train_tokens_available: dict[str, int]
    tokenizer_source: Optional[TokenizerSource] = None  # the file (its name) and where it came from

    @property
    def tokenizer_file(self) -> Path:
        """The tokenizer file: checkpoints copy it under this name (tokenizer.model / .json)."""
        return self.tokenizer_source.file if self.tokenizer_source else Path(self.tokenizer.path)

    def samples_per_domain(self, samples: int) -> dict[str, int]:
        """How many of the first ``samples`` training samples came from each domain."""
        if isinstance(self.train, BlendedDataset):
            return {d: int(c) for d, c in zip(self.train_domains, self.train.counts(samples))}
        return {self.train_domains[0]: samples}


def tokenizer_files(file: Path) -> dict[str, Path]:
    """What a checkpoint copies of the tokenizer ``file`` (name -> source): the file under its own
    name (tokenizer.model or tokenizer.json), and the tokenizer_config.json beside a
    tokenizer.json (it names the end-of-text token)."""
    name = "tokenizer.json" if file.suffix == ".json" else "tokenizer.model"
    files = {name: file}
    config = file.with_name("tokenizer_config.json")
    if name == "tokenizer.json" and config.is_file():
        files[config.name] = config
    return files


def _open_split(root: Path, key: str, split: str, field: str, tok: TokenizerSource) -> IndexedDataset:
    source = split_source(root, key, split)
    check_split_exists(source, root, field)
    try:
        indexed = IndexedDataset(str(source.prefix))
        ids = indexed.token_range()
    except CorruptDatasetError as exc:
        raise DataError(f"data error: {field} = {key!r}: {exc}") from None
    check_ids_fit(source, field, ids, tok)
    return indexed


def _open_tokenizer(data: DataConfig, model: ModelConfig, keys: list[str]) -> tuple[Path, TokenizerSource]:
    """The root of the domain ``keys`` (data.dir) and the tokenizer, checked against the model."""
    opened = data_root(keys, data)  # None: prefixes only, data.tokenizer set
    tok = open_tokenizer(data, opened)
    if tok.tokenizer.vocab_size > model.vocab_size:
        raise DataError(f"data error: model.vocab_size = {model.vocab_size} is smaller than the "
                        f"tokenizer's vocabulary ({tok.tokenizer.vocab_size}) in {tok.file} ({tok.origin}); "
                        f"accepted >= {tok.tokenizer.vocab_size}")
    return (Path(data.dir) if opened is None else opened), tok


def _open_valid(root: Path, data: DataConfig, tok: TokenizerSource) -> dict[str, GPTDataset]:
    valid = {}
    for domain in data.valid:
        indexed = _open_split(root, domain, "valid", "data.valid", tok)
        try:
            valid[domain] = GPTDataset(indexed, data.seq_len, seed=0)
        except ValueError as exc:
            raise DataError(f"data error: data.valid = {domain!r} (valid split): {exc}") from None
    return valid


def open_validation_data(data: DataConfig, model: ModelConfig) -> tuple[TokenizerSource, dict[str, GPTDataset]]:
    """Open the tokenizer and the validation sets alone (what evaluation reads), checking each:
    the training splits are not opened."""
    root, tok = _open_tokenizer(data, model, data.valid)
    return tok, _open_valid(root, data, tok)


def open_training_data(data: DataConfig, model: ModelConfig,
                       train_weights: dict[str, float] | None = None) -> TrainingData:
    """Open the tokenizer, the training blend (``train_weights`` or ``data.train``) and the
    validation sets, checking each."""
    blend = data.train if train_weights is None else train_weights
    root, tok = _open_tokenizer(data, model, [*blend, *data.valid])
    train_sets, weights, available = [], [], {}
    for i, (domain, weight) in enumerate(blend.items()):
        field = f"data.train.{domain}" if domain in data.train else f"data.replay (base domain {domain})"
        indexed = _open_split(root, domain, "train", field, tok)
        available[domain] = int(indexed.sizes.sum())
        try:
            train_sets.append(GPTDataset(indexed, data.seq_len, seed=data.seed + i))
        except ValueError as exc:
            raise DataError(f"data error: {field} = {domain!r} (train split): {exc}") from None
        weights.append(float(weight))
    train = train_sets[0] if len(train_sets) == 1 else BlendedDataset(train_sets, weights)
    return TrainingData(tok.tokenizer, train, list(blend), _open_valid(root, data, tok), available, tok)
