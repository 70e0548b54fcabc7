"""Calibrated prediction intervals: parameter uncertainty, run-to-run noise and misfit.

The bootstrap interval of a prediction (resampling.py) says how far the law's parameters could
move. A new run also differs from the law by its own noise (another data order, another loss)
and by the law's misfit (the form is not the truth, and the gap grows as the law extrapolates).
The calibrated interval adds one term for both, in log loss:

    ln L_new in [c - sqrt(h_lo^2 + (z s)^2),  c + sqrt(h_hi^2 + (z s)^2)]

c the point prediction, h_lo and h_hi the distances from c to the ends of the bootstrap
(parameter-only) percentile interval, z the normal quantile of the level and s the scale of the
residual term. Independent errors add variances, hence the quadrature; s = 0 gives the
parameter-only interval back, and the interval grows with s (a nested family).

s is set from out-of-sample errors of the law's own kind of use, extrapolation to larger runs:

- rolling origin (an expanding window, as for forecasts): along each input with 3+ levels
  (D2, D1, ...), for each level v beyond the first two the law is refitted on the runs below v
  and predicts the runs at v; e_i = ln observed - ln predicted. Each error is one level of
  extrapolation, as the held-out check's largest runs are.
- each e_i gets the score s_i = the smallest s whose interval at x_i, built as above from the
  refit's own bootstrap (FOLD_RESAMPLES resamples of its window), contains it:
  sqrt(max(e_i^2 - h_i^2, 0)) / z with h_i on the side of e_i. The score is the error beyond the
  refit's parameter uncertainty, measured as the final interval measures it (a standardized
  out-of-sample error, as PRESS residuals are in linear regression). A window too small for
  its resamples to refit (e.g. 6 runs for 5 parameters) gives h_i = 0: the whole error counts.
- s = the ceil((n + 1) level)-th smallest of the n scores, the split-conformal quantile (Vovk et
  al. 2005, Lei et al. 2018): were the scores exchangeable with a new run's, the interval would
  cover it with probability >= level. With fewer than level / (1 - level) scores that rank does
  not exist (the distribution-free interval is unbounded): s is then the larger of the largest
  score and the normal-theory bound t_n RMS(scores) (a Gaussian residual term whose variance is
  estimated from the n scores, Student's t on n degrees of freedom), and a note says so.

Why this and not the alternatives: see "Calibrated prediction intervals" in docs/fitting.md
(coverage of each variant on synthetic laws with and without misfit).

Run-to-run noise: rows at the same inputs (and, when the table has groups, in the same group:
seeds of one cell) are repeats; the pooled within-cell variance of ln loss estimates the noise
variance sigma^2 with sum(n_cell - 1) degrees of freedom. With repeats, the classical lack-of-fit
F test compares the scatter of the cells about the law with that noise, s is held at least
sigma, and tau = sqrt(s^2 - sigma^2) is the misfit's share. Without repeats the noise is not
measured: the fit's residual RMS sqrt(SSR / (n - p)) (noise and in-range misfit together) is
the floor of s, and the calibration says so.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import numpy as np
from scipy.special import fdtrc, ndtri, stdtrit

from megareuse.law.data import LawError, RunTable
from megareuse.law.fit import blas_single_thread, check_table, fit_form
from megareuse.law.law import Law
from megareuse.law.resampling import bootstrap

FOLD_RESAMPLES = 10  # bootstrap resamples of each rolling refit (its parameter interval at the next level)
METHOD = ("rolling-origin conformal: the bootstrap (parameter) interval combined in quadrature with a "
          "residual term whose scale is the conformal quantile of one-level-ahead out-of-sample log errors, "
          "each standardized by its refit's own bootstrap interval")


def _check_level(level) -> float:
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0.0 < float(level) < 1.0:
        raise LawError(f"level = {level!r}: accepted a number between 0 and 1, e.g. 0.9")
    return float(level)


# -- run-to-run noise -----------------------------------------------------------------------
def repeat_cells(table: RunTable, inputs: Sequence[str]) -> list[np.ndarray]:
    """Row indices of each cell with 2+ rows: the same inputs and, when the table has groups
    (a group column, not one group per run), the same group."""
    keys = [np.unique(table.columns[c], return_inverse=True)[1].ravel() for c in inputs if c in table.columns]
    if np.any(table.group != table.run_id):
        keys.append(np.unique(table.group, return_inverse=True)[1].ravel())
    if not keys or not len(table):
        return []
    cell = np.unique(np.column_stack(keys), axis=0, return_inverse=True)[1].ravel()
    return [idx for idx in (np.flatnonzero(cell == k) for k in range(cell.max() + 1)) if len(idx) >= 2]


def noise_from_repeats(table: RunTable, inputs: Sequence[str]) -> Optional[dict]:
    """Pooled within-cell standard deviation of ln loss (the squared deviations from each cell's
    mean, summed over cells, over sum(n_cell - 1)), or None when no cell has repeats."""
    cells = repeat_cells(table, inputs)
    if not cells:
        return None
    logy = np.log(table.loss)
    ss = float(sum(np.sum((logy[c] - logy[c].mean()) ** 2) for c in cells))
    dof = int(sum(len(c) - 1 for c in cells))
    return {"sigma": math.sqrt(ss / dof), "dof": dof, "n_cells": len(cells),
            "n_rows": int(sum(len(c) for c in cells)), "source": "repeats",
            "note": f"run-to-run noise from {len(cells)} repeated cells ({dof} degrees of freedom): the pooled "
                    f"within-cell variance of ln loss"}


def lack_of_fit(table: RunTable, law: Law, rep: dict) -> Optional[dict]:
    """Classical lack-of-fit F test: the fit's residual SS in ln loss = pure error (within cells)
    + lack of fit; F = (SS_lof / (m - p)) / (SS_pe / dof_pe), m distinct cells, p parameters."""
    m = len(np.unique(np.column_stack([table.columns[c] for c in law.form.inputs]), axis=0))
    p = law.form.n_params
    ss_pe = rep["sigma"] ** 2 * rep["dof"]
    if m <= p or ss_pe <= 0:  # no cells to spare, or repeats without scatter: no test
        return None
    resid = np.log(table.loss) - np.log(law.predict(table))
    ss_lof = max(float(np.sum(resid ** 2)) - ss_pe, 0.0)
    f = (ss_lof / (m - p)) / (ss_pe / rep["dof"])
    return {"F": f, "dof": [m - p, rep["dof"]], "p_value": float(fdtrc(m - p, rep["dof"], f))}


def noise_estimate(table: RunTable, law: Law) -> dict:
    """The noise in ln loss: from repeats when there are any (with the lack-of-fit test), else
    the fit's residual RMS sqrt(SSR / (n - p)), noise and misfit together (the note says so)."""
    rep = noise_from_repeats(table, law.form.inputs)
    if rep is not None:
        rep["lack_of_fit"] = lack_of_fit(table, law, rep)
        return rep
    resid = np.log(table.loss) - np.log(law.predict(table))
    dof = max(len(table) - law.form.n_params, 1)
    return {"sigma": math.sqrt(float(np.sum(resid ** 2)) / dof), "dof": dof, "n_cells": 0, "n_rows": 0,
            "source": "residuals",
            "note": "no repeated runs (seeds of one cell): run-to-run noise not measured; the fit's residual RMS "
                    "sqrt(SSR/(n-p)) (noise and misfit together) stands in for it"}


# -- out-of-sample errors -------------------------------------------------------------------
def calibration_axes(table: RunTable, law: Law, axes: Optional[Sequence[str]] = None) -> list[str]:
    """The inputs to roll along: given, or every input of the form with 3+ levels (a window
    needs 2 levels, and there must be a level beyond it)."""
    if axes is None:
        return [c for c in law.form.inputs if len(np.unique(table.columns[c])) >= 3]
    if isinstance(axes, str) or not axes or any(a not in law.form.inputs for a in axes):
        raise LawError(f"calibration axes = {axes!r}: accepted a list of inputs of form {law.form.name} "
                       f"({', '.join(law.form.inputs)})")
    return list(axes)


def rolling_residuals(table: RunTable, law: Law, level: float, axes: Optional[Sequence[str]] = None,
                      n_resamples: int = FOLD_RESAMPLES, seed: int = 0) -> dict:
    """Along each axis, for each level v after the first min_levels (2): refit on the runs below
    v (from the law's parameters, as the bootstrap refits), bootstrap that refit (n_resamples)
    and predict the runs at v. Returns rows (run, axis, level, inputs, residual ln observed - ln
    predicted, h_lo and h_hi of the refit's parameter interval there) and the folds fitted,
    skipped (too few runs below v for the form) and unconverged."""
    axes = calibration_axes(table, law, axes)
    rows, skipped, unconverged, n_folds = [], [], 0, 0
    with blas_single_thread():
        for axis in axes:
            levels = np.unique(table.columns[axis])
            for value in levels[law.form.min_levels.get(axis, 2):]:
                n_folds += 1
                window = table.subset(table.columns[axis] < value)
                try:
                    check_table(window, law.form)
                    fold = fit_form(window, law.form, units=law.units, starts=[law.theta], n_grid_starts=0,
                                    varpro=False)
                except LawError as exc:
                    skipped.append(f"{axis} < {value:g}: {exc}")
                    continue
                if not fold.diagnostics["converged"]:
                    unconverged += 1
                    continue
                test = table.subset(table.columns[axis] == value)
                e = np.log(test.loss) - np.log(fold.predict(test))
                if n_resamples >= 2 and len(np.unique(window.group)) >= 2:
                    try:
                        bootstrap(window, fold, n_resamples, seed=seed + n_folds, level=level)
                    except LawError:  # no resample refits: the error is scored without the refit's interval
                        fold.bootstrap = None
                _, h_lo, h_hi = parameter_halfwidths(fold, test, level)
                rows += [{"run_id": str(test.run_id[i]), "axis": axis, "level": float(value),
                          **{c: float(test.columns[c][i]) for c in law.form.inputs}, "residual": float(e[i]),
                          "h_lo": float(h_lo[i]), "h_hi": float(h_hi[i])} for i in range(len(test))]
    return {"axes": axes, "rows": rows, "n_folds": n_folds, "skipped": skipped, "n_unconverged": unconverged}


# -- the interval ---------------------------------------------------------------------------
def _z(level: float) -> float:
    return float(ndtri(0.5 + level / 2.0))


def parameter_halfwidths(law: Law, columns, level: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ln point prediction and its distances to the ends of the bootstrap percentile interval
    (parameter uncertainty alone); zero without bootstrap samples."""
    centre = np.log(np.asarray(law.predict(columns), dtype=float).ravel())
    if not law.bootstrap or len(law.bootstrap.get("theta", [])) < 2:
        return centre, np.zeros_like(centre), np.zeros_like(centre)
    lo, hi = law.interval(columns, level=level, noise=False)
    return (centre, np.maximum(centre - np.log(np.ravel(lo)), 0.0),
            np.maximum(np.log(np.ravel(hi)) - centre, 0.0))


def scores(rows: Sequence[Mapping], level: float) -> np.ndarray:
    """Each out-of-sample error's score: the smallest residual scale s whose interval (in
    quadrature with its refit's parameter interval, h_lo and h_hi) contains it."""
    e = np.array([r["residual"] for r in rows], dtype=float)
    h = np.array([r["h_lo"] if r["residual"] < 0 else r["h_hi"] for r in rows], dtype=float)
    return np.sqrt(np.maximum(e ** 2 - h ** 2, 0.0)) / _z(level)


def conformal_scale(values: np.ndarray, level: float) -> tuple[float, int, bool]:
    """The ceil((n + 1) level)-th smallest value (rank from 1) and whether that rank exists
    (n >= level / (1 - level)); if it does not, the larger of the largest value and the
    Student-t bound t_n((1 + level) / 2) * RMS(values)."""
    n = len(values)
    if n == 0:
        return float("nan"), 0, False
    rank = math.ceil((n + 1) * level - 1e-9)
    if rank <= n:
        return float(np.sort(values)[rank - 1]), rank, True
    t_bound = float(stdtrit(n, 0.5 + level / 2.0)) * math.sqrt(float(np.mean(np.square(values))))
    return max(float(np.max(values)), t_bound), n, False


def calibrate(table: RunTable, law: Law, level: Optional[float] = None, axes: Optional[Sequence[str]] = None,
              n_resamples: int = FOLD_RESAMPLES, seed: int = 0) -> dict:
    """Calibrate the prediction intervals of `law` on `table` (the runs it was fitted on): the
    noise from repeats (or the residual RMS), rolling-origin out-of-sample errors standardized
    by their refits' bootstrap (n_resamples each), the conformal residual scale. Stores and
    returns law.calibration (see the module docstring)."""
    if not isinstance(table, RunTable) or not isinstance(law, Law):
        raise LawError("calibrate(table, law): accepted a RunTable and the Law fitted on it")
    level = _check_level((law.bootstrap or {}).get("level", 0.9) if level is None else level)
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or n_resamples < 0 or n_resamples == 1:
        raise LawError(f"calibration resamples = {n_resamples!r}: accepted 0 (refits without intervals) or an "
                       f"integer >= 2")
    table.require(law.form.inputs, f"form {law.form.name}")
    noise = noise_estimate(table, law)
    oos = rolling_residuals(table, law, level, axes, n_resamples, seed)
    if not oos["rows"]:
        why = "; ".join(oos["skipped"][:2]) or ("no input has 3 levels" if not oos["axes"] else "no fold converged")
        raise LawError(f"calibration of {law.form.name}: no out-of-sample errors ({why}); accepted a table with 3+ "
                       f"levels of an input and enough runs below the top one to fit the form")
    sc = scores(oos["rows"], level)
    s_conf, rank, exact = conformal_scale(sc, level)
    notes = []
    if not exact:
        notes.append(f"only {len(sc)} out-of-sample errors, too few for the {100 * level:g}% conformal rank "
                     f"(needs {math.ceil(level / (1 - level) - 1e-9)}): the scale is the larger of the largest score "
                     f"and the Student-t bound t_{len(sc)} x their RMS")
    if oos["skipped"]:
        notes.append(f"{len(oos['skipped'])} of {oos['n_folds']} rolling folds skipped (too few runs below the "
                     f"level): {oos['skipped'][0]}")
    if oos["n_unconverged"]:
        notes.append(f"{oos['n_unconverged']} rolling folds did not converge and were left out")
    scale = max(s_conf, noise["sigma"])
    result = {"method": METHOD, "level": level, "z": _z(level), "scale": scale, "scale_conformal": s_conf,
              "rank": rank, "rank_exact": exact, "n_scores": len(sc), "n_resamples": n_resamples, "noise": noise,
              "misfit": math.sqrt(max(scale ** 2 - noise["sigma"] ** 2, 0.0)) if noise["source"] == "repeats" else None,
              "axes": oos["axes"], "n_folds": oos["n_folds"], "n_folds_skipped": len(oos["skipped"]),
              "n_folds_unconverged": oos["n_unconverged"],
              "residuals": [dict(r, score=float(s)) for r, s in zip(oos["rows"], sc)], "notes": notes}
    law.calibration = result
    return result


def calibrated_interval(law: Law, columns, level: Optional[float] = None) -> tuple[np.ndarray, np.ndarray]:
    """The calibrated prediction interval (in loss units) of a new run at the given inputs, at
    the calibration's level (the scores depend on it: calibrate again for another)."""
    cal = law.calibration
    if not cal:
        raise LawError(f"law {law.form.name} has no calibration; run calibrate(table, law) first")
    level = _check_level(cal["level"] if level is None else level)
    if abs(level - cal["level"]) > 1e-12:
        raise LawError(f"level = {level!r}: accepted the calibration's level {cal['level']:g} (run "
                       f"calibrate(table, law, level={level!r}) for another)")
    centre, h_lo, h_hi = parameter_halfwidths(law, columns, level)
    zs = _z(level) * float(cal["scale"])
    return np.exp(centre - np.hypot(h_lo, zs)), np.exp(centre + np.hypot(h_hi, zs))
