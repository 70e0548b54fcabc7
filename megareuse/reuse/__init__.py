"""Reusing a trained model in stage 2.

- ``growth``: growth operators on (ModelConfig, full state dict) pairs (``grow_width``,
  ``stack_depth``, ``insert_identity``, their composition ``grow``) and ``grow_checkpoint``, which
  grows a checkpoint directory into a new one (see docs/growth.md).

The public names below load lazily on first access, so importing a light submodule of this
package does not import torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "growth": ["grow", "grow_width", "stack_depth", "insert_identity", "grow_checkpoint", "describe_growth",
               "parse_layer_map"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = list(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
