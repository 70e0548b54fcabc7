"""Start multi-process training jobs for tests: every job is bounded in time and killed whole."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from megareuse.parallel.launch import free_port

REPO = Path(__file__).resolve().parent.parent
TRAIN = str(REPO / "megareuse" / "train.py")
CONFIG = str(REPO / "configs" / "train" / "tiny_base.yaml")


def tiny_args(prepared, out_dir, *extra):
    """A tiny model whose heads, KV heads, FFN and vocabulary split over TP=2."""
    return ["--config", CONFIG, f"data.dir={prepared}", f"run.out_dir={out_dir}",
            "model.vocab_size=512", "model.d_model=32", "model.n_heads=4", "model.n_kv_heads=2",
            "model.n_layers=2", "model.ffn_hidden=64", "model.max_seq_len=32", "data.seq_len=32",
            "run.micro_batch_size=8", "run.grad_accum=1", "run.train_tokens=1536",  # 6 steps
            "run.eval_interval=3", "run.eval_tokens=512", "run.save_interval=100",
            "run.log_interval=1", "run.threads=1", "schedule.warmup_steps=2", "optim.lr=1e-2",
            "parallel.timeout_s=60", *extra]


def base_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_", "SLURM_", "OMPI_", "PMI"))}
    env.update({"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)})
    env.update({k: str(v) for k, v in extra.items()})
    return env


def start(cmd, env=None, cwd=None) -> subprocess.Popen:
    """Start a command in its own process group (output: stdout and stderr together)."""
    return subprocess.Popen(cmd, env=env or base_env(), cwd=cwd or REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    """Wait for ``proc`` and return its output; on timeout kill its whole group and fail."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"timed out after {timeout}s: {' '.join(map(str, proc.args))}\n{out[-4000:]}")
    return out


def run_job(cmd, env=None, timeout=240, cwd=None) -> subprocess.CompletedProcess:
    """Run a launcher command in its own process group; kill the whole group on timeout."""
    proc = start(cmd, env, cwd)
    out = finish(proc, timeout)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def run_ranks(envs, args, timeout=240) -> list[subprocess.CompletedProcess]:
    """Start one `python megareuse/train.py` per environment (srun-style), wait for all."""
    procs = [subprocess.Popen([sys.executable, TRAIN, *args], env=env, cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
             for env in envs]
    results = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, ""))
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    return results


def torchrun(nproc, args, timeout=240, **env) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", TRAIN, *args]
    return run_job(cmd, base_env(**env), timeout)


def train_losses(out_dir) -> list[float]:
    lines = (Path(out_dir) / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"]


def eval_losses(out_dir) -> list[dict]:
    lines = (Path(out_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "eval"]
