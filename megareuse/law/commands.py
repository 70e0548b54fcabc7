"""`megareuse fit` and `megareuse plan`, and the in-process pipeline behind them.

    megareuse fit --runs runs.csv [--form reuse] [--compare auto] [--holdout largest]
                  [--bootstrap 200] [--workers 1] [--seed 0] [--level 0.9] [--loss-col loss] [--loss-unit nats]
                  [--where method=cpt] [--rename D=D2] --out DIR
    megareuse plan --law DIR/law.json [--scratch-law S/law.json] [--D1 1M,4M] [--D2 0.5M,1M]
                   [--budget-tokens 8M | --budget-flops 1e15] [--N 3.3e5] [--N-base ...] --out DIR
    megareuse plan --runs runs.csv --where series=cpt --scratch-where series=scratch_code
                   --loss-col valid_loss_code [...] --out DIR      (both laws fitted with one shared E)

A user error prints one line on stderr ("megareuse fit: ...") and returns 2; everything is
computed and checked before the first file is written, and each file is written atomically.
`register(subparsers)` adds both commands to an argparse parser.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

from megareuse.law.data import LawError, RunTable, load_table, merge_duplicates, parse_count
from megareuse.law.forms import available_forms, get_form
from megareuse.law.jsonout import finite_json, write_outputs  # noqa: F401 (imported from here by demo and design)
from megareuse.paths import check_output_dir

CHECKS = ("rollout", "loo")
HOLDOUT_RESAMPLES = 200  # the held-out check's prediction intervals: percentiles that 200 resamples pin down


def default_form(table: RunTable) -> str:
    """reuse for D1/D2 tables, chinchilla for N/D, power for D alone (a partial set names the
    form whose missing column the error then reports)."""
    if table.has("D1") or table.has("D2"):
        return "reuse"
    for name, cols in (("chinchilla", ("N", "D")), ("power", ("D",))):
        if table.has(*cols):
            return name
    raise LawError(f"{table.source} has none of the column sets D1+D2, N+D, D; columns present: "
                   f"{', '.join(table.columns) or 'none'}, {table.loss_col}")


def analyse(table: RunTable, form: Optional[str] = None, compare="auto", holdout: Optional[str] = "largest",
            n_boot: int = 200, seed: int = 0, workers: int = 1, level: float = 0.9, figures: bool = True,
            strict_holdout: bool = True, checks: Sequence[str] = ()) -> dict:
    """Fit, bootstrap, compare forms, check held-out runs, per-D1 analysis, figures (in memory).

    compare: "auto" (every registered form the columns allow), a list of names, or None.
    checks: also "rollout" (expanding window over D2, or D) and/or "loo" (leave one run out)."""
    from megareuse.law.calibrate import calibrate
    from megareuse.law.resampling import bootstrap
    from megareuse.law.fit import fit_form
    from megareuse.law.identify import profile_E
    from megareuse.law.perd1 import per_d1_analysis
    from megareuse.law.validate import (auto_forms, compare_forms, expanding_window, holdout_check, holdout_mask,
                                        leave_one_out)
    form = get_form(form or default_form(table))
    table.require(form.inputs, f"form {form.name}")
    table, merged = merge_duplicates(table)
    for check in checks:
        if check not in CHECKS:
            raise LawError(f"check = {check!r}: accepted {', '.join(CHECKS)}")
    notes = [merged] if merged else []
    if holdout in (None, "", "none"):
        holdout = None
    else:
        try:
            holdout_mask(table, holdout, form.inputs)
        except LawError as exc:
            if strict_holdout:
                raise
            notes.append(f"no held-out check: {exc}")
            holdout = None
    names = auto_forms(table.columns) if compare == "auto" else list(compare or [])
    for name in names:
        get_form(name)
    law = fit_form(table, form)
    if not law.diagnostics["converged"]:
        notes.append(f"the {form.name} fit did NOT converge ({law.diagnostics['message']}); treat it with care")
    profile = profile_E(table, law, level)
    if profile:
        law.diagnostics["E_profile"] = profile
        if not profile["identified"]:
            notes.append(f"E is not identified: {profile['why']}; E, A and the extrapolations that rest on them "
                         f"are unreliable (runs over a wider range of D2 pin E down)")
    if n_boot:
        bootstrap(table, law, n_boot, seed=seed, workers=workers, level=level)
        try:  # intervals for new runs: noise and misfit beside the parameters' spread (calibrate.py)
            calibrate(table, law, level=level, seed=seed)
        except LawError as exc:
            notes.append(f"no calibrated interval for new runs: {exc}")
    result = {"table": table, "law": law, "comparison": None, "holdout": None, "per_d1": None,
              "rollout": None, "loo": None, "notes": notes, "files": {}, "figures": []}
    if "rollout" in checks:
        axis = "D2" if "D2" in form.inputs else form.inputs[-1]
        result["rollout"] = expanding_window(table, form, axis=axis)
    if "loo" in checks:
        result["loo"] = leave_one_out(table, form)
    if holdout and len(names) > 1:
        result["comparison"] = compare_forms(table, names, holdout)
    if holdout:
        try:
            result["holdout"] = holdout_check(table, form, holdout, n_boot=min(n_boot, HOLDOUT_RESAMPLES),
                                              seed=seed, workers=workers, level=level)
        except LawError as exc:
            if strict_holdout:
                raise
            notes.append(f"no held-out check: {exc}")
    if form.inputs == ("D1", "D2"):
        try:
            E = law.params.get("E", "joint")
            result["per_d1"] = per_d1_analysis(table, E=E, E_source=f"shared, from the joint {form.name} fit",
                                               law=law if "E" in law.params else None)
        except LawError as exc:
            notes.append(f"no per-D1 analysis: {exc}")
    if figures:
        from megareuse.law.plots import figure_heldout, figure_per_d1
        for key, make in (("per_d1", figure_per_d1), ("holdout", figure_heldout)):
            if result[key]:
                files, note = make(result[key], table.describe())
                result["files"].update(files)
                if note and note not in notes:
                    notes.append(note)
    result["figures"] = sorted(result["files"])
    return result


def held_out_law(law) -> dict:
    """The law fitted on the training runs, with the unit its parameters are in (the training
    runs choose their own unit, which can differ from the full fit's)."""
    return {"params": law.params, "theta": [float(t) for t in law.theta], "units": law.units,
            "form": law.form.name}


def law_json(result: dict) -> dict:
    out = result["law"].to_dict()
    comp, check, an = result["comparison"], result["holdout"], result["per_d1"]
    if comp:
        out["comparison"] = {"rule": comp["rule"], "selected": comp["selected"], "why": comp["why"],
                             "forms": [{k: r[k] for k in ("form", "n_params", "converged", "mare", "max_abs_rel",
                                                           "rms_log_train", "aic", "bic", "skipped") if k in r}
                                       for r in comp["results"]]}
    if check:
        out["holdout"] = {k: check[k] for k in ("rule", "n_train", "n_test", "mare", "max_abs_rel", "coverage",
                                                 "level", "interval", "coverage_bootstrap", "calibration", "rows")
                          if k in check}
        out["holdout"].update(held_out_law(check["law"]))
    if an:
        out["per_d1"] = {k: an[k] for k in ("E_mode", "E", "alpha_fit", "scale_fit", "notes")}
        out["per_d1"]["rows"] = [{k: r[k] for k in ("D1", "n", "A", "alpha", "E", "rms_log")} for r in an["per_d1"]]
    if result.get("rollout"):
        out["rollout"] = [{k: s[k] for k in ("axis", "train_max", "predict_at", "n_train", "n_test", "mare",
                                             "max_abs_rel", "converged")} for s in result["rollout"]]
    if result.get("loo"):
        out["loo"] = {k: result["loo"][k] for k in ("mare", "max_abs_rel", "n_test", "n_unconverged")}
    out["notes"] = result["notes"]
    return out


def write_fit(result: dict, out_dir) -> list[str]:
    from megareuse.law.report import fit_report
    files = {"law.json": json.dumps(finite_json(law_json(result)), indent=1) + "\n",
             "report.md": fit_report(result), **result["files"]}
    return write_outputs(out_dir, files)


# -- argument checks (one line each) ----------------------------------------------------------
def _int(name: str, text, lo: int) -> int:
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise LawError(f"{name} = {text!r}: accepted an integer >= {lo}") from None
    if value < lo:
        raise LawError(f"{name} = {text!r}: accepted an integer >= {lo}")
    return value


def _pairs(name: str, items: Sequence[str]) -> dict:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise LawError(f"{name} {item!r}: accepted COLUMN=VALUE")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _out_dir(text: str) -> Path:
    return check_output_dir(text, "--out", LawError)


def cmd_fit(args) -> int:
    out = _out_dir(args.out)
    level = float(args.level)
    if not 0 < level < 1:
        raise LawError(f"--level = {args.level!r}: accepted a number between 0 and 1, e.g. 0.9")
    n_boot, workers = _int("--bootstrap", args.bootstrap, 0), _int("--workers", args.workers, 1)
    seed = _int("--seed", args.seed, 0)
    if n_boot == 1:
        raise LawError("--bootstrap = 1: accepted 0 (no intervals) or an integer >= 2")
    table = load_table(args.runs, loss_col=args.loss_col, where=_pairs("--where", args.where),
                       rename=_pairs("--rename", args.rename), loss_unit=args.loss_unit)
    compare = ("auto" if args.compare == "auto" else None if args.compare == "none"
               else [c.strip() for c in args.compare.split(",") if c.strip()])
    checks = [c.strip() for c in args.checks.split(",") if c.strip()] if args.checks else []
    result = analyse(table, args.form, compare, args.holdout or "largest", n_boot, seed, workers, level,
                     strict_holdout=args.holdout is not None, checks=checks)
    paths = write_fit(result, out)
    law = result["law"]
    print(f"{law.label}: " + ", ".join(f"{k}={v:.4g}" for k, v in law.params.items())
          + f"; converged={law.diagnostics['converged']}, RMS log {law.diagnostics['rms_log']:.4g}")
    print("wrote " + ", ".join(paths))
    return 0


def _counts(name: str, text: Optional[str]) -> list[float]:
    if not text:
        return []
    try:
        return [parse_count(t) for t in text.split(",") if t.strip()]
    except LawError as exc:
        raise LawError(f"{name}: {exc}") from None


def _count(name: str, text: Optional[str]) -> Optional[float]:
    values = _counts(name, text)
    if len(values) > 1:
        raise LawError(f"{name} = {text!r}: accepted one number")
    return values[0] if values else None


_TABLE_OPTIONS = ("where", "scratch_where", "scratch_tokens", "loss_col", "loss_unit", "bootstrap", "seed", "level")


def _shared_laws(args) -> tuple:
    """`plan --runs`: the stage-2 and scratch laws fitted on one table with one shared E
    (megareuse.law.shared), the study beside them, and its files."""
    from megareuse.law.sharedstudy import load_pair, shared_files, shared_study
    if args.law or args.scratch_law:
        raise LawError("--runs fits both laws from one table (one shared E): accepted --runs or --law/--scratch-law, "
                       "not both")
    level = float(args.level or 0.9)
    if not 0 < level < 1:
        raise LawError(f"--level = {args.level!r}: accepted a number between 0 and 1, e.g. 0.9")
    n_boot = _int("--bootstrap", args.bootstrap or 200, 0)
    if n_boot == 1:
        raise LawError("--bootstrap = 1: accepted 0 (no intervals) or an integer >= 2")
    reuse, scratch, notes = load_pair(args.runs, _pairs("--where", args.where), _pairs("--scratch-where", args.scratch_where),
                                      args.loss_col or "loss", args.loss_unit or "nats", args.scratch_tokens)
    study = shared_study(reuse, scratch, n_boot, seed=_int("--seed", args.seed or 0, 0), level=level)
    study["notes"] = notes
    names = (", ".join(f"{k}={v}" for k, v in _pairs("--where", args.where).items()),
             ", ".join(f"{k}={v}" for k, v in _pairs("--scratch-where", args.scratch_where).items()))
    return study["shared"].reuse, study["shared"].scratch, study, shared_files(study, names)


def cmd_plan(args) -> int:
    from megareuse.law.law import Law
    from megareuse.law.plan import make_plan
    out = _out_dir(args.out)
    study, extra = None, {}
    if args.runs:
        law, scratch, study, extra = _shared_laws(args)
    else:
        given = [f"--{k.replace('_', '-')}" for k in _TABLE_OPTIONS if getattr(args, k, None)]
        if given:
            raise LawError(f"{given[0]}: only with --runs TABLE (both laws fitted from one table)")
        if not args.law:
            raise LawError("accepted --law LAW.json (a law over D1 and D2), or --runs TABLE with --where and "
                           "--scratch-where (both laws fitted with one shared E)")
        law = Law.load(args.law)
        scratch = Law.load(args.scratch_law) if args.scratch_law else None
    plan = make_plan(law, scratch, D1=_counts("--D1", args.D1), D2=_counts("--D2", args.D2),
                     budget_tokens=_count("--budget-tokens", args.budget_tokens),
                     budget_flops=_count("--budget-flops", args.budget_flops),
                     N=_count("--N", args.N), N_base=_count("--N-base", args.N_base))
    from megareuse.law.plots import figure_plan
    from megareuse.law.report import plan_report
    files, note = figure_plan(plan, law, scratch)
    text = plan_report(plan, "plan.png" if files else None, [note] if note else [])
    paths = write_outputs(out, {"plan.json": json.dumps(finite_json(plan), indent=1) + "\n", "plan.md": text, **files,
                                **extra})
    if study is not None:
        from megareuse.law.sharedstudy import summary_line
        print(summary_line(study))
    for line in plan_lines(plan):
        print(line)
    print("wrote " + ", ".join(paths))
    return 0


def plan_lines(plan: dict) -> list[str]:
    """The planner's answers in a few lines: each D1 threshold, and the budget's split and verdict."""
    from megareuse.law.report import _interval_text, _threshold_text
    lines = []
    for t in plan["thresholds"]:
        iv = t.get("interval")
        lines.append(f"D2={t['D2']:.4g}, {t['view']}: reuse saves nothing beyond D1 = {_threshold_text(t)}"
                     + (f" {_interval_text(iv)}" if iv else f" ({t.get('note', '')})")
                     + (f"; it saves from D1 = {t['saves_from']:.4g}" if t["saves_from"] else ""))
    s = plan["split"]
    if s:
        line = f"best split: D1={s['D1']:.4g}, D2={s['D2']:.4g} tokens, loss {s['loss']:.4g}"
        if "decision" in s:
            iv = s["saving_interval"]
            line += (f"; scratch loss {s['scratch_loss']:.4g}; saving {s['saving']:.4g}"
                     + (f" [{iv[0]:.4g}, {iv[1]:.4g}]" if iv else "") + f" -> {s['verdict']}")
        lines.append(line)
    return lines


def register(subparsers) -> None:
    """Add `fit` and `plan` to an argparse subparsers object."""
    p = subparsers.add_parser("fit", allow_abbrev=False,
                              help="fit a scaling law to a run table; check it on held-out runs")
    p.add_argument("--runs", required=True, help="CSV/TSV/JSONL table: D1, D2 (or N, D, or D) and a loss column")
    p.add_argument("--form", default=None, help=f"the law to fit: {', '.join(available_forms())} "
                                                f"(default: reuse for D1/D2 tables)")
    p.add_argument("--compare", default="auto", help="forms to compare on the held-out split: 'auto' "
                                                     "(all the columns allow), 'none', or a comma list")
    p.add_argument("--holdout", default=None, help="'largest' (default), 'none', or thresholds like "
                                                   "'D2>=1M', 'D1>=4M|D2>=1M'")
    p.add_argument("--checks", default="", help="further checks, comma list: rollout (expanding window "
                                                "over D2), loo (leave one run out)")
    p.add_argument("--bootstrap", default="200", help="bootstrap resamples (0 = no intervals)")
    p.add_argument("--workers", default="1", help="processes for the bootstrap")
    p.add_argument("--seed", default="0")
    p.add_argument("--level", default="0.9", help="interval level")
    p.add_argument("--loss-col", default="loss", help="the loss column, e.g. valid_loss_code")
    p.add_argument("--loss-unit", default="nats", help="the unit the loss is given in: nats (default) or bits; "
                                                       "it labels the report and law.json, converts nothing")
    p.add_argument("--where", action="append", default=[], help="keep rows with COLUMN=VALUE (repeatable)")
    p.add_argument("--rename", action="append", default=[], help="use a table column as a law column, e.g. D=D2")
    p.add_argument("--out", required=True, help="output directory: law.json, report.md, figures")
    p.set_defaults(func=cmd_fit, value_errors=True)

    p = subparsers.add_parser("plan", allow_abbrev=False,
                              help="reuse or from scratch? answers from fitted laws")
    p.add_argument("--law", default=None, help="law.json of a law over D1 and D2 (or --runs)")
    p.add_argument("--scratch-law", default=None, help="law.json of a from-scratch law (power or chinchilla)")
    p.add_argument("--runs", default=None, help="instead of --law/--scratch-law: a run table holding a stage-2 series "
                                                "(--where) and the scratch series of its model on its target domain "
                                                "(--scratch-where), fitted together with one shared E")
    p.add_argument("--where", action="append", default=[], help="with --runs: the stage-2 rows, COLUMN=VALUE "
                                                                "(repeatable), e.g. series=cpt")
    p.add_argument("--scratch-where", action="append", default=[], help="with --runs: the scratch rows, COLUMN=VALUE "
                                                                        "(repeatable), e.g. series=scratch_code")
    p.add_argument("--scratch-tokens", default=None, help="with --runs: the scratch rows' token column (default D, "
                                                          "else tokens)")
    p.add_argument("--loss-col", default=None, help="with --runs: the loss column of both series (default loss)")
    p.add_argument("--loss-unit", default=None, help="with --runs: nats (default) or bits")
    p.add_argument("--bootstrap", default=None, help="with --runs: joint resamples (default 200; 0 = no intervals)")
    p.add_argument("--seed", default=None, help="with --runs: bootstrap seed (default 0)")
    p.add_argument("--level", default=None, help="with --runs: interval level (default 0.9)")
    p.add_argument("--D1", default=None, help="base tokens, comma list (e.g. 1M,4M); default: the data's range")
    p.add_argument("--D2", default=None, help="stage-2 tokens, comma list; default: the data's range and beyond")
    p.add_argument("--budget-tokens", default=None, help="total tokens D1 + D2 to split")
    p.add_argument("--budget-flops", default=None, help="total FLOPs 6 N_base D1 + 6 N D2 to split")
    p.add_argument("--N", default=None, help="parameters of the stage-2 (and from-scratch) model")
    p.add_argument("--N-base", default=None, help="parameters of the base model (default: N)")
    p.add_argument("--out", required=True, help="output directory: plan.json, plan.md, plan.png")
    p.set_defaults(func=cmd_plan, value_errors=True)
