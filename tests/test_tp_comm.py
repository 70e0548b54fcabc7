"""Tensor-parallel communication (issue #27, item 6) and DeepSpeed's communication settings.

Megatron-LM's pattern per transformer block under TP: 2 all-reduces in the forward pass (the
row-parallel outputs of wo and w2) and 2 in the backward pass (the input gradients of the
attention and of the FFN: q/k/v share one ``copy_to_tp`` of their input, gate/up another), plus
per step the embedding's forward all-reduce, the vocab-parallel cross-entropy's three [tokens]
all-reduces and the head input's backward one. Two gloo ranks at TP=2 (``run_tp2`` of
test_lm_loss.py, bounded in time) count every collective issued through torch.distributed
(``all_reduce``, ``all_gather``, ``reduce_scatter``, ``broadcast``...: a wrapper records phase,
function and group) for models of 1 and 3 blocks: the difference / 2 is the per-block count,
the rest the per-step one. The former layout (every column-parallel layer with its own
``copy_to_tp``, rebuilt here by ``per_projection_copies``) is counted as a control: 5 backward
all-reduces per block, with the same loss and gradients. Under full activation checkpointing the
recomputed forward repeats wo's all-reduce inside the backward pass (3 per block there; the
recomputation stops before w2's, whose output no backward needs), and
with KV heads replicated (tp > n_kv_heads) the wk/wv weight gradients are summed over the
sharing subgroup (2 more per block, on that subgroup). torch.compile of the blocks (aot_eager,
fullgraph: dynamo traces the pre-hooks and the autograd functions into one graph per block;
inductor only changes the code it emits, checked by hand: the same single graph, gradients
within 6e-7) gives the eager loss and gradients.

The bucket rule, ``overlap_comm`` and ``PYTORCH_CUDA_ALLOC_CONF`` (CUDA mocked) are unit tests.
"""
from __future__ import annotations

import inspect
import json
import os
from collections import Counter

import pytest
import torch
import torch.distributed as dist

from megareuse.config import Config, ModelConfig
from megareuse.engine import ds
from megareuse.model.flops import layer_param_count, param_count
from test_lm_loss import assert_same_run, batch, loss_and_grads, make_model, run_tp2

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
               "broadcast", "reduce", "all_to_all", "all_to_all_single")
LAYERS = (1, 3)
# name -> model overrides; how the loss is taken ("logits": loss_fn on the vocab-parallel logits,
# "head": the model's own head with targets)
CASES = {
    "gqa_split_tied_logits": (dict(n_kv_heads=2, tie_embeddings=True), "logits"),
    "gqa_replicated_untied_chunked": (dict(n_kv_heads=1, tie_embeddings=False, loss="chunked"), "head"),
    "full_checkpointing": (dict(activation_checkpointing="full", loss="chunked"), "head"),
    "per_projection_copies": (dict(n_kv_heads=2, tie_embeddings=True), "logits"),  # the former layout
}


# --------------------------------------------------------------------------- inside the ranks
class CollectiveCounter:
    """Counts torch.distributed collectives by (phase, function, group) while active; the group
    is "tp" (the TP group), "kv" (the replicated-KV subgroup) or its ranks."""

    def __init__(self, state, kv_group=None):
        self.state, self.kv_group = state, kv_group
        self.phase, self.counts, self.saved = "idle", Counter(), {}

    def _label(self, group) -> str:
        if group is self.state.tp_group:
            return "tp"
        if group is not None and group is self.kv_group:
            return "kv"
        return "world" if group is None else str(dist.get_process_group_ranks(group))

    def _wrap(self, name, fn):
        signature = inspect.signature(fn)

        def counted(*args, **kwargs):
            group = signature.bind(*args, **kwargs).arguments.get("group")
            self.counts[self.phase, name, self._label(group)] += 1
            return fn(*args, **kwargs)
        return counted

    def __enter__(self):
        self.saved = {n: getattr(dist, n) for n in COLLECTIVES if hasattr(dist, n)}
        for name, fn in self.saved.items():
            setattr(dist, name, self._wrap(name, fn))
        return self

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(dist, name, fn)


def per_projection_copies(model) -> None:
    """The layout before issue #27: each column-parallel projection does its own copy_to_tp."""
    from megareuse.parallel.tensor_parallel import SharedInputCopy

    for layer in model.layers:
        for module in (layer.attention, layer.feed_forward):
            for key, hook in list(module._forward_pre_hooks.items()):
                if isinstance(hook, SharedInputCopy):
                    del module._forward_pre_hooks[key]
                    module._forward_pre_hooks_with_kwargs.pop(key, None)
        for proj in (layer.attention.wq, layer.attention.wk, layer.attention.wv,
                     layer.feed_forward.w1, layer.feed_forward.w3):
            proj.copy_input = True


def _build(state, name, n_layers):
    from megareuse.parallel.tensor_parallel import parallelize_model

    overrides, how = CASES[name]
    model = parallelize_model(make_model(n_layers=n_layers, **overrides), state)
    if name == "per_projection_copies":
        per_projection_copies(model)
    kv = model.layers[0].attention.wk.replica_group
    return model, how, kv


def _step(model, how, state, tokens, targets, counter=None):
    """One forward (loss) and backward, counted by phase when ``counter`` is given."""
    from megareuse.parallel.tensor_parallel import loss_fn

    model.zero_grad(set_to_none=True)
    if counter is not None:
        counter.phase = "forward"
    loss = loss_fn(model(tokens), targets, state) if how == "logits" else model(tokens, targets)
    if counter is not None:
        counter.phase = "backward"
    loss.backward()
    if counter is not None:
        counter.phase = "idle"
    return loss.detach()


def _gathered(model, state, loss):
    from megareuse.parallel.tensor_parallel import gather_full_state_dict

    grads = {n: p.grad for n, p in model.named_parameters()}
    return loss, gather_full_state_dict(model, state, grads)


def comm_counts(state) -> dict:
    """Rank worker: every case's collective counts at 1 and 3 blocks, its loss and gathered
    gradients at 3 blocks, and the compiled blocks' loss and gradients."""
    tokens, targets = batch()
    out = {"tp_ranks": state.tp_ranks}
    for name in CASES:
        counts = {}
        for n_layers in LAYERS:
            model, how, kv = _build(state, name, n_layers)
            with CollectiveCounter(state, kv) as counter:
                loss = _step(model, how, state, tokens, targets, counter)
            counts[n_layers] = {"/".join(k): v for k, v in counter.counts.items()}
        out[name] = dict(counts=counts, run=_gathered(model, state, loss))
    # torch.compile of every block (what model.compile does, with a backend that needs no C++
    # toolchain): the shared copy's hook and the mappings' autograd functions are traced, each
    # block one graph (fullgraph: a graph break would raise)
    compiled, how, _ = _build(state, "gqa_split_tied_logits", 2)
    for layer in compiled.layers:
        layer.compile(backend="aot_eager", fullgraph=True)
    eager, _, _ = _build(state, "gqa_split_tied_logits", 2)
    out["compiled"] = _gathered(compiled, state, _step(compiled, how, state, tokens, targets))
    out["eager"] = _gathered(eager, state, _step(eager, how, state, tokens, targets))
    return out


# --------------------------------------------------------------------------- the tests
@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_tp2("test_tp_comm:comm_counts", tmp_path_factory.mktemp("tp_comm"), timeout=240)


def split_counts(counts: dict) -> tuple[Counter, Counter]:
    """(per block, per step) from the counts at 1 and 3 blocks."""
    one, three = Counter(counts[1]), Counter(counts[3])
    per_block = Counter({k: (three[k] - one[k]) // 2 for k in set(one) | set(three)})
    assert all((three[k] - one[k]) % 2 == 0 for k in per_block), (one, three)
    per_step = Counter({k: one[k] - per_block[k] for k in one})
    return +per_block, +per_step


# expected per block and per step, keyed "phase/function/group" (zero counts left out)
MEGATRON_BLOCK = {"forward/all_reduce/tp": 2, "backward/all_reduce/tp": 2}
STEP = {"forward/all_reduce/tp": 1 + 3,  # the embedding; the cross-entropy's max, sum exp, target logit
        "backward/all_reduce/tp": 1}  # the head's input gradient (plain: copy_to_tp; chunked: its own)
EXPECTED = {
    "gqa_split_tied_logits": (MEGATRON_BLOCK, STEP),
    "gqa_replicated_untied_chunked": ({**MEGATRON_BLOCK, "backward/all_reduce/kv": 2}, STEP),  # wk, wv weights
    # + wo's all-reduce recomputed; w2's is not: its output is saved by nothing (a residual add), and
    # torch's non-reentrant checkpoint stops recomputing once every saved tensor is back
    "full_checkpointing": ({"forward/all_reduce/tp": 2, "backward/all_reduce/tp": 2 + 1}, STEP),
    "per_projection_copies": ({"forward/all_reduce/tp": 2, "backward/all_reduce/tp": 5}, STEP),  # q k v gate up
}


@pytest.mark.parametrize("name", list(CASES))
def test_all_reduces_per_block_and_per_step(ranks, name):
    for rank, res in enumerate(ranks):
        per_block, per_step = split_counts(res[name]["counts"])
        want_block, want_step = EXPECTED[name]
        assert dict(per_block) == want_block, (name, rank, dict(per_block), res[name]["counts"])
        assert dict(per_step) == want_step, (name, rank, dict(per_step), res[name]["counts"])


def test_megatron_pattern_saves_three_backward_all_reduces_per_block(ranks):
    for res in ranks:
        shared = split_counts(res["gqa_split_tied_logits"]["counts"])[0]
        former = split_counts(res["per_projection_copies"]["counts"])[0]
        assert former["backward/all_reduce/tp"] - shared["backward/all_reduce/tp"] == 3
        assert former["forward/all_reduce/tp"] == shared["forward/all_reduce/tp"] == 2


def test_losses_and_gradients_equal_single_device_and_the_former_layout(ranks):
    tokens, targets = batch()
    for name, (overrides, how) in CASES.items():
        ref = loss_and_grads(make_model(n_layers=LAYERS[-1], **overrides), tokens, targets,
                             plain_logits=how == "logits")
        for rank, res in enumerate(ranks):
            assert_same_run(res[name]["run"], ref, 1e-5, f"{name} rank {rank} vs single device")
    for rank, res in enumerate(ranks):
        assert_same_run(res["gqa_split_tied_logits"]["run"], res["per_projection_copies"]["run"], 1e-5,
                        f"rank {rank} shared vs per-projection copies")


def test_compiled_blocks_give_the_eager_loss_and_gradients(ranks):
    for rank, res in enumerate(ranks):
        assert_same_run(res["compiled"], res["eager"], 1e-5, f"rank {rank} compiled vs eager")


def test_parameters_and_state_dict_keys_stay_per_matrix():
    """Single process at TP=1 shape-wise: parallelize_model keeps one parameter per matrix."""
    from megareuse.parallel.state import ParallelState
    from megareuse.parallel.tensor_parallel import SharedInputCopy, parallelize_model

    single = ParallelState(tp_size=1, dp_size=1, tp_rank=0, dp_rank=0, rank=0, world_size=1)
    model = make_model()
    keys = list(model.state_dict())
    parallelize_model(model, single)
    assert list(model.state_dict()) == keys
    assert {"layers.0.attention.wq.weight", "layers.0.attention.wk.weight", "layers.0.attention.wv.weight",
            "layers.0.feed_forward.w1.weight", "layers.0.feed_forward.w3.weight"} <= set(keys)
    assert not model.layers[0].attention.wq.copy_input  # the hook enters the TP region instead
    # at tp = 1 there is nothing to enter: no hook
    assert not any(isinstance(h, SharedInputCopy) for h in model.layers[0].attention._forward_pre_hooks.values())


def test_shared_input_copy_hook_takes_positional_or_keyword_input():
    from megareuse.parallel.state import ParallelState
    from megareuse.parallel.tensor_parallel import SharedInputCopy

    hook = SharedInputCopy(ParallelState(tp_size=1, dp_size=1, tp_rank=0, dp_rank=0, rank=0, world_size=1))
    x, cos = torch.ones(2), torch.zeros(2)
    args, kwargs = hook(None, (x, cos), {})
    assert args[0] is x and args[1] is cos and kwargs == {}
    args, kwargs = hook(None, (), {"x": x})
    assert args == () and kwargs["x"] is x
    with pytest.raises(TypeError, match="without its input x"):
        hook(torch.nn.Identity(), (), {})


# --------------------------------------------------------------------------- DeepSpeed settings
def model_cfg(name: str) -> ModelConfig:
    import yaml

    from distributed_utils import REPO
    return ModelConfig(**yaml.safe_load((REPO / "configs" / "model" / f"{name}.yaml").read_text())["model"])


def test_bucket_rule_megatron_size_capped_at_the_rank_parameters():
    big = model_cfg("llama_1b")  # 1.1B parameters
    assert ds.bucket_sizes(big, tp=1, dp=8)["reduce_bucket_size"] == 40_000_000  # Megatron's floor
    assert ds.bucket_sizes(big, tp=2, dp=64)["reduce_bucket_size"] == 64_000_000  # 1M x DP
    assert ds.bucket_sizes(big, tp=1, dp=512)["reduce_bucket_size"] == 512_000_000
    # llama_1b at TP=8: 137.5M parameters a rank; DP=256 asks for 256M: capped at the rank's share
    assert ds.bucket_sizes(big, tp=8, dp=256)["reduce_bucket_size"] == -(-param_count(big) // 8)
    for name in ("tiny", "llama_25m"):  # small models: one bucket, never larger than the rank's share
        small = model_cfg(name)
        for tp, dp in [(1, 1), (1, 8), (2, 4)]:
            got = ds.bucket_sizes(small, tp=tp, dp=dp)
            assert got["reduce_bucket_size"] == got["allgather_bucket_size"] == -(-param_count(small) // tp)
    # ZeRO-3: one layer prefetched; residency = largest unit (embedding or layer) + prefetch
    got = ds.bucket_sizes(big, tp=2, dp=4)
    layer = -(-layer_param_count(big) // 2)
    unit = max(layer, big.vocab_size * big.d_model // 2)
    assert got["stage3_prefetch_bucket_size"] == layer
    assert (got["stage3_max_live_parameters"], got["stage3_max_reuse_distance"]) == (unit + layer, unit)
    assert got["stage3_param_persistence_threshold"] == 10 * big.d_model
    # monotone in DP, never below the floor unless the model is smaller
    sizes = [ds.bucket_sizes(big, 1, dp)["reduce_bucket_size"] for dp in (1, 2, 40, 41, 100, 1000)]
    assert sizes == sorted(sizes) and sizes[0] == 40_000_000


def _config(stage: int, tp: int = 1, ds_config=None) -> Config:
    raw = {"model": dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4, ffn_hidden=128, max_seq_len=32),
           "data": {"seq_len": 32}, "parallel": {"zero_stage": stage, "tp": tp}}
    if ds_config is not None:
        raw["parallel"]["ds_config"] = str(ds_config)
    return Config.from_dict(raw).validate()


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_generated_zero_config_overlaps_at_zero_1_to_3(stage):
    cfg = _config(stage, tp=2)
    zero = ds.deepspeed_config(cfg, dp_size=4)["zero_optimization"]
    assert zero["stage"] == stage
    assert zero.get("overlap_comm") is (True if stage >= 1 else None)
    assert {k: zero[k] for k in ds.bucket_sizes(cfg.model, 2, 4)} == ds.bucket_sizes(cfg.model, 2, 4)
    assert zero["reduce_bucket_size"] == -(-param_count(cfg.model) // 2)  # a tiny model: capped


def test_a_users_ds_config_overrides_buckets_and_overlap(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2, "overlap_comm": False,
                                                      "reduce_bucket_size": 123}}))
    zero = ds.deepspeed_config(_config(2, ds_config=path), dp_size=2)["zero_optimization"]
    generated = ds.bucket_sizes(_config(2).model, 1, 2)
    assert zero["overlap_comm"] is False and zero["reduce_bucket_size"] == 123
    # what the user leaves out stays generated
    assert zero["allgather_bucket_size"] == generated["allgather_bucket_size"]
    assert zero["stage3_max_live_parameters"] == generated["stage3_max_live_parameters"]


ALLOC = ds.ALLOC_CONF_VARS


@pytest.fixture
def clean_env(monkeypatch):
    """_select_accelerator's variables as they are now, restored after the test."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # never let a mocked CUDA pick DeepSpeed's accelerator
    for key in ("TORCH_EXTENSIONS_DIR", *ALLOC):
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_expandable_segments_set_on_cuda_before_it_starts(clean_env):
    clean_env.setattr(torch.cuda, "is_available", lambda: True)
    ds._select_accelerator()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert os.environ["DS_ACCELERATOR"] == "cpu"  # a value already set is kept


@pytest.mark.parametrize("user", [("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128"),
                                  ("PYTORCH_ALLOC_CONF", "expandable_segments:False"),
                                  ("PYTORCH_CUDA_ALLOC_CONF", "")])
def test_a_users_allocator_setting_is_left_alone(clean_env, user):
    clean_env.setattr(torch.cuda, "is_available", lambda: True)
    clean_env.setenv(*user)
    ds._select_accelerator()
    assert os.environ[user[0]] == user[1]
    assert all(k not in os.environ for k in ALLOC if k != user[0])


def test_no_allocator_setting_without_cuda(clean_env):
    clean_env.setattr(torch.cuda, "is_available", lambda: False)
    ds._select_accelerator()
    assert all(k not in os.environ for k in ALLOC)
