"""Experiments as (D1 x D2) grids, planned into an ordered list of runs.

An experiment file (configs/experiments/*.yaml) names a training config and the grid:

    name: cpt_tiny
    train_config: ../train/tiny_base.yaml     # relative to this file
    overrides: [run.micro_batch_size=8]       # applied to every run
    base: {domains: {prose: 1}, D1: [262144, 524288, 1048576, 2097152], schedule: wsd}
    stage2:
      - {name: cpt, method: cpt, domains: {code: 1}, D2: [65536, 131072, 262144, 524288]}
      - {name: stack, method: stack, domains: {prose: 1}, D1: [524288, 2097152],
         D2: [131072, 524288], growth: {depth: 2}}
    scratch:
      - {name: scratch_code, domains: {code: 1}, D: [65536, 131072, 262144, 524288]}

With ``schedule: wsd`` (warmup-stable-decay) a series of token budgets costs one constant-LR
"trunk" run to the last branch point plus a short cooldown branch per budget: the branch for
budget D resumes the trunk's checkpoint at the step where D's own WSD schedule starts to decay
(the last ``decay_frac`` of its steps) and decays to the end. ``schedule: cosine`` trains one
independent run per budget. Stage-2 series start from the base run at their D1
(``run.init_from``); growth series first grow that checkpoint (`megareuse grow`).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from megareuse.config import Config, ConfigError, apply_overrides, read_yaml, read_yaml_mapping
from megareuse.model import flops_per_token, non_embedding_param_count

SCHEDULES = ("wsd", "cosine")
METHODS = ("cpt", "stack", "identity", "width", "width+stack", "width+identity")


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


@dataclass
class Experiment:
    name: str
    path: Path
    train: dict[str, Any]  # the raw training config (train_config + overrides)
    base: Series
    stage2: list[Series]
    scratch: list[Series]
    decay_frac: float = 0.2


@dataclass
class RunSpec:
    """One unit of work: train (with overrides and an optional resume point) or grow."""
    run_id: str  # also its directory below the sweep's output root
    kind: str  # train | grow
    series: str
    method: str
    overrides: list[str]
    depends_on: list[str]
    tokens: int  # new training tokens this run computes
    flops: float  # training FLOPs of those tokens
    resume_from: Optional[str] = None  # relative checkpoint path (a trunk's) to branch from
    grow: Optional[dict[str, Any]] = None  # kind grow: {"from": ckpt, **operator args}
    data_point: bool = False  # a finished run whose record is a point of the law


def _fail(where: str, value: Any, accepted: str) -> None:
    raise ConfigError(f"experiment error: {where} = {value!r}: accepted {accepted}")


_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def _series(raw: Any, where: str, budget_key: str, method: str) -> Series:
    if not isinstance(raw, dict):
        _fail(where, raw, "a mapping")
    known = {"name", "method", "domains", budget_key, "schedule", "replay", "growth", "D1"}
    for key in raw:
        if key not in known:
            _fail(f"{where}.{key}", raw[key], "one of the keys " + ", ".join(sorted(known)))
    budgets = raw.get(budget_key)
    if not isinstance(budgets, list) or not budgets or any(
            not isinstance(b, int) or isinstance(b, bool) or b <= 0 for b in budgets):
        _fail(f"{where}.{budget_key}", budgets, "a non-empty list of positive token counts")
    if sorted(set(budgets)) != budgets:
        _fail(f"{where}.{budget_key}", budgets, "strictly increasing token counts")
    domains = raw.get("domains")
    if not isinstance(domains, dict) or not domains:
        _fail(f"{where}.domains", domains, "a mapping domain -> weight")
    for domain, weight in domains.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) \
                or weight <= 0:
            _fail(f"{where}.domains.{domain}", weight, "a finite number > 0 (the domain's share of the blend)")
    name = raw.get("name", method)
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        _fail(f"{where}.name", name, "a name of letters, digits, '_', '-' and '.' (it names run directories)")
    replay = raw.get("replay", 0.0)
    if isinstance(replay, bool) or not isinstance(replay, (int, float)) or not 0 <= replay < 1:
        _fail(f"{where}.replay", replay, "a number in [0, 1)")
    growth = raw.get("growth") or {}
    if not isinstance(growth, dict):
        _fail(f"{where}.growth", growth, "a mapping such as {width: 2} or {depth: 2}")
    for key in ("width", "depth"):
        factor = growth.get(key, 1)
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
            _fail(f"{where}.growth.{key}", factor, "an integer >= 1")
    series = Series(name=name, method=str(raw.get("method", method)),
                    domains=dict(domains), budgets=list(budgets), schedule=raw.get("schedule", "wsd"),
                    replay=float(replay), growth=dict(growth),
                    D1=raw.get("D1"))
    if series.schedule not in SCHEDULES:
        _fail(f"{where}.schedule", series.schedule, "one of " + ", ".join(SCHEDULES))
    return series


def load_experiment(path: str | Path, overrides: list[str] = ()) -> Experiment:
    """Read and check an experiment file (one-line ExperimentError-style ConfigErrors)."""
    path = Path(path)
    raw = read_yaml_mapping(path, "experiment")
    known = {"name", "train_config", "overrides", "base", "stage2", "scratch", "decay_frac"}
    for key in raw:
        if key not in known:
            _fail(key, raw[key], "one of the keys " + ", ".join(sorted(known)))
    if not isinstance(raw.get("train_config"), str):
        _fail("train_config", raw.get("train_config"), "a training config path relative to the experiment file")
    if not isinstance(raw.get("overrides", []), list) or not all(isinstance(o, str) for o in raw.get("overrides", [])):
        _fail("overrides", raw.get("overrides"), "a list of section.field=value strings")
    for key in ("stage2", "scratch"):
        if not isinstance(raw.get(key) or [], list):
            _fail(key, raw[key], "a list of series")
    if not isinstance(raw.get("name", ""), str):
        _fail("name", raw["name"], "a string")
    train = apply_overrides(read_yaml(path.parent / raw["train_config"]),
                            list(raw.get("overrides", [])) + list(overrides))
    Config.from_dict(train).validate()
    base = _series(raw.get("base"), "base", "D1", "base")
    base.method = "base"
    stage2 = [_series(s, f"stage2[{i}]", "D2", "cpt") for i, s in enumerate(raw.get("stage2") or [])]
    for i, s in enumerate(stage2):
        if s.method not in METHODS:
            _fail(f"stage2[{i}].method", s.method, "one of " + ", ".join(METHODS))
        if s.D1 is not None and not set(s.D1) <= set(base.budgets):
            _fail(f"stage2[{i}].D1", s.D1, f"a subset of base.D1 {base.budgets}")
    scratch = [_series(s, f"scratch[{i}]", "D", "scratch") for i, s in enumerate(raw.get("scratch") or [])]
    for s in scratch:
        s.method = "scratch"
    names = [base.name] + [s.name for s in stage2 + scratch]
    if len(set(names)) != len(names):
        _fail("name", names, "distinct series names")
    decay = float(raw.get("decay_frac", 0.2))
    if not 0 < decay < 1:
        _fail("decay_frac", decay, "a number in (0, 1)")
    return Experiment(str(raw.get("name", path.stem)), path, train, base, stage2, scratch, decay)


def grown_model(model: dict[str, Any], growth: dict[str, Any]) -> dict[str, Any]:
    """The model section after growth (width k: d, heads, KV heads, FFN x k, head untied;
    depth g: layers x g), as `megareuse grow` produces it."""
    k, g = int(growth.get("width", 1)), int(growth.get("depth", 1))
    out = dict(model)
    if k > 1:
        out.update(d_model=model["d_model"] * k, n_heads=model["n_heads"] * k,
                   ffn_hidden=model["ffn_hidden"] * k, tie_embeddings=False)
        if model.get("n_kv_heads") is not None:
            out["n_kv_heads"] = model["n_kv_heads"] * k
    layer_map = growth.get("layer_map")
    out["n_layers"] = len(layer_map) if layer_map else model["n_layers"] * g
    return out


def _steps(cfg: Config, tokens: int, where: str) -> int:
    if tokens % cfg.tokens_per_step:
        _fail(where, tokens, f"multiples of the {cfg.tokens_per_step} tokens of one step")
    return tokens // cfg.tokens_per_step


def branch_step(total_steps: int, decay_frac: float, warmup: int) -> int:
    """Where a WSD schedule of ``total_steps`` starts its decay (as LRSchedule computes it)."""
    return max(min(warmup, total_steps - 1), total_steps - max(1, round(decay_frac * total_steps)))


def ckpt_path(run_id: str, step: int) -> str:
    return f"{run_id}/checkpoints/step_{step:08d}"


class Planner:
    def __init__(self, exp: Experiment, dp: int = 1):
        self.exp, self.dp = exp, dp
        self.runs: list[RunSpec] = []

    def _cfg(self, overrides: list[str]) -> Config:
        return Config.from_dict(apply_overrides(self.exp.train, overrides))

    def _series_runs(self, series: Series, prefix: str, common: list[str], after: list[str],
                     model: dict[str, Any]) -> dict[int, str]:
        """Plan one series; returns budget -> final checkpoint path of its run."""
        cfg = self._cfg(common)
        cfg.run.micro_batch_size *= self.dp  # global batch for token accounting
        tps = cfg.tokens_per_step
        fpt = flops_per_token(cfg.model, cfg.data.seq_len)
        finals = {}
        data = [f"data.train={yaml.safe_dump(series.domains, default_flow_style=True).strip()}",
                f"run.series={series.name}"]
        for budget in series.budgets:
            _steps(cfg, budget, f"{series.name}: budget")
        if series.schedule == "cosine":
            for b in series.budgets:
                run_id = f"{prefix}/D={b}"
                self.runs.append(RunSpec(run_id, "train", series.name, series.method,
                                         common + data + ["schedule.kind=cosine", f"run.train_tokens={b}"],
                                         after, b, fpt * b, data_point=True))
                finals[b] = ckpt_path(run_id, b // tps)
            return finals
        warmup = cfg.schedule.warmup_steps
        points = {b: branch_step(b // tps, self.exp.decay_frac, warmup) for b in series.budgets}
        trunk = f"{prefix}/trunk"
        last = max(points.values())
        self.runs.append(RunSpec(
            trunk, "train", series.name, series.method,
            common + data + ["schedule.kind=constant", f"run.train_tokens={last * tps}",
                             f"run.save_tokens=[{', '.join(str(p * tps) for p in sorted(set(points.values())))}]",
                             "run.keep_last=1", "run.write_record=false"], after, last * tps,
            fpt * last * tps))
        for b in series.budgets:
            run_id = f"{prefix}/D={b}"
            self.runs.append(RunSpec(
                run_id, "train", series.name, series.method,
                common + data + ["schedule.kind=wsd", f"schedule.decay_frac={self.exp.decay_frac}",
                                 f"run.train_tokens={b}"], [trunk], b - points[b] * tps,
                fpt * (b - points[b] * tps), resume_from=ckpt_path(trunk, points[b]), data_point=True))
            finals[b] = ckpt_path(run_id, b // tps)
        return finals

    def plan(self) -> list[RunSpec]:
        exp = self.exp
        model = exp.train.get("model", {})
        base_finals = self._series_runs(exp.base, exp.base.name, [], [], model)
        for s in exp.stage2:
            for d1 in (s.D1 or exp.base.budgets):
                start = base_finals[d1]
                base_run = start.split("/checkpoints/")[0]
                common, after = [f"data.replay={s.replay}"], [base_run]
                if s.method != "cpt":
                    grown = f"{s.name}/D1={d1}/grown"
                    self.runs.append(RunSpec(grown, "grow", s.name, s.method, [], [base_run], 0, 0.0,
                                             grow={"from": start, **s.growth}))
                    start, after = grown, [grown]
                    common += [f"model.{k}={'null' if v is None else str(v).lower() if isinstance(v, bool) else v}"
                               for k, v in grown_model(model, s.growth).items() if model.get(k) != v]
                self._series_runs(s, f"{s.name}/D1={d1}", common + [f"run.init_from={{root}}/{start}"],
                                  after, model)
        for s in exp.scratch:
            self._series_runs(s, s.name, [], [], model)
        return self.runs


def plan_experiment(exp: Experiment, dp: int = 1) -> list[RunSpec]:
    return Planner(exp, dp).plan()


def totals(runs: list[RunSpec]) -> tuple[int, float]:
    return sum(r.tokens for r in runs), sum(r.flops for r in runs)


def format_plan(runs: list[RunSpec]) -> str:
    lines = [f"{'run':48s} {'kind':5s} {'tokens':>12s} {'FLOPs':>10s}  after"]
    for r in runs:
        lines.append(f"{r.run_id:48s} {r.kind:5s} {r.tokens:>12,d} {r.flops:>10.2e}  {', '.join(r.depends_on)}")
    tokens, flops = totals(runs)
    lines.append(f"{len(runs)} runs, {tokens:,} training tokens, {flops:.3e} FLOPs "
                 f"({sum(r.data_point for r in runs)} data points)")
    return "\n".join(lines)


def n_params(exp: Experiment) -> int:
    return non_embedding_param_count(Config.from_dict(exp.train).model)

