"""Collectives a CUDA run can make: the process group carries gloo beside NCCL, and the trainer's
host control traffic (stop-signal agreement) leaves the per-step path.

A pure ``nccl`` group rejects CPU tensors, which the trainer all-reduces for its control traffic;
a world of one rank skips the all-reduce, so a one-GPU run never shows it. On CPU the check is an
audit (megareuse/parallel/backend.py): every collective of a real 2-rank gloo run is recorded
with its tensors' devices and judged against the backend string the trainer requests when it
sees a GPU. On the old code that string was "nccl" and every host collective was a problem.
"""
import json
import sys
from unittest import mock

import pytest
import torch
import torch.distributed as dist

from distributed_utils import REPO, run_job, tiny_args, train_losses
from megareuse.config import ConfigError
from megareuse.engine.ds import resolve_backend
from megareuse.parallel.backend import HOST_AND_NCCL, CollectiveAudit, backend_map, process_group_backend, \
    rejection
from megareuse.parallel.launch import free_port

PROBE = str(REPO / "tests" / "collective_probe.py")


def test_cuda_runs_request_gloo_beside_nccl():
    with mock.patch.object(torch.cuda, "is_available", lambda: True):
        assert resolve_backend("auto") == HOST_AND_NCCL == "cpu:gloo,cuda:nccl"
        assert resolve_backend("nccl") == HOST_AND_NCCL  # an explicit nccl still gets its host side
        assert resolve_backend("gloo") == "gloo"
    with mock.patch.object(torch.cuda, "is_available", lambda: False):
        assert resolve_backend("auto") == "gloo"
        with pytest.raises(ConfigError, match="parallel.backend = 'nccl'.*no CUDA device.*accepted auto or gloo"):
            resolve_backend("nccl")
    with pytest.raises(ConfigError, match="parallel.backend = 'mpi'.*accepted one of auto, gloo, nccl"):
        process_group_backend("mpi", cuda=True)


def test_backend_map_reads_backend_strings_as_torch_does():
    assert backend_map("cpu:gloo,cuda:nccl") == {"cpu": "gloo", "cuda": "nccl"}
    assert backend_map("nccl") == {"cuda": "nccl"}
    assert backend_map("gloo") == {"cpu": "gloo", "cuda": "gloo"}
    assert "no backend for cpu" in rejection("nccl", "cpu")
    assert rejection("nccl", "cuda") is None and rejection(HOST_AND_NCCL, "cpu") is None


def test_audit_flags_a_host_tensor_on_an_nccl_group():
    mine = not dist.is_initialized()  # an in-process Trainer of an earlier test may have started one
    if mine:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        for spec, problems in (("nccl", 1), (HOST_AND_NCCL, 0)):
            audit = CollectiveAudit(spec)
            with audit.installed():
                dist.all_reduce(torch.ones(2))
            assert len(audit.problems) == problems and audit.calls[0].devices == ("cpu",)
            assert audit.calls[0].caller == "test_audit_flags_a_host_tensor_on_an_nccl_group"
        assert dist.all_reduce.__name__ == "all_reduce"  # restored
    finally:
        if mine:
            dist.destroy_process_group()


def test_two_rank_run_makes_no_collective_nccl_would_reject(prepared, tmp_path):
    """TP=1 x DP=2 ZeRO-2 bf16 with evaluation, a checkpoint finished in the background (its
    failure flag is all-reduced) and 8 steps read every 4: every collective is judged against
    the backends of a CUDA run, and the stop-signal agreement runs at the 2 read steps only."""
    out, probes = tmp_path / "run", tmp_path / "probes"
    probes.mkdir()
    args = tiny_args(prepared, out, "parallel.zero_stage=2", "run.dtype=bf16", "run.micro_batch_size=4",
                     "run.train_tokens=2048", "run.log_interval=4", "run.eval_interval=4",
                     "run.save_interval=4", "run.async_save=true")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           PROBE, *args]
    from distributed_utils import base_env
    proc = run_job(cmd, base_env(PROBE_DIR=probes))
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert len(train_losses(out)) == 8
    for rank in (0, 1):
        found = json.loads((probes / f"rank{rank}.json").read_text())
        assert found["spec"] == HOST_AND_NCCL
        calls = found["calls"]
        assert [c for c in calls if c["problem"]] == []
        assert sum(c["caller"] == "agreed" for c in calls) == 2  # steps 4 and 8, not every step
        assert sum(c["caller"] == "wait" for c in calls) >= 1
        assert any(c["caller"] == "evaluate" for c in calls)
        # control traffic is on the host (gloo's side), the step's loss on the device (NCCL's)
        assert {tuple(c["devices"]) for c in calls if c["caller"] in ("agreed", "wait")} == {("cpu",)}
