"""Save at one TP x DP x ZeRO layout, resume at another (the sharded format, engine/sharded.py):
the restored fp32 weights and Adam moments are bitwise the saved ones, and the continued losses
equal an uninterrupted run's.

A chain of jobs: each resumes the previous job's last checkpoint at the next layout, trains one
step and saves. The probe (tests/reshard_probe.py) writes what each job restored; it must equal
the checkpoint it was read from, element for element. The losses are compared with one
uninterrupted single-process run of the same global batch (8 samples per step): TP and DP change
the order of floating-point sums, so agreement is to rounding (measured below 1e-6 relative).
The full matrix ({TP 1,2} x {DP 1,2,4} x {ZeRO 0-3}: every layout saved once, resumed at the
next) is under -m slow; the default suite runs a chain through every ZeRO stage and both TP
degrees.
"""
import sys

import pytest
import torch

from distributed_utils import REPO, TRAIN, base_env, run_job, tiny_args, train_losses
from megareuse.engine.sharded import ShardedReader
from megareuse.parallel.launch import free_port

PROBE = str(REPO / "tests" / "reshard_probe.py")
RTOL = 1e-6
STEPS = 3  # of the first job; every later job trains one more


def layout_args(tp, dp, zero):
    return [f"parallel.tp={tp}", f"parallel.zero_stage={zero}", f"run.micro_batch_size={8 // dp}"]


def job(prepared, out, layout, steps, extra=(), probe=None):
    tp, dp, _ = layout
    world = tp * dp
    args = [*tiny_args(prepared, out, *layout_args(*layout), "schedule.kind=constant", "run.save_interval=1",
                       "run.keep_last=2", f"run.train_tokens={steps * 8 * 32}"), *extra]
    script = PROBE if probe else TRAIN
    env = base_env(**({"PROBE_DUMP": probe} if probe else {}))
    if world == 1:
        return run_job([sys.executable, script, *args], env, timeout=300)
    return run_job([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}",
                    f"--master_port={free_port()}", script, *args], env, timeout=300)


def run_chain(prepared, tmp_path, chain):
    out = tmp_path / "run"
    first = job(prepared, out, chain[0], STEPS)
    assert first.returncode == 0, first.stdout[-3000:]
    for i, layout in enumerate(chain[1:], 1):
        steps = STEPS + i
        saved = out / "checkpoints" / f"step_{steps - 1:08d}"
        dump = tmp_path / f"restored{i}"
        proc = job(prepared, out, layout, steps, ["--resume", "auto"], probe=str(dump))
        assert proc.returncode == 0, proc.stdout[-3000:]
        assert f"resumed from {saved}" in proc.stdout, proc.stdout[-3000:]
        source, restored = ShardedReader(saved), ShardedReader(dump)
        assert set(source.tensors) == set(restored.tensors) and any(n.startswith("optim.") for n in source.tensors)
        for name in source.tensors:
            assert torch.equal(source.full(name), restored.full(name)), (chain[i - 1], layout, name)
    reference = tmp_path / "reference"
    ref = job(prepared, reference, (1, 1, 0), STEPS + len(chain) - 1)
    assert ref.returncode == 0, ref.stdout[-3000:]
    want, got = train_losses(reference), train_losses(out)
    assert len(got) == len(want) == STEPS + len(chain) - 1
    worst = max(abs(a - b) / abs(a) for a, b in zip(want, got))
    assert worst <= RTOL, (want, got)


def test_resume_through_every_zero_stage_and_tp_degree(prepared, tmp_path):
    # TP2 ZeRO-2 -> TP1 DP2 ZeRO-3 -> TP2 ZeRO-0 -> TP1 DP2 ZeRO-1
    run_chain(prepared, tmp_path, [(2, 1, 2), (1, 2, 3), (2, 1, 0), (1, 2, 1)])


MATRIX = [(tp, dp, zero) for tp in (1, 2) for dp in (1, 2, 4) for zero in (0, 1, 2, 3)]


@pytest.mark.slow  # 24 jobs of up to 8 ranks
def test_resume_matrix(prepared, tmp_path):
    # consecutive layouts differ (in TP, DP or ZeRO stage): every layout saves once and resumes once
    run_chain(prepared, tmp_path, [*MATRIX[::2], *MATRIX[1::2]])
