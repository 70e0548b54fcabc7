"""TensorBoard after a resume or a guard rollback: the same history as metrics.jsonl.

truncate_after(S) keeps the train/eval records of steps <= S; TensorBoard, reading the event
files back, must show the same loss curve (steps after S from the new run only)."""
import pytest

pytest.importorskip("tensorboard")  # an optional extra (setup.py: "tensorboard")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from megareuse.engine.metrics import MetricsLog, read_metrics  # noqa: E402


def tb_series(out_dir, tag):
    acc = EventAccumulator(str(out_dir / "tensorboard"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def train(log, steps, offset):
    for step in steps:
        log.write({"kind": "train", "step": step, "loss": float(step + offset)})


def test_resume_purges_tensorboard_after_the_checkpoint(tmp_path):
    log = MetricsLog(tmp_path)  # the first run, killed after step 10
    log.truncate_after(0)
    train(log, range(1, 11), 0.0)
    log.close()
    log = MetricsLog(tmp_path)  # resumed from the checkpoint of step 5, as TrainingLoop._open_log does
    log.truncate_after(5)
    train(log, range(6, 9), 0.5)
    log.close()
    expected = [(s, float(s)) for s in range(1, 6)] + [(s, s + 0.5) for s in range(6, 9)]
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == expected
    assert tb_series(tmp_path, "train/loss") == expected


def test_rollback_purges_tensorboard_mid_run(tmp_path):
    log = MetricsLog(tmp_path)
    log.truncate_after(0)
    train(log, range(1, 11), 0.0)
    log.truncate_after(5)  # the guard rolled back to step 5 (TrainingLoop._on_bad_step), same log
    log.write({"kind": "rollback", "step": 10, "to_step": 5})
    train(log, range(6, 9), 0.5)
    log.close()
    expected = [(s, float(s)) for s in range(1, 6)] + [(s, s + 0.5) for s in range(6, 9)]
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path) if r["kind"] == "train"] == expected
    assert tb_series(tmp_path, "train/loss") == expected
    assert tb_series(tmp_path, "rollback/to_step") == [(10, 5.0)]


def test_events_after_the_checkpoint_stay_in_tensorboard(tmp_path):
    """A rollback at step 10 to step 5, then a resume from step 5: metrics.jsonl keeps the
    rollback record (events are history), and so does TensorBoard."""
    log = MetricsLog(tmp_path)
    log.truncate_after(0)
    train(log, range(1, 11), 0.0)
    log.truncate_after(5)
    log.write({"kind": "rollback", "step": 10, "to_step": 5})
    train(log, range(6, 8), 0.5)
    log.close()
    log = MetricsLog(tmp_path)
    log.truncate_after(5)
    train(log, range(6, 8), 0.25)
    log.close()
    assert [r["step"] for r in read_metrics(tmp_path) if r["kind"] == "rollback"] == [10]
    assert tb_series(tmp_path, "rollback/to_step") == [(10, 5.0)]
    assert tb_series(tmp_path, "train/loss") == [(s, float(s)) for s in range(1, 6)] + [(6, 6.25), (7, 7.25)]


def test_resume_in_the_same_second_when_the_writer_counter_gains_a_digit(tmp_path):
    """Event file names end in a per-process counter that sorts as text: 9 < 10 numerically,
    "10" < "9" in the order readers load files. A resume within the same second as the counter
    goes from 9 to 10 must still purge the first run's later steps."""
    from tensorboard.summary.writer import event_file_writer as efw
    while set(str(efw._global_uid._value)) != {"9"}:  # the next writer gets 9 (or 99), the one after 10 (100)
        efw._global_uid.get()
    test_resume_purges_tensorboard_after_the_checkpoint(tmp_path)
