"""The sweep's planned objects, shared by the planner (grid.py) and the checkpoint bases
(bases.py): a series of runs, an experiment, one unit of work, and the naming rules."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from megareuse.config import ConfigError

SCHEDULES = ("wsd", "cosine")
METHODS = ("cpt", "stack", "identity", "width", "width+stack", "width+identity")


@dataclass(frozen=True)
class Seeds:
    """Cells of a series run ``count`` times in all, each repeat with another data-order seed
    (``data.seed`` + r - 1 for repeat r = 2..count). ``budgets``: the chosen values of the series'
    own budget axis (D1, D2 or D); ``D1``: a stage-2 series' chosen D1 values; None: every value."""
    count: int
    budgets: Optional[tuple[int, ...]] = None
    D1: Optional[tuple[int, ...]] = None

    def chosen(self, budget: int, d1: Optional[int] = None) -> bool:
        return ((self.budgets is None or budget in self.budgets)
                and (self.D1 is None or d1 is None or d1 in self.D1))


SEEDS_ACCEPTED = ("a count K >= 2 (every cell of the series run K times in all) or a mapping {count: K"
                  ", %s} (the chosen cells; an axis left out: all its values)")


def parse_seeds(raw: Any, where: str, budget_key: str, budgets: list[int], stage2: bool) -> Seeds:
    """A series' ``seeds``: K, or {count: K, <budget axis>: [...], D1: [...] (stage 2)}. The D1
    values of a stage-2 series are checked against its bases later (``check_seed_d1``)."""
    axes = [budget_key] + (["D1"] if stage2 else [])
    accepted = SEEDS_ACCEPTED % ", ".join(f"{a}: [...]" for a in axes)
    if isinstance(raw, int) and not isinstance(raw, bool):
        raw = {"count": raw}
    if not isinstance(raw, dict):
        _fail(where, raw, accepted)
    for key in raw:
        if key not in ("count", *axes):
            _fail(f"{where}.{key}", raw[key], "one of the keys " + ", ".join(("count", *axes)))
    count = raw.get("count")
    if isinstance(count, bool) or not isinstance(count, int) or count < 2:
        _fail(f"{where}.count", count, "an integer >= 2 (runs per chosen cell, the original included)")
    chosen = {}
    for axis in axes:
        values = raw.get(axis)
        if values is None:
            continue
        if not isinstance(values, list) or not values or any(
                isinstance(v, bool) or not isinstance(v, int) for v in values) or len(set(values)) != len(values):
            _fail(f"{where}.{axis}", values, "a non-empty list of distinct token counts")
        if axis == budget_key and not set(values) <= set(budgets):
            _fail(f"{where}.{axis}", values, f"values of the series' {budget_key} {budgets}")
        chosen[axis] = tuple(sorted(values))
    return Seeds(count, chosen.get(budget_key), chosen.get("D1") if stage2 else None)


def check_seed_d1(seeds: Optional[Seeds], where: str, d1s: list[int]) -> None:
    """A stage-2 series' chosen D1 values must be D1 values it starts from (``d1s``)."""
    if seeds is not None and seeds.D1 is not None and not set(seeds.D1) <= set(d1s):
        _fail(f"{where}.seeds.D1", list(seeds.D1), f"values of the D1 this series starts from {d1s}")


@dataclass
class Series:
    """One family of runs sharing a starting point: budgets ``budgets`` on ``domains``."""
    name: str
    method: str  # base, scratch, cpt, or a growth operator
    domains: dict[str, float]
    budgets: list[int]
    schedule: str = "wsd"
    replay: float = 0.0
    growth: dict[str, Any] = field(default_factory=dict)
    D1: Optional[list[int]] = None  # stage 2: which base budgets to start from (None: all)
    model: dict[str, Any] = field(default_factory=dict)  # base / scratch: model fields that differ
    bases: Optional[list[str]] = None  # stage 2: which base series to start from (None: the first)
    overrides: list[str] = field(default_factory=list)  # this series' own training-config overrides
    checkpoints: Optional[list[Any]] = None  # base: checkpoints that exist (bases.CheckpointSpec)
    seeds: Optional[Seeds] = None  # cells repeated with other data-order seeds


@dataclass
class Experiment:
    name: str
    path: Path
    train: dict[str, Any]  # the raw training config (train_config + overrides)
    base: Series
    stage2: list[Series]
    scratch: list[Series]
    decay_frac: float = 0.2
    bases: list[Series] = field(default_factory=list)  # every base series, ``base`` first

    def __post_init__(self) -> None:
        if not self.bases:
            self.bases = [self.base]


@dataclass
class RunSpec:
    """One unit of work: train (with overrides and an optional resume point), grow, or import /
    evaluate a checkpoint that exists (bases.py)."""
    run_id: str  # also its directory below the sweep's output root
    kind: str  # train | grow | import | evaluate
    series: str
    method: str
    overrides: list[str]
    depends_on: list[str]
    tokens: int  # new training tokens this run computes
    flops: float  # training FLOPs of those tokens
    resume_from: Optional[str] = None  # relative checkpoint path (a trunk's) to branch from
    grow: Optional[dict[str, Any]] = None  # kind grow: {"from": ckpt, **operator args}
    data_point: bool = False  # a finished run whose record is a point of the law
    source: Optional[dict[str, Any]] = None  # kind import / evaluate: the listed checkpoint


def _fail(where: str, value: Any, accepted: str) -> None:
    raise ConfigError(f"experiment error: {where} = {value!r}: accepted {accepted}")


_NAME = re.compile(r"[A-Za-z0-9_.-]+")


PLANNED_KEYS = ("data.train", "data.replay", "run.series", "run.train_tokens", "run.save_tokens",
                "run.init_from", "run.keep_last", "run.write_record", "schedule.kind", "schedule.decay_frac")


def _series_overrides(raw: Any, where: str) -> list[str]:
    """A series' own overrides: section.field=value strings, none of a key the planner sets."""
    if not isinstance(raw, list) or not all(isinstance(o, str) and "=" in o for o in raw):
        _fail(where, raw, "a list of section.field=value strings")
    for item in raw:
        key = item.split("=", 1)[0].strip()
        if key in PLANNED_KEYS or key.startswith("model."):
            _fail(where, item, "overrides of keys the planner does not set (not " + ", ".join(PLANNED_KEYS)
                  + " or model.*: use the series' model / growth)")
    return list(raw)


def ckpt_path(run_id: str, step: int) -> str:
    return f"{run_id}/checkpoints/step_{step:08d}"


def run_dir(root: Path, run: RunSpec) -> Path:
    return Path(root) / run.run_id


def is_done(root: Path, run: RunSpec) -> bool:
    """Whether ``run``'s work is on disk: a verified checkpoint (grow, import), a record (evaluate),
    a finished summary (train)."""
    out = run_dir(root, run)
    if run.kind in ("grow", "import"):
        from megareuse.engine.checkpoint import verify_checkpoint
        return out.is_dir() and verify_checkpoint(out, checksums=False) is None
    if run.kind == "evaluate":
        return (out / "record.json").is_file()
    summary = out / "summary.json"
    return summary.is_file() and json.loads(summary.read_text()).get("finished", False)
