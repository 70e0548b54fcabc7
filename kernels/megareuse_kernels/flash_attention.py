"""FlashAttention-2 forward and backward in Triton (Dao, 2023), with causal masking and GQA.

Layout: q [B, H, T, D], k and v [B, Hkv, T, D] with H a multiple of Hkv (query head h reads
key/value head h // (H // Hkv)); any strides with a unit last-dimension stride (the model's
``[B, T, H, D]``-transposed views go in without copies). Output has q's layout.

Forward: one program per (query block, batch x head). Scores for a [BLOCK_M, BLOCK_N] tile are
formed in fp32, exponentiated in base 2 with a running row maximum and normaliser (online
softmax), and the output accumulator is rescaled as the maximum grows; no T x T matrix exists in
memory. The per-row log-sum-exp (base 2) is kept for the backward. Key blocks strictly below the
causal diagonal run without masks; only the diagonal and the ragged last block are masked.

Backward: ``delta = rowsum(dO * O)``; one kernel owns a key block and loops over the query
blocks *and over the H / Hkv query heads sharing its kv head*, so dK and dV of a kv head are
summed in registers (no repeated K/V, no atomics); a second kernel owns a query block and
accumulates dQ. P is recomputed from the saved log-sum-exp.

Supported: head dim 64 or 128 (``SUPPORTED_HEAD_DIMS``), fp16 / bf16 (fp32 accumulation) and
fp32 (IEEE dots), any sequence length, equal query and key lengths. ``unsupported_reason`` says
why an input is refused; the model's ``triton`` backend then falls back to SDPA.
"""
from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

from megareuse_kernels.common import check, device_reason, interpreting, new_output, new_output_like

SUPPORTED_HEAD_DIMS = (64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634

# (BLOCK_M, BLOCK_N, num_warps, num_stages). The causal split needs BLOCK_M % BLOCK_N == 0 for
# the forward and dQ kernels, BLOCK_N % BLOCK_M == 0 for dK/dV. On CUDA the autotuner picks one
# per (T, head dim, causal, group size) from _TUNE_SPACE (MEGAREUSE_FLASH_AUTOTUNE=0: the first).
_TUNE_SPACE = {
    "fwd": [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 4), (128, 32, 4, 4)],
    "dkdv": [(32, 128, 4, 3), (32, 128, 8, 3), (64, 128, 8, 3), (32, 64, 4, 4), (64, 64, 4, 3)],
    "dq": [(128, 32, 4, 3), (128, 32, 8, 3), (128, 64, 8, 3), (64, 32, 4, 4), (64, 64, 4, 3)],
}
# Small tiles in the interpreter: several blocks and a ragged tail even at test sizes.
_INTERPRETER_CONFIG = {"fwd": (32, 16, 4, 1), "dkdv": (16, 32, 4, 1), "dq": (32, 16, 4, 1)}


def _autotune_enabled() -> bool:
    return not interpreting() and os.environ.get("MEGAREUSE_FLASH_AUTOTUNE", "1") != "0"


def _check_tiles(kind: str, cfg: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    big, small = (cfg[1], cfg[0]) if kind == "dkdv" else (cfg[0], cfg[1])
    assert big % small == 0, f"flash attention {kind} tiles {cfg[:2]} break the causal block split"
    return cfg


@functools.lru_cache(maxsize=None)
def _tuned(kind: str):
    """The autotuned launcher of one kernel (built on first use, CUDA only)."""
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st)
               for m, n, w, st in map(functools.partial(_check_tiles, kind), _TUNE_SPACE[kind])]
    return triton.autotune(configs, key=["T", "HEAD_DIM", "CAUSAL", "N_REP"])(_KERNELS[kind])


def _launch(kind: str, grid_of, *args, **meta) -> None:
    """Launch kernel ``kind`` with grid ``grid_of(BLOCK_M, BLOCK_N)``: autotuned or fixed tiles."""
    if _autotune_enabled():
        _tuned(kind)[lambda m: grid_of(m["BLOCK_M"], m["BLOCK_N"])](*args, **meta)
        return
    bm, bn, warps, stages = _check_tiles(kind, _INTERPRETER_CONFIG[kind] if interpreting()
                                         else _TUNE_SPACE[kind][0])
    _KERNELS[kind][grid_of(bm, bn)](*args, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, **meta)


@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, k_ptr, v_ptr, stride_kt, stride_vt, offs_m, offs_d, lo, hi, T, qk_scale,
               BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr):
    """Fold key/value blocks [lo, hi) into the running (acc, l_i, m_i) of one query block."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        if MASKED:
            kt = tl.load(k_ptr + cols[None, :] * stride_kt + offs_d[:, None], mask=cols[None, :] < T, other=0.0)
        else:
            kt = tl.load(k_ptr + cols[None, :] * stride_kt + offs_d[:, None])
        s = tl.dot(q, kt, input_precision=PREC) * qk_scale  # [BLOCK_M, BLOCK_N], log2 units
        if MASKED:
            keep = cols[None, :] < T
            if CAUSAL:
                keep = keep & (cols[None, :] <= offs_m[:, None])
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:
            v = tl.load(v_ptr + cols[:, None] * stride_vt + offs_d[None, :], mask=cols[:, None] < T, other=0.0)
        else:
            v = tl.load(v_ptr + cols[:, None] * stride_vt + offs_d[None, :])
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, O, LSE, qk_scale,
              sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
              H, T, N_REP,
              HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              CAUSAL: tl.constexpr, PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    if CAUSAL:  # longest rows first: better load balance on a GPU
        pid_m = tl.num_programs(0) - 1 - pid_m
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // N_REP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    k_ptr = K + b * skb + hk * skh
    v_ptr = V + b * svb + hk * svh

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    if CAUSAL:
        full_hi = pid_m * BLOCK_M  # keys strictly before the block: visible to every row
        diag_hi = tl.minimum((pid_m + 1) * BLOCK_M, T)
    else:
        full_hi = (T // BLOCK_N) * BLOCK_N
        diag_hi = T
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_ptr, v_ptr, skt, svt, offs_m, offs_d, 0, full_hi, T, qk_scale,
                               BLOCK_N, False, CAUSAL, PREC)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_ptr, v_ptr, skt, svt, offs_m, offs_d, full_hi, diag_hi, T,
                               qk_scale, BLOCK_N, True, CAUSAL, PREC)
    out = acc / l_i[:, None]
    tl.store(O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None])
    tl.store(LSE + bh.to(tl.int64) * T + offs_m, m_i + tl.log2(l_i), mask=row_ok)


@triton.jit
def _attn_bwd_delta(O, DO, DELTA, sob, soh, sot, sdb, sdh, sdt, H, T,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta[b, h, t] = sum_d dO * O (the softmax backward's row correction)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = offs_m[:, None] < T
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :], mask=ok, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdt + offs_d[None, :], mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * T + offs_m, delta, mask=offs_m < T)


@triton.jit
def _dkdv_tiles(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, stride_qt, stride_dt, offs_n, offs_d, lo, hi, T,
                qk_scale, BLOCK_M: tl.constexpr, MASKED: tl.constexpr, PREC: tl.constexpr):
    """Accumulate dK, dV of one key block over query blocks [lo, hi) of one query head."""
    offs_m0 = tl.arange(0, BLOCK_M)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + offs_m0
        row_ok = offs_m < T
        q = tl.load(q_ptr + offs_m[:, None] * stride_qt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        do = tl.load(do_ptr + offs_m[:, None] * stride_dt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        lse = tl.load(lse_ptr + offs_m, mask=row_ok, other=float("inf"))  # padded rows: p = 0
        delta = tl.load(delta_ptr + offs_m, mask=row_ok, other=0.0)
        st = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale  # [BLOCK_N, BLOCK_M]
        pt = tl.exp2(st - lse[None, :])
        if MASKED:
            pt = tl.where(offs_m[None, :] >= offs_n[:, None], pt, 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=PREC)
        dpt = tl.dot(v, tl.trans(do), input_precision=PREC)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision=PREC)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA, qk_scale, sm_scale,
                   sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdb, sdh, sdt,
                   sdkb, sdkh, sdkt, sdvb, sdvh, sdvt,
                   H, T, N_REP,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr, PREC: tl.constexpr):
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1)
    h_kv = H // N_REP
    b = (bhk // h_kv).to(tl.int64)
    hk = (bhk % h_kv).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n[:, None] < T
    k = tl.load(K + b * skb + hk * skh + offs_n[:, None] * skt + offs_d[None, :], mask=col_ok, other=0.0)
    v = tl.load(V + b * svb + hk * svh + offs_n[:, None] * svt + offs_d[None, :], mask=col_ok, other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    if CAUSAL:
        diag_lo = pid_n * BLOCK_N  # query rows that see only part of this key block
        full_lo = tl.minimum((pid_n + 1) * BLOCK_N, T)
    else:
        diag_lo = 0
        full_lo = 0
    for r in range(0, N_REP):  # the query heads sharing this kv head
        h = hk * N_REP + r
        q_ptr = Q + b * sqb + h * sqh
        do_ptr = DO + b * sdb + h * sdh
        row_base = (b * H + h) * T
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_ptr, do_ptr, LSE + row_base, DELTA + row_base, sqt, sdt, offs_n,
                             offs_d, diag_lo, full_lo, T, qk_scale, BLOCK_M, True, PREC)
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_ptr, do_ptr, LSE + row_base, DELTA + row_base, sqt, sdt, offs_n,
                             offs_d, full_lo, T, T, qk_scale, BLOCK_M, False, PREC)
    dk = dk * sm_scale
    tl.store(DK + b * sdkb + hk * sdkh + offs_n[:, None] * sdkt + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=col_ok)
    tl.store(DV + b * sdvb + hk * sdvh + offs_n[:, None] * sdvt + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=col_ok)


@triton.jit
def _dq_tiles(dq, q, do, lse, delta, k_ptr, v_ptr, stride_kt, stride_vt, offs_m, offs_d, lo, hi, T, qk_scale,
              BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr):
    """Accumulate dQ of one query block over key blocks [lo, hi)."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        if MASKED:
            k = tl.load(k_ptr + cols[:, None] * stride_kt + offs_d[None, :], mask=cols[:, None] < T, other=0.0)
            v = tl.load(v_ptr + cols[:, None] * stride_vt + offs_d[None, :], mask=cols[:, None] < T, other=0.0)
        else:
            k = tl.load(k_ptr + cols[:, None] * stride_kt + offs_d[None, :])
            v = tl.load(v_ptr + cols[:, None] * stride_vt + offs_d[None, :])
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        p = tl.exp2(s - lse[:, None])
        if MASKED:
            keep = cols[None, :] < T
            if CAUSAL:
                keep = keep & (cols[None, :] <= offs_m[:, None])
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    return dq


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, DQ, LSE, DELTA, qk_scale, sm_scale,
                 sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdb, sdh, sdt, sdqb, sdqh, sdqt,
                 H, T, N_REP,
                 HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 CAUSAL: tl.constexpr, PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // N_REP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * T + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + bh.to(tl.int64) * T + offs_m, mask=row_ok, other=0.0)
    k_ptr = K + b * skb + hk * skh
    v_ptr = V + b * svb + hk * svh
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if CAUSAL:
        full_hi = pid_m * BLOCK_M
        diag_hi = tl.minimum((pid_m + 1) * BLOCK_M, T)
    else:
        full_hi = (T // BLOCK_N) * BLOCK_N
        diag_hi = T
    dq = _dq_tiles(dq, q, do, lse, delta, k_ptr, v_ptr, skt, svt, offs_m, offs_d, 0, full_hi, T, qk_scale,
                   BLOCK_N, False, CAUSAL, PREC)
    dq = _dq_tiles(dq, q, do, lse, delta, k_ptr, v_ptr, skt, svt, offs_m, offs_d, full_hi, diag_hi, T, qk_scale,
                   BLOCK_N, True, CAUSAL, PREC)
    dq = dq * sm_scale
    tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqt + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=row_ok[:, None])


_KERNELS = {"fwd": _attn_fwd, "dkdv": _attn_bwd_dkdv, "dq": _attn_bwd_dq}


def unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True) -> str | None:
    """Why (q, k, v) cannot use the Triton flash attention kernel, or None when they can."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return f"flash attention: q, k, v must be 4-D [B, H, T, D], got {q.dim()}, {k.dim()}, {v.dim()} dims"
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        return f"flash attention: incompatible shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if q.shape[2] != k.shape[2]:
        return f"flash attention: query length {q.shape[2]} != key length {k.shape[2]} (self-attention only)"
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        return f"flash attention: n_heads={q.shape[1]} is not a multiple of n_kv_heads={k.shape[1]}"
    if q.shape[3] not in SUPPORTED_HEAD_DIMS:
        return (f"flash attention: head dim {q.shape[3]} is not supported; accepted: "
                f"{', '.join(map(str, SUPPORTED_HEAD_DIMS))}")
    if not (q.dtype == k.dtype == v.dtype):
        return f"flash attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})"
    if q.dtype not in SUPPORTED_DTYPES:
        return f"flash attention: dtype {q.dtype} is not supported; accepted: float16, bfloat16, float32"
    if not (q.device == k.device == v.device):
        return f"flash attention: q, k, v are on different devices ({q.device}, {k.device}, {v.device})"
    return device_reason(q, "flash attention")


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit inputs


def flash_attention_forward(q, k, v, causal: bool, sm_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the forward kernel: (out with q's layout, base-2 log-sum-exp [B, H, T] fp32)."""
    B, H, T, D = q.shape
    out = new_output_like(q)
    lse = new_output((B, H, T), torch.float32, q.device)
    _launch("fwd", lambda bm, bn: (triton.cdiv(T, bm), B * H),
            q, k, v, out, lse, sm_scale * LOG2E, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
            *out.stride()[:3], H, T, H // k.shape[1], HEAD_DIM=D, CAUSAL=causal, PREC=_prec(q.dtype))
    return out, lse


def flash_attention_backward(do, q, k, v, out, lse, causal: bool, sm_scale: float):
    """Run the backward kernels: (dq, dk, dv) with the layouts of q, k, v."""
    B, H, T, D = q.shape
    do = _unit_last(do)
    delta = new_output((B, H, T), torch.float32, q.device)
    _attn_bwd_delta[(triton.cdiv(T, 64), B * H)](out, do, delta, *out.stride()[:3], *do.stride()[:3], H, T,
                                                  HEAD_DIM=D, BLOCK_M=64)
    dq, dk, dv = new_output_like(q), new_output_like(k), new_output_like(v)
    n_rep, prec = H // k.shape[1], _prec(q.dtype)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3])
    _launch("dkdv", lambda bm, bn: (triton.cdiv(T, bn), B * k.shape[1]),
            q, k, v, do, dk, dv, lse, delta, sm_scale * LOG2E, sm_scale, *strides, *dk.stride()[:3],
            *dv.stride()[:3], H, T, n_rep, HEAD_DIM=D, CAUSAL=causal, PREC=prec)
    _launch("dq", lambda bm, bn: (triton.cdiv(T, bm), B * H),
            q, k, v, do, dq, lse, delta, sm_scale * LOG2E, sm_scale, *strides, *dq.stride()[:3], H, T, n_rep,
            HEAD_DIM=D, CAUSAL=causal, PREC=prec)
    return dq, dk, dv


class FlashAttention(torch.autograd.Function):
    """autograd.Function over the forward and backward kernels (saves q, k, v, out, lse)."""

    @staticmethod
    def forward(ctx, q, k, v, causal: bool, sm_scale: float):
        q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
        out, lse = flash_attention_forward(q, k, v, causal, sm_scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.sm_scale = causal, sm_scale
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = flash_attention_backward(do, q, k, v, out, lse, ctx.causal, ctx.sm_scale)
        return dq, dk, dv, None, None


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                    softmax_scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale [+ causal mask]) v for q [B, H, T, D], k/v [B, Hkv, T, D] -> [B, H, T, D].

    ``softmax_scale`` defaults to 1/sqrt(D). Raises ValueError (one line naming what is
    unsupported and what is accepted) for shapes, dtypes or devices the kernel does not handle.
    """
    check(unsupported_reason(q, k, v, causal))
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    return FlashAttention.apply(q, k, v, bool(causal), scale)
