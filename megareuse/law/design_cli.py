"""`megareuse design`: how wide will a3's interval be, will E be identified, and what does it cost?

    megareuse design --config EXP.yaml (--prior law.json | --prior-params A=..,a1=..,a2=..,a3=..,E=..)
                     --noise SIGMA [--a3 X] [--tokens-unit 1e6] [--sims 10] [--resamples 25]
                     [--level 0.9] [--seed 0] [--workers 2] [--series cpt,stack]
                     [--variants given,d2x2,d2x4,d1+1,seeds] [--mfu 0.4] [--peak-tflops 989] --out DIR

Simulates each stage-2 series of the planned grid, and of each variant grid (design_grid.py),
from the prior (design.py); prints a table per series and writes DIR/design.json. A user error is
one line on stderr and exit code 2, before anything is simulated or written.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Optional

import numpy as np

from megareuse.law.data import LawError

SCHEMA = "megareuse.design/1"


def run_design(config, prior, noise: float, sims: int = 10, resamples: int = 25, level: float = 0.9,
               seed: int = 0, workers: int = 1, series: Optional[list[str]] = None,
               variants=None, mfu: float = 0.4, peak_tflops: float = 989.0, progress=None) -> dict:
    """The whole design in memory: grids, per-table summaries and rankings (design.json's content)."""
    from megareuse.law.design import check_settings, simulate_grids
    from megareuse.law.design_grid import VARIANTS, build_grids, rank
    from megareuse.paths import check_input
    from megareuse.sweep.grid import load_experiment
    check_settings(noise, sims, resamples, level, seed, workers)
    for name, value, hi in (("--mfu", mfu, 1.0), ("--peak-tflops", peak_tflops, float("inf"))):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= hi:
            raise LawError(f"{name} = {value!r}: accepted a number > 0" + (" and <= 1" if hi == 1.0 else ""))
    check_input(config, "file", "--config", "an experiment YAML file (configs/experiments/)", LawError)
    exp = load_experiment(config)
    grids, skipped = build_grids(exp, list(variants or VARIANTS))
    keys = list(grids[0].cells)
    if series:
        unknown = [s for s in series if s not in keys and s not in {k.split("/")[0] for k in keys}]
        if unknown:
            raise LawError(f"--series {unknown[0]!r}: accepted stage-2 series of {exp.name}: {', '.join(keys)}")
        keys = [k for k in keys if k in series or k.split("/")[0] in series]
    start = time.monotonic()
    jobs = [(g, k) for g in grids for k in keys]
    summaries = simulate_grids([g.cells[k] for g, k in jobs], prior, noise, sims, resamples, level, seed,
                               workers, progress)
    result = {g.name: {} for g in grids}
    for (g, k), s in zip(jobs, summaries):
        result[g.name][k] = s
    tables = {}
    for k in keys:
        rows = []
        for g in grids:
            s = result[g.name][k]
            cells = g.cells[k]
            rows.append({"name": g.name, "cells": len(cells), "runs": sum(c.repeats for c in cells),
                         "D1": g.spans[k]["D1"], "D2": g.spans[k]["D2"], "D2_span": g.spans[k]["D2_span"],
                         "width": s.width_median, "flops": g.flops, "tokens": g.tokens,
                         "gpu_hours": g.gpu_hours(mfu, peak_tflops), "summary": s.to_dict()})
        ranked = rank(rows)
        tables[k] = {"rows": rows, "best": ranked[0]["name"] if ranked[0]["rank"] else None,
                     "verdict": verdict(k, rows, ranked)}
    true = prior.params
    return {"schema": SCHEMA, "config": str(config), "experiment": exp.name,
            "prior": {"form": prior.form.name, "formula": prior.form.formula, "params": true,
                      "units": prior.units, "source": prior.data.get("law_file", prior.data.get("source", ""))},
            "true_a3": true["a3"], "noise": noise, "sims": sims, "resamples": resamples, "level": level,
            "seed": seed, "workers": workers,
            "cost_model": {"mfu": mfu, "peak_tflops": peak_tflops,
                           "gpu_hours": "FLOPs / (mfu * peak_tflops * 1e12) / 3600"},
            "grids": [{"name": g.name, "what": g.what, "n_runs": g.n_runs, "tokens": g.tokens, "flops": g.flops,
                       "gpu_hours": g.gpu_hours(mfu, peak_tflops), "spans": g.spans,
                       "series_cost": {k: {"tokens": t, "flops": f, "gpu_hours": g.gpu_hours(mfu, peak_tflops, f)}
                                       for k, (t, f) in g.series_cost.items()}} for g in grids],
            "tables": tables, "skipped": skipped, "wall_s": time.monotonic() - start}


def verdict(key: str, rows: list[dict], ranked: list[dict]) -> str:
    best = ranked[0]
    if best["rank"] is None:
        return f"{key}: no grid gives an a3 interval ({rows[0]['summary']['note'] or 'see the simulations'})"
    ref = next(r for r in rows if r["width"])
    line = f"{key}: most certainty per FLOP from {best['name']} (a3 width {best['width']:.3g}"
    if best is ref:
        line += f", {rows[0]['name']} gives no a3 interval)" if ref is not rows[0] else ")"
    else:
        line += (f", {best['flops'] / ref['flops']:.2f}x the FLOPs of {ref['name']}: "
                 f"{best['certainty_per_flop']:.2f}x its certainty per FLOP)")
    narrowest = min((r for r in rows if r["width"]), key=lambda r: r["width"])
    if narrowest is not best:
        line += f"; narrowest: {narrowest['name']} ({narrowest['width']:.3g})"
    close = [r["name"] for r in ranked[1:] if r["rank"] and _tied(best, r)]
    if close:
        line += (f"; {', '.join(close)} within one standard error of it (paired over the simulations): "
                 "rerun with more --sims to choose")
    return line


def _tied(a: dict, b: dict) -> bool:
    """Whether grids a and b differ in certainty per FLOP by less than one standard error. Simulation
    i of both draws the same noise for the cells they share, so the comparison is paired:
    d_i = ln w_b,i - ln w_a,i over the simulations where both have an interval; ln of a's
    certainty per FLOP over b's is 2 mean(d) + ln(F_b / F_a), with standard error 2 sd(d) / sqrt(n)."""
    width = [[None if o["interval"] is None else o["interval"][1] - o["interval"][0]
              for o in r["summary"]["outcomes"]] for r in (a, b)]
    d = np.array([math.log(wb / wa) for wa, wb in zip(*width) if wa and wb and wa > 0 and wb > 0])
    if len(d) < 3:
        return True
    gap = 2 * d.mean() + math.log(b["flops"] / a["flops"])
    return abs(gap) < 2 * d.std(ddof=1) / math.sqrt(len(d))


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _num(x, fmt="{:.3g}") -> str:
    return "-" if x is None else fmt.format(x)


def format_design(d: dict) -> str:
    p = d["prior"]
    params = ", ".join(f"{k}={v:.4g}" for k, v in p["params"].items())
    lines = [f"design of {d['config']} (experiment {d['experiment']})",
             f"prior: {p['formula']} with {params} (tokens in units of {p['units']['tokens']:g}; {p['source']})",
             f"noise: {d['noise']:g} in log loss per run; {d['sims']} simulations x {d['resamples']} bootstrap "
             f"resamples, {100 * d['level']:g}% intervals, seed {d['seed']}",
             f"cost: GPU-hours = FLOPs / ({d['cost_model']['mfu']:g} MFU x {d['cost_model']['peak_tflops']:g} "
             f"TFLOP/s) / 3600", "", "grids:"]
    for g in d["grids"]:
        lines.append(f"  {g['name']:7s} {g['n_runs']} runs, {g['tokens']:,} tokens, {g['flops']:.3e} FLOPs, "
                     f"{g['gpu_hours']:.3g} GPU-h: {g['what']}")
    lines += [f"  skipped {s}" for s in d["skipped"]]
    given = d["grids"][0]
    lines.append(f"  own runs of each stage-2 table ({given['name']}): " + "; ".join(
        f"{k} {c['tokens']:,} tokens, {c['flops']:.3e} FLOPs" for k, c in given["series_cost"].items()
        if k in d["tables"]))
    # tables whose rows are identical (same cells in every grid) are printed once
    blocks: dict[str, list[str]] = {}
    for k, t in d["tables"].items():
        sig = json.dumps([[r["D1"], r["D2"], r["runs"]] for r in t["rows"]])
        blocks.setdefault(sig, []).append(k)
    head = (f"  {'grid':7s} {'runs':>4s} {'D2 span':>7s} {'a3 width':>8s} {'[IQR]':>17s} {'spread':>7s} "
            f"{'a3 med':>7s} {'detect':>6s} {'covers':>6s} {'E ident':>7s} {'FLOPs':>9s} {'GPU-h':>7s} "
            f"{'cert/FLOP':>9s} {'rank':>4s}")
    for names in blocks.values():
        t = d["tables"][names[0]]
        lines += ["", f"{', '.join(names)} (true a3 {d['true_a3']:.4g}):", head]
        for r in t["rows"]:
            s = r["summary"]
            iqr = "-" if not s["width_quartiles"] else "[{:.3g}, {:.3g}]".format(*s["width_quartiles"])
            lines.append(f"  {r['name']:7s} {r['runs']:4d} {_num(r['D2_span'], '{:.3g}x'):>7s} "
                         f"{_num(r['width']):>8s} {iqr:>17s} {_num(s['spread']):>7s} {_num(s['a3_median']):>7s} "
                         f"{_pct(s['detect']):>6s} {_pct(s['cover']):>6s} {_pct(s['E_identified']):>7s} "
                         f"{r['flops']:9.3e} {r['gpu_hours']:7.3g} {_num(r['certainty_per_flop'], '{:.2f}x'):>9s} "
                         f"{_num(r['rank'], '{:d}'):>4s}")
            if s["note"]:
                lines.append(f"           {s['note']}")
        lines.append("  " + t["verdict"].replace(names[0], ", ".join(names), 1))
    lines += ["", "a3 width: the median bootstrap interval over the simulations [quartiles]; spread: the central "
              f"{100 * d['level']:g}% range", "of the fitted a3 (the width the interval should have); a3 med: their "
              "median; detect: share of simulations whose", "interval excludes 0; covers: share of intervals holding "
              "the true a3; cert/FLOP: (w_ref / w)^2 / (FLOPs / FLOPs_ref), the", "reference the first grid with a "
              f"width. A median over {d['sims']} simulations is uncertain by about IQR / sqrt({d['sims']}) (width_se "
              "in design.json):", "rerun close grids with more --sims."]
    return "\n".join(lines)


def _split(text: Optional[str]) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def cmd_design(args) -> int:
    from megareuse.law.commands import _int, finite_json, write_outputs
    from megareuse.law.design import parse_number, prior_from_file, prior_from_params, with_a3
    from megareuse.paths import check_output_dir
    out = check_output_dir(args.out, "--out", LawError)
    if (args.prior is None) == (args.prior_params is None):
        raise LawError("--prior and --prior-params: accepted exactly one of them (a law.json, or "
                       "A=..,a1=..,a2=..,a3=..,E=..)")
    noise = parse_number("--noise", args.noise, float("-inf"))
    if not noise > 0:
        raise LawError(f"--noise = {args.noise!r}: accepted a number > 0 (the scatter of log loss, e.g. 0.012)")
    prior = (prior_from_file(args.prior) if args.prior is not None
             else prior_from_params(args.prior_params, parse_number("--tokens-unit", args.tokens_unit)))
    prior = with_a3(prior, None if args.a3 is None else parse_number("--a3", args.a3, float("-inf")))
    level = parse_number("--level", args.level)
    d = run_design(args.config, prior, noise, _int("--sims", args.sims, 2), _int("--resamples", args.resamples, 2),
                   level, _int("--seed", args.seed, 0), _int("--workers", args.workers, 1),
                   _split(args.series) or None,
                   _split(args.variants) or None, parse_number("--mfu", args.mfu),
                   parse_number("--peak-tflops", args.peak_tflops))
    text = format_design(d)
    paths = write_outputs(out, {"design.json": json.dumps(finite_json(_plain(d)), indent=1) + "\n",
                                "design.txt": text + "\n"})
    print(text)
    print("wrote " + ", ".join(paths))
    return 0


def _plain(value):
    """JSON-ready copy (tuples as lists)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def register(subparsers) -> None:
    """Add `design` to an argparse subparsers object."""
    p = subparsers.add_parser("design", allow_abbrev=False,
                              help="before a study: simulate its grid from a prior law; a3 interval width, "
                                   "detection chance, E identified, cost; compare grids per FLOP")
    p.add_argument("--config", required=True, help="experiment YAML (configs/experiments/)")
    p.add_argument("--prior", default=None, help="law.json of a reuse law (megareuse fit) to simulate from")
    p.add_argument("--prior-params", default=None,
                   help="the reuse law's parameters instead: A=..,a1=..,a2=..,a3=..,E=..")
    p.add_argument("--tokens-unit", default="1e6", help="--prior-params: the token unit of A, a1, a2 (default 1e6)")
    p.add_argument("--noise", required=True, help="scatter of log loss per run (e.g. 0.012: 1.2%%)")
    p.add_argument("--a3", default=None, help="simulate this a3 instead of the prior's (the a3 to detect)")
    p.add_argument("--sims", default="10", help="simulated tables per grid and series (default 10)")
    p.add_argument("--resamples", default="25", help="bootstrap resamples per simulated table (default 25)")
    p.add_argument("--level", default="0.9", help="interval level (default 0.9)")
    p.add_argument("--seed", default="0", help="seed of the simulations (default 0)")
    p.add_argument("--workers", default=str(min(2, os.cpu_count() or 1)),
                   help="processes sharing the simulations (default 2; the numbers are the same for any)")
    p.add_argument("--series", default=None, help="stage-2 series to design, comma list (default: all)")
    p.add_argument("--variants", default=None, help="grids, comma list of given, d2x2, d2x4, d1+1, seeds (default all)")
    p.add_argument("--mfu", default="0.4", help="model FLOPs utilisation for GPU-hours (default 0.4)")
    p.add_argument("--peak-tflops", default="989", help="device peak TFLOP/s (default 989: H100/H200 BF16 dense)")
    p.add_argument("--out", required=True, help="output directory: design.json, design.txt")
    p.set_defaults(func=cmd_design, value_errors=True)
