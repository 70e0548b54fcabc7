"""Stage-2 WSD branches against independent cosine runs of the same cells (issue #29 item 4).

    python benchmarks/wsd_vs_cosine.py --runs runs.csv [--wsd cpt] [--cosine cpt_cosine]
                                       [--loss-col valid_loss_code] [--bootstrap 200]

A sweep with one series planned twice, once as constant-LR trunks with cooldown branches
(`schedule: wsd`, the default) and once as one cosine run per (D1, D2) (`schedule: cosine`),
gives two tables of the same cells. Printed side by side from that one sweep:
  - per cell, the two losses and their relative difference;
  - the reuse law fitted to each table (parameters, a3 with its bootstrap interval, RMS log error);
  - the WSD law predicting the cosine runs: mean and max relative error, and how many fall
    inside its 90% calibrated interval for a new run (a cosine run is a new run to that law);
  - the tokens each protocol trained (from the sweep's plan, in the runs.csv `tokens` column
    when present; otherwise the two axes' arithmetic).
"""
from __future__ import annotations

import argparse

import numpy as np

from megareuse.law import bootstrap, calibrate, calibrated_interval, fit_form, load_table
from megareuse.law.data import LawError


def _fit(path: str, series: str, loss_col: str, n_boot: int):
    table = load_table(path, where={"series": series}, loss_col=loss_col)
    law = fit_form(table, "reuse")
    bootstrap(table, law, n_boot, seed=0)
    try:
        calibrate(table, law, seed=0)
    except LawError as exc:
        print(f"{series}: no calibration ({exc})")
    return table, law


def _cost(table) -> float:
    """Training tokens of a series' stage 2: cosine sum(D2) per D1, WSD (1 - f) max + f sum."""
    return float(np.sum(table.columns["D2"]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", required=True, help="runs.csv of a sweep with both series")
    p.add_argument("--wsd", default="cpt", help="the series trained as WSD branches (default cpt)")
    p.add_argument("--cosine", default="cpt_cosine", help="the same cells as cosine runs (default cpt_cosine)")
    p.add_argument("--loss-col", default="valid_loss_code")
    p.add_argument("--bootstrap", type=int, default=200)
    p.add_argument("--decay-frac", type=float, default=0.2, help="the WSD cooldown share (default 0.2)")
    args = p.parse_args(argv)
    if args.bootstrap < 2:
        p.error(f"--bootstrap = {args.bootstrap}: accepted an integer >= 2")

    wt, wlaw = _fit(args.runs, args.wsd, args.loss_col, args.bootstrap)
    ct, claw = _fit(args.runs, args.cosine, args.loss_col, args.bootstrap)
    key = lambda t: {(float(a), float(b)): float(y) for a, b, y in zip(t.columns["D1"], t.columns["D2"], t.loss)}
    w, c = key(wt), key(ct)
    cells = sorted(set(w) & set(c))
    if not cells:
        raise SystemExit("no (D1, D2) cell is in both series: accepted a sweep that ran the same cells twice")
    print(f"{'D1':>10} {'D2':>10} {'WSD loss':>9} {'cosine':>9} {'rel diff':>9}")
    diffs = []
    for cell in cells:
        diffs.append(w[cell] / c[cell] - 1)
        print(f"{cell[0]:>10,.0f} {cell[1]:>10,.0f} {w[cell]:>9.4f} {c[cell]:>9.4f} {100 * diffs[-1]:>8.2f}%")
    d = np.array(diffs)
    print(f"\nWSD - cosine over {len(cells)} cells: mean {100 * d.mean():+.2f}%, mean |.| {100 * np.abs(d).mean():.2f}%, "
          f"max |.| {100 * np.abs(d).max():.2f}%")

    print(f"\n{'':12}" + "".join(f"{k:>11}" for k in wlaw.params) + f"{'a3 interval':>22}{'RMS log':>9}")
    for name, law in ((args.wsd + " (WSD)", wlaw), (args.cosine, claw)):
        iv = law.bootstrap["intervals"]["a3"]
        print(f"{name:12}" + "".join(f"{v:>11.4g}" for v in law.params.values())
              + f"{f'[{iv[0]:.4g}, {iv[1]:.4g}]':>22}{100 * law.diagnostics['rms_log']:>8.2f}%")

    at = {"D1": [k[0] for k in cells], "D2": [k[1] for k in cells]}
    obs = np.array([c[k] for k in cells])
    pred = np.asarray(wlaw.predict(at), dtype=float)
    err = np.abs(pred / obs - 1)
    line = f"\nthe WSD law predicting the {len(cells)} cosine runs: MARE {100 * err.mean():.2f}%, max {100 * err.max():.2f}%"
    if wlaw.calibration:
        lo, hi = calibrated_interval(wlaw, at)
        inside = int(np.sum((lo <= obs) & (obs <= hi)))
        line += f", {inside} of {len(cells)} inside its {100 * wlaw.calibration['level']:.0f}% calibrated interval"
    print(line)
    f = args.decay_frac
    per_d1 = sorted(set(wt.columns["D2"]))
    wsd_tokens = (1 - f) * max(per_d1) + f * sum(per_d1)
    print(f"stage-2 tokens per D1: WSD {wsd_tokens:,.0f} ({wsd_tokens / max(per_d1):.2f}x the longest run), "
          f"cosine {sum(per_d1):,.0f} ({sum(per_d1) / max(per_d1):.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
