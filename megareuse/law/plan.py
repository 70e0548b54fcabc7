"""Planning with fitted laws: reuse a base, or train from scratch?

Given a reuse law L(D1, D2) (any form over D1 and D2) and optionally a from-scratch law
L_s(D) (`power`) or L_s(N, D) (`chinchilla`), the planner answers, in tokens and in FLOPs
(C = 6 N D for each stage):
  - the loss after D2 more tokens on a base trained for D1, and the marginal gain -dL/dD2;
  - the effective token saving D_s(L) - D2, where D_s(L) is what a from-scratch run needs to
    reach the same loss, and the D2 at which that saving vanishes;
  - for a fixed budget (tokens or FLOPs, the base paid for), the best split between D1 and D2;
  - the saving in three views (VIEWS: tokens with the base free, tokens and FLOPs with the base's
    cost counted), the D1 beyond which it is <= 0 for each D2 and along a budget, and the
    verdict: with the law's bootstrap samples (paired with the scratch law's), percentile
    intervals, "reuse" when the saving's interval lies above 0, "scratch" below, else "undecided".
Every result carries the labels of the laws (form, data file, sha256) it came from.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from scipy.optimize import brentq, minimize_scalar

from megareuse.law.calibrate import calibrated_interval
from megareuse.law.data import LawError
from megareuse.law.law import Law

_SPAN = (1e-6, 1e12)  # search range for token counts, in multiples of the law's token unit


def _positive(name: str, value) -> Optional[float]:
    if value is None:
        return None
    if not (isinstance(value, (int, float)) and np.isfinite(value) and value > 0):
        raise LawError(f"{name} = {value!r}: accepted a positive number")
    return float(value)


def check_laws(law: Law, scratch: Optional[Law], N: Optional[float]) -> None:
    if law.form.inputs != ("D1", "D2"):
        raise LawError(f"law form {law.form.name} has inputs ({', '.join(law.form.inputs)}); the planner "
                       f"needs a law over D1 and D2 (reuse, reuse_no_interaction, additive, transfer)")
    if scratch is not None:
        if scratch.loss_unit != law.loss_unit:
            raise LawError(f"the reuse law's loss is in {law.loss_unit}, the scratch law's in {scratch.loss_unit}; "
                           f"accepted two laws fitted on losses in the same unit (refit one with --loss-unit)")
        if scratch.form.inputs not in (("D",), ("N", "D")):
            raise LawError(f"scratch law form {scratch.form.name} has inputs ({', '.join(scratch.form.inputs)}); "
                           f"accepted a law over D (power) or over N and D (chinchilla)")
        if "N" in scratch.form.inputs and N is None:
            raise LawError(f"scratch law form {scratch.form.name} needs the model size: accepted --N PARAMS")


def loss_after(law: Law, D1, D2) -> np.ndarray:
    return law.predict(D1=D1, D2=D2)


def marginal_gain(law: Law, D1, D2, h: float = 1e-4) -> np.ndarray:
    """-dL/dD2 per token (central difference in ln D2, relative error ~h^2)."""
    D2 = np.asarray(D2, dtype=float)
    up, dn = law.predict(D1=D1, D2=D2 * np.exp(h)), law.predict(D1=D1, D2=D2 * np.exp(-h))
    return -(up - dn) / (D2 * (np.exp(h) - np.exp(-h)))


def _scratch_loss(scratch: Law, D, N: Optional[float]) -> np.ndarray:
    return scratch.predict(D=D, N=N) if "N" in scratch.form.inputs else scratch.predict(D=D)


def scratch_tokens(scratch: Law, L: float, N: Optional[float] = None) -> float:
    """Tokens a from-scratch run needs to reach loss L (inf if it never does)."""
    u = scratch.units["tokens"]
    lo, hi = np.log(_SPAN[0] * u), np.log(_SPAN[1] * u)
    f = lambda lnd: float(np.log(_scratch_loss(scratch, np.exp(lnd), N)) - np.log(L))
    f_lo, f_hi = f(lo), f(hi)
    if f_hi > 0:
        return float("inf")
    if f_lo < 0:
        return float(np.exp(lo))
    return float(np.exp(brentq(f, lo, hi, xtol=1e-12, rtol=1e-13)))


def saving_vanishes(law: Law, scratch: Law, D1: float, N: Optional[float] = None) -> dict:
    """The D2 where D_s(L(D1, D2)) = D2: beyond it, training from scratch needs fewer tokens."""
    u = law.units["tokens"]
    grid = np.linspace(np.log(_SPAN[0] * u), np.log(_SPAN[1] * u), 160)

    def gap(lnd2):
        ds = scratch_tokens(scratch, float(loss_after(law, D1, np.exp(lnd2))), N)
        return np.log(ds) - lnd2 if np.isfinite(ds) else np.inf

    values = np.array([gap(g) for g in grid])

    def crossing(falling: bool):
        idx = np.flatnonzero((values[:-1] > 0) & (values[1:] <= 0) if falling else (values[:-1] <= 0) & (values[1:] > 0))
        if not len(idx):
            return None
        i = idx[0]
        if not (np.isfinite(values[i]) and np.isfinite(values[i + 1])):
            return float(np.exp(grid[i + 1]))
        return float(np.exp(brentq(gap, grid[i], grid[i + 1], xtol=1e-12, rtol=1e-13)))

    out = {"D1": float(D1), "D2": crossing(True), "D2_appears": crossing(False), "note": ""}
    if out["D2"] is None:
        where = "positive" if values[-1] > 0 else "negative"
        out["note"] = (f"the saving does not vanish: it is {where} at D2 = {np.exp(grid[-1]):.3g}"
                       + (f" (it turns positive at D2 = {out['D2_appears']:.4g})" if out["D2_appears"] else ""))
    return out


SPLIT_REACH = 4.0  # how far beyond its fitted D1 range the split may take the law, each way


def split_range(law: Law) -> Optional[tuple[float, float]]:
    """The D1 the best split may choose: the fitted runs' D1 range widened SPLIT_REACH times each
    way (None when the law file has no ranges). Beyond it the law is not evidence: at small D1
    a positive a3 makes the D2 exponent grow without bound (a base of a few tokens would look
    best)."""
    span = _data_ranges(law).get("D1")
    return (span[0] / SPLIT_REACH, span[1] * SPLIT_REACH) if span else None


def _logit(p: float) -> float:
    p = min(max(p, 1e-9), 1 - 1e-9)
    return float(np.log(p / (1 - p)))


def best_split(law: Law, budget_tokens: Optional[float] = None, budget_flops: Optional[float] = None,
               N: Optional[float] = None, N_base: Optional[float] = None,
               D1_range: Optional[Sequence[float]] = None) -> dict:
    """Minimise L(D1, D2) subject to D1 + D2 = budget_tokens, or 6 N_base D1 + 6 N D2 = budget_flops,
    with D1 inside D1_range when given (split_range: where the law may be trusted); `at_edge`
    says the optimum lies on the search's bound."""
    if (budget_tokens is None) == (budget_flops is None):
        raise LawError("best split: accepted exactly one of budget_tokens, budget_flops")
    if budget_flops is not None:
        if N is None:
            raise LawError("a FLOP budget needs the model size: accepted --N PARAMS")
        N_base = N if N_base is None else N_base
        cap1, cap2 = budget_flops / (6 * N_base), budget_flops / (6 * N)
    else:
        cap1 = cap2 = budget_tokens

    def loss(z):
        s = 1.0 / (1.0 + np.exp(-z))
        return float(loss_after(law, s * cap1, (1 - s) * cap2))

    z_lo, z_hi = -20.0, 20.0
    if D1_range is not None:
        lo, hi = float(D1_range[0]), float(D1_range[1])
        if not 0 < lo <= hi or lo >= cap1:
            raise LawError(f"best split: the budget leaves D1 at most {cap1:.4g} tokens, below the D1 the law may "
                           f"extrapolate to ({lo:.4g} .. {hi:.4g}); accepted a larger budget")
        z_lo, z_hi = max(z_lo, _logit(lo / cap1)), min(z_hi, _logit(hi / cap1))
    zs = np.linspace(z_lo, z_hi, 801)
    values = np.array([loss(z) for z in zs])
    k = int(np.argmin(values))
    res = minimize_scalar(loss, bounds=(zs[max(k - 1, 0)], zs[min(k + 1, len(zs) - 1)]), method="bounded",
                          options={"xatol": 1e-12})
    z = res.x if res.fun <= values[k] else zs[k]
    s = 1.0 / (1.0 + np.exp(-z))
    out = {"D1": s * cap1, "D2": (1 - s) * cap2, "loss": loss(z), "share_D1": float(s),
           "at_edge": bool(k in (0, len(zs) - 1)),
           "D1_range": [float(v) for v in D1_range] if D1_range is not None else None}
    if budget_tokens is not None:
        out["budget_tokens"] = budget_tokens
    else:
        out.update({"budget_flops": budget_flops, "N": N, "N_base": N_base})
    return out


def _data_ranges(law: Law) -> dict:
    """The law file's data.ranges (the token ranges of the fitted runs), checked: D1 and D2 each
    [low, high] with 0 < low <= high (finite)."""
    ranges = law.data.get("ranges") or {}
    where = law.data.get("law_file") or "law"
    if not isinstance(ranges, dict):
        raise LawError(f"{where}: data.ranges = {ranges!r}: accepted a mapping column -> [low, high]")
    for name in ("D1", "D2"):
        if name not in ranges:
            continue
        span = ranges[name]
        ok = (isinstance(span, list) and len(span) == 2
              and all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) and v > 0
                      for v in span) and span[0] <= span[1])
        if not ok:
            raise LawError(f"{where}: data.ranges.{name} = {span!r}: accepted [low, high] token counts "
                           "with 0 < low <= high (as `megareuse fit` writes them)")
    return ranges


def make_plan(law: Law, scratch: Optional[Law] = None, D1: Sequence[float] = (), D2: Sequence[float] = (),
              budget_tokens: Optional[float] = None, budget_flops: Optional[float] = None,
              N: Optional[float] = None, N_base: Optional[float] = None) -> dict:
    """All planner answers for a grid of (D1, D2) and optional budgets."""
    N, N_base = _positive("N", N), _positive("N_base", N_base)
    budget_tokens, budget_flops = _positive("budget_tokens", budget_tokens), _positive("budget_flops", budget_flops)
    check_laws(law, scratch, N)
    ranges = _data_ranges(law)
    if not len(D1) or not len(D2):
        if not ("D1" in ranges and "D2" in ranges):
            raise LawError("the law file has no data ranges: accepted --D1 and --D2 lists")
    D1 = list(D1) or list(np.geomspace(*ranges["D1"], 3))
    D2 = list(D2) or list(np.geomspace(ranges["D2"][0], 4 * ranges["D2"][1], 5))
    for name, values in (("D1", D1), ("D2", D2)):
        for v in values:
            _positive(name, v)
    N_base_eff = N_base or N
    rows = []
    for d1 in D1:
        for d2 in D2:
            L = float(loss_after(law, d1, d2))
            gain = float(marginal_gain(law, d1, d2))
            row = {"D1": float(d1), "D2": float(d2), "loss": L, "gain_per_token": gain,
                   "extrapolated": bool(ranges and not (ranges["D1"][0] <= d1 <= ranges["D1"][1]
                                                       and ranges["D2"][0] <= d2 <= ranges["D2"][1]))}
            if law.bootstrap:
                lo, hi = law.interval({"D1": [d1], "D2": [d2]}, noise=False)
                row.update({"loss_lo": float(lo[0]), "loss_hi": float(hi[0])})
            if law.calibration:  # where one new run's loss should fall: noise and misfit included
                lo, hi = calibrated_interval(law, {"D1": [d1], "D2": [d2]})
                row.update({"run_lo": float(lo[0]), "run_hi": float(hi[0])})
            if N:
                row.update({"gain_per_flop": gain / (6 * N), "flops_D2": 6 * N * d2,
                            "flops_with_base": 6 * N_base_eff * d1 + 6 * N * d2})
            if scratch is not None:
                ds = scratch_tokens(scratch, L, N)
                row.update({"D_scratch": ds, "saving_tokens": ds - d2, "saving_with_base": ds - d2 - d1})
                if N:
                    row["flops_scratch"] = 6 * N * ds
            rows.append(row)
    plan = {"law": law.label, "law_file": law.data.get("law_file", ""), "law_form": law.form.name,
            "scratch_law": scratch.label if scratch else None, "N": N, "N_base": N_base_eff,
            "rows": rows, "vanish": [], "thresholds": [], "split": None, "samples": None}
    pairs = sample_laws(law, scratch) if scratch is not None else None
    if scratch is not None:
        views = ["tokens", "tokens_with_base"] + (["flops_with_base"] if N else [])
        plan["scratch_law_file"] = scratch.data.get("law_file", "")
        plan["samples"] = _samples_note(law, scratch, pairs)
        plan["vanish"] = [saving_vanishes(law, scratch, d1, N) for d1 in D1]
        _add_saving_intervals(rows, law, scratch, views, N, N_base_eff, pairs)
        plan["thresholds"] = [d1_threshold(law, scratch, d2, view, N, N_base_eff, pairs) for d2 in D2 for view in views]
    if budget_tokens or budget_flops:
        split = best_split(law, budget_tokens, budget_flops, N, N_base, split_range(law))
        if scratch is not None:
            d_all = budget_tokens if budget_tokens else budget_flops / (6 * N)
            split["scratch_loss"] = float(_scratch_loss(scratch, d_all, N))
            split["scratch_tokens"] = d_all
            split["decision"] = "reuse" if split["loss"] < split["scratch_loss"] else "scratch"
            b = budget_saving(law, scratch, split, N, pairs)
            split.update(saving_view=b["view"], saving=b["saving"], saving_interval=b["saving_interval"],
                         verdict=b["verdict"], threshold=b["threshold"])
        plan["split"] = split
    return plan


_ROW_KEYS = {"tokens": ("saving_tokens", "verdict_tokens"), "tokens_with_base": ("saving_with_base", "verdict_with_base"),
             "flops_with_base": ("saving_flops_with_base", "verdict_flops_with_base")}


def _add_saving_intervals(rows: list, law, scratch, views, N, N_base, pairs) -> None:
    d1, d2 = np.array([r["D1"] for r in rows]), np.array([r["D2"] for r in rows])
    if "flops_with_base" in views:
        for r, v in zip(rows, saving(law, scratch, d1, d2, "flops_with_base", N, N_base)):
            r["saving_flops_with_base"] = float(v)
    for view, (ivs, verdicts) in saving_intervals(law, scratch, d1, d2, views, N, N_base, pairs).items():
        key, vkey = _ROW_KEYS[view]
        for r, iv, v in zip(rows, ivs, verdicts):
            r[f"{key}_interval"], r[vkey] = iv, v


def _samples_note(law: Law, scratch: Law, pairs) -> dict:
    """How the intervals were made: how many samples of each law, at which level."""
    n_s = len(scratch.bootstrap["theta"]) if scratch.bootstrap else 0
    text = (NO_SAMPLES + ": fit the reuse law with --bootstrap N for intervals and verdicts" if not pairs else
            f"{len(pairs)} bootstrap samples of the reuse law, paired with "
            + (f"the scratch law's {n_s} samples in turn" if n_s else "the scratch law's estimate (it has no samples)")
            + f"; {int(round(100 * _level(law)))}% intervals")
    return {"n_reuse": len(pairs) if pairs else 0, "n_scratch": n_s, "level": _level(law) if pairs else None,
            "note": text}


# -- savings, the D1 threshold and the decision, with bootstrap intervals ------------------------
VIEWS = {"tokens": "tokens, the base free (already trained): D_scratch - D2",
         "tokens_with_base": "tokens, the base's cost counted: D_scratch - (D1 + D2)",
         "flops_with_base": "FLOPs, the base's cost counted: 6 N D_scratch - (6 N_base D1 + 6 N D2)"}
NO_SAMPLES = "undecided (no bootstrap samples)"
_PER_DECADE = 20  # grid density of the threshold search, refined by root finding for the estimate


def scratch_tokens_array(scratch: Law, L, N: Optional[float] = None) -> np.ndarray:
    """Tokens a from-scratch run needs to reach each loss in L (inf where it never does): the
    closed form for `power` and `chinchilla` (with a positive D exponent), else bisection in ln D
    over the planner's search range."""
    L = np.asarray(L, dtype=float)
    p, u = scratch.params, scratch.units["tokens"]
    if scratch.form.name == "power" and p["a"] > 0:
        floor, coef, expo = p["E"], p["A"], p["a"]
    elif scratch.form.name == "chinchilla" and p["beta"] > 0:
        floor, coef, expo = p["E"] + p["A"] * (N / scratch.units["params"]) ** -p["alpha"], p["B"], p["beta"]
    else:
        return _bisect_tokens(scratch, L, N)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        D = u * (coef / (L - floor)) ** (1.0 / expo)
    return np.where(L > floor, D, np.inf)


def _bisect_tokens(scratch: Law, L: np.ndarray, N: Optional[float]) -> np.ndarray:
    u = scratch.units["tokens"]
    lo0, hi0 = np.log(_SPAN[0] * u), np.log(_SPAN[1] * u)
    f = lambda lnd: np.log(_scratch_loss(scratch, np.exp(lnd), N)) - np.log(L)
    lo, hi = np.full(L.shape, lo0), np.full(L.shape, hi0)
    for _ in range(64):  # 2^-64 of the 41-nat range: below double precision
        mid = 0.5 * (lo + hi)
        above = f(mid) > 0
        lo, hi = np.where(above, mid, lo), np.where(above, hi, mid)
    out = np.exp(0.5 * (lo + hi))
    out = np.where(f(np.full(L.shape, lo0)) < 0, np.exp(lo0), out)
    return np.where(f(np.full(L.shape, hi0)) > 0, np.inf, out)


def _costs(ds, D1, D2, view: str, N: Optional[float], N_base: Optional[float]):
    """(cost from scratch, cost of reuse) in the view's unit."""
    if view == "tokens":
        return ds, D2
    if view == "tokens_with_base":
        return ds, D1 + D2
    if view == "flops_with_base":
        if N is None:
            raise LawError("the FLOP view needs the model size: accepted --N PARAMS")
        return 6 * N * ds, 6 * (N_base or N) * D1 + 6 * N * D2
    raise LawError(f"view = {view!r}: accepted {', '.join(VIEWS)}")


def saving(law: Law, scratch: Law, D1, D2, view: str = "tokens", N: Optional[float] = None,
           N_base: Optional[float] = None) -> np.ndarray:
    """What reuse saves against scratch at (D1, D2) in the view's unit (VIEWS); > 0: reuse is cheaper."""
    D1, D2 = np.broadcast_arrays(np.asarray(D1, dtype=float), np.asarray(D2, dtype=float))
    ds = scratch_tokens_array(scratch, law.predict(D1=D1, D2=D2), N)
    with np.errstate(invalid="ignore"):
        s, r = _costs(ds, D1, D2, view, N, N_base)
        return np.asarray(s - r, dtype=float)


def _log_gap(law, scratch, D1, D2, view, N, N_base) -> np.ndarray:
    """ln(cost from scratch) - ln(cost of reuse): the sign of the saving, smooth in ln D1."""
    ds = scratch_tokens_array(scratch, law.predict(D1=D1, D2=D2), N)
    s, r = _costs(ds, np.asarray(D1, dtype=float), np.asarray(D2, dtype=float), view, N, N_base)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log(s) - np.log(r)


def sample_laws(law: Law, scratch: Optional[Law]) -> Optional[list]:
    """(reuse law, scratch law) per bootstrap sample of the reuse law; the scratch law's own samples
    are paired in turn (the fits are independent), or its estimate when it has none. None when the
    reuse law has fewer than 2 samples."""
    boot = law.bootstrap
    if not boot or len(boot.get("theta", [])) < 2:
        return None
    s_theta = scratch.bootstrap["theta"] if scratch is not None and scratch.bootstrap else []
    pairs = []
    for k, theta in enumerate(boot["theta"]):
        s = (Law(scratch.form, s_theta[k % len(s_theta)], scratch.units) if len(s_theta) else scratch)
        pairs.append((Law(law.form, theta, law.units), s))
    return pairs


def percentile_interval(samples, level: float) -> list[float]:
    """[lo, hi] at `level` from samples that may hold inf (a loss the scratch law never reaches):
    the order statistics just outside the percentiles (numpy's 'lower' and 'higher'), so never
    narrower than the interpolated interval."""
    x = np.asarray(samples, dtype=float)
    x = x[~np.isnan(x)]
    tail = 50.0 * (1.0 - level)
    return [float(np.percentile(x, tail, method="lower")), float(np.percentile(x, 100 - tail, method="higher"))]


def verdict(interval: Optional[Sequence[float]]) -> str:
    """reuse when the saving's interval lies above 0, scratch when below, else undecided."""
    if interval is None:
        return NO_SAMPLES
    lo, hi = interval
    return "reuse" if lo > 0 else "scratch" if hi < 0 else "undecided"


def _level(law: Law) -> float:
    return float(law.bootstrap["level"]) if law.bootstrap else 0.9


def saving_intervals(law: Law, scratch: Law, D1, D2, views: Sequence[str], N=None, N_base=None,
                     pairs: Optional[list] = None) -> dict:
    """{view: (intervals per point or None, verdicts per point)} over the law's bootstrap samples."""
    D1, D2 = np.atleast_1d(np.asarray(D1, dtype=float)), np.atleast_1d(np.asarray(D2, dtype=float))
    pairs = sample_laws(law, scratch) if pairs is None else pairs
    out = {}
    for view in views:
        if not pairs:
            out[view] = ([None] * len(D1), [NO_SAMPLES] * len(D1))
            continue
        draws = np.array([saving(r, s, D1, D2, view, N, N_base) for r, s in pairs])
        ivs = [percentile_interval(draws[:, j], _level(law)) for j in range(len(D1))]
        out[view] = (ivs, [verdict(iv) for iv in ivs])
    return out


def _crossing(x: np.ndarray, gap: np.ndarray, refine=None) -> dict:
    """Along increasing x (ln D1 or a budget coordinate): where the saving turns <= 0 for good
    (`threshold`) and where it last turned > 0 before that (`saves_from`); refine(a, b) finds a
    root of the gap in [a, b], else linear interpolation."""
    pos = np.asarray(gap > 0)  # nan (no loss) counts as no saving

    def root(i):
        a, b = gap[i], gap[i + 1]
        if refine is not None:
            return refine(x[i], x[i + 1])
        if np.isfinite(a) and np.isfinite(b) and a != b:
            return float(x[i] + (x[i + 1] - x[i]) * a / (a - b))
        return float(x[i + 1])

    if pos[-1]:
        status, thr, top = "saves_at_top", np.inf, len(x) - 1
    elif not pos.any():
        return {"status": "never_saves", "threshold": None, "saves_from": None}
    else:
        top = int(np.flatnonzero(pos)[-1])
        status, thr = "crosses", root(top)
    below = np.flatnonzero(~pos[:top])
    return {"status": status, "threshold": thr, "saves_from": root(int(below[-1])) if len(below) else None}


def _refiner(g):
    """Root of g in [a, b] (a sign change) by brentq; b where g is not finite at an end (a loss
    the scratch law never reaches)."""
    def root(a: float, b: float) -> float:
        if not (np.isfinite(g(a)) and np.isfinite(g(b))):
            return float(b)
        return float(brentq(g, a, b, xtol=1e-13, rtol=1e-14))
    return root


def _d1_span(law: Law) -> tuple[float, float]:
    """The threshold search range: 1/1000 to 1000 times the fitted D1 range (or 1e-6 to 1e6 law
    units without one)."""
    r = (law.data.get("ranges") or {}).get("D1")
    if r:
        return float(r[0]) / 1e3, float(r[1]) * 1e3
    u = law.units["tokens"]
    return 1e-6 * u, 1e6 * u


def _threshold_one(law, scratch, D2, view, N, N_base, lnx, refine: bool) -> dict:
    d1 = np.exp(lnx)
    gap = _log_gap(law, scratch, d1, np.full_like(d1, D2), view, N, N_base)
    g = lambda t: float(_log_gap(law, scratch, np.array([np.exp(t)]), np.array([D2]), view, N, N_base)[0])
    c = _crossing(lnx, gap, _refiner(g) if refine else None)
    for key in ("threshold", "saves_from"):
        if c[key] is not None and np.isfinite(c[key]):
            c[key] = float(np.exp(c[key]))
    return c


def _threshold_interval(samples: list[dict], level: float) -> list[float]:
    """Interval of the threshold over samples: a sample still saving at the top of the range
    counts as inf (beyond it), one that never saves as 0 (no D1 saves)."""
    return percentile_interval([0.0 if s["status"] == "never_saves" else s["threshold"] for s in samples], level)


def d1_threshold(law: Law, scratch: Law, D2: float, view: str = "tokens_with_base", N: Optional[float] = None,
                 N_base: Optional[float] = None, pairs: Optional[list] = None) -> dict:
    """For stage-2 tokens D2: the D1 beyond which reuse saves nothing against scratch in the view
    (VIEWS), i.e. the largest D1 in the search range where the saving crosses from > 0 to <= 0;
    `saves_from` where it last turned positive below that. Status: crosses, saves_at_top (still
    saving at the top of the range: threshold inf), never_saves. With bootstrap samples: the
    threshold's interval and the share of samples in each status."""
    _costs(1.0, 1.0, 1.0, view, N, N_base)  # checks the view (and N for FLOPs)
    span = _d1_span(law)
    lnx = np.linspace(np.log(span[0]), np.log(span[1]), int(_PER_DECADE * np.log10(span[1] / span[0])) + 1)
    out = {"D2": float(D2), "view": view, "range": list(span)}
    out.update(_threshold_one(law, scratch, D2, view, N, N_base, lnx, refine=True))
    pairs = sample_laws(law, scratch) if pairs is None else pairs
    if not pairs:
        out.update(interval=None, note=NO_SAMPLES)
        return out
    samples = [_threshold_one(r, s, D2, view, N, N_base, lnx, refine=False) for r, s in pairs]
    out["interval"] = _threshold_interval(samples, _level(law))
    out["share"] = {k: float(np.mean([s["status"] == k for s in samples]))
                    for k in ("crosses", "saves_at_top", "never_saves")}
    return out


def _budget_line(split: dict, N: Optional[float]):
    """D1 and D2 along the budget line as functions of z (share of the budget on the base =
    logistic(z)), and the budget's view."""
    if "budget_tokens" in split:
        cap1 = cap2 = split["budget_tokens"]
        view = "tokens_with_base"
    else:
        cap1, cap2 = split["budget_flops"] / (6 * split["N_base"]), split["budget_flops"] / (6 * N)
        view = "flops_with_base"
    d12 = lambda z: (cap1 / (1 + np.exp(-z)), cap2 / (1 + np.exp(z)))
    return d12, view


def budget_saving(law: Law, scratch: Law, split: dict, N: Optional[float] = None,
                  pairs: Optional[list] = None) -> dict:
    """At the best split of a budget: the saving against spending the budget from scratch (the
    base's cost counted: tokens for a token budget, FLOPs for a FLOP budget), with its interval
    and verdict, and the D1 beyond which the split saves nothing (the budget's threshold)."""
    d12, view = _budget_line(split, N)
    N_base = split.get("N_base")
    value = float(saving(law, scratch, split["D1"], split["D2"], view, N, N_base))
    zs = np.linspace(-20, 20, 801)

    def one(r, s, refine):
        gap = _log_gap(r, s, *d12(zs), view, N, N_base)
        g = lambda z: float(_log_gap(r, s, *(np.array([v]) for v in d12(z)), view, N, N_base)[0])
        c = _crossing(zs, gap, _refiner(g) if refine else None)
        for key in ("threshold", "saves_from"):
            if c[key] is not None and np.isfinite(c[key]):
                c[key] = float(d12(c[key])[0])
        return c

    out = {"view": view, "saving": value, "threshold": one(law, scratch, True)}
    pairs = sample_laws(law, scratch) if pairs is None else pairs
    if not pairs:
        out.update(saving_interval=None, verdict=NO_SAMPLES)
        return out
    draws = [float(saving(r, s, split["D1"], split["D2"], view, N, N_base)) for r, s in pairs]
    out["saving_interval"] = percentile_interval(draws, _level(law))
    out["verdict"] = verdict(out["saving_interval"])
    out["threshold"]["interval"] = _threshold_interval([one(r, s, False) for r, s in pairs], _level(law))
    return out
