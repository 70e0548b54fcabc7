"""Planning with fitted laws: reuse a base, or train from scratch?

Given a reuse law L(D1, D2) (any form over D1 and D2) and optionally a from-scratch law
L_s(D) (`power`) or L_s(N, D) (`chinchilla`), the planner answers, in tokens and in FLOPs
(C = 6 N D for each stage):
  - the loss after D2 more tokens on a base trained for D1, and the marginal gain -dL/dD2;
  - the effective token saving D_s(L) - D2, where D_s(L) is what a from-scratch run needs to
    reach the same loss, and the D2 at which that saving vanishes;
  - for a fixed budget (tokens or FLOPs, the base paid for), the best split between D1 and D2.
Every result carries the labels of the laws (form, data file, sha256) it came from.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from scipy.optimize import brentq, minimize_scalar

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


def best_split(law: Law, budget_tokens: Optional[float] = None, budget_flops: Optional[float] = None,
               N: Optional[float] = None, N_base: Optional[float] = None) -> dict:
    """Minimise L(D1, D2) subject to D1 + D2 = budget_tokens, or 6 N_base D1 + 6 N D2 = budget_flops."""
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

    zs = np.linspace(-20, 20, 801)
    values = np.array([loss(z) for z in zs])
    k = int(np.argmin(values))
    res = minimize_scalar(loss, bounds=(zs[max(k - 1, 0)], zs[min(k + 1, len(zs) - 1)]), method="bounded",
                          options={"xatol": 1e-12})
    z = res.x if res.fun <= values[k] else zs[k]
    s = 1.0 / (1.0 + np.exp(-z))
    out = {"D1": s * cap1, "D2": (1 - s) * cap2, "loss": loss(z), "share_D1": float(s),
           "at_edge": bool(k in (0, len(zs) - 1))}
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
            "rows": rows, "vanish": [], "split": None}
    if scratch is not None:
        plan["scratch_law_file"] = scratch.data.get("law_file", "")
        plan["vanish"] = [saving_vanishes(law, scratch, d1, N) for d1 in D1]
    if budget_tokens or budget_flops:
        split = best_split(law, budget_tokens, budget_flops, N, N_base)
        if scratch is not None:
            d_all = budget_tokens if budget_tokens else budget_flops / (6 * N)
            split["scratch_loss"] = float(_scratch_loss(scratch, d_all, N))
            split["scratch_tokens"] = d_all
            split["decision"] = "reuse" if split["loss"] < split["scratch_loss"] else "scratch"
        plan["split"] = split
    return plan
