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

Growth series from several base sizes (a table with several model sizes N, for the joint laws):
``bases`` lists further base series, each with a ``model`` mapping of model fields that differ
from the training config (``base`` and scratch series may carry one too); a stage-2 series names
the bases it starts from in ``bases`` (default: ``base`` alone) and then has the base's name in
its run ids (``stack/base_small/D1=131072/...``):

    bases:
      - {name: base_small, model: {d_model: 64, ffn_hidden: 160}, domains: {prose: 1}, D1: [262144]}
    stage2:
      - {name: stack, method: stack, bases: [base, base_small], domains: {prose: 1}, D1: [262144],
         D2: [131072, 524288], growth: {depth: 2}}

Any series may carry ``overrides``, training-config overrides for its runs only, e.g. a stage-2
peak LR of its own (``overrides: [optim.lr=1e-3]``); the keys the planner sets (data blend,
schedule, token budgets, init_from, replay) and model fields (use ``model`` or ``growth``) are
refused there.

With ``schedule: wsd`` (warmup-stable-decay, the default of every series) a series of token
budgets costs one constant-LR "trunk" run to the last branch point plus a short cooldown branch
per budget: the branch for budget D resumes the trunk's checkpoint at the step where D's own WSD
schedule starts to decay (the last ``decay_frac`` f of its steps) and decays to the end, the same
computation as an independent WSD run of D. ``schedule: cosine`` trains one independent run per
budget. Stage-2 series start from the base run at their D1 (``run.init_from``); growth series
first grow that checkpoint (`megareuse grow`). A wsd stage-2 series has one trunk per (series,
base, D1), from that checkpoint with the stage-2 re-warmup, and a branch per D2, each a data point
at (D1, D2): a D2 axis costs (1 - f) max(D2) + f sum(D2) per D1, against sum(D2) with cosine
(D2 doubling over 32x: 1.19x the longest run, against 1.97x).

Seed repeats (run-to-run noise): any trained series may run chosen cells again with other
data-order seeds, ``seeds: {count: 3, D1: [1048576], D2: [524288]}`` (stage 2; a base chooses by
``D1``, a scratch series by ``D``; an axis left out: all its values; ``seeds: 3``: every cell).
Repeat r = 2..count of run RUN is ``RUN/seed=r`` with ``data.seed`` + r - 1 (the series' own
data.seed): only the order of the training samples changes; the model's init (run.seed), the
validation data and a stage-2 run's starting checkpoint are the original's. A repeat follows its
series' protocol: wsd, a trunk of its own per (D1, r) (``.../trunk/seed=r``) to the last chosen
branch point with cooldowns at the chosen budgets (each an independent WSD run of its cell);
cosine, one run per chosen cell. `collect` adds ``seed`` and ``group`` (records.py).

A base series may instead list checkpoints that exist (published intermediate checkpoints of one
pretraining run, or earlier megareuse runs): ``checkpoints: [{path: DIR, D1: TOKENS}, ...]`` in
place of ``D1`` (paths relative to this file; an optional ``domains`` says what the base was
trained on, which replay needs). Each is imported (or linked) where a trained base's final
checkpoint would be and evaluated at D2 = 0 into a base run record; stage-2 series select among
the listed D1 values as usual. The rules and checks are in megareuse/sweep/bases.py.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Optional

import yaml

from megareuse.config import Config, ConfigError, ModelConfig, apply_overrides, read_yaml, read_yaml_mapping
from megareuse.sweep.spec import (_NAME, METHODS, SCHEDULES, Experiment, RunSpec, Series,  # noqa: F401
                                  _fail, _series_overrides, check_seed_d1, ckpt_path, parse_seeds)
from megareuse.model import flops_per_token, non_embedding_param_count
from megareuse.records import group_of, repeat_run_id

MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig))


def _model(raw: Any, where: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        _fail(where, raw, "a mapping of model fields, e.g. {d_model: 64, ffn_hidden: 160}")
    for key, value in raw.items():
        if key not in MODEL_FIELDS:
            _fail(f"{where}.{key}", value, "one of the model fields " + ", ".join(MODEL_FIELDS))
    return dict(raw)


def _series(raw: Any, where: str, budget_key: str, method: str, extra: tuple = ()) -> Series:
    if not isinstance(raw, dict):
        _fail(where, raw, "a mapping")
    known = {"name", "method", "domains", budget_key, "schedule", "replay", "growth", "D1", "overrides", "seeds",
             *extra}
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
                    D1=raw.get("D1"), model=_model(raw["model"], f"{where}.model") if "model" in raw else {})
    if "bases" in raw:
        names = raw["bases"]
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names) \
                or len(set(names)) != len(names):
            _fail(f"{where}.bases", names, "a non-empty list of distinct base series names")
        series.bases = list(names)
    if series.schedule not in SCHEDULES:
        _fail(f"{where}.schedule", series.schedule, "one of " + ", ".join(SCHEDULES))
    series.overrides = _series_overrides(raw.get("overrides", []), f"{where}.overrides")
    if raw.get("seeds") is not None:
        series.seeds = parse_seeds(raw["seeds"], f"{where}.seeds", budget_key, series.budgets, budget_key == "D2")
    return series


def _check_overrides(train: dict, s: Series, where: str) -> None:
    if not s.overrides:
        return
    try:
        Config.from_dict(apply_overrides(train, s.overrides)).validate()
    except ConfigError as exc:
        raise ConfigError(f"experiment error: {where}.overrides: {exc}") from None


def load_experiment(path: str | Path, overrides: list[str] = ()) -> Experiment:
    """Read and check an experiment file (one-line ExperimentError-style ConfigErrors)."""
    path = Path(path)
    raw = read_yaml_mapping(path, "experiment")
    known = {"name", "train_config", "overrides", "base", "bases", "stage2", "scratch", "decay_frac"}
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
    if not isinstance(raw.get("bases") or [], list):
        _fail("bases", raw["bases"], "a list of base series, each with a name, model, domains and D1")
    if not isinstance(raw.get("name", ""), str):
        _fail("name", raw["name"], "a string")
    train = apply_overrides(read_yaml(path.parent / raw["train_config"]),
                            list(raw.get("overrides", [])) + list(overrides))
    Config.from_dict(train).validate()
    bases = _bases(raw, train, path.parent)
    stage2 = [_series(s, f"stage2[{i}]", "D2", "cpt", ("bases",)) for i, s in enumerate(raw.get("stage2") or [])]
    for i, s in enumerate(stage2):
        if s.method not in METHODS:
            _fail(f"stage2[{i}].method", s.method, "one of " + ", ".join(METHODS))
        _check_stage2_bases(s, f"stage2[{i}]", bases)
    scratch = [_series(s, f"scratch[{i}]", "D", "scratch", ("model",))
               for i, s in enumerate(raw.get("scratch") or [])]
    for i, s in enumerate(scratch):
        s.method = "scratch"
        _check_model(train, s.model, f"scratch[{i}].model")
    for where, s in ([("base" if i == 0 else f"bases[{i - 1}]", b) for i, b in enumerate(bases)]
                     + [(f"stage2[{i}]", x) for i, x in enumerate(stage2)]
                     + [(f"scratch[{i}]", x) for i, x in enumerate(scratch)]):
        _check_overrides(train, s, where)
    names = [b.name for b in bases] + [s.name for s in stage2 + scratch]
    if len(set(names)) != len(names):
        _fail("name", names, "distinct series names")
    decay = float(raw.get("decay_frac", 0.2))
    if not 0 < decay < 1:
        _fail("decay_frac", decay, "a number in (0, 1)")
    return Experiment(str(raw.get("name", path.stem)), path, train, bases[0], stage2, scratch, decay, bases)


def _bases(raw: dict, train: dict, exp_dir: Path) -> list[Series]:
    """``base`` and the further ``bases``, each checked (distinct names, a valid model); a series
    with ``checkpoints`` lists checkpoints that exist (bases.py)."""
    from megareuse.sweep.bases import checkpoint_series

    def one(b: Any, where: str) -> Series:
        if isinstance(b, dict) and "checkpoints" in b:
            return checkpoint_series(b, where, exp_dir)
        return _series(b, where, "D1", "base", ("model",))
    bases = [one(raw.get("base"), "base")] + [one(b, f"bases[{i}]") for i, b in enumerate(raw.get("bases") or [])]
    for i, b in enumerate(bases):
        where = "base" if i == 0 else f"bases[{i - 1}]"
        b.method = "base"
        if i and b.name in [o.name for o in bases[:i]]:
            _fail(f"{where}.name", b.name, "a name no other base series has")
        _check_model(train, b.model, f"{where}.model")
    return bases


def _check_model(train: dict, model: dict, where: str) -> None:
    if not model:
        return
    try:
        Config.from_dict({**train, "model": {**train.get("model", {}), **model}}).validate()
    except ConfigError as exc:
        raise ConfigError(f"experiment error: {where}: {exc}") from None


def _check_stage2_bases(s: Series, where: str, bases: list[Series]) -> None:
    from megareuse.sweep.bases import check_replay

    known = {b.name: b for b in bases}
    if s.bases is not None and not set(s.bases) <= set(known):
        _fail(f"{where}.bases", s.bases, "a non-empty list of names from " + ", ".join(known))
    for name in s.bases or [bases[0].name]:
        check_replay(s, where, known[name])
        budgets = known[name].budgets
        if s.D1 is not None and not set(s.D1) <= set(budgets):
            label = "base.D1" if name == bases[0].name and s.bases is None else f"the D1 of base {name}"
            _fail(f"{where}.D1", s.D1, f"a subset of {label} {budgets}")
    starts = [set(s.D1 or known[name].budgets) for name in s.bases or [bases[0].name]]
    check_seed_d1(s.seeds, where, sorted(set.intersection(*starts)))


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


class Planner:
    def __init__(self, exp: Experiment, dp: int = 1):
        self.exp, self.dp = exp, dp
        self.runs: list[RunSpec] = []
        self.producer: dict[str, str] = {}  # a checkpoint base's checkpoint -> the run making it

    def _cfg(self, overrides: list[str]) -> Config:
        return Config.from_dict(apply_overrides(self.exp.train, overrides))

    def _series_runs(self, series: Series, prefix: str, common: list[str], after: list[str],
                     model: dict[str, Any], blend: Optional[dict[str, float]] = None,
                     d1: Optional[int] = None) -> dict[int, str]:
        """Plan one series (a stage-2 one: from the base at ``d1``), then its seed repeats;
        returns budget -> final checkpoint path of its run. ``blend``: the training blend written
        out (replay from a checkpoint base, bases.stage2_blend)."""
        common = list(common) + series.overrides
        cfg = self._cfg(common)
        cfg.run.micro_batch_size *= self.dp  # global batch for token accounting
        train = (yaml.safe_dump(series.domains, default_flow_style=True) if blend is None
                 else yaml.safe_dump(blend, default_flow_style=True, sort_keys=False)).strip()
        data = [f"data.train={train}", f"run.series={series.name}"]
        for budget in series.budgets:
            _steps(cfg, budget, f"{series.name}: budget")
        finals = self._budget_runs(series, prefix, common + data, after, series.budgets, cfg)
        chosen = [b for b in series.budgets if series.seeds and series.seeds.chosen(b, d1)]
        for r in range(2, series.seeds.count + 1) if chosen else ():  # its own trunk, its own seed
            self._budget_runs(series, prefix, common + data + [f"data.seed={cfg.data.seed + r - 1}"], after,
                              chosen, cfg, repeat=r)
        return finals

    def _budget_runs(self, series: Series, prefix: str, overrides: list[str], after: list[str],
                     budgets: list[int], cfg: Config, repeat: int = 1) -> dict[int, str]:
        """The runs of ``budgets``: one per budget (cosine), or a constant-LR trunk to the last
        branch point and a cooldown branch per budget (wsd). ``repeat`` r > 1 names them
        ``.../seed=r`` (records.repeat_run_id)."""
        tps, fpt = cfg.tokens_per_step, flops_per_token(cfg.model, cfg.data.seq_len)
        name = (lambda run_id: run_id) if repeat == 1 else (lambda run_id: repeat_run_id(run_id, repeat))
        finals = {}
        if series.schedule == "cosine":
            for b in budgets:
                run_id = name(f"{prefix}/D={b}")
                self.runs.append(RunSpec(run_id, "train", series.name, series.method,
                                         overrides + ["schedule.kind=cosine", f"run.train_tokens={b}"],
                                         after, b, fpt * b, data_point=True))
                finals[b] = ckpt_path(run_id, b // tps)
            return finals
        points = {b: branch_step(b // tps, self.exp.decay_frac, cfg.schedule.warmup_steps) for b in budgets}
        trunk = name(f"{prefix}/trunk")
        last = max(points.values())
        self.runs.append(RunSpec(
            trunk, "train", series.name, series.method,
            overrides + ["schedule.kind=constant", f"run.train_tokens={last * tps}",
                         f"run.save_tokens=[{', '.join(str(p * tps) for p in sorted(set(points.values())))}]",
                         "run.keep_last=1", "run.write_record=false"], after, last * tps, fpt * last * tps))
        for b in budgets:
            run_id = name(f"{prefix}/D={b}")
            self.runs.append(RunSpec(
                run_id, "train", series.name, series.method,
                overrides + ["schedule.kind=wsd", f"schedule.decay_frac={self.exp.decay_frac}",
                             f"run.train_tokens={b}"], [trunk], b - points[b] * tps,
                fpt * (b - points[b] * tps), resume_from=ckpt_path(trunk, points[b]), data_point=True))
            finals[b] = ckpt_path(run_id, b // tps)
        return finals

    def plan(self) -> list[RunSpec]:
        exp = self.exp
        from megareuse.sweep.bases import plan_checkpoints, stage2_blend

        model = exp.train.get("model", {})
        base_finals = {}
        for b in exp.bases:
            if b.checkpoints is not None:  # checkpoints that exist: import + evaluate steps
                base_finals[b.name] = plan_checkpoints(self, b, [])
                self.producer.update({path: path for path in base_finals[b.name].values()})
            else:
                base_finals[b.name] = self._series_runs(b, b.name, _model_overrides(model, {**model, **b.model}),
                                                        [], model)
        bases = {b.name: b for b in exp.bases}
        for s in exp.stage2:
            for base_name in s.bases or [exp.base.name]:
                where = s.name if s.bases is None else f"{s.name}/{base_name}"
                finals, base = base_finals[base_name], bases[base_name]
                for d1 in (s.D1 or sorted(finals)):
                    self._stage2_runs(s, f"{where}/D1={d1}", finals[d1], model, {**model, **base.model},
                                      stage2_blend(s, base), d1)
        for s in exp.scratch:
            self._series_runs(s, s.name, _model_overrides(model, {**model, **s.model}), [], model)
        return self.runs

    def _stage2_runs(self, s: Series, prefix: str, start: str, model: dict, base_model: dict,
                     blend: Optional[dict[str, float]] = None, d1: Optional[int] = None) -> None:
        """One stage-2 series from one base checkpoint (of ``d1`` tokens): grow it first unless the
        method is cpt. ``blend``: replay written out as the training blend (then data.replay is 0)."""
        base_run = self.producer.get(start, start.split("/checkpoints/")[0])
        replay = s.replay if blend is None else 0.0
        common, after, target = [f"data.replay={replay}"], [base_run], base_model
        if s.method != "cpt":
            grown = f"{prefix}/grown"
            self.runs.append(RunSpec(grown, "grow", s.name, s.method, [], [base_run], 0, 0.0,
                                     grow={"from": start, **s.growth}))
            start, after, target = grown, [grown], grown_model(base_model, s.growth)
        common += _model_overrides(model, target)
        self._series_runs(s, prefix, common + [f"run.init_from={{root}}/{start}"], after, model, blend, d1)


def _model_overrides(model: dict[str, Any], target: dict[str, Any]) -> list[str]:
    """model.<field>=<value> for every field where ``target`` differs from the training config's model."""
    return [f"model.{k}={'null' if v is None else str(v).lower() if isinstance(v, bool) else v}"
            for k, v in target.items() if model.get(k) != v]


def plan_experiment(exp: Experiment, dp: int = 1) -> list[RunSpec]:
    return Planner(exp, dp).plan()


def totals(runs: list[RunSpec]) -> tuple[int, float]:
    return sum(r.tokens for r in runs), sum(r.flops for r in runs)


def format_plan(runs: list[RunSpec]) -> str:
    lines = [f"{'run':48s} {'kind':8s} {'tokens':>12s} {'FLOPs':>10s}  after"]
    for r in runs:
        after = f"<- {r.source['path']}" if r.kind == "import" else ", ".join(r.depends_on)
        lines.append(f"{r.run_id:48s} {r.kind:8s} {r.tokens:>12,d} {r.flops:>10.2e}  {after}")
    tokens, flops = totals(runs)
    repeats = sum(r.data_point and group_of(r.run_id) != r.run_id for r in runs)
    lines.append(f"{len(runs)} runs, {tokens:,} training tokens, {flops:.3e} FLOPs "
                 f"({sum(r.data_point for r in runs)} data points"
                 + (f", {repeats} of them seed repeats" if repeats else "") + ")")
    return "\n".join(lines)


def n_params(exp: Experiment) -> int:
    return non_embedding_param_count(Config.from_dict(exp.train).model)

