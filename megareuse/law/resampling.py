"""Bootstrap over runs: resample runs (or whole groups) with replacement, refit, percentiles.

Resample i draws its rows from numpy's generator seeded with (seed, i), so the samples do
not depend on how many worker processes share the work: workers=1 and workers=4 give the
same numbers for the same seed. Each refit starts from the full-data fit (as given and with
its linear part re-projected on the resample); refits that fail or do not converge are counted
and left out of the intervals, never silently used.
"""
from __future__ import annotations

import multiprocessing as mp
from typing import Optional, Sequence

import numpy as np

from megareuse.pools import quiet_worker
from megareuse.law.data import LawError, RunTable
from megareuse.law.fit import DELTA, blas_limit_available, blas_single_thread, fit_form
from megareuse.law.law import Law

_PAYLOAD: dict = {}


def _resample_rows(groups: np.ndarray, seed: int, i: int) -> np.ndarray:
    uniq, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(uniq))]
    rng = np.random.default_rng([seed, i])
    picks = rng.integers(0, len(uniq), size=len(uniq))
    return np.concatenate([members[g] for g in picks])


def _refit(table: RunTable, law: Law, seed: int, i: int, delta: float) -> tuple[np.ndarray, bool]:
    sub = table.subset(_resample_rows(table.group, seed, i))
    try:
        fit = fit_form(sub, law.form, units=law.units, delta=delta, starts=[law.theta],
                       n_grid_starts=0, varpro=False)
    except LawError:  # e.g. a resample with a single distinct D1
        return np.full(law.form.n_params, np.nan), False
    return fit.theta, bool(fit.diagnostics["converged"])


def _init(payload: dict) -> None:
    _PAYLOAD.clear()
    _PAYLOAD.update(payload)


def _chunk(indices: Sequence[int]) -> list:
    p = _PAYLOAD
    return [_refit(p["table"], p["law"], p["seed"], i, p["delta"]) for i in indices]


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
    payload = {"table": table, "law": law, "seed": seed, "delta": delta}
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
