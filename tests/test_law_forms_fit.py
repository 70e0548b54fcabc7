"""The law's forms, fitter and bootstrap against known truths.

Synthetic losses are computed here with plain numpy formulas (not with the forms' own code),
so a wrong form, a wrong fit or a wrong unit conversion makes these tests fail.
"""
import argparse

import numpy as np
import pytest

from megareuse.law import LawError, bootstrap, fit_form, register_form, table_from_arrays
from megareuse.law import fit as fit_module
from megareuse.law import forms as forms_module
from megareuse.law.forms import Form

M = 1e6  # the token unit the fitter picks for these grids (reported in law.units)
D1_GRID, D2_GRID = np.geomspace(0.25e6, 4e6, 5), np.geomspace(0.125e6, 1e6, 5)


def grid(d1=D1_GRID, d2=D2_GRID):
    a, b = np.meshgrid(d1, d2)
    return a.ravel(), b.ravel()


def truth_loss(name, p, D1=None, D2=None, N=None, D=None):
    """Independent closed forms, token counts in millions (N and D in billions for chinchilla)."""
    if name == "reuse":
        x1, x2 = D1 / M, D2 / M
        return p["A"] * x1 ** -p["a1"] * x2 ** (-p["a2"] + p["a3"] * np.log(x1)) + p["E"]
    if name == "reuse_no_interaction":
        return p["A"] * (D1 / M) ** -p["a1"] * (D2 / M) ** -p["a2"] + p["E"]
    if name == "additive":
        return p["E"] + p["A"] * (D1 / M) ** -p["a1"] + p["B"] * (D2 / M) ** -p["a2"]
    if name == "transfer":
        return p["E"] + p["B"] * (D2 / M + np.exp(p["ln_k"]) * (D1 / M) ** p["g"]) ** -p["b"]
    if name == "power":
        return p["A"] * (D / M) ** -p["a"] + p["E"]
    if name == "chinchilla":
        return p["E"] + p["A"] * (N / 1e9) ** -p["alpha"] + p["B"] * (D / 1e9) ** -p["beta"]
    raise KeyError(name)


TRUTHS = {
    "reuse": dict(A=1.8, a1=0.08, a2=0.25, a3=0.03, E=1.6),
    "reuse_no_interaction": dict(A=1.8, a1=0.08, a2=0.25, E=1.6),
    "additive": dict(E=1.5, A=0.6, a1=0.3, B=1.2, a2=0.35),
    "transfer": dict(E=1.5, B=2.0, b=0.4, ln_k=-0.5, g=0.7),
    "power": dict(A=2.0, a=0.3, E=1.7),
    "chinchilla": dict(E=1.69, A=0.9, alpha=0.34, B=1.1, beta=0.28),
}


def noise_free_table(name):
    p = TRUTHS[name]
    if name == "power":
        cols = {"D": np.geomspace(0.1e6, 10e6, 25)}
    elif name == "chinchilla":
        n, d = np.meshgrid(np.geomspace(1e8, 10e9, 5), np.geomspace(0.1e9, 10e9, 5))
        cols = {"N": n.ravel(), "D": d.ravel()}
    else:
        d1, d2 = grid()
        cols = {"D1": d1, "D2": d2}
    return table_from_arrays(truth_loss(name, p, **cols), **cols)


@pytest.mark.parametrize("name", list(TRUTHS))
def test_noise_free_recovery_from_default_starts(name):
    law = fit_form(noise_free_table(name), name)
    expect_unit = 1e9 if name == "chinchilla" else M
    assert law.units["tokens"] == expect_unit
    d = law.diagnostics
    assert d["converged"] and d["grad_norm"] < 1e-6 and d["rms_log"] < 1e-8
    for key, true in TRUTHS[name].items():
        assert law.params[key] == pytest.approx(true, rel=1e-4), key
    assert d["varpro"]["agree"]  # the variable-projection search lands on the same law
    for key, true in TRUTHS[name].items():
        assert d["varpro"]["params"][key] == pytest.approx(true, rel=1e-4), key


@pytest.mark.parametrize("name", ["reuse", "transfer"])
def test_lbfgs_alone_recovers_truth(name):
    """Without the variable-projection search (grid starts + L-BFGS only) the answer is the same."""
    law = fit_form(noise_free_table(name), name, varpro=False)
    for key, true in TRUTHS[name].items():
        assert law.params[key] == pytest.approx(true, rel=1e-4), key


def test_user_form_in_a_few_lines():
    form = Form("shifted_power_test", inputs=("D",), linear=("A", "E"), nonlinear=("a", "d0"),
                terms=lambda p, x: [-p["a"] * np.logaddexp(x["D"], p["d0"]), 0.0],
                bounds={"a": (0.0, 3.0), "d0": (-5.0, 5.0)}, grid={"a": [0.2, 0.5, 1.0], "d0": [-2, 0, 1]})
    register_form(form)
    try:
        D = np.geomspace(0.05e6, 20e6, 12)
        loss = 2.0 * (D / M + np.exp(-1.0)) ** -0.45 + 1.3
        law = fit_form(table_from_arrays(loss, D=D), "shifted_power_test")
        for key, true in dict(A=2.0, a=0.45, d0=-1.0, E=1.3).items():
            assert law.params[key] == pytest.approx(true, rel=1e-4), key
        with pytest.raises(LawError, match="already registered"):
            register_form(form)
    finally:
        forms_module._REGISTRY.pop("shifted_power_test", None)


def test_goodness_of_fit_numbers():
    """RMS, R^2 and AIC from their definitions, on a fit with known residuals."""
    t = noise_free_table("power")
    noisy = table_from_arrays(t.loss * np.exp(0.01 * np.sin(np.arange(25.0))), D=t.columns["D"])
    law = fit_form(noisy, "power")
    pred = law.predict(D=noisy.columns["D"])
    r = np.log(pred) - np.log(noisy.loss)
    d = law.diagnostics
    assert d["rms_log"] == pytest.approx(np.sqrt(np.mean(r ** 2)), rel=1e-12)
    assert d["rms_loss"] == pytest.approx(np.sqrt(np.mean((pred - noisy.loss) ** 2)), rel=1e-12)
    sst = np.sum((noisy.loss - noisy.loss.mean()) ** 2)
    assert d["r2"] == pytest.approx(1 - np.sum((pred - noisy.loss) ** 2) / sst, rel=1e-12)
    assert d["aic"] == pytest.approx(25 * np.log(np.sum(r ** 2) / 25) + 2 * 3, rel=1e-12)


def test_non_convergence_is_reported(monkeypatch):
    monkeypatch.setitem(fit_module.LBFGS_OPTIONS, "maxiter", 2)
    d1, d2 = grid()
    p = TRUTHS["reuse"]
    loss = truth_loss("reuse", p, D1=d1, D2=d2) * np.exp(0.01 * np.cos(np.arange(25.0) * 1.7))
    law = fit_form(table_from_arrays(loss, D1=d1, D2=d2), "reuse", varpro=False)
    assert law.diagnostics["converged"] is False
    assert "ITERATIONS" in law.diagnostics["message"].upper()


# -- 1% multiplicative noise on a 5 x 5 grid spanning 256x in D1 and 128x in D2 --------------------
WIDE = grid(np.geomspace(0.25e6, 64e6, 5), np.geomspace(0.125e6, 16e6, 5))
NOISY_TRUTH = dict(A=2.0, a1=0.1, a2=0.35, a3=0.05, E=1.5)
# Stated tolerances: about 3.5 standard deviations of each estimate over 40 noise seeds.
TOLERANCE = dict(A=0.3, a1=0.02, a2=0.06, a3=0.008, E=0.25)


def noisy_table(p, seed, sigma=0.01):
    d1, d2 = WIDE
    rng = np.random.default_rng(seed)
    loss = truth_loss("reuse", p, D1=d1, D2=d2) * np.exp(sigma * rng.standard_normal(len(d1)))
    return table_from_arrays(loss, D1=d1, D2=d2)


def test_noisy_reuse_parameters_and_a3_interval():
    table = noisy_table(NOISY_TRUTH, seed=3)
    law = fit_form(table, "reuse")
    assert law.diagnostics["converged"]
    for key, true in NOISY_TRUTH.items():
        assert abs(law.params[key] - true) <= TOLERANCE[key], (key, law.params[key])
    boot = bootstrap(table, law, 100, seed=0)
    assert boot["n_converged"] >= 95
    lo, hi = boot["intervals"]["a3"]
    assert lo <= NOISY_TRUTH["a3"] <= hi and boot["a3_excludes_zero"] is True
    for key in NOISY_TRUTH:  # every parameter gets an interval around its estimate
        assert boot["intervals"][key][0] <= law.params[key] <= boot["intervals"][key][1]


def test_no_interaction_data_gives_a3_interval_containing_zero():
    table = noisy_table(dict(NOISY_TRUTH, a3=0.0), seed=5)
    law = fit_form(table, "reuse")
    boot = bootstrap(table, law, 100, seed=1)
    lo, hi = boot["intervals"]["a3"]
    assert lo <= 0.0 <= hi and boot["a3_excludes_zero"] is False


def test_bootstrap_same_numbers_with_two_workers():
    table = noisy_table(NOISY_TRUTH, seed=7)
    law = fit_form(table, "reuse")
    one = bootstrap(table, law, 16, seed=11, workers=1)["theta"].copy()
    two = bootstrap(table, law, 16, seed=11, workers=2)["theta"]
    np.testing.assert_array_equal(one, two)
    other = bootstrap(table, law, 16, seed=12, workers=1)["theta"]
    assert not np.array_equal(one, other)


def test_bootstrap_resamples_whole_groups():
    d1, d2 = grid()
    loss = truth_loss("reuse", TRUTHS["reuse"], D1=d1, D2=d2)
    table = table_from_arrays(np.concatenate([loss, loss * 1.001]), D1=np.tile(d1, 2), D2=np.tile(d2, 2),
                              group=np.tile(np.arange(25), 2))
    law = fit_form(table, "reuse")
    boot = bootstrap(table, law, 4, seed=0)
    assert boot["resample_unit"] == "group"
    from megareuse.law.resampling import _resample_rows
    rows = _resample_rows(table.group, 0, 0)
    assert len(rows) == 50 and all(np.sum(table.group[rows] == g) % 2 == 0 for g in range(25))


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_resamples=1), "resamples"), (dict(workers=0), "workers"), (dict(level=1.5), "level"),
    (dict(seed=-1), "seed")])
def test_bootstrap_rejects_bad_arguments(kwargs, match):
    table = noise_free_table("power")
    law = fit_form(table, "power")
    args = dict(n_resamples=10, seed=0, workers=1, level=0.9)
    args.update(kwargs)
    with pytest.raises(LawError, match=match):
        bootstrap(table, law, **args)


def test_fit_input_errors_name_the_field():
    d1, d2 = grid()
    loss = truth_loss("reuse", TRUTHS["reuse"], D1=d1, D2=d2)
    with pytest.raises(LawError, match="column 'D2' missing"):
        fit_form(table_from_arrays(loss, D1=d1), "reuse")
    with pytest.raises(LawError, match="column 'D1' has 1 non-finite or non-positive"):
        fit_form(table_from_arrays(loss, D1=np.where(np.arange(25) == 3, np.nan, d1), D2=d2), "reuse")
    with pytest.raises(LawError, match="column 'loss' has 1 non-finite or non-positive"):
        fit_form(table_from_arrays(np.where(np.arange(25) == 0, -1.0, loss), D1=d1, D2=d2), "reuse")
    with pytest.raises(LawError, match="4 runs for form reuse, which has 5 parameters"):
        fit_form(table_from_arrays(loss[:4], D1=d1[:4], D2=d2[:4] * np.arange(1, 5)), "reuse")
    with pytest.raises(LawError, match="single value"):
        fit_form(table_from_arrays(loss[:5], D1=d1[:5] * 0 + 1e6, D2=d2[:5]), "reuse")
    with pytest.raises(LawError, match="form = 'nope': accepted reuse"):
        fit_form(table_from_arrays(loss, D1=d1, D2=d2), "nope")


def test_parser_registers_both_commands():
    from megareuse.law import register
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command", required=True)
    register(sub)
    args = p.parse_args(["fit", "--runs", "x.csv", "--out", "o"])
    assert callable(args.func) and args.holdout is None and args.loss_col == "loss"
    assert callable(p.parse_args(["plan", "--law", "l.json", "--out", "o"]).func)


def test_load_table_formats_filters_and_row_numbers(tmp_path):
    from megareuse.law import load_table
    jl = tmp_path / "runs.jsonl"
    jl.write_text('{"run_id": "a", "method": "cpt", "D1": 1e6, "D2": 2e5, "valid_loss": {"code": 3.5}, "group": "g1"}\n'
                  '{"run_id": "b", "method": "base", "D1": 1e6, "D2": 0, "valid_loss": {"code": 6.0}, "group": "g1"}\n'
                  '\n{"run_id": "c", "method": "cpt", "D1": 2e6, "D2": 4e5, "valid_loss": {"code": 3.1}, "group": "g2"}\n')
    t = load_table(jl, loss_col="valid_loss.code", where={"method": "cpt"})
    assert list(t.run_id) == ["a", "c"] and list(t.loss) == [3.5, 3.1] and list(t.group) == ["g1", "g2"]
    assert t.columns["D2"].tolist() == [2e5, 4e5] and len(t.sha256) == 64 and "N" not in t.columns
    with pytest.raises(LawError, match="column 'D2' has 1 non-finite or non-positive values \\(runs b\\)"):
        load_table(jl, loss_col="valid_loss_code").require(["D1", "D2"], "form reuse")
    csv = tmp_path / "runs.csv"
    csv.write_text("run_id,step,D,loss,weight\nx,1,1e6,3.0,1\ny,2,2e6,oops,1\n")
    with pytest.raises(LawError, match="row 2 column 'loss' = 'oops' is not a number"):
        load_table(csv)
    csv.write_text("run_id,D2,loss\nx,1e6,3.0\ny,2e6,2.9\n")
    t = load_table(csv, rename={"D": "D2"})
    assert t.columns["D"].tolist() == [1e6, 2e6]
    arr = tmp_path / "runs.json"
    arr.write_text('[{"N": 1e8, "D": 1e9, "loss": 3.0}, {"N": 2e8, "D": 1e9, "loss": 2.9}]')
    assert load_table(arr).columns["N"].tolist() == [1e8, 2e8]
    for bad, match in [(tmp_path / "none.csv", "does not exist"), (tmp_path / "runs.xlsx", "unknown table type")]:
        if bad.suffix == ".xlsx":
            bad.write_text("x")
        with pytest.raises(LawError, match=match):
            load_table(bad)
    with pytest.raises(LawError, match="--where method=grow keeps no rows"):
        load_table(jl, loss_col="valid_loss_code", where={"method": "grow"})
