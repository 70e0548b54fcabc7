"""Which implementation runs each fused op: Triton, apex, or plain torch; each choice logged once.

Modes (``MODES``), as set on the model modules (``kernels`` attribute) or passed in:

- ``torch``: never a fused kernel (the default; the CPU path of the model is untouched).
- ``triton``: the Triton kernel whenever the inputs are supported (CUDA tensors, or CPU tensors
  under TRITON_INTERPRET=1); unsupported inputs (a head dim other than 64/128, fp64, ...) fall
  back to torch / SDPA with a warning giving the reason, logged once. No verification: an
  explicit opt-in (kernel development, benchmarks, the kernel tests) gets the kernel itself,
  never a silent replacement.
- ``auto``: the Triton kernel for CUDA tensors when triton imports, the inputs are supported and
  the kernel passed its one-time check against a float64 reference on that device, dtype and
  shape class (``verify.py``; a failure is one WARNING line and the torch path from then on);
  otherwise apex's fused op where one exists and apex is importable (RMSNorm, only when Triton
  cannot run or refuses the input); otherwise torch / SDPA. CPU tensors always take the torch
  path (the interpreter is for tests, not speed).

Every function here returns None (or False) to mean "use the torch path"; callers keep that path
themselves, so importing this module (and the model) never imports triton.
"""
from __future__ import annotations

import functools
import importlib
import logging

import torch
from torch import nn

from megareuse_kernels.common import FLOAT_DTYPES, log_once

MODES = ("torch", "triton", "auto")
# the loss head's check vocabulary when the caller does not say (two vocabulary blocks of the
# CUDA kernel and a ragged tail)
DEFAULT_CHECK_VOCAB = 4099


@functools.lru_cache(maxsize=None)
def _triton_ok() -> tuple[bool, str]:
    from megareuse_kernels import triton_status

    return triton_status()


def check_mode(mode: str, what: str = "kernels") -> str:
    """Validate a mode name (ValueError listing the accepted ones)."""
    if mode not in MODES:
        raise ValueError(f"{what}: unknown kernel mode {mode!r}; accepted: {', '.join(MODES)}")
    return mode


def require_triton(what: str) -> None:
    """ValueError naming ``what`` when Triton kernels cannot run in this process at all."""
    ok, reason = _triton_ok()
    if not ok:
        raise ValueError(f"{what} needs Triton kernels, which cannot run here: {reason}; "
                         "use 'sdpa' or 'auto' instead")


def use_triton(mode: str, op: str, t: torch.Tensor) -> bool:
    """Whether ``op`` should try its Triton kernel for tensor ``t`` under ``mode``."""
    if mode == "torch":
        return False
    if mode == "auto" and t.device.type != "cuda":
        log_once(f"{op} [auto]: torch path for {t.device.type} tensors (Triton is used on CUDA only)")
        return False
    ok, reason = _triton_ok()
    if not ok:
        log_once(f"{op} [{mode}]: torch path: {reason}",
                 logging.WARNING if mode == "triton" else logging.INFO)
    return ok


def _verified(mode: str, op: str, t: torch.Tensor, key: tuple) -> bool:
    """``auto`` mode: whether ``op``'s kernel passed its one-time check on ``t``'s device and dtype
    for ``key`` (``verify.verified``: run, logged and cached on first use). Other modes: True."""
    if mode != "auto":
        return True
    from megareuse_kernels import verify

    return verify.verified(op, t.device, t.dtype, key)


def _fallback(mode: str, op: str, reason: str, to: str = "torch") -> None:
    log_once(f"{op} [{mode}]: {to} path: {reason}", logging.WARNING if mode == "triton" else logging.INFO)


def _chose(mode: str, op: str, impl: str, t: torch.Tensor) -> None:
    log_once(f"{op} [{mode}]: {impl} on {t.device.type} ({str(t.dtype).replace('torch.', '')})")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, mode: str) -> torch.Tensor | None:
    """Triton flash attention, or None (caller uses SDPA)."""
    if not use_triton(mode, "attention", q):
        return None
    from megareuse_kernels import flash_attention as fa

    reason = fa.unsupported_reason(q, k, v, causal)
    if reason is not None:
        _fallback(mode, "attention", reason, to="sdpa")
        return None
    if not _verified(mode, "attention", q, (q.shape[-1], q.shape[1] // k.shape[1], bool(causal))):
        return None
    _chose(mode, "attention", "Triton flash attention", q)
    return fa.flash_attention(q, k, v, causal)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mode: str) -> torch.Tensor | None:
    """Fused RoPE (out of place), or None."""
    if not use_triton(mode, "rope", x):
        return None
    from megareuse_kernels import rope as kr

    reason = kr.unsupported_reason(x, cos, sin)
    if reason is not None:
        _fallback(mode, "rope", reason)
        return None
    if not _verified(mode, "rope", x, (x.shape[-1], cos.dtype)):
        return None
    _chose(mode, "rope", "Triton fused rope", x)
    return kr.apply_rope(x, cos, sin)


def swiglu(gate: torch.Tensor, up: torch.Tensor, mode: str) -> torch.Tensor | None:
    """Fused silu(gate) * up, or None."""
    if not use_triton(mode, "swiglu", gate):
        return None
    from megareuse_kernels import swiglu as ks

    reason = ks.unsupported_reason(gate, up)
    if reason is not None:
        _fallback(mode, "swiglu", reason)
        return None
    if not _verified(mode, "swiglu", gate, (gate.shape[-1],)):
        return None
    _chose(mode, "swiglu", "Triton fused swiglu", gate)
    return ks.swiglu(gate, up)


@functools.lru_cache(maxsize=None)
def apex_rms_norm():
    """apex's ``fused_rms_norm_affine`` when apex (with its CUDA extension) imports, else None."""
    try:
        module = importlib.import_module("apex.normalization.fused_layer_norm")
        return module.fused_rms_norm_affine
    except Exception:  # not installed, or built without its CUDA extensions
        return None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, mode: str) -> torch.Tensor | None:
    """Fused RMSNorm (Triton, else apex in ``auto`` mode on CUDA), or None. A Triton kernel that
    failed its check goes to torch, not apex: the one logged line says what runs instead."""
    if use_triton(mode, "rms_norm", x):
        from megareuse_kernels import rmsnorm as kn

        reason = kn.unsupported_reason(x, weight)
        if reason is not None:
            _fallback(mode, "rms_norm", reason)
        elif not _verified(mode, "rms_norm", x, (x.shape[-1], weight.dtype)):
            return None
        else:
            _chose(mode, "rms_norm", "Triton fused rms_norm", x)
            return kn.rms_norm(x, weight, eps)
    if mode == "auto" and x.device.type == "cuda":
        fused = apex_rms_norm()
        if fused is not None:
            _chose(mode, "rms_norm", "apex FusedRMSNorm", x)
            return fused(x, weight, weight.shape, eps)
        log_once("rms_norm [auto]: apex is not importable; torch rms_norm")
    return None


def fused_loss(hidden: torch.Tensor, vocab: int | None = None) -> bool:
    """Whether the loss head's ``auto`` takes the Triton linear + cross-entropy for ``hidden``
    [..., d]: a float CUDA tensor with Triton usable, and the kernel passed its check on that
    device and dtype for a vocabulary (shard) of ``vocab`` rows (``DEFAULT_CHECK_VOCAB`` when
    not given). False means the torch chunked (or plain) loss."""
    if hidden.dtype not in FLOAT_DTYPES or not use_triton("auto", "linear cross entropy", hidden):
        return False
    return _verified("auto", "linear_cross_entropy", hidden, (int(vocab or DEFAULT_CHECK_VOCAB),))


def set_fused_kernels(model: nn.Module, mode: str) -> nn.Module:
    """Set ``kernels = mode`` on every submodule that has a ``kernels`` attribute (RMSNorm,
    FeedForward, Attention's RoPE) and return the model. Attention's score/softmax kernel itself
    follows ``ModelConfig.attention``."""
    check_mode(mode)
    for module in model.modules():
        if hasattr(module, "kernels"):
            module.kernels = mode
    return model
