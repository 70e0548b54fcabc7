"""Shared helpers of the Triton kernels: input checks, output allocation, logging once.

Nothing here imports triton, so the selection logic (``select.py``) can ask questions about
the environment without paying for (or requiring) a triton import.

Output poisoning: tests call ``poison_outputs(True)`` so that every buffer a kernel is meant to
fill completely is allocated pre-filled with NaN instead of left uninitialised; an element the
kernel forgets to write then stays NaN and fails the comparison against the reference.
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch

LOG = logging.getLogger("megareuse.kernels")
_POISON = False
_LOGGED: set[str] = set()

HALF_DTYPES = (torch.float16, torch.bfloat16)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    """True when Triton runs kernels on CPU through its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def poison_outputs(enabled: bool) -> None:
    """Pre-fill kernel outputs with NaN (tests) instead of leaving them uninitialised."""
    global _POISON
    _POISON = bool(enabled)


@contextmanager
def poisoned_outputs() -> Iterator[None]:
    """Context manager form of ``poison_outputs(True)``, restoring the previous setting."""
    previous = _POISON
    poison_outputs(True)
    try:
        yield
    finally:
        poison_outputs(previous)


def new_output(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A buffer the kernel writes in full: NaN-filled when poisoning, else uninitialised."""
    if _POISON:
        return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)
    return torch.empty(tuple(shape), dtype=dtype, device=device)


def new_output_like(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Like ``new_output`` but with ``t``'s shape and memory layout (strides preserved)."""
    if _POISON:
        return torch.full_like(t, float("nan"), dtype=dtype)
    return torch.empty_like(t, dtype=dtype)


def log_once(message: str, level: int = logging.INFO) -> None:
    """Log ``message`` the first time it is seen in this process (backend choices, fallbacks)."""
    if message not in _LOGGED:
        _LOGGED.add(message)
        LOG.log(level, message)


def device_reason(t: torch.Tensor, what: str) -> str | None:
    """Why ``t`` cannot go to a Triton kernel because of its device or dtype, or None if it can."""
    if t.device.type == "cuda":
        return None
    if t.device.type == "cpu" and interpreting():
        if t.dtype == torch.bfloat16:
            return (f"{what}: bfloat16 is not supported by the Triton interpreter (TRITON_INTERPRET=1); "
                    "use float16 or float32 on CPU")
        return None
    return (f"{what}: device {t.device.type} is not supported; Triton kernels need a CUDA tensor "
            "(or a CPU tensor with TRITON_INTERPRET=1 set before triton is imported)")


def dtype_reason(t: torch.Tensor, what: str, accepted: Sequence[torch.dtype] = FLOAT_DTYPES) -> str | None:
    """Why ``t``'s dtype is not accepted, or None."""
    if t.dtype in accepted:
        return None
    names = ", ".join(str(d).replace("torch.", "") for d in accepted)
    return f"{what}: dtype {str(t.dtype).replace('torch.', '')} is not supported; accepted: {names}"


def check(*reasons: str | None) -> None:
    """Raise ValueError with the first non-None reason."""
    for reason in reasons:
        if reason is not None:
            raise ValueError(reason)


def check_tensor(t: torch.Tensor, what: str, accepted: Sequence[torch.dtype] = FLOAT_DTYPES) -> None:
    """ValueError unless ``t`` is a float tensor of an accepted dtype on a usable device."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{what}: expected a torch.Tensor, got {type(t).__name__}")
    check(dtype_reason(t, what, accepted), device_reason(t, what))


def rows_2d(x: torch.Tensor) -> torch.Tensor:
    """View ``x`` [..., N] as [M, N] with unit stride on the last dimension (copying if needed)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def multiprocessor_count(device: torch.device) -> int:
    """Number of SMs of a CUDA device (used to size persistent grids); 4 in the interpreter."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (n >= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()
