"""Data pipeline: corpora -> sentencepiece tokenizer -> Megatron indexed datasets ->
fixed-length shuffled samples -> weighted blends."""
from .blend import BlendedDataset
from .corpora import DOMAINS, CorpusError, build_code, build_prose
from .dataset import GPTDataset
from .indexed import (CorruptDatasetError, IndexedDataset, IndexedDatasetBuilder, best_dtype,
                      data_path, index_path)
from .preprocess import (PrepareError, domain_prefix, load_prepared, open_domain, prepare,
                         prepare_default)
from .tokenizer import Tokenizer, train_tokenizer

__all__ = [
    "BlendedDataset", "CorpusError", "CorruptDatasetError", "DOMAINS", "GPTDataset",
    "IndexedDataset", "IndexedDatasetBuilder", "PrepareError", "Tokenizer", "best_dtype",
    "build_code", "build_prose", "data_path", "domain_prefix", "index_path", "load_prepared",
    "open_domain", "prepare", "prepare_default", "train_tokenizer",
]
