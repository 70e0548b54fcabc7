"""Throughput and peak memory of `megareuse prepare` next to two other ways to tokenize the same
jsonl corpus with the same tokenizer, in one invocation.

    python benchmarks/prepare.py [--mb 200] [--workers 1,2] [--work DIR] [--json FILE]
                                 [--only megareuse,baseline,datasets] [--sp-threads N]

Pipelines, each in its own measured subprocess:

* ``megareuse``: ``megareuse prepare --input bench=FILE --tokenizer TOK --workers N`` (the CLI);
* ``baseline``: one process reading the jsonl line by line, ``json.loads``, ``encode``, ids + EOS
  appended to a .bin (the obvious hand-written loop);
* ``datasets``: HF ``load_dataset("json", data_files=FILE)`` + ``.map(batched=True, num_proc=N)``
  calling the same ``Tokenizer.encode`` (offline, its cache under ``--work``, deleted before each
  run so every run does the whole work; it ends with Arrow cache files, not a .bin).

The input is built deterministically from this interpreter's stdlib and site-packages sources
(a document per ``.py`` file, cycled with a copy number until ``--mb`` MB) and cached under
``--work``; the tokenizer (sentencepiece, vocabulary 2048) is trained once on its first 8 MB with
``megareuse.data.train_tokenizer``. A wrapper process runs each pipeline and reports its wall
time, the peak RSS of its largest process (``getrusage(RUSAGE_CHILDREN).ru_maxrss``: the max over
the pipeline process and every worker it reaped) and the peak of the summed RSS and PSS of the
whole process tree (``/proc`` sampled every 0.2 s). The token totals of all pipelines must agree
(megareuse: train + valid); the check is printed, targets are reported, never asserted.
``--sp-threads 1`` makes every sentencepiece processor single-threaded (its batch encode, used by
``Tokenizer.encode`` for long texts, otherwise uses every core even in "one" process).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
MB = 1_000_000
MAX_DOC_BYTES = 256_000
TOKENIZER_SAMPLE = 8 * MB
PIPELINES = ("baseline", "megareuse", "datasets")
# --sp-threads: imported at startup by every process of a pipeline (PYTHONPATH), it makes each
# sentencepiece processor use that many threads (its default, -1, uses every core in the batch
# encode that Tokenizer.encode calls for texts over 2,000 characters)
SHIM = """import os
import sentencepiece
_init = sentencepiece.SentencePieceProcessor.__init__
def __init__(self, *args, **kwargs):
    kwargs.setdefault("num_threads", int(os.environ["BENCH_SP_THREADS"]))
    _init(self, *args, **kwargs)
sentencepiece.SentencePieceProcessor.__init__ = __init__
"""


# --------------------------------------------------------------------------- input + tokenizer
def source_files():
    """Every .py file of the stdlib, then of site-packages, in a fixed (sorted) order."""
    for root in dict.fromkeys([sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"]]):
        yield from sorted(p for p in Path(root).rglob("*.py") if p.is_file())


def make_input(work: Path, mb: int) -> Path:
    """``work/input-<mb>mb.jsonl`` ({"id", "text"} per line, about ``mb`` MB), built once."""
    path = work / f"input-{mb}mb.jsonl"
    if path.exists():
        return path
    tmp, size, n, copy = path.with_suffix(".tmp"), 0, 0, 0
    with open(tmp, "w", encoding="utf-8") as out:
        while size < mb * MB:
            for file in source_files():
                text = file.read_bytes()[:MAX_DOC_BYTES].decode("utf-8", "replace")
                if not text.strip():
                    continue
                line = json.dumps({"id": n, "text": f"# copy {copy}: {file.name}\n{text}"}) + "\n"
                out.write(line)
                size, n = size + len(line), n + 1
                if size >= mb * MB:
                    break
            copy += 1
    tmp.rename(path)
    return path


def make_tokenizer(work: Path, data: Path) -> Path:
    """A sentencepiece model (vocabulary 2048) trained on the first 8 MB of ``data``, cached."""
    prefix = work / f"{data.stem}.tokenizer"
    model = Path(f"{prefix}.model")
    if not model.exists():
        from megareuse.data import train_tokenizer
        texts, used = [], 0
        with open(data, encoding="utf-8") as f:
            for line in f:
                texts.append(json.loads(line)["text"])
                used += len(line)
                if used >= TOKENIZER_SAMPLE:
                    break
        train_tokenizer(texts, prefix, 2048, seed=0)
    return model


# --------------------------------------------------------------------------- the pipelines
def run_baseline(data: Path, tokenizer: Path, out: Path) -> dict:
    import numpy as np
    from megareuse.data import Tokenizer
    tok, docs, tokens = Tokenizer(tokenizer), 0, 0
    with open(data, encoding="utf-8") as f, open(out / "baseline.bin", "wb") as bin_file:
        for line in f:
            if not line.strip():
                continue
            ids = tok.encode(json.loads(line)["text"])
            ids.append(tok.eos_id)
            bin_file.write(np.asarray(ids, np.uint16).tobytes())
            docs, tokens = docs + 1, tokens + len(ids)
    return {"documents": docs, "tokens": tokens}


class Encode:
    """The datasets map function: ids + EOS per text. Pickles as its path (the tokenizer loads
    lazily in each worker), so datasets can hash it and send it to ``num_proc`` workers."""

    def __init__(self, path: str):
        self.path, self.tok = path, None

    def __getstate__(self):
        return {"path": self.path, "tok": None}

    def __call__(self, batch: dict) -> dict:
        if self.tok is None:
            from megareuse.data import Tokenizer
            self.tok = Tokenizer(self.path)
        ids = [self.tok.encode(text) + [self.tok.eos_id] for text in batch["text"]]
        return {"input_ids": ids, "n": [len(x) for x in ids]}


def run_datasets(data: Path, tokenizer: Path, out: Path, workers: int) -> dict:
    import datasets
    import pyarrow.compute as pc
    datasets.disable_progress_bars()
    ds = datasets.load_dataset("json", data_files=str(data), split="train", cache_dir=str(out / "hf_cache"))
    mapped = ds.map(Encode(str(tokenizer)), batched=True, num_proc=workers if workers > 1 else None,
                    remove_columns=ds.column_names)
    return {"documents": len(mapped), "tokens": int(pc.sum(mapped.data.column("n")).as_py())}


def pipeline_command(name: str, data: Path, tokenizer: Path, out: Path, workers: int) -> list[str]:
    if name == "megareuse":
        return [sys.executable, "-m", "megareuse.cli", "prepare", "--input", f"bench={data}",
                "--tokenizer", str(tokenizer), "--workers", str(workers), "--out", str(out / "prepared")]
    return [sys.executable, __file__, "--_pipeline", name, "--_data", str(data), "--_tokenizer", str(tokenizer),
            "--_out", str(out), "--workers", str(workers)]


def pipeline_main(args) -> None:
    """Inside the measured subprocess: run one pipeline, write its counts to ``_out/result.json``."""
    data, tok, out = Path(args._data), Path(args._tokenizer), Path(args._out)
    result = run_baseline(data, tok, out) if args._pipeline == "baseline" else \
        run_datasets(data, tok, out, int(args.workers))
    (out / "result.json").write_text(json.dumps(result))


# --------------------------------------------------------------------------- measuring
def tree_memory(root: int) -> tuple[int, int, int]:
    """(processes, summed VmRSS KiB, summed Pss KiB) of ``root`` and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                ppid = int(Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    todo, n, rss, pss = [root], 0, 0, 0
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            rss += next(int(l.split()[1]) for l in Path(f"/proc/{pid}/status").read_text().splitlines()
                        if l.startswith("VmRSS:"))
            pss += next(int(l.split()[1]) for l in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
                        if l.startswith("Pss:"))
            n += 1
        except (OSError, StopIteration):
            pass  # exited, or a kernel thread without memory
    return n, rss, pss


def measure_main(spec: str) -> None:
    """The wrapper process: run ``spec``'s command as our only child, print its measurements."""
    spec = json.loads(spec)
    peaks, done = {"processes": 0, "rss_sum_kib": 0, "pss_sum_kib": 0}, threading.Event()
    with open(spec["log"], "w") as log:
        started = time.perf_counter()
        proc = subprocess.Popen(spec["cmd"], stdout=log, stderr=subprocess.STDOUT, env=spec["env"])

        def sample():
            while not done.wait(0.2):
                for key, value in zip(peaks, tree_memory(proc.pid)):
                    peaks[key] = max(peaks[key], value)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        rc = proc.wait()
        wall = time.perf_counter() - started
        done.set()
        sampler.join()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # ru_maxrss in KiB on Linux
    print(json.dumps({"rc": rc, "wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
                      "max_rss_kib": usage.ru_maxrss, **peaks}))


def measure(name: str, workers: int, data: Path, tokenizer: Path, work: Path, sp_threads: int) -> dict:
    out = work / "runs" / f"{name}-w{workers}"
    shutil.rmtree(out, ignore_errors=True)  # a fresh output and HF cache each run
    out.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(out / "hf_home"),
           "HF_DATASETS_CACHE": str(out / "hf_cache"), "TOKENIZERS_PARALLELISM": "false"}
    if sp_threads:
        (work / "shim").mkdir(exist_ok=True)
        (work / "shim" / "sitecustomize.py").write_text(SHIM)
        env.update(PYTHONPATH=f"{work / 'shim'}{os.pathsep}{env['PYTHONPATH']}", BENCH_SP_THREADS=str(sp_threads))
    spec = {"cmd": pipeline_command(name, data, tokenizer, out, workers), "env": env, "log": str(out / "log.txt")}
    proc = subprocess.run([sys.executable, __file__, "--_measure", json.dumps(spec)], capture_output=True,
                          text=True, check=True)
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    if m["rc"] != 0:
        raise SystemExit(f"{name} (workers {workers}) failed, rc {m['rc']}:\n"
                         + (out / "log.txt").read_text()[-3000:])
    if name == "megareuse":
        info = json.loads((out / "prepared" / "prepare.json").read_text())["domains"]["bench"]
        counts = {"documents": info["train"]["documents"] + info["valid"]["documents"],
                  "tokens": info["train"]["tokens"] + info["valid"]["tokens"]}
    else:
        counts = json.loads((out / "result.json").read_text())
    shutil.rmtree(out, ignore_errors=True)  # outputs of a 2 GB input are GBs
    size = data.stat().st_size
    return {"pipeline": name, "workers": workers, **counts, "wall_s": round(m["wall_s"], 2),
            "cpu_s": round(m["cpu_s"], 2), "mb_per_s": round(size / MB / m["wall_s"], 2),
            "tokens_per_s": round(counts["tokens"] / m["wall_s"]),
            "peak_rss_max_process_mib": round(m["max_rss_kib"] / 1024, 1),
            "peak_rss_sum_mib": round(m["rss_sum_kib"] / 1024, 1), "peak_pss_sum_mib": round(m["pss_sum_kib"] / 1024, 1),
            "peak_processes": m["processes"]}


# --------------------------------------------------------------------------- report
def header(argv: list[str], data: Path) -> dict:
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "cpus": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)), "load_avg_1m": round(os.getloadavg()[0], 2),
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "python": platform.python_version(), "input": str(data), "input_mb": round(data.stat().st_size / MB, 1),
            "command": shlex.join(["python", "benchmarks/prepare.py", *argv])}


def table(rows: list[dict]) -> str:
    cols = [("pipeline", "pipeline", "{}"), ("workers", "workers", "{}"), ("wall s", "wall_s", "{:.1f}"), ("CPU s", "cpu_s", "{:.1f}"),
            ("MB/s", "mb_per_s", "{:.2f}"), ("tokens/s", "tokens_per_s", "{:,}"),
            ("peak RSS max process MiB", "peak_rss_max_process_mib", "{:.0f}"),
            ("peak RSS sum MiB", "peak_rss_sum_mib", "{:.0f}"), ("peak PSS sum MiB", "peak_pss_sum_mib", "{:.0f}"),
            ("tokens", "tokens", "{:,}")]
    lines = ["| " + " | ".join(c[0] for c in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(fmt.format(r[key]) for _, key, fmt in cols) + " |" for r in rows]
    return "\n".join(lines)


def summary(rows: list[dict]) -> list[str]:
    def rate(name, w):
        return next((r["mb_per_s"] for r in rows if r["pipeline"] == name and r["workers"] == w), None)
    totals = {f"{r['pipeline']} w{r['workers']}": r["tokens"] for r in rows}
    agree = len(set(totals.values())) == 1
    verdict = ("agree" if agree else "DIFFER") if len(totals) > 1 else "(one pipeline, nothing to compare)"
    lines = [f"token totals {verdict}: " + ", ".join(f"{k} {v:,}" for k, v in totals.items())]
    workers = sorted({r["workers"] for r in rows if r["pipeline"] == "megareuse"})
    if len(workers) > 1 and rate("megareuse", workers[0]):
        lo, hi = workers[0], workers[-1]
        lines.append(f"megareuse speed-up workers {lo} -> {hi}: {rate('megareuse', hi) / rate('megareuse', lo):.2f}x "
                     f"(linear: {hi / lo:.2f}x)")
    for w in workers:
        if rate("datasets", w):
            ratio = rate("megareuse", w) / rate("datasets", w)
            lines.append(f"megareuse / datasets throughput at workers {w}: {ratio:.2f}x "
                         f"(target >= 1: {'met' if ratio >= 1 else 'missed'})")
    for r in rows:
        if r["pipeline"] == "megareuse":
            ok = r["peak_rss_max_process_mib"] < 1024
            lines.append(f"megareuse w{r['workers']}: largest process {r['peak_rss_max_process_mib']:.0f} MiB "
                         f"(target < 1024 MiB: {'met' if ok else 'missed'})")
    return lines


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    ap.add_argument("--mb", type=int, default=200, help="input size in MB (10^6 bytes; default 200)")
    ap.add_argument("--workers", default="1,2", help="worker counts for megareuse and datasets (default 1,2)")
    ap.add_argument("--only", default=",".join(PIPELINES), help="pipelines to run, comma-separated")
    ap.add_argument("--work", default="/tmp/megareuse-bench-prepare", help="input, tokenizer and run directory")
    ap.add_argument("--sp-threads", type=int, default=0, metavar="N",
                    help="threads per sentencepiece processor in every pipeline (default: its own, all cores)")
    ap.add_argument("--json", default=None, metavar="FILE", help="write the header and figures here")
    for hidden in ("--_measure", "--_pipeline", "--_data", "--_tokenizer", "--_out"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._measure:
        return measure_main(args._measure)
    if args._pipeline:
        return pipeline_main(args)
    only = args.only.split(",")
    if set(only) - set(PIPELINES):
        ap.error(f"--only {args.only}: accepted a comma-separated subset of {', '.join(PIPELINES)}")
    workers = [int(w) for w in args.workers.split(",")]
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    data = make_input(work, args.mb)
    tokenizer = make_tokenizer(work, data)
    head = {**header(argv, data), "sp_threads": args.sp_threads or "sentencepiece default (all cores)"}
    for key, value in head.items():
        print(f"{key}: {value}")
    plan = [(n, w) for n in PIPELINES if n in only for w in ([1] if n == "baseline" else workers)]
    rows = []
    for name, w in plan:
        rows.append(measure(name, w, data, tokenizer, work, args.sp_threads))
        print(f"  {name} w{w}: {rows[-1]['wall_s']:.1f} s", flush=True)
    print(table(rows))
    checks = summary(rows)
    checks.append(f"load average (1 min) at the start {head['load_avg_1m']}, at the end {os.getloadavg()[0]:.2f}")
    print("\n".join(checks))
    if args.json:
        Path(args.json).write_text(json.dumps({**head, "runs": rows, "checks": checks}, indent=2) + "\n")


if __name__ == "__main__":
    main()
