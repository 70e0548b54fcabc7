"""megareuse_kernels: fused Triton kernels for megareuse (import name `megareuse_kernels`).

The kernels run on CUDA GPUs, and on CPU under the Triton interpreter (TRITON_INTERPRET=1,
set before triton is imported), which is how the test suite checks them without a GPU.

Importing this package does not import triton; the public functions below load their module
(and triton) on first use:

- ``flash_attention(q, k, v, causal=True, softmax_scale=None)``   (flash_attention.py)
- ``rms_norm(x, weight, eps)``                                      (rmsnorm.py)
- ``swiglu(gate, up)``                                              (swiglu.py)
- ``apply_rope(x, cos, sin, inplace=False)``                        (rope.py)
- ``cross_entropy(logits, targets)``, ``linear_cross_entropy(hidden, weight, targets, ...)``
                                                                    (cross_entropy.py)
- ``set_fused_kernels(model, mode)`` and per-op dispatch             (select.py, no triton import)
"""
from __future__ import annotations

import importlib
import importlib.util
import os

_LAZY = {
    "flash_attention": "flash_attention",
    "rms_norm": "rmsnorm",
    "swiglu": "swiglu",
    "apply_rope": "rope",
    "cross_entropy": "cross_entropy",
    "linear_cross_entropy": "cross_entropy",
    "set_fused_kernels": "select",
    "poison_outputs": "common",
}

__all__ = ["triton_status", *_LAZY]


def triton_status() -> tuple[bool, str]:
    """(usable, reason): whether Triton kernels can run in this process, and why not."""
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install triton)"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, "Triton interpreter (TRITON_INTERPRET=1, CPU)"
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA device (set TRITON_INTERPRET=1 to run kernels on CPU, slowly)"
    return True, f"CUDA device {torch.cuda.get_device_name()}"


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
