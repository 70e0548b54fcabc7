"""The planner's saving, D1 threshold and verdict with bootstrap intervals (issue #18 item 3),
against closed forms; and the fast bootstrap refits (item 5) against the L-BFGS-B ones."""
import argparse
import json

import numpy as np
import pytest

from megareuse.law import Law, LawError, analyse, fit_form, make_plan, register, table_from_arrays, write_fit
from megareuse.law.plan import (NO_SAMPLES, budget_saving, d1_threshold, sample_laws, saving, scratch_tokens,
                                scratch_tokens_array, verdict)
from megareuse.law.report import plan_report

M = 1e6
# a3 = 0 and a1 = as / 2: with the base's cost counted the saving is zero where
# c sqrt(x1) = x1 + x2 (x in M tokens), c = (As / A)^(1/as) x2^(a2/as): a quadratic in sqrt(x1)
A, a1, a2, E, As, as_ = 2.0, 0.2, 0.35, 1.5, 6.0, 0.4


def laws():
    reuse = Law.from_params("reuse_no_interaction", dict(A=A, a1=a1, a2=a2, E=E), tokens_unit=M)
    scratch = Law.from_params("power", dict(A=As, a=as_, E=E), tokens_unit=M)
    return reuse, scratch


def roots(x2, ratio=1.0):
    """sqrt(x1) roots of ratio x1 - c sqrt(x1) + x2 = 0 (ratio = N_base / N for FLOPs)."""
    c = (As / A) ** (1 / as_) * x2 ** (a2 / as_)
    disc = np.sqrt(c * c - 4 * ratio * x2)
    return ((c - disc) / (2 * ratio)) ** 2 * M, ((c + disc) / (2 * ratio)) ** 2 * M


def with_samples(law, sigma, n=200, seed=0):
    """The law with synthetic bootstrap samples: theta + sigma * standard normal."""
    rng = np.random.default_rng(seed)
    law.bootstrap = {"theta": law.theta + sigma * rng.standard_normal((n, law.form.n_params)), "level": 0.9,
                     "residuals": np.zeros(3), "seed": 0}
    return law


def test_threshold_with_the_base_counted_matches_the_closed_form():
    reuse, scratch = laws()
    for x2 in (0.5, 2.0):
        low, high = roots(x2)
        t = d1_threshold(reuse, scratch, x2 * M, "tokens_with_base")
        assert t["status"] == "crosses" and t["interval"] is None and t["note"] == NO_SAMPLES
        assert t["threshold"] == pytest.approx(high, rel=1e-6) and t["saves_from"] == pytest.approx(low, rel=1e-6)
        assert abs(float(saving(reuse, scratch, high, x2 * M, "tokens_with_base"))) < 1e-6 * high
    # FLOPs with a smaller base: 6 N D_s = 6 N_base D1 + 6 N D2 -> ratio N_base / N
    N, Nb = 1e8, 2.5e7
    low, high = roots(0.5, Nb / N)
    t = d1_threshold(reuse, scratch, 0.5 * M, "flops_with_base", N=N, N_base=Nb)
    assert t["threshold"] == pytest.approx(high, rel=1e-6) and t["saves_from"] == pytest.approx(low, rel=1e-6)


def test_base_free_saving_turns_positive_at_the_closed_form_and_never_stops():
    reuse, scratch = laws()
    # base free: saving > 0 iff L(D1, D2) < L_s(D2) iff x1 > ((A / As) x2^(as - a2))^(1/a1)
    x2 = 0.5
    t = d1_threshold(reuse, scratch, x2 * M, "tokens")
    assert t["status"] == "saves_at_top" and t["threshold"] == float("inf")
    assert t["saves_from"] == pytest.approx(((A / As) * x2 ** (as_ - a2)) ** (1 / a1) * M, rel=1e-6)
    # a scratch law that is better everywhere: no saving at any D1
    better = Law.from_params("power", dict(A=0.5, a=0.6, E=E), tokens_unit=M)
    t = d1_threshold(reuse, better, x2 * M, "tokens_with_base")
    assert t["status"] == "never_saves" and t["threshold"] is None


def test_scratch_tokens_closed_form_agrees_with_root_finding():
    _, scratch = laws()
    L = np.array([1.6, 2.0, 3.0, 1.4])  # the last is below E: never reached
    ds = scratch_tokens_array(scratch, L)
    assert np.isinf(ds[-1])
    for Li, d in zip(L[:-1], ds[:-1]):
        assert d == pytest.approx(scratch_tokens(scratch, Li), rel=1e-10)
    from megareuse.law.plan import _bisect_tokens  # the path of forms without a closed form
    np.testing.assert_allclose(_bisect_tokens(scratch, L, None), ds, rtol=1e-10)
    chin = Law.from_params("chinchilla", dict(E=1.5, A=4.0, alpha=0.3, B=6.0, beta=0.4), tokens_unit=M, params_unit=M)
    d = scratch_tokens_array(chin, np.array([3.0]), N=5e7)[0]
    assert float(chin.predict(N=5e7, D=d)) == pytest.approx(3.0, rel=1e-12)


def test_verdict_flips_across_the_threshold():
    reuse, scratch = laws()
    reuse = with_samples(reuse, 0.002)
    high = roots(0.5)[1]
    plan = make_plan(reuse, scratch, D1=[high / 1.3, high * 1.3], D2=[0.5 * M])
    below, above = plan["rows"]
    assert below["verdict_with_base"] == "reuse" and above["verdict_with_base"] == "scratch"
    assert below["verdict_tokens"] == above["verdict_tokens"] == "reuse"  # the base free: saving at both
    t = [t for t in plan["thresholds"] if t["view"] == "tokens_with_base"][0]
    assert t["interval"][0] <= t["threshold"] <= t["interval"][1]
    assert high / 1.3 < t["interval"][0] and t["interval"][1] < high * 1.3
    # at the threshold itself the saving's interval straddles 0
    at = make_plan(reuse, scratch, D1=[high], D2=[0.5 * M])["rows"][0]
    assert at["verdict_with_base"] == "undecided" and at["saving_with_base_interval"][0] < 0 < at["saving_with_base_interval"][1]


def test_intervals_contain_the_estimate_and_widen_with_the_spread():
    widths = []
    for sigma in (0.002, 0.006):
        reuse, scratch = laws()
        plan = make_plan(with_samples(reuse, sigma), scratch, D1=[2 * M], D2=[0.5 * M], budget_tokens=8 * M)
        row, split = plan["rows"][0], plan["split"]
        lo, hi = row["saving_tokens_interval"]
        assert lo <= row["saving_tokens"] <= hi
        assert split["saving_interval"][0] <= split["saving"] <= split["saving_interval"][1]
        th = split["threshold"]
        assert th["interval"][0] <= th["threshold"] <= th["interval"][1]
        widths.append((hi - lo, th["interval"][1] - th["interval"][0]))
    assert widths[1][0] > 2 * widths[0][0] and widths[1][1] > 2 * widths[0][1]


def test_budget_threshold_is_where_the_split_loses_to_scratch():
    reuse, scratch = laws()
    T = 8 * M
    plan = make_plan(reuse, scratch, D1=[M], D2=[M], budget_tokens=T)
    s = plan["split"]
    assert s["saving_view"] == "tokens_with_base" and s["verdict"] == NO_SAMPLES
    assert (s["saving"] > 0) == (s["decision"] == "reuse")
    assert s["saving"] == pytest.approx(scratch_tokens(scratch, s["loss"]) - T, rel=1e-9)
    d1 = s["threshold"]["threshold"]
    assert s["threshold"]["status"] == "crosses" and s["D1"] < d1 < T
    # there the split's loss equals the loss of the whole budget from scratch
    L_split = float(reuse.predict(D1=d1, D2=T - d1))
    assert L_split == pytest.approx(As * (T / M) ** -as_ + E, rel=1e-9)
    flops = budget_saving(reuse, scratch, {"budget_flops": 6e15, "N": 1e8, "N_base": 1e8,
                                           "D1": 1e6, "D2": 9e6}, N=1e8)
    assert flops["view"] == "flops_with_base"
    assert flops["saving"] == pytest.approx(6e8 * scratch_tokens(scratch, float(reuse.predict(D1=1e6, D2=9e6))) - 6e15)


def test_without_bootstrap_samples_the_verdict_says_so():
    reuse, scratch = laws()
    plan = make_plan(reuse, scratch, D1=[M], D2=[M], budget_tokens=8 * M, N=1e7)
    row = plan["rows"][0]
    for key in ("verdict_tokens", "verdict_with_base", "verdict_flops_with_base"):
        assert row[key] == NO_SAMPLES == "undecided (no bootstrap samples)"
    assert row["saving_with_base_interval"] is None and plan["split"]["verdict"] == NO_SAMPLES
    assert all(t["interval"] is None for t in plan["thresholds"])
    assert plan["samples"]["note"].startswith(NO_SAMPLES)
    assert NO_SAMPLES in plan_report(plan)
    assert verdict(None) == NO_SAMPLES and verdict([1.0, 2.0]) == "reuse" and verdict([-2.0, -1.0]) == "scratch"
    assert verdict([-1.0, 1.0]) == "undecided"


def test_scratch_samples_are_paired_in_turn_and_bad_views_refused():
    reuse, scratch = laws()
    with_samples(reuse, 0.01, n=5)
    with_samples(scratch, 0.01, n=2, seed=1)
    pairs = sample_laws(reuse, scratch)
    assert len(pairs) == 5
    np.testing.assert_array_equal(pairs[3][1].theta, scratch.bootstrap["theta"][1])
    np.testing.assert_array_equal(pairs[4][0].theta, reuse.bootstrap["theta"][4])
    assert sample_laws(laws()[0], scratch) is None
    with pytest.raises(LawError, match="view = 'flops': accepted tokens, tokens_with_base, flops_with_base"):
        d1_threshold(reuse, scratch, M, "flops")
    with pytest.raises(LawError, match="needs the model size"):
        d1_threshold(reuse, scratch, M, "flops_with_base")


def run(argv):
    p = argparse.ArgumentParser(prog="megareuse")
    register(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(argv)
    return args.func(args)


def noisy_table(seed=4, sigma=0.005):
    d1, d2 = (a.ravel() for a in np.meshgrid(np.geomspace(0.25e6, 4e6, 5), np.geomspace(0.125e6, 1e6, 5)))
    loss = (1.8 * (d1 / M) ** -0.08 * (d2 / M) ** (-0.25 + 0.03 * np.log(d1 / M)) + 1.6)
    loss = loss * np.exp(sigma * np.random.default_rng(seed).standard_normal(len(d1)))
    return table_from_arrays(loss, D1=d1, D2=d2, run_id=[f"r{i}" for i in range(len(d1))])


def test_law_json_samples_reach_the_plan_command(tmp_path, capsys):
    result = analyse(noisy_table(), "reuse", compare=None, holdout=None, n_boot=30, figures=False)
    write_fit(result, tmp_path / "fit")
    assert len(json.loads((tmp_path / "fit" / "law.json").read_text())["bootstrap"]["theta"]) >= 25
    scratch = Law.from_params("power", dict(A=2.2, a=0.3, E=1.6), tokens_unit=M)
    (tmp_path / "scratch.json").write_text(json.dumps(scratch.to_dict()))
    assert run(["plan", "--law", str(tmp_path / "fit" / "law.json"), "--scratch-law", str(tmp_path / "scratch.json"),
                "--D1", "1M,4M", "--D2", "1M", "--budget-tokens", "8M", "--out", str(tmp_path / "plan")]) == 0
    out = capsys.readouterr().out
    assert "reuse saves nothing beyond D1" in out and "best split" in out
    plan = json.loads((tmp_path / "plan" / "plan.json").read_text())
    assert plan["samples"]["n_reuse"] >= 25 and plan["split"]["verdict"] in ("reuse", "scratch", "undecided")
    for row in plan["rows"]:
        lo, hi = row["saving_with_base_interval"]
        assert lo <= row["saving_with_base"] <= hi and row["verdict_with_base"] == verdict([lo, hi])
    text = (tmp_path / "plan" / "plan.md").read_text()
    assert "The D1 beyond which reuse saves nothing" in text and "bootstrap samples of the reuse law" in text


def test_threshold_figure_points_are_the_closed_form_with_clipped_intervals():
    """The plan figure's threshold panel: finite thresholds at the closed form, a saving that lasts
    past the range drawn at the range's top (its interval's inf clipped there), none at the bottom."""
    from megareuse.law.plots import figure_plan, threshold_points
    reuse, scratch = laws()
    plan = make_plan(with_samples(reuse, 0.002), scratch, D1=[1 * M], D2=[0.5 * M, 2 * M])
    points = threshold_points(plan)
    assert set(points) == {"tokens", "tokens_with_base"}
    p = points["tokens_with_base"]
    assert p["D2"].tolist() == [0.5 * M, 2 * M] and list(p["status"]) == ["crosses", "crosses"]
    assert p["D1"] == pytest.approx([roots(0.5)[1], roots(2.0)[1]], rel=1e-6)
    assert np.all(p["lo"] <= p["D1"]) and np.all(p["D1"] <= p["hi"])
    base_free = points["tokens"]  # a3 = 0, base free: reuse saves at every D1 above saves_from
    top = plan["thresholds"][0]["range"][1]
    assert list(base_free["status"]) == ["saves_at_top"] * 2 and np.isnan(base_free["D1"]).all()
    assert base_free["hi"].tolist() == [top, top]
    files, note = figure_plan(plan, reuse, scratch)
    assert note is None and files["plan.png"][:8] == b"\x89PNG\r\n\x1a\n"


# -- item 5: the fast refits ---------------------------------------------------------------------
def test_fast_refits_agree_with_lbfgs_refits():
    from megareuse.law.fit import DELTA, huber_objective, log_inputs
    from megareuse.law.resampling import _Resampler, _draw, _lbfgs_refit
    table = noisy_table(seed=7)
    law = fit_form(table, "reuse")
    rs = _Resampler(table, law, 3, DELTA)
    for i in range(12):
        sub = table.subset(_draw(rs.members, 3, i))
        fast, ok = rs.refit(i)
        slow, ok_slow = _lbfgs_refit(sub, law, DELTA)
        assert ok and ok_slow
        lx, logy, w = log_inputs(sub, law.form, law.units), np.log(sub.loss), np.ones(len(sub))
        f_fast, f_slow = (huber_objective(t, law.form, lx, logy, w)[0] for t in (fast, slow))
        assert f_fast == pytest.approx(f_slow, rel=1e-9)  # the same minimum of the same objective
        gap = law.form.log_predict(fast, lx) - law.form.log_predict(slow, lx)
        assert np.max(np.abs(gap)) < 1e-6
        np.testing.assert_allclose(fast, slow, rtol=1e-4, atol=1e-5)


def test_unconverged_fast_refit_falls_back_to_lbfgs(monkeypatch):
    from megareuse.law import resampling
    table = noisy_table(seed=8)
    law = fit_form(table, "reuse")
    rs = resampling._Resampler(table, law, 0, resampling.DELTA)
    monkeypatch.setattr(resampling, "huber_refit", lambda *a, **k: (law.theta, 1.0, float("inf")))
    theta, ok = rs.refit(2)
    expect = resampling._lbfgs_refit(table.subset(resampling._draw(rs.members, 0, 2)), law, resampling.DELTA)
    assert ok == expect[1]
    np.testing.assert_array_equal(theta, expect[0])


def test_unfittable_resample_is_refused_as_the_fitter_would():
    from megareuse.law.resampling import _Resampler
    table = noisy_table()
    law = fit_form(table, "reuse")
    rs = _Resampler(table, law, 0, 1e-3)
    one_d1 = np.flatnonzero(table.columns["D1"] == table.columns["D1"][0])
    assert not rs.fittable(one_d1) and rs.fittable(np.arange(len(table)))


def test_heldout_check_uses_at_most_the_capped_resamples(monkeypatch):
    from megareuse.law import commands
    monkeypatch.setattr(commands, "HOLDOUT_RESAMPLES", 5)
    result = analyse(noisy_table(), "reuse", compare=None, n_boot=8, figures=False)
    assert result["holdout"]["law"].bootstrap["n_resamples"] == 5
    assert result["law"].bootstrap["n_resamples"] == 8
