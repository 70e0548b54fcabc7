#!/usr/bin/env bash
#SBATCH --job-name=sweep
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%A_%a.out
#
# One task of a sweep's job array: runs one run of the plan of an experiment file.
# Written for the submit.sh that `megareuse sweep --config EXP --out ROOT --slurm DIR` writes
# (megareuse/sweep/slurm.py), which passes the variables below with --export; by hand:
#
#   sbatch --array=0-3 --export=ALL,EXP=$PWD/configs/experiments/cpt_1b.yaml,ROOT=$PWD/runs/cpt_1b,RUNS_FILE=$PWD/slurm/cpt_1b/wave0_train.runs,DP=8 \
#       scripts/slurm/sweep_array.sh
#   DRY_RUN=1 SLURM_ARRAY_TASK_ID=2 EXP=... ROOT=... RUNS_FILE=... bash scripts/slurm/sweep_array.sh
#
# Task i reads line i (0-based) of RUNS_FILE, "RUN_ID<TAB>KIND", and runs
#   megareuse sweep --config EXP --out ROOT --dp DP --run RUN_ID [overrides]
# as `$PYTHON -m megareuse.sweep.slurm task ... --run-id RUN_ID` (the same, spelt for torchrun),
# train runs under the launcher on every GPU of the job (the Trainer inside becomes multi-rank),
# grow, import and evaluate runs (KIND other than train) as one process on the first node. `--run` is idempotent: a finished run returns
# quickly, an interrupted one resumes from its latest checkpoint (requeue as in base_1b.sh).
#
# Variables (environment; [default]):
#   EXP            experiment file (required)
#   ROOT           the sweep's output root (required)
#   RUNS_FILE      runs list of this array (required)
#   TASK_ID        line to run [SLURM_ARRAY_TASK_ID]
#   DP             data-parallel size the plan is made for (sweep --dp); must equal the job's
#                  world / parallel.tp [NNODES x GPUS_PER_NODE, right for parallel.tp=1]
#   OVERRIDES_FILE file of extra overrides for every run, one per line [none]
#   OVERRIDES      further whitespace-separated overrides [none]; script arguments are appended
#   DRY_RUN        1: print the exact commands instead of running them
# Launch and network variables: as in base_1b.sh (LAUNCHER [torchrun; grow, import, evaluate: python], PYTHON,
#   NNODES, GPUS_PER_NODE, MASTER_ADDR, MASTER_PORT, RDZV_BACKEND, FANOUT, NCCL_*, ...; see common.sh).
set -euo pipefail

MR_ARGS=("$@")
EXP="${EXP:-}"
ROOT="${ROOT:-}"
RUNS_FILE="${RUNS_FILE:-}"
TASK_ID="${TASK_ID:-${SLURM_ARRAY_TASK_ID:-}}"
OVERRIDES_FILE="${OVERRIDES_FILE:-}"

mr_here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
[[ -f $mr_here/common.sh ]] || mr_here="${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}/scripts/slurm"  # sbatch runs a copy
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$mr_here/common.sh"

for name in EXP ROOT RUNS_FILE TASK_ID; do
    [[ -n ${!name} ]] || { MR_SCRIPT=sweep_array.sh mr_die "$name is not set (see the variables at the top of this script)"; }
done
[[ -f $RUNS_FILE ]] || { MR_SCRIPT=sweep_array.sh mr_die "RUNS_FILE=$RUNS_FILE does not exist"; }
mapfile -t lines <"$RUNS_FILE"
if ! mr_is_int "$TASK_ID" || ((TASK_ID >= ${#lines[@]})); then
    MR_SCRIPT=sweep_array.sh mr_die "TASK_ID=$TASK_ID: accepted 0..$((${#lines[@]} - 1)) (lines of $RUNS_FILE)"
fi
RUN_ID="${lines[TASK_ID]%%$'\t'*}"
KIND=train
if [[ ${lines[TASK_ID]} == *$'\t'* ]]; then KIND="${lines[TASK_ID]#*$'\t'}"; fi
# growth, an import and an evaluation are one process: no launcher, and only on the first node
if [[ $KIND != train ]]; then LAUNCHER=python; fi

mr_setup sweep_array.sh
DP="${DP:-$((NNODES * GPUS_PER_NODE))}"

overrides=()
if [[ -n $OVERRIDES_FILE ]]; then
    [[ -f $OVERRIDES_FILE ]] || mr_die "OVERRIDES_FILE=$OVERRIDES_FILE does not exist"
    mapfile -t overrides <"$OVERRIDES_FILE"
fi
mr_overrides "$@"
# = megareuse sweep ... --run RUN_ID: torchrun would reject "--run" as an ambiguous abbreviation
# of its own --run-path, so the task helper takes it as --run-id
args=(-m megareuse.sweep.slurm task --config "$EXP" --out "$ROOT" --dp "$DP" --run-id "$RUN_ID"
    ${overrides[@]+"${overrides[@]}"} ${MR_OVERRIDES[@]+"${MR_OVERRIDES[@]}"})

if mr_dry; then printf '# task %s of %s: run %s (%s)\n' "$TASK_ID" "$RUNS_FILE" "$RUN_ID" "$KIND"; fi
if [[ $KIND != train && $NODE_RANK != 0 ]]; then
    mr_log "$KIND runs on the first node only; node $NODE_RANK has nothing to do"
    exit 0
fi
# a train run's directory holds its preemption marker; the other kinds write none (an import's
# directory may be a link to a checkpoint that is an input: nothing is written or removed there)
run_dir=""
if [[ $KIND == train ]]; then run_dir="$ROOT/$RUN_ID"; fi
mr_launch "$run_dir" "${args[@]}"
