"""Interoperability with other checkpoint formats.

``megareuse.interop.hf``: Hugging Face Llama-style checkpoints (config.json + safetensors) to and
from megareuse checkpoints, streamed tensor by tensor; ``megareuse.interop.hf_data``: data
preparation with an existing (imported) tokenizer; ``megareuse.interop.hf_cli``: the
``import-hf``, ``export-hf`` and ``prepare-hf`` subcommands. Neither imports ``transformers``:
only ``safetensors`` is needed (and ``tokenizers`` for tokenizer.json-only models).
"""
from megareuse.interop.hf import HFError, export_hf, hf_config_from_model, import_hf, model_config_from_hf

__all__ = ["HFError", "export_hf", "hf_config_from_model", "import_hf", "model_config_from_hf"]
