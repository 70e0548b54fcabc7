"""Bootstrap over runs: resample runs (or whole groups) with replacement, refit, percentiles.

Resample i draws its rows from numpy's generator seeded with (seed, i), so the samples do
not depend on how many worker processes share the work: workers=1 and workers=4 give the
same numbers for the same seed. Each refit starts from the full-data fit (a warm
start: no grid, no multi-start): scipy's trust-region least squares with its Huber loss (the
same objective as the fitter's) converges in about a dozen steps from there, 3 times faster
than L-BFGS-B. A refit whose end point has a projected gradient above the fitter's tolerance
is redone with L-BFGS-B from the full fit as given and with its linear part re-projected on
the resample (the lower end point), as the fitter would. Refits that fail or
do not converge are counted and left out of the intervals, never silently used.
"""
from __future__ import annotations

import multiprocessing as mp
import warnings
from typing import Optional, Sequence

import numpy as np

from scipy.optimize import least_squares

from megareuse.pools import quiet_worker
from megareuse.law.data import LawError, RunTable
from megareuse.law.fit import (DELTA, GRAD_TOL, blas_limit_available, blas_single_thread, fit_form, huber_objective,
                               log_inputs, projected_grad_norm, runs_needed)
from megareuse.law.law import Law

_PAYLOAD: dict = {}


def _resample_rows(groups: np.ndarray, seed: int, i: int) -> np.ndarray:
    return _draw(group_members(groups), seed, i)


def group_members(groups: np.ndarray) -> list[np.ndarray]:
    """The row indices of each group (sorted group order): what resample i draws from."""
    uniq, inverse = np.unique(groups, return_inverse=True)
    return [np.flatnonzero(inverse == g) for g in range(len(uniq))]


def _draw(members: list, seed: int, i: int) -> np.ndarray:
    """The rows of resample i: as many groups as there are, drawn with replacement."""
    rng = np.random.default_rng([seed, i])
    picks = rng.integers(0, len(members), size=len(members))
    return np.concatenate([members[g] for g in picks])


class _Resampler:
    """What every refit of one bootstrap shares: the log inputs of the whole table, the rows of
    each group, and which rows are the same point (to refuse a resample the fitter would)."""

    def __init__(self, table: RunTable, law: Law, seed: int, delta: float) -> None:
        self.table, self.law, self.seed, self.delta = table, law, seed, delta
        self.lx = log_inputs(table, law.form, law.units)
        self.logy = np.log(table.loss)
        self.members = group_members(table.group)
        inputs = np.column_stack([table.columns[c] for c in law.form.inputs])
        self.point = np.unique(inputs, axis=0, return_inverse=True)[1].ravel()
        self.levels = [np.unique(inputs[:, k], return_inverse=True)[1] for k in range(inputs.shape[1])]
        self.bounds = law.form.raw_bounds()

    def fittable(self, rows: np.ndarray) -> bool:
        """As fit.check_table: 2+ values of every input and more distinct points than parameters."""
        return (all(len(np.unique(lv[rows])) >= 2 for lv in self.levels)
                and len(np.unique(self.point[rows])) >= runs_needed(self.law.form))

    def refit(self, i: int) -> tuple[np.ndarray, bool]:
        rows = _draw(self.members, self.seed, i)
        law = self.law
        if not self.fittable(rows):  # e.g. a resample with a single distinct D1
            return np.full(law.form.n_params, np.nan), False
        lx, logy = {c: v[rows] for c, v in self.lx.items()}, self.logy[rows]
        w = self.table.weight[rows] / np.mean(self.table.weight[rows])
        theta, _, gnorm = huber_refit(law.form, law.theta, lx, logy, w, self.delta, self.bounds)
        if gnorm <= GRAD_TOL:
            return theta, True
        return _lbfgs_refit(self.table.subset(rows), law, self.delta)


def _lbfgs_refit(sub: RunTable, law: Law, delta: float) -> tuple[np.ndarray, bool]:
    try:
        fit = fit_form(sub, law.form, units=law.units, delta=delta, starts=[law.theta],
                       n_grid_starts=0, varpro=False)
    except LawError:
        return np.full(law.form.n_params, np.nan), False
    return fit.theta, bool(fit.diagnostics["converged"])


def _weighted_huber(w: np.ndarray):
    """scipy least_squares loss: w * huber on z = (r / delta)^2 (value, first, second derivative)."""
    def rho(z):
        s = np.sqrt(z)
        inside = z <= 1.0
        out = np.empty((3, len(z)))
        out[0] = np.where(inside, z, 2.0 * s - 1.0)
        out[1] = np.where(inside, 1.0, 1.0 / np.maximum(s, 1e-300))
        out[2] = np.where(inside, 0.0, -0.5 / np.maximum(z * s, 1e-300))
        return out * w
    return rho


def huber_refit(form, theta0, lx, logy, w, delta: float = DELTA, bounds=None) -> tuple[np.ndarray, float, float]:
    """Minimise the fitter's objective sum w huber_delta(ln Lhat - ln L) / delta from theta0 with
    scipy's trust-region least squares (its Huber loss with f_scale = delta is delta times the
    same objective), within the form's bounds. Returns theta, the objective and its projected
    gradient norm there (the caller's convergence test, as in fit.lbfgs)."""
    bounds = form.raw_bounds() if bounds is None else bounds
    lo, hi = np.array(bounds, dtype=float).T
    x0 = np.clip(np.asarray(theta0, dtype=float), lo, hi)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        try:
            res = least_squares(lambda t: form.log_predict(t, lx) - logy, x0,
                                jac=lambda t: form.log_predict_jac(t, lx)[1], bounds=(lo, hi), method="trf",
                                loss=_weighted_huber(w), f_scale=delta, xtol=1e-12, ftol=1e-12, gtol=1e-12,
                                max_nfev=100 * len(x0))
        except ValueError:  # a non-finite residual at the start
            return x0, float("inf"), float("inf")
        f, g = huber_objective(res.x, form, lx, logy, w, delta)
    if f >= 1e300:
        return res.x, float("inf"), float("inf")
    return res.x, f, projected_grad_norm(res.x, g, bounds)


def _init(payload: dict) -> None:
    _PAYLOAD.clear()
    _PAYLOAD.update(payload)


def _chunk(indices: Sequence[int]) -> list:
    resampler = _PAYLOAD["resampler"]
    return [resampler.refit(i) for i in indices]


def _check(n_resamples, seed, workers, level) -> None:
    if not isinstance(n_resamples, int) or isinstance(n_resamples, bool) or n_resamples < 2:
        raise LawError(f"bootstrap resamples = {n_resamples!r}: accepted an integer >= 2")
    if not isinstance(seed, int) or seed < 0:
        raise LawError(f"seed = {seed!r}: accepted a non-negative integer")
    if not isinstance(workers, int) or workers < 1:
        raise LawError(f"workers = {workers!r}: accepted an integer >= 1")
    if not (isinstance(level, float) and 0.0 < level < 1.0):
        raise LawError(f"level = {level!r}: accepted a number between 0 and 1, e.g. 0.9")


def bootstrap(table: RunTable, law: Law, n_resamples: int = 1000, seed: int = 0, workers: int = 1,
              level: float = 0.9, delta: float = DELTA) -> dict:
    """Bootstrap the fitted `law` on `table`; stores and returns law.bootstrap (samples, intervals)."""
    _check(n_resamples, seed, workers, level)
    if len(np.unique(table.group)) < 2:
        raise LawError("bootstrap needs at least 2 runs (or groups) to resample")
    note = ""
    if workers > 1 and "fork" not in mp.get_all_start_methods():
        workers, note = 1, "ran in one process: this platform cannot fork worker processes"
    if not blas_limit_available():
        note += (" " if note else "") + ("threadpoolctl is not installed, so BLAS threads were not limited: "
                                         "refits can be many times slower on a busy machine")
    payload = {"resampler": _Resampler(table, law, seed, delta)}
    indices = list(range(n_resamples))
    with blas_single_thread():  # set before forking: the workers inherit it
        if workers == 1:
            _init(payload)
            results = _chunk(indices)
        else:
            size = max(1, -(-n_resamples // (workers * 8)))
            chunks = [indices[i:i + size] for i in range(0, n_resamples, size)]
            with mp.get_context("fork").Pool(workers, initializer=quiet_worker,
                                                  initargs=(_init, payload)) as pool:
                results = [r for part in pool.map(_chunk, chunks) for r in part]
    thetas = np.array([r[0] for r in results])
    ok = np.array([r[1] for r in results]) & np.all(np.isfinite(thetas), axis=1)
    samples = thetas[ok]
    resid = np.log(law.predict(table)) - np.log(table.loss)
    result = {"n_resamples": n_resamples, "n_converged": int(ok.sum()), "seed": seed, "level": level,
              "workers": workers, "resample_unit": "group" if np.any(table.group != table.run_id) else "run",
              "theta": samples, "index": np.flatnonzero(ok).tolist(), "residuals": resid, "note": note}
    result.update(param_intervals(law, samples, level))
    law.bootstrap = result
    return result


def param_intervals(law: Law, samples: np.ndarray, level: float) -> dict:
    """Percentile intervals of every parameter; whether each (and a3 in particular) excludes 0."""
    if len(samples) < 2:
        return {"intervals": {}, "excludes_zero": {}, "a3_excludes_zero": None,
                "note_intervals": "fewer than 2 converged resamples: no intervals"}
    values = np.array([[law.form.params_from_theta(t)[p] for p in law.form.params] for t in samples])
    tail = 50.0 * (1.0 - level)
    lo, hi = np.percentile(values, tail, axis=0), np.percentile(values, 100.0 - tail, axis=0)
    intervals = {p: [float(a), float(b)] for p, a, b in zip(law.form.params, lo, hi)}
    excludes = {p: bool(a > 0 or b < 0) for p, (a, b) in intervals.items()}
    return {"intervals": intervals, "excludes_zero": excludes,
            "a3_excludes_zero": excludes.get("a3")}


def interval_text(law: Law, name: str, fmt: str = "{:.4g}") -> str:
    boot: Optional[dict] = law.bootstrap
    value = fmt.format(law.params[name])
    if not boot or name not in boot.get("intervals", {}):
        return value
    lo, hi = boot["intervals"][name]
    return f"{value} [{fmt.format(lo)}, {fmt.format(hi)}]"
