"""Per-GPU memory and step FLOPs of a training config, before anything is queued.

``estimate(cfg, world_size)`` is a pure function of the config (no model is built). Every
figure is in bytes on ONE rank; the model is split TP x DP with TP = ``parallel.tp``,
DP = world_size / TP. Per-rank parameter counts are exact: they follow the sharding rules of
``megareuse.parallel.tensor_parallel`` (vocab-parallel embedding and head, column-parallel
wq/wk/wv/w1/w3, row-parallel wo/w2, RMSNorm weights replicated, one whole KV head per rank
when tp > n_kv_heads).

Model states follow DeepSpeed 0.19's allocations for the trainer's setup (torch AdamW over two
parameter groups, matrices and norms, ``run.dtype`` -> DeepSpeed ``bf16``), with
P = 2 bytes (bf16/fp16) or 4 (fp32) per parameter, N = this rank's parameter count:

| ZeRO | params | grads | optimizer (fp32 master + Adam m, v) |
|---|---|---|---|
| 0 | P N | P N | (4 if P = 2 else 0) N + 8 N |
| 1 | P N | P N | 12 N / DP |
| 2 | P N | P N / DP | 12 N / DP |
| 3 | P N / DP (+ small "persistent" params whole) | P N / DP | 12 N / DP |

ZeRO >= 1 keeps an fp32 master partition even for fp32 training (measured), ZeRO-1/2 pad each
group to a multiple of 2 DP elements, ZeRO-3 rounds each tensor up to a multiple of DP and
keeps tensors of at most ``stage3_param_persistence_threshold`` elements whole; each AdamW
state adds a 4-byte ``step`` scalar per parameter tensor (ZeRO-0) or per group (ZeRO >= 1).
``buffers`` are DeepSpeed's gradient buckets (``reduce_bucket_size`` x P, doubled with
``overlap_comm``; ZeRO-1's reduced-gradient partition; ZeRO-0's all-reduce flattening;
ZeRO-3's gathered-parameter working set) and ``step_transient`` the fp32 gradient copy made
at the optimizer step: both are counted because the CUDA caching allocator keeps them reserved.
``comm_transient`` is the collectives' working memory at their largest, measured on CPU with 4
gloo ranks (docs/estimate.md): the ZeRO-1/2 step all-gathers the updated partitions into each
flat group, which gloo's ``all_gather_into_tensor`` copies once more (NCCL: in place, 0); a ZeRO-3
backward holds the largest unit's full gradient and DeepSpeed's flattened reduce input (2 copies;
gloo's ``reduce_scatter_tensor`` adds a full copy and its output). The NCCL figures follow
DeepSpeed's code and are not yet measured on a GPU. The peak is the model states plus the larger
of (activations + logits) and (step + collective transients).

Activations (saved for backward, one micro-batch of b sequences of s tokens, h = d_model,
a = heads, F = ffn_hidden, all divided by t = tp where the layer is parallel). Korthikanti et
al. (2022) give s b h (34 + 5 a s / h) bytes per layer for 16-bit GPT (4h GELU MLP, dropout,
no flash attention). For this model (no dropout, SwiGLU, GQA, RoPE) with SDPA/flash attention
(no s^2 term; measured on the real module with saved-tensor hooks) a layer saves, with
P = activation bytes, q = a hd / t, kv = local KV width:
  2 RMSNorms      2 [(4 + P) s b h + 4 s b]   fp32 copy of the input, normalised value, rstd
  norm outputs    2 P s b h                  inputs of wq/wk/wv and of w1/w3 (replicated)
  attention       P s b (2 q + 2 kv) + 4 b (a/t) s     q, k, v, output, log-sum-exp
  SwiGLU          4 P s b F / t              w1 and w3 outputs, silu(w1 x), w2 input
With fused kernels (attention triton/auto) a norm saves P s b h + 4 s b and SwiGLU 3 P s b F/t;
eager attention saves fp32 q, k, v (k, v expanded to all heads), fp32 probabilities
4 b (a/t) s^2, the s^2 causal mask and the wo input instead. Outside the layers: the final
norm and the head input. Full activation checkpointing keeps each layer's input (P s b h per
layer) plus one layer's activations (the one being recomputed). ``logits`` is one fp32 copy of
b x s x vocab/t; three coexist at the start of backward (saved log-probabilities, their
gradient, the logits' gradient), so totals count ``LOGIT_COPIES`` of them.

Not counted: the CUDA context and NCCL (``CUDA_RESERVE_GIB`` is kept free), fragmentation,
token ids, RoPE tables, DeepSpeed options beyond the buckets (offload, data_types).
FLOPs: ``flops_per_token`` (6N + attention, PaLM accounting) x tokens per step; recomputing
every layer (full checkpointing) costs one more forward, 4/3 of that in hardware FLOPs.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from megareuse.config import Config, ConfigError, ModelConfig
from megareuse.model.flops import flops_per_token, param_count

GIB = 1024 ** 3
LOGIT_COPIES = 3
CUDA_RESERVE_GIB = 1.0
ALLREDUCE_BUCKET = 500_000_000  # DeepSpeed's ZeRO-0 gradient all-reduce flattening (elements)
ZERO_DEFAULTS = {"reduce_bucket_size": 500_000_000, "contiguous_gradients": True,
                 "stage3_prefetch_bucket_size": 50_000_000, "stage3_param_persistence_threshold": 100_000}


@dataclass(frozen=True)
class Estimate:
    """Per-GPU memory (bytes) and step FLOPs of one config at one world size."""

    world_size: int
    tp: int
    dp: int
    zero_stage: int
    dtype: str  # fp32 | bf16 | fp16 (DeepSpeed's model dtype)
    micro_batch_size: int
    seq_len: int
    grad_accum: int
    n_params: int  # whole model
    params_per_rank: int  # after tensor parallelism, before ZeRO
    params: int
    grads: int
    optimizer: int  # fp32 master (when kept) + exp_avg + exp_avg_sq + step scalars
    buffers: int  # DeepSpeed buckets and gathered parameters
    step_transient: int  # fp32 gradient copy at the optimizer step
    comm_transient: int  # collectives' working copies: ZeRO-1/2 step all-gather, ZeRO-3 unit reduction
    activations_per_layer: int
    activations_no_ckpt: int
    activations_ckpt: int
    logits: int  # one fp32 copy of b x s x vocab/tp
    total: int  # peak without activation checkpointing
    total_ckpt: int  # peak with full activation checkpointing
    tokens_per_step: int  # global
    flops_per_step: int  # global model FLOPs
    flops_per_gpu: int
    flops_per_gpu_ckpt: int  # with the recompute forward

    @property
    def model_states(self) -> int:
        return self.params + self.grads + self.optimizer

    def to_dict(self) -> dict:
        return asdict(self)


def rank_tensors(model: ModelConfig, tp: int) -> list[tuple[str, int, bool]]:
    """(name, numel, is_matrix) of every parameter tensor held by one TP rank (all ranks hold
    the same sizes); is_matrix is the trainer's weight-decay group (dim >= 2)."""
    if model.n_heads % tp or model.ffn_hidden % tp or model.vocab_size % tp:
        raise ConfigError(f"config error: parallel.tp = {tp}: accepted a divisor of n_heads, ffn_hidden "
                          f"and vocab_size")
    kv, h, hd = model.kv_heads, model.d_model, model.head_size
    if kv % tp == 0:
        kv_rows = kv * hd // tp
    elif tp % kv == 0:
        kv_rows = hd  # replicated: one whole KV head per rank
    else:
        raise ConfigError(f"config error: parallel.tp = {tp}: accepted a divisor or multiple of the "
                          f"KV heads ({kv})")
    q_rows, f_local = model.n_heads * hd // tp, model.ffn_hidden // tp
    out = [("tok_embeddings.weight", model.vocab_size // tp * h, True)]
    for i in range(model.n_layers):
        p = f"layers.{i}."
        out += [(p + "attention_norm.weight", h, False), (p + "attention.wq.weight", q_rows * h, True),
                (p + "attention.wk.weight", kv_rows * h, True), (p + "attention.wv.weight", kv_rows * h, True),
                (p + "attention.wo.weight", h * q_rows, True), (p + "ffn_norm.weight", h, False),
                (p + "feed_forward.w1.weight", f_local * h, True), (p + "feed_forward.w3.weight", f_local * h, True),
                (p + "feed_forward.w2.weight", h * f_local, True)]
        if model.qkv_bias:  # cut with their rows
            out += [(p + "attention.wq.bias", q_rows, False), (p + "attention.wk.bias", kv_rows, False),
                    (p + "attention.wv.bias", kv_rows, False)]
        if model.qk_norm:  # replicated gains of one head's size
            out += [(p + "attention.q_norm.weight", hd, False), (p + "attention.k_norm.weight", hd, False)]
    out.append(("norm.weight", h, False))
    if not model.tie_embeddings:
        out.append(("output.weight", model.vocab_size // tp * h, True))
    return out


def _zget(zero: dict, key: str):
    """A ZeRO setting of the effective DeepSpeed config, DeepSpeed's default when absent or 'auto'."""
    value = zero.get(key)
    return ZERO_DEFAULTS[key] if value is None or value == "auto" else value


def _align(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _model_dtype(ds: dict) -> tuple[str, int]:
    if ds.get("fp16", {}).get("enabled"):
        return "fp16", 2
    return ("bf16", 2) if ds.get("bf16", {}).get("enabled") else ("fp32", 4)


def _model_states(tensors, stage: int, dp: int, P: int, zero: dict,
                  gloo: bool = False) -> tuple[int, int, int, int, int, int]:
    """(params, grads, optimizer, buffers, step_transient, comm_transient) bytes on one rank."""
    n = sum(t[1] for t in tensors)
    groups = [g for g in (sum(t[1] for t in tensors if t[2]), sum(t[1] for t in tensors if not t[2])) if g]
    bucket = int(_zget(zero, "reduce_bucket_size")) * P
    contiguous = bool(_zget(zero, "contiguous_gradients"))
    overlap = zero.get("overlap_comm")
    overlap = stage == 3 if overlap in (None, "auto") else bool(overlap)
    if stage == 0:  # torch AdamW on the module (fp32), or DeepSpeed's fp32 copies (bf16/fp16)
        master = 4 * n if P < 4 else 0
        optimizer = master + 8 * n + 4 * len(tensors)
        buffers = P * min(n, ALLREDUCE_BUCKET) if dp > 1 else 0
        return P * n, P * n, optimizer, buffers, (4 * n if P < 4 else 0), 0
    if stage in (1, 2):  # one flat buffer per group, padded to 2 DP elements, partitioned over DP
        padded = [_align(g, 2 * dp) for g in groups]
        part = sum(padded) // dp
        optimizer = 12 * part + 4 * len(groups)
        buffers = (bucket * (2 if overlap else 1) + (P * part if stage == 1 else 0)) if contiguous else 0
        grads = P * n if stage == 1 else P * part
        # the step all-gathers each updated group into its flat buffer; gloo's all_gather_into_tensor
        # materialises the gathered output once more (measured: +1.0x the buffer), NCCL writes in place
        comm = P * max(padded) if gloo and dp > 1 else 0
        return P * sum(padded), grads, optimizer, buffers, 4 * part, comm
    # ZeRO-3: each tensor partitioned on its own (rounded up); small ones also kept whole
    threshold = int(_zget(zero, "stage3_param_persistence_threshold"))
    part = sum(-(-t[1] // dp) for t in tensors)
    persistent = sum(t[1] for t in tensors if t[1] <= threshold) if dp > 1 else 0
    prefetch = int(_zget(zero, "stage3_prefetch_bucket_size"))
    sharded = [t for t in tensors if t[1] > threshold]  # gathered for use, released after
    layer = sum(t[1] for t in sharded if t[0].startswith("layers.0."))
    largest = max([layer] + [t[1] for t in sharded])
    gathered = min(sum(t[1] for t in sharded), largest + prefetch) if dp > 1 else 0
    buffers = (bucket if contiguous else 0) + P * gathered
    # the largest unit's backward: its full gradient and DeepSpeed's flattened reduce input, and on
    # gloo reduce_scatter_tensor's own full copy plus its output (measured: +1.25x at DP 4)
    copies = (2 + (1 + 1 / dp if gloo else 0)) if dp > 1 else 0
    comm = int(copies * P * largest)
    return (P * (part + persistent), P * part, 12 * part + 4 * len(groups), buffers,
            (4 * part if P < 4 else 0), comm)


def activation_bytes(model: ModelConfig, tp: int, b: int, s: int, P: int) -> tuple[int, int, int]:
    """(per layer, outside the layers, one fp32 logits copy) bytes saved for backward on one rank
    for a micro-batch of b sequences of s tokens at activation width P bytes (module docstring)."""
    h, hd, a_l = model.d_model, model.head_size, model.n_heads // tp
    kv = model.kv_heads
    kv_l = (kv // tp if kv % tp == 0 else 1) * hd
    q_l, f_l, sb = a_l * hd, model.ffn_hidden // tp, s * b
    fused = model.attention in ("triton", "auto")
    norm = (P if fused else 4 + P) * sb * h + 4 * sb
    if model.attention == "eager":
        attn = 4 * sb * 3 * q_l + 4 * b * a_l * s * s + s * s + P * sb * q_l
    else:
        attn = P * sb * (2 * q_l + 2 * kv_l) + 4 * b * a_l * s
    ffn = (3 if fused else 4) * P * sb * f_l
    if model.qk_norm:  # per-head q/k norms keep their inputs (and fp32 statistics unfused)
        attn += (P if fused else 4 + P) * sb * (q_l + kv_l) + 4 * sb * (a_l + kv_l // hd)
    per_layer = 2 * norm + 2 * P * sb * h + attn + ffn
    outside = norm + P * sb * h  # final norm + the head's input
    return per_layer, outside, 4 * sb * (model.vocab_size // tp)


def estimate(cfg: Config, world_size: int, zero_stage: Optional[int] = None) -> Estimate:
    """Per-GPU memory and step FLOPs of ``cfg`` on ``world_size`` GPUs (TP x DP); raises
    ConfigError (one line) when the layout is impossible. ``zero_stage`` evaluates another
    ZeRO stage than ``parallel.zero_stage`` (keeping the ds_config's bucket settings)."""
    from megareuse.engine.ds import deepspeed_config

    tp = cfg.parallel.tp
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1 or world_size % tp:
        raise ConfigError(f"config error: world size {world_size!r} is not divisible by parallel.tp = {tp}; "
                          f"accepted a positive multiple of parallel.tp")
    if zero_stage not in (None, 0, 1, 2, 3):
        raise ConfigError(f"config error: zero_stage = {zero_stage!r}: accepted one of 0, 1, 2, 3")
    cfg.validate()
    dp, m, run = world_size // tp, cfg.model, cfg.run
    stage = cfg.parallel.zero_stage if zero_stage is None else zero_stage
    ds = deepspeed_config(cfg, dp)
    dtype, P = _model_dtype(ds)
    tensors = rank_tensors(m, tp)
    backend = cfg.parallel.backend if cfg.parallel.backend != "auto" else (
        "gloo" if cfg.run.device == "cpu" else "nccl")  # the trainer's rule, for the config's device
    gloo = backend == "gloo"
    params, grads, optimizer, buffers, step_tr, comm_tr = _model_states(
        tensors, stage, dp, P, ds.get("zero_optimization", {}), gloo)
    b, s = run.micro_batch_size, cfg.data.seq_len
    per_layer, outside, logits = activation_bytes(m, tp, b, s, P)
    act = m.n_layers * per_layer + outside
    act_ckpt = m.n_layers * P * s * b * m.d_model + per_layer + outside
    fixed = params + grads + optimizer + buffers
    tokens = cfg.tokens_per_step * dp
    fpt = flops_per_token(m, s)
    return Estimate(
        world_size=world_size, tp=tp, dp=dp, zero_stage=stage, dtype=dtype, micro_batch_size=b,
        seq_len=s, grad_accum=run.grad_accum, n_params=param_count(m),
        params_per_rank=sum(t[1] for t in tensors), params=params, grads=grads, optimizer=optimizer,
        buffers=buffers, step_transient=step_tr, comm_transient=comm_tr, activations_per_layer=per_layer,
        activations_no_ckpt=act, activations_ckpt=act_ckpt, logits=logits,
        total=fixed + max(act + LOGIT_COPIES * logits, step_tr + comm_tr),
        total_ckpt=fixed + max(act_ckpt + LOGIT_COPIES * logits, step_tr + comm_tr),
        tokens_per_step=tokens, flops_per_step=fpt * tokens, flops_per_gpu=fpt * tokens // world_size,
        flops_per_gpu_ckpt=fpt * 4 // 3 * tokens // world_size)


def max_micro_batch(est: Estimate, gpu_memory_gib: float, ckpt: bool = False) -> int:
    """Largest micro-batch that fits in ``gpu_memory_gib`` (activations and logits scale with it);
    0 when even the model states do not fit."""
    usable = (gpu_memory_gib - CUDA_RESERVE_GIB) * GIB
    fixed = est.params + est.grads + est.optimizer + est.buffers
    per_sample = ((est.activations_ckpt if ckpt else est.activations_no_ckpt)
                  + LOGIT_COPIES * est.logits) / est.micro_batch_size
    if usable < fixed + est.step_transient + est.comm_transient:
        return 0
    return int((usable - fixed) // per_sample)


def _gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def _rows(est: Estimate) -> list[tuple[str, int]]:
    master = "master + " if est.zero_stage or est.dtype != "fp32" else ""
    return [(f"parameters ({est.dtype})", est.params), (f"gradients ({est.dtype})", est.grads),
            (f"optimizer (fp32 {master}Adam m, v)", est.optimizer),
            ("DeepSpeed buffers (buckets, gathered params)", est.buffers),
            ("step-time fp32 gradient copy", est.step_transient),
            ("collectives' working copies (step / unit reduce)", est.comm_transient),
            ("activations, no checkpointing", est.activations_no_ckpt),
            ("activations, full checkpointing", est.activations_ckpt),
            (f"logits (one fp32 copy; x{LOGIT_COPIES} at the loss backward)", est.logits),
            ("**total, no checkpointing**", est.total), ("**total, full checkpointing**", est.total_ckpt)]


def _fits(total: int, gpu_memory_gib: float) -> str:
    usable = (gpu_memory_gib - CUDA_RESERVE_GIB) * GIB
    return f"{'yes' if total <= usable else 'NO'} ({100 * total / (gpu_memory_gib * GIB):.0f}%)"


def format_estimate(est: Estimate, gpu_memory_gib: Optional[float] = None) -> str:
    """A markdown table of one estimate, with whether it fits a GPU of ``gpu_memory_gib``."""
    head = (f"{est.n_params:,} parameters ({est.params_per_rank:,} per TP rank); "
            f"world {est.world_size} = TP {est.tp} x DP {est.dp}, ZeRO-{est.zero_stage}, {est.dtype}, "
            f"micro-batch {est.micro_batch_size} x seq {est.seq_len} x grad_accum {est.grad_accum}")
    lines = [head, "", "| per GPU | GiB |", "|---|---:|"]
    lines += [f"| {name} | {_gib(v)} |" for name, v in _rows(est)]
    lines += ["", f"tokens per step {est.tokens_per_step:,}; model FLOPs per step {est.flops_per_step:.3e} "
                  f"({est.flops_per_gpu:.3e} per GPU, {est.flops_per_gpu_ckpt:.3e} with recompute)"]
    if gpu_memory_gib is not None:
        lines.append(f"fits in {gpu_memory_gib:g} GiB (keeping {CUDA_RESERVE_GIB:g} GiB for CUDA/NCCL): "
                     f"without checkpointing {_fits(est.total, gpu_memory_gib)}, with full checkpointing "
                     f"{_fits(est.total_ckpt, gpu_memory_gib)}; largest micro-batch "
                     f"{max_micro_batch(est, gpu_memory_gib)} (no checkpointing), "
                     f"{max_micro_batch(est, gpu_memory_gib, ckpt=True)} (checkpointing)")
    return "\n".join(lines)


def estimate_all_stages(cfg: Config, world_size: int, gpu_memory_gib: Optional[float] = None) -> str:
    """The same config under ZeRO 0-3 side by side (GiB per GPU), to choose a stage."""
    ests = [estimate(cfg, world_size, zero_stage=stage) for stage in range(4)]
    e0 = ests[0]
    lines = [f"ZeRO stages compared: world {e0.world_size} = TP {e0.tp} x DP {e0.dp}, {e0.dtype}, "
             f"micro-batch {e0.micro_batch_size} x seq {e0.seq_len}", "",
             "| GiB per GPU | ZeRO-0 | ZeRO-1 | ZeRO-2 | ZeRO-3 |", "|---|---:|---:|---:|---:|"]
    for i, (name, _) in enumerate(_rows(e0)):
        lines.append(f"| {name} | " + " | ".join(_gib(_rows(e)[i][1]) for e in ests) + " |")
    if gpu_memory_gib is not None:
        for label, attr in (("fits, no checkpointing", "total"), ("fits, checkpointing", "total_ckpt")):
            lines.append(f"| {label} ({gpu_memory_gib:g} GiB) | "
                         + " | ".join(_fits(getattr(e, attr), gpu_memory_gib) for e in ests) + " |")
        lines.append("| largest micro-batch (no ckpt / ckpt) | " + " | ".join(
            f"{max_micro_batch(e, gpu_memory_gib)} / {max_micro_batch(e, gpu_memory_gib, True)}"
            for e in ests) + " |")
    return "\n".join(lines)
