"""A resume at another global batch keeps the run's schedule in tokens (issue #27, item 4).

The tokens per step change when a run resumes on another node count (DP), micro-batch or
accumulation. The old trainer recomputed the step budget, the LR schedule and the pinned save
steps from the new batch but kept the step counter: a run stopped at step 4 of 12 (256 tokens
each) and resumed at 512 tokens per step trained 2 more steps (2,048 tokens in all instead of
3,072) on a cosine of 6 steps. Now the step clock (engine/schedule.py ``StepClock``) continues:
the remaining 2,048 tokens take 4 steps, each at the learning rate the uninterrupted run had at
the same token, and a pinned save point stays at its token count. Where the remaining budget or a
save point falls between two new steps, the resume is refused in one line, writing nothing.
"""
import shutil

import pytest

from megareuse.engine import checkpoint as ckpt
from megareuse.engine.metrics import read_metrics
from megareuse.engine.schedule import LRSchedule, StepClock
from megareuse.engine.trainer import Trainer
from test_resume_semantics import _snapshot
from test_train import quiet, tiny

COMMON = ("run.log_interval=1", "run.save_interval=4", "run.keep_last=2", "run.save_tokens=[2048]",
          "run.eval_interval=100")  # 256 tokens per step (micro-batch 4 x accumulation 2 x 32), 12 steps


def _train_records(out):
    return [r for r in read_metrics(out) if r["kind"] == "train"]


def test_step_clock_maps_steps_and_tokens_across_a_batch_change():
    clock = StepClock.start(256).resumed(4, 512)
    assert clock.segments == ((0, 0, 256), (4, 1024, 512))
    assert [clock.tokens_before(s) for s in (0, 3, 4, 5, 8)] == [0, 768, 1024, 1536, 3072]
    assert clock.step_of(768) == 3 and clock.step_of(2048) == 6 and clock.step_of(3072) == 8
    assert clock.step_of(1280) is None  # inside step 5
    assert clock.schedule_step(6) == 8.0  # 2048 tokens = step 8 of the first segment's 256
    assert StepClock.start(256).schedule_step(7) == 7 and clock.resumed(8, 512) is clock
    again = clock.resumed(6, 128)  # a second change: the earlier segments stay
    assert again.segments == ((0, 0, 256), (4, 1024, 512), (6, 2048, 128))
    assert StepClock.from_list(again.to_list()) == again


def test_resume_at_a_larger_batch_keeps_schedule_budget_and_save_points_in_tokens(prepared, tmp_path):
    ref_out, out = tmp_path / "ref", tmp_path / "run"
    Trainer(tiny(prepared, ref_out, *COMMON), emit=quiet).run()
    reference = {r["tokens"]: r for r in _train_records(ref_out)}
    assert len(reference) == 12

    Trainer(tiny(prepared, out, *COMMON), emit=quiet).run(until_step=4)
    bigger = tiny(prepared, out, *COMMON, "run.grad_accum=4")  # 512 tokens per step
    lines: list[str] = []
    summary = Trainer(bigger, resume="auto", emit=lines.append).run()
    assert summary["finished"] and summary["tokens"] == 3072 and summary["steps"] == 8

    resumed = [r for r in _train_records(out) if r["step"] > 4]
    assert [r["step"] for r in resumed] == [5, 6, 7, 8]
    assert [r["tokens"] for r in resumed] == [1536, 2048, 2560, 3072]
    # each step's learning rate is the uninterrupted run's at the step starting at the same token
    assert [r["lr"] for r in resumed] == [reference[r["tokens"] - 256]["lr"] for r in resumed]
    # and that is the cosine of the run's own 12 steps of 256 tokens (independent reference)
    sched = LRSchedule.from_config(bigger.schedule, bigger.optim.lr, 12)
    assert [r["lr"] for r in resumed] == pytest.approx([sched((t - 512) / 256) for t in (1536, 2048, 2560, 3072)])

    # the pinned save point (2048 tokens) is step 6 now and kept past keep_last
    pinned = out / "checkpoints" / "step_00000006"
    assert pinned.is_dir() and ckpt.read_meta(pinned)["tokens_seen"] == 2048
    assert [p.name for p in ckpt.step_dirs(out / "checkpoints")][-1] == "step_00000008"


def test_resume_whose_budget_falls_between_new_steps_is_refused(prepared, tmp_path):
    out = tmp_path / "run"
    Trainer(tiny(prepared, out, *COMMON, "run.save_interval=3", "run.save_tokens=[]"), emit=quiet).run(until_step=3)
    before = _snapshot(out)
    bigger = tiny(prepared, out, *COMMON, "run.save_interval=3", "run.save_tokens=[]", "run.grad_accum=4")
    with pytest.raises(ckpt.CheckpointError, match=r"trained at 256 tokens per step, this job trains 512 "
                                                   r"\(run.micro_batch_size 4 x run.grad_accum 4 x data.seq_len 32 "
                                                   r"x DP 1\); the 2,304 tokens left of run.train_tokens fall "
                                                   r"between two of its steps"):
        Trainer(bigger, resume="auto", emit=quiet)
    assert _snapshot(out) == before
    # a pinned save point between two new steps is refused too
    shutil.rmtree(tmp_path / "run")
    Trainer(tiny(prepared, out, *COMMON), emit=quiet).run(until_step=4)
    odd = tiny(prepared, out, *COMMON, "run.save_tokens=[2304]", "run.grad_accum=4")
    with pytest.raises(ckpt.CheckpointError, match=r"run.save_tokens = \[2304\] fall between two of its steps"):
        Trainer(odd, resume="auto", emit=quiet)
