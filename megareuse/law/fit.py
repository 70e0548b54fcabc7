"""Fitting a form to a run table: Huber on log loss, L-BFGS from a grid, variable projection.

Objective: sum_i w_i * huber_delta(ln Lhat_i - ln L_i) / delta with delta = 1e-3, where
ln Lhat is a logsumexp over the form's terms (see forms.py). Starting points come from a grid
over the nonlinear parameters with the linear coefficients solved in closed form (variable
projection: non-negative least squares on relative error). The best grid point is refined by a
variable-projection search over the nonlinear parameters alone; that solution and the best
grid points start L-BFGS-B on the full objective; the best end point is the fit. Convergence,
the projected gradient norm and the agreement of the two methods are reported, never hidden.
"""
from __future__ import annotations

import contextlib
import itertools
import warnings
from typing import Mapping, Optional, Sequence

import numpy as np
from scipy.optimize import OptimizeWarning, least_squares, minimize

from megareuse.law.data import LawError, RunTable, check_loss_unit, choose_unit
from megareuse.law.forms import LOG_COEF_BOUNDS, Form, get_form
from megareuse.law.law import Law

DELTA = 1e-3
LBFGS_OPTIONS = {"maxiter": 3000, "maxfun": 6000, "ftol": 1e-15, "gtol": 1e-9, "maxcor": 30}
GRAD_TOL = 1e-5  # projected-gradient norm (objective units) below which a stalled fit counts as converged


_CONTROLLER = None


def blas_single_thread():
    """Context keeping BLAS/LAPACK on one thread: the matrices here are tiny, and threads only
    cost time (L-BFGS-B ran 25x slower on a loaded 2-core machine without this)."""
    global _CONTROLLER
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # optional dependency: fits are correct without it, slower under load
        return contextlib.nullcontext()
    if _CONTROLLER is None:
        _CONTROLLER = ThreadpoolController()
    return _CONTROLLER.limit(limits=1)


def blas_limit_available() -> bool:
    try:
        import threadpoolctl  # noqa: F401
    except ImportError:
        return False
    return True


def huber_objective(theta, form: Form, lx, logy, w, delta: float = DELTA):
    """Objective value and gradient at raw parameters theta."""
    logL, J = form.log_predict_jac(theta, lx)
    r = logL - logy
    a = np.abs(r)
    f = float(np.sum(w * np.where(a <= delta, 0.5 * r * r / delta, a - 0.5 * delta)))
    g = J.T @ (w * np.clip(r / delta, -1.0, 1.0))
    if not np.isfinite(f):
        return 1e300, np.zeros_like(g)
    return f, g


def _objective_value(theta, form, lx, logy, w, delta=DELTA) -> float:
    with np.errstate(all="ignore"):
        r = form.log_predict(theta, lx) - logy
    a = np.abs(r)
    f = float(np.sum(w * np.where(a <= delta, 0.5 * r * r / delta, a - 0.5 * delta)))
    return f if np.isfinite(f) else np.inf


def _nnls(A: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Non-negative least squares by active-set enumeration (few columns)."""
    m = A.shape[1]
    x = np.linalg.lstsq(A, b, rcond=None)[0]
    if np.all(x >= 0):
        return x
    best, best_rss = np.zeros(m), float(b @ b)
    for size in range(m - 1, 0, -1):
        for cols in itertools.combinations(range(m), size):
            sub = np.linalg.lstsq(A[:, cols], b, rcond=None)[0]
            if np.all(sub >= 0):
                rss = float(np.sum((A[:, cols] @ sub - b) ** 2))
                if rss < best_rss:
                    best, best_rss = np.zeros(m), rss
                    best[list(cols)] = sub
    return best


def project(form: Form, phi: Mapping[str, float], lx, y, w) -> Optional[np.ndarray]:
    """Raw theta with the linear coefficients solved (w-weighted least squares on relative error)."""
    phi_vec = [phi[p] for p in form.nonlinear]
    if not form.linear:
        return np.array(phi_vec, dtype=float)
    with np.errstate(all="ignore"):
        F = np.exp(form.basis(phi, lx))
    if not np.all(np.isfinite(F)):
        return None
    scale = np.sqrt(w) / y
    c = _nnls((F * scale).T, np.sqrt(w))
    floor = np.exp(LOG_COEF_BOUNDS[0] + 1.0)
    return np.concatenate([np.log(np.maximum(c, floor)), phi_vec])


def _varpro_search(form: Form, theta0, lx, y, w) -> np.ndarray:
    """Minimise the projected relative least-squares residual over the nonlinear parameters."""
    m = len(form.linear)
    if not form.nonlinear:
        return theta0
    lo, hi = np.array([form.bounds[p] for p in form.nonlinear]).T
    sw = np.sqrt(w)

    def residual(phi_vec):
        theta = project(form, dict(zip(form.nonlinear, phi_vec)), lx, y, w)
        if theta is None:
            return np.full(len(y), 1e6)
        with np.errstate(all="ignore"):
            pred = np.exp(form.log_predict(theta, lx))
        out = sw * (pred - y) / y
        return np.where(np.isfinite(out), out, 1e6)

    x0 = np.clip(theta0[m:], lo + 1e-9, hi - 1e-9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = least_squares(residual, x0, bounds=(lo, hi), method="trf", xtol=1e-12, ftol=1e-12,
                            gtol=1e-12, max_nfev=200 * (len(x0) + 1))
    theta = project(form, dict(zip(form.nonlinear, res.x)), lx, y, w)
    return theta0 if theta is None else theta


def grid_starts(form: Form, lx, y, w, logy, k: int) -> list[np.ndarray]:
    """The k best grid points (linear part projected), best first."""
    scored = []
    for phi in form.start_grid():
        theta = project(form, phi, lx, y, w)
        if theta is not None:
            scored.append((_objective_value(theta, form, lx, logy, w), len(scored), theta))
    if not scored:
        raise LawError(f"form {form.name}: no grid starting point gives a finite prediction; "
                       f"check the form's terms and bounds")
    scored.sort(key=lambda s: (s[0], s[1]))
    return [s[2] for s in scored[:k]]


def projected_grad_norm(theta, grad, bounds) -> float:
    g = np.array(grad, dtype=float)
    for i, (lo, hi) in enumerate(bounds):
        if (theta[i] <= lo + 1e-10 and g[i] > 0) or (theta[i] >= hi - 1e-10 and g[i] < 0):
            g[i] = 0.0
    return float(np.max(np.abs(g))) if len(g) else 0.0


def lbfgs(form: Form, theta0, lx, logy, w, delta=DELTA) -> dict:
    bounds = form.raw_bounds()
    x0 = np.clip(np.asarray(theta0, dtype=float), [b[0] for b in bounds], [b[1] for b in bounds])
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", OptimizeWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        res = minimize(huber_objective, x0, args=(form, lx, logy, w, delta), jac=True,
                       method="L-BFGS-B", bounds=bounds, options=LBFGS_OPTIONS)
    f, g = huber_objective(res.x, form, lx, logy, w, delta)
    gnorm = projected_grad_norm(res.x, g, bounds)
    converged = bool(np.isfinite(f) and (res.status == 0 or gnorm <= GRAD_TOL))
    message = res.message if isinstance(res.message, str) else str(res.message)
    if res.status != 0 and converged:
        message = f"{message.strip()} (line search stalled at a projected gradient below {GRAD_TOL:g})"
    return {"theta": res.x, "objective": f, "grad_norm": gnorm, "converged": converged,
            "message": message, "n_iter": int(res.nit)}


def log_inputs(table: RunTable, form: Form, units: Mapping[str, float]) -> dict[str, np.ndarray]:
    table.require(form.inputs, f"form {form.name}")
    return {c: np.log(table.columns[c] / units["params" if c == "N" else "tokens"]) for c in form.inputs}


def choose_units(table: RunTable, form: Form) -> dict:
    tokens = [table.columns[c] for c in form.inputs if c != "N"]
    t_scale, t_name = choose_unit(np.concatenate(tokens)) if tokens else (1.0, "")
    p_scale, p_name = choose_unit(table.columns["N"]) if "N" in form.inputs else (1.0, "")
    return {"tokens": t_scale, "tokens_name": t_name or "tokens", "params": p_scale,
            "params_name": p_name or "params", "loss": table.loss_unit}


def _check_units(units: Mapping) -> dict:
    out = dict(units)
    for key in ("tokens", "params"):
        value = out.setdefault(key, 1.0)
        if not (isinstance(value, (int, float)) and np.isfinite(value) and value > 0):
            raise LawError(f"units[{key!r}] = {value!r}: accepted a positive number (e.g. 1e6)")
        out.setdefault(f"{key}_name", f"{value:g} {key}")
    check_loss_unit(out.setdefault("loss", "nats"), "units['loss']")
    return out


def distinct_runs(table: RunTable, form: Form) -> int:
    """How many distinct points (combinations of the form's inputs) the table holds."""
    if not len(table):
        return 0
    return len(np.unique(np.column_stack([table.columns[c] for c in form.inputs]), axis=0))


def runs_needed(form: Form) -> int:
    """Distinct runs a form needs: more than its parameters, else the fit is exact (no residual
    left, every bootstrap resample the same law, intervals of zero width)."""
    return form.n_params + 1


def check_table(table: RunTable, form: Form) -> None:
    table.require(form.inputs, f"form {form.name}")
    for c in form.inputs:
        values, need = np.unique(table.columns[c]), getattr(form, "min_levels", {}).get(c, 2)
        if len(values) == 1:
            raise LawError(f"column {c!r} has a single value ({values[0]:g}); form {form.name} "
                           f"needs at least {need} distinct values of {c}")
        if len(values) < need:
            raise LawError(f"column {c!r} has {len(values)} distinct values ({', '.join(f'{v:g}' for v in values)}); "
                           f"form {form.name} needs at least {need} distinct values of {c} to identify its terms")
    n, need = distinct_runs(table, form), runs_needed(form)
    if n < need:
        rows = "" if n == len(table) else f" at distinct {', '.join(form.inputs)} ({len(table)} rows)"
        raise LawError(f"{n} runs{rows} for form {form.name}, which has {form.n_params} parameters "
                       f"({', '.join(form.params)}); accepted at least {need} runs at distinct inputs "
                       f"(with {form.n_params} the fit is exact and has no intervals)")


def fit_form(table: RunTable, form, units: Optional[Mapping] = None, delta: float = DELTA,
             starts: Optional[Sequence[np.ndarray]] = None, n_grid_starts: int = 3,
             varpro: bool = True) -> Law:
    """Fit one form to a table; returns a Law with parameters, units, diagnostics and provenance.

    `starts` adds raw starting points (e.g. a previous fit, as the bootstrap does): each is used
    as given and with its linear part re-projected. n_grid_starts=0 skips the grid (then starts
    are required); varpro=False skips the projected search (both used for bootstrap refits)."""
    with blas_single_thread():
        return _fit(table, get_form(form), units, delta, starts, n_grid_starts, varpro)


def _fit(table, form, units, delta, starts, n_grid_starts, varpro) -> Law:
    check_table(table, form)
    if not (isinstance(delta, float) and delta > 0):
        raise LawError(f"delta = {delta!r}: accepted a positive float")
    units = _check_units(units) if units else choose_units(table, form)
    lx = log_inputs(table, form, units)
    y, logy = table.loss, np.log(table.loss)
    w = table.weight / np.mean(table.weight)
    extra = []
    for theta in starts or []:
        theta = np.asarray(theta, dtype=float)
        again = project(form, form._phi(theta), lx, y, w)
        extra += [theta] + ([again] if again is not None else [])
    if n_grid_starts < 1 and not extra:
        raise LawError("fit_form: n_grid_starts = 0 needs starts; accepted n_grid_starts >= 1 or starts")
    candidates = grid_starts(form, lx, y, w, logy, n_grid_starts) if n_grid_starts > 0 else []
    vp_theta = _varpro_search(form, (candidates or extra)[0], lx, y, w) if varpro else None
    candidates = ([vp_theta] if vp_theta is not None else []) + candidates + extra
    runs = [lbfgs(form, t, lx, logy, w, delta) for t in candidates]
    lowest = min(r["objective"] for r in runs)
    tol = 1e-8 * max(1.0, lowest)
    best = min(runs, key=lambda r: (r["objective"] > lowest + tol, not r["converged"], r["objective"]))
    diag = {"converged": best["converged"], "message": best["message"], "grad_norm": best["grad_norm"],
            "n_iter": best["n_iter"], "objective": best["objective"], "delta": delta,
            "n_starts": len(runs), "n_starts_converged": sum(r["converged"] for r in runs),
            "n_starts_at_best": sum(abs(r["objective"] - best["objective"]) <= tol for r in runs)}
    law = Law(form, best["theta"], units, diagnostics=diag, data=_provenance(table))
    law.diagnostics.update(law.goodness(table))
    bounds = form.raw_bounds()
    names = list(form.linear) + list(form.nonlinear)
    law.diagnostics["at_bounds"] = [names[i] for i, (lo, hi) in enumerate(bounds)
                                    if best["theta"][i] <= lo + 1e-8 or best["theta"][i] >= hi - 1e-8]
    if vp_theta is not None:
        gap = float(np.max(np.abs(form.log_predict(vp_theta, lx) - form.log_predict(best["theta"], lx))))
        rms = law.diagnostics["rms_log"]
        law.diagnostics["varpro"] = {"params": form.params_from_theta(vp_theta), "max_gap_log": gap,
                                     "agree": bool(gap <= 2.0 * rms + 1e-6)}
    return law


def _provenance(table: RunTable) -> dict:
    ranges = {c: [float(v.min()), float(v.max())] for c, v in table.columns.items()
              if len(v) and np.all(np.isfinite(v))}
    return {"source": table.source, "sha256": table.sha256, "n_runs": len(table),
            "loss_col": table.loss_col, "loss_unit": table.loss_unit, "ranges": ranges, **{k: v for k, v in table.extra.items() if v}}
