"""Markdown reports of a fit (law, intervals, diagnostics, comparison, held-out check, per-D1
analysis, residuals) and of a plan. Every table says which law and data it came from."""
from __future__ import annotations

import math
from typing import Optional

from megareuse.law.plan import SPLIT_REACH, VIEWS
from megareuse.law.resampling import interval_text


def _g(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float) and math.isinf(v):
        return "never" if v > 0 else "-inf"
    return f"{v:.{digits}g}" if isinstance(v, (int, float)) else str(v)


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _table(header: list[str], rows: list[list]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(_g(c) for c in r) + " |" for r in rows] + [""])


def _law_section(law) -> list[str]:
    d = law.diagnostics
    lines = [f"## Law: `{law.form.name}`", "", f"    {law.form.formula}", "",
             f"Fitted on {law.data.get('n_runs', '?')} runs of `{law.data.get('source', '-')}`; {law.unit_text}.", ""]
    boot = law.bootstrap
    level = f"{int(round(100 * boot['level']))}% " if boot else ""
    lines += _table(["parameter", f"estimate [{level}bootstrap interval]" if boot else "estimate"],
                    [[p, interval_text(law, p)] for p in law.form.params])
    if boot:
        lines.append(f"Bootstrap: {boot['n_converged']} of {boot['n_resamples']} resamples over "
                     f"{boot['resample_unit']}s converged (seed {boot['seed']}, {boot['workers']} "
                     f"worker{'s' if boot['workers'] > 1 else ''}). "
                     + (boot.get("note") or ""))
        if "a3" in law.params and boot.get("a3_excludes_zero") is not None:
            verdict = "excludes 0" if boot["a3_excludes_zero"] else "contains 0"
            lines.append(f"The interval of a3 **{verdict}**: "
                         + ("the data show an interaction (saturation if a3 > 0)." if boot["a3_excludes_zero"]
                            else "these data do not establish an interaction between D1 and D2."))
        lines.append("")
    if law.calibration:
        lines += [f"Prediction intervals for new runs ({int(round(100 * law.calibration['level']))}%). "
                  + calibration_text(law.calibration)] + [f"- {n}" for n in law.calibration.get("notes", [])] + [""]
    conv = "converged" if d["converged"] else "**did NOT converge**"
    lines += ["### Fit diagnostics", "",
              f"- Optimiser: L-BFGS-B on Huber (delta {d['delta']:g}) of log loss, {d['n_starts']} starts "
              f"({d['n_starts_converged']} converged, {d['n_starts_at_best']} reached the best objective): "
              f"{conv} ({d['message']}); projected gradient norm {d['grad_norm']:.2e}, {d['n_iter']} iterations.",
              f"- RMS error {d['rms_log']:.4g} (log), {d['rms_loss']:.4g} {law.loss_unit} (loss units); "
              f"max |relative error| {_pct(d['max_abs_rel'])}; R^2 {d['r2']:.5f}; AIC {d['aic']:.2f}; BIC {d['bic']:.2f}.",
              f"- Jacobian condition number {d['jac_cond']:.3g}"
              + (" (parameters poorly identified by these runs)" if d["jac_cond"] > 1e8 else "") + "."]
    prof = d.get("E_profile")
    if prof:
        lo, hi = prof["interval"]
        lines.append(f"- Profile over E ({int(round(100 * prof['level']))}%: deviance n ln(SSR(E)/SSR_min) "
                     f"within {prof['threshold']:.3g}): E in [{lo:.4g}, {hi:.4g}]; "
                     + ("identified." if prof["identified"] else f"**E is not identified**: {prof['why']}."))
    if d.get("at_bounds"):
        lines.append(f"- At a bound of the search: {', '.join(d['at_bounds'])} (a log-coefficient at its lower "
                     f"bound means that term is ~0).")
    vp = d.get("varpro")
    if vp:
        lines.append(f"- Variable projection (closed-form linear part, least squares on relative error) "
                     f"{'agrees' if vp['agree'] else '**disagrees**'}: max |log prediction gap| "
                     f"{vp['max_gap_log']:.2e} (RMS log error {d['rms_log']:.2e}); its parameters: "
                     + ", ".join(f"{k} {_g(v)}" for k, v in vp["params"].items()) + ".")
    return lines + [""]


def _comparison_section(comp: dict, source: str) -> list[str]:
    lines = [f"## Form comparison (held out: `{comp['rule']}`; {comp['n_train']} runs fitted, "
             f"{comp['n_test']} predicted; data {source})", ""]
    rows = []
    for r in comp["results"]:
        if "skipped" in r:
            rows.append([r["form"], r["n_params"], "skipped: " + r["skipped"], "", "", "", "", ""])
        else:
            rows.append([r["form"], r["n_params"], r["converged"], r["rms_log_train"], r["aic"], r["bic"],
                         _pct(r["mare"]), _pct(r["max_abs_rel"])])
    lines += _table(["form", "params", "converged", "RMS log (fit)", "AIC", "BIC", "held-out MARE",
                     "held-out max"], rows)
    lines += [f"Selected: **{comp['selected'] or 'none'}** ({comp['why']}).", ""]
    return lines


def calibration_text(cal: dict) -> str:
    """One paragraph: the calibrated interval's residual scale, the noise and the misfit behind it."""
    if "skipped" in cal:
        return f"No calibrated interval: {cal['skipped']}."
    noise = cal["noise"]
    if noise["source"] == "repeats":
        lof = noise.get("lack_of_fit")
        noise_text = (f"run-to-run noise sigma = {noise['sigma']:.3g} in ln loss from {noise['n_cells']} repeated "
                      f"cells ({noise['dof']} degrees of freedom), misfit tau = {cal['misfit']:.3g}"
                      + (f"; lack-of-fit F = {lof['F']:.3g} on {lof['dof'][0]} and {lof['dof'][1]} degrees of "
                         f"freedom, p = {lof['p_value']:.3g}" if lof else ""))
    else:
        noise_text = (f"run-to-run noise **not measured** (no repeated runs): the fit's residual RMS "
                      f"{noise['sigma']:.3g} in ln loss (noise and misfit together) is the floor of the scale")
    rank = (f"the conformal quantile (rank {cal['rank']} of {cal['n_scores']})" if cal["rank_exact"]
            else "too few for a conformal rank: the larger of the largest and a Student-t bound from their RMS")
    return (f"Calibrated interval: the bootstrap (parameter) interval combined in quadrature with a residual term "
            f"of scale s = {cal['scale']:.3g} in ln loss, set from {cal['n_scores']} one-level-ahead out-of-sample "
            f"errors (refits on the runs below each level of {', '.join(cal['axes'])}: {cal['n_folds']} folds"
            + (f", {cal['n_folds_skipped']} too small" if cal["n_folds_skipped"] else "")
            + (f", {cal['n_folds_unconverged']} unconverged" if cal["n_folds_unconverged"] else "")
            + f"; each beyond its refit's bootstrap interval), {rank}; {noise_text}.")


def _holdout_section(check: dict, source: str) -> list[str]:
    law = check["law"]
    inputs = list(law.form.inputs)
    has_pi = "lo" in check["rows"][0]
    two = "lo_bootstrap" in check["rows"][0]
    lines = [f"## Held-out check: `{check['form']}`, fitted on {check['n_train']} runs, predicting "
             f"`{check['rule']}` ({check['n_test']} runs; data {source})", ""]
    header = ["run"] + inputs + ["observed", "predicted", "rel. error"]
    pct = f"{int(round(100 * check['level']))}%" if has_pi else ""
    if has_pi:
        header += [f"{pct} PI ({check.get('interval', 'bootstrap')})", "inside"]
        header += [f"{pct} PI (bootstrap)", "inside"] if two else []
    rows = []
    for r in check["rows"]:
        row = [r["run_id"]] + [r[c] for c in inputs] + [r["observed"], r["predicted"], _pct(r["rel_err"])]
        if has_pi:
            row += [f"[{r['lo']:.4g}, {r['hi']:.4g}]", r["inside"]]
            row += [f"[{r['lo_bootstrap']:.4g}, {r['hi_bootstrap']:.4g}]", r["inside_bootstrap"]] if two else []
        rows.append(row)
    lines += _table(header, rows)
    boot = law.bootstrap
    lines.append(f"Mean absolute relative error {_pct(check['mare'])}, max {_pct(check['max_abs_rel'])}"
                 + (f" (bootstrap intervals from {boot['n_converged']} of {boot['n_resamples']} resamples of the "
                    f"training runs)." if has_pi and boot else "."))
    if has_pi:
        inside = sum(r["inside"] for r in check["rows"])
        text = (f"Coverage of the held-out runs, nominal **{pct}**: {check.get('interval', 'bootstrap')} interval "
                f"**{_pct(check['coverage'])}** ({inside} of {check['n_test']})")
        if two:
            text += (f", bootstrap interval as before (parameter resamples times a resampled in-sample residual) "
                     f"{_pct(check['coverage_bootstrap'])}")
        lines.append(text + ".")
    if check.get("calibration"):
        lines.append(calibration_text(check["calibration"]))
        lines += [f"- {n}" for n in check["calibration"].get("notes", [])]
    lines.append(f"Law fitted on the training runs ({law.unit_text}): "
                 + ", ".join(f"{k} {_g(v)}" for k, v in law.params.items()) + ".")
    return lines + [""]


def _per_d1_section(an: dict, law, figures: list[str]) -> list[str]:
    af, sf = an["alpha_fit"], an["scale_fit"]
    e_text = "" if an["E"] is None else f" = {an['E']:.4g}"
    lines = [f"## Per-D1 analysis (E {an['E_mode']}{e_text})", ""]
    lines += _table(["D1", "runs", "A(D1)", "alpha(D1)", "E", "RMS log"],
                    [[r["D1"], r["n"], r["A"], r["alpha"], r["E"], r["rms_log"]] for r in an["per_d1"]])
    lines += [f"- alpha(D1) = a2 - a3 ln D1: a2 = {af['a2']:.4g} +- {af['se_a2']:.2g}, "
              f"a3 = {af['a3']:.4g} +- {af['se_a3']:.2g} (R^2 {af['r2']:.3f}; +- standard errors with E held fixed)",
              f"- A(D1) = A D1^(-a1): A = {sf['A']:.4g}, a1 = {sf['a1']:.4g} +- {sf['se_a1']:.2g} (R^2 {sf['r2']:.3f})"]
    if "a3_interval" in af:
        (lo, hi), pct = af["a3_interval"], f"{int(round(100 * af['level']))}%"
        lines.append(f"- {pct} bootstrap intervals, the regressions redone on {af['n_resamples']} resamples of the "
                     f"joint fit with each resample's E (so E's uncertainty is included): a3 [{lo:.4g}, {hi:.4g}] "
                     f"**{'excludes' if af['a3_excludes_zero'] else 'contains'} 0**, a2 [{af['a2_interval'][0]:.4g}, "
                     f"{af['a2_interval'][1]:.4g}], a1 [{sf['a1_interval'][0]:.4g}, {sf['a1_interval'][1]:.4g}]")
    if law is not None and law.form.name == "reuse":
        p = law.params
        lines.append(f"- Joint `reuse` fit for comparison: A = {p['A']:.4g}, a1 = {p['a1']:.4g}, "
                     f"a2 = {p['a2']:.4g}, a3 = {p['a3']:.4g}.")
    lines += [f"- {n}" for n in an["notes"]]
    lines += [""] + [f"![per-D1 analysis]({f})" for f in figures if f == "figure1.png"] + [""]
    return lines


def fit_report(result: dict) -> str:
    """The markdown report of `megareuse fit` (see commands.analyse for the result dict)."""
    law, table = result["law"], result["table"]
    source = table.describe()
    lines = ["# megareuse fit", "", f"Data: `{table.source}` ({len(table)} runs, loss column "
             f"`{table.loss_col}` in {table.loss_unit}, sha256 `{table.sha256 or '-'}`)."]
    if table.extra.get("where"):
        lines.append(f"Rows kept: {', '.join(f'{k} = {v}' for k, v in table.extra['where'].items())}.")
    lines += [""] + _law_section(law)
    if result.get("comparison"):
        lines += _comparison_section(result["comparison"], source)
    if result.get("holdout"):
        lines += _holdout_section(result["holdout"], source)
        lines += ["![held-out runs](heldout.png)", ""] if "heldout.png" in result.get("figures", []) else []
    if result.get("rollout"):
        steps = result["rollout"]
        lines += [f"## Expanding-window rollout over {steps[0]['axis']} (`{law.form.name}`; data {source})", ""]
        lines += _table(["fitted up to", "predicting", "runs fitted", "runs predicted", "converged", "MARE", "max"],
                        [[s["train_max"], s["predict_at"], s["n_train"], s["n_test"], s["converged"],
                          _pct(s["mare"]), _pct(s["max_abs_rel"])] for s in steps])
    if result.get("loo"):
        loo = result["loo"]
        lines += [f"## Leave-one-out (`{law.form.name}`; data {source})", "",
                  f"{loo['n_test']} runs predicted from fits to the others: mean absolute relative error "
                  f"{_pct(loo['mare'])}, max {_pct(loo['max_abs_rel'])}; {loo['n_unconverged']} fits did not converge.", ""]
    if result.get("per_d1"):
        lines += _per_d1_section(result["per_d1"], law, result.get("figures", []))
    lines += [f"## Residuals of the `{law.form.name}` fit (all runs)", ""]
    lines += _table(["run"] + list(law.form.inputs) + ["observed", "predicted", "rel. error"],
                    [[r["run_id"]] + [r[c] for c in law.form.inputs] + [r["observed"], r["predicted"],
                                                                           _pct(r["rel_err"])]
                     for r in law.residuals(table)])
    lines += [f"- {n}" for n in result.get("notes", [])]
    return "\n".join(lines).rstrip() + "\n"


STATUS_TEXT = {"crosses": "the saving crosses 0 there", "saves_at_top": "still saving at the top of the search range",
               "never_saves": "no saving anywhere in the search range"}


def _with_interval(value, interval) -> str:
    return _g(value) + (f" [{_g(interval[0])}, {_g(interval[1])}]" if interval else "")


def _interval_text(interval) -> str:
    """A threshold's interval: inf is `beyond` the search range, 0 is `none` (no D1 saves)."""
    if not interval:
        return "-"
    ends = ["beyond" if math.isinf(v) else "none" if v == 0 else _g(v) for v in interval]
    return f"[{ends[0]}, {ends[1]}]"


def _threshold_text(t: dict) -> str:
    if t["status"] == "never_saves":
        return "none (no saving)"
    return "beyond the range" if t["status"] == "saves_at_top" else _g(t["threshold"])


def _edge_text(split: dict) -> str:
    rng = split.get("D1_range")
    if rng:
        return (f" - the optimum is at the edge of the D1 the law may extrapolate to ({rng[0]:.4g} .. {rng[1]:.4g}: "
                f"its runs' D1 range, {SPLIT_REACH:g}x beyond each way); the law favours "
                + ("less base" if split["D1"] <= rng[0] * 1.0001 else "more base") + " than it has seen")
    return " - the optimum is at the edge of the search: check the law"


def plan_report(plan: dict, figure: Optional[str] = None, notes: Optional[list] = None) -> str:
    lines = ["# megareuse plan", "", f"- Reuse law: {plan['law']} (`{plan['law_file']}`)"]
    if plan["scratch_law"]:
        lines.append(f"- From-scratch law: {plan['scratch_law']} (`{plan.get('scratch_law_file', '')}`)")
    if plan["N"]:
        lines.append(f"- FLOPs as 6 N D with N = {plan['N']:.4g} (stage 2) and {plan['N_base']:.4g} (base)")
    lines += ["", f"## Loss after D2 tokens on a base trained for D1 (law: {plan['law']})", ""]
    has_ci, has_s, has_n = "loss_lo" in plan["rows"][0], bool(plan["scratch_law"]), bool(plan["N"])
    has_run = "run_lo" in plan["rows"][0]
    header = ["D1", "D2", "loss"] + (["loss interval (law)"] if has_ci else [])
    header += (["one run's interval"] if has_run else []) + ["gain per token"]
    header += ["gain per FLOP", "FLOPs (D2)", "FLOPs (D1 + D2)"] if has_n else []
    header += ["D_scratch", "saving (tokens, base free)", "verdict", "saving incl. base", "verdict"] if has_s else []
    header += ["saving (FLOPs incl. base)", "verdict"] if has_s and has_n else []
    header += ["extrapolated"]
    rows = []
    for r in plan["rows"]:
        row = [r["D1"], r["D2"], r["loss"]] + ([f"[{r['loss_lo']:.4g}, {r['loss_hi']:.4g}]"] if has_ci else [])
        row += [f"[{r['run_lo']:.4g}, {r['run_hi']:.4g}]"] if has_run else []
        row += [r["gain_per_token"]]
        row += [r["gain_per_flop"], r["flops_D2"], r["flops_with_base"]] if has_n else []
        if has_s:
            row += [r["D_scratch"], _with_interval(r["saving_tokens"], r["saving_tokens_interval"]), r["verdict_tokens"],
                    _with_interval(r["saving_with_base"], r["saving_with_base_interval"]), r["verdict_with_base"]]
        if has_s and has_n:
            row += [_with_interval(r["saving_flops_with_base"], r["saving_flops_with_base_interval"]),
                    r["verdict_flops_with_base"]]
        rows.append(row + [r["extrapolated"]])
    lines += _table(header, rows)
    if has_run:
        lines += ["Loss interval (law): where the law's mean loss lies (its parameters' spread alone); one run's "
                  "interval: where the loss of a single new run should fall, run-to-run noise and misfit included "
                  "(the calibration in the law's report, docs/fitting.md).", ""]
    if plan.get("samples"):
        lines += [f"Savings: what reuse saves against training from scratch to the same loss ({'; '.join(VIEWS.values())}); "
                  f"verdict: reuse when the saving's interval lies above 0, scratch below, else undecided. "
                  f"Intervals: {plan['samples']['note']}.", ""]
    if plan.get("thresholds"):
        lines += [f"## The D1 beyond which reuse saves nothing, per D2 (laws: {plan['law']} vs {plan['scratch_law']})", ""]
        lines += _table(["D2", "view", "threshold D1", "interval", "saving turns positive at D1", "status"],
                        [[t["D2"], t["view"], _threshold_text(t), _interval_text(t.get("interval")),
                          t["saves_from"], STATUS_TEXT[t["status"]]] for t in plan["thresholds"]])
        lines += [f"Searched over D1 from {plan['thresholds'][0]['range'][0]:.3g} to "
                  f"{plan['thresholds'][0]['range'][1]:.3g} (1/1000 to 1000 times the fitted D1 range); "
                  "in intervals `beyond` stands for samples still saving at the top of that range, `none` for samples "
                  "that save at no D1.", ""]
    if plan["vanish"]:
        lines += [f"## Where the token saving vanishes (laws: {plan['law']} vs {plan['scratch_law']})", ""]
        lines += _table(["D1", "saving vanishes at D2", "saving turns positive at D2", "note"],
                        [[v["D1"], v["D2"], v["D2_appears"], v["note"]] for v in plan["vanish"]])
    s = plan.get("split")
    if s:
        budget = (f"{s['budget_tokens']:.4g} tokens" if "budget_tokens" in s
                  else f"{s['budget_flops']:.4g} FLOPs (N {s['N']:.4g}, base N {s['N_base']:.4g})")
        lines += [f"## Best split of a budget of {budget} (law: {plan['law']})", "",
                  f"- D1 = {s['D1']:.4g}, D2 = {s['D2']:.4g} tokens (share of the budget on the base "
                  f"{100 * s['share_D1']:.1f}%), predicted loss {s['loss']:.4g}"
                  + (_edge_text(s) if s["at_edge"] else "")]
        if "decision" in s:
            unit = "tokens" if s["saving_view"] == "tokens_with_base" else "FLOPs"
            th = s["threshold"]
            lines.append(f"- From scratch with {s['scratch_tokens']:.4g} tokens ({plan['scratch_law']}): loss "
                         f"{s['scratch_loss']:.4g}. Point estimate's choice: {s['decision']}.")
            lines.append(f"- Saving of this split against the budget spent from scratch: {_with_interval(s['saving'], s['saving_interval'])} "
                         f"{unit}; verdict: **{s['verdict']}**.")
            lines.append(f"- Along the budget, reuse saves nothing beyond D1 = {_threshold_text(th)}"
                         + (f" (interval {_interval_text(th['interval'])})" if th.get("interval") else "")
                         + f"; {STATUS_TEXT[th['status']]}.")
        lines.append("")
    if figure:
        lines += [f"![plan]({figure})", ""]
    lines += [f"- {n}" for n in notes or []]
    return "\n".join(lines).rstrip() + "\n"
