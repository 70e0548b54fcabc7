"""The shared asymptote: a stage-2 series and its scratch series fitted with one E, against
synthetic truths (known parameters, small noise), a linearised covariance computed here from the
generating formula, and brute-force planner numbers; the held-out comparison with separate E's;
`megareuse plan --runs`; one-line errors."""
import csv
import json

import numpy as np
import pytest

from megareuse.cli import main
from megareuse.law import LawError, make_plan, table_from_arrays
from megareuse.law.shared import SHARED, check_pair, fit_shared, pair_from_params
from megareuse.law.sharedstudy import capacity_verdict, holdout_compare, shared_lines, shared_study

M = 1e6
TRUTH = dict(A=2.0, a1=0.2, a2=0.3, a3=0.02, B=3.0, b=0.5, E=1.5)
SIGMA = 0.003  # log-normal noise of each run
# D2 over 8x (as the over-trained preset): the stage-2 runs alone pin E down poorly
NARROW = (np.geomspace(0.25e6, 16e6, 4), np.geomspace(0.125e6, 1e6, 4), np.geomspace(0.25e6, 32e6, 6))
# D2 over 128x: each series pins its own E down (so a difference between them shows)
WIDE = (np.geomspace(0.25e6, 16e6, 4), np.geomspace(0.125e6, 16e6, 5), np.geomspace(0.25e6, 64e6, 6))


def reuse_loss(d1, d2, p=TRUTH):
    x1, x2 = d1 / M, d2 / M
    return p["A"] * x1 ** -p["a1"] * x2 ** (-p["a2"] + p["a3"] * np.log(x1)) + p["E"]


def scratch_loss(d, p=TRUTH):
    return p["B"] * (d / M) ** -p["b"] + p["E"]


def tables(grid=NARROW, seed=0, sigma=SIGMA, E_scratch=None):
    D1, D2, DS = grid
    d1, d2 = [a.ravel() for a in np.meshgrid(D1, D2)]
    rng = np.random.default_rng(seed)
    loss = reuse_loss(d1, d2) * np.exp(sigma * rng.standard_normal(len(d1)))
    ls = (scratch_loss(DS, {**TRUTH, "E": E_scratch or TRUTH["E"]})
          * np.exp(sigma * rng.standard_normal(len(DS))))
    return (table_from_arrays(loss, D1=d1, D2=d2, run_id=[f"r{i}" for i in range(len(d1))]),
            table_from_arrays(ls, D=DS, run_id=[f"s{i}" for i in range(len(DS))]))


def linearised_se(grid, sigma=SIGMA) -> dict:
    """Standard errors of E and a3 from sigma^2 (J'J)^-1, J the derivative of ln L (written out here,
    by central differences) by (ln A, ln B, ln E, a1, a2, a3, b), for the joint fit and for the
    stage-2 series alone."""
    D1, D2, DS = grid
    d1, d2 = [a.ravel() for a in np.meshgrid(D1, D2)]
    x1, x2, xs = np.log(d1 / M), np.log(d2 / M), np.log(DS / M)

    def lnL(t):
        lA, lB, lE, a1, a2, a3, b = t
        return np.concatenate([np.logaddexp(lA - a1 * x1 - (a2 - a3 * x1) * x2, lE), np.logaddexp(lB - b * xs, lE)])

    t0 = np.array([np.log(TRUTH["A"]), np.log(TRUTH["B"]), np.log(TRUTH["E"]), TRUTH["a1"], TRUTH["a2"],
                   TRUTH["a3"], TRUTH["b"]])
    J = np.column_stack([(lnL(t0 + h) - lnL(t0 - h)) / 2e-6 for h in 1e-6 * np.eye(7)])
    se = np.sqrt(np.diag(sigma ** 2 * np.linalg.inv(J.T @ J)))
    Jr = J[:len(x1)][:, [0, 2, 3, 4, 5]]
    se_r = np.sqrt(np.diag(sigma ** 2 * np.linalg.inv(Jr.T @ Jr)))
    return {"E": se[2] * TRUTH["E"], "a3": se[5], "E_stage2_alone": se_r[1] * TRUTH["E"]}


@pytest.fixture(scope="module")
def narrow():
    reuse, scratch = tables(NARROW, seed=1)
    return reuse, scratch, shared_study(reuse, scratch, n_boot=60, seed=0)


def test_shared_fit_recovers_E_and_a3_within_the_noise(narrow):
    """Within 5 linearised standard errors: Huber with delta 1e-3 on 0.3% noise is close to least
    absolute deviations, whose standard error is sqrt(pi/2) = 1.25 times least squares', so this is
    4 of its standard errors (a chance below 1e-4)."""
    _, _, study = narrow
    fit, se = study["shared"], linearised_se(NARROW)
    assert fit.diagnostics["converged"] and fit.units["tokens"] == M
    assert fit.params["E"] == pytest.approx(TRUTH["E"], abs=5 * se["E"])
    assert fit.params["a3"] == pytest.approx(TRUTH["a3"], abs=5 * se["a3"])
    assert fit.params["b"] == pytest.approx(TRUTH["b"], abs=0.05)
    # the pair of laws: the shared E in both, the stage-2 law over D1, D2 and the scratch law over D
    assert fit.reuse.form.name == "reuse" and fit.scratch.form.name == "power"
    assert fit.reuse.params["E"] == fit.scratch.params["E"] == fit.params["E"]
    assert fit.reuse.params["a3"] == fit.params["a3"] and fit.scratch.params["a"] == fit.params["b"]
    assert fit.diagnostics["rms_log"] < 2 * SIGMA
    assert fit.diagnostics["E_profile"]["identified"]
    lo, hi = fit.bootstrap["intervals"]["E"]
    assert lo <= fit.params["E"] <= hi


def test_separate_fits_are_less_certain_about_E(narrow):
    """The stage-2 runs alone (D2 over 8x) leave E about 4 times as uncertain as the pair (the
    closed-form ratio of standard errors is 0.26 here); the bootstrap widths must show at least 2x."""
    _, _, study = narrow
    se = linearised_se(NARROW)
    assert se["E"] / se["E_stage2_alone"] < 0.3
    shared = study["shared"].bootstrap["intervals"]["E"]
    separate = study["separate"]["reuse"].bootstrap["intervals"]["E"]
    assert (shared[1] - shared[0]) < 0.5 * (separate[1] - separate[0]), (shared, separate)
    # paired samples: the planner's sample k of both laws comes from one joint resample, one E
    r, s = study["shared"].reuse.bootstrap["theta"], study["shared"].scratch.bootstrap["theta"]
    assert len(r) == len(s) == study["shared"].bootstrap["n_converged"] >= 50
    np.testing.assert_array_equal(r[:, 1], s[:, 1])  # raw ln E of `reuse` (A, E, ...) and `power` (A, E, a)


def test_held_out_runs_detect_two_different_floors():
    """Truth with one E: the shared form is preferred; the same runs with the scratch floor 0.3 lower
    (50x the noise in loss): the shared form predicts the held-out runs worse and is not preferred."""
    for seed in (0, 1):
        same = holdout_compare(*tables(WIDE, seed=seed))
        differ = holdout_compare(*tables(WIDE, seed=seed, E_scratch=1.2))
        assert same["preferred"] == "shared", same["forms"]
        assert differ["preferred"] == "separate", differ["forms"]
        assert differ["forms"]["shared"]["mare"] > differ["forms"]["separate"]["mare"]
        assert differ["n_test"] == [8, 1] and differ["n_train"] == [12, 5]
        E_r, E_s = differ["forms"]["separate"]["E"]
        assert E_r == pytest.approx(1.5, abs=0.1) and E_s == pytest.approx(1.2, abs=0.15)


def test_capacity_finding_needs_both_an_E_gap_and_the_held_out_runs():
    study = shared_study(*tables(WIDE, seed=0, E_scratch=1.2), n_boot=40, seed=0)
    dE = study["E_difference"]
    assert dE["value"] == pytest.approx(0.3, abs=0.15) and dE["interval"][0] > 0
    assert capacity_verdict(dE, study["holdout"]) == "costs"
    text = "\n".join(shared_lines(study, ("cpt", "scratch_code")))
    assert "**reuse costs capacity**" in text and "| one shared E (7 parameters) |" in text
    gap = {"value": 0.3, "interval": [0.1, 0.5], "identified": True}
    assert capacity_verdict(gap, {"preferred": "shared"}) == "unconfirmed"
    assert capacity_verdict({**gap, "interval": [-0.1, 0.5]}, {"preferred": "separate"}) == "no_evidence"
    assert capacity_verdict({**gap, "identified": False}, {"preferred": "separate"}) == "not_identified"
    assert capacity_verdict({**gap, "interval": [-0.5, -0.1]}, {"preferred": "separate"}) == "lowers"


# -- the planner on a shared-E pair ----------------------------------------------------------------
def brute_split(budget: float) -> tuple[float, float, float]:
    """Best split of a token budget under the truth by a dense grid, and the saving against spending
    it from scratch: (D1, loss, saving), D_scratch by bisection on the scratch truth."""
    share = np.linspace(1e-4, 1 - 1e-4, 400_001)
    loss = reuse_loss(share * budget, (1 - share) * budget)
    k = int(np.argmin(loss))
    lo, hi = 1.0, 1e18
    for _ in range(200):
        mid = np.sqrt(lo * hi)
        lo, hi = (mid, hi) if scratch_loss(mid) > loss[k] else (lo, mid)
    return share[k] * budget, float(loss[k]), float(np.sqrt(lo * hi) - budget)


def brute_threshold(d2: float) -> float:
    """The largest D1 where the base-counted saving D_scratch(L(D1, d2)) - D1 - d2 turns <= 0."""
    d1 = np.geomspace(1e4, 1e12, 400_001)
    ds = M * (TRUTH["B"] / (reuse_loss(d1, d2) - TRUTH["E"])) ** (1 / TRUTH["b"])
    pos = ds - d1 - d2 > 0
    last = np.flatnonzero(pos)[-1]
    return float(d1[last])


def test_planner_on_the_true_pair_matches_brute_force():
    reuse, scratch = pair_from_params(TRUTH, tokens_unit=M)
    plan = make_plan(reuse, scratch, D1=[1e6], D2=[1e6], budget_tokens=8e6)
    d1, loss, saving = brute_split(8e6)
    split = plan["split"]
    assert split["loss"] == pytest.approx(loss, rel=1e-7)
    assert split["D1"] == pytest.approx(d1, rel=1e-3)
    assert split["saving"] == pytest.approx(saving, rel=1e-4)
    threshold = next(t for t in plan["thresholds"] if t["view"] == "tokens_with_base")
    assert threshold["status"] == "crosses"
    assert threshold["threshold"] == pytest.approx(brute_threshold(1e6), rel=1e-4)


def test_planner_verdict_on_the_fitted_shared_pair_is_the_truths(narrow):
    """The fitted pair (paired bootstrap samples, one E each) decides as the truth does, on a budget
    where reuse saves 13% of the tokens (4M) and one where scratch needs 28% fewer (64M); its
    interval holds the truth's saving."""
    _, _, study = narrow
    fit = study["shared"]
    for budget in (4e6, 6.4e7):
        _, _, saving = brute_split(budget)
        plan = make_plan(fit.reuse, fit.scratch, D1=[1e6], D2=[1e6], budget_tokens=budget)
        assert plan["samples"]["n_reuse"] == plan["samples"]["n_scratch"] == fit.bootstrap["n_converged"]
        assert plan["split"]["verdict"] == ("reuse" if saving > 0 else "scratch"), (budget, saving, plan["split"])
        lo, hi = plan["split"]["saving_interval"]
        assert lo <= saving <= hi


# -- bad input -------------------------------------------------------------------------------------
def one_line(exc_info) -> str:
    text = str(exc_info.value)
    assert "\n" not in text
    return text


def test_bad_pairs_get_one_line_errors():
    reuse, scratch = tables(NARROW)
    other = table_from_arrays(scratch.loss, D=scratch.columns["D"], loss_col="valid_loss_prose")
    with pytest.raises(LawError, match="same target domain") as e:
        fit_shared(reuse, other)
    one_line(e)
    with pytest.raises(LawError, match="no scratch rows") as e:
        check_pair(reuse, scratch.subset(np.zeros(len(scratch), dtype=bool)))
    one_line(e)
    with pytest.raises(LawError, match="2 scratch runs at distinct D; accepted at least 3") as e:
        check_pair(reuse, scratch.subset([0, 1, 1]))
    one_line(e)
    with pytest.raises(LawError, match="4 stage-2 runs at distinct D1, D2; accepted at least 5") as e:
        check_pair(reuse.subset([0, 1, 4, 5]), scratch)
    one_line(e)
    sized = table_from_arrays(reuse.loss, D1=reuse.columns["D1"], D2=reuse.columns["D2"], N=np.full(len(reuse), 2e5))
    with pytest.raises(LawError, match="one E is the floor of one model") as e:
        check_pair(sized, table_from_arrays(scratch.loss, D=scratch.columns["D"], N=np.full(len(scratch), 4e5)))
    one_line(e)
    with pytest.raises(LawError, match="column 'D' missing"):
        check_pair(reuse, table_from_arrays(scratch.loss, D1=scratch.columns["D"]))


def write_runs(path, scratch_domain="code"):
    reuse, scratch = tables(NARROW, seed=2)
    rows = [{"run_id": f"cpt{i}", "series": "cpt", "D1": reuse.columns["D1"][i], "D2": reuse.columns["D2"][i],
             "tokens": reuse.columns["D2"][i], "tokens_code": reuse.columns["D2"][i], "valid_loss_code": reuse.loss[i]}
            for i in range(len(reuse))]
    rows += [{"run_id": f"s{i}", "series": "scratch", "D1": d, "D2": 0, "tokens": d, f"tokens_{scratch_domain}": d,
              "valid_loss_code": scratch.loss[i]} for i, d in enumerate(scratch.columns["D"])]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=sorted({k for r in rows for k in r}), restval="")
        w.writeheader()
        w.writerows(rows)


def run(argv):
    return main(argv)  # the real entry point: its one exit path turns errors into 2


def test_plan_from_one_table_uses_the_shared_pair(tmp_path, capsys):
    write_runs(tmp_path / "runs.csv")
    out = tmp_path / "plan"
    assert run(["plan", "--runs", str(tmp_path / "runs.csv"), "--where", "series=cpt", "--scratch-where",
                "series=scratch", "--loss-col", "valid_loss_code", "--bootstrap", "30", "--D1", "1M", "--D2", "1M",
                "--budget-tokens", "8M", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("one shared E = ") and "best split" in printed
    law, scratch = (json.loads((out / n).read_text()) for n in ("law.json", "scratch_law.json"))
    assert law["form"] == "reuse" and scratch["form"] == "power" and law["params"]["E"] == scratch["params"]["E"]
    assert law["params"]["E"] == pytest.approx(TRUTH["E"], abs=5 * linearised_se(NARROW)["E"])
    plan = json.loads((out / "plan.json").read_text())
    assert plan["samples"]["n_reuse"] == plan["samples"]["n_scratch"] > 20
    assert plan["split"]["verdict"] == "reuse"
    shared = json.loads((out / "shared_E.json").read_text())
    assert shared["form"] == SHARED.name and shared["holdout"]["preferred"] in ("shared", "separate")
    assert "| separate E's (8 parameters) |" in (out / "shared_E.md").read_text()


def test_plan_from_one_table_refuses_bad_pairs(tmp_path, capsys):
    write_runs(tmp_path / "runs.csv")
    write_runs(tmp_path / "prose.csv", scratch_domain="prose")
    base = ["plan", "--loss-col", "valid_loss_code", "--D1", "1M", "--D2", "1M", "--out", str(tmp_path / "o")]
    cases = [(["--runs", str(tmp_path / "prose.csv"), "--where", "series=cpt", "--scratch-where", "series=scratch"],
              "the stage-2 rows train on code, the scratch rows on prose"),
             (["--runs", str(tmp_path / "runs.csv"), "--where", "series=cpt", "--scratch-where", "series=none"],
              "no scratch rows: --scratch-where series=none keeps no rows"),
             (["--runs", str(tmp_path / "runs.csv"), "--where", "series=cpt"], "--scratch-where: accepted COLUMN=VALUE"),
             (["--runs", str(tmp_path / "runs.csv"), "--law", "x.json", "--where", "series=cpt",
               "--scratch-where", "series=scratch"], "accepted --runs or --law/--scratch-law"),
             (["--law", "x.json", "--scratch-where", "series=scratch"], "--scratch-where: only with --runs")]
    for extra, expected in cases:
        assert run(base + extra) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("megareuse plan: ") and expected in err and "\n" not in err, err
    assert not (tmp_path / "o").exists()


def test_demo_plans_with_the_shared_pair_and_reports_both(narrow, tmp_path):
    from megareuse import demo
    reuse, _, study = narrow
    study.update(dir="cpt_shared", names=("cpt", "scratch_code"))
    separate_law = study["separate"]["reuse"]
    plan = demo._plan(tmp_path / "unused.csv", separate_law, tmp_path, 50_000, 50_000, [1_000_000], [1_000_000],
                      "scratch_code", "loss", "plan", shared=study)
    plan["shared"] = study
    assert plan["shared_E"] and plan["plan"]["law"] == study["shared"].reuse.label
    assert plan["scratch"] is study["shared"].scratch
    _, _, saving = brute_split(2e6)  # the demo's budget: max D1 + max D2
    assert plan["plan"]["split"]["verdict"] == plan["separate"]["verdict"] == ("reuse" if saving > 0 else "scratch")
    text = "\n".join(demo._shared_section(plan) + demo._plan_lines("cpt", plan))
    assert "### One floor for reuse and scratch?" in text and "| one shared E (7 parameters) |" in text
    assert "the two fitted together with one shared E" in text and "With separate E's" in text
    assert (tmp_path / "plan" / "plan.json").is_file()
