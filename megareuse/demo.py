"""`megareuse demo`: the whole reuse-or-scratch study at laptop scale (2 CPU cores, < 15 min).

1. prepare the two local corpora (prose: Shakespeare + KJV; code: the Python stdlib);
2. run the sweep of an experiment file (default configs/experiments/demo.yaml): base runs at
   4 values of D1, continual pretraining on code at 4 values of D2 per D1, stacking growth on
   prose, from-scratch runs on code — WSD trunks with cooldown branches;
3. collect the run records, fit the law on the CPT runs (forms compared, largest runs held out,
   bootstrap intervals, per-D1 analysis), fit a from-scratch law, run the planner;
4. write a report (markdown + figures) into ``<out>/report`` and print where it is.

``--preset workstation`` runs a larger grid (longer base training, the over-trained regime the
paper is about); every number in the report is what this run measured.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Sequence

from megareuse.config import ConfigError
from megareuse.engine.metrics import format_duration

REPO = Path(__file__).resolve().parent.parent
PRESETS = {"laptop": REPO / "configs" / "experiments" / "demo.yaml",
           "workstation": REPO / "configs" / "experiments" / "demo_workstation.yaml"}


def _section(title: str) -> None:
    print(f"\n== {title} ==", flush=True)


def _g(value, digits: int = 4) -> str:
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}g}"


def _runs_table(rows: list[dict], series: str, loss_col: str) -> list[str]:
    lines = [f"| D1 | D2 | {loss_col} | tokens/s |", "|---|---|---|---|"]
    for r in sorted((r for r in rows if r["series"] == series), key=lambda r: (r["D1"], r["D2"])):
        lines.append(f"| {r['D1']:,} | {r['D2']:,} | {_g(r.get(loss_col))} | {_g(r.get('tokens_per_s'), 3)} |")
    return lines


def _fit_cpt(csv_path: Path, report_dir: Path, workers: int) -> dict:
    from megareuse.law import analyse, load_table, write_fit
    table = load_table(csv_path, loss_col="valid_loss_code", where={"series": "cpt"})
    result = analyse(table, form="reuse", compare="auto", holdout="largest", n_boot=200, seed=0,
                     workers=workers, strict_holdout=False)
    write_fit(result, report_dir / "cpt_law")
    return result


def _plan(csv_path: Path, cpt_law, report_dir: Path, n_params: int, d1s: list[int], d2s: list[int]) -> dict:
    from megareuse.law import fit_form, load_table, make_plan
    from megareuse.law.commands import finite_json, write_outputs
    from megareuse.law.plots import figure_plan
    from megareuse.law.report import plan_report
    scratch_table = load_table(csv_path, loss_col="valid_loss_code", where={"series": "scratch_code"},
                               rename={"D": "D1"})
    scratch = fit_form(scratch_table, "power")
    plan = make_plan(cpt_law, scratch, D1=d1s, D2=d2s, budget_tokens=float(max(d1s) + max(d2s)),
                     N=float(n_params))
    files, note = figure_plan(plan, cpt_law, scratch)
    text = plan_report(plan, "plan.png" if files else None, [note] if note else [])
    write_outputs(report_dir / "plan", {"plan.md": text, "plan.json": json.dumps(finite_json(plan), indent=1),
                                        **files})
    return {"plan": plan, "scratch": scratch, "text": text}


def _study_report(exp, rows, cpt, plan, times, tokens, n_runs, n_points, workers, n_params) -> str:
    law = cpt["law"]
    boot = law.bootstrap or {}
    a3 = law.params.get("a3")
    a3_ci = (boot.get("intervals") or {}).get("a3")
    lines = ["# megareuse demo: reuse or from scratch, at laptop scale", "",
             f"Experiment `{exp.path.name}`: {n_runs} runs ({n_points} data points), {tokens:,} training tokens, "
             f"{workers} worker(s). Wall time: " + ", ".join(f"{k} {format_duration(v)}" for k, v in times.items()) + ".",
             "", "## What was measured", "",
             "Continual pretraining on code (target: validation loss on code) after base training on prose:", ""]
    lines += _runs_table(rows, "cpt", "valid_loss_code")
    lines += ["", "Stacking growth (depth x2) on prose after base training on prose "
              "(target: validation loss on prose):", ""]
    lines += _runs_table(rows, "stack", "valid_loss_prose")
    lines += ["", "From scratch on code (D1 column = tokens):", ""]
    lines += _runs_table(rows, "scratch_code", "valid_loss_code")
    lines += ["", "## The law on the CPT runs", ""]
    if a3 is not None:
        verdict = ("**excludes 0**" if a3_ci and (a3_ci[0] > 0 or a3_ci[1] < 0) else "**contains 0**")
        lines.append(f"Fitted `reuse`: a3 = {_g(a3)} with bootstrap interval "
                     f"[{_g(a3_ci[0]) if a3_ci else '-'}, {_g(a3_ci[1]) if a3_ci else '-'}], which {verdict}"
                     + (": saturation (a3 > 0) is detected." if a3_ci and a3_ci[0] > 0 else
                        ": no saturation is detected at this scale." if verdict == "**contains 0**" else "."))
    check = cpt.get("holdout")
    if check:
        inside = (f", {100 * check['coverage']:.0f}% inside the {100 * check['level']:.0f}% prediction interval"
                  if check.get("coverage") is not None and check.get("level") else "")
        lines.append(f"Held-out largest runs ({check['n_test']} predicted from {check['n_train']}): mean absolute "
                     f"relative error {100 * check['mare']:.2f}%, max {100 * check['max_abs_rel']:.2f}%{inside}.")
    comp = cpt.get("comparison")
    if comp:
        lines.append(f"Form comparison on the same split selects `{comp['selected']}` ({comp['why']}).")
    lines += ["", "Full fit report: [cpt_law/report.md](cpt_law/report.md) "
              "(figures: [Figure 1](cpt_law/figure1.png), [held-out](cpt_law/heldout.png)).", "",
              "![figure 1](cpt_law/figure1.png)", "", "![held-out](cpt_law/heldout.png)", "",
              "## Reuse or from scratch?", "", "Planner (CPT law vs a `power` law fitted to the scratch runs): "
              "[plan/plan.md](plan/plan.md).", ""]
    split = plan["plan"].get("split")
    if split and "decision" in split:
        lines.append(f"For a budget of {split['budget_tokens']:.4g} tokens the law's best split is D1 = "
                     f"{split['D1']:.4g}, D2 = {split['D2']:.4g} (loss {split['loss']:.4g}); from scratch: "
                     f"{split['scratch_loss']:.4g}. Decision: **{split['decision']}**.")
    lines += ["", "![plan](plan/plan.png)", "", "## Caveats", "",
              f"- Scale: {n_params:,} non-embedding parameters; the longest base saw "
              f"{max(exp.base.budgets) / n_params:.1f} tokens per parameter, far from the over-trained "
              "regime (tens to hundreds) where the paper finds saturation; `--preset workstation` "
              "trains longer bases.",
              "- The planner's numbers outside the measured D1/D2/D ranges are extrapolations of the "
              "fitted laws (plan.md marks them).",
              "- Seed noise is about 0.0075 nats per run at this scale (measured in the pilot); compare it to "
              "the fit's RMS error in the fit report.", ""]
    lines += [f"- {n}" for n in cpt.get("notes", [])]
    return "\n".join(lines) + "\n"


def run_demo(out: str | Path = "runs/demo", fresh: bool = False, overrides: Sequence[str] = (),
             preset: str = "laptop", workers: int = 1) -> Path:
    from megareuse.data.preprocess import prepare_default
    from megareuse.reuse.records import collect
    from megareuse.sweep.grid import load_experiment, n_params, plan_experiment, totals
    from megareuse.sweep.local import run_sweep

    if preset not in PRESETS:
        raise ConfigError(f"config error: --preset = {preset!r}: accepted one of {', '.join(PRESETS)}")
    if not PRESETS[preset].is_file():
        raise ConfigError(f"config error: experiment {PRESETS[preset]} not found; run the demo from a "
                          "source checkout (pip install -e .)")
    out = Path(out).resolve()
    data_dir, sweep_dir, report_dir = out / "data", out / "runs", out / "report"
    exp = load_experiment(PRESETS[preset], [f"data.dir={data_dir}", *overrides])
    runs = plan_experiment(exp)
    if fresh and sweep_dir.exists():
        shutil.rmtree(sweep_dir)
    times: dict[str, float] = {}
    tokens, flops = totals(runs)

    _section("1/4 prepare the local corpora")
    t0 = time.perf_counter()
    if (data_dir / "prepare.json").is_file():
        print(f"using the prepared data in {data_dir}")
    else:
        prepare_default(data_dir, domains=["prose", "code"], vocab_size=exp.train["model"]["vocab_size"])
    times["prepare"] = time.perf_counter() - t0

    _section(f"2/4 sweep: {len(runs)} runs, {tokens:,} tokens, {flops:.2e} FLOPs")
    t0 = time.perf_counter()
    run_sweep(exp.train, runs, sweep_dir, workers=workers)
    csv_path, _, n = collect(sweep_dir)
    times["sweep"] = time.perf_counter() - t0

    _section("3/4 fit the law, compare forms, check held-out runs")
    t0 = time.perf_counter()
    cpt = _fit_cpt(csv_path, report_dir, workers=max(1, workers))
    law = cpt["law"]
    print(f"{law.label}: " + ", ".join(f"{k}={v:.4g}" for k, v in law.params.items()))
    times["fit"] = time.perf_counter() - t0

    _section("4/4 plan: reuse or from scratch?")
    t0 = time.perf_counter()
    cpt_series = next(s for s in exp.stage2 if s.name == "cpt")
    plan = _plan(csv_path, law, report_dir, n_params(exp), exp.base.budgets, cpt_series.budgets)
    times["plan"] = time.perf_counter() - t0

    rows = [json.loads(line) for line in (sweep_dir / "runs.jsonl").read_text().splitlines()]
    text = _study_report(exp, rows, cpt, plan, times, tokens, len(runs), n, workers, n_params(exp))
    (report_dir / "report.md").write_text(text)
    shutil.copy(csv_path, report_dir / "runs.csv")
    _section("summary")
    print(text)
    print(f"report: {report_dir / 'report.md'}")
    return report_dir
