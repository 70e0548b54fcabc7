"""Held-out checks, form comparison, per-D1 analysis, the planner and the two commands,
against closed forms and known generating laws."""
import json

import numpy as np
import pytest

from megareuse.cli import main
from megareuse.law import (Law, LawError, best_split, compare_forms, expanding_window, holdout_check,
                           leave_one_out, make_plan, marginal_gain, per_d1_analysis,
                           saving_vanishes, scratch_tokens, table_from_arrays)
from megareuse.law.validate import holdout_mask

M = 1e6
WIDE = [a.ravel() for a in np.meshgrid(np.geomspace(0.25e6, 64e6, 5), np.geomspace(0.125e6, 16e6, 5))]
TRUTH = {"reuse": dict(A=2.0, a1=0.1, a2=0.35, a3=0.05, E=1.5),
         "reuse_no_interaction": dict(A=2.0, a1=0.1, a2=0.35, E=1.5),
         "additive": dict(E=1.5, A=0.8, a1=0.3, B=1.5, a2=0.35)}


def loss_of(name, D1, D2):
    p, x1, x2 = TRUTH[name], D1 / M, D2 / M
    if name == "additive":
        return p["E"] + p["A"] * x1 ** -p["a1"] + p["B"] * x2 ** -p["a2"]
    return p["A"] * x1 ** -p["a1"] * x2 ** (-p["a2"] + p.get("a3", 0.0) * np.log(x1)) + p["E"]


def table(name, seed=None, sigma=0.01):
    d1, d2 = WIDE
    loss = loss_of(name, d1, d2)
    if seed is not None:
        loss = loss * np.exp(sigma * np.random.default_rng(seed).standard_normal(len(loss)))
    return table_from_arrays(loss, D1=d1, D2=d2, run_id=[f"r{i}" for i in range(len(d1))])


@pytest.mark.parametrize("generator", list(TRUTH))
def test_comparison_picks_the_generating_form(generator):
    result = compare_forms(table(generator, seed=1), list(TRUTH), rule="largest")
    assert result["n_test"] == 9 and result["n_train"] == 16
    assert result["selected"] == generator, [(r["form"], r["mare"]) for r in result["results"]]


def test_heldout_error_of_the_generating_form_is_at_the_noise_level():
    """1% noise: the true law itself scores ~0.8% on these runs; the fitted one stays within 2%."""
    check = holdout_check(table("reuse", seed=2), "reuse", rule="largest", n_boot=60, seed=0)
    assert check["n_test"] == 9 and len(check["rows"]) == 9
    assert check["mare"] <= 0.02, check["mare"]
    assert check["coverage"] >= 6 / 9  # 90% prediction intervals
    observed = {r["run_id"]: r["observed"] for r in check["rows"]}
    truth = table("reuse", seed=2)
    assert all(observed[rid] == truth.loss[i] for i, rid in enumerate(truth.run_id) if rid in observed)


def test_heldout_rules():
    t = table("reuse")
    d1, d2 = WIDE
    np.testing.assert_array_equal(holdout_mask(t, "largest", ("D1", "D2")), (d1 == d1.max()) | (d2 == d2.max()))
    np.testing.assert_array_equal(holdout_mask(t, "D2>=4M", ("D1", "D2")), d2 >= 4e6 - 1)
    np.testing.assert_array_equal(holdout_mask(t, "D1>=16M|D2>4M", ("D1", "D2")), (d1 >= 16e6 - 1) | (d2 > 4.1e6))
    np.testing.assert_array_equal(holdout_mask(t, "D1>=16M & D2>=4M", ("D1", "D2")), (d1 >= 16e6 - 1) & (d2 >= 4e6 - 1))
    with pytest.raises(LawError, match="cannot read 'D3>=1M'"):
        holdout_mask(t, "D3>=1M", ("D1", "D2"))
    with pytest.raises(LawError, match="holds out 0 of 25 runs"):
        holdout_mask(t, "D2>=1T", ("D1", "D2"))


def test_noise_free_rollout_and_leave_one_out_are_exact():
    t = table("reuse_no_interaction")
    steps = expanding_window(t, "reuse_no_interaction", axis="D2")
    assert [s["predict_at"] for s in steps] == pytest.approx(list(np.unique(WIDE[1])[2:]))
    assert max(s["max_abs_rel"] for s in steps) < 1e-6
    loo = leave_one_out(t, "reuse_no_interaction")
    assert len(loo["rows"]) == 25 and loo["max_abs_rel"] < 1e-6


@pytest.mark.parametrize("E", [1.5, "joint"])
def test_per_d1_analysis_recovers_the_reuse_law(E):
    an = per_d1_analysis(table("reuse"), E=E)
    p = TRUTH["reuse"]
    assert len(an["per_d1"]) == 5
    for row in an["per_d1"]:  # alpha(D1) = a2 - a3 ln D1, A(D1) = A D1^-a1 (D1 in millions)
        assert row["alpha"] == pytest.approx(p["a2"] - p["a3"] * np.log(row["D1"] / M), rel=1e-6)
        assert row["A"] == pytest.approx(p["A"] * (row["D1"] / M) ** -p["a1"], rel=1e-6)
    assert an["alpha_fit"]["a2"] == pytest.approx(p["a2"], rel=1e-6)
    assert an["alpha_fit"]["a3"] == pytest.approx(p["a3"], rel=1e-6)
    assert an["scale_fit"]["a1"] == pytest.approx(p["a1"], rel=1e-6)
    assert an["scale_fit"]["A"] == pytest.approx(p["A"], rel=1e-6)


# -- planner: a3 = 0 reuse law against a power-law scratch law, answers in closed form ----------
A, a1, a2, E = 2.0, 0.1, 0.35, 1.5
As, as_, Es = 3.0, 0.45, 1.5  # the scratch law improves faster with data: the saving vanishes


def laws(scratch_exponent=as_):
    reuse = Law.from_params("reuse", dict(A=A, a1=a1, a2=a2, a3=0.0, E=E), tokens_unit=M)
    scratch = Law.from_params("power", dict(A=As, a=scratch_exponent, E=Es), tokens_unit=M)
    return reuse, scratch


def test_planner_closed_forms():
    reuse, scratch = laws()
    d1, d2 = 2e6, 0.5e6
    x1, x2 = d1 / M, d2 / M
    assert float(reuse.predict(D1=d1, D2=d2)) == pytest.approx(A * x1 ** -a1 * x2 ** -a2 + E, rel=1e-12)
    gain = a2 * A * x1 ** -a1 * x2 ** (-a2 - 1) / M  # -dL/dD2 per token
    assert float(marginal_gain(reuse, d1, d2)) == pytest.approx(gain, rel=1e-7)
    # D_scratch: As (D/M)^-as = A x1^-a1 x2^-a2 (same E)
    ds = M * (A * x1 ** -a1 * x2 ** -a2 / As) ** (-1 / as_)
    L = float(reuse.predict(D1=d1, D2=d2))
    assert scratch_tokens(scratch, L) == pytest.approx(ds, rel=1e-9)
    # saving vanishes where D_s = D2: c x2^(a2/as) = x2, c = (A x1^-a1 / As)^(-1/as)
    c = (A * x1 ** -a1 / As) ** (-1 / as_)
    x_star = c ** (1 / (1 - a2 / as_))
    vanish = saving_vanishes(reuse, scratch, d1)
    assert vanish["D2"] == pytest.approx(x_star * M, rel=1e-8) and vanish["D2_appears"] is None
    # with a slower scratch law (0.3 < a2) the same point is where a saving appears instead
    slow = laws(0.3)[1]
    c = (A * x1 ** -a1 / As) ** (-1 / 0.3)
    turn = saving_vanishes(reuse, slow, d1)
    assert turn["D2"] is None and turn["D2_appears"] == pytest.approx(c ** (1 / (1 - a2 / 0.3)) * M, rel=1e-8)
    # best split of T tokens: D1* = T a1 / (a1 + a2)
    T = 8e6
    s = best_split(reuse, budget_tokens=T)
    assert s["D1"] == pytest.approx(T * a1 / (a1 + a2), rel=1e-6) and s["D2"] == pytest.approx(T - s["D1"], rel=1e-9)
    # FLOP budget C = 6 Nb D1 + 6 N D2: D1* = C a1 / (6 Nb (a1 + a2)), D2* = C a2 / (6 N (a1 + a2))
    C, N, Nb = 1e15, 5e7, 2e7
    s = best_split(reuse, budget_flops=C, N=N, N_base=Nb)
    assert s["D1"] == pytest.approx(C * a1 / (6 * Nb * (a1 + a2)), rel=1e-6)
    assert s["D2"] == pytest.approx(C * a2 / (6 * N * (a1 + a2)), rel=1e-6)


def test_make_plan_rows_are_labelled_and_consistent():
    reuse, scratch = laws()
    plan = make_plan(reuse, scratch, D1=[1e6, 4e6], D2=[0.5e6, 1e6], budget_tokens=8e6, N=1e7)
    assert len(plan["rows"]) == 4 and plan["law"].startswith("reuse") and plan["scratch_law"].startswith("power")
    for r in plan["rows"]:
        assert r["saving_tokens"] == pytest.approx(r["D_scratch"] - r["D2"])
        assert r["flops_with_base"] == pytest.approx(6e7 * (r["D1"] + r["D2"]))
        assert r["gain_per_flop"] == pytest.approx(r["gain_per_token"] / 6e7)
    split = plan["split"]
    L_scratch = As * (8e6 / M) ** -as_ + Es
    assert split["scratch_loss"] == pytest.approx(L_scratch, rel=1e-12)
    assert split["decision"] == ("reuse" if split["loss"] < L_scratch else "scratch")
    with pytest.raises(LawError, match="the planner needs a law over D1 and D2"):
        make_plan(scratch, None, D1=[1e6], D2=[1e6])
    with pytest.raises(LawError, match="N = -1"):
        make_plan(reuse, scratch, D1=[1e6], D2=[1e6], N=-1)


# -- the commands --------------------------------------------------------------------------------
def run(argv):
    return main(argv)  # the real entry point: its one exit path turns errors into 2


def write_runs(path, name="reuse", nested=False):
    t = table(name, seed=4)
    with open(path, "w") as fh:
        if nested:
            for i in range(len(t)):
                fh.write(json.dumps({"run_id": f"cpt{i}", "method": "cpt", "D1": t.columns["D1"][i], "D2": t.columns["D2"][i],
                                     "N": 3.3e5, "valid_loss": {"code": t.loss[i], "prose": 9.0}}) + "\n")
            fh.write(json.dumps({"run_id": "base", "method": "base", "D1": 1e6, "D2": 0, "N": 3.3e5,
                                 "valid_loss": {"code": 6.0, "prose": 4.0}}) + "\n")
        else:
            fh.write("run_id,D1,D2,loss\n")
            for i in range(len(t)):
                fh.write(f"r{i},{t.columns['D1'][i]:.0f},{t.columns['D2'][i]:.0f},{t.loss[i]!r}\n")


def test_fit_and_plan_commands_end_to_end(tmp_path, capsys):
    runs = tmp_path / "runs.jsonl"
    write_runs(runs, nested=True)
    out = tmp_path / "fit"
    assert run(["fit", "--runs", str(runs), "--loss-col", "valid_loss_code", "--where", "method=cpt",
                "--bootstrap", "30", "--compare", "reuse,reuse_no_interaction", "--out", str(out)]) == 0
    law = json.loads((out / "law.json").read_text())
    assert law["form"] == "reuse" and law["data"]["n_runs"] == 25 and len(law["data"]["sha256"]) == 64
    assert law["units"]["tokens"] == M and law["diagnostics"]["converged"] is True
    assert set(law["bootstrap"]["intervals"]) == {"A", "a1", "a2", "a3", "E"}
    assert law["comparison"]["selected"] == "reuse" and law["holdout"]["n_test"] == 9
    report = (out / "report.md").read_text()
    for text in ("a3", "excludes 0", "Held-out check", "Per-D1 analysis", "Form comparison", law["data"]["sha256"]):
        assert text in report
    pytest.importorskip("matplotlib")
    assert (out / "figure1.png").stat().st_size > 1000 and (out / "heldout.png").exists()
    plan_dir = tmp_path / "plan"
    assert run(["plan", "--law", str(out / "law.json"), "--D1", "1M,4M", "--D2", "0.5M,2M",
                "--budget-tokens", "8M", "--N", "3.3e5", "--out", str(plan_dir)]) == 0
    plan = json.loads((plan_dir / "plan.json").read_text())
    assert len(plan["rows"]) == 4 and plan["split"]["D1"] + plan["split"]["D2"] == pytest.approx(8e6)
    assert "reuse fitted on runs.jsonl" in (plan_dir / "plan.md").read_text()


@pytest.mark.parametrize("content, extra, message", [
    ("run_id,D1,loss\nr1,1e6,3.0\n", [], "column 'D2' missing"),
    ("run_id,D1,D2,loss\nr1,1e6,1e5,3.0\nr2,2e6,nan,2.9\n", [], "column 'D2' has 1 non-finite"),
    ("run_id,D1,D2,loss\nr1,1e6,1e5,3.0\nr2,2e6,0,2.9\n", [], "column 'D2' has 1 non-finite or non-positive"),
    ("run_id,D1,D2,loss\nr1,1e6,1e5,3.0\nr2,2e6,2e5,2.9\nr3,4e6,4e5,2.7\n", [], "3 runs for form reuse"),
    ("run_id,D1,D2,loss\nr1,1e6,1e5,x\n", [], "column 'loss' = 'x' is not a number"),
    ("run_id,D1,D2,val\nr1,1e6,1e5,3\n", [], "column 'loss' (the loss, --loss-col) missing"),
    ("run_id,D1,D2,loss\nr1,1e6,1e5,3\n", ["--form", "nope"], "form = 'nope'"),
    ("run_id,D1,D2,loss\nr1,1e6,1e5,3\n", ["--bootstrap", "many"], "--bootstrap = 'many'"),
    ("run_id,D1,D2,loss\nr1,1e6,1e5,3\n", ["--holdout", "D9>1"], "cannot read 'D9>1'"),
])
def test_fit_command_bad_input_one_line_and_nothing_written(tmp_path, capsys, content, extra, message):
    runs = tmp_path / "runs.csv"
    runs.write_text(content)
    out = tmp_path / "out"
    assert run(["fit", "--runs", str(runs), "--out", str(out)] + extra) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("megareuse fit: ") and message in err, err
    assert not out.exists()


def test_plan_command_bad_input(tmp_path, capsys):
    law = tmp_path / "law.json"
    law.write_text(json.dumps(Law.from_params("power", dict(A=3.0, a=0.3, E=1.5), M).to_dict()))
    cases = [(["--law", str(tmp_path / "missing.json")], "does not exist"),
             (["--law", str(law)], "the planner needs a law over D1 and D2"),
             (["--law", str(law), "--D1=-1M"], "the planner needs")]
    for argv, message in cases:
        assert run(["plan"] + argv + ["--out", str(tmp_path / "p")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("megareuse plan: ") and message in err, err
    good = tmp_path / "reuse.json"
    good.write_text(json.dumps(Law.from_params("reuse", dict(A=2, a1=0.1, a2=0.3, a3=0, E=1.5), M).to_dict()))
    assert run(["plan", "--law", str(good), "--D1", "1M", "--D2", "1M", "--budget-tokens=-5",
                "--out", str(tmp_path / "p")]) == 2
    assert "budget_tokens = -5.0: accepted a positive number" in capsys.readouterr().err
    assert run(["plan", "--law", str(good), "--D1=1M,-2M", "--D2", "1M", "--out", str(tmp_path / "p")]) == 2
    assert "D1 = -2000000.0: accepted a positive number" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_figures_skipped_with_a_note_without_matplotlib(monkeypatch, tmp_path):
    from megareuse.law import analyse, plots, write_fit
    monkeypatch.setattr(plots, "_pyplot", lambda: None)
    result = analyse(table("reuse", seed=6), "reuse", compare=None, n_boot=0)
    assert result["files"] == {} and plots.NO_MPL in result["notes"]
    write_fit(result, tmp_path / "fit")
    assert sorted(p.name for p in (tmp_path / "fit").iterdir()) == ["law.json", "report.md"]
    assert plots.NO_MPL in (tmp_path / "fit" / "report.md").read_text()


def test_best_split_stays_where_the_law_has_evidence():
    """With a3 > 0 the D2 exponent -a2 + a3 ln D1 grows without bound as D1 -> 0: unbounded, the
    split puts a few tokens in the base (the sigmoid search's floor). Bounded by split_range (the
    fitted D1 range, SPLIT_REACH times beyond each way) it stops at the bound and says so; an
    interior optimum (a3 = 0: D1* = T a1 / (a1 + a2)) is unchanged."""
    from megareuse.law.plan import SPLIT_REACH, split_range
    from megareuse.law.report import plan_report
    T = 8e6
    sat = Law.from_params("reuse", dict(A=A, a1=a1, a2=a2, a3=0.05, E=E), tokens_unit=M)
    sat.data["ranges"] = {"D1": [1e6, 4e6], "D2": [0.25e6, 2e6]}
    free = best_split(sat, budget_tokens=T)
    assert free["D1"] < 1.0 and free["at_edge"]  # a base of under one token: the artefact
    lo, hi = split_range(sat)
    assert (lo, hi) == (1e6 / SPLIT_REACH, 4e6 * SPLIT_REACH)
    bounded = best_split(sat, budget_tokens=T, D1_range=(lo, hi))
    assert bounded["D1"] == pytest.approx(lo, rel=1e-6) and bounded["at_edge"] and bounded["D1_range"] == [lo, hi]
    assert bounded["D2"] == pytest.approx(T - lo, rel=1e-9)
    plan = make_plan(sat, None, D1=[1e6], D2=[1e6], budget_tokens=T)
    assert plan["split"]["D1"] == pytest.approx(lo, rel=1e-6)
    assert "edge of the D1 the law may extrapolate to (2.5e+05 .. 1.6e+07" in plan_report(plan)
    flat = laws()[0]
    inner = best_split(flat, budget_tokens=T, D1_range=(1e5, 1e7))
    assert inner["D1"] == pytest.approx(T * a1 / (a1 + a2), rel=1e-6) and not inner["at_edge"]
    with pytest.raises(LawError, match="below the D1 the law may extrapolate to"):
        best_split(sat, budget_tokens=2e5, D1_range=(lo, hi))
