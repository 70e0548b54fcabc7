"""Benchmark of the law fitter: imports, a single fit, `megareuse fit` end to end, the bootstrap.

    python benchmarks/fit.py [--runs 25] [--resamples 1000] [--workers 1] [--single 30]

Prints (wall seconds, and the load average: other work on the machine slows everything down):
  - the import time of what `megareuse fit` loads (a fresh interpreter, as the command pays it);
  - a single `reuse` fit (median and max over noise seeds);
  - `megareuse fit` with defaults end to end (a fresh process: imports, fit, E profile, 200
    resamples, form comparison, held-out check, per-D1 analysis, figures, files), and the same
    with `--bootstrap 1000`;
  - `bootstrap()` alone: 1,000 resamples on the same table.
Targets on 2 cores, 25 runs: defaults end to end under 5 s, with 1,000 resamples under 10 s.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# Pilot-like scales (docs: D1 0.25M-4M, D2 0.125M-1M, losses 2-5 nats, seed noise ~0.0075 nats).
TRUTH = dict(A=1.8, a1=0.08, a2=0.25, a3=0.03, E=1.6)
IMPORTS = ("import megareuse.cli, megareuse.law.commands, megareuse.law.fit, megareuse.law.resampling, "
           "megareuse.law.identify, megareuse.law.perd1, megareuse.law.validate, megareuse.law.report")


def make_arrays(n_runs: int, seed: int, noise: float = 0.0075):
    side = int(round(np.sqrt(n_runs)))
    d1, d2 = (a.ravel() for a in np.meshgrid(np.geomspace(0.25e6, 4e6, side), np.geomspace(0.125e6, 1e6, n_runs // side)))
    x1, x2 = d1 / 1e6, d2 / 1e6
    loss = TRUTH["A"] * x1 ** -TRUTH["a1"] * x2 ** (-TRUTH["a2"] + TRUTH["a3"] * np.log(x1)) + TRUTH["E"]
    return d1, d2, loss + noise * np.random.default_rng(seed).standard_normal(len(loss))


def make_table(n_runs: int, seed: int, noise: float = 0.0075):
    from megareuse.law import table_from_arrays
    d1, d2, loss = make_arrays(n_runs, seed, noise)
    return table_from_arrays(loss, D1=d1, D2=d2)


def write_csv(path: Path, n_runs: int) -> None:
    d1, d2, loss = make_arrays(n_runs, 0)
    with open(path, "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["run_id", "D1", "D2", "loss"])
        out.writerows([f"r{i}", a, b, c] for i, (a, b, c) in enumerate(zip(d1, d2, loss)))


def timed_process(args: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def end_to_end(n_runs: int, workers: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(tmp) / "runs.csv"
        write_csv(runs, n_runs)
        base = [sys.executable, "-m", "megareuse.cli", "fit", "--runs", str(runs), "--workers", str(workers)]
        t_imp = timed_process([sys.executable, "-c", IMPORTS])
        t_none = timed_process([sys.executable, "-c", "pass"])
        print(f"imports of `megareuse fit` (fresh interpreter): {t_imp:.2f} s ({t_imp - t_none:.2f} s over a bare "
              f"interpreter's {t_none:.2f} s)")
        t_def = timed_process(base + ["--out", str(Path(tmp) / "d")])
        t_1000 = timed_process(base + ["--bootstrap", "1000", "--out", str(Path(tmp) / "b")])
        print(f"`megareuse fit`, {n_runs} runs, defaults (200 resamples): {t_def:.2f} s end to end (target < 5 s)")
        print(f"`megareuse fit`, {n_runs} runs, --bootstrap 1000: {t_1000:.2f} s end to end (target < 10 s)")
        return t_def, t_1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=25)
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--single", type=int, default=30, help="single fits to time (different noise seeds)")
    args = ap.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    t_def, t_1000 = end_to_end(args.runs, args.workers)

    from megareuse.law import bootstrap, fit_form
    fit_form(make_table(args.runs, 0), "reuse")  # warm-up (imports, first calls)
    times, converged = [], 0
    for seed in range(args.single):
        table = make_table(args.runs, seed)
        t0 = time.perf_counter()
        law = fit_form(table, "reuse")
        times.append(time.perf_counter() - t0)
        converged += law.diagnostics["converged"]
    print(f"single fit ({args.runs} runs, reuse, {len(times)} noise seeds): median {statistics.median(times):.3f} s, "
          f"max {max(times):.3f} s; converged {converged}/{len(times)}")

    table = make_table(args.runs, 0)
    law = fit_form(table, "reuse")
    w0, c0 = time.perf_counter(), time.process_time()
    boot = bootstrap(table, law, args.resamples, seed=0, workers=args.workers)
    wall = time.perf_counter() - w0
    print(f"bootstrap: {args.resamples} resamples, {args.workers} worker(s): {wall:.2f} s wall "
          f"({1000 * wall * args.workers / args.resamples:.2f} ms per refit per worker); "
          f"converged {boot['n_converged']}/{args.resamples} ({100 * boot['n_converged'] / args.resamples:.1f}%)")
    print(f"  parent CPU {time.process_time() - c0:.1f} s; a3 = {law.params['a3']:.4f}, 90% interval "
          f"[{boot['intervals']['a3'][0]:.4f}, {boot['intervals']['a3'][1]:.4f}] (true {TRUTH['a3']})")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    ok = t_def < 5 and t_1000 < 10
    print("targets (defaults < 5 s, 1000 resamples < 10 s end to end):", "met" if ok else "NOT met")


if __name__ == "__main__":
    main()
