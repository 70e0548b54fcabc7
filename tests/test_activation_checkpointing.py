"""Activation checkpointing (``model.activation_checkpointing: none | full | selective``).

Recomputing a block in the backward pass is exact (same ops on the same inputs, nothing random),
so with it the fp32 loss must equal the one without it (<= 1e-6) and the gradients too (rtol
1e-5), single process and under TP=2 (two gloo ranks). "selective" recomputes every
``checkpoint_every``-th block (blocks k-1, 2k-1, ...), only while training with gradients.
The activation memory it saves is measured with saved_tensors_hooks (``SavedTensors``: the
bytes autograd keeps for the backward, parameters excluded; a checkpointed block keeps only its
input): none > selective > full, numbers printed. Helpers come from test_lm_loss.py.
"""
from __future__ import annotations

import pytest
import torch

import megareuse.model.gpt as gpt
from megareuse.config import ConfigError, load_config
from test_lm_loss import B, T, TINY, SavedTensors, assert_same_run, batch, loss_and_grads, make_model, run_tp2, \
    tp_run

MODES = [dict(activation_checkpointing="full"), dict(activation_checkpointing="selective", checkpoint_every=1),
         dict(activation_checkpointing="selective", checkpoint_every=2)]


@pytest.mark.parametrize("ac", MODES, ids=["full", "selective1", "selective2"])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_loss_and_grads_unchanged(ac, tie):
    tokens, targets = batch()
    ref = loss_and_grads(make_model(tie_embeddings=tie, loss="chunked"), tokens, targets)
    got = loss_and_grads(make_model(tie_embeddings=tie, loss="chunked", **ac), tokens, targets)
    assert abs(got[0].item() - ref[0].item()) <= 1e-6
    assert_same_run(got, ref, 1e-5, f"{ac} tie={tie}")


@pytest.mark.parametrize("ac, blocks", [(dict(activation_checkpointing="none"), []),
                                        (dict(activation_checkpointing="full"), [0, 1, 2, 3]),
                                        (dict(activation_checkpointing="selective", checkpoint_every=1), [0, 1, 2, 3]),
                                        (dict(activation_checkpointing="selective", checkpoint_every=2), [1, 3]),
                                        (dict(activation_checkpointing="selective", checkpoint_every=3), [2])])
def test_which_blocks_are_recomputed(monkeypatch, ac, blocks):
    seen = []

    def counting(block, *args, **kwargs):
        seen.append(block.layer_id)
        return torch.utils.checkpoint.checkpoint(block, *args, **kwargs)

    monkeypatch.setattr(gpt, "checkpoint", counting)
    model, (tokens, targets) = make_model(n_layers=4, **ac), batch()
    model(tokens, targets).backward()
    assert seen == blocks
    seen.clear()
    with torch.no_grad():
        model(tokens, targets)
    model.eval()
    model(tokens, targets)
    assert seen == []  # never without gradients or in eval mode


def test_saved_activation_bytes(capsys):
    """4 blocks: none keeps every block's activations, selective (k=2) two blocks' and two
    inputs, full only the four block inputs (plus, in every mode, the final norm and the head's)."""
    tokens, targets = batch()
    measured = {}
    for name, ac in [("none", {}), ("selective k=2", MODES[2]), ("full", MODES[0])]:
        model = make_model(n_layers=4, loss="chunked", **ac)
        with SavedTensors(model) as saved:
            loss = model(tokens, targets)
        loss.backward()
        measured[name] = saved.bytes
    block_input = B * T * TINY["d_model"] * 4
    with capsys.disabled():
        print("\nsaved activations (4 blocks, B*T = %d, d_model = %d, fp32): " % (B * T, TINY["d_model"])
              + ", ".join(f"{k} {v} B ({v / block_input:.1f} block inputs)" for k, v in measured.items()))
    none, selective, full = measured.values()
    assert none > selective > full > 0
    assert full < none / 3  # a block keeps ~10 [B, T, d]-sized tensors; checkpointed, 1


def test_checkpointing_config_fields_validate():
    cfg = load_config(None, ["model.activation_checkpointing=selective", "model.checkpoint_every=3"])
    assert (cfg.model.activation_checkpointing, cfg.model.checkpoint_every) == ("selective", 3)
    for override, words in [("model.activation_checkpointing=all",
                             "model.activation_checkpointing = 'all': accepted one of none, full, selective"),
                            ("model.checkpoint_every=0", "model.checkpoint_every = 0: accepted a positive")]:
        with pytest.raises(ConfigError) as err:
            load_config(None, [override])
        assert words in str(err.value) and "\n" not in str(err.value)


def tp_checkpointing(state) -> dict:
    tokens, targets = batch()
    return {ac: tp_run(state, tokens, targets, activation_checkpointing=ac, loss="chunked")
            for ac in ("none", "full")}


def test_full_checkpointing_under_tp2(tmp_path):
    results = run_tp2("test_activation_checkpointing:tp_checkpointing", tmp_path)
    ref = loss_and_grads(make_model(loss="plain"), *batch())
    for rank, res in enumerate(results):
        assert abs(res["full"][0].item() - res["none"][0].item()) <= 1e-6
        assert_same_run(res["full"], res["none"], 1e-5, f"TP=2 rank {rank} full vs none")
        assert_same_run(res["full"], ref, 1e-5, f"TP=2 rank {rank} full vs single device")
