"""One asymptote for reuse and scratch: a stage-2 series and the from-scratch series of the same
model on the same target domain, fitted together with one E.

    stage-2 runs:  L = A * D1^(-a1) * D2^(-a2 + a3 ln D1) + E
    scratch runs:  L = B * D^(-b) + E

Both tend to the loss of that model trained on unlimited target data, so E is one number; two
separate fits give it two values, and far from the data the planner's verdict is set by their
difference. The joint law is a Form (`SHARED`, not registered: its inputs carry a row mask) whose
reuse term is exp(-inf) = 0 on scratch rows and whose scratch term is 0 on stage-2 rows, so the
fitter's machinery applies as it is: the grid with (A, B, E) projected in closed form, the
variable-projection search, L-BFGS-B on Huber of log loss, and the bootstrap's trust-region refits.
Resample i draws the stage-2 runs (or groups) and the scratch runs with replacement, each series
from numpy's generator seeded with (seed, i), and refits from the full fit. The result is a pair
of ordinary laws, `reuse` and `power`, with the same E and paired bootstrap samples (sample k of
both from resample k), which `make_plan` takes as they are: every saving and verdict is then
computed with one E per sample.

megareuse.law.sharedstudy sets it beside separate E's fitted on the same runs (held-out runs,
E_reuse - E_scratch with its interval) and loads both series from one run table.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
from scipy.special import chdtri

from megareuse.law.data import LawError, RunTable, choose_unit
from megareuse.law.fit import DELTA, GRAD_TOL, _provenance, _varpro_search, blas_single_thread, grid_starts, lbfgs
from megareuse.law.forms import Form, get_form
from megareuse.law.identify import N_GRID, TOP, _refit_fixed, _verdict
from megareuse.law.law import Law
from megareuse.law.resampling import _check, group_members, huber_refit, param_intervals

REUSE_MIN, SCRATCH_MIN = 5, 3  # distinct runs: more than each series' own parameters (A, a1, a2, a3 / B, b)


def _terms(p, x):
    s = x["scratch"]
    reuse = np.where(s, -np.inf, -p["a1"] * x["D1"] - (p["a2"] - p["a3"] * x["D1"]) * x["D2"])
    return [reuse, np.where(s, -p["b"] * x["D"], -np.inf), 0.0]


def _jac(p, x):  # the other series' inputs are 0 on each row, so these vanish there
    return [{"a1": -x["D1"], "a2": -x["D2"], "a3": x["D1"] * x["D2"]}, {"b": -x["D"]}, {}]


_REUSE = get_form("reuse")
SHARED = Form("reuse_shared_E", ("D1", "D2", "D"), ("A", "B", "E"), ("a1", "a2", "a3", "b"), _terms, _jac,
              bounds={**_REUSE.bounds, "b": get_form("power").bounds["a"]},
              grid={**{k: _REUSE.grid[k] for k in ("a1", "a2", "a3")}, "b": [0.1, 0.3, 0.6, 1.0]},
              formula="L = A * D1^(-a1) * D2^(-a2 + a3 ln D1) + E (stage 2); L = B * D^(-b) + E (scratch)",
              order=("A", "a1", "a2", "a3", "B", "b", "E"))
_R, _S = [0, 2, 3, 4, 5], [1, 2, 6]  # raw theta [lnA, lnB, lnE, a1, a2, a3, b] -> reuse / power raw theta


@dataclass
class SharedFit:
    """The joint fit: its raw parameters and diagnostics, and the two laws it implies (`reuse`
    over D1, D2 and `power` over D, both with the shared E; bootstrap samples paired)."""
    theta: np.ndarray
    units: dict
    reuse: Law
    scratch: Law
    diagnostics: dict = field(default_factory=dict)
    bootstrap: Optional[dict] = None

    @property
    def params(self) -> dict[str, float]:
        return SHARED.params_from_theta(self.theta)


def _distinct(table: RunTable, cols: Sequence[str], rows=None) -> int:
    values = np.column_stack([table.columns[c] if rows is None else table.columns[c][rows] for c in cols])
    return len(np.unique(values, axis=0))


def check_pair(reuse: RunTable, scratch: RunTable) -> None:
    """One-line errors for a pair the joint fit cannot take."""
    for name, t in (("stage-2 table", reuse), ("scratch table", scratch)):
        if not isinstance(t, RunTable):
            raise LawError(f"shared E: the {name} is a {type(t).__name__}; accepted a RunTable (load_table)")
    if not len(scratch):
        raise LawError("shared E: no scratch rows; accepted a from-scratch series (column D: its tokens) of the "
                       "stage-2 model on the stage-2 target domain")
    if not len(reuse):
        raise LawError("shared E: no stage-2 rows; accepted a stage-2 series with columns D1, D2")
    reuse.require(("D1", "D2"), "the stage-2 series of the shared-E fit")
    scratch.require(("D",), "the scratch series of the shared-E fit")
    if reuse.loss_col != scratch.loss_col:
        raise LawError(f"shared E: the stage-2 loss is {reuse.loss_col!r}, the scratch loss {scratch.loss_col!r}; "
                       "accepted two series measured on the same target domain (one loss column)")
    if reuse.loss_unit != scratch.loss_unit:
        raise LawError(f"shared E: the stage-2 loss is in {reuse.loss_unit}, the scratch loss in "
                       f"{scratch.loss_unit}; accepted losses in one unit")
    if reuse.has("N") and scratch.has("N"):
        nr, ns = np.unique(reuse.columns["N"]), np.unique(scratch.columns["N"])
        if not np.array_equal(nr, ns):
            raise LawError(f"shared E: the stage-2 runs have N = {', '.join(f'{n:,.0f}' for n in nr)}, the scratch "
                           f"runs N = {', '.join(f'{n:,.0f}' for n in ns)}; one E is the floor of one model: "
                           "accepted a scratch series of the stage-2 model (select a size with --where N=...)")
    for c in ("D1", "D2"):
        if len(np.unique(reuse.columns[c])) < 2:
            raise LawError(f"shared E: column {c!r} of the stage-2 runs has a single value; accepted at least 2")
    n_r, n_s = _distinct(reuse, ("D1", "D2")), _distinct(scratch, ("D",))
    if n_r < REUSE_MIN:
        raise LawError(f"shared E: {n_r} stage-2 runs at distinct D1, D2; accepted at least {REUSE_MIN} "
                       "(more than its own parameters A, a1, a2, a3)")
    if n_s < SCRATCH_MIN:
        raise LawError(f"shared E: {n_s} scratch runs at distinct D; accepted at least {SCRATCH_MIN} "
                       "(more than its own parameters B, b)")


def shared_units(reuse: RunTable, scratch: RunTable) -> dict:
    """One token unit for both series (the power of 1000 nearest the geometric mean of all tokens)."""
    scale, name = choose_unit(np.concatenate([reuse.columns["D1"], reuse.columns["D2"], scratch.columns["D"]]))
    return {"tokens": scale, "tokens_name": name or "tokens", "params": 1.0, "params_name": "params",
            "loss": reuse.loss_unit}


def joint_inputs(reuse: RunTable, scratch: RunTable, units: dict) -> dict[str, np.ndarray]:
    """Log inputs of the joint form: stage-2 rows first, then scratch rows; each row's other
    series' inputs are 0, and `scratch` marks the scratch rows."""
    u, nr, ns = units["tokens"], len(reuse), len(scratch)
    z = np.zeros
    return {"D1": np.concatenate([np.log(reuse.columns["D1"] / u), z(ns)]),
            "D2": np.concatenate([np.log(reuse.columns["D2"] / u), z(ns)]),
            "D": np.concatenate([z(nr), np.log(scratch.columns["D"] / u)]),
            "scratch": np.concatenate([z(nr, dtype=bool), np.ones(ns, dtype=bool)])}


def _weights(reuse: RunTable, scratch: RunTable) -> np.ndarray:
    w = np.concatenate([reuse.weight, scratch.weight])
    return w / np.mean(w)


def fit_shared(reuse: RunTable, scratch: RunTable, delta: float = DELTA, n_grid_starts: int = 3) -> SharedFit:
    """Fit the stage-2 law and the scratch law with one E (Huber on log loss, as the fitter)."""
    check_pair(reuse, scratch)
    if not (isinstance(delta, float) and delta > 0):
        raise LawError(f"delta = {delta!r}: accepted a positive float")
    units = shared_units(reuse, scratch)
    lx = joint_inputs(reuse, scratch, units)
    y = np.concatenate([reuse.loss, scratch.loss])
    logy, w = np.log(y), _weights(reuse, scratch)
    with blas_single_thread():
        starts = grid_starts(SHARED, lx, y, w, logy, n_grid_starts)
        vp = _varpro_search(SHARED, starts[0], lx, y, w)
        runs = [lbfgs(SHARED, t, lx, logy, w, delta) for t in [vp] + starts]
    lowest = min(r["objective"] for r in runs)
    tol = 1e-8 * max(1.0, lowest)
    best = min(runs, key=lambda r: (r["objective"] > lowest + tol, not r["converged"], r["objective"]))
    theta = best["theta"]
    r_log = SHARED.log_predict(theta, lx) - logy
    names = list(SHARED.linear) + list(SHARED.nonlinear)
    diag = {"converged": best["converged"], "message": best["message"], "grad_norm": best["grad_norm"],
            "objective": best["objective"], "delta": delta, "n_starts": len(runs),
            "n_starts_converged": sum(r["converged"] for r in runs),
            "n_runs": {"stage2": len(reuse), "scratch": len(scratch)},
            "rms_log": float(np.sqrt(np.mean(r_log ** 2))),
            "rms_log_stage2": float(np.sqrt(np.mean(r_log[:len(reuse)] ** 2))),
            "rms_log_scratch": float(np.sqrt(np.mean(r_log[len(reuse):] ** 2))),
            "at_bounds": [names[i] for i, (lo, hi) in enumerate(SHARED.raw_bounds())
                          if theta[i] <= lo + 1e-8 or theta[i] >= hi - 1e-8]}
    return SharedFit(theta, units, *_pair(theta, units, reuse, scratch, diag), diagnostics=diag)


def _pair(theta, units, reuse: RunTable, scratch: RunTable, diag: dict) -> tuple[Law, Law]:
    """The `reuse` and `power` laws the joint parameters imply, each with its series' provenance."""
    laws = []
    for form, idx, table, other in (("reuse", _R, reuse, scratch), ("power", _S, scratch, reuse)):
        law = Law(form, np.asarray(theta)[idx], units, data={**_provenance(table), "shared_E_with": other.describe()},
                  diagnostics={"converged": diag["converged"], "shared_E": True, "message": diag["message"]})
        law.diagnostics.update(law.goodness(table))
        laws.append(law)
    return laws[0], laws[1]


def pair_from_params(params: dict, tokens_unit: float = 1.0, loss_unit: str = "nats") -> tuple[Law, Law]:
    """The (reuse, power) laws of known joint parameters A, a1, a2, a3, B, b, E (e.g. a truth)."""
    p = {k: params[k] for k in SHARED.params if k in params}
    reuse = Law.from_params("reuse", {k: p[k] for k in ("A", "a1", "a2", "a3", "E")}, tokens_unit, loss_unit=loss_unit)
    scratch = Law.from_params("power", {"A": p["B"], "a": p["b"], "E": p["E"]}, tokens_unit, loss_unit=loss_unit)
    return reuse, scratch


# -- bootstrap over the runs of both series ---------------------------------------------------------
def bootstrap_shared(reuse: RunTable, scratch: RunTable, fit: SharedFit, n_resamples: int = 200, seed: int = 0,
                     level: float = 0.9, delta: float = DELTA) -> dict:
    """Resample each series' runs (or groups) with replacement, refit jointly from the full fit;
    percentile intervals of every joint parameter, and paired samples stored on fit.reuse and
    fit.scratch (law.bootstrap, as `bootstrap` writes it) for the planner."""
    _check(n_resamples, seed, 1, level)
    lx = joint_inputs(reuse, scratch, fit.units)
    logy, w = np.log(np.concatenate([reuse.loss, scratch.loss])), _weights(reuse, scratch)
    m_r, m_s, nr = group_members(reuse.group), group_members(scratch.group), len(reuse)
    bounds = SHARED.raw_bounds()
    thetas, ok = np.full((n_resamples, SHARED.n_params), np.nan), np.zeros(n_resamples, dtype=bool)
    with blas_single_thread():
        for i in range(n_resamples):
            rng = np.random.default_rng([seed, i])
            rr = np.concatenate([m_r[g] for g in rng.integers(0, len(m_r), len(m_r))])
            rs = np.concatenate([m_s[g] for g in rng.integers(0, len(m_s), len(m_s))])
            if (min(len(np.unique(reuse.columns[c][rr])) for c in ("D1", "D2")) < 2
                    or _distinct(reuse, ("D1", "D2"), rr) < REUSE_MIN or _distinct(scratch, ("D",), rs) < SCRATCH_MIN):
                continue  # refused as fit_shared would refuse it
            rows = np.concatenate([rr, nr + rs])
            sub = {k: v[rows] for k, v in lx.items()}
            ws = w[rows] / np.mean(w[rows])
            theta, _, gnorm = huber_refit(SHARED, fit.theta, sub, logy[rows], ws, delta, bounds)
            if gnorm > GRAD_TOL:
                again = lbfgs(SHARED, fit.theta, sub, logy[rows], ws, delta)
                theta, gnorm = again["theta"], (0.0 if again["converged"] else np.inf)
            thetas[i], ok[i] = theta, gnorm <= GRAD_TOL and np.all(np.isfinite(theta))
    samples = thetas[ok]
    tail = 50.0 * (1.0 - level)
    values = np.array([[SHARED.params_from_theta(t)[p] for p in SHARED.params] for t in samples]).reshape(-1, 7)
    intervals = ({p: [float(np.percentile(values[:, k], tail)), float(np.percentile(values[:, k], 100 - tail))]
                  for k, p in enumerate(SHARED.params)} if len(samples) >= 2 else {})
    result = {"n_resamples": n_resamples, "n_converged": int(ok.sum()), "seed": seed, "level": level,
              "resample_unit": "group" if np.any(np.concatenate([reuse.group != reuse.run_id,
                                                                  scratch.group != scratch.run_id])) else "run",
              "theta": samples, "index": np.flatnonzero(ok).tolist(), "intervals": intervals}
    a3 = intervals.get("a3")
    result["a3_excludes_zero"] = bool(a3[0] > 0 or a3[1] < 0) if a3 else None
    fit.bootstrap = result
    for law, idx, table in ((fit.reuse, _R, reuse), (fit.scratch, _S, scratch)):
        resid = np.log(law.predict(table)) - np.log(table.loss)
        law.bootstrap = {k: result[k] for k in ("n_resamples", "n_converged", "seed", "level", "resample_unit", "index")}
        law.bootstrap.update(theta=samples[:, idx], residuals=resid, workers=1,
                             note="joint resamples of the stage-2 and scratch runs (one shared E); "
                                  "sample k of both laws comes from resample k")
        law.bootstrap.update(param_intervals(law, samples[:, idx], level))
    return result


def profile_shared_E(reuse: RunTable, scratch: RunTable, fit: SharedFit, level: float = 0.9) -> dict:
    """Is the shared E identified? The profile of identify.profile_E over the joint fit: E held at
    each of 25 values from 0 to just below the lowest loss of either series, the rest refitted."""
    lx = joint_inputs(reuse, scratch, fit.units)
    y = np.concatenate([reuse.loss, scratch.loss])
    logy, sw = np.log(y), np.sqrt(_weights(reuse, scratch))
    fixed = SHARED.linear.index("E")
    _, ssr_min = _refit_fixed(SHARED, fit.theta, fixed, fit.theta[fixed], lx, logy, sw)
    lowest = float(y.min())
    grid = lowest * np.linspace(0.0, TOP, N_GRID)
    ssr, theta = [], fit.theta
    for E in grid:
        theta, s = _refit_fixed(SHARED, theta, fixed, np.log(E) if E > 0 else -40.0, lx, logy, sw)
        ssr.append(s)
    ssr_min = max(min([ssr_min] + ssr), 1e-300)
    deviance = len(y) * np.log(np.maximum(np.array(ssr), 1e-300) / ssr_min)
    threshold = float(chdtri(1, 1 - level))
    out = _verdict(fit.params["E"], grid, deviance, np.flatnonzero(deviance <= threshold), threshold, lowest, level)
    fit.diagnostics["E_profile"] = out
    return out
