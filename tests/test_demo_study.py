"""The demo's study stages (fit, plan, report) on a run table drawn from known laws, without
training: every stage-2 series with enough D1 and D2 values gets a fit, each gets the scratch
series that trains its own model on its own blend as the planner's reference, and the report
says why a series was not fitted or planned."""
from __future__ import annotations

import csv

import numpy as np
import pytest

from megareuse import demo
from megareuse.sweep.grid import load_experiment

M = 1e6
REUSE = dict(A=2.0, a1=0.08, a2=0.3, a3=0.01, E=1.4)
SCRATCH = dict(A=6.0, a=0.3, E=1.4)


def reuse_loss(d1, d2, p=REUSE):
    x1, x2 = d1 / M, d2 / M
    return p["A"] * x1 ** -p["a1"] * x2 ** (-p["a2"] + p["a3"] * np.log(x1)) + p["E"]


def scratch_loss(d):
    return SCRATCH["A"] * (d / M) ** -SCRATCH["a"] + SCRATCH["E"]


def write_table(path, rows):
    keys = sorted({k for r in rows for k in r})
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys, restval="")
        w.writeheader()
        w.writerows(rows)


N0, B = 1e5, 0.1  # a series from several sizes: reuse_N's factor (N / N0)^-B on the reuse term


def study_rows(exp, rng):
    """The data points of ``exp``'s plan with losses from the laws above (0.2% noise); a series
    that starts from several bases gets each base's grown size N and the factor (N / N0)^-B."""
    from megareuse.sweep.grid import grown_model
    rows = []
    noise = lambda: float(np.exp(0.002 * rng.standard_normal()))
    bases = {b.name: b for b in exp.bases}
    for s in exp.stage2:
        for name in s.bases or [exp.base.name]:
            base = bases[name]
            model = {**exp.train.get("model", {}), **base.model}
            n = demo._model_params(exp, model if s.method == "cpt" else grown_model(model, s.growth))
            size = (n / N0) ** -B if s.bases and len(s.bases) > 1 else 1.0
            for d1 in s.D1 or base.budgets:
                for d2 in s.budgets:
                    loss = ((reuse_loss(d1, d2) - REUSE["E"]) * size + REUSE["E"]) * noise()
                    rows.append({"series": s.name, "N": n, "D1": d1, "D2": d2, "tokens_per_s": 1000.0,
                                 "valid_loss_code": loss, "valid_loss_prose": loss})
    for s in exp.scratch:
        n = demo._model_params(exp, s.model)
        for d in s.budgets:
            loss = scratch_loss(d) * noise()
            rows.append({"series": s.name, "N": n, "D1": d, "D2": 0, "D": d, "tokens_per_s": 1000.0,
                         "valid_loss_code": loss, "valid_loss_prose": loss})
    return rows


@pytest.fixture(scope="module")
def overtrained_study(tmp_path_factory):
    exp = load_experiment(demo.PRESETS["overtrained"])
    out = tmp_path_factory.mktemp("study")
    rows = study_rows(exp, np.random.default_rng(0))
    write_table(out / "runs.csv", rows)
    with pytest.MonkeyPatch.context() as mp:  # the report's machinery, at 40 resamples (the demo's 200: slow)
        mp.setattr(demo, "FIT_RESAMPLES", 40)
        fits = {s.name: demo._fit_series(out / "runs.csv", out, 1, s) for s in exp.stage2}
        plans = {s.name: demo._plan_series(exp, s, fits[s.name][0], out / "runs.csv", out) for s in exp.stage2}
    return exp, out, rows, fits, plans


def test_every_overtrained_series_is_fitted_near_its_truth(overtrained_study):
    exp, out, _, fits, _ = overtrained_study
    assert set(fits) == {"cpt", "cpt_mix", "stack", "stack_lr1e-3"}
    for name, (fit, why) in fits.items():
        assert why is None, name
        law = fit["law"]
        assert law.form.name == ("reuse_N" if name == "stack_lr1e-3" else "reuse")  # two base sizes
        assert law.params["a3"] == pytest.approx(REUSE["a3"], abs=0.01), name
        assert law.bootstrap and "a3" in law.bootstrap["intervals"]
        assert (out / f"{name}_law" / "law.json").is_file()
    joint = fits["stack_lr1e-3"][0]
    assert joint["law"].params["b"] == pytest.approx(B, abs=0.03)
    check = joint["holdout"]  # the longest stage 2 at both sizes, predicted from the rest
    assert check["n_test"] == 10 and check["n_train"] == 20 and check["mare"] < 0.01
    assert set(joint["per_size"]) == {101_808, 184_896}  # each size's runs alone, grown d48 and d64
    for n, (own, why) in joint["per_size"].items():
        assert why is None and own["law"].form.name == "reuse"
        assert own["law"].params["a3"] == pytest.approx(REUSE["a3"], abs=0.01), n
        assert (out / f"stack_lr1e-3_N{n}_law" / "law.json").is_file()
    for name in ("cpt", "cpt_mix", "stack"):
        assert "per_size" not in fits[name][0]


def test_each_series_is_planned_against_its_own_scratch_series(overtrained_study):
    exp, out, _, _, plans = overtrained_study
    assert {k: p["scratch_name"] for k, p in plans.items()} == {
        "cpt": "scratch_code", "cpt_mix": "scratch_code", "stack": "scratch_prose_4l",
        "stack_lr1e-3": "scratch_prose_4l"}
    grown, base = plans["stack"]["plan"]["N"], plans["stack"]["plan"]["N_base"]
    assert (grown, base) == (101_808, 50_928)  # the FLOPs view pays the base at its own size
    assert plans["cpt"]["plan"]["N"] == plans["cpt"]["plan"]["N_base"] == 50_928
    # two sizes: the planner weighs the size scratch_prose_4l trains, with that size's own law
    assert plans["stack_lr1e-3"]["N"] == plans["stack_lr1e-3"]["plan"]["N"] == 101_808
    for p in plans.values():
        assert (out / p["dir"] / "plan.png").is_file()
        assert p["plan"]["split"]["verdict"] in ("reuse", "scratch", "undecided")


def test_report_has_a_law_and_a_planner_section_per_series(overtrained_study):
    exp, _, rows, fits, plans = overtrained_study
    info = {"domains": {d: {"train": {"tokens": 3_000_000}} for d in ("prose", "code", "mix")}}
    text = demo._study_report(exp, rows, fits, plans, {"sweep": 1.0}, 1, 1, 1, 2, info)
    for name in ("cpt", "cpt_mix", "stack", "stack_lr1e-3"):
        assert f"## The law on the `{name}` runs" in text
    assert text.count("Fitted `reuse`: a3 = ") == 3
    assert text.count("Fitted `reuse_N` (all sizes, with N): a3 = ") == 1
    assert "The N = 101,808 runs alone, `reuse`: a3 = " in text and "The N = 184,896 runs alone" in text
    assert "the `stack_lr1e-3` law of the N = 101,808 runs vs a `power` law" in text
    assert "From scratch `scratch_prose_4l` on prose" in text
    assert "vs a `power` law fitted to the `scratch_prose_4l` runs" in text


def test_laptop_growth_is_reported_as_not_fitted_and_not_planned(tmp_path):
    exp = load_experiment(demo.PRESETS["laptop"])
    rows = study_rows(exp, np.random.default_rng(1))
    write_table(tmp_path / "runs.csv", rows)
    stack = next(s for s in exp.stage2 if s.name == "stack")
    fit, why = demo._fit_series(tmp_path / "runs.csv", tmp_path, 1, stack)
    assert fit is None and why.startswith("not fitted: 2 D1 values") and "at least 3" in why
    assert demo._plan_series(exp, stack, fit, tmp_path / "runs.csv", tmp_path) == {"skipped": "no law was fitted"}
    assert demo.scratch_for(exp, stack) is None  # no 6-layer scratch series on prose in the laptop preset


def test_runs_table_gets_an_n_column_for_several_sizes():
    rows = [{"series": "g", "N": n, "D1": 10, "D2": 5, "valid_loss_prose": 3.0, "tokens_per_s": 1.0}
            for n in (2000, 1000)]
    table = demo._runs_table(rows, "g", "valid_loss_prose")
    assert table[0].startswith("| N | D1 |") and table[2].startswith("| 1,000 | 10 |")
    assert demo._runs_table(rows[:1], "g", "valid_loss_prose")[0].startswith("| D1 |")


def test_plan_line_says_when_the_split_sits_on_the_edge_of_the_laws_reach():
    split = {"budget_tokens": 9.4e6, "D1": 40960.0, "D2": 9.36e6, "loss": 3.2, "scratch_loss": 3.15,
             "decision": "scratch", "verdict": "undecided", "at_edge": True, "D1_range": [40960.0, 2.1e7]}
    plan = {"dir": "plan_x", "scratch_name": "scratch_code", "plan": {"split": split}}
    text = "\n".join(demo._plan_lines("x", plan))
    assert "Decision: **scratch** (bootstrap verdict: undecided)." in text
    assert "edge of the D1 the law may extrapolate to (4.096e+04 .. 2.1e+07, 4x beyond its runs each way)" in text
    assert "less base than it has seen" in text
    split.update(at_edge=False)
    assert "edge" not in "\n".join(demo._plan_lines("x", plan))
