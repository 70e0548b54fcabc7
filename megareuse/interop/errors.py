"""The error of the Hugging Face interop (a module of its own, so hf.py and hf_data.py, which
both raise it, import each other in one direction only). It subclasses ``TokenizerError``, the
error ``megareuse.data.hf_tokenizer`` raises for a bad tokenizer file: ``except TokenizerError``
(or ValueError) catches both."""
from megareuse.data.hf_tokenizer import TokenizerError


class HFError(TokenizerError):
    """An HF directory or checkpoint cannot be converted; the message is one line."""
