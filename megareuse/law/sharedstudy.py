"""The shared asymptote beside separate E's: does one E describe both series, and does reuse cost
capacity?

shared_study(reuse, scratch) fits the joint law (megareuse.law.shared: one E, its profile, the
joint bootstrap) and the separate laws (`reuse`, `power`, each with its profile and bootstrap),
reads E_reuse - E_scratch off the separate bootstraps (sample k of each paired: the resamples are
independent), and scores both on the held-out largest runs of both series (holdout_compare).
shared_lines / shared_json / shared_files put it in words and files; load_pair reads both
series from one run table (`megareuse plan --runs`), checking they share a target domain.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from megareuse.law.data import LawError, RunTable
from megareuse.law.law import Law
from megareuse.law.shared import SHARED, fit_shared, bootstrap_shared, profile_shared_E


# -- shared against separate E's ------------------------------------------------------------------
def _abs_err(law: Law, table: RunTable) -> np.ndarray:
    return np.abs(law.predict(table) / table.loss - 1.0)


def holdout_compare(reuse: RunTable, scratch: RunTable, rule: str = "largest", scratch_rule: str = "largest") -> dict:
    """Fit one shared E and separate E's (`reuse`, `power`) on the runs the hold-out rules keep
    (validate.holdout_mask: `rule` on the stage-2 runs over D1, D2, `scratch_rule` on the scratch
    runs over D), predict the held-out runs of both series. `preferred` follows the form
    comparison's one-standard-error rule: the shared form (7 parameters, against 8) unless the
    separate E's predict better by more than one standard error of their per-run errors."""
    from megareuse.law.fit import fit_form
    from megareuse.law.validate import holdout_mask
    mr, ms = holdout_mask(reuse, rule, ("D1", "D2")), holdout_mask(scratch, scratch_rule, ("D",))
    train_r, test_r, train_s, test_s = reuse.subset(~mr), reuse.subset(mr), scratch.subset(~ms), scratch.subset(ms)
    out = {"rule": rule, "scratch_rule": scratch_rule, "n_train": [len(train_r), len(train_s)],
           "n_test": [len(test_r), len(test_s)], "forms": {}}
    for name, n_params in (("shared", 7), ("separate", 8)):
        try:
            if name == "shared":
                f = fit_shared(train_r, train_s)
                laws, converged, E = (f.reuse, f.scratch), f.diagnostics["converged"], [f.params["E"]] * 2
            else:
                laws = (fit_form(train_r, "reuse"), fit_form(train_s, "power"))
                converged, E = all(law.diagnostics["converged"] for law in laws), [law.params["E"] for law in laws]
        except LawError as exc:
            out["forms"][name] = {"n_params": n_params, "skipped": str(exc)}
            continue
        e_r, e_s = _abs_err(laws[0], test_r), _abs_err(laws[1], test_s)
        err = np.concatenate([e_r, e_s])
        out["forms"][name] = {"n_params": n_params, "converged": bool(converged), "E": E, "mare": float(err.mean()),
                              "mare_stage2": float(e_r.mean()), "mare_scratch": float(e_s.mean()),
                              "max_abs_rel": float(err.max()), "abs_err": err.tolist()}
    out["preferred"], out["why"] = _prefer(out["forms"])
    return out


def _prefer(forms: dict) -> tuple[Optional[str], str]:
    ok = {k: v for k, v in forms.items() if "mare" in v and v["converged"]}
    if not ok:
        return None, "neither form was fitted and converged on the training runs"
    best = min(ok, key=lambda k: ok[k]["mare"])
    err = np.asarray(ok[best]["abs_err"])
    se = float(np.std(err, ddof=1) / np.sqrt(len(err))) if len(err) > 1 else 0.0
    if best == "shared":
        return "shared", "one shared E has the lower held-out error"
    if "shared" not in ok:
        return best, "the shared-E fit was not made or did not converge on the training runs"
    if "shared" in ok and ok["shared"]["mare"] <= ok[best]["mare"] + se:
        return "shared", (f"one shared E (7 parameters) is within one standard error ({100 * se:.2f}%) of the "
                          "separate E's (8 parameters)")
    return best, (f"separate E's predict the held-out runs better by more than one standard error "
                  f"({100 * se:.2f}%): the runs question one shared E")


def _E_samples(law: Law) -> np.ndarray:
    return np.array([law.form.params_from_theta(t)["E"] for t in (law.bootstrap or {}).get("theta", [])])


def shared_study(reuse: RunTable, scratch: RunTable, n_boot: int = 200, seed: int = 0, level: float = 0.9,
                 rule: Optional[str] = "largest", reuse_law: Optional[Law] = None,
                 scratch_law: Optional[Law] = None) -> dict:
    """The shared-E fit (profile over E, bootstrap) beside separate fits of the same runs (each with
    its profile and bootstrap; pass `reuse_law` / `scratch_law` already fitted on these tables to
    reuse them), E_reuse - E_scratch with its interval (sample k of each separate bootstrap paired:
    the resamples are independent), and the held-out comparison (`rule` None: none)."""
    from megareuse.law.fit import fit_form
    from megareuse.law.identify import profile_E
    from megareuse.law.resampling import bootstrap
    for name, law, form in (("reuse_law", reuse_law, "reuse"), ("scratch_law", scratch_law, "power")):
        if law is not None and (not isinstance(law, Law) or law.form.name != form):
            raise LawError(f"{name} = {law!r}: accepted a `{form}` Law fitted on the same runs, or None")
    fit = fit_shared(reuse, scratch)
    profile_shared_E(reuse, scratch, fit, level)
    if n_boot:
        bootstrap_shared(reuse, scratch, fit, n_boot, seed=seed, level=level)
    separate = {"reuse": reuse_law or fit_form(reuse, "reuse"), "scratch": scratch_law or fit_form(scratch, "power")}
    for law, table in ((separate["reuse"], reuse), (separate["scratch"], scratch)):
        if "E_profile" not in law.diagnostics:
            law.diagnostics["E_profile"] = profile_E(table, law, level)
        if n_boot and not law.bootstrap:
            bootstrap(table, law, n_boot, seed=seed, level=level)
    dE = {"value": separate["reuse"].params["E"] - separate["scratch"].params["E"], "interval": None, "level": level,
          "identified": all((law.diagnostics["E_profile"] or {}).get("identified", False) for law in separate.values())}
    e_r, e_s = _E_samples(separate["reuse"]), _E_samples(separate["scratch"])
    n = min(len(e_r), len(e_s))
    if n >= 2:
        tail = 50.0 * (1.0 - level)
        dE["interval"] = [float(np.percentile(e_r[:n] - e_s[:n], tail)), float(np.percentile(e_r[:n] - e_s[:n], 100 - tail))]
        dE["n_samples"] = n
    holdout = None
    if rule:
        try:
            holdout = holdout_compare(reuse, scratch, rule)
        except LawError as exc:
            holdout = {"skipped": str(exc)}
    return {"shared": fit, "separate": separate, "E_difference": dE, "holdout": holdout, "level": level,
            "sources": {"stage2": reuse.describe(), "scratch": scratch.describe()}}


# -- words, JSON, files ------------------------------------------------------------------------------
def _g(v, digits: int = 4) -> str:
    return "-" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.{digits}g}"


def _iv(value, interval) -> str:
    return _g(value) + (f" [{_g(interval[0])}, {_g(interval[1])}]" if interval else "")


def _excludes(interval) -> str:
    return "-" if not interval else "yes" if interval[0] > 0 or interval[1] < 0 else "no"


CAPACITY = {"costs": ("reuse costs capacity", "the stage-2 floor lies above the scratch floor and separate E's "
                                              "predict the held-out runs better - **reuse costs capacity** on these runs"),
            "lowers": ("reuse lowers the floor", "the stage-2 floor lies below the scratch floor and separate E's "
                                                "predict the held-out runs better - reuse **lowers** the floor here"),
            "unconfirmed": ("E's differ in-sample, not on held-out runs", "the interval excludes 0, but one shared E "
                            "predicts the held-out runs as well (or there are none): not settled - few runs per series "
                            "make separate bootstrap intervals of E too narrow"),
            "no_evidence": ("no evidence that reuse costs capacity", "the interval contains 0 - no evidence that reuse "
                                                                   "costs capacity (one E is consistent with the runs)"),
            "not_identified": ("not settled: E not identified", "not read - the separate fits do not identify E "
                                                                "(profile over E), so these runs do not settle whether "
                                                                "reuse costs capacity"),
            "no_interval": ("no interval", "no bootstrap samples, no interval")}


def capacity_verdict(dE: dict, holdout: Optional[dict] = None) -> str:
    """Does reuse cost capacity? A key of CAPACITY. It takes two findings: E_reuse - E_scratch of
    the separate fits with an interval that excludes 0 (read only where the profile over E
    identifies both E's), and the held-out comparison preferring separate E's."""
    iv = dE.get("interval")
    if not iv:
        return "no_interval"
    if not dE.get("identified", True):
        return "not_identified"
    if iv[0] <= 0 <= iv[1]:
        return "no_evidence"
    if (holdout or {}).get("preferred") != "separate":
        return "unconfirmed"
    return "costs" if iv[0] > 0 else "lowers"


def capacity_finding(study: dict, short: bool = False) -> str:
    dE = study["E_difference"]
    return (f"E_reuse - E_scratch (separate fits) = {_iv(dE['value'], dE.get('interval'))}: "
            + CAPACITY[capacity_verdict(dE, study.get("holdout"))][0 if short else 1])


_PREFERRED = {"shared": "one shared E", "separate": "separate E's"}


def _identified(profile: Optional[dict]) -> str:
    if not profile:
        return "-"
    lo, hi = profile["interval"]
    return f"{'yes' if profile['identified'] else 'no'} (profile [{_g(lo)}, {_g(hi)}])"


def summary_line(study: dict) -> str:
    """One line for a terminal: the shared E, a3, the capacity finding, the held-out preference."""
    fit, ho = study["shared"], study["holdout"] or {}
    iv = (fit.bootstrap or {}).get("intervals", {})
    prof = fit.diagnostics.get("E_profile") or {}
    return (f"one shared E = {_iv(fit.params['E'], iv.get('E'))} ({'' if prof.get('identified') else 'not '}identified), "
            f"a3 = {_iv(fit.params['a3'], iv.get('a3'))}; {capacity_finding(study, short=True)}"
            + (f"; held-out runs prefer {_PREFERRED.get(ho['preferred'], 'neither')}" if "forms" in ho else ""))


def shared_lines(study: dict, names: tuple[str, str] = ("stage 2", "scratch")) -> list[str]:
    """Markdown: the two fits side by side, the capacity finding and the held-out comparison."""
    fit, sep, pct = study["shared"], study["separate"], f"{int(round(100 * study['level']))}%"
    ivs = (fit.bootstrap or {}).get("intervals", {})
    sep_iv = {k: (law.bootstrap or {}).get("intervals", {}) for k, law in sep.items()}
    ident = lambda d: _identified(d.get("E_profile"))
    ho = study["holdout"] or {}
    mare = lambda k: ("-" if "mare" not in ho.get("forms", {}).get(k, {}) else
                      f"{100 * ho['forms'][k]['mare_stage2']:.2f}% / {100 * ho['forms'][k]['mare_scratch']:.2f}%")
    conv = "" if fit.diagnostics["converged"] else " (**did NOT converge**)"
    lines = [f"One E for the `{names[0]}` runs and the `{names[1]}` runs (the same model on the same target loss), "
             f"fitted together{conv}: RMS log error {fit.diagnostics['rms_log']:.4g}; {pct} bootstrap intervals "
             f"({(fit.bootstrap or {}).get('n_converged', 0)} of {(fit.bootstrap or {}).get('n_resamples', 0)} joint "
             "resamples converged).", "",
             "| fit | E (stage 2) | E (scratch) | E identified | a3 | a3 interval excludes 0 | held-out MARE (stage 2 / scratch) |",
             "|---|---|---|---|---|---|---|",
             f"| one shared E (7 parameters) | {_iv(fit.params['E'], ivs.get('E'))} | the same | {ident(fit.diagnostics)} | "
             f"{_iv(fit.params['a3'], ivs.get('a3'))} | {_excludes(ivs.get('a3'))} | {mare('shared')} |",
             f"| separate E's (8 parameters) | {_iv(sep['reuse'].params['E'], sep_iv['reuse'].get('E'))} | "
             f"{_iv(sep['scratch'].params['E'], sep_iv['scratch'].get('E'))} | {ident(sep['reuse'].diagnostics)} / "
             f"{ident(sep['scratch'].diagnostics)} | {_iv(sep['reuse'].params['a3'], sep_iv['reuse'].get('a3'))} | "
             f"{_excludes(sep_iv['reuse'].get('a3'))} | {mare('separate')} |", "",
             capacity_finding(study) + "."]
    if "skipped" in ho:
        lines.append(f"No held-out comparison: {ho['skipped']}.")
    elif ho:
        lines.append(f"Held-out runs ({ho['rule']} stage-2 runs and the largest scratch run(s): "
                     f"{ho['n_test'][0]} + {ho['n_test'][1]} predicted from {ho['n_train'][0]} + {ho['n_train'][1]}): "
                     f"the comparison prefers **{_PREFERRED.get(ho['preferred'], 'neither')}** ({ho['why']}).")
    if (fit.diagnostics.get("E_profile") or {}).get("why"):
        lines.append(f"The shared E is not identified: {fit.diagnostics['E_profile']['why']}.")
    return lines


def shared_json(study: dict) -> dict:
    fit, sep = study["shared"], study["separate"]
    boot = {k: v for k, v in (fit.bootstrap or {}).items() if k not in ("theta", "index")}
    ho = study["holdout"]
    return {"form": SHARED.name, "formula": SHARED.formula, "params": fit.params,
            "theta": [float(t) for t in fit.theta], "units": fit.units, "diagnostics": fit.diagnostics,
            "bootstrap": boot or None, "sources": study["sources"],
            "separate": {k: {"form": law.form.name, "params": law.params,
                             "intervals": (law.bootstrap or {}).get("intervals"),
                             "E_identified": (law.diagnostics.get("E_profile") or {}).get("identified")}
                         for k, law in sep.items()},
            "E_difference": study["E_difference"], "capacity": capacity_verdict(study["E_difference"], ho),
            "holdout": ho}


def shared_files(study: dict, names: tuple[str, str] = ("stage 2", "scratch")) -> dict[str, str]:
    """shared_E.json, shared_E.md, and the two laws (law.json, scratch_law.json: `megareuse plan
    --law law.json --scratch-law scratch_law.json` pairs their samples again)."""
    import json
    from megareuse.law.jsonout import finite_json
    dump = lambda d: json.dumps(finite_json(d), indent=1) + "\n"
    fit = study["shared"]
    text = "\n".join(["# One asymptote for reuse and scratch", "", f"    {SHARED.formula}", "",
                      f"- stage-2 runs: {study['sources']['stage2']}", f"- scratch runs: {study['sources']['scratch']}",
                      f"- tokens in units of {fit.units['tokens']:g}, loss in {fit.units['loss']}", "",
                      *shared_lines(study, names)]) + "\n"
    return {"shared_E.json": dump(shared_json(study)), "shared_E.md": text,
            "law.json": dump(fit.reuse.to_dict()), "scratch_law.json": dump(fit.scratch.to_dict())}


# -- both series from one run table (megareuse plan --runs) ----------------------------------------
def _blend(row: dict) -> tuple:
    """The domain shares a run trained on, from its tokens_<domain> columns (collect's CSV) or
    tokens_per_domain_<domain> (its JSONL, flattened)."""
    tokens = {}
    for key, value in row.items():
        name = (key[18:] if key.startswith("tokens_per_domain_") else
                key[7:] if key.startswith("tokens_") and key != "tokens_per_s" else None)
        try:
            if name and float(value) > 0:
                tokens[name] = float(value)
        except (TypeError, ValueError):
            continue
    total = sum(tokens.values())
    return tuple(sorted((d, round(v / total, 3)) for d, v in tokens.items()))


def _blend_text(blends: set) -> str:
    return " or ".join(" + ".join(f"{d} {100 * s:.0f}%" if s < 1 else d for d, s in b) for b in sorted(blends))


def load_pair(path, where: dict, scratch_where: dict, loss_col: str = "loss", loss_unit: str = "nats",
              scratch_tokens: Optional[str] = None) -> tuple[RunTable, RunTable, list[str]]:
    """The stage-2 rows (`where`) and the scratch rows (`scratch_where`) of one table, measured on
    one loss column; the scratch tokens from column `scratch_tokens` (default D, else tokens).
    Checks that both series train on the same domain blend (tokens_<domain> columns, when the
    table has them) and the same model (N, in check_pair). Returns the two tables and notes."""
    from megareuse.law.data import _matches, _read_rows, load_table, merge_duplicates
    for name, sel, example in (("--where", where, "series=cpt"), ("--scratch-where", scratch_where, "series=scratch_code")):
        if not sel:
            raise LawError(f"{name}: accepted COLUMN=VALUE selecting the {'stage-2' if name == '--where' else 'scratch'} "
                           f"rows of the --runs table (e.g. {example})")
    reuse = load_table(path, loss_col=loss_col, where=where, loss_unit=loss_unit)
    rows = _read_rows(Path(path), Path(path).read_text(encoding="utf-8-sig"))
    for key in scratch_where:
        if not any(key in r for r in rows):
            raise LawError(f"--scratch-where {key}={scratch_where[key]}: column {key!r} missing from {path}")
    pick = lambda sel: [r for r in rows if all(_matches(r, k, str(v)) for k, v in sel.items())]
    mine = pick(scratch_where)
    if not mine:
        key = next(iter(scratch_where))
        values = sorted({str(r.get(key)) for r in rows})
        raise LawError(f"no scratch rows: --scratch-where {key}={scratch_where[key]} keeps no rows of {path}; values of "
                       f"{key} there: {', '.join(values[:12])}")
    has = lambda c: all(str(r.get(c, "")).strip() for r in mine)
    col = scratch_tokens or ("D" if has("D") else "tokens")
    if not has(col):
        raise LawError(f"--scratch-tokens = {col!r}: the scratch rows have no such column (or empty values); accepted "
                       "the column holding their tokens (e.g. D, D1, tokens)")
    scratch = load_table(path, loss_col=loss_col, where=scratch_where, rename={"D": col}, loss_unit=loss_unit)
    b_r, b_s = {_blend(r) for r in pick(where)} - {()}, {_blend(r) for r in mine} - {()}
    notes = []
    if b_r and b_s and b_r != b_s:
        raise LawError(f"shared E: the stage-2 rows train on {_blend_text(b_r)}, the scratch rows on {_blend_text(b_s)} "
                       "(tokens_<domain> columns); accepted a scratch series trained on the stage-2 target domain")
    if not (b_r and b_s):
        notes.append("the table has no tokens_<domain> columns: that both series train on one domain was not checked")
    (reuse, note_r), (scratch, note_s) = merge_duplicates(reuse), merge_duplicates(scratch)
    notes += [f"{name} rows: {note}" for name, note in (("stage-2", note_r), ("scratch", note_s)) if note]
    return reuse, scratch, notes
