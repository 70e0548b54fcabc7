"""SLURM scripts (scripts/slurm/*.sh) and the sweep's job-array writer (megareuse/sweep/slurm.py).

No SLURM here: the scripts run under a simulated job environment (SLURM_* variables), with
DRY_RUN=1 (they print the commands they would run) or with stand-in `torchrun`, `srun`,
`scontrol` and `sbatch` executables that record how they were called.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megareuse.config import load_config
from megareuse.parallel.launch import expand_nodelist
from megareuse.sweep.grid import load_experiment, plan_experiment
from megareuse.sweep.local import SweepError
from megareuse.sweep.slurm import array_jobs, grown_overrides, waves, write_slurm

REPO = Path(__file__).resolve().parents[1]
SLURM_DIR = REPO / "scripts" / "slurm"
SCRIPTS = sorted(SLURM_DIR.glob("*.sh"))
DEMO = REPO / "configs" / "experiments" / "demo.yaml"
TWO_NODES = {"SLURM_JOB_NODELIST": "gpu[017-018]", "SLURM_NNODES": "2", "SLURM_JOB_NUM_NODES": "2",
             "SLURM_NODEID": "1", "SLURM_JOB_ID": "4242", "SLURM_GPUS_ON_NODE": "8",
             "SLURM_CPUS_ON_NODE": "96"}
PORT = str(20000 + 4242 % 40000)


def script_env(bin_dir: Path | None = None, **extra: str) -> dict[str, str]:
    """A clean environment: none of this machine's SLURM_*/RANK/MASTER_* variables leak in."""
    path = os.environ.get("PATH", "/usr/bin:/bin")
    env = {"PATH": f"{bin_dir}:{path}" if bin_dir else path, "HOME": os.environ.get("HOME", "/tmp"),
           "PYTHON": sys.executable}
    env.update(extra)
    return env


def run_script(name: str, env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", str(SLURM_DIR / name), *args], env=env, cwd="/",
                          capture_output=True, text=True, timeout=60)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def commands(stdout: str) -> list[list[str]]:
    """The printed commands ("+ ..." lines) as argument lists."""
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def torchrun_command(stdout: str) -> list[str]:
    found = [c for c in commands(stdout) if "torch.distributed.run" in c]
    assert len(found) == 1, stdout
    return found[0]


def option(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


def assert_torchrun_passes_through(cmd: list[str]) -> None:
    """torch's own torchrun parser accepts the command and hands the program its arguments
    unchanged (an argument that abbreviates a torchrun option, like --run for --run-path, fails)."""
    from torch.distributed.run import get_args_parser

    args = get_args_parser().parse_args(cmd[3:])
    program = [args.training_script, *args.training_script_args]
    assert cmd[len(cmd) - len(program):] == program


def fake_bin(tmp_path: Path, **programs: str) -> Path:
    """Executables named after the keywords, with the given bash bodies."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in programs.items():
        exe = bin_dir / name
        exe.write_text("#!/usr/bin/env bash\n" + body)
        exe.chmod(0o755)
    return bin_dir


# ------------------------------------------------------------------ syntax and lint
def test_scripts_present_and_executable():
    names = {p.name for p in SCRIPTS}
    assert {"common.sh", "base_1b.sh", "cpt_1b.sh", "grow_1b.sh", "sweep_array.sh"} <= names
    for path in SCRIPTS:
        text = path.read_text()
        assert "set -euo pipefail" in text or path.name == "common.sh"
        if path.name != "common.sh":
            assert os.access(path, os.X_OK) and "#SBATCH --output=logs/" in text and "DRY_RUN" in text


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(path):
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_shellcheck():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (Debian package `shellcheck`; .ci/run installs it)")
    proc = subprocess.run(["shellcheck", "-x", *map(str, SCRIPTS)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ------------------------------------------------------------------ base_1b.sh
def test_base_torchrun_two_nodes_dry_run():
    env = script_env(DRY_RUN="1", **TWO_NODES, OVERRIDES="parallel.tp=2 run.grad_accum=2")
    out = run_script("base_1b.sh", env, "data.train={prose: 1.0}").stdout
    cmd = torchrun_command(out)
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert option(cmd, "--nnodes") == "2" and option(cmd, "--node_rank") == "1"
    assert option(cmd, "--nproc_per_node") == "8" and option(cmd, "--rdzv_backend") == "c10d"
    assert option(cmd, "--rdzv_endpoint") == f"gpu017:{PORT}" and option(cmd, "--rdzv_id") == "4242"
    train = cmd[cmd.index("megareuse/train.py"):]
    assert train[1:5] == ["--config", "configs/train/llama_1b.yaml", "--resume", "auto"]
    assert train[5:] == ["run.out_dir=runs/base_1b", "parallel.tp=2", "run.grad_accum=2",
                         "data.train={prose: 1.0}"]
    assert "export MASTER_ADDR=gpu017" in out and f"export MASTER_PORT={PORT}" in out
    assert "export NCCL_DEBUG=WARN" in out and "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1" in out
    assert ["scontrol", "requeue", "4242"] in commands(out)
    assert [c for c in commands(out) if c[0] == "cd"] == [["cd", str(REPO)]]
    assert_torchrun_passes_through(cmd)


def test_base_srun_dry_run_names_ranks_and_world():
    env = script_env(DRY_RUN="1", LAUNCHER="srun", **{**TWO_NODES, "SLURM_NODEID": "0"})
    out = run_script("base_1b.sh", env).stdout
    (srun,) = [c for c in commands(out) if c[0] == "srun"]
    assert "--nodes=2" in srun and "--ntasks=16" in srun and "--ntasks-per-node=8" in srun
    assert "--gpus-per-node=8" in srun and "--cpus-per-task=12" in srun
    assert srun[srun.index(sys.executable) + 1:][:3] == ["megareuse/train.py", "--config", "configs/train/llama_1b.yaml"]
    assert "RANK = SLURM_PROCID 0..15" in out and "LOCAL_RANK = SLURM_LOCALID 0..7" in out
    assert "WORLD_SIZE = SLURM_NTASKS = 16" in out and f"MASTER_ADDR=gpu017 MASTER_PORT={PORT}" in out


def test_base_variables_and_overrides():
    env = script_env(DRY_RUN="1", CONFIG="configs/train/tiny_base.yaml", GPUS_PER_NODE="2",
                     MASTER_ADDR="10.0.0.7", MASTER_PORT="29411", RDZV_BACKEND="static",
                     NCCL_SOCKET_IFNAME="ib0", TRAIN_TOKENS="65536", OUT_DIR="/tmp/x",
                     **TWO_NODES)
    out = run_script("base_1b.sh", env).stdout
    cmd = torchrun_command(out)
    assert option(cmd, "--master_addr") == "10.0.0.7" and option(cmd, "--master_port") == "29411"
    assert option(cmd, "--nproc_per_node") == "2" and "--rdzv_backend" not in cmd
    assert cmd[cmd.index("megareuse/train.py") + 1:] == [
        "--config", "configs/train/tiny_base.yaml", "--resume", "auto", "run.out_dir=/tmp/x",
        "run.train_tokens=65536"]
    assert "export NCCL_SOCKET_IFNAME=ib0" in out


def test_master_from_scontrol_and_bash_fallback(tmp_path):
    bin_dir = fake_bin(tmp_path, scontrol='[[ $1 == show ]] && printf "node-a\\nnode-b\\n"\n')
    out = run_script("base_1b.sh", script_env(bin_dir, DRY_RUN="1", **TWO_NODES)).stdout
    assert option(torchrun_command(out), "--rdzv_endpoint") == f"node-a:{PORT}"
    for nodelist in ("gpu[017-018]", "a,b", "n[1,4-5],m", "node7", "rack1-n[08-12],x[1-2]"):
        proc = subprocess.run(["bash", "-c", f'source {SLURM_DIR}/common.sh; mr_first_host "$1"', "_", nodelist],
                              env=script_env(), capture_output=True, text=True, check=True)
        assert proc.stdout.strip() == expand_nodelist(nodelist)[0]


def test_fanout_dry_run_prints_the_node_step():
    env = script_env(DRY_RUN="1", FANOUT="1", **{**TWO_NODES, "SLURM_NODEID": "0"})
    out = run_script("base_1b.sh", env, "run.seed=7").stdout
    (srun,) = [c for c in commands(out) if c[0] == "srun"]
    assert "--ntasks=2" in srun and "--ntasks-per-node=1" in srun
    assert srun[-7:] == ["env", "-u", "NODE_RANK", "MEGAREUSE_NODE_STEP=1", "bash",
                         str(SLURM_DIR / "base_1b.sh"), "run.seed=7"]
    assert option(torchrun_command(out), "--node_rank") == "0"


def test_bad_layout_is_one_line_error():
    proc = run_script("base_1b.sh", script_env(DRY_RUN="1", **{**TWO_NODES, "SLURM_NODEID": "2"}), check=False)
    assert proc.returncode == 2 and "NODE_RANK=2" in proc.stderr
    proc = run_script("base_1b.sh", script_env(DRY_RUN="1", LAUNCHER="mpirun"), check=False)
    assert proc.returncode == 2 and "LAUNCHER=mpirun" in proc.stderr


FAKE_TORCHRUN = """echo "torchrun $*" >> "$LOG"
bash -c 'trap "echo worker-got-USR1 >> \\"$LOG\\"; exit 3" USR1; echo worker-started >> "$LOG"; while :; do sleep 0.05; done' &
wait $!
"""


def test_usr1_is_forwarded_to_the_workers_then_requeued(tmp_path):
    """Not a dry run: the script starts a stand-in torchrun whose worker traps SIGUSR1."""
    log = tmp_path / "log"
    bin_dir = fake_bin(tmp_path, torchrun=FAKE_TORCHRUN, scontrol='[[ $1 == requeue ]] && echo "scontrol $*" >> "$LOG"\n')
    env = script_env(bin_dir, LOG=str(log), TORCHRUN=str(bin_dir / "torchrun"), SLURM_JOB_ID="4242",
                     SLURM_JOB_NODELIST="localhost", SLURM_NNODES="1", GPUS_PER_NODE="1",
                     OUT_DIR=str(tmp_path / "run"))
    proc = subprocess.Popen(["bash", str(SLURM_DIR / "base_1b.sh")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 20
    while not (log.exists() and "worker-started" in log.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=20)
    lines = log.read_text().splitlines()
    assert proc.returncode == 0, err
    (launch,) = [line for line in lines if line.startswith("torchrun")]
    assert launch.startswith("torchrun --nnodes 1 --node_rank 0 --nproc_per_node 1")
    assert "worker-got-USR1" in lines and "scontrol requeue 4242" in lines, lines
    assert "requeueing job 4242" in err


def test_fanout_runs_one_torchrun_per_node(tmp_path):
    """The batch step srun's the script once per node; each node step starts torchrun itself."""
    log = tmp_path / "log"
    bin_dir = fake_bin(
        tmp_path, torchrun='echo "torchrun $*" >> "$LOG"\n',
        srun='echo "srun $*" >> "$LOG"\nwhile [[ $1 == --* ]]; do shift; done\n'
             'for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_NODEID=$i "$@" & done\nwait\n')
    env = script_env(bin_dir, LOG=str(log), TORCHRUN=str(bin_dir / "torchrun"),
                     **{**TWO_NODES, "SLURM_NODEID": "0"})
    run_script("base_1b.sh", env)
    lines = log.read_text().splitlines()
    assert lines[0].startswith("srun ") and "MEGAREUSE_NODE_STEP=1" in lines[0]
    ranks = sorted(option(line.split(), "--node_rank") for line in lines if line.startswith("torchrun"))
    assert ranks == ["0", "1"]


# ------------------------------------------------------------------ cpt_1b.sh, grow_1b.sh
def test_cpt_dry_run():
    env = script_env(DRY_RUN="1", BASE_CKPT="runs/base_1b/checkpoints/step_00065536", REPLAY="0.1",
                     KEEP_OPTIMIZER="1", **TWO_NODES)
    cmd = torchrun_command(run_script("cpt_1b.sh", env, "run.seed=5").stdout)
    train = cmd[cmd.index("megareuse/train.py") + 1:]
    assert option(train, "--init-from") == "runs/base_1b/checkpoints/step_00065536"
    assert "--keep-optimizer" in train and option(train, "--resume") == "auto"
    assert {"run.out_dir=runs/cpt_1b", "run.train_tokens=2147483648", "data.train={code: 1.0}",
            "data.replay=0.1", "schedule.warmup_steps=250"} <= set(train) and train[-1] == "run.seed=5"
    assert option(cmd, "--nnodes") == "2" and option(cmd, "--node_rank") == "1"
    assert_torchrun_passes_through(cmd)
    proc = run_script("cpt_1b.sh", script_env(DRY_RUN="1"), check=False)
    assert proc.returncode == 2 and "BASE_CKPT is not set" in proc.stderr


def test_grow_dry_run():
    env = script_env(DRY_RUN="1", BASE_CKPT="runs/base_1b/checkpoints/step_00065536", WIDTH="2",
                     DEPTH="1", **TWO_NODES)
    out = run_script("grow_1b.sh", env).stdout
    (grow,) = [c for c in commands(out) if "grow" in c]
    assert grow[:4] == [sys.executable, "-m", "megareuse.cli", "grow"]
    assert option(grow, "--from") == "runs/base_1b/checkpoints/step_00065536"
    assert option(grow, "--out") == "runs/grow_1b/grown_init" and option(grow, "--width") == "2"
    cmd = torchrun_command(out)
    train = cmd[cmd.index("megareuse/train.py") + 1:]
    assert option(train, "--init-from") == "runs/grow_1b/grown_init"
    assert {"model.d_model=4096", "model.n_heads=64", "model.n_kv_heads=8", "model.ffn_hidden=11264"} <= set(train)
    assert not any(t.startswith("model.n_layers") for t in train)
    assert_torchrun_passes_through(cmd)


def test_grown_overrides_match_the_planner():
    exp = load_experiment(DEMO)
    stack_trunk = next(r for r in plan_experiment(exp) if r.series == "stack" and r.run_id.endswith("trunk"))
    planned = [o for o in stack_trunk.overrides if o.startswith("model.")]
    cfg = REPO / "configs" / "train" / "tiny_base.yaml"
    assert grown_overrides(cfg, {"depth": 2}) == planned == ["model.n_layers=6"]


# ------------------------------------------------------------------ sweep_array.sh
def test_sweep_array_picks_the_task_line(tmp_path):
    runs = tmp_path / "wave.runs"
    runs.write_text("base/trunk\ttrain\nbase/D=262144\ttrain\nstack/D1=262144/grown\tgrow\n")
    (tmp_path / "overrides.txt").write_text("data.train={prose: 1.0}\n")
    base = dict(DRY_RUN="1", EXP="/x/exp.yaml", ROOT="/x/root", RUNS_FILE=str(runs), DP="16",
                OVERRIDES_FILE=str(tmp_path / "overrides.txt"), **TWO_NODES)
    out = run_script("sweep_array.sh", script_env(SLURM_ARRAY_TASK_ID="1", **base)).stdout
    cmd = torchrun_command(out)
    assert option(cmd, "--nnodes") == "2" and option(cmd, "--node_rank") == "1"
    sweep = cmd[len(cmd) - 1 - cmd[::-1].index("-m"):]  # after the last -m
    assert sweep == ["-m", "megareuse.sweep.slurm", "task", "--config", "/x/exp.yaml", "--out", "/x/root",
                     "--dp", "16", "--run-id", "base/D=262144", "data.train={prose: 1.0}"]
    assert_torchrun_passes_through(cmd)
    out = run_script("sweep_array.sh", script_env(SLURM_ARRAY_TASK_ID="2", **{**base, "SLURM_NODEID": "0"})).stdout
    (grow,) = [c for c in commands(out) if "megareuse.sweep.slurm" in c]
    assert grow[0] == sys.executable and option(grow, "--run-id") == "stack/D1=262144/grown"
    proc = run_script("sweep_array.sh", script_env(SLURM_ARRAY_TASK_ID="3", **base), check=False)
    assert proc.returncode == 2 and "TASK_ID=3" in proc.stderr


# ------------------------------------------------------------------ write_slurm
@pytest.fixture(scope="module")
def demo_runs():
    return plan_experiment(load_experiment(DEMO), dp=8)


def read_arrays(script_dir: Path) -> dict[str, list[str]]:
    return {p.name: [line.split("\t")[0] for line in p.read_text().splitlines()]
            for p in sorted(script_dir.glob("wave*.runs"))}


def test_waves_respect_dependencies(demo_runs):
    level = {r.run_id: w for w, members in enumerate(waves(demo_runs)) for r in members}
    assert set(level) == {r.run_id for r in demo_runs}
    for run in demo_runs:
        assert all(level[d] < level[run.run_id] for d in run.depends_on)
    assert all(j.kind == "grow" for j in array_jobs(demo_runs) if j.runs[0].kind == "grow")


def test_waves_reject_unknown_dependencies_and_cycles(demo_runs):
    import dataclasses

    a, b = demo_runs[0], demo_runs[1]
    with pytest.raises(SweepError, match="not in the plan"):
        waves([dataclasses.replace(a, depends_on=["nowhere"])])
    with pytest.raises(SweepError, match="cycle"):
        waves([dataclasses.replace(a, depends_on=[b.run_id]), dataclasses.replace(b, depends_on=[a.run_id])])
    orphan = dataclasses.replace(a, depends_on=["gone"])
    assert waves([orphan], done={"gone"}) == [[orphan]]  # a done dependency is no dependency


def test_write_slurm_submit_script_chains_dependencies(tmp_path, demo_runs):
    script_dir = tmp_path / "slurm"
    submit = write_slurm(demo_runs, DEMO, tmp_path / "root", script_dir, partition="gpu",
                         extra_overrides=["run.device=cpu"])
    arrays = read_arrays(script_dir)
    listed = [run_id for ids in arrays.values() for run_id in ids]
    assert sorted(listed) == sorted(r.run_id for r in demo_runs)  # every run exactly once
    assert subprocess.run(["bash", "-n", str(submit)]).returncode == 0
    if shutil.which("shellcheck"):
        proc = subprocess.run(["shellcheck", str(submit)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout
    out = subprocess.run(["bash", str(submit)], env=script_env(DRY_RUN="1"), capture_output=True,
                         text=True, check=True).stdout
    ids = dict(re.findall(r"^# (\w+) = (DRYRUN\d+)$", out, re.M))
    position = {}  # run id -> (placeholder job id, array index)
    by_id = {r.run_id: r for r in demo_runs}
    sbatch = [c for c in commands(out) if c[0] == "sbatch"]
    assert len(sbatch) == len(arrays) == len(ids)
    for cmd, job_id in zip(sbatch, ids.values()):
        export = dict(kv.split("=", 1) for kv in option_eq(cmd, "--export").split(",")[1:])
        members = arrays[Path(export["RUNS_FILE"]).name]
        assert option_eq(cmd, "--array") == f"0-{len(members) - 1}" and export["DP"] == "8"
        assert export["OVERRIDES_FILE"].endswith("overrides.txt") and "--partition=gpu" in cmd
        needed = {position[d] for r in members for d in by_id[r].depends_on}
        dep = option_eq(cmd, "--dependency")
        got = set() if dep is None else {tuple(t.rsplit("_", 1)) for t in dep.removeprefix("afterok:").split(":")}
        assert got == {(j, str(i)) for j, i in needed}  # exactly the tasks of earlier arrays it needs
        position.update({r: (job_id, i) for i, r in enumerate(members)})
        if by_id[members[0]].kind == "grow":
            assert "LAUNCHER" in export and "--gpus-per-node=1" in cmd
    assert "--dependency" not in " ".join(sbatch[0])


def option_eq(cmd: list[str], flag: str):
    found = [a.split("=", 1)[1] for a in cmd if a.startswith(flag + "=")]
    return found[0] if found else None


def test_submit_captures_parsable_ids(tmp_path, demo_runs):
    log = tmp_path / "sbatch.log"
    bin_dir = fake_bin(tmp_path, sbatch=f'n=$(( $(cat {tmp_path}/n 2>/dev/null || echo 700) + 1 ))\n'
                                        f'echo $n > {tmp_path}/n\necho "$*" >> {log}\necho "$n;cluster"\n')
    submit = write_slurm(demo_runs, DEMO, tmp_path / "root", tmp_path / "slurm")
    proc = subprocess.run(["bash", str(submit)], env=script_env(bin_dir), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    calls = log.read_text().splitlines()
    assert "--parsable" in calls[0] and "--dependency" not in calls[0]
    assert "--dependency=afterok:701_0:701_1" in calls[1]  # wave 1 after both wave-0 trunks
    assert (tmp_path / "slurm" / "logs").is_dir()


def test_write_slurm_skips_done_runs_and_checks_dp(tmp_path, demo_runs):
    root = tmp_path / "root"
    done = [r for r in demo_runs if r.run_id.startswith("base/")]
    for run in done:
        (root / run.run_id).mkdir(parents=True)
        (root / run.run_id / "summary.json").write_text(json.dumps({"finished": True}))
    write_slurm(demo_runs, DEMO, root, tmp_path / "slurm")
    listed = {run_id for ids in read_arrays(tmp_path / "slurm").values() for run_id in ids}
    assert listed == {r.run_id for r in demo_runs} - {r.run_id for r in done}
    text = (tmp_path / "slurm" / "submit.sh").read_text()
    assert "already done" in text
    with pytest.raises(SweepError, match="--dp 16"):
        write_slurm(demo_runs, DEMO, root, tmp_path / "s2", nodes=2, dp=8)


# ------------------------------------------------------------------ the 1.1B configs
def test_llama_1b_config_and_cluster_experiments():
    cfg = load_config(REPO / "configs" / "train" / "llama_1b.yaml")
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.run.dtype, cfg.run.device) == (2048, 22, "bf16", "cuda")
    for name in ("cpt_1b", "growth_1b"):
        exp = load_experiment(REPO / "configs" / "experiments" / f"{name}.yaml")
        for dp in (8, 16, 32):  # 1, 2, 4 nodes of 8 GPUs
            runs = plan_experiment(exp, dp=dp)
            assert len(runs) > 30
    exp = load_experiment(REPO / "configs" / "experiments" / "growth_1b.yaml")
    grown = next(r for r in plan_experiment(exp, dp=8) if r.series == "width_stack" and r.kind == "train")
    assert {"model.d_model=2048", "model.n_layers=22", "model.n_heads=32"} <= set(grown.overrides)


# ------------------------------------------------------------------ end to end (slow)
SBATCH_NOW = r"""set -euo pipefail
# stand-in sbatch: run every task of the array now, in order (submit.sh submits waves in
# dependency order), with the --export variables and a simulated one-node job environment
n=$(( $(cat "$STATE" 2>/dev/null || echo 500) + 1 )); echo "$n" > "$STATE"
array=""; exports=()
for a in "$@"; do
    case $a in
        --array=*) array=${a#--array=} ;;
        --export=*) IFS=, read -r -a exports <<<"${a#--export=}" ;;
    esac
done
for ((t = 0; t <= ${array#0-}; t++)); do
    env "${exports[@]:1}" SLURM_JOB_ID=$((n * 100 + t)) SLURM_ARRAY_TASK_ID=$t SLURM_JOB_NODELIST=localhost \
        SLURM_NNODES=1 SLURM_NODEID=0 bash "${!#}" >> "$TASK_LOG" 2>&1
done
echo "$n;cluster"
"""


@pytest.mark.slow
def test_sweep_on_simulated_slurm(tmp_path, prepared):
    """submit.sh -> sweep_array.sh -> torchrun (2 CPU ranks) -> megareuse sweep --run, every run
    of a small grid with a growth step, in dependency order; then the plan is done."""
    exp = tmp_path / "exp.yaml"
    exp.write_text(f"""name: e2e
train_config: {REPO}/configs/train/tiny_base.yaml
overrides: [data.dir={prepared}, model.vocab_size=512, run.micro_batch_size=8, run.eval_tokens=4096,
            run.eval_interval=100000, run.save_interval=100000, run.log_interval=100000,
            schedule.warmup_steps=4, run.threads=1]
base: {{domains: {{prose: 1.0}}, D1: [32768, 65536]}}
stage2:
  - {{name: stack, method: stack, domains: {{prose: 1.0}}, D1: [32768], D2: [16384], growth: {{depth: 2}}}}
""")
    runs = plan_experiment(load_experiment(exp), dp=2)
    submit = write_slurm(runs, exp, tmp_path / "root", tmp_path / "slurm", gpus_per_node=2)
    bin_dir = fake_bin(tmp_path, sbatch=SBATCH_NOW)
    env = script_env(bin_dir, STATE=str(tmp_path / "n"), TASK_LOG=str(tmp_path / "tasks.log"))
    env["TORCH_EXTENSIONS_DIR"] = os.environ.get("TORCH_EXTENSIONS_DIR", "")
    proc = subprocess.run(["bash", str(submit)], env={k: v for k, v in env.items() if v},
                          capture_output=True, text=True, timeout=500)
    log = (tmp_path / "tasks.log").read_text() if (tmp_path / "tasks.log").exists() else ""
    assert proc.returncode == 0, proc.stderr + log[-3000:]
    from megareuse.sweep.local import is_done

    assert all(is_done(tmp_path / "root", r) for r in runs), log[-3000:]
    assert "stage 2 (stack)" in log and "DP=2" in log


def test_task_entry_refuses_a_run_outside_the_plan_with_one_line(tmp_path):
    """`python -m megareuse.sweep.slurm task` (what the job arrays run) reports like the CLI."""
    proc = subprocess.run([sys.executable, "-m", "megareuse.sweep.slurm", "task", "--config", str(DEMO),
                           "--out", str(tmp_path / "root"), "--run-id", "no-such-run"],
                          cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("megareuse")]
    assert lines == [lines[0]] and lines[0].startswith("megareuse sweep: sweep error: --run 'no-such-run' "
                                                       "is not in the plan; accepted one of "), proc.stderr
    assert not (tmp_path / "root" / "no-such-run").exists()
