"""Write a planned sweep as SLURM job arrays instead of running it (`megareuse sweep --slurm DIR`).

The plan (``grid.plan_experiment``) is a dependency graph: stage-2 trunks start from base
checkpoints, branches from their trunk, grown models from a base. ``write_slurm`` cuts it into
*waves* (a run's wave is one more than the latest wave of the runs it depends on) and writes, into
the script directory:

    wave<W>_<kind>.runs   one line per run, "RUN_ID<TAB>KIND"; array task i runs line i
    overrides.txt         the sweep's extra overrides, one per line (only when there are any)
    submit.sh             `bash submit.sh` submits one sbatch job array of
                          scripts/slurm/sweep_array.sh per (wave, kind), captures each job id with
                          `sbatch --parsable`, and makes every array wait (``afterok``) for exactly
                          the array tasks its runs depend on; DRY_RUN=1 prints the sbatch commands
                          with placeholder ids (DRYRUN1, DRYRUN2, ...)
    logs/                 one log per array task (%x-%A_%a.out), created by submit.sh

Resources per array task: a train run gets ``nodes`` x ``gpus_per_node`` GPUs under torchrun,
one rank per GPU, and by default whole nodes (``--exclusive --mem=0``: every CPU and all memory);
with ``exclusive=False`` (``sweep --share-nodes``) only its GPUs, so SLURM packs several runs of
few GPUs onto one node, their CPUs and memory being the cluster's defaults or what SBATCH_ARGS
asks (e.g. ``--mem-per-gpu=64G --cpus-per-gpu=8``). A growth run (``kind grow``) is one process
on one node with one GPU, 8 CPUs and 128G (``GROW_SBATCH_ARGS``), and so are the steps of a base
series of checkpoints that exist (megareuse/sweep/bases.py): ``kind import`` (a Hugging Face
checkpoint converted, or a megareuse one linked, where a trained base's final checkpoint would be;
every stage-2 array task that starts from it waits for it) and ``kind evaluate`` (its base run
record at D2 = 0). ``write_slurm`` checks every checkpoint still to import before it writes
anything (``bases.check_sources``: there, and of the training config's model). Two array tasks never share a
GPU: SLURM allocates GPUs whole (unless the cluster configures MPS or shards); to put several
small runs on one GPU, run a local sweep inside one allocation (``megareuse sweep --workers N
--runs-per-gpu K``, which takes its devices from the CUDA_VISIBLE_DEVICES SLURM sets).

Each task runs ``megareuse sweep --config EXP --out ROOT --dp DP --run RUN_ID`` (through the
``task`` helper below), which is idempotent: a finished run returns quickly, an interrupted one
resumes from its latest checkpoint, a grown or imported checkpoint that exists is kept.
Re-running ``write_slurm`` (by default) leaves out runs that are already done, so a partly
finished sweep can be re-submitted. DP is the jobs' data-parallel size, nodes x
gpus_per_node / parallel.tp: branch steps and pinned checkpoints depend on it, so every
``--run`` plans with it.

Two helpers for the job scripts: ``python -m megareuse.sweep.slurm task --config EXP --out ROOT
--dp DP --run-id RUN_ID [overrides]`` is ``megareuse sweep ... --run RUN_ID`` with a flag torchrun
does not take for an abbreviation of its own ``--run-path`` (torchrun's parser rejects ``--run``
anywhere on its command line as ambiguous); ``grown-overrides --config C --width K --depth G
[overrides]`` prints the model overrides of a grown config (used by scripts/slurm/grow_1b.sh).
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

from megareuse.atomic import write_text_atomic
from megareuse.paths import check_output_dir
from megareuse.sweep.grid import RunSpec
from megareuse.sweep.local import SweepError

REPO = Path(__file__).resolve().parents[2]
ARRAY_SCRIPT = "scripts/slurm/sweep_array.sh"
KINDS = ("train", "grow", "import", "evaluate")
# growth is one CPU process that holds the base and the grown weights in memory (so is an import;
# an evaluation is one process on one GPU)
GROW_SBATCH_ARGS = ("--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=1", "--cpus-per-task=8",
                    "--mem=128G", "--time=02:00:00")

_SUBMIT_FUNCTIONS = r"""
DRY_RUN="${DRY_RUN:-0}"
read -r -a sbatch_cmd <<<"${SBATCH:-sbatch}"
read -r -a sbatch_args <<<"${SBATCH_ARGS:-}"
n_dry=0

# Quote one word for the shell: as it is when safe, else in single quotes.
quote() {
    if [[ $1 =~ ^[A-Za-z0-9_./:=%,@+-]+$ ]]; then
        printf '%s' "$1"
    else
        printf "'%s'" "${1//\'/\'\\\'\'}"
    fi
}

# run CMD...: DRY_RUN=1 prints it ("+ " and the quoted words), otherwise runs it.
run() {
    local word line="+"
    if [[ $DRY_RUN == 1 ]]; then
        for word in "$@"; do line+=" $(quote "$word")"; done
        printf '%s\n' "$line"
    else
        "$@"
    fi
}

# submit VAR SBATCH-ARGUMENTS...: submit one array and store its job id in VAR (DRY_RUN=1:
# print the command and store a placeholder id, DRYRUN1, DRYRUN2, ...).
submit() {
    local var=$1 id
    shift
    if [[ $DRY_RUN == 1 ]]; then
        n_dry=$((n_dry + 1))
        id="DRYRUN$n_dry"
        run "${sbatch_cmd[@]}" --parsable ${sbatch_args[@]+"${sbatch_args[@]}"} "$@"
        printf '# %s = %s\n' "$var" "$id"
    else
        id="$("${sbatch_cmd[@]}" --parsable ${sbatch_args[@]+"${sbatch_args[@]}"} "$@")"
        id="${id%%;*}"
        echo "submitted $var: job $id"
    fi
    printf -v "$var" '%s' "$id"
}

"""


@dataclass
class ArrayJob:
    """One sbatch job array: the runs of one kind in one wave."""
    wave: int
    kind: str  # train | grow | import | evaluate
    runs: list[RunSpec]

    @property
    def var(self) -> str:  # the shell variable holding its job id in submit.sh
        return f"W{self.wave}_{self.kind.upper()}"

    @property
    def runs_file(self) -> str:
        return f"wave{self.wave}_{self.kind}.runs"


def waves(runs: Sequence[RunSpec], done: Iterable[str] = ()) -> list[list[RunSpec]]:
    """Group the runs not in ``done`` into waves: every dependency of a run in wave w is done or
    in a wave before w. Raises SweepError for an unknown dependency or a cycle."""
    done = set(done)
    by_id = {r.run_id: r for r in runs}
    level: dict[str, int] = {}

    def wave_of(run_id: str, stack: tuple[str, ...]) -> int:
        if run_id in level:
            return level[run_id]
        if run_id in stack:
            raise SweepError(f"sweep error: runs depend on each other in a cycle: {' -> '.join(stack + (run_id,))}")
        run = by_id[run_id]
        deps = [d for d in run.depends_on if d not in done]
        for d in deps:
            if d not in by_id:
                raise SweepError(f"sweep error: run {run_id!r} depends on {d!r}, which is not in the plan")
        level[run_id] = 1 + max((wave_of(d, stack + (run_id,)) for d in deps), default=-1)
        return level[run_id]

    todo = [r for r in runs if r.run_id not in done]
    for run in todo:
        wave_of(run.run_id, ())
    out: list[list[RunSpec]] = [[] for _ in range(1 + max(level.values(), default=-1))]
    for run in todo:
        out[level[run.run_id]].append(run)
    return out


def array_jobs(runs: Sequence[RunSpec], done: Iterable[str] = ()) -> list[ArrayJob]:
    """One array per (wave, kind), in submission order (plan order inside an array)."""
    jobs = []
    for w, members in enumerate(waves(runs, done)):
        for kind in KINDS:
            chosen = [r for r in members if r.kind == kind]
            if chosen:
                jobs.append(ArrayJob(w, kind, chosen))
    unknown = {r.kind for r in runs} - set(KINDS)
    if unknown:
        raise SweepError(f"sweep error: run kinds {sorted(unknown)}: accepted {', '.join(KINDS)}")
    return jobs


def dependency(job: ArrayJob, where: dict[str, tuple[ArrayJob, int]]) -> str:
    """The ``--dependency`` value of one array: afterok on each array task its runs need
    (``${VAR}_INDEX``, expanded by submit.sh); empty when nothing is pending."""
    tasks = []
    for run in job.runs:
        for dep in run.depends_on:
            if dep in where:
                parent, index = where[dep]
                task = f"${{{parent.var}}}_{index}"
                if task not in tasks:
                    tasks.append(task)
    return "afterok:" + ":".join(tasks) if tasks else ""


def runtime_dp(experiment_path: Path, extra_overrides: Sequence[str], nodes: int, gpus_per_node: int) -> int:
    """The data-parallel size of the jobs (nodes x gpus_per_node / parallel.tp); checks that every
    budget of the experiment is a whole number of steps at that size."""
    from megareuse.config import ConfigError
    from megareuse.sweep.grid import load_experiment, plan_experiment

    exp = load_experiment(experiment_path, list(extra_overrides))
    tp = int(exp.train.get("parallel", {}).get("tp", 1))
    world = nodes * gpus_per_node
    if world % tp:
        raise ConfigError(f"config error: parallel.tp = {tp}: accepted a divisor of the job's "
                          f"{world} GPUs (nodes x gpus_per_node)")
    plan_experiment(exp, dp=world // tp)  # ConfigError when a budget is not a multiple of a step
    return world // tp


def _check_export(name: str, value: str) -> str:
    if "," in value or "\n" in value:
        raise SweepError(f"sweep error: {name} = {value!r}: accepted a path without commas "
                         "(sbatch --export splits on them)")
    return value


# sbatch --time: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS
_TIME = re.compile(r"\d+(:\d{1,2}){0,2}|\d+-\d{1,2}(:\d{1,2}){0,2}")
_SLURM_NAME = re.compile(r"[A-Za-z0-9_.+-]+(,[A-Za-z0-9_.+-]+)*")  # a name, or a comma list of names
TIME_FORMATS = "minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS (e.g. 24:00:00, 2-00:00:00)"


def check_sbatch_options(time: str, partition: Optional[str], account: Optional[str]) -> None:
    """sbatch's --time format, and partition / account names without whitespace or shell
    metacharacters, checked before anything is written."""
    if not isinstance(time, str) or not _TIME.fullmatch(time):
        raise SweepError(f"sweep error: --time = {time!r}: accepted {TIME_FORMATS}")
    for field, value in (("--partition", partition), ("--account", account)):
        if value is not None and not _SLURM_NAME.fullmatch(value):
            raise SweepError(f"sweep error: {field} = {value!r}: accepted a non-empty name of letters, digits, "
                             "'_', '.', '+', '-' (or a comma list of them), without whitespace or shell "
                             "metacharacters")


def train_resources(nodes: int, gpus_per_node: int, time: str, exclusive: bool = True) -> list[str]:
    """The sbatch resources of one train task: one torchrun agent per node, ``gpus_per_node`` GPUs
    (ranks) on each. Exclusive (the default) also takes every CPU and all memory of the nodes, right
    for runs that fill them; a shared task asks only for its GPUs, so SLURM may place other tasks of
    the sweep beside it (CPUs and memory: the cluster's defaults, or SBATCH_ARGS)."""
    resources = [f"--nodes={nodes}", "--ntasks-per-node=1", f"--gpus-per-node={gpus_per_node}"]
    return resources + (["--exclusive", "--mem=0"] if exclusive else []) + [f"--time={time}"]


def _q(words: Sequence[str]) -> str:
    return " ".join(shlex.quote(w) for w in words)


def write_slurm(runs: list[RunSpec], experiment_path: Path, out_root: Path, script_dir: Path, *,
                nodes: int = 1, gpus_per_node: int = 8, time: str = "24:00:00",
                partition: Optional[str] = None, account: Optional[str] = None,
                extra_overrides: Sequence[str] = (), dp: Optional[int] = None,
                max_parallel: Optional[int] = None, skip_done: bool = True,
                grow_sbatch_args: Sequence[str] = GROW_SBATCH_ARGS, exclusive: bool = True) -> Path:
    """Write the runs lists and submit.sh into ``script_dir``; returns the path of submit.sh.

    ``dp`` (the DP size the runs were planned with) must equal the jobs' DP when given.
    ``max_parallel`` throttles each array (``--array=0-N%K``). ``skip_done`` leaves out runs whose
    results already exist under ``out_root`` (and drops dependencies on them). ``exclusive``:
    train tasks take whole nodes; False lets runs of few GPUs share a node (``train_resources``)."""
    if nodes < 1 or gpus_per_node < 1:
        raise SweepError(f"sweep error: nodes = {nodes}, gpus_per_node = {gpus_per_node}: accepted >= 1")
    if not isinstance(exclusive, bool):
        raise SweepError(f"sweep error: exclusive = {exclusive!r}: accepted True or False")
    check_sbatch_options(time, partition, account)
    experiment_path, out_root = Path(experiment_path).resolve(), Path(out_root).resolve()
    script_dir = Path(script_dir).resolve()
    check_output_dir(out_root, "sweep error: --out", SweepError)
    check_output_dir(script_dir, "sweep error: --slurm", SweepError)
    job_dp = runtime_dp(experiment_path, extra_overrides, nodes, gpus_per_node)
    if dp is not None and dp != job_dp:
        raise SweepError(f"sweep error: the runs were planned for DP = {dp} but the jobs run DP = "
                         f"{job_dp} (nodes x gpus_per_node / parallel.tp): plan with --dp {job_dp}")
    from megareuse.sweep.bases import check_sources
    from megareuse.sweep.grid import load_experiment
    check_sources(load_experiment(experiment_path, list(extra_overrides)).train, runs, out_root)
    done: set[str] = set()
    if skip_done:
        from megareuse.sweep.local import is_done
        done = {r.run_id for r in runs if is_done(out_root, r)}
    jobs = array_jobs(runs, done)

    script_dir.mkdir(parents=True, exist_ok=True)
    for stale in script_dir.glob("wave*_*.runs"):
        stale.unlink()
    env = {"REPO": str(REPO), "EXP": str(experiment_path), "ROOT": str(out_root), "DP": str(job_dp),
           "GPUS_PER_NODE": str(gpus_per_node)}
    overrides_file = script_dir / "overrides.txt"
    if extra_overrides:
        write_text_atomic(overrides_file, "".join(f"{o}\n" for o in extra_overrides))
        env["OVERRIDES_FILE"] = str(overrides_file)
    elif overrides_file.exists():
        overrides_file.unlink()
    for name, value in env.items():
        _check_export(name, value)
    common = [f"--output={_check_export('script_dir', str(script_dir))}/logs/%x-%A_%a.out"]
    common += [f"--partition={partition}"] if partition else []
    common += [f"--account={account}"] if account else []

    name = experiment_path.stem
    where: dict[str, tuple[ArrayJob, int]] = {}
    body = []
    for job in jobs:
        runs_file = script_dir / job.runs_file
        write_text_atomic(runs_file, "".join(f"{r.run_id}\t{r.kind}\n" for r in job.runs))
        where.update({r.run_id: (job, i) for i, r in enumerate(job.runs)})
        size = f"0-{len(job.runs) - 1}" + (f"%{max_parallel}" if max_parallel else "")
        if job.kind == "train":
            resources = train_resources(nodes, gpus_per_node, time, exclusive)
        else:
            resources = list(grow_sbatch_args)
        export = ",".join(["ALL", *(f"{k}={v}" for k, v in env.items()), f"RUNS_FILE={runs_file}"])
        if job.kind != "train":
            export += ",LAUNCHER=python"
        args = [f"--job-name={name}-w{job.wave}-{job.kind}", f"--array={size}", *resources, *common,
                f"--export={export}"]
        dep = dependency(job, where)
        tokens = sum(r.tokens for r in job.runs)
        body.append(f"# wave {job.wave}, {job.kind}: {len(job.runs)} runs, {tokens:,} tokens "
                    f"({job.runs_file})")
        dep_arg = f' "--dependency={dep}" --kill-on-invalid-dep=yes' if dep else ""
        body.append(f"submit {job.var} {_q(args)}{dep_arg} {shlex.quote(str(REPO / ARRAY_SCRIPT))}")

    skipped = f", {len(done)} already done and left out" if done else ""
    total = sum(len(j.runs) for j in jobs)
    header = f"""#!/usr/bin/env bash
# Submit the sweep {name!r} to SLURM: {total} runs in {len(jobs)} job arrays over \
{len({j.wave for j in jobs})} waves{skipped}.
# Written by megareuse.sweep.slurm.write_slurm from {experiment_path}; regenerate with
#   megareuse sweep --config {experiment_path} --out {out_root} --dp {job_dp} --slurm {script_dir} \\
#       --nodes {nodes} --gpus-per-node {gpus_per_node}{"" if exclusive else " --share-nodes"}
# (regenerating leaves out the runs that are done, so a partly finished sweep can be re-submitted).
#
# Array task i of wave<W>_<kind>.runs runs line i:
#   megareuse sweep --config EXP --out ROOT --dp {job_dp} --run RUN_ID
# through scripts/slurm/sweep_array.sh: train runs under torchrun on {nodes} node(s) x {gpus_per_node} GPUs
# (requeued before the time limit, resumed with --resume auto); grow, import and evaluate
# as one process. Each task asks
#   train: {" ".join(train_resources(nodes, gpus_per_node, time, exclusive))}
#   grow, import, evaluate:  {" ".join(grow_sbatch_args)}
# A finished run returns quickly and an interrupted one resumes, so submitting twice is harmless.
# Each array waits (afterok) for exactly the array tasks its runs depend on; a failed dependency
# cancels it.
#
# Variables (environment; [default]):
#   DRY_RUN      1: print the sbatch commands with placeholder job ids (DRYRUN1, DRYRUN2, ...)
#   SBATCH       the sbatch command [sbatch]
#   SBATCH_ARGS  extra sbatch arguments for every array, e.g. "--qos=high" [none]
#   The launch and network variables of scripts/slurm/common.sh (LAUNCHER, PYTHON, NCCL_*, ...)
#   reach the jobs through --export=ALL.
set -euo pipefail
""" + _SUBMIT_FUNCTIONS + f"""# shellcheck disable=SC2034  # the job ids, set by submit (printf -v)
{" ".join(f"{j.var}=''" for j in jobs) or ":"}

run mkdir -p {shlex.quote(str(script_dir / "logs"))}
"""
    footer = "" if jobs else 'echo "nothing to submit: every run of the sweep is done"\n'
    submit = script_dir / "submit.sh"
    write_text_atomic(submit, header + "\n" + "\n".join(body) + ("\n" if body else "") + footer)
    submit.chmod(0o755)
    return submit


def grown_overrides(config: str | Path, growth: dict, overrides: Sequence[str] = ()) -> list[str]:
    """``model.FIELD=VALUE`` overrides turning the config's model into the grown one (as the
    planner adds them to stage-2 runs after growth)."""
    from megareuse.config import Config, apply_overrides, read_yaml
    from megareuse.sweep.grid import grown_model

    model = dataclasses.asdict(Config.from_dict(apply_overrides(read_yaml(config), list(overrides))).model)
    grown = grown_model(model, growth)

    def fmt(v: object) -> str:
        return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)

    return [f"model.{k}={fmt(v)}" for k, v in grown.items() if model.get(k) != v]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megareuse.sweep.slurm")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("grown-overrides", help="print the model overrides of a grown config, one a line")
    p.add_argument("--config", required=True)
    p.add_argument("--width", type=int, default=1)
    p.add_argument("--depth", type=int, default=1)
    p.add_argument("--layer-map", default=None)
    p.add_argument("overrides", nargs="*")
    p = sub.add_parser("task", help="megareuse sweep --run RUN_ID, spelt so torchrun leaves it alone")
    p.add_argument("--config", required=True, help="experiment file")
    p.add_argument("--out", required=True, help="the sweep's output root")
    p.add_argument("--dp", type=int, default=1, help="data-parallel size the plan is made for")
    p.add_argument("--run-id", required=True, help="the run of the plan to execute")
    p.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    from megareuse.exits import guarded
    if args.command == "task":
        from megareuse.sweep.grid import load_experiment
        from megareuse.sweep.local import run_planned

        def task() -> int:
            run_planned(load_experiment(args.config, args.overrides), Path(args.out), dp=args.dp,
                        only=args.run_id)
            return 0
        return guarded("sweep", task)

    def overrides() -> int:
        growth = {"width": args.width, "depth": args.depth}
        if args.layer_map:
            growth["layer_map"] = [int(x) for x in args.layer_map.split(",")]
        print("\n".join(grown_overrides(args.config, growth, args.overrides)))
        return 0
    return guarded("grown-overrides", overrides, value_errors=True)  # growth checks raise ValueError


if __name__ == "__main__":
    sys.exit(main())
