"""Per-D1 analysis (the seed paper's Figure 1).

For each base size D1, fit loss against D2 with the `power` form, L = A(D1) * D2^(-alpha(D1)) + E,
giving a scale factor A(D1) and an exponent alpha(D1); then fit alpha(D1) = a2 - a3 ln D1
(log-linear) and A(D1) = A * D1^(-a1) (power). Under the `reuse` law these recover its
parameters exactly, so the two views check each other.

E is shared across D1 by default (taken from a joint `reuse` fit, or given): with four or five
D2 points per D1 a separate E per D1 is poorly determined (the pilot's lesson). `E="free"`
fits E per D1 (at least 4 points each) for comparison.
"""
from __future__ import annotations

from typing import Optional, Union

import numpy as np

from megareuse.law.data import LawError, RunTable, table_from_arrays
from megareuse.law.fit import choose_units, fit_form
from megareuse.law.forms import get_form
from megareuse.law.resampling import _draw, group_members


def _ols(x: np.ndarray, y: np.ndarray) -> dict:
    """y = intercept + slope * x, with standard errors and R^2."""
    X = np.column_stack([np.ones_like(x), x])
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    resid = y - X @ coef
    dof = len(x) - 2
    out = {"intercept": float(coef[0]), "slope": float(coef[1]), "n": len(x)}
    sst = float(np.sum((y - y.mean()) ** 2))
    out["r2"] = float(1 - resid @ resid / sst) if sst > 0 else float("nan")
    if dof > 0:
        cov = (resid @ resid / dof) * np.linalg.inv(X.T @ X)
        out["se_intercept"], out["se_slope"] = float(np.sqrt(cov[0, 0])), float(np.sqrt(cov[1, 1]))
    else:
        out["se_intercept"] = out["se_slope"] = float("nan")
    return out


def _shared_E_row(sub: RunTable, d1: float, E_value: float, u: float) -> Optional[dict]:
    """The power fit over D2 at one D1 with E fixed: ln(L - E) = ln A(D1) - alpha(D1) ln D2."""
    keep = sub.loss > E_value
    if keep.sum() < 2 or len(np.unique(sub.columns["D2"][keep])) < 2:
        return None
    x, z = np.log(sub.columns["D2"][keep] / u), np.log(sub.loss[keep] - E_value)
    fit = _ols(x, z)
    pred = np.exp(fit["intercept"] + fit["slope"] * np.log(sub.columns["D2"] / u)) + E_value
    return {"D1": float(d1), "n": len(sub), "A": float(np.exp(fit["intercept"])), "alpha": -fit["slope"],
            "E": E_value, "converged": True, "rms_log": float(np.sqrt(np.mean(np.log(pred / sub.loss) ** 2)))}


def _regress(per: list, u: float) -> tuple[dict, dict]:
    """alpha(D1) = a2 - a3 ln D1 and ln A(D1) = ln A - a1 ln D1 over the per-D1 rows."""
    lnd1 = np.log(np.array([r["D1"] for r in per]) / u)
    alpha = _ols(lnd1, np.array([r["alpha"] for r in per]))
    scale = _ols(lnd1, np.log([r["A"] for r in per]))
    return ({"a2": alpha["intercept"], "a3": -alpha["slope"], "se_a2": alpha["se_intercept"],
             "se_a3": alpha["se_slope"], "r2": alpha["r2"]},
            {"A": float(np.exp(scale["intercept"])), "a1": -scale["slope"], "se_lnA": scale["se_intercept"],
             "se_a1": scale["se_slope"], "r2": scale["r2"]})


def _d1_groups(table: RunTable, min_points: int, notes: list):
    """(D1, its runs) for each D1 with at least ``min_points`` D2 values (a note for the others)."""
    for d1 in np.unique(table.columns["D1"]):
        sub = table.subset(table.columns["D1"] == d1)
        if len(np.unique(sub.columns["D2"])) < min_points:
            notes.append(f"D1 = {d1:.4g}: {len(sub)} runs, fewer than {min_points} D2 values; skipped")
            continue
        yield d1, sub


def _shared_E_rows(table: RunTable, E_value: float, u: float, min_points: int, notes: list) -> list:
    per = []
    for d1, sub in _d1_groups(table, min_points, notes):
        row = _shared_E_row(sub, d1, E_value, u)
        if row is None:
            notes.append(f"D1 = {d1:.4g}: fewer than 2 losses above E = {E_value:.4g}; skipped")
            continue
        row.update({"D2": sub.columns["D2"].tolist(), "loss": sub.loss.tolist()})
        per.append(row)
    return per


def bootstrap_regressions(table: RunTable, law, u: float, min_points: int) -> Optional[dict]:
    """Percentile intervals of a3, a2 and a1 from the per-D1 regressions redone on each of the
    law's bootstrap resamples (the same rows, with that resample's E): E's uncertainty included."""
    boot = law.bootstrap
    if not boot or "E" not in law.params or len(boot.get("index", [])) != len(boot["theta"]):
        return None
    draws, members = [], group_members(table.group)
    for theta, i in zip(boot["theta"], boot["index"]):
        sub = table.subset(_draw(members, boot["seed"], int(i)))
        per = _shared_E_rows(sub, law.form.params_from_theta(theta)["E"], u, min_points, [])
        if len(per) >= 2:
            alpha, scale = _regress(per, u)
            draws.append((alpha["a3"], alpha["a2"], scale["a1"]))
    if len(draws) < 2:
        return None
    tail = 50.0 * (1.0 - boot["level"])
    lo, hi = np.percentile(draws, tail, axis=0), np.percentile(draws, 100.0 - tail, axis=0)
    out = {k: [float(a), float(b)] for k, a, b in zip(("a3", "a2", "a1"), lo, hi)}
    return {"intervals": out, "level": boot["level"], "n_resamples": len(draws),
            "a3_excludes_zero": bool(out["a3"][0] > 0 or out["a3"][1] < 0)}


def per_d1_analysis(table: RunTable, E: Union[str, float] = "joint", min_points: int = 3,
                    E_source: str = "given", law=None) -> dict:
    """Per-D1 power fits over D2, then the fits of exponent and scale factor against D1.
    E: "joint" (fit reuse jointly first), "free" (per D1), or a number (labelled E_source).
    law: the joint law with bootstrap samples; with a shared E, the regressions are redone on
    each of its resamples (with that resample's E) for intervals that include E's uncertainty."""
    table.require(["D1", "D2"], "the per-D1 analysis")
    if not isinstance(min_points, int) or min_points < 2:
        raise LawError(f"min_points = {min_points!r}: accepted an integer >= 2")
    units = choose_units(table, get_form("reuse"))
    u = units["tokens"]
    notes = []
    if E == "joint":
        law = fit_form(table, "reuse") if law is None else law
        E_value, E_mode = law.params["E"], "shared, from the joint reuse fit"
        if not law.diagnostics["converged"]:
            notes.append("the joint reuse fit that supplies E did not converge")
    elif E == "free":
        E_value, E_mode = None, "free per D1 (power fit of 3 parameters each)"
        min_points = max(min_points, 4)
    elif isinstance(E, (int, float)) and np.isfinite(E) and E >= 0:
        E_value, E_mode = float(E), str(E_source)
    else:
        raise LawError(f"E = {E!r}: accepted 'joint', 'free' or a non-negative number")
    per = _free_E_rows(table, units, min_points, notes) if E_value is None else \
        _shared_E_rows(table, E_value, u, min_points, notes)
    if len(per) < 2:
        raise LawError(f"the per-D1 analysis needs at least 2 D1 values with {min_points} or more D2 "
                       f"values each; found {len(per)}")
    alpha, scale = _regress(per, u)
    boot = bootstrap_regressions(table, law, u, min_points) if E_value is not None and law is not None else None
    if boot:
        alpha.update(a3_interval=boot["intervals"]["a3"], a2_interval=boot["intervals"]["a2"],
                     a3_excludes_zero=boot["a3_excludes_zero"], level=boot["level"],
                     n_resamples=boot["n_resamples"])
        scale["a1_interval"] = boot["intervals"]["a1"]
    elif E_value is not None:
        notes.append("the standard errors treat the shared E as known (no bootstrap resamples of the joint law "
                     "to redo the regressions on): they understate the uncertainty of a3")
    return {"E_mode": E_mode, "E": E_value, "units": units, "per_d1": per, "notes": notes,
            "alpha_fit": alpha, "scale_fit": scale}


def _free_E_rows(table: RunTable, units: dict, min_points: int, notes: list) -> list:
    per = []
    for d1, sub in _d1_groups(table, min_points, notes):
        law = fit_form(table_from_arrays(sub.loss, D=sub.columns["D2"]), "power", units=units)
        per.append({"D1": float(d1), "n": len(sub), "D2": sub.columns["D2"].tolist(), "loss": sub.loss.tolist(),
                    "A": law.params["A"], "alpha": law.params["a"], "E": law.params["E"],
                    "converged": law.diagnostics["converged"], "rms_log": law.diagnostics["rms_log"]})
    return per
