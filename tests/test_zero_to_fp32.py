"""`megareuse consolidate` gives from a sharded checkpoint what DeepSpeed's zero_to_fp32 gives from
DeepSpeed's own: the single-device fp32 weights (and with --optimizer the Adam moments), checked
against DeepSpeed's consolidation of the same engine's state (``engine.save_checkpoint`` into a
test directory, read by ``get_fp32_state_dict_from_zero_checkpoint``) and against DeepSpeed's
``safe_get_full_*`` gathers: no megareuse code on the reference side."""
import pytest
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from safetensors.torch import load_file

from megareuse.cli import main
from megareuse.engine.consolidate import MOMENTS, stream_full
from megareuse.engine.trainer import Trainer
from test_train import quiet, tiny


def trained(prepared, tmp_path, stage):
    """A 3-step run at ZeRO ``stage``: the trainer (its engine still live) and its last checkpoint."""
    out = tmp_path / "run"
    trainer = Trainer(tiny(prepared, out, f"parallel.zero_stage={stage}", "run.train_tokens=768"), emit=quiet)
    trainer.run()
    return trainer, out / "checkpoints" / "step_00000003"


def consolidated(checkpoint, out, *flags):
    assert main(["consolidate", "--from", str(checkpoint), "--out", str(out), *flags]) == 0
    return load_file(out)


def assert_same(theirs, ours):
    theirs = {name.removeprefix("module."): tensor for name, tensor in theirs.items()}
    theirs.pop("output.weight", None)  # DeepSpeed lists the tied head too (the same tensor)
    assert sorted(theirs) == sorted(ours)
    for name, tensor in ours.items():
        assert theirs[name].dtype == torch.float32 and torch.equal(theirs[name], tensor), name


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_consolidate_equals_zero_to_fp32(prepared, tmp_path, stage):
    trainer, checkpoint = trained(prepared, tmp_path, stage)
    trainer.engine.save_checkpoint(str(tmp_path / "deepspeed"), tag="state")
    theirs = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / "deepspeed"))
    assert_same(theirs, consolidated(checkpoint, tmp_path / "fp32.safetensors"))


def test_consolidate_optimizer_equals_deepspeeds_gathered_moments(prepared, tmp_path):
    trainer, checkpoint = trained(prepared, tmp_path, 2)
    ours = consolidated(checkpoint, tmp_path / "all.safetensors", "--optimizer")
    engine, model = trainer.engine, trainer.engine.module
    for moment in MOMENTS:
        for key, full in stream_full(engine, model, trainer.cfg.model, trainer.pstate, moment):
            assert torch.equal(ours[f"{moment}.{key}"], full), (moment, key)
    assert_same(trainer.checkpointer.full_state_dict(engine), {k: v for k, v in ours.items() if "." in k
                                                               and not k.startswith(MOMENTS)})


def test_consolidate_zero0_equals_the_engine_module(prepared, tmp_path):
    trainer, checkpoint = trained(prepared, tmp_path, 0)
    theirs = {k: v.detach().float() for k, v in trainer.engine.module.state_dict().items()}
    assert_same(theirs, consolidated(checkpoint, tmp_path / "fp32.safetensors"))


def test_consolidate_refuses_bad_input(prepared, tmp_path, capsys):
    _, checkpoint = trained(prepared, tmp_path, 0)
    (tmp_path / "taken.safetensors").write_bytes(b"x")
    assert main(["consolidate", "--from", str(checkpoint), "--out", str(tmp_path / "taken.safetensors")]) == 2
    assert "--out" in capsys.readouterr().err
    assert main(["consolidate", "--from", str(tmp_path), "--out", str(tmp_path / "new.safetensors")]) == 2
    assert "--from" in capsys.readouterr().err
    assert (tmp_path / "taken.safetensors").read_bytes() == b"x" and not (tmp_path / "new.safetensors").exists()
