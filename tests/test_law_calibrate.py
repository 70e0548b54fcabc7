"""Calibrated prediction intervals (megareuse/law/calibrate.py), against synthetic truths: the
pooled noise of repeated cells against the known sigma and the chi-square law of its estimate;
held-out coverage under a misfit the fitted form cannot represent against the nominal level;
the rolling out-of-sample errors and the conformal rank against a brute-force loop; law.json."""
import json
import math

import numpy as np
import pytest
from scipy.special import ndtr
from scipy.stats import chi2

from megareuse.law import Law, LawError, fit_form, load_table, table_from_arrays
from megareuse.law.calibrate import calibrate, calibrated_interval, conformal_scale, noise_from_repeats, repeat_cells
from megareuse.law.commands import finite_json
from megareuse.law.report import calibration_text, fit_report
from megareuse.law.resampling import bootstrap
from megareuse.law.validate import holdout_check

M = 1e6
TRUTH = dict(A=2.0, a1=0.1, a2=0.35, a3=0.05, E=1.5)


def grid(n1=5, n2=5):
    d1, d2 = np.meshgrid(np.geomspace(0.25e6, 64e6, n1), np.geomspace(0.125e6, 16e6, n2))
    return d1.ravel(), d2.ravel()


def reuse_loss(D1, D2, extra=0.0, drift=0.0):
    """The reuse law, plus `extra` * D2^-1 (a second power law in D2) or with the D2 exponent
    drifting by -drift * ln D2 (the loss falls ever faster with D2): D2 in M tokens. No reuse
    law represents either (one power of D2 per D1, one floor E)."""
    x1, x2 = D1 / M, D2 / M
    p = TRUTH
    return (p["A"] * x1 ** -p["a1"] * x2 ** (-p["a2"] + p["a3"] * np.log(x1) - drift * np.log(x2)) + p["E"]
            + extra / x2)


def repeated_table(rng, sigma, seeds=3, extra=0.0, n1=4, n2=4):
    """Every cell of an n1 x n2 grid run `seeds` times (group = the cell), log-normal noise sigma."""
    d1, d2 = grid(n1, n2)
    D1, D2 = np.repeat(d1, seeds), np.repeat(d2, seeds)
    loss = reuse_loss(D1, D2, extra) * np.exp(sigma * rng.standard_normal(len(D1)))
    cells = np.repeat([f"c{i}" for i in range(len(d1))], seeds)
    return table_from_arrays(loss, D1=D1, D2=D2, group=cells,
                             run_id=[f"{c}/s{k}" for c, k in zip(cells, np.tile(range(seeds), len(d1)))])


# -- (i) run-to-run noise from repeats ----------------------------------------------------------
def test_pooled_noise_recovers_sigma_within_its_sampling_error():
    sigma, seeds, draws = 0.02, 3, 400
    rng = np.random.default_rng(7)
    t = repeated_table(rng, sigma, seeds)
    est = noise_from_repeats(t, ("D1", "D2"))
    # brute force: per-cell sample variances (ddof 1) of ln loss, weighted by their degrees of freedom
    logy = np.log(t.loss).reshape(-1, seeds)
    assert est["dof"] == 16 * (seeds - 1) and est["n_cells"] == 16 and est["source"] == "repeats"
    assert est["sigma"] ** 2 == pytest.approx(np.mean(np.var(logy, axis=1, ddof=1)), rel=1e-12)
    # over independent draws: nu s^2 / sigma^2 ~ chi-square(nu), so E[s^2] = sigma^2 with sd sigma^2 sqrt(2/nu)
    nu = est["dof"]
    s2 = np.array([noise_from_repeats(repeated_table(rng, sigma, seeds), ("D1", "D2"))["sigma"] ** 2
                   for _ in range(draws)])
    assert abs(s2.mean() - sigma ** 2) <= 3 * sigma ** 2 * math.sqrt(2 / nu) / math.sqrt(draws)
    inside = np.mean((chi2.ppf(0.05, nu) <= nu * s2 / sigma ** 2) & (nu * s2 / sigma ** 2 <= chi2.ppf(0.95, nu)))
    assert abs(inside - 0.9) <= 3 * math.sqrt(0.09 / draws), inside


def test_noise_is_separated_from_misfit_and_lack_of_fit_is_detected():
    """With a misfit the residual RMS grows, the within-cell scatter does not."""
    sigma, rng = 0.01, np.random.default_rng(3)
    for extra, misfit in ((0.0, False), (0.3, True)):
        t = repeated_table(rng, sigma, seeds=3, extra=extra, n1=4, n2=5)
        law = fit_form(t, "reuse")
        cal = calibrate(t, law, level=0.9)
        noise = cal["noise"]
        assert noise["source"] == "repeats" and noise["dof"] == 40
        assert noise["sigma"] == pytest.approx(sigma, abs=3 * sigma / math.sqrt(2 * 40))
        assert (noise["lack_of_fit"]["p_value"] < 0.01) is misfit, noise["lack_of_fit"]
        assert cal["scale"] >= noise["sigma"] and cal["misfit"] == pytest.approx(
            math.sqrt(cal["scale"] ** 2 - noise["sigma"] ** 2))
        if misfit:
            assert cal["scale"] > 2 * sigma  # out-of-sample errors are mostly misfit here


def test_without_repeats_the_noise_falls_back_to_residuals_and_says_so():
    d1, d2 = grid(4, 4)
    loss = reuse_loss(d1, d2) * np.exp(0.01 * np.random.default_rng(1).standard_normal(len(d1)))
    t = table_from_arrays(loss, D1=d1, D2=d2)
    assert noise_from_repeats(t, ("D1", "D2")) is None
    law = fit_form(t, "reuse")
    cal = calibrate(t, law)
    resid = np.log(t.loss) - np.log(law.predict(t))
    assert cal["noise"]["source"] == "residuals" and cal["misfit"] is None
    assert cal["noise"]["sigma"] == pytest.approx(math.sqrt(np.sum(resid ** 2) / (16 - 5)))
    assert "not measured" in cal["noise"]["note"] and "**not measured**" in calibration_text(cal)


def test_repeats_are_rows_at_the_same_inputs_within_a_group(tmp_path):
    ones = np.ones(4)
    same = dict(D1=ones, D2=2 * ones)
    # no group column: rows at the same inputs are repeats
    cells = repeat_cells(table_from_arrays([3.0, 3.1, 3.2, 3.3], **same), ("D1", "D2"))
    assert [list(c) for c in cells] == [[0, 1, 2, 3]]
    # with groups: only rows of one group at the same inputs
    cells = repeat_cells(table_from_arrays([3.0, 3.1, 3.2, 3.3], group=["a", "a", "b", "c"], **same), ("D1", "D2"))
    assert [list(c) for c in cells] == [[0, 1]]
    # a CSV whose group column is blank for cells run once: each such row is a group of its own
    csv = tmp_path / "runs.csv"
    csv.write_text("run_id,D1,D2,loss,group,seed\nr1,1,2,3.0,cell7,0\nr2,1,2,3.1,cell7,1\n"
                   "r3,1,4,2.9,,0\nr4,2,4,2.8,,0\n")
    t = load_table(csv)
    assert list(t.group) == ["cell7", "cell7", "r3", "r4"]
    assert noise_from_repeats(t, ("D1", "D2"))["dof"] == 1
    jl = tmp_path / "runs.jsonl"
    jl.write_text('{"run_id": "a", "D1": 1, "D2": 2, "loss": 3.0, "group": "g"}\n'
                  '{"run_id": "b", "D1": 1, "D2": 2, "loss": 3.1, "group": null}\n'
                  '{"run_id": "c", "D1": 1, "D2": 3, "loss": 3.2}\n')
    assert list(load_table(jl).group) == ["g", "b", "c"]


# -- the out-of-sample errors and the conformal scale, by brute force ------------------------------
def test_rolling_errors_and_conformal_scale_match_a_brute_force_loop():
    d1, d2 = grid(4, 5)
    t = table_from_arrays(reuse_loss(d1, d2, 0.2) * np.exp(0.01 * np.random.default_rng(5).standard_normal(20)),
                          D1=d1, D2=d2, run_id=[f"r{i}" for i in range(20)])
    law = fit_form(t, "reuse")  # no bootstrap here, none of the refits: the interval is the residual term alone
    cal = calibrate(t, law, level=0.9, n_resamples=0)
    errors, folds = [], []
    for axis in ("D1", "D2"):  # a fresh multi-start fit on the runs below each level from the third, predicting it
        for value in np.unique(t.columns[axis])[2:]:
            window, at = t.subset(t.columns[axis] < value), t.subset(t.columns[axis] == value)
            fold = fit_form(window, "reuse")
            errors += list(np.log(at.loss) - np.log(fold.predict(at)))
            folds.append((window, fold, at))
    assert cal["axes"] == ["D1", "D2"] and cal["n_folds"] == 2 + 3 and cal["n_scores"] == 2 * 5 + 3 * 4 == len(errors)
    np.testing.assert_allclose([r["residual"] for r in cal["residuals"]], errors, atol=1e-6)
    q = np.sort(np.abs(errors))[math.ceil(23 * 0.9) - 1]  # conformal rank 21 of 22
    assert cal["rank"] == 21 and cal["rank_exact"] and q > cal["noise"]["sigma"] * 1.645
    lo, hi = calibrated_interval(law, {"D1": [4e6], "D2": [32e6]})
    pred = law.predict(D1=4e6, D2=32e6)
    np.testing.assert_allclose([lo[0], hi[0]], [pred * np.exp(-q), pred * np.exp(q)], rtol=1e-6)
    # with each refit's bootstrap: the score is the error beyond that refit's 90% percentile interval
    cal = calibrate(t, law, level=0.9, n_resamples=10, seed=3)
    h = []
    for k, (window, fold, at) in enumerate(folds):
        bootstrap(window, fold, 10, seed=3 + k + 1, level=0.9)
        logp = np.log([np.exp(fold.form.log_predict(th, fold.log_inputs(at))) for th in fold.bootstrap["theta"]])
        centre = np.log(fold.predict(at))
        h += list(np.where(np.log(at.loss) < centre, centre - np.percentile(logp, 5, axis=0),
                           np.percentile(logp, 95, axis=0) - centre))
    expect = np.sqrt(np.maximum(np.square(errors) - np.square(np.maximum(h, 0)), 0)) / 1.6448536269514722
    # (the refits here start from a multi-start fit of each window, calibrate's from the law: their
    # bootstrap end points agree to the optimiser's tolerance, not to the last digit)
    np.testing.assert_allclose([r["score"] for r in cal["residuals"]], expect, rtol=0.01, atol=1e-4)
    assert cal["scale"] == pytest.approx(max(np.sort(expect)[20], cal["noise"]["sigma"]), rel=0.01)


def test_too_few_errors_for_the_conformal_rank_fall_back_to_a_student_t_bound():
    from scipy.stats import t as student
    values = np.array([0.01, 0.02, 0.03])  # 3 < 9: rank ceil(4 * 0.9) = 4 does not exist
    scale, rank, exact = conformal_scale(values, 0.9)
    assert not exact and rank == 3
    assert scale == pytest.approx(student.ppf(0.95, 3) * math.sqrt(np.mean(values ** 2)), rel=1e-9)
    assert conformal_scale(np.array([0.01] * 8 + [1.0]), 0.9) == (1.0, 9, True)  # 9 values: rank 9, the largest


def test_calibration_refuses_what_it_cannot_do():
    d1, d2 = grid(2, 4)
    t = table_from_arrays(reuse_loss(d1, d2), D1=d1, D2=d2)
    law = fit_form(t, "reuse_no_interaction")
    with pytest.raises(LawError, match="level = 1.5: accepted a number between 0 and 1"):
        calibrate(t, law, level=1.5)
    with pytest.raises(LawError, match="calibration axes = \\['N'\\]: accepted a list of inputs of form"):
        calibrate(t, law, axes=["N"])
    with pytest.raises(LawError, match="no out-of-sample errors \\(no input has 3 levels\\)"):
        calibrate(table_from_arrays(reuse_loss(*grid(2, 2)), D1=grid(2, 2)[0], D2=grid(2, 2)[1]), law)
    d1, d2 = grid(2, 3)
    small = table_from_arrays(reuse_loss(d1, d2), D1=d1, D2=d2)
    with pytest.raises(LawError, match="no out-of-sample errors \\(D2 < 1.6e\\+07: 4 runs for form"):
        calibrate(small, fit_form(small, "reuse_no_interaction"))  # the window below the third D2: 4 runs, 4 parameters
    with pytest.raises(LawError, match="calibration resamples = 1: accepted 0"):
        calibrate(t, law, n_resamples=1)
    with pytest.raises(LawError, match="has no calibration; run calibrate"):
        calibrated_interval(law, {"D1": [1e6], "D2": [1e6]})


# -- (ii) coverage of held-out runs under misfit ----------------------------------------------
def coverage_under(truth_of, draws, n_boot=30, fresh=4, sigma=0.01, seed=100):
    """Held-out check (fit the 16 inner runs of a 5 x 5 grid, predict the 9 at the largest D1 or
    D2) on `draws` independent tables drawn from the truth with log-normal noise sigma. Counts
    the held-out runs and `fresh` new runs at each held-out input inside each interval, and the
    exact chance that a new run falls inside (averaged per table: its spread over the tables
    is the standard error of the coverage)."""
    d1, d2 = grid(5, 5)
    truth = truth_of(d1, d2)
    inside = {"": [], "_bootstrap": []}
    chance = {"": [], "_bootstrap": []}
    for k in range(draws):
        rng = np.random.default_rng(seed + k)
        t = table_from_arrays(truth * np.exp(sigma * rng.standard_normal(25)), D1=d1, D2=d2,
                              run_id=[str(i) for i in range(25)])
        check = holdout_check(t, "reuse", "largest", n_boot=n_boot, seed=k, level=0.9)
        assert check["interval"] == "calibrated" and check["n_test"] == 9
        ids = [int(r["run_id"]) for r in check["rows"]]
        new = np.log(truth[ids]) + sigma * rng.standard_normal((fresh, 9))
        for key in inside:
            lo, hi = (np.log([r[end + key] for r in check["rows"]]) for end in ("lo", "hi"))
            inside[key] += [r["inside" + key] for r in check["rows"]] + list(((lo <= new) & (new <= hi)).ravel())
            mu = np.log(truth[ids])
            chance[key].append(np.mean(ndtr((hi - mu) / sigma) - ndtr((lo - mu) / sigma)))
    return ({k: float(np.mean(v)) for k, v in inside.items()}, {k: np.array(v) for k, v in chance.items()},
            len(inside[""]))


def test_calibrated_interval_covers_nominal_under_misfit_and_bootstrap_does_not():
    """Truth: the reuse law plus 0.3 * D2^-1 (no reuse law represents it), 1% noise. 20 tables:
    180 held-out runs and 720 fresh runs at their inputs."""
    inside, chance, n = coverage_under(lambda d1, d2: reuse_loss(d1, d2, extra=0.3), draws=20)
    se = chance[""].std(ddof=1) / math.sqrt(len(chance[""]))
    assert n == 900 and se < 0.025  # +-5 points is at least 2 standard errors
    assert abs(inside[""] - 0.9) <= 0.05 and abs(chance[""].mean() - 0.9) <= 0.05, (inside, chance[""].mean())
    assert inside["_bootstrap"] < 0.80 and chance["_bootstrap"].mean() < 0.80, inside


@pytest.mark.slow
@pytest.mark.parametrize("name, truth_of, band", [
    ("extra D2 term", lambda d1, d2: reuse_loss(d1, d2, extra=0.3), (0.85, 0.95)),
    ("drifting D2 exponent", lambda d1, d2: reuse_loss(d1, d2, drift=0.03), (0.85, 0.95)),
    ("periodic in ln D2", lambda d1, d2: reuse_loss(d1, d2) * (1 + 0.02 * np.sin(np.log(d2 / M))), (0.85, 0.95)),
    ("no misfit", lambda d1, d2: reuse_loss(d1, d2), (0.88, 1.0))])  # conservative where the law is right
def test_calibrated_coverage_over_misfits(name, truth_of, band):
    inside, chance, n = coverage_under(truth_of, draws=60, n_boot=100, seed=5000)
    print(f"{name}: calibrated {inside['']:.3f} ({n} runs), chance {chance[''].mean():.3f} +- "
          f"{chance[''].std(ddof=1) / math.sqrt(60):.3f}; bootstrap {inside['_bootstrap']:.3f}")
    assert band[0] <= inside[""] <= band[1], (name, inside)
    assert band[0] <= chance[""].mean() <= band[1], (name, chance[""].mean())


# -- (iii) law.json and the report --------------------------------------------------------------
def test_law_json_round_trip_with_calibration_and_old_files_load(tmp_path):
    d1, d2 = grid(4, 4)
    t = table_from_arrays(reuse_loss(d1, d2, 0.2) * np.exp(0.01 * np.random.default_rng(2).standard_normal(16)),
                          D1=d1, D2=d2)
    law = fit_form(t, "reuse")
    bootstrap(t, law, 20, seed=0)
    calibrate(t, law)
    at = {"D1": [8e6, 2e6], "D2": [4e6, 16e6]}
    path = tmp_path / "law.json"
    path.write_text(json.dumps(finite_json(law.to_dict())))
    back = Law.load(path)
    assert back.calibration["scale"] == law.calibration["scale"] and back.calibration["noise"]["source"] == "residuals"
    np.testing.assert_allclose(calibrated_interval(back, at), calibrated_interval(law, at), rtol=1e-12)
    with pytest.raises(LawError, match="level = 0.8: accepted the calibration's level 0.9"):
        calibrated_interval(back, at, 0.8)
    old = law.to_dict()
    del old["calibration"]  # as written before calibration existed
    path.write_text(json.dumps(finite_json(old)))
    assert Law.load(path).calibration is None
    damaged = dict(law.to_dict(), calibration={"level": 0.9, "scale": -1})
    path.write_text(json.dumps(finite_json(damaged)))
    with pytest.raises(LawError, match="'calibration' is damaged"):
        Law.load(path)


def test_heldout_report_gives_both_coverages_beside_the_nominal_level():
    d1, d2 = grid(5, 5)
    t = table_from_arrays(reuse_loss(d1, d2, 0.3) * np.exp(0.01 * np.random.default_rng(9).standard_normal(25)),
                          D1=d1, D2=d2)
    check = holdout_check(t, "reuse", "largest", n_boot=20, seed=0, level=0.9)
    law = check["law"]
    for row in check["rows"]:  # the calibrated interval contains the parameter-only one
        lo, hi = law.interval({"D1": [row["D1"]], "D2": [row["D2"]]}, level=0.9, noise=False)
        assert row["lo"] <= lo[0] * (1 + 1e-12) and hi[0] <= row["hi"] * (1 + 1e-12)
        assert row["inside"] == (row["lo"] <= row["observed"] <= row["hi"])
    assert check["coverage"] == np.mean([r["inside"] for r in check["rows"]])
    assert check["coverage_bootstrap"] == np.mean([r["inside_bootstrap"] for r in check["rows"]])
    result = {"table": t, "law": law, "holdout": check, "comparison": None, "per_d1": None, "notes": []}
    text = fit_report(result)
    assert f"nominal **90%**: calibrated interval **{100 * check['coverage']:.2f}%**" in text
    assert (f"as before (parameter resamples times a resampled in-sample residual) "
            f"{100 * check['coverage_bootstrap']:.2f}%") in text
    assert "Prediction intervals for new runs (90%). Calibrated interval" in text  # the law carries its calibration
    uncal = holdout_check(t, "reuse", "largest", n_boot=20, seed=0, level=0.9, calibrated=False)
    assert uncal["interval"] == "bootstrap" and "calibration" not in uncal
    assert [r["lo"] for r in uncal["rows"]] == [r["lo_bootstrap"] for r in check["rows"]]


def test_fit_command_writes_calibration_and_plan_gives_a_new_run_interval(tmp_path):
    """`megareuse fit` calibrates the law it writes; law.json's held-out check names its interval
    and both coverages; the planner's one-run interval is exp(c +- hypot(h, z s)) around the
    parameter-only one, s the stored scale (computed here from the closed form, not the helper)."""
    from scipy.special import ndtri

    from megareuse.law.commands import analyse, law_json, write_fit
    from megareuse.law.plan import make_plan
    from megareuse.law.report import plan_report

    d1, d2 = grid(5, 5)
    t = table_from_arrays(reuse_loss(d1, d2, 0.2) * np.exp(0.01 * np.random.default_rng(4).standard_normal(25)),
                          D1=d1, D2=d2)
    result = analyse(t, "reuse", compare=None, n_boot=20, seed=0, figures=False)
    law = result["law"]
    assert law.calibration and law.calibration["level"] == 0.9 and law.calibration["scale"] > 0
    out = law_json(result)
    assert out["calibration"]["scale"] == law.calibration["scale"]
    assert out["holdout"]["interval"] == "calibrated"
    assert out["holdout"]["coverage_bootstrap"] == result["holdout"]["coverage_bootstrap"]
    assert out["holdout"]["calibration"]["n_scores"] >= 1
    write_fit(result, tmp_path / "fit")
    back = Law.load(tmp_path / "fit" / "law.json")
    assert back.calibration["scale"] == law.calibration["scale"]

    plan = make_plan(back, None, D1=[2e6, 64e6], D2=[1e6, 32e6])
    z, s = float(ndtri(0.95)), back.calibration["scale"]
    for r in plan["rows"]:
        c = math.log(r["loss"])
        h_lo, h_hi = c - math.log(r["loss_lo"]), math.log(r["loss_hi"]) - c
        assert r["run_lo"] == pytest.approx(math.exp(c - math.hypot(max(h_lo, 0), z * s)), rel=1e-9)
        assert r["run_hi"] == pytest.approx(math.exp(c + math.hypot(max(h_hi, 0), z * s)), rel=1e-9)
    assert "one run's interval" in plan_report(plan)

    few = table_from_arrays(reuse_loss(d1[:6], d2[:6]), D1=d1[:6], D2=d2[:6])
    res = analyse(few, "reuse", compare=None, holdout=None, n_boot=5, seed=0, figures=False)
    assert res["law"].calibration is None and any("no calibrated interval" in n for n in res["notes"])
