"""Resuming never discards progress or results silently (issue #15 items 2-4).

- every checkpoint broken: ``--resume auto`` refuses (one line) and leaves them and the log;
- a finished run: ``--resume auto`` says so and leaves summary, record and metrics as they were;
- a run killed between its final checkpoint and its summary: the resume writes the real summary;
- a torn last line in metrics.jsonl (killed mid-append) is repaired; damage elsewhere is named.
"""
import json

import pytest

from megareuse.engine import checkpoint as ckpt
from megareuse.engine.metrics import MetricsError, MetricsLog, read_metrics
from megareuse.engine.trainer import Trainer
from test_train import quiet, tiny


def _finished_run(prepared, out, *extra):
    cfg = tiny(prepared, out, "run.train_tokens=1024", "run.save_interval=2", "run.keep_last=5", *extra)  # 4 steps
    summary = Trainer(cfg, emit=quiet).run()
    assert summary["finished"] and summary["valid_loss"]
    return cfg, summary


def _snapshot(out):
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_resume_auto_refuses_when_every_checkpoint_is_broken(prepared, tmp_path):
    out = tmp_path / "run"
    cfg, _ = _finished_run(prepared, out)
    for step_dir in ckpt.step_dirs(out / "checkpoints"):
        (step_dir / "trainer.pt").write_bytes(b"garbage")  # every checkpoint fails its checksum
    before = _snapshot(out)
    with pytest.raises(ckpt.CheckpointError, match=r"--resume auto: none of the 2 checkpoints .* verifies "
                                                   r"\(newest step_00000004: .*\); they are left as they are"):
        Trainer(cfg, resume="auto", emit=quiet)
    assert _snapshot(out) == before  # nothing rewritten: not the log, not the broken checkpoints


def test_resume_auto_on_a_finished_run_leaves_its_results(prepared, tmp_path):
    out = tmp_path / "run"
    cfg, summary = _finished_run(prepared, out)
    before = _snapshot(out)
    lines = []
    again = Trainer(cfg, resume="auto", emit=lines.append).run()
    assert again == json.loads((out / "summary.json").read_text()) and again["valid_loss"] == summary["valid_loss"]
    assert any(line.startswith("run already finished") for line in lines), lines
    assert _snapshot(out) == before


def test_resume_after_a_kill_before_the_summary_writes_it(prepared, tmp_path):
    out = tmp_path / "run"
    cfg, summary = _finished_run(prepared, out)
    (out / "summary.json").unlink()  # killed after the final checkpoint's commit, before the summary
    (out / "record.json").unlink()
    again = Trainer(cfg, resume="auto", emit=quiet).run()
    assert again["finished"] and again["valid_loss"] == pytest.approx(summary["valid_loss"], rel=1e-6)
    assert json.loads((out / "summary.json").read_text())["valid_loss"] == again["valid_loss"]
    assert (out / "record.json").is_file()


def test_torn_metrics_tail_is_repaired_and_damage_is_named(prepared, tmp_path):
    out = tmp_path / "run"
    cfg, _ = _finished_run(prepared, out, "run.train_tokens=512")  # 2 steps, checkpoint at 2
    log_path = out / "metrics.jsonl"
    records = read_metrics(out)
    (out / "summary.json").unlink()
    with open(log_path, "a") as fh:
        fh.write('{"kind": "train", "step": 3, "lo')  # a kill in the middle of an append
    assert read_metrics(out) == records
    MetricsLog(out, tensorboard=False).truncate_after(2)
    assert read_metrics(out) == [r for r in records if r.get("step", 0) <= 2]
    assert log_path.read_text().endswith("}\n")  # whole lines again: the next append is a record
    # a bad line that is not the last is damage: named, not guessed at
    lines = log_path.read_text().splitlines()
    log_path.write_text("\n".join([lines[0], "not json", *lines[1:]]) + "\n")
    with pytest.raises(MetricsError, match=r"metrics.jsonl line 2 is not a JSON record"):
        read_metrics(out)


def test_one_training_per_run_directory(prepared, tmp_path):
    """#15 item 1: a second training on a run directory in use stops with one line naming the
    holder and writes nothing; the lock goes when the run ends; a stale lock is taken over, said."""
    import os

    from megareuse.engine.runlock import NAME, RunLockError

    out = tmp_path / "run"
    cfg = tiny(prepared, out, "run.train_tokens=512")
    first = Trainer(cfg, emit=quiet)
    assert (out / NAME).is_file()
    before = _snapshot(out)
    with pytest.raises(RunLockError, match=rf"is in use by pid {os.getpid()} on host .* accepted another run.out_dir"):
        Trainer(tiny(prepared, out, "run.train_tokens=512", "optim.lr=1e-4"), emit=quiet)
    assert _snapshot(out) == before
    first.run()
    assert not (out / NAME).exists()  # released at the end of the run
    # a lock file left by a process that died (nobody holds its flock): reported, then taken over
    (out / NAME).write_text(json.dumps({"host": "gone", "pid": 999999, "since": "earlier"}))
    lines = []
    Trainer(tiny(prepared, out, "run.train_tokens=1024"), resume="auto", emit=lines.append).run()
    assert any("was left by pid 999999 on host gone" in line and "taking it over" in line for line in lines), lines
    assert not (out / NAME).exists()
    # a run refused before writing anything leaves no directory behind
    fresh = tmp_path / "never"
    with pytest.raises(ckpt.CheckpointError):
        Trainer(tiny(prepared, fresh), resume=str(tmp_path / "no-such-checkpoint"), emit=quiet)
    assert not fresh.exists()


def test_resume_of_another_kind_of_run_is_refused(prepared, tmp_path):
    """#15 item 8: --resume of a base checkpoint with run.init_from set would continue the base run
    and record it as a stage-2 point with false D1/D2: refused; a stage-2 run's own resume works."""
    base_cfg, _ = _finished_run(prepared, tmp_path / "base")
    base_ckpt = ckpt.latest_checkpoint(tmp_path / "base" / "checkpoints")
    cpt = tiny(prepared, tmp_path / "cpt", "run.train_tokens=1024", "run.save_interval=2", f"run.init_from={base_ckpt}")
    with pytest.raises(ckpt.CheckpointError, match=r"continues a base run, but this config is a \w+ run from a base "
                                                   r"of D1 = 1,024 tokens"):
        Trainer(cpt, resume=str(base_ckpt), emit=quiet)
    assert not (tmp_path / "cpt").exists()
    Trainer(cpt, emit=quiet).run(until_step=2)
    resumed = Trainer(cpt, resume="auto", emit=quiet)
    assert resumed.state.step == 2 and resumed.D1 == 1024
    assert resumed.run()["finished"]


def _rehash(step_dir, name):
    """Make ``name``'s manifest entry match its (replaced) content: damage the checksum cannot see."""
    manifest = json.loads((step_dir / ckpt.MANIFEST).read_text())
    files = manifest["files"] if "files" in manifest else manifest
    file = step_dir / name
    files[name] = {"bytes": file.stat().st_size, "sha256": ckpt.file_sha256(file)}
    (step_dir / ckpt.MANIFEST).write_text(json.dumps(manifest))


def test_state_that_passes_its_checksums_but_cannot_be_read_is_one_checkpoint_error(prepared, tmp_path):
    out = tmp_path / "run"
    cfg, _ = _finished_run(prepared, out)
    last = ckpt.step_dirs(out / "checkpoints")[-1]
    shard = last / "state" / "__0_0.distcp"
    shard.write_bytes(b"not a torch file at all")
    _rehash(last, "state/__0_0.distcp")
    assert ckpt.verify_checkpoint(last) is None  # past the checksums
    (out / "summary.json").unlink()
    with pytest.raises(ckpt.CheckpointError, match=r"checkpoint error: state/__0_0.distcp: the chunk of model\.\S+ "
                                                   r"at byte 0 is not readable \(\w+: .*\); accepted"):
        Trainer(cfg, resume="auto", emit=quiet)


def test_broken_newer_checkpoints_are_notes_and_a_fresh_start_never_writes_over_them(prepared, tmp_path):
    import warnings
    out = tmp_path / "run"
    cfg, _ = _finished_run(prepared, out)
    newest = ckpt.step_dirs(out / "checkpoints")[-1]
    (newest / "trainer.pt").write_bytes(b"garbage")
    lines = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = Trainer(cfg, resume="auto", emit=lines.append)
    trainer.checkpointer.close()
    assert not [w for w in caught if "skipping checkpoint" in str(w.message)]  # no stray stderr lines
    assert any(line.startswith(f"note: skipping checkpoint {newest}: ") for line in lines), lines
    assert trainer.resume_from.name == "step_00000002"
    for step_dir in ckpt.step_dirs(out / "checkpoints"):
        (step_dir / "trainer.pt").write_bytes(b"garbage")
    before = _snapshot(out)
    with pytest.raises(ckpt.CheckpointError, match=r"already holds checkpoint step_00000004; pass --resume"):
        Trainer(cfg, emit=quiet)  # no --resume over broken checkpoints: refused, not overwritten
    assert _snapshot(out) == before


def test_a_checkpoint_directory_that_is_a_file_is_refused_before_training(prepared, tmp_path):
    from megareuse.config import ConfigError
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoints").write_text("not a directory")
    cfg = tiny(prepared, out, "run.train_tokens=512")
    with pytest.raises(ConfigError, match=r"checkpoints \(run.out_dir's checkpoint directory\) is a file"):
        Trainer(cfg, emit=quiet)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints"]  # no log, no lock left
