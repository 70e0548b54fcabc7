"""The error of the Hugging Face interop (a module of its own, so hf.py and hf_data.py, which
both raise it, import each other in one direction only)."""


class HFError(ValueError):
    """An HF directory or checkpoint cannot be converted; the message is one line."""
