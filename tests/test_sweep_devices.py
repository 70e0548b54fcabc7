"""Local sweeps on GPU nodes: each worker process owns its slot of devices (CUDA_VISIBLE_DEVICES)
for life. The device count is mocked (torch.cuda.is_available / device_count and the
environment): the assignment is pure and unit tested, and spawned workers are checked end to end
to see distinct devices, training on CPU (run.device=auto) since this machine has no GPU."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

from megareuse.cli import main
from megareuse.sweep import local
from megareuse.sweep.grid import load_experiment, plan_experiment
from megareuse.sweep.local import SweepError, assign_devices, device_slots, local_dp, visible_devices
from megareuse.sweep.slurm import train_resources, write_slurm

from test_sweep import experiment
from test_train import quiet

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "experiments" / "demo.yaml"
EIGHT = [str(i) for i in range(8)]
GPU_TRAIN = {"run": {"device": "cuda"}}


@pytest.fixture
def gpus(monkeypatch):
    """A node with ``n`` CUDA devices as this process sees them; CUDA_VISIBLE_DEVICES as given
    (None: unset)."""
    def node(n: int, visible: str | None = None) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        if visible is None:
            monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        else:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    return node


def refused(match: str, fn, *args, **kwargs) -> str:
    """The one-line error ``fn`` raises."""
    with pytest.raises(SweepError, match=re.escape(match)) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


# ------------------------------------------------------------------ the assignment (pure)
def test_one_gpu_each():
    slots = assign_devices(EIGHT, workers=8, gpus_per_run=1)
    assert slots == [(d,) for d in EIGHT]  # eight workers, eight distinct GPUs
    assert assign_devices(EIGHT, workers=3, gpus_per_run=1) == [("0",), ("1",), ("2",)]


def test_runs_per_gpu_shares_each_gpu_after_spreading():
    slots = assign_devices(EIGHT, workers=16, gpus_per_run=1, runs_per_gpu=2)
    assert len(slots) == 16 and all(slots.count((d,)) == 2 for d in EIGHT)
    assert sorted(slots[:8]) == [(d,) for d in EIGHT]  # every GPU has a run before any has two
    # fewer workers than GPUs with sharing allowed: still one GPU each
    assert assign_devices(EIGHT, workers=8, gpus_per_run=1, runs_per_gpu=2) == [(d,) for d in EIGHT]


def test_gpus_per_run_groups_consecutive_devices():
    assert assign_devices(EIGHT, workers=4, gpus_per_run=2) == [("0", "1"), ("2", "3"), ("4", "5"), ("6", "7")]
    assert assign_devices(EIGHT, workers=8, gpus_per_run=4, runs_per_gpu=4) == [("0", "1", "2", "3"),
                                                                              ("4", "5", "6", "7")] * 4
    # 3 GPUs a run on 8: two groups, GPUs 6 and 7 left idle
    assert assign_devices(EIGHT, workers=2, gpus_per_run=3) == [("0", "1", "2"), ("3", "4", "5")]


def test_cpu_sweeps_have_no_slots():
    assert assign_devices([], workers=4, gpus_per_run=0) == []
    assert assign_devices(EIGHT, workers=4, gpus_per_run=0) == []


def test_bad_combinations_are_refused_with_one_line():
    refused("--workers = 9: accepted at most 8 (8 visible GPUs // --gpus-per-run 1 x --runs-per-gpu 1)",
            assign_devices, EIGHT, 9, 1)
    refused("--workers = 17: accepted at most 16", assign_devices, EIGHT, 17, 1, 2)
    refused("--workers = 5: accepted at most 4 (8 visible GPUs // --gpus-per-run 2", assign_devices, EIGHT, 5, 2)
    refused("--workers = 3: accepted at most 2 (8 visible GPUs // --gpus-per-run 3", assign_devices, EIGHT, 3, 3)
    refused("--gpus-per-run = 9: accepted 0..8 (the visible CUDA devices: 0,1,2,3,4,5,6,7)",
            assign_devices, EIGHT, 1, 9)
    refused("--gpus-per-run = 1 but no CUDA device is visible; accepted --gpus-per-run 0",
            assign_devices, [], 1, 1)
    refused("--runs-per-gpu = 2 but the runs use no GPU (--gpus-per-run 0); accepted --runs-per-gpu 1",
            assign_devices, [], 2, 0, 2)
    refused("--workers = 0: accepted an integer >= 1", assign_devices, EIGHT, 0, 1)
    refused("--gpus-per-run = -1: accepted an integer >= 0", assign_devices, EIGHT, 1, -1)
    refused("--runs-per-gpu = 0: accepted an integer >= 1", assign_devices, EIGHT, 1, 1, 0)
    refused("--workers = True: accepted an integer >= 1", assign_devices, EIGHT, True, 1)


# ------------------------------------------------------------------ the devices of this node
def test_visible_devices_respect_the_parents_cuda_visible_devices(gpus):
    gpus(4, "4,5,6,7")  # e.g. what SLURM gave the job
    assert visible_devices() == ["4", "5", "6", "7"]
    assert device_slots(GPU_TRAIN, workers=4) == [("4",), ("5",), ("6",), ("7",)]
    assert device_slots(GPU_TRAIN, workers=2, gpus_per_run=2) == [("4", "5"), ("6", "7")]
    refused("--workers = 5: accepted at most 4 (4 visible GPUs", device_slots, GPU_TRAIN, 5)
    gpus(2, "GPU-aaaa, GPU-bbbb")  # UUIDs, as nvidia-smi -L names them
    assert visible_devices() == ["GPU-aaaa", "GPU-bbbb"]
    gpus(2, "3,1,-1,0")  # CUDA stops at the first invalid entry: torch counts 2
    assert visible_devices() == ["3", "1"]
    gpus(8)
    assert visible_devices() == EIGHT


def test_default_is_one_gpu_a_run_on_gpus_and_none_on_cpu(gpus):
    gpus(8)
    assert device_slots(GPU_TRAIN, workers=8) == [(d,) for d in EIGHT]
    assert device_slots({"run": {"device": "auto"}}, workers=2) == [("0",), ("1",)]
    # runs that train on CPU (the config's default device) keep the CPU sweep on a GPU node...
    assert device_slots({}, workers=12) == device_slots({"run": {"device": "cpu"}}, workers=12) == []
    # ...and GPUs asked for them would sit idle: refused
    refused("--gpus-per-run = 1 but run.device = 'cpu'", device_slots, {}, 1, 1)
    # and no GPU for runs that train on GPUs would put every worker's run on cuda:0
    refused("--gpus-per-run = 0 but the runs train on GPUs (run.device = 'auto', 8 visible)",
            device_slots, {"run": {"device": "auto"}}, 2, 0)
    assert device_slots({}, workers=2, gpus_per_run=0) == []
    gpus(0, "0,1")  # no CUDA (a CPU build of torch): nothing to give out, whatever the variable says
    assert visible_devices() == [] and device_slots(GPU_TRAIN, workers=4) == []
    refused("--gpus-per-run = 1 but no CUDA device is visible", device_slots, GPU_TRAIN, 1, 1)


def test_local_dp_counts_the_ranks_of_a_run():
    assert local_dp({}, None) == local_dp({}, 0) == local_dp({}, 1) == 1
    assert local_dp({}, 4) == 4 and local_dp({"parallel": {"tp": 2}}, 4) == 2
    refused("parallel.tp = 2 but each local run has 1 rank(s); accepted --gpus-per-run a multiple of 2",
            local_dp, {"parallel": {"tp": 2}}, None)


def test_torchrun_command_parses_as_one_rank_per_gpu(tmp_path):
    from torch.distributed.run import get_args_parser

    cmd = local.torchrun_command(4, tmp_path / "r.spec.json")
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    args = get_args_parser().parse_args(cmd[3:])
    assert (args.nproc_per_node, args.standalone, args.max_restarts, args.module) == ("4", True, 0, True)
    assert (args.training_script, args.training_script_args) == ("megareuse.sweep.rank", [str(tmp_path / "r.spec.json")])


# ------------------------------------------------------------------ refusals before anything is written
def test_run_sweep_refuses_more_workers_than_slots_before_writing(tmp_path, gpus):
    gpus(2, "6,7")
    root = tmp_path / "root"
    refused("--workers = 3: accepted at most 2 (2 visible GPUs // --gpus-per-run 1 x --runs-per-gpu 1)",
            local.run_sweep, GPU_TRAIN, [], root, workers=3, emit=quiet)
    assert not root.exists()


@pytest.mark.parametrize("argv, message", [
    (["--gpus-per-run", "-1"], "--gpus-per-run = -1: accepted an integer >= 0"),
    (["--runs-per-gpu", "0"], "--runs-per-gpu = 0: accepted an integer >= 1"),
    (["--gpus-per-run", "2", "--slurm", "SLURM"], "--gpus-per-run is for a local sweep; with --slurm"),
    (["--runs-per-gpu", "2", "--run", "base/trunk"], "--runs-per-gpu is for a local sweep; --run executes"),
    (["--share-nodes"], "--share-nodes is for --slurm"),
    (["--gpus-per-run", "2"], "--dp = 1 but each local run has 2 rank(s) (--gpus-per-run) at TP=1; accepted --dp 2"),
    (["--workers", "2", "--runs-per-gpu", "2"], "--runs-per-gpu = 2 but the runs use no GPU"),  # CPU
])
def test_cli_refuses_bad_device_flags_with_one_line(tmp_path, capsys, argv, message):
    argv = [a.replace("SLURM", str(tmp_path / "slurm")) for a in argv]
    code = main(["sweep", "--config", str(DEMO), "--out", str(tmp_path / "root"), *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "root").exists() and not (tmp_path / "slurm").exists()


# ------------------------------------------------------------------ SLURM: what each task asks for
def test_slurm_tasks_request_their_gpus_and_share_nodes_only_when_asked(tmp_path):
    assert train_resources(2, 8, "1:00:00") == ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8",
                                                "--exclusive", "--mem=0", "--time=1:00:00"]
    assert train_resources(1, 2, "1:00:00", exclusive=False) == ["--nodes=1", "--ntasks-per-node=1",
                                                                 "--gpus-per-node=2", "--time=1:00:00"]
    runs = plan_experiment(load_experiment(DEMO), dp=2)
    for exclusive in (True, False):
        script_dir = tmp_path / f"slurm_{exclusive}"
        text = write_slurm(runs, DEMO, tmp_path / "root", script_dir, gpus_per_node=2,
                           exclusive=exclusive).read_text()
        submits = [line for line in text.splitlines() if line.startswith("submit ")]
        train = [s for s in submits if "-train " in s]
        grow = [s for s in submits if "-grow " in s]
        assert train and grow
        assert all("--gpus-per-node=2" in s and ("--exclusive" in s) == exclusive
                   and ("--mem=0" in s) == exclusive for s in train)
        assert all("--gpus-per-node=1" in s and "--ntasks-per-node=1" in s for s in grow)
        assert "#   train: " + " ".join(train_resources(1, 2, "24:00:00", exclusive)) in text
        assert ("--share-nodes" in text) != exclusive
    refused("exclusive = 'no': accepted True or False", write_slurm, runs, DEMO, tmp_path / "root",
            tmp_path / "s3", gpus_per_node=2, exclusive="no")


# ------------------------------------------------------------------ end to end: spawned workers
def worker_devices(log_dir: Path) -> dict[str, tuple[str, str]]:
    """run log -> (worker pid, CUDA_VISIBLE_DEVICES it ran with), from each log's first line."""
    found = {}
    for log in sorted(log_dir.glob("*.log")):
        match = re.match(r"sweep worker (\d+) slot \d+: CUDA_VISIBLE_DEVICES=(\S+)$", log.read_text().splitlines()[0])
        assert match, f"{log.name} does not start with its worker's devices"
        found[log.name] = match.groups()
    return found


def test_spawned_workers_train_on_distinct_devices(tmp_path, prepared, gpus):
    """Two workers on a node whose job has GPUs 6 and 7: each spawned worker runs with one of them
    for life (a worker running two runs keeps its GPU), and the runs train (on CPU here:
    run.device=auto, and the workers' torch finds no CUDA)."""
    gpus(2, "6,7")
    exp = experiment(tmp_path, prepared)
    train = {**exp.train, "run": {**exp.train["run"], "device": "auto"}}
    runs = [r for r in plan_experiment(exp) if r.run_id.startswith("scratch_code/")]
    lines: list[str] = []
    ran = local.run_sweep(train, runs, tmp_path / "sweep", workers=2, emit=lines.append)
    assert sorted(ran) == sorted(r.run_id for r in runs)
    assert all(local.is_done(tmp_path / "sweep", r) for r in runs)
    assert any(line.endswith("CUDA_VISIBLE_DEVICES 6 | 7") for line in lines), lines
    seen = worker_devices(tmp_path / "sweep" / "logs")
    assert len(seen) == len(runs)
    device_of: dict[str, str] = {}
    for pid, device in seen.values():
        assert device in ("6", "7")
        assert device_of.setdefault(pid, device) == device  # a worker keeps its slot
    assert len(set(device_of.values())) == len(device_of)  # distinct workers, distinct GPUs


def test_a_run_of_two_gpus_trains_under_torchrun(tmp_path, prepared, gpus):
    """--gpus-per-run 2: the worker runs its run under torchrun with 2 ranks (gloo on CPU here),
    planned for DP 2, with both GPUs of its slot visible (about 10 s)."""
    gpus(2, "0,1")
    exp = experiment(tmp_path, prepared)
    train = {**exp.train, "run": {**exp.train["run"], "device": "auto"}}
    runs = [r for r in plan_experiment(exp, dp=2) if r.run_id == "scratch_code/D=1280"]
    ran = local.run_sweep(train, runs, tmp_path / "sweep", workers=1, gpus_per_run=2, emit=quiet)
    assert ran == ["scratch_code/D=1280"]
    log = (tmp_path / "sweep" / "logs" / "scratch_code__D=1280.log").read_text()
    assert re.match(r"sweep worker \d+ slot 0: CUDA_VISIBLE_DEVICES=0,1\n", log), log[:500]
    assert "on 2 x cpu (TP=1, DP=2" in log, log[-2000:]  # the trainer's start-up line, rank 0
    summary = json.loads((tmp_path / "sweep" / "scratch_code" / "D=1280" / "summary.json").read_text())
    assert summary["finished"] and len(summary["peak_memory_mib"]["rss"]) == 2, summary  # one per rank
