"""Checks against larger runs: hold-out splits, expanding-window rollout, leave-one-out, and a
comparison of every form on the same split.

Hold-out rules (fit on the rest, predict the held-out runs):
  largest            runs at the largest value of any input (the outer edge of the grid)
  D2>=1M             a threshold; K, M, B, T suffixes; >=, >, <=, <
  D1>=4M|D2>=1M      '|' = or, '&' = and
Model selection (the one-standard-error rule): among the forms whose mean absolute relative
error on the held-out runs is within one standard error of the lowest (the standard error of
that best form's per-run errors), the one with the fewest parameters.
"""
from __future__ import annotations

import re
from typing import Optional, Sequence

import numpy as np

from megareuse.law.resampling import bootstrap
from megareuse.law.data import LawError, RunTable, parse_count
from megareuse.law.fit import blas_single_thread, check_table, distinct_runs, fit_form, runs_needed
from megareuse.law.forms import Form, available_forms, forms_for_columns, get_form

_COND = re.compile(r"^\s*(D1|D2|N|D)\s*(>=|<=|>|<)\s*([0-9.eE+\-]+[KMBGTkmbgt]?)\s*$")
_OPS = {">=": np.greater_equal, ">": np.greater, "<=": np.less_equal, "<": np.less}


def holdout_mask(table: RunTable, rule: str, inputs: Sequence[str]) -> np.ndarray:
    """Boolean mask of held-out runs for a rule (see the module docstring)."""
    if not isinstance(rule, str) or not rule.strip():
        raise LawError(f"holdout = {rule!r}: accepted 'largest', 'D2>=1M', 'D1>=4M|D2>=1M', 'none'")
    if rule.strip() == "largest":
        mask = np.zeros(len(table), dtype=bool)
        for c in inputs:  # a column with one value (one model size N, say) has no outer edge
            if len(np.unique(table.columns[c])) > 1:
                mask |= table.columns[c] >= table.columns[c].max()
    else:
        mask = np.zeros(len(table), dtype=bool)
        for clause in rule.split("|"):
            part = np.ones(len(table), dtype=bool)
            for cond in clause.split("&"):
                m = _COND.match(cond)
                if not m:
                    raise LawError(f"holdout = {rule!r}: cannot read {cond.strip()!r}; accepted 'largest' "
                                   f"or conditions like D2>=1M joined by | (or) and & (and)")
                col, op, value = m.groups()
                if col not in table.columns:
                    raise LawError(f"holdout = {rule!r}: column {col!r} missing; columns present: "
                                   f"{', '.join(table.columns)}")
                part &= _OPS[op](table.columns[col], parse_count(value))
            mask |= part
    if mask.all() or not mask.any():
        ranges = "; ".join(f"{c} {table.columns[c].min():.4g}..{table.columns[c].max():.4g}" for c in inputs)
        raise LawError(f"holdout = {rule!r} holds out {int(mask.sum())} of {len(table)} runs; accepted a rule "
                       f"that leaves runs on both sides ({ranges})")
    return mask


def _rows(law, test: RunTable, interval=None, bootstrap_interval=None) -> list[dict]:
    """Per run: observed, predicted, relative error; lo, hi, inside for `interval`, and
    lo_bootstrap, hi_bootstrap, inside_bootstrap for the bootstrap interval when both are given."""
    rows = law.residuals(test)
    for i, row in enumerate(rows):
        for suffix, iv in (("", interval), ("_bootstrap", bootstrap_interval)):
            if iv is not None:
                lo, hi = float(iv[0][i]), float(iv[1][i])
                row.update({"lo" + suffix: lo, "hi" + suffix: hi, "inside" + suffix: bool(lo <= row["observed"] <= hi)})
    return rows


def _summary(rows: list[dict]) -> dict:
    err = np.abs([r["rel_err"] for r in rows])
    out = {"n_test": len(rows), "mare": float(err.mean()), "max_abs_rel": float(err.max())}
    for suffix in ("", "_bootstrap"):
        if rows and "inside" + suffix in rows[0]:
            out["coverage" + suffix] = float(np.mean([r["inside" + suffix] for r in rows]))
    return out


CALIBRATION_KEYS = ("method", "level", "scale", "scale_conformal", "rank", "rank_exact", "n_scores", "n_resamples",
                    "noise", "misfit", "axes", "n_folds", "n_folds_skipped", "n_folds_unconverged", "notes")


def _calibrated(train: RunTable, law, test: RunTable, level: float, seed: int):
    """Calibrate the training law on its own runs (calibrate.py) and give the held-out runs'
    calibrated intervals; (None, {"skipped": why}) when the training runs cannot calibrate it."""
    from megareuse.law.calibrate import calibrate, calibrated_interval
    try:
        cal = calibrate(train, law, level=level, seed=seed)
    except LawError as exc:
        return None, {"skipped": str(exc)}
    return calibrated_interval(law, test, level), {k: cal[k] for k in CALIBRATION_KEYS}


def holdout_check(table: RunTable, form, rule: str = "largest", n_boot: int = 200, seed: int = 0,
                  workers: int = 1, level: float = 0.9, calibrated: bool = True) -> dict:
    """Fit on the runs the rule keeps, predict the held-out ones: per run predicted, observed,
    relative error and, when n_boot >= 2, whether it falls inside each prediction interval.

    Two intervals: the bootstrap one as before (parameter resamples times a resampled in-sample
    residual: `lo_bootstrap`, `hi_bootstrap`, `coverage_bootstrap`) and, with calibrated=True,
    the calibrated one (calibrate.py: noise and misfit from one-level-ahead errors of refits on
    the training runs, a rolling origin), which is then `lo`, `hi`, `inside`, `coverage`; `interval` names which one
    `lo`/`hi` are (the bootstrap one when the training runs cannot calibrate, with `calibration`
    saying why)."""
    form = get_form(form)
    table.require(form.inputs, f"form {form.name}")
    mask = holdout_mask(table, rule, form.inputs)
    train, test = table.subset(~mask), table.subset(mask)
    boot_iv = cal_iv = calibration = None
    with blas_single_thread():
        law = fit_form(train, form)
        if n_boot:
            bootstrap(train, law, n_boot, seed=seed, workers=workers, level=level)
            boot_iv = law.interval(test, level=level, noise=True)
            if calibrated:
                cal_iv, calibration = _calibrated(train, law, test, level, seed)
    rows = _rows(law, test, cal_iv, boot_iv) if cal_iv is not None else _rows(law, test, boot_iv)
    out = {"rule": rule, "form": form.name, "n_train": len(train), "law": law, "rows": rows,
           "level": level if n_boot else None, **_summary(rows)}
    if n_boot:
        out["interval"] = "calibrated" if cal_iv is not None else "bootstrap"
        out["coverage_bootstrap"] = out.get("coverage_bootstrap", out["coverage"])
        if calibration is not None:
            out["calibration"] = calibration
    return out


def _select(results: list[dict]) -> tuple[Optional[str], str]:
    ok = [r for r in results if "mare" in r and r["converged"]]
    if not ok and results and all("skipped" in r for r in results):
        return None, "every form skipped: " + "; ".join(f"{r['form']} skipped: {r['skipped']}" for r in results)
    if not ok:
        return None, "no form converged on the training runs"
    best = min(ok, key=lambda r: r["mare"])
    err = np.asarray(best["abs_err"])
    se = float(np.std(err, ddof=1) / np.sqrt(len(err))) if len(err) > 1 else 0.0
    chosen = min((r for r in ok if r["mare"] <= best["mare"] + se), key=lambda r: (r["n_params"], r["mare"]))
    if chosen is best:
        return best["form"], f"{best['form']} has the lowest held-out error"
    return chosen["form"], (f"{chosen['form']} ({chosen['n_params']} parameters) is within one standard error "
                            f"({100 * se:.2f}%) of the lowest held-out error, {best['form']}'s "
                            f"({best['n_params']} parameters)")


def auto_forms(columns) -> list[str]:
    """What `--compare auto` compares: the registered forms these columns serve, then those they
    would serve but for the model size N (listed as skipped, so a table without N says why the
    joint forms are missing)."""
    short_of_n = [name for name in available_forms() if "N" in get_form(name).inputs and "N" not in columns
                  and len(get_form(name).inputs) > 1
                  and all(c in columns for c in get_form(name).inputs if c != "N")]
    return forms_for_columns(columns) + short_of_n


def _unidentified(table: RunTable, form: Form) -> Optional[str]:
    """Why the table cannot identify the form (a missing input, too few distinct values), or None."""
    missing = [c for c in form.inputs if c not in table.columns]
    if missing:
        what = " (the model size: non-embedding parameters, as run records carry it)" if missing[0] == "N" else ""
        return (f"column {missing[0]!r}{what} missing from {table.source}; form {form.name} needs "
                f"{', '.join(form.inputs)}")
    for c in form.inputs:
        n, need = len(np.unique(table.columns[c])), form.min_levels.get(c, 2)
        if n < need:
            single = f"a single value ({table.columns[c][0]:g})" if n == 1 else f"{n} distinct values"
            return (f"column {c!r} has {single} in the training runs; form {form.name} needs at least "
                    f"{need} distinct values of {c}")
    return None


def compare_forms(table: RunTable, forms: Optional[Sequence] = None, rule: str = "largest") -> dict:
    """Fit every form on the same training runs and score it on the same held-out runs. Forms the
    training runs cannot identify (no N column, one model size) are listed as skipped, with why."""
    names = [get_form(f).name for f in forms] if forms else auto_forms(table.columns)
    if not names:
        raise LawError(f"no registered form fits the columns of {table.source}: "
                       f"{', '.join(table.columns) or 'none'}")
    inputs = sorted({c for n in names for c in get_form(n).inputs if c in table.columns})
    mask = holdout_mask(table, rule, inputs)
    train, test = table.subset(~mask), table.subset(mask)
    results = []
    with blas_single_thread():
        for name in names:
            form: Form = get_form(name)
            why = _unidentified(train, form)
            if why:
                results.append({"form": name, "n_params": form.n_params, "skipped": why})
                continue
            n, need = distinct_runs(train, form), runs_needed(form)
            if n < need:
                results.append({"form": name, "n_params": form.n_params, "skipped": f"{n} runs, needs {need}"})
                continue
            try:
                check_table(train, form)
                law = fit_form(train, form)
            except LawError as exc:
                results.append({"form": name, "n_params": form.n_params, "skipped": str(exc)})
                continue
            rows = _rows(law, test)
            results.append({"form": name, "n_params": form.n_params, "law": law,
                            "converged": law.diagnostics["converged"], "rms_log_train": law.diagnostics["rms_log"],
                            "aic": law.diagnostics["aic"], "bic": law.diagnostics["bic"],
                            "abs_err": [abs(r["rel_err"]) for r in rows], "rows": rows, **_summary(rows)})
    selected, why = _select(results)
    return {"rule": rule, "n_train": len(train), "n_test": len(test), "results": results,
            "selected": selected, "why": why}


def expanding_window(table: RunTable, form, axis: str = "D2") -> list[dict]:
    """Fit on runs with axis <= each value in turn, predict the runs at the next value."""
    form = get_form(form)
    table.require(list(form.inputs) + [axis], f"form {form.name}")
    values = np.unique(table.columns[axis])
    steps = []
    with blas_single_thread():
        for lo, nxt in zip(values[:-1], values[1:]):
            train = table.subset(table.columns[axis] <= lo)
            try:
                check_table(train, form)
            except LawError:
                continue
            law = fit_form(train, form)
            rows = _rows(law, table.subset(table.columns[axis] == nxt))
            steps.append({"axis": axis, "train_max": float(lo), "predict_at": float(nxt), "n_train": len(train),
                          "converged": law.diagnostics["converged"], "rows": rows, **_summary(rows)})
    if not steps:
        raise LawError(f"expanding window over {axis}: no step has enough runs for form {form.name} "
                       f"({form.n_params} parameters, 2 distinct values of each input)")
    return steps


def leave_one_out(table: RunTable, form) -> dict:
    """Leave each run (or group) out in turn, fit the rest, predict it."""
    form = get_form(form)
    check_table(table, form)
    full = fit_form(table, form)
    rows, unconverged = [], 0
    with blas_single_thread():
        for g in np.unique(table.group):
            out = table.group == g
            try:
                law = fit_form(table.subset(~out), form, starts=[full.theta])
            except LawError:
                continue
            unconverged += not law.diagnostics["converged"]
            rows += _rows(law, table.subset(out))
    if not rows:
        raise LawError(f"leave-one-out: no fold has enough runs for form {form.name}")
    return {"form": form.name, "rows": rows, "n_unconverged": unconverged, **_summary(rows)}
