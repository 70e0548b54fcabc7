"""Interoperability with other checkpoint formats.

``megareuse.interop.hf``: Hugging Face Llama-style checkpoints (config.json + safetensors) to and
from megareuse checkpoints, streamed tensor by tensor; ``megareuse.interop.hf_data``: data
preparation with an existing (imported) tokenizer; ``megareuse.interop.hf_cli``: the
``import-hf``, ``export-hf`` and ``prepare-hf`` subcommands. Neither imports ``transformers``:
only ``safetensors`` is needed (and ``tokenizers`` for tokenizer.json-only models). Names load
lazily, so registering the subcommands (every ``megareuse`` call) does not import torch.
"""
from megareuse._lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, globals(), {
    "errors": ["HFError"],
    "hf": ["export_hf", "hf_config_from_model", "import_hf", "model_config_from_hf"],
})
