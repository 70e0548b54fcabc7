"""The error of data preparation (a module of its own: sources, streaming and preprocess all raise it)."""
from megareuse.errors import UserError


class PrepareError(UserError, ValueError):
    """Bad input to prepare, or a prepared directory that cannot be used (one line)."""
