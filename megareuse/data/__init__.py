"""Data pipeline: corpora -> tokenizer -> Megatron indexed datasets -> fixed-length shuffled
samples -> weighted blends. Names load lazily: preparing data never imports torch (only the
sample datasets, blend and dataset, need it)."""
from megareuse._lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, globals(), {
    "blend": ["BlendedDataset"],
    "corpora": ["DOMAINS", "CorpusError", "build_code", "build_prose"],
    "dataset": ["GPTDataset"],
    "errors": ["PrepareError"],
    "indexed": ["CorruptDatasetError", "IndexedDataset", "IndexedDatasetBuilder", "best_dtype",
                "data_path", "index_path"],
    "preprocess": ["domain_prefix", "load_prepared", "open_domain", "prepare", "prepare_default"],
    "tokenizer": ["Tokenizer", "train_tokenizer"],
})
