# shellcheck shell=bash
# Helpers sourced by the SLURM job scripts in this directory (base_1b.sh, cpt_1b.sh, grow_1b.sh,
# sweep_array.sh). Not a job script: source it, call `mr_setup NAME`, then `mr_launch`.
#
# Launch variables (environment, all optional; [default]):
#   DRY_RUN=1       print every command (shell-quoted, prefixed "+ ") instead of running it;
#                   nothing is started, requeued or written
#   LAUNCHER        torchrun: one torchrun agent per node, c10d rendezvous at MASTER_ADDR:MASTER_PORT [default]
#                   srun:     one task per GPU started by srun; each process reads SLURM_PROCID,
#                             SLURM_LOCALID, SLURM_NTASKS (megareuse/parallel/launch.py)
#                   python:   one process, no launcher (debugging)
#   PYTHON          interpreter [$REPO/.venv/bin/python if present, else python3]
#   TORCHRUN        torchrun command [$PYTHON -m torch.distributed.run, i.e. torchrun of $PYTHON]
#   NNODES          nodes in the job [SLURM_JOB_NUM_NODES, SLURM_NNODES, 1]
#   NODE_RANK       this node's index [SLURM_NODEID, 0]
#   GPUS_PER_NODE   processes per node [SLURM_GPUS_ON_NODE, 8]
#   MASTER_ADDR     rendezvous host [first host of SLURM_JOB_NODELIST / SLURM_NODELIST (scontrol
#                   show hostnames, or a bash expansion of simple lists), else 127.0.0.1]
#   MASTER_PORT     rendezvous port [20000 + SLURM_JOB_ID % 40000, as launch.py; 29500 without a job]
#   RDZV_BACKEND    c10d [default] | static (torchrun --master_addr/--master_port/--node_rank:
#                   node 0 holds ranks 0..GPUS_PER_NODE-1)
#   FANOUT          auto [default] | 1 | 0. In the batch step of a multi-node torchrun job, `srun` one
#                   task per node that re-runs the job script with MEGAREUSE_NODE_STEP=1, which then
#                   starts torchrun with its own SLURM_NODEID. auto = srun exists, NNODES > 1 and this
#                   is not already a node step. 0 = run torchrun right here (one copy per node started
#                   by something else, e.g. a simulated multi-node test).
#   STEP_GPUS       --gpus-per-node of srun steps [GPUS_PER_NODE if the job has GPUs, else omitted]
#   SRUN_ARGS       extra srun arguments (whitespace-separated)
#   TORCHRUN_ARGS   extra torchrun arguments (whitespace-separated)
#   MAX_REQUEUES    stop requeueing once SLURM_RESTART_COUNT reaches this [20]
#   REPO            repository root [../.. of this file; under sbatch, where the copy of the job
#                   script lives elsewhere, SLURM_SUBMIT_DIR]
# Network (exported to every process; [default], the others are only passed on when set):
#   NCCL_DEBUG [WARN]   TORCH_NCCL_ASYNC_ERROR_HANDLING [1]   NCCL_IB_DISABLE [0; 1 without InfiniBand]
#   NCCL_SOCKET_IFNAME  interface(s) for NCCL's sockets, e.g. ib0, or ^lo,docker to exclude
#   GLOO_SOCKET_IFNAME  one interface for gloo (CPU runs), e.g. eth0
#   NCCL_IB_HCA, NCCL_IB_GID_INDEX, NCCL_NET_GDR_LEVEL, NCCL_P2P_LEVEL, NCCL_CROSS_NIC, NCCL_ALGO
#   OMP_NUM_THREADS [1]
#
# Signals and requeue: `mr_launch` starts the launcher in the background and waits. SIGUSR1 (sent
# by `sbatch --signal=B:USR1@300` five minutes before the time limit) is forwarded to the training
# processes, which checkpoint at the next step boundary and exit with code 75 after writing
# OUT_DIR/preempted.json; then the job is requeued with `scontrol requeue` and the next start
# continues with `--resume auto`. The same happens when the trainers get SIGUSR1 directly
# (`--signal=USR1@300` without B:): preempted.json names the signal. SIGTERM/SIGINT (scancel,
# preemption) are forwarded, the trainers checkpoint the same way, and nothing is requeued by the
# script (SLURM's preemption requeue restarts the job itself).

MR_SCRIPT="${MR_SCRIPT:-slurm}"
MR_CMD=()
MR_CHILD=""
MR_FORWARD="self"
MR_GOT_USR1=0
MR_TRAPPED=0

mr_log() { printf '[%s] %s\n' "$MR_SCRIPT" "$*" >&2; }
mr_die() { mr_log "error: $*"; exit 2; }

mr_dry() { [[ ${DRY_RUN:-0} == 1 ]]; }

# Quote one word for the shell: as it is when safe, else in single quotes.
mr_quote() {
    if [[ $1 =~ ^[A-Za-z0-9_./:=%,@+-]+$ ]]; then
        printf '%s' "$1"
    else
        printf "'%s'" "${1//\'/\'\\\'\'}"
    fi
}

# Print a command as one line, "+ " and its shell-quoted words (what `bash -c` would run).
mr_print() {
    local word line="+"
    for word in "$@"; do line+=" $(mr_quote "$word")"; done
    printf '%s\n' "$line"
}

# run CMD...: DRY_RUN=1 prints it, otherwise runs it in the foreground.
run() {
    if mr_dry; then
        mr_print "$@"
    else
        "$@"
    fi
}

mr_is_int() { [[ $1 =~ ^[0-9]+$ ]]; }

# First host of a SLURM node list: "gpu[017-018]" -> gpu017, "a,b" -> a, "n[1,4-5],m" -> n1.
mr_first_host() {
    local list=$1 prefix rest first hosts=()
    if command -v scontrol >/dev/null 2>&1; then
        mapfile -t hosts < <(scontrol show hostnames "$list")
        if [[ ${#hosts[@]} -gt 0 && -n ${hosts[0]} ]]; then
            printf '%s\n' "${hosts[0]}"
            return 0
        fi
    fi
    prefix=${list%%[[,]*}
    rest=${list#"$prefix"}
    if [[ $rest == "["* ]]; then
        first=${rest#"["}
        first=${first%%[],-]*}
        printf '%s%s\n' "$prefix" "$first"
    else
        printf '%s\n' "$prefix"
    fi
}

# Export NAME=VALUE (and print it under DRY_RUN).
mr_export() {
    export "$1=$2"
    if mr_dry; then
        printf 'export %s=%s\n' "$1" "$(mr_quote "$2")"
    fi
}

# The NCCL / network environment block: overridable defaults, optional variables passed on.
mr_env_block() {
    mr_export NCCL_DEBUG "${NCCL_DEBUG:-WARN}"
    mr_export TORCH_NCCL_ASYNC_ERROR_HANDLING "${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
    mr_export NCCL_IB_DISABLE "${NCCL_IB_DISABLE:-0}"
    # NCCL_SOCKET_IFNAME=ib0           # or ^lo,docker: interfaces NCCL must not use
    # GLOO_SOCKET_IFNAME=eth0          # gloo takes one interface name (no ^ exclusion)
    # NCCL_IB_HCA=mlx5                 # which InfiniBand adapters
    local name
    for name in NCCL_SOCKET_IFNAME GLOO_SOCKET_IFNAME NCCL_IB_HCA NCCL_IB_GID_INDEX \
        NCCL_NET_GDR_LEVEL NCCL_P2P_LEVEL NCCL_CROSS_NIC NCCL_ALGO; do
        if [[ -n ${!name:-} ]]; then
            mr_export "$name" "${!name}"
        fi
    done
    mr_export OMP_NUM_THREADS "${OMP_NUM_THREADS:-1}"
    mr_export PYTHONUNBUFFERED 1
}

# mr_setup NAME: resolve the repository, node layout, rendezvous and launcher; cd to REPO.
mr_setup() {
    MR_SCRIPT=$1
    local here
    here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
    REPO="${REPO:-$(cd "$here/../.." && pwd)}"
    [[ -d $REPO/megareuse ]] || mr_die "REPO=$REPO holds no megareuse/ (set REPO to the repository root)"
    cd "$REPO" || mr_die "cannot cd to REPO=$REPO"
    if [[ -z ${PYTHON:-} ]]; then
        if [[ -x $REPO/.venv/bin/python ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
    fi
    LAUNCHER="${LAUNCHER:-torchrun}"
    case $LAUNCHER in torchrun | srun | python) ;; *) mr_die "LAUNCHER=$LAUNCHER: accepted torchrun, srun, python" ;; esac
    NNODES="${NNODES:-${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}}"
    NODE_RANK="${NODE_RANK:-${SLURM_NODEID:-0}}"
    GPUS_PER_NODE="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}"
    local name
    for name in NNODES NODE_RANK GPUS_PER_NODE; do
        mr_is_int "${!name}" || mr_die "$name=${!name}: accepted a non-negative integer"
    done
    ((NNODES >= 1 && GPUS_PER_NODE >= 1)) || mr_die "NNODES=$NNODES GPUS_PER_NODE=$GPUS_PER_NODE: accepted >= 1"
    ((NODE_RANK < NNODES)) || mr_die "NODE_RANK=$NODE_RANK: accepted 0..$((NNODES - 1)) (NNODES=$NNODES)"
    local nodelist="${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}}"
    if [[ -z ${MASTER_ADDR:-} ]]; then
        if [[ -n $nodelist ]]; then MASTER_ADDR="$(mr_first_host "$nodelist")"; else MASTER_ADDR=127.0.0.1; fi
    fi
    if [[ -z ${MASTER_PORT:-} ]]; then
        if mr_is_int "${SLURM_JOB_ID:-}"; then MASTER_PORT=$((20000 + SLURM_JOB_ID % 40000)); else MASTER_PORT=29500; fi
    fi
    RDZV_BACKEND="${RDZV_BACKEND:-c10d}"
    case $RDZV_BACKEND in c10d | static) ;; *) mr_die "RDZV_BACKEND=$RDZV_BACKEND: accepted c10d, static" ;; esac
    if [[ -z ${STEP_GPUS+set} ]]; then
        if [[ -n ${SLURM_GPUS_ON_NODE:-} || -n ${SLURM_JOB_GPUS:-} ]]; then STEP_GPUS=$GPUS_PER_NODE; else STEP_GPUS=""; fi
    fi
    MR_NODE_STEP="${MEGAREUSE_NODE_STEP:-0}"
    if mr_dry; then
        printf '# %s: %s nodes x %s GPUs (world %s), node_rank %s, master %s:%s, launcher %s%s\n' \
            "$MR_SCRIPT" "$NNODES" "$GPUS_PER_NODE" "$((NNODES * GPUS_PER_NODE))" "$NODE_RANK" \
            "$MASTER_ADDR" "$MASTER_PORT" "$LAUNCHER" "${SLURM_JOB_ID:+, job $SLURM_JOB_ID}"
        mr_print cd "$REPO"
    fi
    mr_export MASTER_ADDR "$MASTER_ADDR"
    mr_export MASTER_PORT "$MASTER_PORT"
    mr_env_block
    # a SIGUSR1 before the launch (e.g. during growth) is remembered: no launch, just requeue
    if ! mr_dry; then trap 'MR_GOT_USR1=1' USR1; fi
    if [[ -n ${SLURM_RESTART_COUNT:-} ]]; then
        mr_log "restart $SLURM_RESTART_COUNT of job ${SLURM_JOB_ID:-?} (continuing with --resume auto)"
    fi
}

# Split a whitespace-separated variable into the named array (empty -> empty array).
mr_words() {
    read -r -a "$1" <<<"${2:-}"
}

# Should this (batch) step fan out one srun task per node that re-runs the job script?
mr_fanout() {
    local mode="${FANOUT:-auto}"
    [[ $LAUNCHER == torchrun && $MR_NODE_STEP != 1 ]] || return 1
    case $mode in
        1) return 0 ;;
        0) return 1 ;;
        auto) ((NNODES > 1)) && command -v srun >/dev/null 2>&1 ;;
        *) mr_die "FANOUT=$mode: accepted auto, 1, 0" ;;
    esac
}

mr_srun_common() {  # arguments shared by every srun step
    local extra=()
    mr_words extra "${SRUN_ARGS:-}"
    MR_SRUN=(srun --kill-on-bad-exit=1 --nodes="$NNODES")
    if [[ -n $STEP_GPUS ]]; then MR_SRUN+=(--gpus-per-node="$STEP_GPUS"); fi
    MR_SRUN+=(${extra[@]+"${extra[@]}"})
}

# mr_node_command PROGRAM...: the command this node runs (torchrun or python), into MR_CMD.
mr_node_command() {
    local extra=()
    if [[ $LAUNCHER == python ]]; then
        MR_CMD=("$PYTHON" "$@")
        MR_FORWARD="self"
        return 0
    fi
    mr_words MR_CMD "${TORCHRUN:-$PYTHON -m torch.distributed.run}"
    mr_words extra "${TORCHRUN_ARGS:-}"
    MR_CMD+=(--nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$GPUS_PER_NODE")
    if [[ $RDZV_BACKEND == c10d ]]; then
        MR_CMD+=(--rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT"
            --rdzv_id "${SLURM_JOB_ID:-megareuse}")
    else
        MR_CMD+=(--master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
    fi
    MR_CMD+=(--max_restarts 0 ${extra[@]+"${extra[@]}"} "$@")
    MR_FORWARD="children"  # USR1 goes to the workers; torchrun itself would die of it
}

# mr_launch OUT_DIR PROGRAM...: start PROGRAM (a script path or -m MODULE, then its arguments)
# on every GPU of the job with LAUNCHER, forward signals, requeue after SIGUSR1.
mr_launch() {
    local out_dir=$1
    shift
    if [[ $LAUNCHER == srun ]]; then
        [[ $MR_NODE_STEP != 1 ]] || mr_die "LAUNCHER=srun is started from the batch step only"
        mr_srun_common
        local cpus=()
        if mr_is_int "${SLURM_CPUS_ON_NODE:-}"; then cpus=(--cpus-per-task="$((SLURM_CPUS_ON_NODE / GPUS_PER_NODE))"); fi
        unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE  # the tasks read SLURM_PROCID etc.
        MR_CMD=("${MR_SRUN[@]}" --ntasks="$((NNODES * GPUS_PER_NODE))" --ntasks-per-node="$GPUS_PER_NODE"
            ${cpus[@]+"${cpus[@]}"} "$PYTHON" "$@")
        MR_FORWARD="self"  # srun forwards signals to its tasks
        if mr_dry; then
            local world=$((NNODES * GPUS_PER_NODE))
            printf '# srun starts %s tasks: RANK = SLURM_PROCID 0..%s, LOCAL_RANK = SLURM_LOCALID 0..%s, ' \
                "$world" "$((world - 1))" "$((GPUS_PER_NODE - 1))"
            printf 'WORLD_SIZE = SLURM_NTASKS = %s, MASTER_ADDR=%s MASTER_PORT=%s\n' "$world" "$MASTER_ADDR" "$MASTER_PORT"
        fi
    elif mr_fanout; then
        mr_srun_common
        local cpus=()
        if mr_is_int "${SLURM_CPUS_ON_NODE:-}"; then cpus=(--cpus-per-task="$SLURM_CPUS_ON_NODE"); fi
        MR_CMD=("${MR_SRUN[@]}" --ntasks="$NNODES" --ntasks-per-node=1 ${cpus[@]+"${cpus[@]}"}
            env -u NODE_RANK MEGAREUSE_NODE_STEP=1 bash "$REPO/scripts/slurm/$MR_SCRIPT" ${MR_ARGS[@]+"${MR_ARGS[@]}"})
        MR_FORWARD="self"
        if mr_dry; then
            mr_print "${MR_CMD[@]}"
            printf '# each of the %s node steps then runs (shown for node_rank %s):\n' "$NNODES" "$NODE_RANK"
            mr_node_command "$@"
        fi
    else
        mr_node_command "$@"
    fi
    if mr_dry; then
        mr_print "${MR_CMD[@]}"
        if [[ $MR_NODE_STEP != 1 ]]; then
            printf '# on SIGUSR1 (sbatch --signal=B:USR1@300): forward USR1 to the training processes, wait, then:\n'
            mr_print scontrol requeue "${SLURM_JOB_ID:-<job id>}"
        fi
        return 0
    fi
    local rc=0 marker="${out_dir:+$out_dir/preempted.json}" primary=0
    # the batch step decides about requeueing (with FANOUT=0 every node runs this: node 0 decides)
    if [[ $MR_NODE_STEP != 1 && $NODE_RANK == 0 ]]; then primary=1; fi
    if [[ -n $marker && $primary == 1 ]]; then rm -f "$marker"; fi
    if [[ $MR_GOT_USR1 == 1 ]]; then
        mr_log "SIGUSR1 arrived before the launch: not starting it"
    else
        mr_run_forwarding "${MR_CMD[@]}" || rc=$?
    fi
    # The trainers stop after SIGTERM/SIGUSR1 with a checkpoint, exit code 75 and preempted.json
    # (torchrun reports any worker's non-zero exit as 1, so the file is what counts). Requeue
    # after SIGUSR1, whether this script or the trainers got it; after SIGTERM (scancel, or a
    # preemption that SLURM requeues itself) do not.
    if [[ $primary == 1 ]] && { [[ $MR_GOT_USR1 == 1 ]] ||
        { [[ -n $marker && -f $marker ]] && grep -q '"signal": "SIGUSR1"' "$marker"; }; }; then
        mr_requeue "$out_dir"
        return 0
    fi
    if [[ $primary == 1 && -n $marker && -f $marker ]]; then
        mr_log "training checkpointed and stopped on a signal ($(tr -d '\n ' <"$marker")); not requeued"
    fi
    return "$rc"
}

mr_forward() {
    local sig=$1
    MR_TRAPPED=1
    if [[ $sig == USR1 ]]; then MR_GOT_USR1=1; fi
    [[ -n $MR_CHILD ]] || return 0
    if [[ $MR_FORWARD == children && $sig == USR1 ]]; then
        mr_log "got SIGUSR1: forwarding it to the workers of launcher $MR_CHILD"
        pkill -USR1 -P "$MR_CHILD" 2>/dev/null || kill -USR1 "$MR_CHILD" 2>/dev/null || true
    else
        mr_log "got SIG$sig: forwarding it to $MR_CHILD"
        kill "-$sig" "$MR_CHILD" 2>/dev/null || true
    fi
}

# Run CMD in the background with USR1/TERM/INT forwarded; return its exit status.
mr_run_forwarding() {
    "$@" &
    MR_CHILD=$!
    trap 'mr_forward USR1' USR1
    trap 'mr_forward TERM' TERM
    trap 'mr_forward TERM' INT  # background jobs ignore SIGINT: pass it on as SIGTERM
    local rc
    while :; do
        MR_TRAPPED=0
        wait "$MR_CHILD" && rc=0 || rc=$?
        # a trapped signal interrupts `wait` (status > 128): wait again for the child itself
        if [[ $MR_TRAPPED == 1 ]] && ((rc > 128)); then continue; fi
        break
    done
    trap 'MR_GOT_USR1=1' USR1
    trap - TERM INT
    MR_CHILD=""
    return "$rc"
}

# Has the run in OUT_DIR finished (summary.json says so)?
mr_finished() {
    [[ -f $1/summary.json ]] && grep -q '"finished": true' "$1/summary.json"
}

mr_requeue() {
    local out_dir=$1
    if [[ -n $out_dir ]] && mr_finished "$out_dir"; then
        mr_log "SIGUSR1 after $out_dir finished: not requeued"
    elif [[ -z ${SLURM_JOB_ID:-} ]]; then
        mr_log "SIGUSR1 outside a SLURM job: nothing to requeue; rerun to continue (--resume auto)"
    elif ((${SLURM_RESTART_COUNT:-0} >= ${MAX_REQUEUES:-20})); then
        mr_log "job $SLURM_JOB_ID restarted ${SLURM_RESTART_COUNT:-0} times (MAX_REQUEUES): not requeued"
    elif command -v scontrol >/dev/null 2>&1; then
        mr_log "requeueing job $SLURM_JOB_ID; it continues from its latest checkpoint"
        scontrol requeue "$SLURM_JOB_ID"
    else
        mr_log "scontrol not found: job $SLURM_JOB_ID not requeued; resubmit to continue (--resume auto)"
    fi
}

# Split OVERRIDES (whitespace-separated section.field=value) into MR_OVERRIDES and append the
# job script's own arguments (which may contain spaces).
mr_overrides() {
    mr_words MR_OVERRIDES "${OVERRIDES:-}"
    MR_OVERRIDES+=("$@")
}
