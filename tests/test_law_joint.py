"""The joint laws with model size N (reuse_N, reuse_N_additive) against known truths, and
experiment files whose growth series start from several base sizes.

Synthetic losses come from plain numpy formulas here (not the forms' code), with N and the token
counts in millions (the units the fitter picks for these grids)."""
import textwrap
from pathlib import Path

import numpy as np
import pytest

from megareuse.config import ConfigError
from megareuse.law import LawError, compare_forms, fit_form, table_from_arrays
from megareuse.law.forms import Form, get_form
from megareuse.law.validate import holdout_mask
from megareuse.sweep.grid import load_experiment, plan_experiment

M = 1e6
REPO = Path(__file__).parent.parent
D1_GRID, D2_GRID = np.geomspace(0.25e6, 4e6, 4), np.geomspace(0.125e6, 1e6, 4)
TRUTH = {
    "reuse_N": {"A": 2.0, "b": 0.3, "a1": 0.1, "a2": 0.35, "a3": 0.03, "E": 1.5},
    "reuse_N_additive": {"E": 1.2, "B": 1.0, "alpha": 0.5, "A": 1.5, "a1": 0.1, "a2": 0.35, "a3": 0.03},
}


def truth_loss(name, p, N, D1, D2):
    n, x1, x2 = N / M, D1 / M, D2 / M
    reuse = x1 ** -p["a1"] * x2 ** (-p["a2"] + p["a3"] * np.log(x1))
    if name == "reuse_N":
        return p["A"] * n ** -p["b"] * reuse + p["E"]
    if name == "reuse_N_additive":
        return p["E"] + p["B"] * n ** -p["alpha"] + p["A"] * reuse
    raise KeyError(name)


def draw(name, sizes=(0.5e6, 1e6, 2e6), noise=1e-4, seed=0, p=None):
    N, D1, D2 = (a.ravel() for a in np.meshgrid(sizes, D1_GRID, D2_GRID, indexing="ij"))
    rng = np.random.default_rng(seed)
    loss = truth_loss(name, p or TRUTH[name], N, D1, D2) * np.exp(noise * rng.standard_normal(len(N)))
    return table_from_arrays(loss, N=N, D1=D1, D2=D2)


@pytest.mark.parametrize("name, sizes", [("reuse_N", (0.5e6, 2e6)), ("reuse_N", (0.5e6, 1e6, 2e6)),
                                         ("reuse_N_additive", (0.5e6, 1e6, 2e6))])
def test_joint_form_recovers_its_parameters(name, sizes):
    law = fit_form(draw(name, sizes), name)
    assert law.diagnostics["converged"]
    assert law.units["params"] == M and law.units["tokens"] == M
    for key, value in TRUTH[name].items():
        assert law.params[key] == pytest.approx(value, rel=0.03, abs=0.01), key


def test_joint_forms_predict_the_closed_form_at_a_point():
    x = {"N": np.log([3.0]), "D1": np.log([2.0]), "D2": np.log([0.5])}  # N = 3M, D1 = 2M, D2 = 0.5M
    p = TRUTH["reuse_N"]
    expected = 2.0 * 3.0 ** -0.3 * 2.0 ** -0.1 * 0.5 ** (-0.35 + 0.03 * np.log(2.0)) + 1.5
    assert get_form("reuse_N").predict(p, x)[0] == pytest.approx(expected, rel=1e-12)
    q = TRUTH["reuse_N_additive"]
    expected = 1.2 + 1.0 * 3.0 ** -0.5 + 1.5 * 2.0 ** -0.1 * 0.5 ** (-0.35 + 0.03 * np.log(2.0))
    assert get_form("reuse_N_additive").predict(q, x)[0] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("name", ["reuse_N", "reuse_N_additive"])
def test_joint_form_jacobian_matches_finite_differences(name):
    form = get_form(name)
    numeric = Form(name, form.inputs, form.linear, form.nonlinear, form.terms, bounds=form.bounds)
    rng = np.random.default_rng(1)
    lx = {c: rng.normal(0, 1, 7) for c in form.inputs}
    phi = {p: float(v) for p, v in zip(form.nonlinear, rng.uniform(0.1, 0.5, len(form.nonlinear)))}
    np.testing.assert_allclose(form.basis_jac(phi, lx), numeric.basis_jac(phi, lx), atol=1e-7)


@pytest.mark.parametrize("truth, other", [("reuse_N", "reuse_N_additive"), ("reuse_N_additive", "reuse_N")])
def test_held_out_comparison_prefers_the_generating_joint_form(truth, other):
    t = draw(truth, seed=3)
    comp = compare_forms(t, [truth, other], rule="D2>=1M")  # the longest runs at every size
    by_form = {r["form"]: r for r in comp["results"]}
    assert comp["n_test"] == 12 and by_form[truth]["converged"]
    assert by_form[truth]["mare"] < 0.2 * by_form[other]["mare"]
    assert comp["selected"] == truth


def test_default_largest_rule_with_four_sizes_compares_both_joint_forms():
    t = draw("reuse_N_additive", sizes=(0.25e6, 0.5e6, 1e6, 2e6), seed=4)
    comp = compare_forms(t, ["reuse_N", "reuse_N_additive"], rule="largest")  # as for joint.yaml
    assert comp["n_train"] == 3 * 3 * 3 and all("mare" in r for r in comp["results"])
    assert comp["selected"] == "reuse_N_additive"


def test_one_model_size_skips_the_joint_forms_with_the_reason():
    t = draw("reuse_N", sizes=(1e6,))
    comp = compare_forms(t, rule="largest")  # N is constant: 'largest' holds out the D edge only
    skipped = {r["form"]: r.get("skipped") for r in comp["results"]}
    assert comp["n_test"] == 7
    assert skipped["reuse_N"] == ("column 'N' has a single value (1e+06) in the training runs; form reuse_N "
                                  "needs at least 2 distinct values of N")
    assert skipped["reuse"] is None and comp["selected"] not in ("reuse_N", "reuse_N_additive")
    with pytest.raises(LawError, match="column 'N' has a single value"):
        fit_form(t, "reuse_N")


def test_no_N_column_lists_the_joint_forms_as_skipped():
    t = draw("reuse_N", sizes=(1e6,))
    plain = table_from_arrays(t.loss, D1=t.columns["D1"], D2=t.columns["D2"])
    skipped = {r["form"]: r.get("skipped") for r in compare_forms(plain, rule="largest")["results"]}
    assert skipped["reuse_N"].startswith("column 'N' (the model size") and "needs N, D1, D2" in skipped["reuse_N"]
    assert "chinchilla" not in skipped  # it needs D, which this table lacks as well


def test_fit_compare_auto_reports_the_joint_forms_as_skipped_without_N():
    """`megareuse fit` (compare auto) on a D1/D2 table names the joint forms and why they are
    missing, as compare_forms does, instead of leaving them out silently."""
    from megareuse.law import analyse
    from megareuse.law.report import fit_report
    t = draw("reuse_N", sizes=(1e6,))
    plain = table_from_arrays(t.loss, D1=t.columns["D1"], D2=t.columns["D2"])
    result = analyse(plain, "reuse", n_boot=0, figures=False)
    skipped = {r["form"]: r.get("skipped") for r in result["comparison"]["results"]}
    assert skipped["reuse_N"].startswith("column 'N'") and skipped["reuse_N_additive"].startswith("column 'N'")
    assert skipped["reuse"] is None
    assert "reuse_N | 6 | skipped: column 'N'" in fit_report(result)


def test_additive_N_term_needs_three_sizes():
    t = draw("reuse_N_additive", sizes=(0.5e6, 2e6))
    with pytest.raises(LawError, match="column 'N' has 2 distinct values .*needs at least 3 distinct values"):
        fit_form(t, "reuse_N_additive")
    comp = compare_forms(t, ["reuse_N", "reuse_N_additive"], rule="D2>=1M")
    assert "at least 3 distinct values of N" in comp["results"][1]["skipped"]
    assert comp["results"][0]["converged"]


def test_largest_rule_ignores_a_constant_column():
    t = draw("reuse_N", sizes=(1e6,))
    d1, d2 = t.columns["D1"], t.columns["D2"]
    np.testing.assert_array_equal(holdout_mask(t, "largest", ("N", "D1", "D2")),
                                  (d1 == d1.max()) | (d2 == d2.max()))


# -- experiment files: growth series from several base sizes ----------------------------------------
def write_experiment(tmp_path, body):
    path = tmp_path / "exp.yaml"
    path.write_text(f"name: e\ntrain_config: {REPO}/configs/train/tiny_base.yaml\n"
                    "overrides: [run.micro_batch_size=8]\n" + textwrap.dedent(body))
    return path


TWO_BASES = """\
    base: {domains: {prose: 1}, D1: [131072, 262144]}
    bases:
      - {name: base_small, model: {d_model: 64, ffn_hidden: 160}, domains: {prose: 1}, D1: [131072, 262144]}
    stage2:
      - {name: cpt, method: cpt, domains: {code: 1}, D2: [65536]}
      - {name: stack, method: stack, bases: [base, base_small], domains: {prose: 1}, D1: [131072],
         D2: [65536, 131072], growth: {depth: 2}}
    """


def test_growth_series_from_two_base_sizes_plans_two_model_sizes(tmp_path):
    from megareuse.config import Config, apply_overrides
    from megareuse.model import non_embedding_param_count
    exp = load_experiment(write_experiment(tmp_path, TWO_BASES))
    runs = plan_experiment(exp)
    ids = {r.run_id: r for r in runs}
    assert {"base/D=131072", "base_small/D=262144", "cpt/D1=131072/D=65536", "stack/base/D1=131072/grown",
            "stack/base_small/D1=131072/D=131072"} <= set(ids)
    assert "cpt/base_small/D1=131072/D=65536" not in ids  # cpt names no bases: the first base only
    small = ids["stack/base_small/D1=131072/grown"]
    assert small.grow["from"] == "base_small/D=131072/checkpoints/step_00000128"
    sizes = {}
    for r in runs:
        if r.data_point and r.series == "stack":
            model = apply_overrides(exp.train, r.overrides)["model"]
            sizes[r.run_id] = non_embedding_param_count(Config.from_dict({**exp.train, "model": model}).model)
    assert len(set(sizes.values())) == 2
    small_trunk = ids["stack/base_small/D1=131072/trunk"]
    assert {"model.d_model=64", "model.ffn_hidden=160", "model.n_layers=6"} <= set(small_trunk.overrides)
    assert "model.d_model=64" in ids["base_small/trunk"].overrides


def test_shipped_joint_experiment_plans_growth_from_four_base_sizes():
    exp = load_experiment(REPO / "configs" / "experiments" / "joint.yaml")
    runs = plan_experiment(exp)
    sizes = {tuple(o for o in r.overrides if o.startswith("model.")) for r in runs
             if r.data_point and r.series == "stack"}
    assert len(sizes) == 4


@pytest.mark.parametrize("body, message", [
    ("bases: {name: b2}\n", r"bases = \{'name': 'b2'\}: accepted a list of base series"),
    ("bases: [{name: base, domains: {prose: 1}, D1: [131072]}]\n", r"bases\[0\].name = 'base': accepted"),
    ("bases: [{name: b2, model: [d_model], domains: {prose: 1}, D1: [131072]}]\n",
     r"bases\[0\].model = \['d_model'\]: accepted a mapping of model fields"),
    ("bases: [{name: b2, model: {width: 64}, domains: {prose: 1}, D1: [131072]}]\n",
     r"bases\[0\].model.width = 64: accepted one of the model fields"),
    ("stage2: [{name: s, method: stack, bases: [nope], domains: {prose: 1}, D2: [65536], growth: {depth: 2}}]\n",
     r"stage2\[0\].bases = \['nope'\]: accepted a non-empty list of names from base"),
    ("bases: [{name: b2, domains: {prose: 1}, D1: [262144]}]\n"
     "stage2: [{name: s, method: cpt, bases: [base, b2], D1: [131072], domains: {code: 1}, D2: [65536]}]\n",
     r"stage2\[0\].D1 = \[131072\]: accepted a subset of the D1 of base b2 \[262144\]"),
])
def test_bad_bases_fail_with_one_line(tmp_path, body, message):
    path = write_experiment(tmp_path, "base: {domains: {prose: 1}, D1: [131072]}\n" + body)
    with pytest.raises(ConfigError, match=message) as info:
        load_experiment(path)
    assert "\n" not in str(info.value)
