#!/usr/bin/env bash
#SBATCH --job-name=base_1b
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
#
# Multi-node base (stage 1) training of the 1.1B LLaMA-like model (configs/train/llama_1b.yaml).
# Submit from the repository root (logs/ must exist: SLURM does not create it):
#
#   mkdir -p logs && sbatch scripts/slurm/base_1b.sh [section.field=value ...]
#   sbatch --nodes=4 scripts/slurm/base_1b.sh run.grad_accum=1      # same 0.5M-token batch on 4 nodes
#   DRY_RUN=1 bash scripts/slurm/base_1b.sh                          # print the commands only
#
# The job always trains with `--resume auto`: a requeued or resubmitted job continues from the
# latest complete checkpoint in OUT_DIR (or starts fresh when there is none). Five minutes before
# the time limit SLURM sends SIGUSR1 to this script, which forwards it to the training processes
# (they checkpoint and stop) and requeues the job (`scontrol requeue`).
#
# Variables (environment; [default]):
#   CONFIG        training config [configs/train/llama_1b.yaml]; CONFIG=configs/train/tiny_base.yaml
#                 (with run.device=cpu) trains the tiny model for real, e.g. on CPU-only test nodes
#   OUT_DIR       run.out_dir [runs/base_1b]; empty keeps the config's
#   TRAIN_TOKENS  run.train_tokens [the config's]
#   OVERRIDES     whitespace-separated section.field=value overrides [none]; the job script's
#                 arguments are appended as further overrides (and may contain spaces)
#   DRY_RUN       1: print the exact commands (and the environment they get) instead of running them
# Launch (see common.sh for the details): LAUNCHER [torchrun] | srun | python, PYTHON, TORCHRUN,
#   NNODES [SLURM_JOB_NUM_NODES], NODE_RANK [SLURM_NODEID], GPUS_PER_NODE [SLURM_GPUS_ON_NODE, 8],
#   MASTER_ADDR [first host of SLURM_JOB_NODELIST], MASTER_PORT [20000 + SLURM_JOB_ID % 40000],
#   RDZV_BACKEND [c10d], FANOUT [auto], STEP_GPUS, SRUN_ARGS, TORCHRUN_ARGS, MAX_REQUEUES [20], REPO
# Network: NCCL_DEBUG [WARN], TORCH_NCCL_ASYNC_ERROR_HANDLING [1], NCCL_IB_DISABLE [0],
#   NCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME, NCCL_IB_HCA, ... (passed on when set), OMP_NUM_THREADS [1]
#
# Outside sbatch the same launch logic runs on each node by hand (what a simulated multi-node
# test does): set SLURM_JOB_NODELIST, SLURM_NNODES, SLURM_NODEID, SLURM_JOB_ID (or NNODES,
# NODE_RANK, MASTER_ADDR, MASTER_PORT) and run `bash scripts/slurm/base_1b.sh` on every node.
set -euo pipefail

MR_ARGS=("$@")
CONFIG="${CONFIG:-configs/train/llama_1b.yaml}"
OUT_DIR="${OUT_DIR-runs/base_1b}"
TRAIN_TOKENS="${TRAIN_TOKENS:-}"

mr_here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
[[ -f $mr_here/common.sh ]] || mr_here="${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}/scripts/slurm"  # sbatch runs a copy
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$mr_here/common.sh"
mr_setup base_1b.sh

mr_overrides "$@"
args=(--config "$CONFIG" --resume auto)
if [[ -n $OUT_DIR ]]; then args+=("run.out_dir=$OUT_DIR"); fi
if [[ -n $TRAIN_TOKENS ]]; then args+=("run.train_tokens=$TRAIN_TOKENS"); fi
args+=(${MR_OVERRIDES[@]+"${MR_OVERRIDES[@]}"})

if mr_dry; then printf '# config %s, out_dir %s\n' "$CONFIG" "${OUT_DIR:-<config>}"; fi
mr_launch "$OUT_DIR" megareuse/train.py "${args[@]}"
