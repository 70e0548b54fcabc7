"""Unit tests of the reliability pieces: spike median, skip window, stop signals, checkpoint
retention and crash tidying, the watchdog's diagnosis (against a real TCP store)."""
from __future__ import annotations

import json
import os
import random
import signal
import statistics

import pytest
import torch

from megareuse.config import GuardConfig
from megareuse.engine import checkpoint as ckpt
from megareuse.engine.guard import DivergenceGuard, SpikeDetector, StopSignals
from megareuse.engine.watchdog import PREFIX, Watchdog
from megareuse.parallel.launch import free_port


def test_spike_detector_running_median_matches_statistics():
    rng = random.Random(0)
    detector, history = SpikeDetector(window=7, ratio=1.5), []
    for i in range(200):
        loss = rng.uniform(2.0, 3.0) if i % 37 else 9.0
        spike = detector.observe(loss)
        window = history[-7:]
        if len(window) >= 7:
            median = statistics.median(window)
            assert (spike is not None) == (loss > 1.5 * median)
            if spike is not None:
                assert spike == pytest.approx(median, abs=0)
        else:
            assert spike is None
        history.append(loss)
    assert SpikeDetector(window=5, ratio=0).observe(1e9) is None  # ratio 0: off


def test_divergence_guard_window_rollbacks_then_stop():
    guard = DivergenceGuard(GuardConfig(max_skips=3, skip_window=10, max_rollbacks=2, lr_factor=0.5))
    assert [guard.on_skip(s) for s in (1, 5, 20, 25)] == [None, None, None, None]  # never 3 in 10 steps
    assert guard.on_skip(29) == "rollback"  # 20, 25, 29
    guard.rolled_back()
    assert [guard.on_skip(s) for s in (30, 31, 32)] == [None, None, "rollback"]
    guard.rolled_back()
    assert [guard.on_skip(s) for s in (40, 41, 42)] == [None, None, "stop"]
    assert guard.state.lr_scale == 0.25 and guard.state.rollbacks == 2 and guard.state.skipped_steps == 11
    assert "2 rollbacks already (guard.max_rollbacks = 2)" in guard.stop_message(42)
    stop = DivergenceGuard(GuardConfig(max_skips=1, on_divergence="stop"))
    assert stop.on_skip(3) == "stop" and "guard.on_divergence = 'stop'" in stop.stop_message(3)


def test_stop_signals_set_a_flag_and_restore_handlers():
    previous = signal.getsignal(signal.SIGUSR1)
    signals = StopSignals(["SIGTERM", "SIGUSR1"])
    try:
        assert signals.agreed() is None
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # the first signal is the one reported
        assert signals.agreed() == "SIGUSR1"
    finally:
        signals.close()
    assert signal.getsignal(signal.SIGUSR1) == previous


def _fake_checkpoint(root, step):
    return ckpt.save_checkpoint(root, step, {"model": {"w": torch.full((4,), float(step))}}, {"D1": step})


def test_retention_keeps_good_checkpoints_when_the_newest_is_corrupt(tmp_path):
    for step in (1, 2, 3):
        _fake_checkpoint(tmp_path, step)
    corrupt = ckpt.checkpoint_dir(tmp_path, 4)
    _fake_checkpoint(tmp_path, 4)
    data = bytearray((corrupt / "model.pt").read_bytes())
    data[-20] ^= 0xFF
    (corrupt / "model.pt").write_bytes(bytes(data))
    ckpt._VERIFIED.clear()  # a new process: nothing verified yet
    deleted = ckpt.apply_retention(tmp_path, keep_last=2)
    assert [p.name for p in deleted] == ["step_00000001"]
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["step_00000002", "step_00000003", "step_00000004"]  # the corrupt one stays
    with pytest.warns(UserWarning, match="step_00000004: model.pt fails its sha256"):
        assert ckpt.latest_checkpoint(tmp_path).name == "step_00000003"
    _fake_checkpoint(tmp_path, 5)
    assert ckpt.apply_retention(tmp_path, keep_last=1) == [tmp_path / n for n in names[::-1]]


def test_clean_stale_restores_an_interrupted_resave(tmp_path):
    good = _fake_checkpoint(tmp_path, 3)
    os.rename(good, tmp_path / ".old-step_00000003-123")  # killed between the two renames
    (tmp_path / ".tmp-step_00000003").mkdir()
    (tmp_path / ".old-step_00000002-9").mkdir()  # superseded copy
    notes = ckpt.clean_stale(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003"]
    assert ckpt.verify_checkpoint(tmp_path / "step_00000003") is None
    assert any("restored step_00000003" in n for n in notes) and len(notes) == 3


@pytest.fixture
def store():
    port = free_port()
    server = torch.distributed.TCPStore("127.0.0.1", port, world_size=None, is_master=True,
                                        wait_for_workers=False)
    yield port, server


def _beat(server, rank, beat, step, idle=0.0):
    server.set(f"{PREFIX}{rank}", json.dumps({"beat": beat, "step": step, "phase": "train",
                                              "host": "h1", "pid": 100 + rank, "idle_s": idle}))


def test_watchdog_names_silent_and_lagging_ranks(store):
    port, server = store
    dog = Watchdog(rank=0, world_size=3, timeout_s=3.0, master_addr="127.0.0.1", master_port=port)
    dog.progress(7, "train")
    dog._store_op(dog._publish_record)
    _beat(server, 1, 5, 7)
    _beat(server, 2, 9, 7)
    report = dog.diagnose(watch_s=0.1)  # nobody beat in between: 1 and 2 are silent
    assert "rank 1 (host h1, pid 101) sent no heartbeat" in report and "rank 2 (host h1, pid 102)" in report

    def advance(step1, step2):
        _beat(server, 1, 6, step1, idle=12.0)
        _beat(server, 2, 10, step2)
    import threading
    timer = threading.Timer(0.2, advance, args=(7, 8))
    timer.start()
    dog.progress(8, "train")
    dog._store_op(dog._publish_record)
    report = dog.diagnose(watch_s=0.6)
    timer.join()
    assert report.startswith("rank 1 (host h1, pid 101) is stuck (alive, idle 12 s) while other ranks reached step 8")
    _beat(server, 1, 7, 8)
    timer = threading.Timer(0.2, _beat, args=(server, 1, 8, 8))
    timer.start()
    _beat(server, 2, 11, 8)
    threading.Timer(0.3, _beat, args=(server, 2, 12, 8)).start()
    assert dog.diagnose(watch_s=0.6) is None  # all alive at the same step
    timer.join()


def test_watchdog_reports_unreachable_store():
    port = free_port()
    server = torch.distributed.TCPStore("127.0.0.1", port, world_size=None, is_master=True, wait_for_workers=False)
    dog = Watchdog(rank=1, world_size=2, timeout_s=3.0, master_addr="127.0.0.1", master_port=port)
    del server  # the process holding the store is gone
    report = dog.diagnose(watch_s=0.1)
    assert report.startswith(f"the job's rendezvous store at 127.0.0.1:{port} is unreachable")
