"""Benchmark of the law fitter: 100 runs, `reuse` form, 1,000 bootstrap resamples.

    python benchmarks/fit.py [--runs 100] [--resamples 1000] [--workers 2] [--single 30]

Targets (2 CPU cores): a single fit under 0.2 s; the 1,000-resample bootstrap under 60 s.
Prints the timings (wall and this process's CPU), the load average (other work on the machine
slows everything down) and the share of fits that converged.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from megareuse.law import bootstrap, fit_form, table_from_arrays

# Pilot-like scales (docs: D1 0.25M-4M, D2 0.125M-1M, losses 2-5 nats, seed noise ~0.0075 nats).
TRUTH = dict(A=1.8, a1=0.08, a2=0.25, a3=0.03, E=1.6)


def make_table(n_runs: int, seed: int, noise: float = 0.0075):
    side = int(round(np.sqrt(n_runs)))
    d1, d2 = (a.ravel() for a in np.meshgrid(np.geomspace(0.25e6, 4e6, side), np.geomspace(0.125e6, 1e6, n_runs // side)))
    x1, x2 = d1 / 1e6, d2 / 1e6
    loss = TRUTH["A"] * x1 ** -TRUTH["a1"] * x2 ** (-TRUTH["a2"] + TRUTH["a3"] * np.log(x1)) + TRUTH["E"]
    loss = loss + noise * np.random.default_rng(seed).standard_normal(len(loss))
    return table_from_arrays(loss, D1=d1, D2=d2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--single", type=int, default=30, help="single fits to time (different noise seeds)")
    args = ap.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")

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
    print(f"bootstrap: {args.resamples} resamples, {args.workers} workers: {wall:.1f} s wall "
          f"({1000 * wall * args.workers / args.resamples:.1f} ms per refit per worker); "
          f"converged {boot['n_converged']}/{args.resamples} ({100 * boot['n_converged'] / args.resamples:.1f}%)")
    print(f"  parent CPU {time.process_time() - c0:.1f} s; a3 = {law.params['a3']:.4f}, 90% interval "
          f"[{boot['intervals']['a3'][0]:.4f}, {boot['intervals']['a3'][1]:.4f}] (true {TRUTH['a3']})")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    ok = statistics.median(times) < 0.2 and wall < 60
    print("targets (single fit < 0.2 s, bootstrap < 60 s):", "met" if ok else "NOT met")


if __name__ == "__main__":
    main()
