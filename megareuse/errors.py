"""The one base class of user errors: a bad input or request, which a command reports as one line
naming the field and the accepted values, with exit code 2 (megareuse/exits.py).

Each part of the package raises its own subclass (ConfigError, DataError, CheckpointError,
LawError, SweepError, ...), usually also a ValueError or RuntimeError as before; ``exits.guarded``
catches them all by this base, so it imports none of the parts.
"""
from __future__ import annotations


class UserError(Exception):
    """A bad input or request (exit code 2, one line)."""
