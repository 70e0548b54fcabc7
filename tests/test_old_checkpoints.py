"""Checkpoints written before the sharded format keep loading: consolidated model.safetensors +
optimizer.safetensors beside DeepSpeed's own engine state (deepspeed/). The test writes one the
way the earlier code did (``consolidate.write_full``, ``engine.save_checkpoint``) from a live
engine, then resumes it at the same layout (DeepSpeed's engine state) and at another ZeRO stage
(the consolidated optimizer state): the losses continue as the uninterrupted run's."""
import json
import shutil

import pytest

from megareuse.engine import checkpoint as ckpt
from megareuse.engine.consolidate import write_full
from megareuse.engine.trainer import Trainer
from test_train import quiet, tiny
from distributed_utils import train_losses


@pytest.fixture(scope="module")
def runs(prepared, tmp_path_factory):
    """An uninterrupted 6-step ZeRO-1 run, and a 3-step one whose step-3 checkpoint is rewritten
    in the older format."""
    root = tmp_path_factory.mktemp("old")
    common = ("parallel.zero_stage=1", "schedule.kind=constant", "run.train_tokens=1536", "run.save_interval=3")
    whole = root / "whole"
    Trainer(tiny(prepared, whole, *common), emit=quiet).run()
    part = root / "part"
    trainer = Trainer(tiny(prepared, part, *common), emit=quiet)
    trainer.run(until_step=3)
    step = part / "checkpoints" / "step_00000003"
    engine, ps = trainer.engine, trainer.pstate
    shutil.rmtree(step / "state")
    write_full(step / "model.safetensors", engine, engine.module, trainer.cfg.model, ps, False)
    write_full(step / "optimizer.safetensors", engine, engine.module, trainer.cfg.model, ps, True)
    engine.save_checkpoint(str(step / "deepspeed"), tag="state", save_latest=True)
    trainer.checkpointer.close()
    files = sorted(p.relative_to(step).as_posix() for p in step.rglob("*") if p.is_file() and p.name != ckpt.MANIFEST)
    (step / ckpt.MANIFEST).write_text(json.dumps({"files": ckpt.hash_files(step, files)}))
    assert ckpt.verify_checkpoint(step) is None
    return common, whole, part


@pytest.mark.parametrize("stage", [1, 0])
def test_an_older_checkpoint_resumes(prepared, tmp_path, runs, stage):
    common, whole, part = runs
    out = tmp_path / "run"
    shutil.copytree(part, out)
    lines = []
    step = out / "checkpoints" / "step_00000003"
    Trainer(tiny(prepared, out, *common, f"parallel.zero_stage={stage}"), resume=str(step), emit=lines.append).run()
    assert any(line.startswith(f"resumed from {step} at step 3") for line in lines), lines
    assert (stage == 1) != any("resharded to" in line for line in lines)  # another stage: the layout-free files
    assert train_losses(out) == pytest.approx(train_losses(whole), rel=1e-6)
    assert (out / "checkpoints" / "step_00000006" / "state" / "index.json").is_file()  # saved in the new format
