"""The loss computed by the output head (``GPT.forward(tokens, targets)``) against the plain path.

- plain: full fp32 logits then cross-entropy, the reference (``cross_entropy(GPT(tokens))``);
- chunked (torch) equals it within 1e-10 in float64 and 1e-5 in fp32, losses and every parameter
  gradient, tied and untied heads, ignored targets, a chunk size that does not divide the tokens;
- fused (Triton; on CPU through the interpreter, TRITON_INTERPRET=1 set by conftest.py) in fp32;
- memory: the plain path's autograd graph saves a tensor of N*V elements (N = B*T tokens) and
  produces one; the chunked and fused ones do neither (``SavedTensors``, ``LargestOutput``);
- TP=2 (two gloo ranks, ``run_tp2``): the vocab-parallel head's plain / chunked / fused losses and
  gathered gradients equal single-device plain ones within 1e-5;
- the head keeps the model's initialisation bit-identical (a by-hand replay of the RNG draws),
  and the new config fields validate and are ignored by ``model_diff``.

The helpers here (``make_model``, ``batch``, ``SavedTensors``, ``run_tp2``...) are shared with
test_activation_checkpointing.py. Run as a script, this file is one TP rank (see ``run_tp2``).
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from megareuse.config import ConfigError, ModelConfig, load_config
from megareuse.model import GPT, cross_entropy
from megareuse.model.head import resolve_loss

TINY = dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=128, max_seq_len=32)
B, T, CHUNK = 3, 32, 40  # N = 96 tokens: chunks of 40, 40, 16
HAS_TRITON = importlib.util.find_spec("triton") is not None
DEVICE = "cuda" if os.environ.get("MEGAREUSE_TEST_GPU") == "1" else "cpu"


def make_model(seed=0, **cfg) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(**{**TINY, "loss_chunk_tokens": CHUNK, **cfg}))


def batch(seed=1, b=B, t=T, vocab=TINY["vocab_size"]):
    """tokens [b, t] and next-token targets with a few ignored (-100) positions."""
    seq = torch.randint(0, vocab, (b, t + 1), generator=torch.Generator().manual_seed(seed))
    targets = seq[:, 1:].clone()
    targets[0, :5] = -100
    targets[-1, -1] = -100
    return seq[:, :-1], targets


def loss_and_grads(model: nn.Module, tokens, targets, plain_logits=False):
    """One forward/backward; the loss from the head, or from ``cross_entropy(model(tokens))``."""
    model.zero_grad(set_to_none=True)
    loss = cross_entropy(model(tokens), targets) if plain_logits else model(tokens, targets)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def assert_close(actual, expected, rtol, what=""):
    """rtol, and atol = rtol x the largest reference magnitude (entries that cancel to ~0)."""
    atol = rtol * max(expected.abs().max().item(), 1e-30)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def assert_same_run(got, ref, rtol, what=""):
    (loss, grads), (ref_loss, ref_grads) = got, ref
    assert abs(loss.item() - ref_loss.item()) <= rtol * abs(ref_loss.item()), (what, loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        assert_close(grads[name], grad, rtol, f"{what} grad {name}")


class SavedTensors:
    """Records what autograd saves for the backward (unique storages; parameters and buffers of
    ``model`` excluded): ``bytes`` in total and the ``largest`` saved tensor's element count."""

    def __init__(self, model: nn.Module):
        self.exclude = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        self.storages: dict[int, int] = {}
        self.largest = 0

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self.exclude:
            self.storages[ptr] = t.untyped_storage().nbytes()
            self.largest = max(self.largest, t.numel())
        return t

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


class LargestOutput(TorchDispatchMode):
    """The largest element count of any tensor an op produces while active (forward and backward)."""

    numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        sizes = [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.numel = max([self.numel, *sizes])
        return out


def _hidden(model, tokens):
    """The last block's output (before the final norm), as GPT.forward computes it."""
    cos, sin = model.rope(tokens.shape[1])
    h = model.tok_embeddings(tokens)
    for layer in model.layers:
        h = layer(h, cos, sin)
    return h


# --------------------------------------------------------------------------- single process
def reference_init(cfg: ModelConfig, seed: int) -> dict:
    """GPT(cfg)'s weights after torch.manual_seed(seed), replayed by hand: the default inits of
    nn.Embedding / nn.Linear at construction (they consume the RNG), then init_weights' normals
    in module order (residual output projections scaled), norms ones, a tied head shared."""
    d, V, F, hd = cfg.d_model, cfg.vocab_size, cfg.ffn_hidden, cfg.head_size
    proj = {"attention.wq": (cfg.n_heads * hd, d), "attention.wk": (cfg.kv_heads * hd, d),
            "attention.wv": (cfg.kv_heads * hd, d), "attention.wo": (d, cfg.n_heads * hd),
            "feed_forward.w1": (F, d), "feed_forward.w3": (F, d), "feed_forward.w2": (d, F)}
    torch.manual_seed(seed)
    torch.empty(V, d).normal_()
    for shape in [*proj.values()] * cfg.n_layers + [(V, d)]:
        nn.init.kaiming_uniform_(torch.empty(shape), a=math.sqrt(5))
    std, scaled = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.n_layers)
    sd = {"tok_embeddings.weight": torch.empty(V, d).normal_(0, std)}
    for i in range(cfg.n_layers):
        sd[f"layers.{i}.attention_norm.weight"] = torch.ones(d)
        for name, shape in proj.items():
            if name == "feed_forward.w1":
                sd[f"layers.{i}.ffn_norm.weight"] = torch.ones(d)
            residual = name.endswith(("wo", "w2"))
            sd[f"layers.{i}.{name}.weight"] = torch.empty(shape).normal_(0, scaled if residual else std)
    sd["norm.weight"] = torch.ones(d)
    sd["output.weight"] = sd["tok_embeddings.weight"] if cfg.tie_embeddings else torch.empty(V, d).normal_(0, std)
    return sd


@pytest.mark.parametrize("tie", [True, False])
def test_initialisation_unchanged(tie):
    model = make_model(seed=7, tie_embeddings=tie, loss="chunked")
    got, want = model.state_dict(), reference_init(model.cfg, 7)
    assert list(got) == list(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert [n for n, _ in model.output.named_parameters(remove_duplicate=False)] == ["weight"]
    assert (model.output.weight is model.tok_embeddings.weight) == tie


def test_logits_path_unchanged_and_plain_loss_is_cross_entropy_of_logits():
    model, (tokens, targets) = make_model(loss="plain"), batch()
    logits = model(tokens)
    assert logits.shape == (B, T, TINY["vocab_size"]) and logits.dtype == torch.float32
    assert torch.equal(logits, model.output(model.norm(_hidden(model, tokens))).float())
    assert torch.equal(model(tokens, targets), cross_entropy(logits, targets))


@pytest.mark.parametrize("chunk", [CHUNK, 7, 1000], ids=["ragged", "many", "one-chunk"])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["fp64", "fp32"])
def test_chunked_equals_plain(dtype, rtol, tie, chunk):
    tokens, targets = batch()
    ref = loss_and_grads(make_model(tie_embeddings=tie, loss="plain").to(dtype), tokens, targets)
    got = loss_and_grads(make_model(tie_embeddings=tie, loss="chunked", loss_chunk_tokens=chunk).to(dtype),
                         tokens, targets)
    assert got[0].dtype == dtype  # fp32 loss for fp32 (and lower) models, fp64 stays fp64
    assert_same_run(got, ref, rtol, f"chunked {dtype} tie={tie} chunk={chunk}")


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_fused_equals_plain_fp32(tie):
    tokens, targets = batch()
    ref = loss_and_grads(make_model(tie_embeddings=tie, loss="plain").to(DEVICE), tokens.to(DEVICE),
                         targets.to(DEVICE))
    got = loss_and_grads(make_model(tie_embeddings=tie, loss="fused").to(DEVICE), tokens.to(DEVICE),
                         targets.to(DEVICE))
    assert_same_run(got, ref, 1e-5, f"fused tie={tie}")


def test_auto_is_chunked_on_cpu_unless_one_chunk_holds_all():
    assert resolve_loss("auto", torch.zeros(3, 4), chunk_tokens=2) == "chunked"
    assert resolve_loss("auto", torch.zeros(2, 3, 4, dtype=torch.float64), chunk_tokens=4) == "chunked"
    assert resolve_loss("auto", torch.zeros(2, 2, 4), chunk_tokens=4) == "plain"  # one chunk: no gain
    assert resolve_loss("plain", torch.zeros(3, 4), chunk_tokens=2) == "plain"


@pytest.mark.parametrize("impl", ["plain", "chunked"] + (["fused"] if HAS_TRITON else []))
def test_head_never_holds_all_logits(impl):
    """The plain graph saves (and the plain pass creates) an [N, V] tensor; chunked / fused never
    create a tensor of N*V elements, forward or backward (chunks of 16 rows: 16*V, V*d, N*d)."""
    model, (tokens, targets) = make_model(loss=impl, loss_chunk_tokens=16), batch(b=4)
    h = model.norm(_hidden(model, tokens)).detach().requires_grad_()
    n_logits = h.shape[0] * h.shape[1] * TINY["vocab_size"]
    with SavedTensors(model) as saved, LargestOutput() as created:
        model.output(h, targets).backward()
    print(f"\n{impl}: saved {saved.bytes} B (largest {saved.largest} elements), largest created "
          f"{created.numel}; full logits {n_logits} elements = {4 * n_logits} B fp32")
    if impl == "plain":
        assert saved.largest >= n_logits and created.numel >= n_logits
        return
    assert saved.largest < n_logits and created.numel < n_logits
    if impl == "chunked":  # the hooks did see the Function's saved tensors: hidden [N, d]
        assert saved.largest == h.numel() and saved.bytes < 2 * h.numel() * 4


def test_loss_config_fields_validate():
    cfg = load_config(None, ["model.loss=chunked", "model.loss_chunk_tokens=64"])
    assert (cfg.model.loss, cfg.model.loss_chunk_tokens) == ("chunked", 64)
    for override, words in [("model.loss=fast", "model.loss = 'fast': accepted one of plain, chunked, fused, auto"),
                            ("model.loss_chunk_tokens=0", "model.loss_chunk_tokens = 0: accepted a positive")]:
        with pytest.raises(ConfigError) as err:
            load_config(None, [override])
        assert words in str(err.value) and "\n" not in str(err.value)


def test_model_diff_ignores_runtime_fields():
    from megareuse.engine.init_source import model_diff

    current = asdict(ModelConfig(attention="eager", activation_checkpointing="full", checkpoint_every=3,
                                 loss="chunked", loss_chunk_tokens=64))
    old = {k: v for k, v in asdict(ModelConfig()).items() if k not in ModelConfig.RUNTIME_FIELDS}
    assert set(ModelConfig.RUNTIME_FIELDS) < set(current)
    assert model_diff(old, current) == []  # a checkpoint from before these fields existed
    assert model_diff({**old, "attention": "sdpa", "loss": "plain"}, current) == []
    assert model_diff({**old, "d_model": 32}, current) == ["model.d_model: checkpoint 32 vs config 96"]


# --------------------------------------------------------------------------- two TP ranks
def run_tp2(worker: str, tmp_path: Path, timeout: float = 150) -> list:
    """Run ``worker`` ("module:function", a function of the ParallelState) on 2 gloo ranks with
    TP=2, each a process running this file; return each rank's result (rank order)."""
    from distributed_utils import base_env, finish, start

    from megareuse.parallel.launch import free_port

    port = free_port()
    procs = [start([sys.executable, __file__, worker, str(tmp_path)],
                   base_env(RANK=r, WORLD_SIZE=2, MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                            GLOO_SOCKET_IFNAME="lo"))
             for r in range(2)]
    outputs = [finish(p, timeout) for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-4000:]
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _rank_main(worker: str, out_dir: str) -> None:
    from megareuse.parallel.state import init_parallel_state

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    module, function = worker.split(":")
    result = getattr(importlib.import_module(module), function)(init_parallel_state(2, timeout_s=60))
    torch.save(result, Path(out_dir) / f"rank{dist.get_rank()}.pt")
    dist.destroy_process_group()


def tp_run(state, tokens, targets, plain_logits=False, **cfg) -> tuple:
    """(loss, full gradients) of a TP GPT built like ``make_model(**cfg)`` (collective)."""
    from megareuse.parallel.tensor_parallel import gather_full_state_dict, loss_fn, parallelize_model

    model = parallelize_model(make_model(**cfg), state)
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model(tokens), targets, state) if plain_logits else model(tokens, targets)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return loss.detach(), gather_full_state_dict(model, state, grads)


TP_IMPLS = ["plain", "chunked"] + (["fused"] if HAS_TRITON else [])


def tp_losses(state) -> dict:
    tokens, targets = batch()
    out = {}
    for tie in (True, False):
        out[tie, "loss_fn"] = tp_run(state, tokens, targets, plain_logits=True, tie_embeddings=tie)
        for impl in TP_IMPLS:
            out[tie, impl] = tp_run(state, tokens, targets, tie_embeddings=tie, loss=impl)
    return out


def test_vocab_parallel_head_tp2_matches_single_device(tmp_path):
    results = run_tp2("test_lm_loss:tp_losses", tmp_path)
    tokens, targets = batch()
    for tie in (True, False):
        ref = loss_and_grads(make_model(tie_embeddings=tie, loss="plain"), tokens, targets, plain_logits=True)
        for impl in ["loss_fn", *TP_IMPLS]:
            for rank, res in enumerate(results):
                assert_same_run(res[tie, impl], ref, 1e-5, f"TP=2 rank {rank} {impl} tie={tie}")


if __name__ == "__main__":
    _rank_main(*sys.argv[1:])
