"""megareuse_kernels: fused Triton kernels for megareuse (import name `megareuse_kernels`).

The kernels run on CUDA GPUs, and on CPU under the Triton interpreter (TRITON_INTERPRET=1,
set before triton is imported), which is how the test suite checks them without a GPU.
"""
from __future__ import annotations

import importlib.util
import os


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
