"""Is the floor E identified by the runs? A profile of the fit over E.

For each E on a grid from 0 to just below the lowest observed loss, the other parameters are
refitted with E held fixed (least squares on log loss, started from the fit) and the Gaussian
deviance n ln(SSR(E) / SSR_min) is recorded. The profile interval is the set of E whose
deviance is within the chi-square(1) quantile at the level. E is flagged as not identified
when that interval reaches E = 0 or the lowest loss (the runs cannot tell the floor from a
slower decay), or when it is wider than the reducible loss left at the best run
(lowest loss - E): the runs do not show where the curve flattens.
"""
from __future__ import annotations

import warnings

import numpy as np
from scipy.optimize import least_squares
from scipy.special import chdtri

from megareuse.law.data import RunTable
from megareuse.law.fit import log_inputs
from megareuse.law.forms import LOG_COEF_BOUNDS
from megareuse.law.law import Law

N_GRID = 25
WIDTH = 0.5  # flag a profile interval wider than this share of the reducible loss at the best run
TOP = 0.995  # the grid's last E, as a share of the lowest loss


def _refit_fixed(form, theta0, fixed: int, value: float, lx, logy, sw):
    """Least-squares refit of log loss with raw parameter `fixed` held at `value`."""
    free = [i for i in range(form.n_params) if i != fixed]
    lo, hi = np.array(form.raw_bounds()).T

    def full(x):
        theta = np.empty(form.n_params)
        theta[free], theta[fixed] = x, value
        return theta

    def resid(x):
        with np.errstate(all="ignore"):
            r = sw * (form.log_predict(full(x), lx) - logy)
        return np.where(np.isfinite(r), r, 1e3)

    def jac(x):
        with np.errstate(all="ignore"):
            _, J = form.log_predict_jac(full(x), lx)
        J = sw[:, None] * J[:, free]
        return np.where(np.isfinite(J), J, 0.0)

    x0 = np.clip(np.asarray(theta0, dtype=float)[free], lo[free] + 1e-9, hi[free] - 1e-9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = least_squares(resid, x0, jac=jac, bounds=(lo[free], hi[free]), method="trf",
                            xtol=1e-10, ftol=1e-12, gtol=1e-10, max_nfev=300)
    return full(res.x), float(res.fun @ res.fun)


def profile_E(table: RunTable, law: Law, level: float = 0.9, n_grid: int = N_GRID) -> dict:
    """Profile deviance over E; returns the grid, the interval and whether E is identified."""
    form = law.form
    if "E" not in form.linear:
        return {}
    fixed = form.linear.index("E")
    lx = log_inputs(table, form, law.units)
    logy, sw = np.log(table.loss), np.sqrt(table.weight / np.mean(table.weight))
    best, ssr_min = _refit_fixed(form, law.theta, fixed, law.theta[fixed], lx, logy, sw)
    lowest = float(table.loss.min())
    grid = lowest * np.linspace(0.0, TOP, n_grid)
    ssr, theta = [], law.theta
    for E in grid:  # warm start along the grid
        raw = np.log(E) if E > 0 else LOG_COEF_BOUNDS[0]
        theta, s = _refit_fixed(form, theta, fixed, raw, lx, logy, sw)
        ssr.append(s)
    ssr_min = max(min([ssr_min] + ssr), 1e-300)
    deviance = len(table) * np.log(np.maximum(np.array(ssr), 1e-300) / ssr_min)
    threshold = float(chdtri(1, 1 - level))  # chi2.ppf(level, 1) without importing scipy.stats
    inside = np.flatnonzero(deviance <= threshold)
    return _verdict(law.params["E"], grid, deviance, inside, threshold, lowest, level)


def _crossing(grid, deviance, i: int, j: int, threshold: float) -> float:
    """E between grid points i (outside) and j (inside) where the deviance crosses the threshold."""
    d_out, d_in = deviance[i], deviance[j]
    t = (d_out - threshold) / (d_out - d_in) if d_out != d_in else 0.0
    return float(grid[i] + t * (grid[j] - grid[i]))


def _verdict(E_hat, grid, deviance, inside, threshold, lowest, level) -> dict:
    out = {"grid": grid.tolist(), "deviance": deviance.tolist(), "threshold": threshold, "level": level,
           "lowest_loss": lowest}
    if not len(inside):  # the interval is narrower than the grid step: E is pinned down
        out.update(interval=[float(E_hat), float(E_hat)], identified=True, why="")
        return out
    first, last = inside[0], inside[-1]
    lo = 0.0 if first == 0 else _crossing(grid, deviance, first - 1, first, threshold)
    hi = lowest if last == len(grid) - 1 else _crossing(grid, deviance, last + 1, last, threshold)
    lo, hi = min(lo, E_hat), max(hi, E_hat)
    out["interval"] = [lo, hi]
    pct = f"{int(round(100 * level))}%"
    if first == 0:
        why = f"the runs fit as well with E = 0 ({pct} profile interval [0, {hi:.4g}])"
    elif last == len(grid) - 1:
        why = (f"the runs fit as well with E up to the lowest loss {lowest:.4g} "
               f"({pct} profile interval [{lo:.4g}, {hi:.4g}])")
    elif hi - lo > WIDTH * (lowest - E_hat):
        why = (f"its {pct} profile interval [{lo:.4g}, {hi:.4g}] is wider than {WIDTH:g} x the reducible loss "
               f"at the best run ({lowest:.4g} - {E_hat:.4g}): the runs do not show where the loss flattens")
    else:
        why = ""
    out.update(identified=not why, why=why)
    return out
