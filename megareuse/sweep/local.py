"""Run a planned sweep locally: skip what is done, resume what was interrupted, run the rest.

A run is done when its ``record.json`` exists (train runs with a data point), its
``summary.json`` says finished (trunks), or its grown checkpoint verifies (grow). An interrupted
run resumes from its own latest checkpoint; a branch that never started starts from its trunk's
checkpoint. Runs execute in dependency order, one at a time in this process, or ``workers`` at a
time in worker processes (each run still single-process; a run starts when its dependencies are
done).
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Callable, Optional

from megareuse.paths import check_output_dir
from megareuse.sweep.grid import Experiment, RunSpec, plan_experiment


class SweepError(RuntimeError):
    """A sweep cannot proceed (unknown run, unmet dependency): one line."""


def run_dir(root: Path, run: RunSpec) -> Path:
    return Path(root) / run.run_id


def is_done(root: Path, run: RunSpec) -> bool:
    out = run_dir(root, run)
    if run.kind == "grow":
        from megareuse.engine.checkpoint import verify_checkpoint
        return out.is_dir() and verify_checkpoint(out, checksums=False) is None
    summary = out / "summary.json"
    return summary.is_file() and json.loads(summary.read_text()).get("finished", False)


def _overrides(root: Path, run: RunSpec) -> list[str]:
    out = [o.replace("{root}", str(root)) for o in run.overrides]
    return out + [f"run.out_dir={run_dir(root, run)}"]


def execute(train: dict, root: str, run: RunSpec, emit: Callable[[str], None] = print) -> str:
    """Execute one run in this process (also under srun/torchrun: the Trainer reads the launcher
    environment). Returns the run id."""
    from megareuse.config import Config, apply_overrides
    from megareuse.engine import checkpoint as ckpt
    from megareuse.engine.trainer import Trainer

    root_path = Path(root)
    if run.kind == "grow":
        from megareuse.reuse.growth import grow_checkpoint
        args = dict(run.grow)
        source = root_path / args.pop("from")
        out = run_dir(root_path, run)
        if not out.exists():
            grow_checkpoint(source, out, **args)
        return run.run_id
    cfg = Config.from_dict(apply_overrides(train, _overrides(root_path, run))).validate()
    if ckpt.latest_checkpoint(Path(cfg.run.out_dir) / "checkpoints") is not None:
        resume: Optional[str] = "auto"
    elif run.resume_from:
        resume = str(root_path / run.resume_from)
    else:
        resume = None
    Trainer(cfg, resume=resume, emit=emit).run()
    return run.run_id


def worker_threads(workers: int, cpus: Optional[int] = None) -> int:
    """Intra-op threads for each of ``workers`` sweep processes: the cores this process may use,
    shared out (at least 1). A worker left at the train config's ``run.threads`` oversubscribed
    the cores: 2 workers x 2 threads on 2 cores ran each at 4.1k tokens/s, against 20k at 1."""
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus // max(1, workers))


def _quiet_execute(train: dict, root: str, run: RunSpec, log_dir: str, threads: int = 1) -> str:
    """Worker-process entry: one run with ``threads`` intra-op threads (the train config's
    ``run.threads`` is replaced; a series' own override still wins), its output in
    <log_dir>/<run id>.log."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    train = {**train, "run": {**train.get("run", {}), "threads": threads}}
    if not (dist.is_available() and dist.is_initialized()):  # the worker's first run: the
        # launcher variables are the parent's own single-process start-up's, not this process's;
        # a later run in the same worker keeps the ones its first run set with its process group
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            os.environ.pop(key, None)
    log = Path(log_dir) / (run.run_id.replace("/", "__") + ".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as fh:
        try:
            return execute(train, root, run, emit=lambda s: (fh.write(s + "\n"), fh.flush()))
        except Exception:
            fh.write(traceback.format_exc())
            raise


def eta_seconds(elapsed: float, done_work: float, remaining_work: float) -> Optional[float]:
    """Seconds left at the rate so far: elapsed x remaining / done work (None before any is done)."""
    if remaining_work <= 0:
        return 0.0
    return elapsed * remaining_work / done_work if done_work > 0 else None


def critical_path(runs: list[RunSpec]) -> dict[str, float]:
    """Per run: its training FLOPs plus the longest chain of FLOPs that waits on it. Workers take
    the ready run with the longest chain first, so a long trunk near the end of the plan (the
    largest scratch run) does not start last and leave a worker idle behind it."""
    children: dict[str, list[str]] = {r.run_id: [] for r in runs}
    for r in runs:
        for d in r.depends_on:
            if d in children:
                children[d].append(r.run_id)
    length: dict[str, float] = {}
    for r in reversed(runs):  # a plan lists each run after the runs it depends on
        length[r.run_id] = r.flops + max((length[c] for c in children[r.run_id]), default=0.0)
    return length


def run_sweep(train: dict, runs: list[RunSpec], root: Path, workers: int = 1,
              only: Optional[str] = None, emit: Callable[[str], None] = print) -> list[str]:
    """Run every run of the plan that is not done (or just ``only``); returns the ids run."""
    root = Path(root).resolve()
    by_id = {r.run_id: r for r in runs}
    if only is not None and only not in by_id:  # checked before anything is created
        raise SweepError(f"sweep error: --run {only!r} is not in the plan; accepted one of " + ", ".join(by_id))
    check_output_dir(root, "sweep error: --out", SweepError)
    root.mkdir(parents=True, exist_ok=True)
    if only is not None:
        missing = [d for d in by_id[only].depends_on if not is_done(root, by_id[d])]
        if missing:
            raise SweepError(f"sweep error: run {only!r} waits for {', '.join(missing)}")
        execute(train, str(root), by_id[only], emit)
        return [only]
    todo = [r for r in runs if not is_done(root, r)]
    skipped = len(runs) - len(todo)
    emit(f"sweep: {len(runs)} runs planned, {skipped} already done, {len(todo)} to run")
    done_ids = {r.run_id for r in runs} - {r.run_id for r in todo}
    ran: list[str] = []
    t0 = time.perf_counter()
    work = {r.run_id: r.flops for r in todo}  # the ETA weighs runs by their training FLOPs

    def progress(run_id: str) -> None:
        ran.append(run_id)
        elapsed = time.perf_counter() - t0
        done = sum(w for i, w in work.items() if i in ran)
        eta = eta_seconds(elapsed, done, sum(w for i, w in work.items() if i not in ran))
        left = "?" if eta is None else f"{eta:.0f}"
        emit(f"sweep: [{len(ran)}/{len(todo)}] {run_id} done ({elapsed:.0f}s elapsed, ~{left}s left)")

    if workers <= 1:
        for run in todo:
            emit(f"sweep: [{len(ran) + 1}/{len(todo)}] {run.run_id}")
            execute(train, str(root), run,
                    emit=lambda s, rid=run.run_id: emit(f"  {rid}: {s}") if s.startswith(("step", "eval")) else None)
            done_ids.add(run.run_id)
            progress(run.run_id)
        return ran
    chain = critical_path(todo)
    pending = sorted(todo, key=lambda r: -chain[r.run_id])  # stable: plan order among equals
    threads = worker_threads(workers)
    emit(f"sweep: {workers} worker processes, {threads} thread(s) each")
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        futures = {}
        while pending or futures:
            ready = [r for r in pending if all(d in done_ids for d in r.depends_on)]
            for run in ready[: max(0, workers - len(futures))]:
                pending.remove(run)
                futures[pool.submit(_quiet_execute, train, str(root), run, str(root / "logs"), threads)] = run
            if not futures:
                raise SweepError("sweep error: runs wait on dependencies that cannot finish: "
                                   + ", ".join(r.run_id for r in pending))
            finished, _ = wait(futures, return_when=FIRST_COMPLETED)
            for future in finished:
                run = futures.pop(future)
                future.result()  # a failed run stops the sweep (its log names the error)
                done_ids.add(run.run_id)
                progress(run.run_id)
    return ran


def run_planned(exp: Experiment, root: Path, dp: int = 1, only: Optional[str] = None,
                workers: int = 1) -> list[str]:
    """Plan ``exp`` for ``dp`` data-parallel ranks and run it (or just run ``only``, which may be
    a multi-rank training run under a launcher: its DP must be the plan's)."""
    runs = plan_experiment(exp, dp=dp)
    kind = next((r.kind for r in runs if r.run_id == only), None)
    if kind == "train":
        from megareuse.parallel.launch import discover
        world, tp = discover().world_size, exp.train.get("parallel", {}).get("tp", 1)
        if world // tp != dp:
            raise SweepError(f"sweep error: --dp = {dp} but this job has {world} ranks at TP={tp} "
                             f"(DP={world // tp}); accepted --dp {world // tp}, or the plan's token "
                             "budgets would not match the run's steps")
    return run_sweep(exp.train, runs, root, workers=workers, only=only)
