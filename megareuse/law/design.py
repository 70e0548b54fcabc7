"""Designing a study before it is run: simulate a planned grid from a prior law and refit it.

A design is a prior `reuse` law (the truth of the simulation), a scatter SIGMA of log loss and the
cells of one stage-2 series (D1, D2 and how many runs repeat each cell). Simulation i draws

    ln L = ln L_prior(D1, D2) + SIGMA * z,   z ~ N(0, 1), independent per run

fits the table with the project's fitter (fit.fit_form, the `reuse` form, units chosen as
`megareuse fit` chooses them), bootstraps it (resampling.bootstrap: runs, or whole cells when a
cell is repeated, as `group`), and profiles E (identify.profile_E). Over the simulations it
reports the median width of the a3 interval, the spread of the a3 estimates themselves (the
central `level` range: what the interval should match), the chance the interval excludes 0
(detection), the chance it covers the true a3, and how often E is identified.

Every random number is seeded: z for run `rep` of cell (D1, D2) in simulation i comes from
numpy's generator seeded with (seed, i, D1, D2, rep), so grids that share cells share their noise
(common random numbers: the comparison of grids is not blurred by independent draws), and the
numbers do not depend on how many worker processes share the simulations.
"""
from __future__ import annotations

import math
import multiprocessing as mp
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from megareuse.law.data import LawError, parse_count, table_from_arrays
from megareuse.law.forms import get_form
from megareuse.law.law import Law

FORM = "reuse"
MIN_REFIT_SHARE = 0.5  # an interval counts when at least this share of the resamples was refitted
_PAYLOAD: dict = {}


@dataclass(frozen=True)
class Cell:
    """One planned point of a stage-2 series and how many runs (seeds) measure it."""
    D1: int
    D2: int
    repeats: int = 1


@dataclass
class Outcome:
    """What one simulated table gave."""
    a3: float  # the fitted a3 (nan when the fit failed)
    converged: bool
    interval: Optional[tuple[float, float]]  # bootstrap interval of a3 (None: too few resamples refitted)
    E_identified: Optional[bool]
    n_boot_converged: int


@dataclass
class Summary:
    """A design's answer for one grid of one series."""
    n_sims: int
    n_converged: int
    n_intervals: int
    width_median: Optional[float]  # median bootstrap width of the a3 interval
    width_quartiles: Optional[tuple[float, float]]
    width_se: Optional[float]  # Monte Carlo error of the median width: about 0.93 IQR / sqrt(intervals)
    spread: Optional[float]  # central `level` range of the fitted a3 over the simulations
    a3_median: Optional[float]
    detect: float  # share of simulations whose interval excludes 0
    cover: Optional[float]  # share of intervals that contain the true a3
    E_identified: Optional[float]  # share of simulations whose profile identifies E
    note: str = ""
    outcomes: list[Outcome] = field(default_factory=list)

    def to_dict(self) -> dict:
        out = {k: getattr(self, k) for k in ("n_sims", "n_converged", "n_intervals", "width_median",
                                             "width_quartiles", "width_se", "spread", "a3_median", "detect", "cover",
                                             "E_identified", "note")}
        out["detect_se"] = math.sqrt(self.detect * (1 - self.detect) / self.n_sims) if self.n_sims else None
        out["outcomes"] = [{"a3": o.a3, "converged": o.converged, "interval": o.interval,
                            "E_identified": o.E_identified, "n_boot_converged": o.n_boot_converged}
                           for o in self.outcomes]
        return out


# -- the prior ---------------------------------------------------------------------------------
def check_prior(law: Law, where: str) -> Law:
    if law.form.name != FORM:
        raise LawError(f"{where}: a {law.form.name} law ({law.form.formula}); accepted a {FORM} law "
                       f"({get_form(FORM).formula}), e.g. law.json of `megareuse fit --form reuse`")
    return law


def prior_from_file(path) -> Law:
    """A prior from law.json (`megareuse fit`); only its form, parameters and units are used."""
    return check_prior(Law.load(path), f"--prior {path}")


def prior_from_params(text: str, tokens_unit: float = 1e6) -> Law:
    """A prior from 'A=1.2,a1=0.05,a2=0.3,a3=0.05,E=1.6' (tokens in units of tokens_unit)."""
    form = get_form(FORM)
    params: dict[str, float] = {}
    for item in [t.strip() for t in str(text).split(",") if t.strip()]:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep:
            raise LawError(f"--prior-params {item!r}: accepted NAME=VALUE items, comma-separated")
        if name not in form.params:
            raise LawError(f"--prior-params: unknown parameter {name!r}; accepted {', '.join(form.params)} "
                           f"(the {FORM} law {form.formula})")
        try:
            params[name] = float(value)
        except ValueError:
            raise LawError(f"--prior-params {name} = {value.strip()!r}: accepted a number") from None
        if not math.isfinite(params[name]):
            raise LawError(f"--prior-params {name} = {value.strip()!r}: accepted a finite number")
    missing = [p for p in form.params if p not in params]
    if missing:
        raise LawError(f"--prior-params: {', '.join(missing)} missing; accepted all of {', '.join(form.params)}")
    for p in form.linear:
        if not params[p] > 0:
            raise LawError(f"--prior-params {p} = {params[p]:g}: accepted a positive number")
    return Law.from_params(FORM, params, tokens_unit=tokens_unit, source="--prior-params")


def with_a3(prior: Law, a3: Optional[float]) -> Law:
    """The prior with its a3 replaced (the a3 whose detection is asked about)."""
    if a3 is None:
        return prior
    if not (isinstance(a3, (int, float)) and math.isfinite(a3)):
        raise LawError(f"--a3 = {a3!r}: accepted a finite number")
    theta = prior.theta.copy()
    theta[list(prior.form.linear + prior.form.nonlinear).index("a3")] = float(a3)
    return Law(prior.form, theta, prior.units, data=dict(prior.data, a3_set=float(a3)))


def check_settings(noise, sims, resamples, level, seed, workers) -> None:
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not (math.isfinite(noise) and noise > 0):
        raise LawError(f"--noise = {noise!r}: accepted a number > 0 (the scatter of log loss, e.g. 0.012)")
    for name, value, lo in (("--sims", sims, 2), ("--resamples", resamples, 2), ("--seed", seed, 0),
                            ("--workers", workers, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise LawError(f"{name} = {value!r}: accepted an integer >= {lo}")
    if not (isinstance(level, float) and 0 < level < 1):
        raise LawError(f"--level = {level!r}: accepted a number between 0 and 1, e.g. 0.9")


def parse_number(name: str, text, lo: float = 0.0) -> float:
    """A positive count or number from the command line (1e6, 2.5M), one-line error otherwise."""
    try:
        value = parse_count(text)
    except LawError:
        raise LawError(f"{name} = {text!r}: accepted a number > {lo:g}") from None
    if not (math.isfinite(value) and value > lo):
        raise LawError(f"{name} = {text!r}: accepted a number > {lo:g}")
    return value


# -- one simulation ----------------------------------------------------------------------------
def fittable(cells: Sequence[Cell]) -> str:
    """'' when the reuse law can be fitted to these cells, else why not (one line)."""
    d1, need = {c.D1 for c in cells}, get_form(FORM).n_params + 1
    if len(d1) < 2 or len({c.D2 for c in cells}) < 2:
        return f"the grid has {len(d1)} D1 and {len({c.D2 for c in cells})} D2 values; the {FORM} law needs 2 of each"
    if len(cells) < need:
        return f"the grid has {len(cells)} cells; the {FORM} law needs at least {need}"
    return ""


def simulated_table(cells: Sequence[Cell], prior: Law, noise: float, seed: int, i: int):
    """The runs of simulation i: the prior's loss times exp(noise * z), one row per run."""
    d1, d2, z, group = [], [], [], []
    for c in cells:
        for rep in range(c.repeats):
            d1.append(c.D1)
            d2.append(c.D2)
            z.append(np.random.default_rng([seed, i, int(c.D1), int(c.D2), rep]).standard_normal())
            group.append(f"D1={c.D1}/D2={c.D2}")
    d1, d2 = np.array(d1, dtype=float), np.array(d2, dtype=float)
    loss = prior.predict(D1=d1, D2=d2) * np.exp(noise * np.array(z))
    repeated = any(c.repeats > 1 for c in cells)
    return table_from_arrays(loss, source=f"simulation {i}", group=group if repeated else None, D1=d1, D2=d2)


def simulate_one(cells: Sequence[Cell], prior: Law, noise: float, i: int, seed: int = 0,
                 resamples: int = 25, level: float = 0.9) -> Outcome:
    """Simulate table i, fit it, bootstrap it, profile E."""
    from megareuse.law.fit import fit_form
    from megareuse.law.identify import profile_E
    from megareuse.law.resampling import bootstrap
    table = simulated_table(cells, prior, noise, seed, i)
    try:
        law = fit_form(table, FORM)
    except LawError:
        return Outcome(float("nan"), False, None, None, 0)
    a3, converged = float(law.params["a3"]), bool(law.diagnostics["converged"])
    boot = bootstrap(table, law, resamples, seed=seed + i, level=level)
    # a grid with few cells per parameter leaves most resamples unfittable (too few distinct cells);
    # the interval of the few left is no measure of the fit's uncertainty (with n_params + 1 cells
    # every fittable resample is the table itself: a zero-width interval)
    iv = boot["intervals"].get("a3") if boot["n_converged"] >= MIN_REFIT_SHARE * resamples else None
    profile = profile_E(table, law, level)
    return Outcome(a3, converged, (float(iv[0]), float(iv[1])) if iv else None,
                   bool(profile["identified"]) if profile else None, int(boot["n_converged"]))


def summarise(outcomes: Sequence[Outcome], true_a3: float, level: float, note: str = "") -> Summary:
    n = len(outcomes)
    ok = [o for o in outcomes if o.converged and math.isfinite(o.a3)]
    ivs = [o.interval for o in outcomes if o.interval is not None]
    # a width is the grid's answer only when most simulations give an interval
    widths = np.array([hi - lo for lo, hi in ivs]) if 2 * len(ivs) >= n else np.array([])
    tail = 50.0 * (1.0 - level)
    a3 = np.array([o.a3 for o in ok])
    ident = [o.E_identified for o in outcomes if o.E_identified is not None]
    return Summary(
        n_sims=n, n_converged=len(ok), n_intervals=len(ivs),
        width_median=float(np.median(widths)) if len(widths) else None,
        width_quartiles=(float(np.percentile(widths, 25)), float(np.percentile(widths, 75))) if len(widths) else None,
        width_se=float(0.93 * np.subtract(*np.percentile(widths, [75, 25])) / np.sqrt(len(widths)))
        if len(widths) else None,
        spread=float(np.percentile(a3, 100 - tail) - np.percentile(a3, tail)) if len(a3) >= 2 else None,
        a3_median=float(np.median(a3)) if len(a3) else None,
        detect=sum(1 for lo, hi in ivs if lo > 0 or hi < 0) / n if n else 0.0,
        cover=sum(1 for lo, hi in ivs if lo <= true_a3 <= hi) / len(ivs) if ivs else None,
        E_identified=sum(ident) / len(ident) if ident else None,
        note=note or _missing(n, len(ivs)),
        outcomes=list(outcomes))


def _missing(n: int, n_intervals: int) -> str:
    if n_intervals == n:
        return ""
    why = (f"fewer than {MIN_REFIT_SHARE:.0%} of the bootstrap resamples could be refitted (too few distinct "
           f"cells per resample for the {get_form(FORM).n_params} parameters) or the fit failed")
    return f"{n - n_intervals} of {n} simulations gave no a3 interval: {why}"


# -- many simulations, many grids --------------------------------------------------------------
def _init(payload: dict) -> None:
    _PAYLOAD.clear()
    _PAYLOAD.update(payload)


def _task(job: tuple[int, int]) -> tuple[int, int, Outcome]:
    g, i = job
    p = _PAYLOAD
    return g, i, simulate_one(p["grids"][g], p["prior"], p["noise"], i, p["seed"], p["resamples"], p["level"])


class Progress:
    """One line on stderr at most every `every` seconds (and at the end): done, elapsed, left."""

    def __init__(self, total: int, emit: Optional[Callable[[str], None]] = None, every: float = 5.0) -> None:
        self.total, self.every, self.done = total, every, 0
        self.emit = emit if emit is not None else (lambda s: print(s, file=sys.stderr, flush=True))
        self.start = self.last = time.monotonic()

    def step(self) -> None:
        self.done += 1
        now = time.monotonic()
        if now - self.last >= self.every or self.done == self.total:
            self.last = now
            spent = now - self.start
            left = spent / self.done * (self.total - self.done)
            self.emit(f"design: {self.done}/{self.total} simulations, {spent:.0f} s"
                      + (f", about {left:.0f} s left" if self.done < self.total else ""))


def simulate_grids(grids: Sequence[Sequence[Cell]], prior: Law, noise: float, sims: int = 20,
                   resamples: int = 40, level: float = 0.9, seed: int = 0, workers: int = 1,
                   progress: Optional[Callable[[str], None]] = None) -> list[Summary]:
    """Simulate every grid `sims` times; one Summary per grid (identical grids run once)."""
    check_prior(prior, "prior")
    check_settings(noise, sims, resamples, level, seed, workers)
    unique: list[tuple[Cell, ...]] = []
    for cells in grids:
        key = tuple(sorted(cells, key=lambda c: (c.D1, c.D2)))
        if key not in unique:
            unique.append(key)
    notes = [fittable(cells) for cells in unique]
    jobs = [(g, i) for g, cells in enumerate(unique) if not notes[g] for i in range(sims)]
    results: dict[int, list] = {g: [None] * sims for g in range(len(unique))}
    payload = {"grids": unique, "prior": prior, "noise": float(noise), "seed": seed, "resamples": resamples,
               "level": level}
    bar = Progress(len(jobs), progress)
    if workers > 1 and "fork" in mp.get_all_start_methods() and len(jobs) > 1:
        from megareuse.law.fit import blas_single_thread
        from megareuse.pools import quiet_worker
        with blas_single_thread(), mp.get_context("fork").Pool(
                workers, initializer=quiet_worker, initargs=(_init, payload)) as pool:
            for g, i, outcome in pool.imap_unordered(_task, jobs):
                results[g][i] = outcome
                bar.step()
    else:
        _init(payload)
        for job in jobs:
            g, i, outcome = _task(job)
            results[g][i] = outcome
            bar.step()
    true_a3 = float(prior.params["a3"])
    by_key = {key: summarise([o for o in results[g] if o is not None], true_a3, level, notes[g])
              for g, key in enumerate(unique)}
    return [by_key[tuple(sorted(cells, key=lambda c: (c.D1, c.D2)))] for cells in grids]
