#!/usr/bin/env bash
#SBATCH --job-name=grow_1b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
#
# Model growth, then stage-2 training of the grown model:
#   1. `megareuse grow --from BASE_CKPT --out GROWN_DIR --width WIDTH --depth DEPTH
#      --depth-method DEPTH_METHOD` (one process, on the first node; skipped when GROWN_DIR exists,
#      e.g. after a requeue: growth writes its directory atomically)
#   2. `megareuse/train.py --init-from GROWN_DIR` with the grown model's shape as overrides
#      (computed from CONFIG by `python -m megareuse.sweep.slurm grown-overrides`, the same rule
#      as the sweep planner; this read-only step also runs under DRY_RUN)
# Submit from the repository root:
#
#   mkdir -p logs
#   BASE_CKPT=runs/base_1b/checkpoints/step_00065536 DEPTH=2 sbatch scripts/slurm/grow_1b.sh
#   DRY_RUN=1 BASE_CKPT=runs/base_1b/checkpoints/step_00065536 WIDTH=2 DEPTH=1 bash scripts/slurm/grow_1b.sh
#
# Requeue and `--resume auto` as in base_1b.sh.
#
# Variables (environment; [default]):
#   BASE_CKPT     the base checkpoint to grow (required)
#   CONFIG        training config describing BASE_CKPT's model [configs/train/llama_1b.yaml]
#   OUT_DIR       run.out_dir of the stage-2 run [runs/grow_1b]
#   GROWN_DIR     where the grown checkpoint is written [OUT_DIR/grown_init]
#   WIDTH         width factor k (d_model, heads, FFN x k) [1]
#   DEPTH         depth factor g (layers x g) [2]
#   DEPTH_METHOD  stack | identity [stack]
#   LAYER_MAP     explicit source layer per new layer, e.g. 0,1,0,1 (overrides DEPTH) [none]
#   NOISE         symmetry-breaking noise of width growth [0]
#   TRAIN_TOKENS  stage-2 tokens D2, run.train_tokens [2147483648 = 2^31]
#   DOMAINS       stage-2 blend, data.train [{prose: 1.0}]
#   WARMUP_STEPS  re-warmup steps, schedule.warmup_steps [250]
#   GROW_WAIT_S   how long other nodes wait for GROWN_DIR when each node runs this script [3600]
#   OVERRIDES     whitespace-separated section.field=value overrides (also applied to CONFIG
#                 when computing the grown shape) [none]; script arguments are appended
#   DRY_RUN       1: print the exact commands instead of running them
# Launch and network variables: as in base_1b.sh (LAUNCHER, PYTHON, NNODES, GPUS_PER_NODE,
#   MASTER_ADDR, MASTER_PORT, RDZV_BACKEND, FANOUT, NCCL_*, ...; documented in common.sh).
set -euo pipefail

MR_ARGS=("$@")
BASE_CKPT="${BASE_CKPT:-}"
CONFIG="${CONFIG:-configs/train/llama_1b.yaml}"
OUT_DIR="${OUT_DIR:-runs/grow_1b}"
GROWN_DIR="${GROWN_DIR:-$OUT_DIR/grown_init}"
WIDTH="${WIDTH:-1}"
DEPTH="${DEPTH:-2}"
DEPTH_METHOD="${DEPTH_METHOD:-stack}"
LAYER_MAP="${LAYER_MAP:-}"
NOISE="${NOISE:-0}"
TRAIN_TOKENS="${TRAIN_TOKENS:-2147483648}"
DOMAINS="${DOMAINS:-{prose: 1.0\}}"
WARMUP_STEPS="${WARMUP_STEPS:-250}"
GROW_WAIT_S="${GROW_WAIT_S:-3600}"

mr_here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
[[ -f $mr_here/common.sh ]] || mr_here="${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}/scripts/slurm"  # sbatch runs a copy
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$mr_here/common.sh"
mr_setup grow_1b.sh

[[ -n $BASE_CKPT ]] || mr_die "BASE_CKPT is not set: accepted the base checkpoint directory to grow"
mr_overrides "$@"

# 1. growth: once, by the batch step / node 0; other nodes (each running this script) wait for it
grow=("$PYTHON" -m megareuse.cli grow --from "$BASE_CKPT" --out "$GROWN_DIR" --width "$WIDTH"
    --depth "$DEPTH" --depth-method "$DEPTH_METHOD" --noise "$NOISE")
if [[ -n $LAYER_MAP ]]; then grow+=(--layer-map "$LAYER_MAP"); fi
if mr_dry; then
    printf '# grow %s -> %s (skipped when it exists)\n' "$BASE_CKPT" "$GROWN_DIR"
    mr_print "${grow[@]}"
elif [[ $MR_NODE_STEP == 1 ]]; then
    : # a fan-out node step: the batch step grew the checkpoint before starting it
elif [[ -d $GROWN_DIR ]]; then
    mr_log "grown checkpoint $GROWN_DIR exists: not growing again"
elif [[ $NODE_RANK == 0 ]]; then
    [[ -d $BASE_CKPT ]] || mr_die "BASE_CKPT=$BASE_CKPT is not a directory (relative paths start at REPO=$REPO)"
    mkdir -p "$(dirname "$GROWN_DIR")"
    "${grow[@]}"
else
    mr_log "waiting up to ${GROW_WAIT_S}s for node 0 to write $GROWN_DIR"
    for ((waited = 0; waited < GROW_WAIT_S; waited += 5)); do
        [[ -d $GROWN_DIR ]] && break
        sleep 5
    done
    [[ -d $GROWN_DIR ]] || mr_die "$GROWN_DIR did not appear within ${GROW_WAIT_S}s"
fi

# 2. stage-2 training of the grown model (its shape as overrides, after the user's)
shape_cmd=("$PYTHON" -m megareuse.sweep.slurm grown-overrides --config "$CONFIG" --width "$WIDTH" --depth "$DEPTH")
if [[ -n $LAYER_MAP ]]; then shape_cmd+=(--layer-map "$LAYER_MAP"); fi
shape=()
mapfile -t shape < <("${shape_cmd[@]}" ${MR_OVERRIDES[@]+"${MR_OVERRIDES[@]}"})
((${#shape[@]} > 0)) || mr_die "the growth (WIDTH=$WIDTH DEPTH=$DEPTH LAYER_MAP=$LAYER_MAP) changes nothing (or CONFIG=$CONFIG is invalid)"

args=(--config "$CONFIG" --resume auto --init-from "$GROWN_DIR" "run.out_dir=$OUT_DIR"
    "run.train_tokens=$TRAIN_TOKENS" "data.train=$DOMAINS" "schedule.warmup_steps=$WARMUP_STEPS"
    ${MR_OVERRIDES[@]+"${MR_OVERRIDES[@]}"} "${shape[@]}")

if mr_dry; then printf '# config %s grown to: %s; out_dir %s\n' "$CONFIG" "${shape[*]}" "$OUT_DIR"; fi
mr_launch "$OUT_DIR" megareuse/train.py "${args[@]}"
