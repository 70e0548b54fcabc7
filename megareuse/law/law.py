"""A fitted law: form, parameters, units, diagnostics, provenance and bootstrap samples.

Predictions take token and parameter counts in plain units (tokens, parameters); the law
divides by its own unit. law.json is `Law.to_dict()`; `Law.load(path)` reads it back.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Optional, Union

import numpy as np

from megareuse import __version__
from megareuse.law.data import LOSS_UNITS, LawError, RunTable, check_loss_unit
from megareuse.law.forms import Form, get_form
from megareuse.paths import check_input

SCHEMA = "megareuse.law/1"


def _finite_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and bool(np.isfinite(x))


def _calibration(cal, inputs, where: str) -> Optional[dict]:
    """law.json's optional 'calibration' (files written before it existed have none): checked
    for the fields the calibrated interval reads (calibrate.calibrated_interval)."""
    if cal is None:
        return None
    ok = (isinstance(cal, Mapping) and _finite_number(cal.get("level")) and 0 < cal["level"] < 1
          and _finite_number(cal.get("scale")) and cal["scale"] >= 0
          and isinstance(cal.get("noise"), Mapping) and _finite_number(cal["noise"].get("sigma"))
          and isinstance(cal.get("residuals"), list)
          and all(isinstance(r, Mapping) and all(_finite_number(r.get(k)) for k in ("residual", *inputs))
                  for r in cal["residuals"]))
    if not ok:
        raise LawError(f"{where}: 'calibration' is damaged (needs level in (0, 1), scale >= 0, noise.sigma and "
                       f"residuals with finite inputs and residual); accepted law.json written by `megareuse fit`")
    return dict(cal)


class Law:
    def __init__(self, form: Union[str, Form], theta, units: Mapping, diagnostics: Optional[dict] = None,
                 data: Optional[dict] = None, bootstrap: Optional[dict] = None,
                 calibration: Optional[dict] = None) -> None:
        self.form = get_form(form)
        self.theta = np.asarray(theta, dtype=float)
        if self.theta.shape != (self.form.n_params,):
            raise LawError(f"law for form {self.form.name}: {self.theta.size} parameters; "
                           f"accepted {self.form.n_params} ({', '.join(self.form.params)})")
        self.units = dict(units)
        self.diagnostics = dict(diagnostics or {})
        self.data = dict(data or {})
        self.bootstrap = bootstrap
        self.calibration = calibration  # calibrate.calibrate: noise, misfit scale, out-of-sample errors

    @classmethod
    def from_params(cls, form, params: Mapping[str, float], tokens_unit: float = 1.0,
                    params_unit: float = 1.0, source: str = "given parameters", loss_unit: str = "nats") -> "Law":
        """A law from known parameters (e.g. a published fit), inputs in the given units."""
        form = get_form(form)
        check_loss_unit(loss_unit)
        for name, unit in (("tokens_unit", tokens_unit), ("params_unit", params_unit)):
            if not (isinstance(unit, (int, float)) and unit > 0):
                raise LawError(f"{name} = {unit!r}: accepted a positive number")
        units = {"tokens": float(tokens_unit), "tokens_name": f"{tokens_unit:g} tokens",
                 "params": float(params_unit), "params_name": f"{params_unit:g} params", "loss": loss_unit}
        return cls(form, form.theta_from_params(params), units, data={"source": source})

    # -- parameters and predictions ----------------------------------------------------------
    @property
    def params(self) -> dict[str, float]:
        return self.form.params_from_theta(self.theta)

    @property
    def label(self) -> str:
        src = Path(self.data.get("source", "<memory>")).name
        sha = self.data.get("sha256", "")
        return (f"{self.form.name} fitted on {src} ({self.data.get('n_runs', '?')} runs"
                + (f", sha256 {sha[:12]}" if sha else "") + ")")

    @property
    def loss_unit(self) -> str:
        """nats or bits, as the fitted losses were given (files without it: nats)."""
        return self.units.get("loss", "nats")

    @property
    def unit_text(self) -> str:
        text = f"tokens in units of {self.units['tokens']:g} ({self.units['tokens_name']})"
        if "N" in self.form.inputs:
            text += f", parameters in units of {self.units['params']:g} ({self.units['params_name']})"
        return text + f", loss (and E, A, B) in {self.loss_unit}"

    def log_inputs(self, columns) -> dict[str, np.ndarray]:
        if isinstance(columns, RunTable):
            columns = columns.columns
        missing = [c for c in self.form.inputs if c not in columns]
        if missing:
            raise LawError(f"law {self.form.name} needs {', '.join(self.form.inputs)}; {missing[0]} missing")
        arrays = np.broadcast_arrays(*[np.asarray(columns[c], dtype=float) for c in self.form.inputs])
        out = {}
        for c, values in zip(self.form.inputs, arrays):
            values = values.ravel()
            bad = values[~(np.isfinite(values) & (values > 0))]
            if len(bad):
                raise LawError(f"{c} = {bad[0]:g}: accepted positive finite numbers")
            out[c] = np.log(values / self.units["params" if c == "N" else "tokens"])
        return out

    def _shape(self, columns):
        if isinstance(columns, RunTable):
            return (len(columns),)
        return np.broadcast(*[np.asarray(columns[c], dtype=float) for c in self.form.inputs]).shape

    def predict(self, columns=None, **kw) -> np.ndarray:
        """Loss at the given inputs: law.predict(table) or law.predict(D1=..., D2=...)."""
        columns = kw if columns is None else columns
        lx = self.log_inputs(columns)
        return np.exp(self.form.log_predict(self.theta, lx)).reshape(self._shape(columns))

    def predict_samples(self, columns) -> np.ndarray:
        """Predictions under each bootstrap sample: shape (samples, points)."""
        if not self.bootstrap:
            raise LawError(f"law {self.form.name} has no bootstrap samples; fit with --bootstrap N")
        lx = self.log_inputs(columns)
        return np.exp(np.array([self.form.log_predict(t, lx) for t in self.bootstrap["theta"]]))

    def interval(self, columns, level: Optional[float] = None, noise: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Percentile interval of the prediction; with noise=True a prediction interval for a new
        run (bootstrap prediction times a resampled log residual of the fit)."""
        level = self.bootstrap["level"] if level is None else level
        samples = self.predict_samples(columns)
        if noise:
            resid = np.asarray(self.bootstrap["residuals"])
            rng = np.random.default_rng(self.bootstrap.get("seed", 0))
            samples = samples * np.exp(rng.choice(resid, size=samples.shape))
        tail = 50.0 * (1.0 - level)
        return np.percentile(samples, tail, axis=0), np.percentile(samples, 100.0 - tail, axis=0)

    # -- goodness of fit ---------------------------------------------------------------------
    def goodness(self, table: RunTable) -> dict:
        pred = self.predict(table)
        r_log = np.log(pred) - np.log(table.loss)
        r = pred - table.loss
        n, k = len(table), self.form.n_params
        ssr = max(float(np.sum(r_log ** 2)), 1e-300)
        sst = float(np.sum((table.loss - table.loss.mean()) ** 2))
        _, J = self.form.log_predict_jac(self.theta, self.log_inputs(table))
        sv = np.linalg.svd(J, compute_uv=False)
        return {"n_runs": n, "n_params": k, "rms_log": float(np.sqrt(np.mean(r_log ** 2))),
                "rms_loss": float(np.sqrt(np.mean(r ** 2))), "max_abs_rel": float(np.max(np.abs(r / table.loss))),
                "r2": float(1.0 - np.sum(r ** 2) / sst) if sst > 0 else float("nan"),
                "aic": float(n * np.log(ssr / n) + 2 * k), "bic": float(n * np.log(ssr / n) + k * np.log(n)),
                "jac_cond": float(sv[0] / sv[-1]) if sv[-1] > 0 else float("inf")}

    def residuals(self, table: RunTable) -> list[dict]:
        pred = self.predict(table)
        rows = []
        for i in range(len(table)):
            row = {"run_id": str(table.run_id[i])}
            row.update({c: float(table.columns[c][i]) for c in self.form.inputs})
            row.update({"observed": float(table.loss[i]), "predicted": float(pred[i]),
                        "rel_err": float(pred[i] / table.loss[i] - 1.0)})
            rows.append(row)
        return rows

    # -- law.json ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        out = {"schema": SCHEMA, "megareuse_version": __version__, "form": self.form.name,
               "formula": self.form.formula, "inputs": list(self.form.inputs), "params": self.params,
               "theta": [float(t) for t in self.theta], "units": self.units,
               "data": self.data, "diagnostics": self.diagnostics}
        if self.bootstrap:
            out["bootstrap"] = {k: (np.asarray(v).tolist() if k in ("theta", "residuals") else v)
                                for k, v in self.bootstrap.items()}
        if self.calibration:
            out["calibration"] = self.calibration
        return out

    @classmethod
    def from_dict(cls, d: Mapping, where: str = "law") -> "Law":
        if not isinstance(d, Mapping) or d.get("schema") != SCHEMA:
            raise LawError(f"{where}: not a law file (schema {SCHEMA!r} expected); "
                           f"accepted law.json written by `megareuse fit`")
        for key in ("form", "theta", "units"):
            if key not in d:
                raise LawError(f"{where}: field {key!r} missing; accepted law.json written by `megareuse fit`")
        theta, units = d["theta"], d["units"]
        if not (isinstance(theta, list) and all(_finite_number(t) for t in theta)):
            raise LawError(f"{where}: theta = {theta!r}: accepted a list of finite numbers (as `megareuse fit` writes)")
        if not (isinstance(units, Mapping) and all(_finite_number(units.get(k, 1.0)) and units.get(k, 1.0) > 0
                                                   for k in ("tokens", "params"))):
            raise LawError(f"{where}: units = {units!r}: accepted positive 'tokens' and 'params' units")
        if units.get("loss", "nats") not in LOSS_UNITS:
            raise LawError(f"{where}: units.loss = {units['loss']!r}: accepted {', '.join(LOSS_UNITS)}")
        if not isinstance(d.get("data") or {}, Mapping) or not isinstance(d.get("diagnostics") or {}, Mapping):
            raise LawError(f"{where}: 'data' and 'diagnostics' must be mappings")
        try:
            boot = dict(d["bootstrap"]) if d.get("bootstrap") else None
            if boot:
                boot["theta"] = np.asarray(boot["theta"], dtype=float)
                boot["residuals"] = np.asarray(boot["residuals"], dtype=float)
        except (KeyError, TypeError, ValueError):
            raise LawError(f"{where}: 'bootstrap' is damaged; accepted law.json written by `megareuse fit`") from None
        law = cls(d["form"], theta, units, d.get("diagnostics"), d.get("data"), boot,
                  _calibration(d.get("calibration"), get_form(d["form"]).inputs, where))
        stored = d.get("params")
        if stored is not None:  # derived from theta when written: a disagreement means a hand edit
            derived = law.params
            def same(written, value) -> bool:  # a non-finite value is written as null (finite_json)
                if written is None:
                    return not np.isfinite(value)
                return _finite_number(written) and bool(np.isclose(written, value, rtol=1e-9, atol=0))
            if not isinstance(stored, Mapping) or set(stored) != set(derived) or not all(
                    same(stored[k], v) for k, v in derived.items()):
                raise LawError(f"{where}: 'params' {stored!r} do not follow from 'theta' (the law is theta; "
                               "params are written beside it for reading): accepted law.json as `megareuse fit` "
                               "wrote it")
        return law

    @classmethod
    def load(cls, path) -> "Law":
        path = check_input(path, "file", "law file", "law.json written by `megareuse fit`", LawError)
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise LawError(f"law file {path} is not JSON ({exc}); accepted law.json written by `megareuse fit`") from None
        law = cls.from_dict(d, where=str(path))
        law.data.setdefault("law_file", str(path))
        return law
