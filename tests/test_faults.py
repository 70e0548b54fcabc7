"""Fault injection: preemption signals, SIGKILL during checkpoint writes, corrupt files, NaN
gradients, dead and stopped ranks. Every job is bounded in time and killed whole.

The reference for "no work lost" is always an uninterrupted run of the same command: fp32
training here is deterministic, so a resumed run must reproduce its losses bit for bit.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distributed_utils import REPO, TRAIN, base_env, finish, run_job, start, tiny_args, train_losses
from megareuse.engine import checkpoint as ckpt
from megareuse.engine.guard import EXIT_DIVERGED, EXIT_RANK_FAILURE, EXIT_REQUEUE
from megareuse.parallel.launch import free_port

RUNNER = str(REPO / "tests" / "fault_runner.py")
LONG = ("run.train_tokens=102400", "run.eval_interval=100000", "run.save_interval=100000")  # 400 steps


def kill_all(procs) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


def wait_for_steps(out_dir: Path, n: int, procs, timeout=180) -> None:
    metrics, deadline = Path(out_dir) / "metrics.jsonl", time.monotonic() + timeout
    while not (metrics.exists() and metrics.read_text().count('"kind": "train"') >= n):
        assert time.monotonic() < deadline, f"fewer than {n} steps after {timeout}s"
        for proc in procs:
            assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.05)


def rank_envs(world: int):
    port = free_port()
    return [base_env(RANK=r, WORLD_SIZE=world, LOCAL_RANK=r, LOCAL_WORLD_SIZE=world,
                     MASTER_ADDR="127.0.0.1", MASTER_PORT=port) for r in range(world)]


def events(out_dir: Path, kind: str) -> list[dict]:
    lines = (Path(out_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


# ----------------------------------------------------------------------------- preemption
@pytest.fixture(scope="module")
def long_reference(prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("long") / "run"
    proc = run_job([sys.executable, TRAIN, *tiny_args(prepared, out, *LONG)])
    assert proc.returncode == 0, proc.stdout[-3000:]
    return train_losses(out)


@pytest.mark.parametrize("sig, save", [(signal.SIGTERM, "sync"), pytest.param(signal.SIGUSR1, "sync", marks=pytest.mark.slow),
                                       pytest.param(signal.SIGTERM, "async", marks=pytest.mark.slow)],
                         ids=["SIGTERM", "SIGUSR1", "SIGTERM-async_save"])
def test_signal_checkpoints_exits_requeue_and_resumes_bit_identical(prepared, tmp_path, long_reference, sig, save):
    out = tmp_path / "run"
    args = tiny_args(prepared, out, *LONG, f"run.async_save={'true' if save == 'async' else 'false'}")
    proc = start([sys.executable, TRAIN, *args])
    try:
        wait_for_steps(out, 3, [proc])
        proc.send_signal(sig)
        log = finish(proc, timeout=60)
    finally:
        kill_all([proc])
    assert proc.returncode == EXIT_REQUEUE, log[-3000:]
    note = json.loads((out / "preempted.json").read_text())
    assert note["signal"] == sig.name and 3 <= note["step"] < 400, note
    assert ckpt.verify_checkpoint(Path(note["checkpoint"])) is None
    assert f"stopped by {sig.name} at step {note['step']}" in log

    resumed = run_job([sys.executable, TRAIN, *args, "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert f"at step {note['step']} " in resumed.stdout
    assert train_losses(out) == long_reference  # exact float equality, all 400 steps
    assert not (out / "preempted.json").exists()


@pytest.mark.slow  # heavy; `make test-slow` (make test keeps one check of this feature)
def test_sigterm_to_one_of_two_ranks_stops_both_and_resumes_bit_identical(prepared, tmp_path):
    args = lambda out: tiny_args(prepared, out, *LONG, "run.micro_batch_size=4", "run.train_tokens=51200")  # noqa: E731
    full = tmp_path / "full"
    procs = [start([sys.executable, TRAIN, *args(full)], env) for env in rank_envs(2)]
    try:
        outs = [finish(p, 240) for p in procs]
    finally:
        kill_all(procs)
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:]

    part = tmp_path / "part"
    procs = [start([sys.executable, TRAIN, *args(part)], env) for env in rank_envs(2)]
    try:
        wait_for_steps(part, 3, procs)
        procs[1].send_signal(signal.SIGTERM)  # rank 1 only: the ranks agree at the step boundary
        outs = [finish(p, 90) for p in procs]
    finally:
        kill_all(procs)
    assert [p.returncode for p in procs] == [EXIT_REQUEUE] * 2, outs[0][-3000:] + outs[1][-3000:]
    step = json.loads((part / "preempted.json").read_text())["step"]
    assert 3 <= step < 200

    procs = [start([sys.executable, TRAIN, *args(part), "--resume", "auto"], env) for env in rank_envs(2)]
    try:
        outs = [finish(p, 240) for p in procs]
    finally:
        kill_all(procs)
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:]
    assert train_losses(part) == train_losses(full)


# ----------------------------------------------------------------------------- crash safety
@pytest.fixture(scope="module")
def short_reference(prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("short") / "run"
    proc = run_job([sys.executable, TRAIN, *tiny_args(prepared, out, "run.save_interval=2")])
    assert proc.returncode == 0, proc.stdout[-3000:]
    return train_losses(out)


@pytest.mark.parametrize("point, resumes_at, save", [
    pytest.param("index", 2, "sync", marks=pytest.mark.slow), ("shard", 2, "sync"), pytest.param("manifest", 2, "sync", marks=pytest.mark.slow),
    pytest.param("rename", 4, "sync", marks=pytest.mark.slow), ("retention", 4, "sync"),
    pytest.param("shard", 2, "async", marks=pytest.mark.slow), ("manifest", 2, "async"),
    pytest.param("rename", 4, "async", marks=pytest.mark.slow), pytest.param("retention", 4, "async", marks=pytest.mark.slow)])
def test_sigkill_during_checkpoint_write(prepared, tmp_path, short_reference, point, resumes_at, save):
    """A kill inside a save, on the training thread or (run.async_save) on the background thread
    that finishes it: the resume continues from the last committed checkpoint, bit for bit."""
    out = tmp_path / "run"
    args = tiny_args(prepared, out, "run.save_interval=2", "run.keep_last=1",  # saves at 2, 4, 6
                     f"run.async_save={'true' if save == 'async' else 'false'}")
    killed = run_job([sys.executable, RUNNER, "--kill-at", point, "--on-save", "2", "--", *args])
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:]

    resumed = run_job([sys.executable, TRAIN, *args, "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert f"at step {resumes_at} " in resumed.stdout, resumed.stdout[-3000:]
    assert train_losses(out) == short_reference  # same final loss: nothing but those steps lost
    leftovers = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert leftovers == ["step_00000006"], leftovers  # temp dirs tidied, retention applied


def test_one_rank_killed_while_writing_its_share(prepared, tmp_path):
    """Two ranks (TP=1, DP=2, ZeRO-2), each writing its own share: rank 1 is SIGKILLed half-way
    through its file of the second save; the job dies (torchrun stops rank 0, which waits for
    rank 1's share), nothing is committed, and `--resume auto` continues from the first save
    (past a newer broken one), with the uninterrupted run's losses."""
    common = ["parallel.zero_stage=2", "run.micro_batch_size=4", "run.save_interval=2", "run.keep_last=1"]

    def torchrun(script, out, *extra):
        return run_job([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={free_port()}", script, *extra, *tiny_args(prepared, out, *common)],
                       timeout=300)

    full = tmp_path / "full"
    assert torchrun(TRAIN, full).returncode == 0
    out = tmp_path / "run"
    killed = torchrun(RUNNER, out, "--kill-at", "shard", "--on-save", "2", "--rank", "1", "--")
    assert killed.returncode != 0, killed.stdout[-3000:]
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert [n for n in names if not n.startswith(".tmp-step_00000004")] == ["step_00000002"], names
    # and a newer checkpoint whose rank-1 share fails its checksum (the ranks hash their shares of
    # it together): skipped with a note naming the file
    import shutil
    broken = out / "checkpoints" / "step_00000004"
    shutil.copytree(out / "checkpoints" / "step_00000002", broken)
    data = bytearray((broken / "state" / "__1_0.distcp").read_bytes())
    data[len(data) // 2] ^= 1
    (broken / "state" / "__1_0.distcp").write_bytes(bytes(data))
    resumed = torchrun(TRAIN, out, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert f"note: skipping checkpoint {broken}: state/__1_0.distcp fails its sha256 checksum" in resumed.stdout
    assert "at step 2 " in resumed.stdout, resumed.stdout[-3000:]
    assert train_losses(out) == train_losses(full)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000006"]


def test_flipped_byte_in_newest_checkpoint_falls_back_to_previous(prepared, tmp_path, short_reference):
    out = tmp_path / "run"
    args = tiny_args(prepared, out, "run.save_interval=2")  # saves 2, 4, 6; keeps 4 and 6
    assert run_job([sys.executable, TRAIN, *args]).returncode == 0
    newest = out / "checkpoints" / "step_00000006" / "state" / "__0_0.distcp"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0x01
    newest.write_bytes(bytes(data))

    explicit = run_job([sys.executable, TRAIN, *args, "--resume", str(newest.parent.parent)])
    assert explicit.returncode == 2
    assert "state/__0_0.distcp fails its sha256 checksum" in explicit.stdout.strip().splitlines()[-1]

    resumed = run_job([sys.executable, TRAIN, *args, "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "skipping checkpoint" in resumed.stdout and "step_00000006: state/__0_0.distcp fails its sha256" in resumed.stdout
    assert "at step 4 " in resumed.stdout  # steps 5 and 6 are trained again, step 6 re-saved
    assert train_losses(out) == short_reference


def test_truncated_bin_is_refused_with_one_line(prepared, tmp_path):
    import shutil
    data = tmp_path / "data"
    shutil.copytree(prepared, data)
    with open(data / "code_valid.bin", "r+b") as fh:
        fh.truncate(os.path.getsize(data / "code_valid.bin") - 3)
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, TRAIN, *tiny_args(data, out)], env=base_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "code_valid.bin" in lines[0] and "truncated" in lines[0], proc.stderr
    assert not out.exists()


# ----------------------------------------------------------------------------- divergence
@pytest.mark.parametrize("reads", [pytest.param("run.log_interval=1", marks=pytest.mark.slow), "run.log_interval=5"])
def test_nan_steps_skipped_then_rollback_lowers_lr_and_spike_logged(prepared, tmp_path, reads):
    """Losses are read at log/eval/save steps (log_interval 5: the NaNs of steps 6 and 7 are seen
    at step 8, after step 8 trained): the same skips, rollback, cursor and weights as reading each step."""
    out = tmp_path / "run"
    args = tiny_args(prepared, out, "run.train_tokens=3072", "run.save_interval=4", "guard.max_skips=2",
                     "guard.skip_window=3", "guard.lr_factor=0.5", "schedule.kind=constant",
                     "schedule.warmup_steps=0", reads)
    proc = run_job([sys.executable, RUNNER, "--nan-batches", "3,6,7", "--spike-batches", "10", "--",
                    *args, "guard.spike_window=4"])
    assert proc.returncode == 0, proc.stdout[-3000:]
    train = events(out, "train")
    skipped = [r["step"] for r in events(out, "train") if r.get("skipped")]
    # batch 3 is skipped alone; 6 and 7 make two within 3 steps: roll back to step 4; the data
    # cursor is not rewound, so steps 5-12 then train on batches 8-15 (no NaN among them)
    (rollback,) = events(out, "rollback")
    assert rollback["step"] == 7 and rollback["to_step"] == 4 and rollback["lr_scale"] == 0.5
    assert skipped == [3], skipped  # the records of steps 5-7 were replaced after the rollback
    assert [r["step"] for r in train] == list(range(1, 13))
    assert {r["lr"] for r in train if r["step"] <= 4} == {1e-2} and {r["lr"] for r in train if r["step"] > 4} == {5e-3}
    (spike,) = [r for r in train if "spike_median" in r]  # batch 10 was trained at step 7
    assert spike["step"] == 7 and spike["loss"] > 1.5 * spike["spike_median"]
    assert "loss spike at step 7" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_steps"] == 3 and summary["rollbacks"] == 1 and summary["loss_spikes"] == 1
    trainer = __import__("torch").load(out / "checkpoints" / "step_00000012" / "trainer.pt", weights_only=True)
    assert trainer["samples"] == (12 + 3) * 8 and trainer["guard"]["lr_scale"] == 0.5


def test_repeated_nans_stop_with_clear_message(prepared, tmp_path):
    out = tmp_path / "run"
    args = tiny_args(prepared, out, "guard.max_skips=2", "guard.on_divergence=stop")
    proc = subprocess.run([sys.executable, RUNNER, "--nan-batches", "2,3,4,5,6", "--", *args], env=base_env(),
                          cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == EXIT_DIVERGED, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert "training diverged: 2 steps with a non-finite loss or gradient norm" in lines[-1]
    assert "guard.on_divergence = 'stop'" in lines[-1]


# ----------------------------------------------------------------------------- dead and stuck ranks
@pytest.mark.parametrize("how", ["kill", pytest.param("stop", marks=pytest.mark.slow)])
def test_dead_or_stopped_rank_named_by_survivor_within_timeout(prepared, tmp_path, how):
    out, timeout_s = tmp_path / "run", 20
    args = tiny_args(prepared, out, "run.micro_batch_size=4", "run.train_tokens=10000000",
                     f"parallel.timeout_s={timeout_s}")
    procs = [start([sys.executable, TRAIN, *args], env) for env in rank_envs(2)]
    try:
        wait_for_steps(out, 2, procs)
        os.killpg(procs[1].pid, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        t0 = time.monotonic()
        log = finish(procs[0], timeout=timeout_s + 60)
        elapsed = time.monotonic() - t0
    finally:
        kill_all(procs)
    print(f"rank 1 {how}: rank 0 exited {procs[0].returncode} after {elapsed:.1f} s:", log.strip().splitlines()[-1])
    assert procs[0].returncode == EXIT_RANK_FAILURE, log[-3000:]
    assert elapsed < timeout_s + 40, elapsed  # timeout, then a watch of two heartbeats (2 x 3.3 s)
    message = [line for line in log.splitlines() if "rank failure" in line]
    assert message and "rank 1 (host" in message[-1] and "sent no heartbeat" in message[-1], log[-3000:]


@pytest.mark.slow  # heavy; `make test-slow` (make test keeps one check of this feature)
def test_slurm_script_usr1_checkpoints_requeues_and_next_start_resumes(prepared, tmp_path):
    """base_1b.sh with real torchrun (2 ranks): SIGUSR1 to the batch script reaches the workers,
    they checkpoint and exit 75, the script requeues (stand-in scontrol), the restart resumes."""
    from distributed_utils import CONFIG, torchrun
    overrides = tiny_args(prepared, tmp_path / "run", *LONG, "run.micro_batch_size=4",
                          "run.train_tokens=51200")[2:]
    full = tmp_path / "full"
    reference = torchrun(2, ["--config", CONFIG, *overrides, f"run.out_dir={full}"])
    assert reference.returncode == 0, reference.stdout[-3000:]

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/usr/bin/env bash\n[[ $1 == requeue ]] && echo "scontrol $*" >> "$LOG"\n')
    (bin_dir / "scontrol").chmod(0o755)
    out, log = tmp_path / "run", tmp_path / "scontrol.log"
    env = base_env(PATH=f"{bin_dir}:{os.environ['PATH']}", LOG=log, PYTHON=sys.executable, CONFIG=CONFIG,
                   OUT_DIR=out, GPUS_PER_NODE=2, SLURM_JOB_ID=4242, SLURM_JOB_NODELIST="localhost",
                   SLURM_NNODES=1, MASTER_PORT=free_port())
    script = [str(REPO / "scripts" / "slurm" / "base_1b.sh"), *overrides]
    proc = start(["bash", *script], env)
    try:
        wait_for_steps(out, 3, [proc])
        proc.send_signal(signal.SIGUSR1)
        first = finish(proc, timeout=90)
    finally:
        kill_all([proc])
    assert proc.returncode == 0, first[-3000:]
    assert log.read_text().splitlines() == ["scontrol requeue 4242"], first[-3000:]
    step = json.loads((out / "preempted.json").read_text())["step"]
    assert "requeueing job 4242" in first and 3 <= step < 200

    again = run_job(["bash", *script], {**env, "SLURM_RESTART_COUNT": "1", "MASTER_PORT": str(free_port())})
    assert again.returncode == 0, again.stdout[-3000:]
    assert f"at step {step} " in again.stdout and "restart 1 of job 4242" in again.stdout
    assert train_losses(out) == train_losses(full)
    assert log.read_text().splitlines() == ["scontrol requeue 4242"]  # finished: no second requeue


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_nonfinite_step_is_not_applied(prepared, tmp_path, stage):
    """In-process, each ZeRO stage: after a NaN step the weights and optimizer state are those
    of a run that skipped the batch by hand (cursor and step advanced, nothing else)."""
    import torch

    from distributed_utils import CONFIG
    from megareuse.config import load_config
    from megareuse.engine.trainer import Trainer
    make = lambda name: Trainer(load_config(CONFIG, tiny_args(prepared, tmp_path / name,  # noqa: E731
                                                             f"parallel.zero_stage={stage}")[2:]),
                                emit=lambda s: None)
    weights = lambda t: {k: v.detach().clone() for k, v in t.checkpointer.full_state_dict(t.engine).items()}  # noqa: E731
    poisoned, by_hand = make("poisoned"), make("by_hand")
    poisoned.train_step()
    by_hand.train_step()
    before = weights(poisoned)
    original = poisoned.batch_loss
    poisoned.batch_loss = lambda batch: original(batch) * float("nan")
    loss, _, _, applied = poisoned.train_step()
    assert not applied and loss != loss
    after = weights(poisoned)
    assert all(torch.equal(before[k], after[k]) for k in before)
    by_hand.state.step += 1
    by_hand.state.samples += 8
    by_hand.state.tokens += 256
    poisoned.batch_loss = original
    for _ in range(2):
        assert poisoned.train_step()[3] and by_hand.train_step()[3]
    got, want = weights(poisoned), weights(by_hand)
    assert all(torch.equal(got[k], want[k]) for k in want)
