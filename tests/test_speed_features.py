"""Speed switches change no number (issue #16): prefetched batches are the dataset's own, and
reading losses at log steps (not after every step) logs the same losses and ends at the same
weights, bit for bit on CPU (fp32), against the run that reads every step without prefetch."""
import threading

import pytest
import torch

from megareuse.engine.inputs import open_training_data
from megareuse.engine.prefetch import Prefetcher
from megareuse.engine.loop import StepResult, read_steps
from megareuse.engine.trainer import SkippableAdamW, Trainer
from megareuse.engine.weights import load_state_dict
from test_train import eval_records, quiet, tiny, train_losses


def test_prefetched_batches_equal_the_datasets_and_restart_where_asked(prepared, tmp_path):
    cfg = tiny(prepared, tmp_path / "run")
    data = open_training_data(cfg.data, cfg.model).train
    pre = Prefetcher(data, batch_size=4, stride=8, device=torch.device("cpu"), depth=3)
    try:
        for first in (0, 8, 16, 24, 8, 16, 100, 108):  # 8 and 100: a rollback / resume restarts the stream
            assert torch.equal(pre.get(first), data.batch(first, 4)), first
    finally:
        pre.close()
    assert not [t for t in threading.enumerate() if t.name == "megareuse-prefetch"]
    pre.close()  # idempotent

    class Broken:
        def batch(self, first, n):
            raise OSError(5, "Input/output error", "/data/prose_train.bin")
    failing = Prefetcher(Broken(), 4, 4, torch.device("cpu"))
    with pytest.raises(OSError, match="Input/output error"):  # the thread's error, raised in the step
        failing.get(0)
    failing.close()


def test_read_steps_reads_tensors_and_plain_values_in_order():
    steps = [StepResult(torch.tensor(2.5, dtype=torch.float64), 1e-3, torch.tensor(0.75), torch.tensor(True)),
             StepResult(float("nan"), 2e-3, 1.5, False),
             StepResult(torch.tensor(float("inf")), 3e-3, torch.tensor(float("nan")), torch.tensor(False))]
    got = read_steps(steps)
    assert got[0] == (2.5, 1e-3, 0.75, True)
    assert got[1][0] != got[1][0] and got[1][1:] == (2e-3, 1.5, False)
    assert got[2][0] == float("inf") and got[2][2] != got[2][2] and got[2][3] is False
    assert read_steps([]) == []


def test_skippable_adamw_declines_on_the_device_without_reading_the_flag():
    def run(skips, fused):
        p = torch.nn.Parameter(torch.arange(4, dtype=torch.float32))
        opt = SkippableAdamW([p], lr=0.1, fused=fused)
        for skip in skips:
            p.grad = torch.full((4,), 0.5)
            opt.skip_next_step_if(torch.tensor(skip))
            opt.step()
        return p.detach().clone(), opt.state[p]["step"], opt.state[p]["exp_avg"].clone()
    for fused in (True, False):
        skipped, applied_only = run([False, True, False], fused), run([False, False], fused)
        assert torch.equal(skipped[0], applied_only[0]) and float(skipped[1]) == 2.0
        assert torch.equal(skipped[2], applied_only[2])


def test_deferred_reads_and_prefetch_change_no_number(prepared, tmp_path):
    reference = tmp_path / "every_step"
    Trainer(tiny(prepared, reference, "run.sync_every_step=true", "run.prefetch=false", "run.log_interval=1"),
            emit=quiet).run()
    fast = tmp_path / "deferred"
    Trainer(tiny(prepared, fast, "run.prefetch=true", "run.log_interval=5"), emit=quiet).run()
    assert train_losses(fast) == train_losses(reference) and len(train_losses(fast)) == 12
    assert eval_records(fast) == eval_records(reference)
    a = load_state_dict(reference / "checkpoints" / "step_00000012", tied=True)
    b = load_state_dict(fast / "checkpoints" / "step_00000012", tied=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not [t for t in threading.enumerate() if t.name == "megareuse-prefetch"]  # closed at the end


def test_async_save_writes_the_same_checkpoints_and_resumes_bit_identical(prepared, tmp_path):
    from megareuse.engine import checkpoint as ckpt
    sync_run = tmp_path / "sync"
    Trainer(tiny(prepared, sync_run, "run.save_interval=4", "run.keep_last=5", "run.async_save=false"),
            emit=quiet).run()
    lines = []
    background = tmp_path / "async"
    cfg = tiny(prepared, background, "run.save_interval=4", "run.keep_last=5", "run.async_save=true")
    Trainer(cfg, emit=lines.append).run(until_step=8)
    assert any(line.startswith("saved ") and "finished in the background" in line for line in lines), lines
    assert [p.name for p in ckpt.step_dirs(background / "checkpoints")
            if ckpt.verify_checkpoint(p) is None] == ["step_00000004", "step_00000008"]
    assert not list((background / "checkpoints").glob(".tmp-*"))  # committed before run() returned
    for step in ("step_00000004", "step_00000008"):
        a, b = sync_run / "checkpoints" / step, background / "checkpoints" / step
        for name in ("state/__0_0.distcp", "state/index.json"):
            assert (a / name).read_bytes() == (b / name).read_bytes()
        assert sorted(p.relative_to(a).as_posix() for p in a.rglob("*")) == \
            sorted(p.relative_to(b).as_posix() for p in b.rglob("*"))  # no hash files left in it
    Trainer(cfg, resume="auto", emit=quiet).run()
    assert train_losses(background) == train_losses(sync_run)
    a = load_state_dict(sync_run / "checkpoints" / "step_00000012", tied=True)
    b = load_state_dict(background / "checkpoints" / "step_00000012", tied=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_async_save_failure_is_raised_and_leaves_no_partial_checkpoint(prepared, tmp_path, monkeypatch):
    import errno
    from megareuse.engine import checkpoint as ckpt
    from megareuse.engine import sharded
    real = sharded.write_chunks

    def full_disk(path, chunks):
        real(path, chunks[:1])
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    monkeypatch.setattr(sharded, "write_chunks", full_disk)
    out = tmp_path / "run"
    trainer = Trainer(tiny(prepared, out, "run.save_interval=4", "run.async_save=true"), emit=quiet)
    with pytest.raises(ckpt.CheckpointError, match=r"no space left on the device of .* writing the checkpoint "
                                                   r"of step 4 .*partial write was removed"):
        trainer.run()
    assert not list((out / "checkpoints").glob(".tmp-*")) and ckpt.step_dirs(out / "checkpoints") == []
    assert not (out / ".lock").exists() and not [t for t in threading.enumerate() if t.name.startswith("megareuse-")]
