#!/usr/bin/env bash
#SBATCH --job-name=cpt_1b
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
# Stage 2: continual pretraining (CPT) of the 1.1B base on code, starting from a base checkpoint
# (`megareuse train --init-from BASE_CKPT`: weights only, a fresh optimizer and a re-warmup).
# Submit from the repository root, after the base job (chain it with --dependency):
#
#   mkdir -p logs
#   base=$(sbatch --parsable scripts/slurm/base_1b.sh)
#   BASE_CKPT=runs/base_1b/checkpoints/step_00065536 \
#       sbatch --dependency=afterok:"$base" scripts/slurm/cpt_1b.sh [section.field=value ...]
#   DRY_RUN=1 BASE_CKPT=runs/base_1b/checkpoints/step_00065536 bash scripts/slurm/cpt_1b.sh
#
# Requeue and `--resume auto` as in base_1b.sh: a restarted job continues the CPT run from its
# own latest checkpoint in OUT_DIR (BASE_CKPT must still exist: it is checked again).
#
# Variables (environment; [default]):
#   BASE_CKPT     the base checkpoint directory (required), e.g. runs/base_1b/checkpoints/step_00065536
#   CONFIG        training config [configs/train/llama_1b.yaml]; must describe BASE_CKPT's model
#   OUT_DIR       run.out_dir [runs/cpt_1b]
#   TRAIN_TOKENS  stage-2 tokens D2, run.train_tokens [2147483648 = 2^31]
#   DOMAINS       stage-2 blend, data.train [{code: 1.0}]
#   REPLAY        share of samples replayed from the base run's blend, data.replay [0]
#   WARMUP_STEPS  re-warmup steps, schedule.warmup_steps [250]
#   KEEP_OPTIMIZER 1: carry the base's optimizer state (same layout only) [0]
#   OVERRIDES     whitespace-separated section.field=value overrides [none]; the job script's
#                 arguments are appended as further overrides
#   DRY_RUN       1: print the exact commands instead of running them
# Launch and network variables: as in base_1b.sh (LAUNCHER, PYTHON, NNODES, GPUS_PER_NODE,
#   MASTER_ADDR, MASTER_PORT, RDZV_BACKEND, FANOUT, NCCL_*, ...; documented in common.sh).
set -euo pipefail

MR_ARGS=("$@")
BASE_CKPT="${BASE_CKPT:-}"
CONFIG="${CONFIG:-configs/train/llama_1b.yaml}"
OUT_DIR="${OUT_DIR:-runs/cpt_1b}"
TRAIN_TOKENS="${TRAIN_TOKENS:-2147483648}"
DOMAINS="${DOMAINS:-{code: 1.0\}}"
REPLAY="${REPLAY:-0}"
WARMUP_STEPS="${WARMUP_STEPS:-250}"
KEEP_OPTIMIZER="${KEEP_OPTIMIZER:-0}"

mr_here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
[[ -f $mr_here/common.sh ]] || mr_here="${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}/scripts/slurm"  # sbatch runs a copy
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$mr_here/common.sh"
mr_setup cpt_1b.sh

[[ -n $BASE_CKPT ]] || mr_die "BASE_CKPT is not set: accepted a base checkpoint directory (e.g. runs/base_1b/checkpoints/step_00065536)"
if ! mr_dry && [[ ! -d $BASE_CKPT ]]; then
    mr_die "BASE_CKPT=$BASE_CKPT is not a directory (relative paths start at REPO=$REPO)"
fi

mr_overrides "$@"
args=(--config "$CONFIG" --resume auto --init-from "$BASE_CKPT")
if [[ $KEEP_OPTIMIZER == 1 ]]; then args+=(--keep-optimizer); fi
args+=("run.out_dir=$OUT_DIR" "run.train_tokens=$TRAIN_TOKENS" "data.train=$DOMAINS"
    "data.replay=$REPLAY" "schedule.warmup_steps=$WARMUP_STEPS")
args+=(${MR_OVERRIDES[@]+"${MR_OVERRIDES[@]}"})

if mr_dry; then printf '# config %s, stage 2 from %s, out_dir %s\n' "$CONFIG" "$BASE_CKPT" "$OUT_DIR"; fi
mr_launch "$OUT_DIR" megareuse/train.py "${args[@]}"
