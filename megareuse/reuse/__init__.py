"""Reusing a trained model in stage 2.

- ``growth``: growth operators on (ModelConfig, full state dict) pairs (``grow_width``,
  ``stack_depth``, ``insert_identity``, their composition ``grow``) and ``grow_checkpoint``, which
  grows a checkpoint directory into a new one (see docs/growth.md).

The public names below load lazily on first access, so importing a light submodule of this
package does not import torch.
"""
from __future__ import annotations

from megareuse._lazy import lazy_exports


_EXPORTS = {
    "growth": ["grow", "grow_width", "stack_depth", "insert_identity", "grow_checkpoint", "describe_growth",
               "parse_layer_map"],
}
__all__, __getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
