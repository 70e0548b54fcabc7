"""Tensor parallelism for the GPT: swap its projections for sharded layers, and move state dicts
between the single-device layout and the per-rank TP layout.

Layout (Megatron's): attention.wq/wk/wv and feed_forward.w1/w3 are column-parallel (each rank
holds a slice of the heads / of the SwiGLU hidden units), attention.wo and feed_forward.w2 are
row-parallel (partial sums all-reduced), tok_embeddings is vocab-parallel, and the output head
is column-parallel over the vocabulary with ``gather_output=False``: the model returns logits
sharded on the vocabulary, to be fed to ``loss_fn`` (vocab-parallel cross-entropy). When the
embeddings are tied the head's weight stays the same Parameter as the embedding shard (both cut
the vocabulary the same way). RMSNorm weights stay replicated. q/k/v biases (``qkv_bias``) are
cut with their weights' rows. The per-head q/k norms (``qk_norm``: one gain of size head_dim
shared by every head) are replicated, but each rank normalises only its own heads, so their
gradient is summed over the TP group (``HeadNorm``).

Heads: rank r holds query heads [r*H/tp, (r+1)*H/tp). Query head h reads KV head
h // (H / Hkv) (attention.py's repeat_interleave convention), so:
- "split" (Hkv % tp == 0): rank r holds KV heads [r*Hkv/tp, (r+1)*Hkv/tp), exactly those its
  query heads read;
- "replicate" (tp % Hkv == 0, tp > Hkv): m = tp / Hkv consecutive TP ranks share KV head
  j = tp_rank // m; each holds that head's rows of wk/wv, and the gradient of those rows is
  summed over the m ranks (a subgroup per sharing set; see ColumnParallelLinear.replica_group).
Attention reads its local head counts from the projection shapes, so it needs no change.

Communication (Megatron's pattern): per transformer block, the forward pass all-reduces twice
(the row-parallel outputs of wo and w2) and the backward pass twice (the gradient of the
attention input and of the FFN input). The column-parallel q/k/v projections read one input, as
do gate/up; each group enters the TP region once: a forward pre-hook on the Attention and on the
FeedForward module (``SharedInputCopy``) applies ``copy_to_tp`` to that input and the column
layers are built with ``copy_input=False``, so the backward pass all-reduces the sum of the
three (two) input gradients once instead of five all-reduces per block. The model definition
stays free of parallelism and the parameters stay one per matrix (wq, wk, wv, w1, w3: same
state-dict keys, init plan, checkpoints, HF export and growth).

The GEMMs themselves stay separate (no concatenated QKV / gate-up weight): the communication is
what Megatron's fusion saves under TP; one GEMM would need the per-matrix parameters concatenated
at every forward (a copy of the weights, and a split of their gradients, each step; under ZeRO-3
each is gathered separately anyway), and measured on CPU it gave no speed-up (0.85-1.04x of the
separate projections, docs/benchmarks.md).

State dicts: the TP model's keys are the single-device GPT's keys; ``shard_state_dict`` cuts a
full (single-device) state dict for one rank and ``merge_state_dicts`` glues the shards back,
so checkpoints stored in the full layout load at any TP degree.
"""
from __future__ import annotations

from typing import Iterable, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from megareuse.config import ModelConfig
from megareuse.model.gpt import GPT, cross_entropy
from megareuse.parallel.cross_entropy import vocab_parallel_cross_entropy
from megareuse.parallel.head import VocabParallelHead
from megareuse.parallel.layers import ColumnParallelLinear, HeadNorm, RowParallelLinear, VocabParallelEmbedding, \
    is_tp_sharded, shard_range
from megareuse.parallel.mappings import copy_to_tp
from megareuse.parallel.state import ParallelState

TPSpec = Union[ParallelState, tuple[int, int]]


# --------------------------------------------------------------------------- layout rules
def check_tp_compatible(cfg: ModelConfig, tp_size: int) -> str:
    """Validate ``cfg`` for TP degree ``tp_size``; return the KV layout, "split" or "replicate".

    Raises ValueError with one line naming the offending field and the accepted relation.
    """
    if tp_size <= 0:
        raise ValueError(f"tensor-parallel size tp={tp_size}: accepted a positive integer")
    for name in ("n_heads", "vocab_size", "ffn_hidden"):
        value = getattr(cfg, name)
        if value % tp_size:
            raise ValueError(f"tensor parallelism: model.{name}={value} is not divisible by tp={tp_size}; "
                             f"accepted tp dividing {name}")
    kv = cfg.kv_heads
    if kv % tp_size == 0:
        return "split"
    if tp_size % kv == 0:
        return "replicate"
    raise ValueError(f"tensor parallelism: n_kv_heads={kv} and tp={tp_size}: accepted tp dividing "
                     f"n_kv_heads, or n_kv_heads dividing tp (KV heads replicated)")


def _tp_of(tp: TPSpec) -> tuple[int, int]:
    if isinstance(tp, ParallelState):
        return tp.tp_size, tp.tp_rank
    tp_size, tp_rank = tp
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank={tp_rank} is not in [0, tp_size={tp_size})")
    return int(tp_size), int(tp_rank)


def kv_rows(cfg: ModelConfig, tp_size: int, tp_rank: int) -> tuple[int, int]:
    """[start, stop) rows of the full wk / wv weight held by TP rank ``tp_rank``."""
    hd, kv = cfg.head_size, cfg.kv_heads
    if check_tp_compatible(cfg, tp_size) == "split":
        return shard_range(kv * hd, tp_size, tp_rank, "KV projection rows")
    head = tp_rank // (tp_size // kv)
    return head * hd, (head + 1) * hd


def kv_sharing_partition(cfg: ModelConfig, state: ParallelState) -> list[list[int]]:
    """Global-rank sets that hold the same replicated KV head (every TP group); [] when split."""
    if check_tp_compatible(cfg, state.tp_size) == "split":
        return []
    m = state.tp_size // cfg.kv_heads
    return [list(range(base + j * m, base + (j + 1) * m))
            for base in range(0, state.world_size, state.tp_size) for j in range(cfg.kv_heads)]


# --------------------------------------------------------------------------- the model
class SharedInputCopy:
    """Forward pre-hook (with kwargs) entering the TP region once for a module's input ``x``
    (its first positional argument, or the keyword ``x``): ``copy_to_tp``, so that the module's
    column-parallel projections built with ``copy_input=False`` share one backward all-reduce
    of their summed input gradients. Recomputed like any other op under activation
    checkpointing; traced by torch.compile with the block."""

    def __init__(self, state: ParallelState):
        self.state = state

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict):
        if args:
            return (copy_to_tp(args[0], self.state), *args[1:]), kwargs
        if "x" not in kwargs:
            raise TypeError(f"{type(module).__name__} called without its input x")
        return args, {**kwargs, "x": copy_to_tp(kwargs["x"], self.state)}


def share_input_copy(module: nn.Module, state: ParallelState) -> None:
    """Install ``SharedInputCopy`` on ``module`` (once)."""
    if not any(isinstance(h, SharedInputCopy) for h in module._forward_pre_hooks.values()):
        module.register_forward_pre_hook(SharedInputCopy(state), with_kwargs=True)


def parallelize_model(model: GPT, state: ParallelState) -> GPT:
    """Swap ``model``'s projections, embedding and head for TP layers holding this rank's shard
    of the current (full) weights, in place; returns the model.

    q/k/v and gate/up share one input ``copy_to_tp`` each (``SharedInputCopy`` hooks on the
    Attention and FeedForward modules; see the module docstring). Collective when the KV heads
    are replicated (the sharing subgroups are created on every rank). The model must hold real
    full weights (not meta tensors), or be on the meta device (the sharded build); move it to
    its device before or after, as convenient (shards keep the full weights' device and dtype).
    """
    cfg = model.cfg
    kv_mode = check_tp_compatible(cfg, state.tp_size)
    tied = cfg.tie_embeddings and model.output.weight is model.tok_embeddings.weight
    replica_group = state.subgroup(kv_sharing_partition(cfg, state)) if kv_mode == "replicate" else None
    kv_range = kv_rows(cfg, state.tp_size, state.tp_rank)
    for layer in model.layers:
        attn, ffn = layer.attention, layer.feed_forward
        attn.wq = ColumnParallelLinear.from_linear(attn.wq, state, copy_input=False)
        kv = dict(out_range=kv_range, replica_group=replica_group, copy_input=False)
        attn.wk = ColumnParallelLinear.from_linear(attn.wk, state, **kv)
        attn.wv = ColumnParallelLinear.from_linear(attn.wv, state, **kv)
        attn.wo = RowParallelLinear.from_linear(attn.wo, state)
        ffn.w1 = ColumnParallelLinear.from_linear(ffn.w1, state, copy_input=False)
        ffn.w3 = ColumnParallelLinear.from_linear(ffn.w3, state, copy_input=False)
        ffn.w2 = RowParallelLinear.from_linear(ffn.w2, state)
        if attn.q_norm is not None:
            attn.q_norm = HeadNorm.from_norm(attn.q_norm, state)
            attn.k_norm = HeadNorm.from_norm(attn.k_norm, state)
        if state.tp_size > 1:
            share_input_copy(attn, state)
            share_input_copy(ffn, state)
    embedding = VocabParallelEmbedding.from_embedding(model.tok_embeddings, state)
    head = VocabParallelHead.from_linear(model.output, state)
    if tied:
        head.weight = embedding.weight  # one Parameter: both shard the vocabulary identically
    model.tok_embeddings, model.output = embedding, head
    return model


def loss_fn(logits: torch.Tensor, targets: torch.Tensor, state: ParallelState,
            ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32: plain at tp = 1, vocab-parallel on sharded logits."""
    if state.tp_size == 1:
        return cross_entropy(logits, targets, ignore_index)
    return vocab_parallel_cross_entropy(logits, targets, state, "mean", ignore_index)


def clip_grad_norm_(parameters: Iterable[nn.Parameter], max_norm: float,
                    state: ParallelState) -> torch.Tensor:
    """Global L2 gradient norm of a TP model, and clip to ``max_norm`` when it is finite and > 0.
    Same rule as DeepSpeed: a parameter counts on every TP rank when it is TP-sharded
    (``tensor_model_parallel``), on TP rank 0 only otherwise; squares are summed over the TP
    group. Gradients must already be reduced over data parallelism (the trainer's ZeRO-0 step,
    runs without DeepSpeed). Returns the norm as a device tensor: nothing waits for the device.

    Per-tensor norms and the scaling are one ``torch._foreach_*`` call each (torch's own
    clip_grad_norm_ does the same), not a Python loop of small kernels per parameter."""
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return torch.zeros((), dtype=torch.float32)
    grads = [p.grad.detach() for p in params]
    counted = [g.float() for p, g in zip(params, grads) if is_tp_sharded(p) or state.tp_rank == 0]
    total = (torch.stack(torch._foreach_norm(counted, 2.0)).pow(2).sum() if counted
             else torch.zeros((), dtype=torch.float32, device=grads[0].device))
    if state.tp_size > 1:
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=state.tp_group)
    norm = total.sqrt()
    if 0 < max_norm < float("inf"):
        scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for dtype in {g.dtype for g in grads}:
            torch._foreach_mul_([g for g in grads if g.dtype == dtype], scale.to(dtype))
    return norm


# --------------------------------------------------------------------------- state dicts
def _kind(key: str) -> str:
    """How a GPT state-dict entry is cut: "rows", "cols", "kv" (rows by the KV rule) or
    "replicated". A q/k/v bias is cut with its weight's rows; per-head q/k norm gains (shared by
    all heads) are replicated."""
    parts = key.split(".")
    if parts[-2:] in (["tok_embeddings", "weight"], ["output", "weight"]):
        return "rows"
    if len(parts) >= 3 and parts[-1] in ("weight", "bias"):
        module = parts[-3:-1]
        if module in (["attention", "wq"], ["feed_forward", "w1"], ["feed_forward", "w3"]):
            return "rows"
        if module in (["attention", "wk"], ["attention", "wv"]):
            return "kv"
        if module in (["attention", "wo"], ["feed_forward", "w2"]) and parts[-1] == "weight":
            return "cols"
    return "replicated"


StateDict = dict[str, torch.Tensor]


def tp_box(key: str, shape: tuple[int, ...], cfg: ModelConfig, tp: TPSpec) -> tuple[tuple[int, ...], tuple[int, ...], bool]:
    """Where TP rank ``tp``'s shard of the single-device tensor ``key`` (of ``shape``) sits in it:
    (offsets, sizes, primary). ``primary`` is False on the ranks holding a copy another rank also
    holds (a replicated tensor off TP rank 0; a replicated KV head off the first rank sharing it),
    so that one rank of each set writes it. The box ``shard_state_dict`` cuts."""
    tp_size, tp_rank = _tp_of(tp)
    kind = _kind(key)
    offsets, sizes = [0] * len(shape), list(shape)
    if kind == "replicated":
        return tuple(offsets), tuple(sizes), tp_rank == 0
    dim = 1 if kind == "cols" else 0
    primary = True
    if kind == "kv":
        start, stop = kv_rows(cfg, tp_size, tp_rank)
        if check_tp_compatible(cfg, tp_size) == "replicate":
            primary = tp_rank % (tp_size // cfg.kv_heads) == 0
    else:
        start, stop = shard_range(shape[dim], tp_size, tp_rank, f"{key} dimension {dim}")
    offsets[dim], sizes[dim] = start, stop - start
    return tuple(offsets), tuple(sizes), primary


def shard_state_dict(full_sd: StateDict, cfg: ModelConfig, tp: TPSpec) -> StateDict:
    """The state dict a parallelized GPT holds on TP rank ``tp`` (a ParallelState or a
    (tp_size, tp_rank) pair), cut from a single-device GPT's state dict. Same keys; shards are
    fresh contiguous tensors (saving one does not save the full storage). Pure; no communication.
    """
    tp_size, tp_rank = _tp_of(tp)
    check_tp_compatible(cfg, tp_size)
    out: dict[str, torch.Tensor] = {}
    for key, value in full_sd.items():
        offsets, sizes, _ = tp_box(key, tuple(value.shape), cfg, (tp_size, tp_rank))
        shard = value.detach()
        for dim, (o, s) in enumerate(zip(offsets, sizes)):
            shard = shard.narrow(dim, o, s)
        out[key] = shard.clone()
    return out


def merge_state_dicts(shards: list[StateDict], cfg: ModelConfig, tp_size: int) -> StateDict:
    """Inverse of ``shard_state_dict``: the single-device state dict from the ``tp_size`` ranks'
    state dicts (in TP-rank order). Replicated KV heads are taken from the first rank holding
    each; replicated tensors from rank 0. With tied embeddings the result's "output.weight" is
    the same tensor as "tok_embeddings.weight", as in a single-device GPT's state dict.
    """
    if len(shards) != tp_size:
        raise ValueError(f"merge_state_dicts got {len(shards)} shards for tp={tp_size}")
    kv_mode = check_tp_compatible(cfg, tp_size)
    owners = range(tp_size) if kv_mode == "split" else range(0, tp_size, tp_size // cfg.kv_heads)
    full: dict[str, torch.Tensor] = {}
    for key, first in shards[0].items():
        kind = _kind(key)
        if kind == "replicated":
            full[key] = first.detach().clone()
        elif kind == "kv":
            full[key] = torch.cat([shards[r][key].detach() for r in owners], dim=0)
        else:
            full[key] = torch.cat([s[key].detach() for s in shards], dim=1 if kind == "cols" else 0)
    for key in full:
        parts = key.split(".")
        if cfg.tie_embeddings and parts[-2:] == ["output", "weight"]:
            emb_key = ".".join(parts[:-2] + ["tok_embeddings", "weight"])
            if emb_key in full and torch.equal(full[emb_key], full[key]):
                full[key] = full[emb_key]
    return full


def gather_full_state_dict(model: GPT, state: ParallelState,
                           tensors: Optional[StateDict] = None) -> StateDict:
    """All-gather the TP shards of ``model.state_dict()`` (or of ``tensors``, any dict keyed like
    it, e.g. parameter gradients) and merge them into the full single-device layout, returned on
    every rank of the TP group. Collective over the TP group; tensors must be materialised
    (under ZeRO-3, gather the parameters first).
    """
    local = model.state_dict() if tensors is None else tensors
    if state.tp_size == 1:
        return {k: v.detach().clone() for k, v in local.items()}
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(state.tp_size)]
    for key, value in local.items():
        value = value.detach().contiguous()
        parts = [torch.empty_like(value) for _ in range(state.tp_size)]
        dist.all_gather(parts, value, group=state.tp_group)
        for r, part in enumerate(parts):
            shards[r][key] = part
    return merge_state_dicts(shards, model.cfg, state.tp_size)
