"""The grids a design compares: the experiment's planned grid and variants of it, with their cost.

The cells of each stage-2 series come from the sweep's own plan (sweep.grid.plan_experiment):
every data-point run of the series is one row at its (D1, D2); runs that share a cell are
repeats (seeds) with independent noise. A series that starts from several bases is one table per
base ("stack/base_wide"), as the demo fits it. The cost of a grid is the plan's totals (tokens,
FLOPs), so it is what `megareuse sweep --dry-run` prints.

Variants of a given experiment (each applied to every stage-2 series):
  d2x2, d2x4  the D2 axis extended upward in the series' own geometric step until its span
              (largest / smallest D2) is 2x or 4x the planned one (e.g. 8x -> 16x or 32x);
  d1+1        one more D1 level above the largest, in the bases' geometric step, for every
              trained base and every stage-2 series (not possible from listed checkpoints);
  seeds       one more run of each cell at the largest D1 of each series with another data-order
              seed (the sweep's `seeds: {count: 2, D1: [max]}`: a trunk of its own and the
              cooldowns); a series with `seeds` of its own gets one more of its chosen cells.
Every variant is planned by the sweep itself, so its cost is what `sweep --dry-run` would print.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Optional, Sequence

from megareuse.law.data import LawError
from megareuse.law.design import Cell

VARIANTS = ("given", "d2x2", "d2x4", "d1+1", "seeds")
_D1 = re.compile(r"(?:^|/)D1=(\d+)(?:/|$)")
_D = re.compile(r"(?:^|/)D=(\d+)(?:/|$)")


@dataclass
class Grid:
    """One planned grid: the cells of every stage-2 table and the cost of the whole plan."""
    name: str
    what: str
    cells: dict[str, list[Cell]]  # table key (series, or series/base) -> its cells
    tokens: int  # training tokens of the whole plan
    flops: float
    series_cost: dict[str, tuple[int, float]] = field(default_factory=dict)  # key -> its own runs' cost
    n_runs: int = 0  # runs of the plan
    spans: dict[str, dict] = field(default_factory=dict)  # key -> D1 and D2 ranges

    def gpu_hours(self, mfu: float, peak_tflops: float, flops: Optional[float] = None) -> float:
        return (self.flops if flops is None else flops) / (mfu * peak_tflops * 1e12) / 3600.0


def table_keys(exp) -> list[tuple[str, str, str]]:
    """(key, series name, run-id prefix) of every stage-2 table, as the planner names the runs."""
    out = []
    for s in exp.stage2:
        for base in s.bases or [exp.base.name]:
            where = s.name if s.bases is None else f"{s.name}/{base}"
            out.append((where, s.name, where + "/"))
    return out


def _cell_of(run_id: str) -> Optional[tuple[int, int]]:
    d1, d2 = _D1.search(run_id), _D.search(run_id)
    return (int(d1.group(1)), int(d2.group(1))) if d1 and d2 else None


def read_plan(exp, runs, name: str = "given", what: str = "the experiment as planned") -> Grid:
    """The grid of planned `runs`: cells counted from the data-point runs of each stage-2 table
    (a seed repeat, ``.../seed=r``, is one more run of its cell); the cost is the plan's."""
    from megareuse.sweep.grid import totals
    tokens, flops = totals(runs)
    cells, cost, spans = {}, {}, {}
    for key, series, prefix in table_keys(exp):
        mine = [r for r in runs if r.series == series and r.run_id.startswith(prefix)]
        counts: dict[tuple[int, int], int] = {}
        for r in mine:
            cell = _cell_of(r.run_id) if r.data_point else None
            if cell:
                counts[cell] = counts.get(cell, 0) + 1
        cells[key] = [Cell(d1, d2, n) for (d1, d2), n in sorted(counts.items())]
        cost[key] = (sum(r.tokens for r in mine), sum(r.flops for r in mine))
        d1s, d2s = sorted({c.D1 for c in cells[key]}), sorted({c.D2 for c in cells[key]})
        spans[key] = {"D1": d1s, "D2": d2s, "D2_span": d2s[-1] / d2s[0] if d2s else None}
    return Grid(name, what, cells, int(tokens), float(flops), cost, len(runs), spans)


def _step(budgets: Sequence[int]) -> float:
    """The geometric step of a list of budgets (2 for a single budget)."""
    b = sorted(budgets)
    return (b[-1] / b[0]) ** (1.0 / (len(b) - 1)) if len(b) > 1 and b[-1] > b[0] else 2.0


def _round(value: float, unit: int) -> int:
    return max(unit, int(round(value / unit)) * unit)


def _tokens_per_step(exp, series) -> int:
    from megareuse.config import Config, apply_overrides
    return Config.from_dict(apply_overrides(exp.train, list(series.overrides))).tokens_per_step


def extend_d2(budgets: Sequence[int], factor: float, unit: int) -> list[int]:
    """Budgets extended upward in their geometric step until the span is `factor` times as wide."""
    b = sorted(budgets)
    target, step, out = b[-1] * factor, _step(b), list(b)
    while out[-1] < target * (1 - 1e-9):
        out.append(_round(out[-1] * step, unit))
    return out


def variant_experiment(exp, name: str):
    """A copy of the experiment changed as variant `name` says, and what it is (one line);
    (None, why) when the variant does not apply."""
    new = copy.deepcopy(exp)
    if name in ("d2x2", "d2x4"):
        factor = 2 if name == "d2x2" else 4
        parts = []
        for s in new.stage2:
            before = sorted(s.budgets)
            s.budgets = extend_d2(before, factor, _tokens_per_step(exp, s))
            parts.append(f"{s.name} D2 {before[-1] / before[0]:.3g}x -> {s.budgets[-1] / s.budgets[0]:.3g}x "
                         f"(up to {s.budgets[-1]:,})")
        return new, f"D2 span x{factor}: " + "; ".join(parts)
    if name == "d1+1":
        fixed = [b.name for b in new.bases if b.checkpoints is not None]
        if fixed:
            return None, f"base {fixed[0]} lists checkpoints that exist: no D1 level can be added"
        added = {}
        for b in new.bases:
            budgets = sorted(b.budgets)
            added[b.name] = _round(budgets[-1] * _step(budgets), _tokens_per_step(exp, b))
            b.budgets = budgets + [added[b.name]]
        for s in new.stage2:
            if s.D1 is not None:
                common = {added[n] for n in (s.bases or [new.base.name])}
                if len(common) == 1:
                    s.D1 = sorted(s.D1) + list(common)
        return new, "one more D1 level: " + ", ".join(f"{n} up to {v:,}" for n, v in added.items())
    if name == "seeds":
        from megareuse.sweep.spec import Seeds
        parts = []
        for s in new.stage2:
            if s.seeds is None:
                starts = s.D1 or sorted({d for b in new.bases if b.name in (s.bases or [new.base.name])
                                         for d in b.budgets})
                s.seeds = Seeds(2, None, (max(starts),))
                parts.append(f"{s.name} 2 seeds at D1 = {max(starts):,}")
            else:
                s.seeds = Seeds(s.seeds.count + 1, s.seeds.budgets, s.seeds.D1)
                parts.append(f"{s.name} {s.seeds.count} seeds of its chosen cells")
        return new, "one more seed (data order) of every cell at the largest D1: " + "; ".join(parts)
    raise LawError(f"variant = {name!r}: accepted {', '.join(VARIANTS)}")


def build_grids(exp, variants: Sequence[str] = VARIANTS) -> tuple[list[Grid], list[str]]:
    """The given grid and its variants (as planned by the sweep), and a note per variant skipped."""
    from megareuse.sweep.grid import plan_experiment
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise LawError(f"--variants {','.join(variants)!r}: accepted a comma list of {', '.join(VARIANTS)}")
    if not exp.stage2:
        raise LawError(f"experiment {exp.name}: no stage2 series; accepted an experiment with at least one "
                       "(the design simulates the reuse law of each stage-2 series)")
    grids, skipped = [], []
    for name in variants:
        if name == "given":
            grids.append(read_plan(exp, plan_experiment(exp), "given", "the experiment as planned"))
            continue
        new, what = variant_experiment(exp, name)
        if new is None:
            skipped.append(f"{name}: {what}")
            continue
        grids.append(read_plan(new, plan_experiment(new), name, what))
    return grids, skipped


def rank(rows: Sequence[dict]) -> list[dict]:
    """Certainty per FLOP of each grid relative to the first with a width (the given grid when it
    has one): (w_ref / w)^2 / (F / F_ref), certainty = 1 / width^2 (what n independent runs buy:
    4x the runs halve a width). Rows: {"name", "width", "flops"}; returns them ranked, best first."""
    ref = next((r for r in rows if r.get("width")), None)
    for r in rows:
        ok = ref is not None and r.get("width") and r["width"] > 0 and ref["width"] > 0
        r["certainty_per_flop"] = ((ref["width"] / r["width"]) ** 2 / (r["flops"] / ref["flops"])) if ok else None
        r["certainty"] = ((ref["width"] / r["width"]) ** 2) if ok else None
    ordered = sorted(rows, key=lambda r: (r["certainty_per_flop"] is None, -(r["certainty_per_flop"] or 0.0)))
    for i, r in enumerate(ordered, 1):
        r["rank"] = i if r["certainty_per_flop"] is not None else None
    return ordered
