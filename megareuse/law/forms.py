"""Scaling-law forms as objects, and the registry that names them.

Every form is a sum of terms, each a positive linear coefficient times exp(basis):

    L = sum_j c_j * exp(G_j(phi; ln x))

with the coefficients c (the closed-form linear part: A, B, E) fitted as log c, and the
nonlinear parameters phi (exponents, ...) searched. The log of the prediction is then a
logsumexp, which keeps fits numerically safe. A form without a linear part has one term that
is ln L itself (`linear=()`).

Inputs reach a form as natural logs of the token/parameter counts in the law's unit, e.g.
x["D1"] = ln(D1 / 1e6). Adding a form takes a few lines:

    register_form(Form("shifted_power", inputs=("D",), linear=("A", "E"), nonlinear=("a", "d0"),
                       terms=lambda p, x: [-p["a"] * np.logaddexp(x["D"], p["d0"]), 0.0],
                       bounds={"a": (0.0, 3.0), "d0": (-10.0, 10.0)}))

`min_levels` names inputs that need more than 2 distinct values to be identified (the fit and the
form comparison refuse fewer with one line): reuse_N_additive's E + B * N^(-alpha) needs 3 sizes.
"""
from __future__ import annotations

import itertools
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from megareuse.law.data import LawError

LOG_COEF_BOUNDS = (-40.0, 40.0)
_FD_STEP = 1e-6


class Form:
    """A named law: inputs (table columns), linear coefficients, nonlinear parameters, bounds."""

    def __init__(self, name: str, inputs: Sequence[str], linear: Sequence[str], nonlinear: Sequence[str],
                 terms: Callable, jac: Optional[Callable] = None,
                 bounds: Optional[Mapping[str, tuple]] = None, grid: Optional[Mapping[str, Sequence]] = None,
                 formula: str = "", order: Optional[Sequence[str]] = None,
                 min_levels: Optional[Mapping[str, int]] = None) -> None:
        if not name or not isinstance(name, str):
            raise LawError(f"form name = {name!r}: accepted a non-empty string")
        self.name, self.formula = name, formula or name
        self.inputs, self.linear, self.nonlinear = tuple(inputs), tuple(linear), tuple(nonlinear)
        self.terms, self.jac = terms, jac
        names = self.linear + self.nonlinear
        if len(set(names)) != len(names):
            raise LawError(f"form {name}: parameter names {names} repeat; accepted distinct names")
        self.params = tuple(order) if order else names
        if sorted(self.params) != sorted(names):
            raise LawError(f"form {name}: order {self.params} must list exactly {names}")
        bounds = dict(bounds or {})
        unknown = set(bounds) - set(self.nonlinear)
        if unknown:
            raise LawError(f"form {name}: bounds for unknown parameters {sorted(unknown)}; "
                           f"accepted: {', '.join(self.nonlinear)}")
        self.bounds = {p: tuple(map(float, bounds.get(p, (-5.0, 5.0)))) for p in self.nonlinear}
        grid = dict(grid or {})
        self.grid = {p: [float(v) for v in grid[p]] if p in grid
                     else list(np.linspace(*self.bounds[p], 5)[1:-1]) for p in self.nonlinear}
        levels = dict(min_levels or {})
        for c, k in levels.items():
            if c not in self.inputs or isinstance(k, bool) or not isinstance(k, int) or k < 2:
                raise LawError(f"form {name}: min_levels[{c!r}] = {k!r}: accepted an integer >= 2 for one of "
                               f"the inputs {', '.join(self.inputs)}")
        # distinct values of each input the fit needs (2 unless a term needs more to be identified)
        self.min_levels = {c: int(levels.get(c, 2)) for c in self.inputs}

    def __repr__(self) -> str:
        return f"Form({self.name!r}: {self.formula})"

    @property
    def n_params(self) -> int:
        return len(self.linear) + len(self.nonlinear)

    # -- parameter vectors: theta = [log c_1 .. log c_m, phi_1 .. phi_k] --------------------
    def raw_bounds(self) -> list[tuple[float, float]]:
        return [LOG_COEF_BOUNDS] * len(self.linear) + [self.bounds[p] for p in self.nonlinear]

    def params_from_theta(self, theta: Sequence[float]) -> dict[str, float]:
        m = len(self.linear)
        with np.errstate(over="ignore"):  # a huge log-coefficient is inf, which the callers check
            values = {p: float(np.exp(theta[i])) for i, p in enumerate(self.linear)}
        values.update({p: float(theta[m + i]) for i, p in enumerate(self.nonlinear)})
        return {p: values[p] for p in self.params}

    def theta_from_params(self, params: Mapping[str, float]) -> np.ndarray:
        missing = [p for p in self.params if p not in params]
        if missing:
            raise LawError(f"form {self.name}: parameters {missing} missing; accepted: {', '.join(self.params)}")
        bad = [p for p in self.linear if not float(params[p]) > 0]
        if bad:
            raise LawError(f"form {self.name}: {bad[0]} = {params[bad[0]]}: accepted a positive number")
        return np.array([np.log(float(params[p])) for p in self.linear]
                        + [float(params[p]) for p in self.nonlinear])

    # -- evaluation ---------------------------------------------------------------------------
    def _phi(self, theta) -> dict[str, float]:
        m = len(self.linear)
        return {p: float(theta[m + i]) for i, p in enumerate(self.nonlinear)}

    def basis(self, phi: Mapping[str, float], lx: Mapping[str, np.ndarray]) -> np.ndarray:
        n = len(next(iter(lx.values())))
        out = self.terms(phi, lx)
        rows = len(self.linear) or 1
        if len(out) != rows:
            raise LawError(f"form {self.name}: terms() returned {len(out)} terms; expected {rows}")
        G = np.empty((rows, n))
        for j, term in enumerate(out):
            G[j] = term
        return G

    def basis_jac(self, phi: Mapping[str, float], lx: Mapping[str, np.ndarray]) -> np.ndarray:
        """dG/dphi with shape (terms, nonlinear, n): analytic where the form gives it."""
        n = len(next(iter(lx.values())))
        out = np.zeros((len(self.linear) or 1, len(self.nonlinear), n))
        if self.jac is not None:
            for j, entries in enumerate(self.jac(phi, lx)):
                for p, value in entries.items():
                    out[j, self.nonlinear.index(p)] = value
            return out
        for k, p in enumerate(self.nonlinear):
            h = _FD_STEP * max(1.0, abs(phi[p]))
            up, dn = dict(phi), dict(phi)
            up[p] += h
            dn[p] -= h
            out[:, k] = (self.basis(up, lx) - self.basis(dn, lx)) / (2 * h)
        return out

    def log_predict(self, theta, lx) -> np.ndarray:
        G = self.basis(self._phi(theta), lx)
        m = len(self.linear)
        if m == 0:
            return G[0]
        Z = np.asarray(theta[:m], dtype=float)[:, None] + G
        return np.logaddexp.reduce(Z, axis=0) if m > 1 else Z[0]

    def log_predict_jac(self, theta, lx) -> tuple[np.ndarray, np.ndarray]:
        """ln L and its Jacobian d ln L / d theta, shape (n, n_params)."""
        phi = self._phi(theta)
        G, dG = self.basis(phi, lx), self.basis_jac(phi, lx)
        m = len(self.linear)
        if m == 0:
            return G[0], dG[0].T
        Z = np.asarray(theta[:m], dtype=float)[:, None] + G
        top = Z.max(axis=0)
        E = np.exp(Z - top)
        total = E.sum(axis=0)
        logL = top + np.log(total)
        S = E / total
        J = np.concatenate([S.T, np.einsum("jn,jkn->nk", S, dG)], axis=1)
        return logL, J

    def predict(self, params: Mapping[str, float], lx: Mapping[str, np.ndarray]) -> np.ndarray:
        return np.exp(self.log_predict(self.theta_from_params(params), lx))

    def start_grid(self) -> list[dict[str, float]]:
        keys = list(self.nonlinear)
        return [dict(zip(keys, combo)) for combo in itertools.product(*(self.grid[k] for k in keys))]


# -- the built-in forms ---------------------------------------------------------------------------
def _reuse_terms(p, x):
    return [-p["a1"] * x["D1"] - (p["a2"] - p.get("a3", 0.0) * x["D1"]) * x["D2"], 0.0]


def _reuse_jac(p, x):
    out = {"a1": -x["D1"], "a2": -x["D2"]}
    if "a3" in p:
        out["a3"] = x["D1"] * x["D2"]
    return [out, {}]


def _transfer_terms(p, x):
    return [-p["b"] * np.logaddexp(x["D2"], p["ln_k"] + p["g"] * x["D1"]), 0.0]


def _transfer_jac(p, x):
    u = np.logaddexp(x["D2"], p["ln_k"] + p["g"] * x["D1"])
    share = np.exp(p["ln_k"] + p["g"] * x["D1"] - u)
    return [{"b": -u, "ln_k": -p["b"] * share, "g": -p["b"] * share * x["D1"]}, {}]


def _reuse_N_terms(p, x):
    return [-p["b"] * x["N"] + _reuse_terms(p, x)[0], 0.0]


def _reuse_N_jac(p, x):
    return [{"b": -x["N"], **_reuse_jac(p, x)[0]}, {}]


def _reuse_N_additive_terms(p, x):
    return [0.0, -p["alpha"] * x["N"], _reuse_terms(p, x)[0]]


def _reuse_N_additive_jac(p, x):
    return [{}, {"alpha": -x["N"]}, _reuse_jac(p, x)[0]]


_EXP = [0.05, 0.15, 0.3, 0.6, 1.0]
_REUSE_BOUNDS = {"a1": (-3, 3), "a2": (-1, 5), "a3": (-2, 2)}
_REUSE_GRID = {"a1": [-0.1, 0.0, 0.1, 0.3, 0.6], "a2": _EXP, "a3": [-0.1, -0.03, 0.0, 0.03, 0.1]}
BUILTIN = [
    Form("reuse", ("D1", "D2"), ("A", "E"), ("a1", "a2", "a3"), _reuse_terms, _reuse_jac,
         bounds={"a1": (-3, 3), "a2": (-1, 5), "a3": (-2, 2)},
         grid={"a1": [-0.1, 0.0, 0.1, 0.3, 0.6], "a2": _EXP, "a3": [-0.1, -0.03, 0.0, 0.03, 0.1]},
         formula="L = A * D1^(-a1) * D2^(-a2 + a3 ln D1) + E", order=("A", "a1", "a2", "a3", "E")),
    Form("reuse_no_interaction", ("D1", "D2"), ("A", "E"), ("a1", "a2"), _reuse_terms, _reuse_jac,
         bounds={"a1": (-3, 3), "a2": (-1, 5)}, grid={"a1": [-0.1, 0.0, 0.1, 0.3, 0.6], "a2": _EXP},
         formula="L = A * D1^(-a1) * D2^(-a2) + E", order=("A", "a1", "a2", "E")),
    Form("additive", ("D1", "D2"), ("E", "A", "B"), ("a1", "a2"),
         lambda p, x: [0.0, -p["a1"] * x["D1"], -p["a2"] * x["D2"]],
         lambda p, x: [{}, {"a1": -x["D1"]}, {"a2": -x["D2"]}],
         bounds={"a1": (-1, 5), "a2": (-1, 5)}, grid={"a1": _EXP, "a2": _EXP},
         formula="L = E + A * D1^(-a1) + B * D2^(-a2)", order=("E", "A", "a1", "B", "a2")),
    Form("transfer", ("D1", "D2"), ("B", "E"), ("b", "ln_k", "g"), _transfer_terms, _transfer_jac,
         bounds={"b": (0, 5), "ln_k": (-30, 30), "g": (-2, 3)},
         grid={"b": [0.1, 0.3, 0.6, 1.0], "ln_k": [-4.0, -2.0, 0.0, 2.0], "g": [0.2, 0.5, 1.0]},
         formula="L = E + B * (D2 + exp(ln_k) * D1^g)^(-b)", order=("E", "B", "b", "ln_k", "g")),
    Form("power", ("D",), ("A", "E"), ("a",), lambda p, x: [-p["a"] * x["D"], 0.0],
         lambda p, x: [{"a": -x["D"]}, {}], bounds={"a": (-1, 5)},
         grid={"a": [0.03, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5]},
         formula="L = A * D^(-a) + E", order=("A", "a", "E")),
    Form("chinchilla", ("N", "D"), ("E", "A", "B"), ("alpha", "beta"),
         lambda p, x: [0.0, -p["alpha"] * x["N"], -p["beta"] * x["D"]],
         lambda p, x: [{}, {"alpha": -x["N"]}, {"beta": -x["D"]}],
         bounds={"alpha": (-1, 5), "beta": (-1, 5)}, grid={"alpha": _EXP, "beta": _EXP},
         formula="L = E + A * N^(-alpha) + B * D^(-beta)", order=("E", "A", "alpha", "B", "beta")),
    # the joint laws with model size N (the grown model's non-embedding parameters)
    Form("reuse_N", ("N", "D1", "D2"), ("A", "E"), ("b", "a1", "a2", "a3"), _reuse_N_terms, _reuse_N_jac,
         bounds={"b": (-1, 3), **_REUSE_BOUNDS}, grid={"b": [0.0, 0.15, 0.3, 0.6], **_REUSE_GRID},
         formula="L = A * N^(-b) * D1^(-a1) * D2^(-a2 + a3 ln D1) + E",
         order=("A", "b", "a1", "a2", "a3", "E")),
    # E + B * N^(-alpha) has three parameters and is seen through one asymptote per N: 3 sizes
    Form("reuse_N_additive", ("N", "D1", "D2"), ("E", "B", "A"), ("alpha", "a1", "a2", "a3"),
         _reuse_N_additive_terms, _reuse_N_additive_jac,
         bounds={"alpha": (-1, 5), **_REUSE_BOUNDS}, grid={"alpha": [0.1, 0.3, 0.6, 1.0], **_REUSE_GRID},
         formula="L = E + B * N^(-alpha) + A * D1^(-a1) * D2^(-a2 + a3 ln D1)",
         order=("E", "B", "alpha", "A", "a1", "a2", "a3"), min_levels={"N": 3}),
]

_REGISTRY: dict[str, Form] = {}


def register_form(form: Form, replace: bool = False) -> Form:
    """Add a form to the registry; `megareuse fit --form NAME` and the Python API then know it."""
    if not isinstance(form, Form):
        raise LawError(f"register_form: got {type(form).__name__}; accepted a megareuse.law.Form")
    if form.name in _REGISTRY and not replace:
        raise LawError(f"form {form.name!r} is already registered; pass replace=True to replace it")
    _REGISTRY[form.name] = form
    return form


def get_form(name) -> Form:
    if isinstance(name, Form):
        return name
    if name not in _REGISTRY:
        raise LawError(f"form = {name!r}: accepted {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def available_forms() -> list[str]:
    return list(_REGISTRY)


def forms_for_columns(columns) -> list[str]:
    """The registered forms whose inputs a table with these columns provides."""
    return [name for name, f in _REGISTRY.items() if all(c in columns for c in f.inputs)]


for _form in BUILTIN:
    register_form(_form)
