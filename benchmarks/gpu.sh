#!/usr/bin/env bash
# One GPU session's checks and benchmarks, on one H100/H200, in at most 8 minutes.
#
#     bash benchmarks/gpu.sh [--dry-run] [--out DIR] [--skip STEP[,STEP]]...
#
# Steps, each with its own timeout and log, a failing one recorded and the rest run on:
#   setup            install the carried wheels (.whl/, built by benchmarks/wheels.sh) that the
#                    machine lacks (never torch/triton/numpy) and megareuse itself (editable, no
#                    deps, no network); record the GPU and the torch/triton/CUDA versions
#   data             prepare the prose corpus once (vocab 2048) for the benchmarks and the train
#                    test; keep the hf / torchtitan peers where each builds and runs a Llama here
#   tests-kernels    MEGAREUSE_TEST_GPU=1 pytest tests/test_kernels*.py (bf16 included on CUDA) and
#                    tests/test_kernel_verify.py (the auto mode's first-use check of every kernel
#                    against float64 at the 1.1B shapes, fp32 and bf16, and its fall-backs)
#   tests-train      bf16 training steps per attention backend and fused vs plain loss; bf16
#                    ZeRO-0 and ZeRO-3 save and resume bit for bit; the default async save (shares
#                    staged in pinned memory) resumes bit for bit; the cpu:gloo,cuda:nccl group
#                    (tests/test_gpu_train_step.py) and the fused head tests of tests/test_lm_loss.py
#   kernels          benchmarks/kernel_speed.py (attention at S 1024/4096, norm, SwiGLU, RoPE, linear+CE)
#   memory           benchmarks/memory.py (CPU gloo ranks, CUDA hidden), in the background
#                    while the tests and kernels run; waited for before the throughput steps
#   throughput-350m  benchmarks/train_throughput.py --model 350m, megareuse vs bare, hf, torchtitan
#   throughput-1.1b  the same for 1.1b
#   report           OUT/gpu.json (date, GPU, versions, git revision, per-step status and wall
#                    seconds, the benchmarks' JSON merged) and OUT/gpu.md (the tables)
# Results: --out DIR, else $OUT when set (the device tool's folder), else ./gpu-results. Every
# step's log and the benchmarks' own JSON are packed into DIR/logs.tar.gz; the loose copies in
# DIR/work are kept with --out and removed when writing into $OUT (it returns at most 8 files).
# --dry-run prints every step's command and timeout and exits 0 (no GPU, no Python needed).
# PYTHON=... picks the interpreter (default python3); MEGAREUSE_REV=... names the revision where
# there is no git checkout (the device tool copies the work tree without .git).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
REPO=$(pwd)

STEPS=(setup data tests-kernels tests-train kernels memory throughput-350m throughput-1.1b report)
declare -A TIMEOUT=([setup]=30 [data]=40 [tests-kernels]=85 [tests-train]=75 [kernels]=55 [memory]=200
                    [throughput-350m]=60 [throughput-1.1b]=95 [report]=10)
BACKGROUND=memory          # runs beside the steps from after BG_AFTER up to BG_BEFORE
BG_AFTER=data
BG_BEFORE=throughput-350m
KILL_AFTER=3               # SIGKILL this long after a step's timeout (its SIGTERM) if it still runs
LIMIT_S=480

usage() { sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'; }

DRY=0
OUTDIR=""
SKIP=","
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1; shift ;;
        --out) [ $# -ge 2 ] || { echo "gpu.sh: --out needs a directory" >&2; exit 2; }
               OUTDIR=$2; shift 2 ;;
        --out=*) OUTDIR=${1#--out=}; shift ;;
        --skip) [ $# -ge 2 ] || { echo "gpu.sh: --skip needs a step name" >&2; exit 2; }
                SKIP+="$2,"; shift 2 ;;
        --skip=*) SKIP+="${1#--skip=},"; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu.sh: unknown option $1 (accepted: --dry-run, --out DIR, --skip STEP)" >&2; exit 2 ;;
    esac
done
IFS=, read -r -a skipped_list <<< "${SKIP#,}"
for s in "${skipped_list[@]}"; do
    [ -z "$s" ] && continue
    if [ -z "${TIMEOUT[$s]+x}" ]; then
        echo "gpu.sh: --skip $s: no such step (accepted: ${STEPS[*]})" >&2
        exit 2
    fi
done
is_skipped() { [[ "$SKIP" == *",$1,"* ]]; }

CLEAN_LOOSE=0
if [ -z "$OUTDIR" ]; then
    if [ -n "${OUT:-}" ]; then OUTDIR=$OUT; CLEAN_LOOSE=1; else OUTDIR=$REPO/gpu-results; fi
fi
if [ "$DRY" = 0 ]; then
    mkdir -p "$OUTDIR" || { echo "gpu.sh: cannot create $OUTDIR" >&2; exit 2; }
    OUTDIR=$(cd "$OUTDIR" && pwd)
fi
WORK=$OUTDIR/work
PY=${PYTHON:-python3}
SCRATCH=${TMPDIR:-/tmp}/megareuse-gpu.$$
DATA=$SCRATCH/data
PEERS_FILE=$WORK/peers.txt
PEERS_DEFAULT=megareuse,bare,hf,torchtitan
REV=${MEGAREUSE_REV:-$(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)}
if [ "$REV" != unknown ] && [ -z "${MEGAREUSE_REV:-}" ] && \
        [ -n "$(git -C "$REPO" status --porcelain --untracked-files=no 2>/dev/null | head -1)" ]; then
    REV="$REV+dirty"
fi

peers() {
    if [ -s "$PEERS_FILE" ]; then cat "$PEERS_FILE"; else echo "$PEERS_DEFAULT"; fi
}

# The command of each step, into the array CMD.
step_cmd() {
    case "$1" in
        setup) CMD=("$PY" benchmarks/gpu_report.py setup --wheels "$REPO/.whl" --target "$REPO/.whl-site"
                    --shim "$REPO/.gpu-path" --env-json "$WORK/env.json") ;;
        data) CMD=("$PY" benchmarks/gpu_report.py prepare "$DATA" --peers-file "$PEERS_FILE") ;;
        tests-kernels) CMD=(env MEGAREUSE_TEST_GPU=1 "$PY" -m pytest -q -p no:cacheprovider
                            tests/test_kernels.py tests/test_kernels_attention.py tests/test_kernels_ce.py
                            tests/test_kernels_ops.py tests/test_kernel_verify.py
                            --junitxml "$WORK/tests-kernels.xml") ;;
        tests-train) CMD=(env MEGAREUSE_TEST_GPU=1 "MEGAREUSE_TEST_DATA=$DATA" "$PY" -m pytest -q
                          -p no:cacheprovider tests/test_gpu_train_step.py tests/test_lm_loss.py
                          -k "bf16_train_step or fused or async_save_on_cuda" --junitxml "$WORK/tests-train.xml") ;;
        kernels) CMD=("$PY" benchmarks/kernel_speed.py --json "$WORK/kernels.json" --seqs 1024 4096
                      --reps 20 --warmup 3) ;;
        memory) CMD=(env CUDA_VISIBLE_DEVICES= "$PY" benchmarks/memory.py --world 2 --zero "0,3" --tp 1
                     --ac none --steps 2) ;;
        throughput-350m|throughput-1.1b)
            local model=${1#throughput-}
            # variants: megareuse with a switch flipped (fused-attention: model.attention=auto, the
            # verified Triton kernels against the configs' SDPA default; sync-every-step: the deferred
            # host reads' gain); steps 9 / warmup 3: losses read every 3 steps
            local variants=fused-attention
            [ "$model" = 350m ] && variants=sync-every-step,fused-attention
            CMD=("$PY" benchmarks/train_throughput.py --device cuda --model "$model" --peers "$(peers)"
                 --variants "$variants" --steps 9 --warmup 3 --rounds 1 --data "$DATA" --in-process
                 --json "$WORK/throughput-$model.json") ;;
        report) CMD=("$PY" benchmarks/gpu_report.py report "$OUTDIR" --work "$WORK" --rev "$REV"
                     --started "$STARTED" --wall-so-far "$((SECONDS))") ;;
    esac
}

# the words of a command as a shell would take them back
shown() {
    local out="" w
    for w in "$@"; do
        if [[ "$w" =~ ^[A-Za-z0-9_./=:,+@%-]+$ ]]; then out+="$w "; else out+="'${w//\'/\'\\\'\'}' "; fi
    done
    printf '%s' "${out% }"
}

STARTED=$(date -u +%Y-%m-%dT%H:%M:%SZ)

if [ "$DRY" = 1 ]; then
    echo "gpu.sh --dry-run: results would go to $OUTDIR (gpu.json, gpu.md, logs.tar.gz); python: $PY"
    total=0
    for s in "${STEPS[@]}"; do
        step_cmd "$s"
        t=${TIMEOUT[$s]}
        how=""
        if [ "$s" = "$BACKGROUND" ]; then
            how=" background(after=$BG_AFTER,before=$BG_BEFORE)"
        elif ! is_skipped "$s"; then
            total=$((total + t + KILL_AFTER))
        fi
        is_skipped "$s" && how="$how skipped"
        printf 'step %s timeout=%ss%s: %s\n' "$s" "$t" "$how" "$(shown "${CMD[@]}")"
    done
    echo "peers: $PEERS_DEFAULT, less hf / torchtitan where it cannot build and run a Llama here (step data)"
    echo "worst case: ${total} s (foreground timeouts + ${KILL_AFTER} s kill grace each; limit ${LIMIT_S} s)"
    exit 0
fi

mkdir -p "$WORK" "$SCRATCH" || exit 2
trap 'rm -rf "$SCRATCH"' EXIT
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
: > "$WORK/steps.tsv"
echo "gpu.sh: results in $OUTDIR; revision $REV; python $PY; started $STARTED"

run_step() {
    local name=$1 t=${TIMEOUT[$1]} rc status t0 wall
    if is_skipped "$name"; then
        printf '%s\tskipped\t\t0\t%s\n' "$name" "$t" >> "$WORK/steps.tsv"
        echo "[gpu.sh] $name: skipped (--skip)"
        return 0
    fi
    step_cmd "$name"
    echo "[gpu.sh] $name: start (timeout ${t} s): ${CMD[*]}"
    t0=$(date +%s.%N)
    timeout -k "$KILL_AFTER" "$t" "${CMD[@]}" > "$WORK/$name.log" 2>&1 < /dev/null
    rc=$?
    wall=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    case $rc in
        0) status=pass ;;
        124|137) status=timeout ;;
        *) status=fail ;;
    esac
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$wall" "$t" >> "$WORK/steps.tsv"
    echo "[gpu.sh] $name: $status (rc $rc, ${wall} s of ${t} s)"
    if [ "$status" != pass ]; then
        echo "---- last lines of $name.log"
        tail -n 25 "$WORK/$name.log"
        echo "----"
    fi
    return 0
}

bg_pid=""
for s in "${STEPS[@]}"; do
    if [ "$s" = "$BACKGROUND" ]; then continue; fi
    if [ "$s" = "$BG_BEFORE" ] && [ -n "$bg_pid" ]; then
        wait "$bg_pid"
        bg_pid=""
    fi
    if [ "$s" = report ] && [ -n "$bg_pid" ]; then  # BG_BEFORE skipped: still wait
        wait "$bg_pid"
        bg_pid=""
    fi
    run_step "$s"
    if [ "$s" = setup ]; then  # the fall-backs of setup: wheels in --target, megareuse_kernels by a link
        for extra in "$REPO/.whl-site" "$REPO/.gpu-path"; do
            if [ -d "$extra" ]; then export PYTHONPATH="$PYTHONPATH:$extra"; fi
        done
    fi
    if [ "$s" = "$BG_AFTER" ]; then
        run_step "$BACKGROUND" &
        bg_pid=$!
    fi
done

failed=$(awk -F'\t' '$2 == "fail" || $2 == "timeout" { printf "%s ", $1 }' "$WORK/steps.tsv")
tar czf "$OUTDIR/logs.tar.gz" -C "$OUTDIR" work 2>/dev/null || echo "gpu.sh: could not pack the logs"
if [ "$CLEAN_LOOSE" = 1 ]; then rm -rf "$WORK"; fi
[ -f "$OUTDIR/gpu.md" ] && cat "$OUTDIR/gpu.md"
echo "gpu.sh: done in ${SECONDS} s; results in $OUTDIR"
if [ -n "$failed" ]; then
    echo "gpu.sh: failed or timed out: $failed"
    exit 1
fi
exit 0
