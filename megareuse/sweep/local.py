"""Run a planned sweep locally: skip what is done, resume what was interrupted, run the rest.

A run is done when its ``summary.json`` says finished (train runs), its grown or imported
checkpoint verifies (grow, import), or its ``record.json`` exists (evaluate: a checkpoint base's
record at D2 = 0, megareuse/sweep/bases.py). Before a whole sweep starts, every checkpoint still
to import is checked (``bases.check_sources``), so a bad path or another model stops it at once. An interrupted
run resumes from its own latest checkpoint; a branch that never started starts from its trunk's
checkpoint. Runs execute in dependency order, one at a time in this process, or ``workers`` at a
time in worker processes (a run starts when its dependencies are done).

On a GPU node (CUDA visible and ``run.device`` cuda or auto) every worker process owns a *slot*:
``gpus_per_run`` devices of its own for life, given to it through CUDA_VISIBLE_DEVICES before
torch starts CUDA in it (without this every run of every worker trained on cuda:0). The devices
are the parent's own CUDA_VISIBLE_DEVICES (what SLURM allocated) or all of them; ``runs_per_gpu``
workers may share a device when the runs are small. A run of one GPU trains in the worker
process; a run of several GPUs is a multi-rank run, launched by the worker under torchrun with
one rank per GPU of its slot (``python -m megareuse.sweep.rank SPEC`` is each rank's entry). On
CPU there are no slots and the workers share out the cores (``worker_threads``).
"""
from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Callable, Optional, Sequence

from megareuse.errors import UserError
from megareuse.paths import check_output_dir
from megareuse.sweep.grid import Experiment, RunSpec, plan_experiment
from megareuse.sweep.spec import is_done, run_dir  # noqa: F401 (is_done: part of this module's API)


class SweepError(UserError, RuntimeError):
    """A sweep cannot proceed (unknown run, unmet dependency): one line."""


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
    if run.kind in ("import", "evaluate"):  # a checkpoint base (bases.py)
        from megareuse.sweep import bases
        if run.kind == "import":
            return bases.import_checkpoint(train, root_path, run)
        return bases.evaluate_base(train, root_path, run, emit)
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


# The variables by which a process learns its rank from a launcher: a worker's run is a job of
# its own, so it must not read the parent's (inside a SLURM batch step every worker would derive
# the same MASTER_PORT from SLURM_JOB_ID and their process groups would collide).
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "SLURM_PROCID", "OMPI_COMM_WORLD_RANK")


def run_device(train: dict) -> str:
    """The ``run.device`` the sweep's runs train on (the config's default is cpu)."""
    return str(train.get("run", {}).get("device", "cpu"))


def visible_devices() -> list[str]:
    """The CUDA devices this process may give to its workers, as CUDA_VISIBLE_DEVICES names them:
    the parent's own CUDA_VISIBLE_DEVICES when set (SLURM sets it to the job's GPUs; entries may
    be indices or UUIDs), else 0..count-1; none without CUDA. Only the first ``device_count()``
    entries count: CUDA ignores a list from its first invalid entry on."""
    import torch

    if not torch.cuda.is_available():
        return []
    count = torch.cuda.device_count()
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return [str(i) for i in range(count)]
    return [d.strip() for d in listed.split(",") if d.strip()][:count]


def sweep_devices(train: dict) -> list[str]:
    """The devices a sweep of ``train`` can use: the visible ones, unless its runs train on CPU
    (a GPU node running a run.device=cpu sweep, e.g. the demo, keeps the CPU behaviour)."""
    return [] if run_device(train) == "cpu" else visible_devices()


def assign_devices(devices: Sequence[str], workers: int, gpus_per_run: int,
                   runs_per_gpu: int = 1) -> list[tuple[str, ...]]:
    """The devices of each worker slot (index = slot): ``devices`` cut into groups of
    ``gpus_per_run``, slot s on group s mod groups, so workers spread over every GPU before any
    GPU takes a second run. ``gpus_per_run`` 0 is a CPU sweep: no slots. Up to ``runs_per_gpu``
    workers share a group; more workers than groups x runs_per_gpu is refused (one line naming
    the flag and the maximum)."""
    for flag, value, least in (("--workers", workers, 1), ("--gpus-per-run", gpus_per_run, 0),
                               ("--runs-per-gpu", runs_per_gpu, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise SweepError(f"sweep error: {flag} = {value!r}: accepted an integer >= {least}")
    if gpus_per_run == 0:
        if runs_per_gpu != 1:
            raise SweepError(f"sweep error: --runs-per-gpu = {runs_per_gpu} but the runs use no GPU "
                             "(--gpus-per-run 0); accepted --runs-per-gpu 1, or --gpus-per-run >= 1")
        return []
    if not devices:
        raise SweepError(f"sweep error: --gpus-per-run = {gpus_per_run} but no CUDA device is visible; "
                         "accepted --gpus-per-run 0 (the runs train on CPU)")
    if gpus_per_run > len(devices):
        raise SweepError(f"sweep error: --gpus-per-run = {gpus_per_run}: accepted 0..{len(devices)} "
                         f"(the visible CUDA devices: {','.join(devices)})")
    groups = [tuple(devices[i:i + gpus_per_run])
              for i in range(0, len(devices) - gpus_per_run + 1, gpus_per_run)]
    most = len(groups) * runs_per_gpu
    if workers > most:
        raise SweepError(f"sweep error: --workers = {workers}: accepted at most {most} ({len(devices)} "
                         f"visible GPUs // --gpus-per-run {gpus_per_run} x --runs-per-gpu {runs_per_gpu}); "
                         "raise --runs-per-gpu to share a GPU between small runs")
    return [groups[slot % len(groups)] for slot in range(workers)]


def device_slots(train: dict, workers: int, gpus_per_run: Optional[int] = None,
                 runs_per_gpu: int = 1) -> list[tuple[str, ...]]:
    """The worker slots of a local sweep of ``train``. ``gpus_per_run`` None is the default: 1
    when the runs can use a GPU (``sweep_devices``), else 0. Asking for GPUs for runs that train
    on CPU is refused (the GPUs would sit idle), and so is 0 for runs that train on the visible
    GPUs (every worker would put its run on cuda:0)."""
    devices = sweep_devices(train)
    if gpus_per_run is None:
        gpus_per_run = 1 if devices else 0
    elif gpus_per_run > 0 and run_device(train) == "cpu":
        raise SweepError(f"sweep error: --gpus-per-run = {gpus_per_run} but run.device = 'cpu' (the runs "
                         "would not use the GPUs); accepted --gpus-per-run 0, or run.device=cuda or auto")
    elif gpus_per_run == 0 and devices:
        raise SweepError(f"sweep error: --gpus-per-run = 0 but the runs train on GPUs (run.device = "
                         f"{run_device(train)!r}, {len(devices)} visible); accepted --gpus-per-run >= 1, "
                         "or run.device=cpu")
    return assign_devices(devices, workers, gpus_per_run, runs_per_gpu)


# this worker process's slot (index, devices), taken once by _take_slot; None on CPU
_SLOT: Optional[tuple[int, tuple[str, ...]]] = None


def _take_slot(slots: "mp.queues.Queue[int]", devices: list[tuple[str, ...]]) -> None:
    """Worker initializer: take a free slot index for the life of this process and pin it to the
    slot's devices. It runs before the worker's first run imports anything that starts CUDA, and
    CUDA reads CUDA_VISIBLE_DEVICES once, when it starts: a later change would be ignored."""
    global _SLOT
    index = slots.get(timeout=60)  # the pool never holds more processes than slots
    _SLOT = (index, devices[index])
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(devices[index])


def torchrun_command(gpus: int, spec: Path) -> list[str]:
    """The command of a multi-GPU run of a local sweep: one rank per GPU of the worker's slot, on a
    rendezvous of its own (``--standalone`` takes a free port, so concurrent runs never meet)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}",
            "--max-restarts=0", "-m", "megareuse.sweep.rank", str(spec)]


def _execute_ranks(train: dict, root: str, run: RunSpec, log: Path, fh) -> str:
    """A run over every GPU of this worker's slot: torchrun starts the ranks (each reads the run
    from a spec file next to its log) with the slot's CUDA_VISIBLE_DEVICES; output to the log."""
    assert _SLOT is not None
    spec = log.with_name(log.name.removesuffix(".log") + ".spec.json")
    spec.write_text(json.dumps({"train": train, "root": root, "run": dataclasses.asdict(run)}))
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    fh.flush()
    code = subprocess.run(torchrun_command(len(_SLOT[1]), spec), stdout=fh, stderr=subprocess.STDOUT,
                          env=env, check=False).returncode
    if code != 0:
        raise SweepError(f"sweep error: run {run.run_id!r} exited with code {code} under torchrun "
                         f"on GPUs {','.join(_SLOT[1])}; its log: {log}")
    return run.run_id


def _quiet_execute(train: dict, root: str, run: RunSpec, log_dir: str, threads: int = 1) -> str:
    """Worker-process entry: one run with ``threads`` intra-op threads (the train config's
    ``run.threads`` is replaced; a series' own override still wins), its output in
    <log_dir>/<run id>.log, which starts with the worker's devices when it has a slot. A
    training run of a slot of several GPUs runs under torchrun (``_execute_ranks``)."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    train = {**train, "run": {**train.get("run", {}), "threads": threads}}
    if not (dist.is_available() and dist.is_initialized()):  # the worker's first run: the
        # launcher variables are the parent's own single-process start-up's, not this process's;
        # a later run in the same worker keeps the ones its first run set with its process group
        for key in LAUNCHER_VARS:
            os.environ.pop(key, None)
    log = Path(log_dir) / (run.run_id.replace("/", "__") + ".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as fh:
        if _SLOT is not None:
            fh.write(f"sweep worker {os.getpid()} slot {_SLOT[0]}: "
                     f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')}\n")
            fh.flush()
        try:
            if _SLOT is not None and len(_SLOT[1]) > 1 and run.kind == "train":
                return _execute_ranks(train, root, run, log, fh)
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
              only: Optional[str] = None, emit: Callable[[str], None] = print,
              gpus_per_run: Optional[int] = None, runs_per_gpu: int = 1) -> list[str]:
    """Run every run of the plan that is not done (or just ``only``, in this process under its
    launcher); returns the ids run. ``gpus_per_run`` / ``runs_per_gpu``: the workers' devices
    (``device_slots``; None: one GPU per run on a GPU node, none on CPU)."""
    root = Path(root).resolve()
    by_id = {r.run_id: r for r in runs}
    if only is not None and only not in by_id:  # checked before anything is created
        raise SweepError(f"sweep error: --run {only!r} is not in the plan; accepted one of " + ", ".join(by_id))
    slots = device_slots(train, workers, gpus_per_run, runs_per_gpu) if only is None else []
    check_output_dir(root, "sweep error: --out", SweepError)
    if only is None:  # checkpoints still to import: there, and of the config's model
        from megareuse.sweep.bases import check_sources
        check_sources(train, runs, root)
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

    if workers <= 1 and all(len(devices) <= 1 for devices in slots):  # in this process; its one
        # GPU is the first visible one, slot 0's
        for run in todo:
            emit(f"sweep: [{len(ran) + 1}/{len(todo)}] {run.run_id}")
            execute(train, str(root), run,
                    emit=lambda s, rid=run.run_id: emit(f"  {rid}: {s}") if s.startswith(("step", "eval")) else None)
            done_ids.add(run.run_id)
            progress(run.run_id)
        return ran
    chain = critical_path(todo)
    pending = sorted(todo, key=lambda r: -chain[r.run_id])  # stable: plan order among equals
    ranks = max((len(devices) for devices in slots), default=1)  # processes per run
    threads = worker_threads(workers * ranks)
    emit(f"sweep: {workers} worker process(es), {threads} thread(s) per process"
         + (", CUDA_VISIBLE_DEVICES " + " | ".join(",".join(d) for d in slots) if slots else ""))
    ctx = mp.get_context("spawn")
    if slots:  # each worker process takes one slot index for life
        free = ctx.Queue()
        for index in range(len(slots)):
            free.put(index)
        initializer, initargs = _take_slot, (free, slots)
    else:
        initializer, initargs = None, ()
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=initializer, initargs=initargs) as pool:
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


def local_ranks(gpus_per_run: Optional[int]) -> int:
    """Ranks of each run of a local sweep: one process, or one per GPU when a run has several."""
    return gpus_per_run if gpus_per_run is not None and gpus_per_run > 1 else 1


def local_dp(train: dict, gpus_per_run: Optional[int]) -> int:
    """The data-parallel size of a local sweep's runs: one process each, or ``gpus_per_run``
    ranks under torchrun, over parallel.tp. The plan's DP must be this (branch steps and pinned
    trunk checkpoints are counted in steps of that size)."""
    ranks, tp = local_ranks(gpus_per_run), int(train.get("parallel", {}).get("tp", 1))
    if ranks % tp:
        raise SweepError(f"sweep error: parallel.tp = {tp} but each local run has {ranks} rank(s); "
                         f"accepted --gpus-per-run a multiple of {tp}")
    return ranks // tp


def run_planned(exp: Experiment, root: Path, dp: int = 1, only: Optional[str] = None,
                workers: int = 1, gpus_per_run: Optional[int] = None, runs_per_gpu: int = 1) -> list[str]:
    """Plan ``exp`` for ``dp`` data-parallel ranks and run it (or just run ``only``, which may be
    a multi-rank training run under a launcher: its DP must be the plan's). A whole local sweep
    must be planned for the DP its runs will have (``local_dp``)."""
    if only is None and dp != local_dp(exp.train, gpus_per_run):
        raise SweepError(f"sweep error: --dp = {dp} but each local run has {local_ranks(gpus_per_run)} rank(s) "
                         f"(--gpus-per-run) at TP={exp.train.get('parallel', {}).get('tp', 1)}; accepted "
                         f"--dp {local_dp(exp.train, gpus_per_run)}, or the plan's token budgets would not "
                         "match the runs' steps")
    runs = plan_experiment(exp, dp=dp)
    kind = next((r.kind for r in runs if r.run_id == only), None)
    if kind == "train":
        from megareuse.parallel.launch import discover
        world, tp = discover().world_size, exp.train.get("parallel", {}).get("tp", 1)
        if world // tp != dp:
            raise SweepError(f"sweep error: --dp = {dp} but this job has {world} ranks at TP={tp} "
                             f"(DP={world // tp}); accepted --dp {world // tp}, or the plan's token "
                             "budgets would not match the run's steps")
    return run_sweep(exp.train, runs, root, workers=workers, only=only, gpus_per_run=gpus_per_run,
                     runs_per_gpu=runs_per_gpu)

