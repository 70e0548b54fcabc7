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

from typing import Union

import numpy as np

from megareuse.law.data import LawError, RunTable, table_from_arrays
from megareuse.law.fit import choose_units, fit_form
from megareuse.law.forms import get_form


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


def per_d1_analysis(table: RunTable, E: Union[str, float] = "joint", min_points: int = 3,
                    E_source: str = "given") -> dict:
    """Per-D1 power fits over D2, then the fits of exponent and scale factor against D1.
    E: "joint" (fit reuse jointly first), "free" (per D1), or a number (labelled E_source)."""
    table.require(["D1", "D2"], "the per-D1 analysis")
    if not isinstance(min_points, int) or min_points < 2:
        raise LawError(f"min_points = {min_points!r}: accepted an integer >= 2")
    units = choose_units(table, get_form("reuse"))
    u = units["tokens"]
    notes = []
    if E == "joint":
        joint = fit_form(table, "reuse")
        E_value, E_mode = joint.params["E"], "shared, from the joint reuse fit"
        if not joint.diagnostics["converged"]:
            notes.append("the joint reuse fit that supplies E did not converge")
    elif E == "free":
        E_value, E_mode = None, "free per D1 (power fit of 3 parameters each)"
        min_points = max(min_points, 4)
    elif isinstance(E, (int, float)) and np.isfinite(E) and E >= 0:
        E_value, E_mode = float(E), str(E_source)
    else:
        raise LawError(f"E = {E!r}: accepted 'joint', 'free' or a non-negative number")
    per = []
    for d1 in np.unique(table.columns["D1"]):
        sub = table.subset(table.columns["D1"] == d1)
        if len(np.unique(sub.columns["D2"])) < min_points:
            notes.append(f"D1 = {d1:.4g}: {len(sub)} runs, fewer than {min_points} D2 values; skipped")
            continue
        row = {"D1": float(d1), "n": len(sub), "D2": sub.columns["D2"].tolist(), "loss": sub.loss.tolist()}
        if E_value is None:
            law = fit_form(table_from_arrays(sub.loss, D=sub.columns["D2"]), "power", units=units)
            row.update({"A": law.params["A"], "alpha": law.params["a"], "E": law.params["E"],
                        "converged": law.diagnostics["converged"], "rms_log": law.diagnostics["rms_log"]})
        else:
            keep = sub.loss > E_value
            if keep.sum() < 2:
                notes.append(f"D1 = {d1:.4g}: fewer than 2 losses above E = {E_value:.4g}; skipped")
                continue
            x, z = np.log(sub.columns["D2"][keep] / u), np.log(sub.loss[keep] - E_value)
            fit = _ols(x, z)
            pred = np.exp(fit["intercept"] + fit["slope"] * np.log(sub.columns["D2"] / u)) + E_value
            row.update({"A": float(np.exp(fit["intercept"])), "alpha": -fit["slope"], "E": E_value,
                        "converged": True, "rms_log": float(np.sqrt(np.mean(np.log(pred / sub.loss) ** 2)))})
        per.append(row)
    if len(per) < 2:
        raise LawError(f"the per-D1 analysis needs at least 2 D1 values with {min_points} or more D2 "
                       f"values each; found {len(per)}")
    lnd1 = np.log(np.array([r["D1"] for r in per]) / u)
    alpha = _ols(lnd1, np.array([r["alpha"] for r in per]))
    scale = _ols(lnd1, np.log([r["A"] for r in per]))
    return {"E_mode": E_mode, "E": E_value, "units": units, "per_d1": per, "notes": notes,
            "alpha_fit": {"a2": alpha["intercept"], "a3": -alpha["slope"], "se_a2": alpha["se_intercept"],
                          "se_a3": alpha["se_slope"], "r2": alpha["r2"]},
            "scale_fit": {"A": float(np.exp(scale["intercept"])), "a1": -scale["slope"],
                          "se_lnA": scale["se_intercept"], "se_a1": scale["se_slope"], "r2": scale["r2"]}}
