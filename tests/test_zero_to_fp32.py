"""DeepSpeed's own zero_to_fp32 reads our checkpoints without being told the tag (the `latest`
file is written) and gives exactly the weights of model.safetensors."""
import pytest
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from safetensors.torch import load_file

from megareuse.engine.trainer import Trainer
from test_train import quiet, tiny


def trained(prepared, tmp_path, stage):
    """A 3-step run at ZeRO ``stage``: its final checkpoint and the weights of model.safetensors."""
    out = tmp_path / "run"
    Trainer(tiny(prepared, out, f"parallel.zero_stage={stage}", "run.train_tokens=768"), emit=quiet).run()
    checkpoint = out / "checkpoints" / "step_00000003"
    return checkpoint, load_file(checkpoint / "model.safetensors")  # the tied head is stored once


def assert_same_weights(theirs, ours):
    theirs = {name.removeprefix("module."): tensor for name, tensor in theirs.items()}
    theirs.pop("output.weight", None)  # DeepSpeed lists the tied head too (the same tensor)
    assert sorted(theirs) == sorted(ours)
    for name, tensor in ours.items():
        assert theirs[name].dtype == torch.float32 and torch.equal(theirs[name], tensor), name


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_to_fp32_without_a_tag_equals_model_safetensors(prepared, tmp_path, stage):
    checkpoint, ours = trained(prepared, tmp_path, stage)
    assert (checkpoint / "deepspeed" / "latest").read_text().strip() == "state"
    assert_same_weights(get_fp32_state_dict_from_zero_checkpoint(str(checkpoint / "deepspeed")), ours)


def test_zero0_engine_file_holds_the_weights(prepared, tmp_path):
    """ZeRO-0 writes no ZeRO state (zero_to_fp32 does not apply): the engine's model file does."""
    checkpoint, ours = trained(prepared, tmp_path, 0)
    states = torch.load(checkpoint / "deepspeed" / "state" / "mp_rank_00_model_states.pt",
                        map_location="cpu", weights_only=False)
    assert_same_weights(states["module"], ours)
