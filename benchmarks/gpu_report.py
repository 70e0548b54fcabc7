"""Helpers of benchmarks/gpu.sh: set the GPU machine up, prepare data, merge the results.

    python benchmarks/gpu_report.py setup --wheels .whl --env-json WORK_DIR/env.json
    python benchmarks/gpu_report.py prepare DATA_DIR --peers-file WORK_DIR/peers.txt
    python benchmarks/gpu_report.py report OUT --work WORK_DIR --rev REV --started ISO

(WORK_DIR: the work folder gpu.sh keeps inside its output folder OUT.)

``report`` reads what the steps left in the work folder (steps.tsv: name, status, exit code, wall
and timeout seconds; env.json; the pytest JUnit files; kernels.json; throughput-*.json; memory.log's
table) and writes OUT/gpu.json (everything merged) and OUT/gpu.md (the tables). Only measured
values are written; a step that did not run or failed is shown as such, never filled in.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

ENV_PROBE = r"""
import json, platform, sys
info = {"python": platform.python_version(), "executable": sys.executable}
try:
    import torch
    info["torch"] = torch.__version__
    info["cuda"] = torch.version.cuda
    info["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    info["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
        info["gpu_memory_mib"] = p.total_memory // 2**20
        info["capability"] = f"{p.major}.{p.minor}"
except Exception as exc:
    info["torch_error"] = f"{type(exc).__name__}: {exc}"
for mod in ("triton", "deepspeed", "transformers", "numpy", "pydantic", "megareuse", "megareuse_kernels"):
    try:
        info[mod] = getattr(__import__(mod), "__version__", "")
    except Exception as exc:
        info[mod] = None
        info[mod + "_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
print(json.dumps(info))
"""


def install_megareuse(shim: Path) -> int:
    """Make megareuse and megareuse_kernels (kernels/megareuse_kernels/) importable in every process,
    torchrun's children included (benchmarks/memory.py sets their PYTHONPATH to the repo alone):
    an editable install without dependencies, build isolation or the network; where that fails, a
    folder ``shim`` holding a link megareuse_kernels -> kernels/megareuse_kernels/ for PYTHONPATH."""
    probe = ("import megareuse, megareuse_kernels, pathlib; "
             "print(pathlib.Path(megareuse_kernels.__file__).resolve().parent)")
    got = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd="/", timeout=60)
    if got.returncode == 0 and Path(got.stdout.strip()) == (REPO / "kernels" / "megareuse_kernels").resolve():
        print("megareuse: already importable from this checkout")
        return 0
    proc = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "install", "-q", "--no-deps",
                           "--no-build-isolation", "--no-index", "-e", str(REPO)], timeout=120)
    if proc.returncode == 0:
        print("megareuse: installed editable (pip install --no-deps --no-build-isolation -e .)")
        return 0
    shim.mkdir(parents=True, exist_ok=True)
    link = shim / "megareuse_kernels"
    if not link.exists():
        link.symlink_to(REPO / "kernels" / "megareuse_kernels")
    print(f"megareuse: the editable install failed; megareuse_kernels through {shim} on PYTHONPATH "
          "(benchmarks/memory.py's ranks will not see it)")
    return 1


def cmd_setup(args) -> int:
    sys.path.insert(0, str(HERE))
    import wheels

    rc = wheels.install(Path(args.wheels), Path(args.target))
    rc = install_megareuse(Path(args.shim)) or rc
    env = dict(__import__("os").environ)
    for extra in (args.target, args.shim):
        if Path(extra).is_dir():
            env["PYTHONPATH"] = f"{env.get('PYTHONPATH', '')}:{extra}"
    probe = subprocess.run([sys.executable, "-c", ENV_PROBE], capture_output=True, text=True, env=env, timeout=60)
    try:
        info = json.loads(probe.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        info = {"probe_error": (probe.stdout + probe.stderr)[-2000:]}
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=15)
        info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        info["nvidia_smi"] = f"unavailable ({type(exc).__name__})"
    Path(args.env_json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.env_json).write_text(json.dumps(info, indent=2))
    print(json.dumps(info, indent=2))
    return rc


def cmd_prepare(args) -> int:
    sys.path.insert(0, str(REPO))
    from megareuse.data.preprocess import prepare_default

    data = Path(args.data)
    t0 = time.perf_counter()
    prepare_default(data, domains=["prose"], vocab_size=2048, progress=False)
    print(f"prepared {data} in {time.perf_counter() - t0:.1f} s")
    peers = ["megareuse", "bare", "hf", "torchtitan"]
    sys.path.insert(0, str(HERE))
    import torch
    import train_throughput as tt

    cfg = tt.model_config("tiny", data, "cpu", [], 32, 2, 1)
    for peer, package in (("hf", "transformers"), ("torchtitan", "torchtitan")):
        try:  # the peer must build and run a Llama of megareuse's shape here, or it is left out
            model, loss_fn = tt.BUILDERS[peer](cfg)
            loss = loss_fn(model, torch.randint(0, cfg.model.vocab_size, (2, 33)))
            loss.backward()
            assert math.isfinite(float(loss)), loss
            print(f"{peer} peer: ok ({package} {metadata.version(package)})")
        except Exception as exc:  # any reason at all: measure the others
            peers.remove(peer)
            print(f"{peer} peer: left out ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
    Path(args.peers_file).parent.mkdir(parents=True, exist_ok=True)
    Path(args.peers_file).write_text(",".join(peers) + "\n")
    print("peers:", ",".join(peers))
    return 0


# ------------------------------------------------------------------ report
def read_steps(work: Path) -> list[dict]:
    steps = []
    path = work / "steps.tsv"
    if not path.exists():
        return steps
    for line in path.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) < 5:
            continue
        name, status, rc, wall, timeout = parts[:5]
        steps.append({"step": name, "status": status, "rc": int(rc) if rc.strip() else None,
                      "wall_s": float(wall) if wall else None, "timeout_s": int(timeout)})
    return steps


def read_junit(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        return {"error": f"unreadable JUnit file: {exc}"}
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    out = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "time_s": 0.0, "failed": []}
    for s in suites:
        for key in ("tests", "failures", "errors", "skipped"):
            out[key] += int(s.get(key, 0))
        out["time_s"] += float(s.get("time", 0.0))
        for case in s.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                out["failed"].append(f"{case.get('classname')}::{case.get('name')}")
    out["passed"] = out["tests"] - out["failures"] - out["errors"] - out["skipped"]
    return out


def read_json(path: Path):
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        return {"error": f"unreadable JSON: {exc}"}


def memory_table(log: Path) -> list[str]:
    """memory.py's closing table, else (it was stopped) the per-point lines it printed on the way."""
    if not log.exists():
        return []
    lines = log.read_text(errors="replace").splitlines()
    table = [line for line in lines if line.startswith("|")]
    return table or [f"- {line}" for line in lines if ": peak RSS per rank" in line]


def fmt(v, spec: str, empty: str = "-") -> str:
    return format(v, spec) if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)) else empty


def markdown(res: dict) -> str:
    env = res.get("env") or {}
    lines = [f"# GPU run {res['date']}", "",
             f"- device: {env.get('gpu', 'unknown')} ({env.get('nvidia_smi', '')})",
             f"- torch {env.get('torch')}, CUDA {env.get('cuda')}, triton {env.get('triton')}, deepspeed "
             f"{env.get('deepspeed')}, transformers {env.get('transformers')}, Python {env.get('python')}",
             f"- revision {res['revision']}; started {res['started']}; wall {fmt(res['wall_s'], '.0f')} s",
             "", "## Steps", "", "| step | status | wall s | timeout s |", "|---|---|---:|---:|"]
    for s in res["steps"]:
        lines.append(f"| {s['step']} | {s['status']} | {fmt(s['wall_s'], '.1f')} | {s['timeout_s']} |")
    for key in ("tests-kernels", "tests-train"):
        t = res["tests"].get(key)
        if t and "tests" in t:
            lines.append("")
            lines.append(f"{key}: {t['passed']} passed, {t['failures'] + t['errors']} failed, {t['skipped']} skipped "
                         f"({t['time_s']:.0f} s)" + (": " + ", ".join(t["failed"]) if t["failed"] else ""))
    k = res.get("kernels")
    if k and "results" in k:
        lines += ["", f"## Kernels ({k.get('device')}, {k.get('dtype')}, median of {k.get('reps')})", "",
                  "| kernel | shape | mode | impl | ms | TFLOP/s or GB/s | % peak | speedup | vs best SDPA | peak MiB |",
                  "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in k["results"]:
            if "ms" not in r:
                lines.append(f"| {r.get('kernel')} | {r.get('shape')} | {r.get('mode')} | {r.get('impl')} | "
                             f"unavailable: {r.get('error', '')} | | | | | |")
                continue
            rate = r.get("tflops") or r.get("gbps")
            lines.append(f"| {r.get('kernel')} | {r.get('shape')} | {r.get('mode')} | {r.get('impl')} | "
                         f"{fmt(r['ms'], '.3f')} | {fmt(rate, '.1f')} | {fmt(r.get('pct_peak'), '.1f')} | "
                         f"{fmt(r.get('speedup'), '.2f')} | {fmt(r.get('speedup_vs_best_sdpa'), '.2f')} | "
                         f"{fmt(r.get('peak_mib'), '.0f')} |")
        for name, v in (k.get("targets") or {}).items():
            lines.append(f"- target {name}: {'PASS' if v else ('not measured' if v is None else 'FAIL')}")
    pts = res.get("throughput") or []
    if pts:
        lines += ["", "## Training throughput", "",
                  "| model | seq x batch | impl | tokens/s | MFU | peak MiB | megareuse / impl |",
                  "|---|---|---|---:|---:|---:|---:|"]
        for pt in pts:
            ours = pt["results"].get("megareuse", {}).get("tokens_per_s")
            for peer, r in pt["results"].items():
                shape = f"{pt.get('seq_len')} x {pt.get('micro_batch')}"
                if "skipped" in r or "tokens_per_s" not in r:
                    why = r.get("skipped") or ("no run" if pt.get("complete", True) else "not run: the step ended first")
                    lines.append(f"| {pt['model']} | {shape} | {peer} | skipped: {why} | | | |")
                    continue
                ratio = f"{ours / r['tokens_per_s']:.2f}" if ours and r["tokens_per_s"] else "-"
                lines.append(f"| {pt['model']} | {shape} | {peer} | {r['tokens_per_s']:,.0f} | "
                             f"{fmt(100 * r['mfu'] if r.get('mfu') else None, '.1f')}% | "
                             f"{fmt(r.get('peak_mib'), ',.0f')} | {ratio} |")
    if res.get("memory_table"):
        lines += ["", "## Memory (benchmarks/memory.py: CPU gloo ranks, peak RSS)", ""] + res["memory_table"]
    return "\n".join(lines) + "\n"


def cmd_report(args) -> int:
    out, work = Path(args.out), Path(args.work)
    throughput = []
    for path in sorted(work.glob("throughput-*.json")):
        got = read_json(path) or {}
        # a step killed at its timeout leaves the runs it finished (the file says complete: false)
        throughput += [{**pt, "complete": got.get("complete", True)} for pt in got.get("points", [])]
    res = {
        "date": time.strftime("%Y-%m-%d"), "started": args.started, "revision": args.rev,
        "wall_s": args.wall_so_far, "env": read_json(work / "env.json"),
        "steps": read_steps(work),
        "tests": {k: read_junit(work / f"{k}.xml") for k in ("tests-kernels", "tests-train")},
        "peers": (work / "peers.txt").read_text().strip() if (work / "peers.txt").exists() else None,
        "kernels": read_json(work / "kernels.json"),
        "throughput": throughput,
        "throughput_raw": {p.stem: read_json(p) for p in sorted(work.glob("throughput-*.json"))},
        "memory_table": memory_table(work / "memory.log"),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(res, indent=2))
    (out / "gpu.md").write_text(markdown(res))
    print(f"wrote {out / 'gpu.json'} and {out / 'gpu.md'}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("setup")
    s.add_argument("--wheels", default=str(REPO / ".whl"))
    s.add_argument("--target", default=str(REPO / ".whl-site"))
    s.add_argument("--shim", default=str(REPO / ".gpu-path"))
    s.add_argument("--env-json", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("data")
    p.add_argument("--peers-file", required=True)
    r = sub.add_parser("report")
    r.add_argument("out")
    r.add_argument("--work", required=True)
    r.add_argument("--rev", default="unknown")
    r.add_argument("--started", default="")
    r.add_argument("--wall-so-far", type=float, default=None)
    args = ap.parse_args(argv)
    return {"setup": cmd_setup, "prepare": cmd_prepare, "report": cmd_report}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
