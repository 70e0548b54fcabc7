"""Verification on first use: in ``auto`` mode a Triton kernel runs on a device only after it has
matched a float64 torch reference there once.

Why: the kernels are tested on CPU under the Triton interpreter, which is neither the compiler
nor the hardware they run on in training. A kernel that miscompiles, crashes or loses precision
on a new GPU, driver or Triton version would otherwise silently corrupt a long run. So the first
time the selection (``select.py``, and the loss head's ``auto``) asks for an op on a (device,
dtype, shape key), ``verified`` runs the kernel's forward and backward on that device on a small
random input of the same shape class as the model's (same head dim and GQA group, hidden size,
FFN width, vocabulary), compares every output and gradient with float64 arithmetic written here
(not the model's code), caches the verdict for the process and logs one line on the logger
``megareuse.kernels``: INFO when the kernel passed, WARNING naming the op, device, dtype and the
worst error (or the exception) when it did not. A failed key then takes the torch path (SDPA for
attention, the chunked loss for cross-entropy) for the rest of the process.

The metric is the kernel tests' one: max |got - ref| / max |ref| per tensor, bounded by
``TOLERANCE[dtype]`` (non-finite values, a wrong shape or an exception fail). The check draws
its inputs from its own generator (the global RNG, hence training, is untouched) and runs with
gradients on, autocast off and no saved-tensor hooks (it may be first called inside a
``no_grad`` evaluation or an activation-checkpointed block); torch.compile does not trace it.

Shapes (CUDA / interpreter): attention B 1, T 304 / 40 (several tiles of every tile shape, the
causal diagonal and a ragged tail; T is a multiple of 16 on CUDA so the compiled variants are
those of the usual training lengths), 2 / 1 kv heads; RoPE T 64 / 24, 2 heads; RMSNorm
4 * SMs + 3 rows (the backward's persistent programs walk several rows each); SwiGLU 37 / 3 rows;
linear + CE 67 / 40 rows of width 64 / 32 in chunks of 16, every 7th target ignored.
The check is per device type, not per autotuned tile choice: the attention check runs at its own
T, so its autotuning never decides the tiles of the real sequence length.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from megareuse_kernels.common import LOG, multiprocessor_count

# max |got - ref| / max |ref| per output and gradient. fp32: the kernels compute in fp32 with
# IEEE dots (observed <= 1e-6 in the tests); half precisions: their rounding (tests' bounds).
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
TF32_TOLERANCE = 2e-3  # fp32 on CUDA while torch's matmuls use TF32 (the linear + CE's matmuls)
SEED = 20240527

Pair = tuple[str, torch.Tensor, torch.Tensor]  # (name, kernel result, float64 reference)
CheckFn = Callable[[torch.device, torch.dtype, tuple], list[Pair]]


@dataclass(frozen=True)
class Check:
    """How to verify one op: ``run`` builds inputs for a key and returns (name, got, reference)
    pairs; ``describe`` names the key in the log line; ``fallback`` is what the caller uses
    instead when the check fails."""
    run: CheckFn
    describe: Callable[[tuple], str]
    fallback: str


@dataclass(frozen=True)
class Verdict:
    """The outcome of one check: passed or not, the worst relative error (inf for non-finite
    results, nan when the check raised) and what it was measured on or why it failed."""
    ok: bool
    error: float
    detail: str
    bound: float


_RESULTS: dict[tuple, Verdict] = {}


def _kernel(module: str):
    """The kernel module, looked up at call time (so a test's monkeypatch reaches the check)."""
    return importlib.import_module(f"megareuse_kernels.{module}")


def _randn(gen: torch.Generator, shape: Sequence[int], device: torch.device, dtype: torch.dtype,
           scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(tuple(shape), generator=gen, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def _leaf(t: torch.Tensor) -> torch.Tensor:
    """A float64 copy of ``t`` that requires grad (the reference's input)."""
    return t.detach().double().requires_grad_()


def _grads(out: torch.Tensor, inputs: Sequence[torch.Tensor], dout: torch.Tensor | None = None) -> tuple:
    return torch.autograd.grad(out, tuple(inputs), dout)


# ------------------------------------------------------------------ the checks
def _attention64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """float64 softmax(q k^T / sqrt(D) [causal]) v; query head h reads kv head h // group."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        T = q.shape[2]
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), -math.inf)
    return scores.softmax(-1) @ v


def check_attention(device: torch.device, dtype: torch.dtype, key: tuple) -> list[Pair]:
    """Flash attention, key (head_dim, group = n_heads / n_kv_heads, causal), on q, k, v in the
    model's layout ([B, T, H, D] projections viewed as [B, H, T, D])."""
    head_dim, group, causal = key
    T, hkv = (304, 2) if device.type == "cuda" else (40, 1)
    gen = torch.Generator().manual_seed(SEED)
    base = [_randn(gen, (1, T, n, head_dim), device, dtype).requires_grad_() for n in (hkv * group, hkv, hkv)]
    dout = _randn(gen, (1, hkv * group, T, head_dim), device, dtype)
    out = _kernel("flash_attention").flash_attention(*(b.transpose(1, 2) for b in base), causal)
    got = (out, *_grads(out, base, dout))
    ref64 = [_leaf(b) for b in base]
    ref = _attention64(*(r.transpose(1, 2) for r in ref64), causal)
    want = (ref, *_grads(ref, ref64, dout.double()))
    return list(zip(("out", "dq", "dk", "dv"), got, want))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def check_rope(device: torch.device, dtype: torch.dtype, key: tuple) -> list[Pair]:
    """Fused RoPE (out of place), key (head_dim, table dtype), on the model's transposed layout."""
    head_dim, table_dtype = key
    T, H = (64, 2) if device.type == "cuda" else (24, 2)
    gen = torch.Generator().manual_seed(SEED)
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(T, dtype=torch.float64), inv_freq).repeat(1, 2)  # [T, D]: [f, f]
    cos, sin = (a.to(device=device, dtype=table_dtype) for a in (angles.cos(), angles.sin()))
    base = _randn(gen, (1, T, H, head_dim), device, dtype).requires_grad_()
    dout = _randn(gen, (1, H, T, head_dim), device, dtype)
    out = _kernel("rope").apply_rope(base.transpose(1, 2), cos, sin)
    got = (out, *_grads(out, [base], dout))
    x64 = _leaf(base)
    xt = x64.transpose(1, 2)
    ref = xt * cos.double() + _rotate_half(xt) * sin.double()
    want = (ref, *_grads(ref, [x64], dout.double()))
    return list(zip(("out", "dx"), got, want))


def check_rms_norm(device: torch.device, dtype: torch.dtype, key: tuple) -> list[Pair]:
    """Fused RMSNorm, key (features, weight dtype), eps 1e-5, a non-unit gain."""
    features, weight_dtype = key
    rows = 4 * multiprocessor_count(device) + 3
    gen = torch.Generator().manual_seed(SEED)
    x = _randn(gen, (rows, features), device, dtype).requires_grad_()
    w = (1.0 + _randn(gen, (features,), device, torch.float64, 0.1)).to(weight_dtype).requires_grad_()
    dout = _randn(gen, (rows, features), device, dtype)
    out = _kernel("rmsnorm").rms_norm(x, w, 1e-5)
    got = (out, *_grads(out, [x, w], dout))
    x64, w64 = _leaf(x), _leaf(w)
    ref = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5) * w64
    want = (ref, *_grads(ref, [x64, w64], dout.double()))
    return list(zip(("out", "dx", "dweight"), got, want))


def check_swiglu(device: torch.device, dtype: torch.dtype, key: tuple) -> list[Pair]:
    """Fused silu(gate) * up, key (FFN width,)."""
    (width,) = key
    rows = 37 if device.type == "cuda" else 3
    gen = torch.Generator().manual_seed(SEED)
    gate, up = (_randn(gen, (rows, width), device, dtype, 2.0).requires_grad_() for _ in range(2))
    dout = _randn(gen, (rows, width), device, dtype)
    out = _kernel("swiglu").swiglu(gate, up)
    got = (out, *_grads(out, [gate, up], dout))
    g64, u64 = _leaf(gate), _leaf(up)
    ref = g64 * torch.sigmoid(g64) * u64
    want = (ref, *_grads(ref, [g64, u64], dout.double()))
    return list(zip(("out", "dgate", "dup"), got, want))


def check_linear_cross_entropy(device: torch.device, dtype: torch.dtype, key: tuple) -> list[Pair]:
    """Fused linear + cross-entropy (mean, chunks of 16 rows, ignored targets), key (vocab,)."""
    (vocab,) = key
    rows, width = (67, 64) if device.type == "cuda" else (40, 32)
    gen = torch.Generator().manual_seed(SEED)
    hidden = _randn(gen, (rows, width), device, dtype).requires_grad_()
    weight = _randn(gen, (vocab, width), device, dtype, 2.0 / math.sqrt(width)).requires_grad_()
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    targets[::7] = -100
    targets = targets.to(device)
    loss = _kernel("cross_entropy").linear_cross_entropy(hidden, weight, targets, chunk_size=16)
    got = (loss, *_grads(loss, [hidden, weight]))
    h64, w64 = _leaf(hidden), _leaf(weight)
    ref = F.cross_entropy(h64 @ w64.t(), targets, ignore_index=-100)
    want = (ref, *_grads(ref, [h64, w64]))
    return list(zip(("loss", "dhidden", "dweight"), got, want))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


CHECKS: dict[str, Check] = {
    "attention": Check(check_attention, lambda k: f"head_dim {k[0]}, group {k[1]}" + (", causal" if k[2] else ""),
                       "sdpa"),
    "rope": Check(check_rope, lambda k: f"head_dim {k[0]}, {_dtype_name(k[1])} tables", "torch"),
    "rms_norm": Check(check_rms_norm, lambda k: f"{k[0]} features, {_dtype_name(k[1])} weight", "torch"),
    "swiglu": Check(check_swiglu, lambda k: f"width {k[0]}", "torch"),
    "linear_cross_entropy": Check(check_linear_cross_entropy, lambda k: f"vocab {k[0]}", "chunked loss"),
}


# ------------------------------------------------------------------ running and caching
def tolerance(device: torch.device, dtype: torch.dtype) -> float:
    """The bound for ``dtype``; fp32 on CUDA is looser while torch's matmuls use TF32."""
    if dtype == torch.float32 and device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return TF32_TOLERANCE
    return TOLERANCE[dtype]


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| (inf for non-finite values); a shape mismatch raises."""
    if tuple(got.shape) != tuple(want.shape):
        raise ValueError(f"shape {tuple(got.shape)} != reference {tuple(want.shape)}")
    diff = (got.detach().double() - want.detach()).abs().max()
    if not torch.isfinite(diff):
        return math.inf
    return (diff / want.detach().abs().max().clamp_min(1e-300)).item()


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


@torch.compiler.disable
def run_check(op: str, device: torch.device | str, dtype: torch.dtype, key: tuple) -> Verdict:
    """Run ``op``'s check once (uncached) and judge it; never raises for a failing kernel."""
    device, check = torch.device(device), CHECKS[op]  # an unknown op is a caller's bug: KeyError
    bound = tolerance(device, dtype)
    try:
        with torch.inference_mode(False), torch.enable_grad(), \
                torch.autocast(device_type=device.type, enabled=False), \
                torch.autograd.graph.saved_tensors_hooks(_identity, _identity):
            pairs = check.run(device, dtype, tuple(key))
            errors = {name: rel_error(got, want) for name, got, want in pairs}
    except Exception as err:  # a compile error, a launch failure, a wrong shape: not usable here
        first = (str(err).strip().splitlines() or [""])[0][:300]
        return Verdict(False, math.nan, f"it raised {type(err).__name__}: {first}", bound)
    worst = max(errors, key=errors.get)
    return Verdict(errors[worst] <= bound, errors[worst], worst, bound)


def _log(op: str, device: torch.device, dtype: torch.dtype, key: tuple, verdict: Verdict) -> None:
    """The one line per check: INFO when the kernel passed, WARNING with the reason when not."""
    check = CHECKS[op]
    where = f"on {device} ({_dtype_name(dtype)}; {check.describe(key)})"
    if verdict.ok:
        LOG.info(f"{op} [auto]: Triton kernel verified {where}: max relative error {verdict.error:.1e} "
                 f"in {verdict.detail} (bound {verdict.bound:.0e})")
    elif math.isnan(verdict.error):
        LOG.warning(f"{op} [auto]: {check.fallback} path {where}: the Triton kernel's check failed: {verdict.detail}")
    else:
        LOG.warning(f"{op} [auto]: {check.fallback} path {where}: the Triton kernel failed its check against "
                    f"float64 torch: max relative error {verdict.error:.1e} in {verdict.detail} "
                    f"(bound {verdict.bound:.0e})")


def verified(op: str, device: torch.device | str, dtype: torch.dtype, key: tuple) -> bool:
    """Whether ``op``'s Triton kernel passed its check for (device, dtype, key): run and logged
    the first time a key is asked for, cached for the process afterwards."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    cache_key = (op, str(device), dtype, tuple(key))
    verdict = _RESULTS.get(cache_key)
    if verdict is None:
        verdict = _RESULTS[cache_key] = run_check(op, device, dtype, key)
        _log(op, device, dtype, tuple(key), verdict)
    return verdict.ok


def results() -> dict[tuple, Verdict]:
    """The verdicts so far, by (op, device, dtype, key) (a copy)."""
    return dict(_RESULTS)


def clear() -> None:
    """Forget every verdict (tests; a later call checks again)."""
    _RESULTS.clear()


__all__ = ["CHECKS", "Check", "TOLERANCE", "Verdict", "clear", "rel_error", "results", "run_check", "tolerance",
           "verified"]
