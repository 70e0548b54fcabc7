"""`megareuse demo`: the whole reuse-or-scratch study at laptop scale (2 CPU cores, < 15 min).

1. prepare the local corpora the experiment names (prose: Shakespeare + KJV; code: the
   Python stdlib; mix: prose + some installed-package code);
2. run the sweep of an experiment file (default configs/experiments/demo.yaml): base runs at
   4 values of D1, continual pretraining on code at 4 values of D2 per D1, stacking growth on
   prose, from-scratch runs on code — WSD trunks with cooldown branches;
3. collect the run records, fit the law on the CPT runs (forms compared, largest runs held out,
   bootstrap intervals, per-D1 analysis), fit a from-scratch law, run the planner; where a
   scratch series trains a stage-2 series' model on its blend, the two are fitted with one
   shared E (compared with separate E's on held-out runs) and the planner weighs that pair;
4. write a report (markdown + figures) into ``<out>/report`` and print where it is.

``--preset workstation`` runs a larger grid (longer base training, the over-trained regime the
paper is about); ``--preset overtrained`` reaches it on 2 cores with a smaller model
(configs/experiments/overtrained.yaml: CPT from a prose and from a prose+code base, growth,
scratch). Every number in the report is what this run measured; the report also states each
base's tokens per non-embedding parameter and the epochs each series makes over each domain.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Optional, Sequence

from megareuse.atomic import write_text_atomic
from megareuse.config import ConfigError
from megareuse.engine.metrics import format_duration

REPO = Path(__file__).resolve().parent.parent
PRESETS = {"laptop": REPO / "configs" / "experiments" / "demo.yaml",
           "workstation": REPO / "configs" / "experiments" / "demo_workstation.yaml",
           "overtrained": REPO / "configs" / "experiments" / "overtrained.yaml",
           "settle": REPO / "configs" / "experiments" / "settle.yaml"}
# the whole stdlib (~9.7 MB) as code
PREPARE_OPTIONS = {"overtrained": {"code_max_bytes": 10_000_000}, "settle": {"code_max_bytes": 10_000_000}}
DEFAULT_OUT = "runs/demo"
FIT_RESAMPLES = 200  # bootstrap resamples of every fit (and of the shared-E study) in the report


def _section(title: str) -> None:
    print(f"\n== {title} ==", flush=True)


def _g(value, digits: int = 4) -> str:
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}g}"


def _runs_table(rows: list[dict], series: str, loss_col: str) -> list[str]:
    """One row per run of ``series``; an N column (non-embedding parameters) when it has several sizes."""
    mine = sorted((r for r in rows if r["series"] == series), key=lambda r: (r.get("N", 0), r["D1"], r["D2"]))
    sizes = len({r.get("N") for r in mine}) > 1
    lines = [("| N " if sizes else "") + f"| D1 | D2 | {loss_col} | tokens/s |",
             "|---" * (5 if sizes else 4) + "|"]
    for r in mine:
        lines.append((f"| {r['N']:,} " if sizes else "") + f"| {r['D1']:,} | {r['D2']:,} | {_g(r.get(loss_col))} | "
                     f"{_g(r.get('tokens_per_s'), 3)} |")
    return lines


def experiment_domains(exp) -> list[str]:
    """The domains a run of ``exp`` reads: data.valid first, then every series' blend, in order."""
    names = list(exp.train.get("data", {}).get("valid") or [])
    for series in [*exp.bases, *exp.stage2, *exp.scratch]:
        names += list(series.domains)
    return list(dict.fromkeys(names))


def _model_params(exp, model: dict) -> int:
    from megareuse.config import Config
    from megareuse.model import non_embedding_param_count
    return non_embedding_param_count(Config.from_dict({**exp.train, "model": {**exp.train["model"], **model}}).model)


def base_scale(exp) -> list[dict]:
    """Per base series: non-embedding parameters and tokens per parameter at its D1 values."""
    out = []
    for b in exp.bases:
        n = _model_params(exp, b.model)
        out.append({"name": b.name, "params": n, "D1": list(b.budgets),
                    "tokens_per_param": [d1 / n for d1 in b.budgets]})
    return out


def _shares(domains: dict) -> dict:
    total = sum(domains.values())
    return {d: w / total for d, w in domains.items()}


def domain_epochs(exp, train_tokens: dict[str, int]) -> list[dict]:
    """One row per (series, domain) of the series' largest run: the tokens it draws from the
    domain in that stage (budget x the domain's share of the blend), the epochs they make over
    the domain's training tokens, and for stage 2 ``total_epochs``: with the tokens of the
    largest base it starts from on the same domain."""
    bases = {b.name: b for b in exp.bases}
    rows = []
    for kind, group in (("base", exp.bases), ("stage2", exp.stage2), ("scratch", exp.scratch)):
        for s in group:
            for domain, share in _shares(s.domains).items():
                if domain not in train_tokens:
                    raise ConfigError(f"config error: series {s.name}: domain {domain!r} is not prepared; "
                                      f"accepted one of {', '.join(sorted(train_tokens))}")
                tokens = max(s.budgets) * share
                row = {"series": s.name, "stage": kind, "domain": domain, "budget": max(s.budgets),
                       "tokens": tokens, "train_tokens": train_tokens[domain],
                       "epochs": tokens / train_tokens[domain]}
                if kind == "stage2":
                    before = max(max(s.D1 or bases[name].budgets) * _shares(bases[name].domains).get(domain, 0.0)
                                 for name in s.bases or [exp.base.name])
                    row["total_epochs"] = (tokens + before) / train_tokens[domain]
                rows.append(row)
    return rows


def train_token_counts(info: dict) -> dict[str, int]:
    """Training-split tokens per domain from a prepare.json."""
    return {name: int(d["train"]["tokens"]) for name, d in info["domains"].items()}


def _scale_lines(exp, info: dict) -> list[str]:
    lines = ["## Scale and data", "", "| base | non-embedding params | D1 | tokens per parameter |", "|---|---|---|---|"]
    for b in base_scale(exp):
        lines.append(f"| {b['name']} | {b['params']:,} | {b['D1'][0]:,} .. {b['D1'][-1]:,} | "
                     f"{b['tokens_per_param'][0]:.1f} .. {b['tokens_per_param'][-1]:.1f} |")
    lines += ["", "Epochs of each series' largest run over each domain's training tokens (prepare.json; "
              "stage 2 also with the base's tokens of the same domain):", "",
              "| series | domain | tokens | training tokens | epochs | with the base |", "|---|---|---|---|---|---|"]
    for r in domain_epochs(exp, train_token_counts(info)):
        total = f"{r['total_epochs']:.2f}" if "total_epochs" in r else "-"
        lines.append(f"| {r['series']} | {r['domain']} | {r['tokens']:,.0f} | {r['train_tokens']:,} | "
                     f"{r['epochs']:.2f} | {total} |")
    return lines + [""]


FIT_LEVELS = 3  # distinct D1 and D2 values a stage-2 series needs before the demo fits a law to it


def _fit_table(csv_path: Path, out_dir: Path, workers: int, loss_col: str, where: dict,
               form: str, holdout: str = "largest") -> tuple[Optional[dict], Optional[str]]:
    """Fit ``form`` to the runs ``where`` selects: (the analysis, None), or (None, why not)."""
    import numpy as np

    from megareuse.law import LawError, analyse, load_table, write_fit
    table = load_table(csv_path, loss_col=loss_col, where=where)
    short = [f"{len(np.unique(table.columns[c]))} {c} values" for c in ("D1", "D2")
             if len(np.unique(table.columns[c])) < FIT_LEVELS]
    if short:
        return None, (f"not fitted: {' and '.join(short)}; the demo fits a series with at least "
                      f"{FIT_LEVELS} of each")
    try:
        result = analyse(table, form=form, compare="auto", holdout=holdout,
                         n_boot=FIT_RESAMPLES, seed=0, workers=workers, strict_holdout=False)
    except LawError as exc:
        return None, f"not fitted: {exc}"
    write_fit(result, out_dir)
    return result, None


def _fit_series(csv_path: Path, report_dir: Path, workers: int, s) -> tuple[Optional[dict], Optional[str]]:
    """Fit the reuse law to stage-2 series ``s``: (the analysis, None), or (None, why it was not
    fitted). A series that starts from several model sizes gets the joint ``reuse_N`` and, under
    ``per_size``, a ``reuse`` law of each size's runs alone (``{N: (analysis or None, why)}``)."""
    import numpy as np

    from megareuse.law import load_table
    columns = load_table(csv_path, loss_col=_loss_col(s), where={"series": s.name}).columns
    sizes = np.unique(columns["N"])
    if len(sizes) == 1:
        return _fit_table(csv_path, report_dir / f"{s.name}_law", workers, _loss_col(s), {"series": s.name}, "reuse")
    # held out: the longest stage 2 at every size ('largest' would hold out a whole size, and
    # reuse_N needs two in its training runs)
    result, why = _fit_table(csv_path, report_dir / f"{s.name}_law", workers, _loss_col(s), {"series": s.name},
                             "reuse_N", holdout=f"D2>={int(columns['D2'].max())}")
    if result is not None:
        result["per_size"] = {int(n): _fit_table(csv_path, report_dir / f"{s.name}_N{int(n)}_law", workers,
                                                 _loss_col(s), {"series": s.name, "N": int(n)}, "reuse")
                              for n in sizes}
    return result, why


def series_model(exp, s) -> dict:
    """The model section stage-2 series ``s`` trains: its (first) base's, grown for growth."""
    from megareuse.sweep.grid import grown_model
    base = next(b for b in exp.bases if b.name == (s.bases or [exp.base.name])[0])
    model = {**exp.train.get("model", {}), **base.model}
    return model if s.method == "cpt" else grown_model(model, s.growth)


def scratch_for(exp, s):
    """The from-scratch series the planner weighs stage-2 series ``s`` against: the first that
    trains the same model on the same blend (None if there is none)."""
    want = series_model(exp, s)
    return next((sc for sc in exp.scratch if _shares(sc.domains) == _shares(s.domains)
                 and {**exp.train.get("model", {}), **sc.model} == want), None)


def _plan(csv_path: Path, law, report_dir: Path, N: int, N_base: int, d1s: list[int], d2s: list[int],
          scratch_series: str, loss_col: str, subdir: str, shared: Optional[dict] = None) -> dict:
    """The planner's answer; with a shared-E study (``shared``) it weighs the pair fitted with one E,
    and the verdict of the separately fitted laws on the same budget is kept beside it."""
    from megareuse.law import best_split, budget_saving, fit_form, load_table, make_plan
    from megareuse.law.plan import split_range
    from megareuse.law.commands import finite_json, write_outputs
    from megareuse.law.plots import figure_plan
    from megareuse.law.report import plan_report
    budget = float(max(d1s) + max(d2s))
    separate = None
    if shared and "skipped" not in shared:
        scratch = shared["separate"]["scratch"]
        split = best_split(law, budget_tokens=budget, D1_range=split_range(law))
        b = budget_saving(law, scratch, split, float(N))
        separate = {"D1": split["D1"], "D2": split["D2"], "loss": split["loss"], "saving": b["saving"],
                    "saving_interval": b["saving_interval"], "verdict": b["verdict"]}
        law, scratch = shared["shared"].reuse, shared["shared"].scratch
    else:
        scratch_table = load_table(csv_path, loss_col=loss_col, where={"series": scratch_series},
                                   rename={"D": "D1"})
        scratch = fit_form(scratch_table, "power")
    plan = make_plan(law, scratch, D1=d1s, D2=d2s, budget_tokens=budget, N=float(N), N_base=float(N_base))
    files, note = figure_plan(plan, law, scratch)
    text = plan_report(plan, "plan.png" if files else None, [note] if note else [])
    write_outputs(report_dir / subdir, {"plan.md": text, "plan.json": json.dumps(finite_json(plan), indent=1),
                                        **files})
    return {"plan": plan, "scratch": scratch, "scratch_name": scratch_series, "text": text, "dir": subdir,
            "shared_E": separate is not None, "separate": separate}


def _shared_series(csv_path: Path, report_dir: Path, s, scratch_series: str, law, N: Optional[int]) -> dict:
    """One E for stage-2 series ``s`` and its scratch series (the same model on the same blend):
    the shared-E study beside the separate fits, written to ``<s>_shared/``, or {"skipped": why}.
    ``law`` is the series' `reuse` law already fitted on the same rows (``N``: of that size alone)."""
    from megareuse.law import LawError, load_table, merge_duplicates
    from megareuse.law.commands import write_outputs
    from megareuse.law.sharedstudy import shared_files, shared_study
    loss_col = _loss_col(s)
    try:
        reuse, _ = merge_duplicates(load_table(csv_path, loss_col=loss_col,
                                               where={"series": s.name, **({"N": N} if N else {})}))
        scratch, _ = merge_duplicates(load_table(csv_path, loss_col=loss_col, where={"series": scratch_series},
                                                 rename={"D": "D1"}))
        study = shared_study(reuse, scratch, n_boot=FIT_RESAMPLES, seed=0, reuse_law=law)
    except LawError as exc:
        return {"skipped": str(exc)}
    write_outputs(report_dir / f"{s.name}_shared", shared_files(study, (s.name, scratch_series)))
    study.update(dir=f"{s.name}_shared", names=(s.name, scratch_series))
    return study


def _plan_series(exp, s, fit: Optional[dict], csv_path: Path, report_dir: Path) -> dict:
    """The planner's answer for stage-2 series ``s`` against its scratch series, or {"skipped": why}."""
    if fit is None:
        return {"skipped": "no law was fitted"}
    scratch = scratch_for(exp, s)
    if scratch is None:
        return {"skipped": f"no scratch series trains its model on {'+'.join(s.domains)}"}
    base = s.bases[0] if s.bases else exp.base.name
    d1s = s.D1 or next(b for b in exp.bases if b.name == base).budgets
    N, N_base = _model_params(exp, series_model(exp, s)), {b["name"]: b for b in base_scale(exp)}[base]["params"]
    law = fit["law"]
    if "N" in law.form.inputs:  # several sizes: the planner weighs the size its scratch series trains
        own, why = fit.get("per_size", {}).get(N, (None, f"no runs of N = {N:,}"))
        if own is None:
            return {"skipped": f"the `reuse` law of the N = {N:,} runs alone: {why}"}
        law = own["law"]
    shared = _shared_series(csv_path, report_dir, s, scratch.name, law, N if law is not fit["law"] else None)
    plan = _plan(csv_path, law, report_dir, N, N_base, list(d1s), list(s.budgets), scratch.name,
                 _loss_col(s), "plan" if s.name == "cpt" else f"plan_{s.name}", shared)
    plan["shared"] = shared
    if law is not fit["law"]:
        plan["N"] = N  # the size whose own law was planned
    return plan


def _loss_col(series) -> str:
    return f"valid_loss_{next(iter(series.domains))}"


def _base_label(exp, s) -> str:
    names = s.bases or [exp.base.name]
    return ", ".join(f"{n} ({'+'.join(next(b for b in exp.bases if b.name == n).domains)})" for n in names)


def _a3_line(law, what: str) -> list[str]:
    a3 = law.params.get("a3")
    if a3 is None:
        return []
    a3_ci = ((law.bootstrap or {}).get("intervals") or {}).get("a3")
    verdict = ("**excludes 0**" if a3_ci and (a3_ci[0] > 0 or a3_ci[1] < 0) else "**contains 0**")
    return [f"{what}: a3 = {_g(a3)} with bootstrap interval "
            f"[{_g(a3_ci[0]) if a3_ci else '-'}, {_g(a3_ci[1]) if a3_ci else '-'}], which {verdict}"
            + (": saturation (a3 > 0) is detected." if a3_ci and a3_ci[0] > 0 else
               ": no saturation is detected at this scale." if verdict == "**contains 0**" else ".")]


def _holdout_line(check: Optional[dict]) -> list[str]:
    if not check:
        return []
    inside = ""
    if check.get("coverage") is not None and check.get("level"):
        inside = f", {100 * check['coverage']:.0f}% inside the {100 * check['level']:.0f}% prediction interval"
        if check.get("interval") == "calibrated":
            inside += (f" (calibrated for noise and misfit; {100 * check['coverage_bootstrap']:.0f}% inside the "
                       f"parameter-only bootstrap interval)")
    return [f"Held-out largest runs ({check['n_test']} predicted from {check['n_train']}): mean absolute "
            f"relative error {100 * check['mare']:.2f}%, max {100 * check['max_abs_rel']:.2f}%{inside}."]


def _law_lines(name: str, cpt: dict) -> list[str]:
    law = cpt["law"]
    lines = _a3_line(law, f"Fitted `{law.form.name}`" + (" (all sizes, with N)" if "N" in law.form.inputs else ""))
    lines += _holdout_line(cpt.get("holdout"))
    comp = cpt.get("comparison")
    if comp:
        lines.append(f"Form comparison on the same split selects `{comp['selected']}` ({comp['why']}).")
    per = (cpt.get("per_d1") or {}).get("per_d1") or []
    if per:
        lines += ["", "Per-D1 exponents (power fits over D2 at each D1, E shared):", "",
                  "| D1 | runs | alpha(D1) |", "|---|---|---|"]
        lines += [f"| {r['D1']:,.0f} | {r['n']} | {_g(r['alpha'])} |" for r in per]
    for n, (own, why) in (cpt.get("per_size") or {}).items():  # a series from several model sizes
        if own is None:
            lines += ["", f"The N = {n:,} runs alone: {why}."]
            continue
        alphas = ", ".join(_g(r["alpha"], 3) for r in (own.get("per_d1") or {}).get("per_d1") or [])
        lines += ["", *_a3_line(own["law"], f"The N = {n:,} runs alone, `reuse`"), *_holdout_line(own.get("holdout")),
                  *([f"alpha(D1) from the smallest D1 up: {alphas}."] if alphas else []),
                  f"Report: [{name}_N{n}_law/report.md]({name}_N{n}_law/report.md)."]
    lines += ["", f"Full fit report: [{name}_law/report.md]({name}_law/report.md) "
              f"(figures: [Figure 1]({name}_law/figure1.png), [held-out]({name}_law/heldout.png)).", "",
              f"![figure 1]({name}_law/figure1.png)", "", f"![held-out]({name}_law/heldout.png)", ""]
    return lines


def _plan_lines(name: str, plan: dict) -> list[str]:
    from megareuse.law.plan import SPLIT_REACH
    if "skipped" in plan:
        return [f"Planner: not run ({plan['skipped']}).", ""]
    d = plan["dir"]
    law = f"the `{name}` law" + (f" of the N = {plan['N']:,} runs" if "N" in plan else "")
    lines = [f"Planner ({law} vs a `power` law fitted to the `{plan['scratch_name']}` runs"
             + (", the two fitted together with one shared E" if plan.get("shared_E") else "")
             + f"): [{d}/plan.md]({d}/plan.md).", ""]
    split = plan["plan"].get("split")
    if split and "decision" in split:
        lines.append(f"For a budget of {split['budget_tokens']:.4g} tokens the law's best split is D1 = "
                     f"{split['D1']:.4g}, D2 = {split['D2']:.4g} (loss {split['loss']:.4g}); from scratch: "
                     f"{split['scratch_loss']:.4g}. Decision: **{split['decision']}**"
                     + (f" (bootstrap verdict: {split['verdict']})." if split.get("verdict") else ".")
                     + (f" The split sits at the edge of the D1 the law may extrapolate to ({split['D1_range'][0]:.4g}"
                        f" .. {split['D1_range'][1]:.4g}, {SPLIT_REACH:g}x beyond its runs each way): the law asks for "
                        + ("less" if split["D1"] <= split["D1_range"][0] * 1.0001 else "more")
                        + " base than it has seen." if split.get("at_edge") and split.get("D1_range") else ""))
    sep = plan.get("separate")
    if sep:
        iv = sep["saving_interval"]
        lines.append(f"With separate E's (the two laws fitted apart) the same budget's best split is D1 = "
                     f"{sep['D1']:.4g}, D2 = {sep['D2']:.4g}, saving {_g(sep['saving'])}"
                     + (f" [{_g(iv[0])}, {_g(iv[1])}]" if iv else "") + f" tokens: verdict {sep['verdict']}.")
    return lines + ["", f"![plan]({d}/plan.png)", ""]


def _shared_section(plan: dict) -> list[str]:
    """The shared-E study's lines for the report (nothing when the series was not planned)."""
    from megareuse.law.sharedstudy import shared_lines
    study = plan.get("shared")
    if not study:
        return []
    if "skipped" in study:
        return ["### One floor for reuse and scratch?", "", f"One shared E: not fitted ({study['skipped']}).", ""]
    d = study["dir"]
    return ["### One floor for reuse and scratch?", "", *shared_lines(study, study["names"]),
            f"Details: [{d}/shared_E.md]({d}/shared_E.md).", ""]


def _study_report(exp, rows, fits, plans, times, tokens, n_runs, n_points, workers, info) -> str:
    cpts = [s for s in exp.stage2 if s.method == "cpt"]
    lines = [f"# megareuse demo: reuse or from scratch (`{exp.name}`)", "",
             f"Experiment `{exp.path.name}`: {n_runs} runs ({n_points} data points), {tokens:,} training tokens, "
             f"{workers} worker(s). Wall time: " + ", ".join(f"{k} {format_duration(v)}" for k, v in times.items()) + ".",
             "", *_scale_lines(exp, info), "## What was measured", ""]
    for s in cpts:
        lines += [f"Continual pretraining `{s.name}` on {'+'.join(s.domains)} (target: {_loss_col(s)}) after base "
                  f"training on {_base_label(exp, s)}:", "", *_runs_table(rows, s.name, _loss_col(s)), ""]
    for s in (s for s in exp.stage2 if s.method != "cpt"):
        lines += [f"Growth `{s.name}` ({s.method}: " + ", ".join(f"{k} x{v}" for k, v in s.growth.items())
                  + f") on {'+'.join(s.domains)} after base training on "
                  f"{_base_label(exp, s)} (target: {_loss_col(s)}):", "", *_runs_table(rows, s.name, _loss_col(s)), ""]
    for scratch in exp.scratch:
        lines += [f"From scratch `{scratch.name}` on {'+'.join(scratch.domains)} (D1 column = tokens):", "",
                  *_runs_table(rows, scratch.name, _loss_col(scratch)), ""]
    for s in exp.stage2:
        fit, why = fits[s.name]
        lines += ["", f"## The law on the `{s.name}` runs", ""]
        lines += _law_lines(s.name, fit) if fit else [f"{why.capitalize()}.", ""]
        lines += [*_shared_section(plans[s.name]), "### Reuse or from scratch?", "", *_plan_lines(s.name, plans[s.name])]
    top = max(b["tokens_per_param"][-1] for b in base_scale(exp))
    regime = ("reaching the over-trained regime (tens to hundreds) where the paper finds saturation" if top >= 100
              else "far from the over-trained regime (tens to hundreds) where the paper finds saturation; "
                   "`--preset overtrained` trains a smaller model past 100")
    lines += ["## Caveats", "",
              f"- Scale: the longest base saw {top:.1f} tokens per non-embedding parameter, {regime}.",
              "- The planner's numbers outside the measured D1/D2/D ranges are extrapolations of the "
              "fitted laws (plan.md marks them).",
              "- Seed noise is about 0.0075 nats per run at the laptop scale (measured in the pilot); compare it to "
              "the fit's RMS error in the fit report.", ""]
    lines += [f"- {name}: {n}" for name, (fit, _) in fits.items() if fit for n in fit.get("notes", [])]
    lines += [f"- {name} (N = {size:,} alone): {n}" for name, (fit, _) in fits.items() if fit
              for size, (own, _) in (fit.get("per_size") or {}).items() if own for n in own.get("notes", [])]
    return "\n".join(lines) + "\n"


def _check_prepared(info: dict, data_dir: Path, needed: list[str], preset: str) -> None:
    missing = [d for d in needed if d not in info["domains"]]
    if missing:
        raise ConfigError(f"config error: {data_dir} has domains {', '.join(info['domains'])}, not "
                          f"{', '.join(missing)} that --preset {preset} needs; accepted --out naming a new directory")


def run_demo(out: str | Path = DEFAULT_OUT, fresh: bool = False, overrides: Sequence[str] = (),
             preset: str = "laptop", workers: int = 1) -> Path:
    from megareuse.data.preprocess import load_prepared, prepare_default
    from megareuse.records import collect
    from megareuse.sweep.grid import load_experiment, plan_experiment, totals
    from megareuse.sweep.local import run_sweep, sweep_devices

    if preset not in PRESETS:
        raise ConfigError(f"config error: --preset = {preset!r}: accepted one of {', '.join(PRESETS)}")
    if not PRESETS[preset].is_file():
        raise ConfigError(f"config error: experiment {PRESETS[preset]} not found; run the demo from a "
                          "source checkout (pip install -e .)")
    if preset != "laptop" and Path(out) == Path(DEFAULT_OUT):
        out = f"{DEFAULT_OUT}_{preset}"  # never mixes runs of two presets under one directory
    out = Path(out).resolve()
    data_dir, sweep_dir, report_dir = out / "data", out / "runs", out / "report"
    exp = load_experiment(PRESETS[preset], [f"data.dir={data_dir}", *overrides])
    runs = plan_experiment(exp)
    domains = experiment_domains(exp)
    if fresh and sweep_dir.exists():
        shutil.rmtree(sweep_dir)
    times: dict[str, float] = {}
    tokens, flops = totals(runs)

    _section(f"1/4 prepare the local corpora ({', '.join(domains)})")
    t0 = time.perf_counter()
    if (data_dir / "prepare.json").is_file():
        print(f"using the prepared data in {data_dir}")
        info = load_prepared(data_dir)
        _check_prepared(info, data_dir, domains, preset)
    else:
        info = prepare_default(data_dir, domains=domains, vocab_size=exp.train["model"]["vocab_size"],
                               **PREPARE_OPTIONS.get(preset, {}))
    times["prepare"] = time.perf_counter() - t0

    _section(f"2/4 sweep: {len(runs)} runs, {tokens:,} tokens, {flops:.2e} FLOPs")
    t0 = time.perf_counter()
    gpus = len(sweep_devices(exp.train))  # none unless run.device=cuda|auto on a GPU machine
    # the demo's models are tiny: on GPUs its workers share them rather than be refused
    run_sweep(exp.train, runs, sweep_dir, workers=workers, runs_per_gpu=-(-workers // gpus) if gpus else 1)
    csv_path, _, n = collect(sweep_dir)
    times["sweep"] = time.perf_counter() - t0

    _section("3/4 fit the law, compare forms, check held-out runs")
    t0 = time.perf_counter()
    fits = {}
    for s in exp.stage2:
        fit, why = fits[s.name] = _fit_series(csv_path, report_dir, max(1, workers), s)
        print(f"{s.name}: " + (why if fit is None else f"{fit['law'].label}: "
                               + ", ".join(f"{k}={v:.4g}" for k, v in fit["law"].params.items())))
    times["fit"] = time.perf_counter() - t0

    _section("4/4 plan: reuse or from scratch?")
    t0 = time.perf_counter()
    plans = {s.name: _plan_series(exp, s, fits[s.name][0], csv_path, report_dir) for s in exp.stage2}
    for name, plan in plans.items():
        if "skipped" in plan:
            print(f"{name}: planner not run: {plan['skipped']}")
        elif "skipped" in (plan.get("shared") or {}):
            print(f"{name}: no shared-E fit: {plan['shared']['skipped']}")
        elif plan.get("shared"):
            from megareuse.law.sharedstudy import summary_line
            print(f"{name} with {plan['scratch_name']}: {summary_line(plan['shared'])}")
    times["plan"] = time.perf_counter() - t0

    rows = [json.loads(line) for line in (sweep_dir / "runs.jsonl").read_text().splitlines()]
    text = _study_report(exp, rows, fits, plans, times, tokens, len(runs), n, workers, info)
    write_text_atomic(report_dir / "report.md", text)
    write_text_atomic(report_dir / "runs.csv", Path(csv_path).read_text())
    _section("summary")
    print(text)
    print(f"report: {report_dir / 'report.md'}")
    return report_dir
