"""Base series from checkpoints that already exist: a D1 axis without pretraining.

Several model families publish checkpoints along one pretraining run (TinyLlama 1.1B at 105B ..
3T tokens). A base series (``base`` or an entry of ``bases``) may list them instead of D1 budgets:

    base:
      checkpoints:
        - {path: /ckpt/tinyllama-105b, D1: 104857600000}   # a Hugging Face directory
        - {path: runs/old/base/D=524288/checkpoints/step_00000512, D1: 524288}  # a megareuse one
      domains: {prose: 0.7, code: 0.3}   # optional: what the base was trained on (replay needs it)

Paths are relative to the experiment file; D1 values are distinct positive token counts (any
order) and are the series' budgets, so a stage-2 series' ``D1:`` selects among them as usual.
``name`` and ``overrides`` are accepted; ``D1``, ``schedule``, ``model``, ``replay``, ``growth``,
``method`` and ``seeds`` are refused (the checkpoints are trained already; their model is what it is).

The planner turns each checkpoint into two steps (``plan_checkpoints``):

* ``import``, run id ``<base>/D=<D1>/checkpoints/step_<D1 // tokens per step>`` (the planned
  DP's global batch; rounded down where D1 is not a whole number of steps): where a trained
  base run would have put its final checkpoint, so every stage-2 series finds it exactly as it
  would a trained base's (``run.init_from``) and waits for this step alone. A Hugging Face
  directory is converted with ``import_hf`` (meta D1 = the listed D1, ``max_seq_len`` = the
  training config's); a megareuse checkpoint is linked there (a symlink: inputs are read, never
  written). Done when the checkpoint there verifies, so a resumed sweep does not import again.
* ``evaluate``, run id ``<base>/D=<D1>``: the validation loss of the checkpoint on ``data.valid``
  with the training config's evaluation settings (``run.eval_tokens``, ``run.micro_batch_size``,
  device, dtype, the model's own loss as the trainer computes it), written as the run record of
  a base at D1 (stage ``base``, D2 = 0, tokens = D1), so ``collect`` / ``fit`` / ``plan`` see it
  as they see a trained base's. Its ``base_source`` field names the checkpoint.

Checks, each one line naming the field and what is accepted (``check_source``; run before a
local sweep or ``--slurm`` writes anything, and again by the import step): the path exists and
is a Hugging Face directory (config.json) or a megareuse checkpoint (manifest.json + meta.json);
its model equals the training config's model (``engine.init_source.model_diff``: the stage-2 runs' model
is the checkpoint's, so the config must describe it; an HF config whose positions are fewer
than ``model.max_seq_len`` is refused too); a megareuse checkpoint's own D1 (meta D1 + D2) is
the listed D1 and, when ``domains`` is given, its training blend is ``domains``.

Replay. ``data.replay`` mixes the base run's training blend into stage 2: the trainer reads the
blend's domain names and weights from the checkpoint's meta.json (``config.data.train``) and
opens those domains afresh from the data directory (``engine.init_source.replay_blend``). It needs no
state of the base run (no sample cursor, no optimizer), so replay from a checkpoint base is
possible whenever its blend is known. An imported HF checkpoint's meta.json holds no real blend
(import_hf writes the defaults), so a stage-2 series with replay > 0 from a checkpoint base is
refused unless the base names its ``domains``; then the planner writes the blend out for the
stage-2 runs (``data.train`` = ``replay_blend(new domains, replay, base domains)``, in the order
the trainer's own replay uses, and ``data.replay`` = 0): the same datasets as replay from a
trained base of those domains, whatever the checkpoint's meta.json says.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from megareuse.atomic import symlink_atomic
from megareuse.config import Config, ConfigError, ModelConfig, apply_overrides
from megareuse.sweep.spec import _NAME, RunSpec, Series, _fail, _series_overrides, ckpt_path, is_done

SERIES_KEYS = ("name", "checkpoints", "domains", "overrides")
# keys of a trained base series that mean nothing for checkpoints that exist, and why
REFUSED = {"D1": "one of base D1 budgets (trained here) and checkpoints (that exist), not both",
           "schedule": "no schedule on a checkpoint base (its checkpoints are trained already)",
           "model": "no model on a checkpoint base (its model is the checkpoint's; set the training "
                    "config to it)",
           "replay": "no replay on a base series (stage-2 series replay)",
           "growth": "no growth on a base series (stage-2 series grow)",
           "method": "no method on a base series",
           "seeds": "no seeds on a checkpoint base (its checkpoints are trained already; repeat the "
                    "stage-2 cells that start from them instead)"}
ACCEPTED_PATH = ("a Hugging Face model directory (config.json + *.safetensors) or a megareuse checkpoint "
                 "directory (manifest.json + meta.json)")


@dataclass(frozen=True)
class CheckpointSpec:
    """One listed checkpoint: where it is (absolute) and how many tokens it was trained on."""
    path: str
    D1: int
    where: str  # the experiment field, e.g. base.checkpoints[1], for one-line errors


def checkpoint_series(raw: dict, where: str, exp_dir: Path) -> Series:
    """A base series that lists ``checkpoints``: checked, paths made absolute, budgets = the D1s."""
    for key, value in raw.items():
        if key in REFUSED:
            _fail(f"{where}.{key}", value, REFUSED[key])
        if key not in SERIES_KEYS:
            _fail(f"{where}.{key}", value, "one of the keys " + ", ".join(SERIES_KEYS) + " (a checkpoint base)")
    listed = raw["checkpoints"]
    if not isinstance(listed, list) or not listed:
        _fail(f"{where}.checkpoints", listed, "a non-empty list of {path: DIR, D1: TOKENS}")
    specs = []
    for i, item in enumerate(listed):
        at = f"{where}.checkpoints[{i}]"
        if not isinstance(item, dict):
            _fail(at, item, "a mapping {path: DIR, D1: TOKENS}")
        for key in item:
            if key not in ("path", "D1"):
                _fail(f"{at}.{key}", item[key], "the keys path and D1")
        path, d1 = item.get("path"), item.get("D1")
        if not isinstance(path, str) or not path.strip():
            _fail(f"{at}.path", path, "a directory path (relative to the experiment file): " + ACCEPTED_PATH)
        if isinstance(d1, bool) or not isinstance(d1, int) or d1 <= 0:
            _fail(f"{at}.D1", d1, "a positive integer: the tokens the checkpoint was trained on")
        full = os.path.abspath(os.path.join(exp_dir, os.path.expanduser(path)))
        specs.append(CheckpointSpec(full, d1, at))
    d1s = [s.D1 for s in specs]
    if len(set(d1s)) != len(d1s):
        _fail(f"{where}.checkpoints", d1s, "distinct D1 values (one checkpoint per D1)")
    paths = [s.path for s in specs]
    if len(set(paths)) != len(paths):
        _fail(f"{where}.checkpoints", paths, "distinct paths")
    domains = raw.get("domains", {})
    if domains is None:
        domains = {}
    if not isinstance(domains, dict):
        _fail(f"{where}.domains", domains, "a mapping domain -> weight (the base's training blend), or none")
    for domain, weight in domains.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) \
                or weight <= 0:
            _fail(f"{where}.domains.{domain}", weight, "a finite number > 0 (the domain's share of the blend)")
    name = raw.get("name", "base")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        _fail(f"{where}.name", name, "a name of letters, digits, '_', '-' and '.' (it names run directories)")
    specs.sort(key=lambda s: s.D1)
    return Series(name=name, method="base", domains=dict(domains), budgets=[s.D1 for s in specs],
                  overrides=_series_overrides(raw.get("overrides", []), f"{where}.overrides"),
                  checkpoints=specs)


def check_replay(s: Series, where: str, base: Series) -> None:
    """Replay from a checkpoint base needs the base's training domains (module docstring)."""
    if base.checkpoints is not None and s.replay > 0 and not base.domains:
        _fail(f"{where}.replay", s.replay, f"0 from checkpoint base {base.name!r}, which names no training "
              f"domains (give it domains: {{DOMAIN: WEIGHT, ...}} so replay can read them from the data "
              "directory)")


def stage2_blend(s: Series, base: Series) -> Optional[dict[str, float]]:
    """The explicit training blend of a stage-2 series with replay from a checkpoint base (None
    otherwise): what the trainer's own replay would build, domains in the same order (the
    planner writes a series' domains sorted, and a trained base's blend likewise)."""
    if base.checkpoints is None or s.replay == 0:
        return None
    from megareuse.engine.init_source import replay_blend
    return replay_blend(dict(sorted(s.domains.items())), s.replay, dict(sorted(base.domains.items())))


def dump_domains(domains: dict[str, float]) -> str:
    """A blend as the planner writes ``data.train`` (flow style, domains sorted)."""
    return yaml.safe_dump(domains, default_flow_style=True).strip()


def plan_checkpoints(planner: Any, series: Series, common: list[str]) -> dict[int, str]:
    """The import and evaluate steps of a checkpoint base; returns D1 -> checkpoint run path."""
    common = list(common) + series.overrides
    cfg = planner._cfg(common)
    cfg.run.micro_batch_size *= planner.dp  # global batch: the step a trained base would be at
    tps = cfg.tokens_per_step
    data = [f"data.train={dump_domains(series.domains)}"] if series.domains else []
    finals = {}
    for spec in series.checkpoints or []:
        run_id = f"{series.name}/D={spec.D1}"
        final = ckpt_path(run_id, spec.D1 // tps)
        source = {"path": spec.path, "D1": spec.D1, "where": spec.where, "checkpoint": final,
                  "domains": dict(series.domains) or None}
        planner.runs.append(RunSpec(final, "import", series.name, "base", common, [], 0, 0.0, source=source))
        planner.runs.append(RunSpec(run_id, "evaluate", series.name, "base",
                                    common + data + [f"run.series={series.name}"], [final], 0, 0.0,
                                    source=source, data_point=True))
        finals[spec.D1] = final
    return finals


# --------------------------------------------------------------------------- checks
def source_format(path: Path) -> Optional[str]:
    """huggingface (config.json), megareuse (manifest.json + meta.json), or None."""
    if (path / "manifest.json").is_file() and (path / "meta.json").is_file():
        return "megareuse"
    if (path / "config.json").is_file():
        return "huggingface"
    return None


def _model(train: dict, overrides: list[str]) -> ModelConfig:
    return Config.from_dict(apply_overrides(train, overrides)).model


def check_source(source: dict[str, Any], model: ModelConfig) -> str:
    """Check one listed checkpoint against the experiment (module docstring); returns its format.
    Reads config.json or meta.json only: no weights."""
    from megareuse.engine.init_source import model_diff

    where, path, d1 = source["where"], Path(source["path"]), source["D1"]
    if not path.is_dir():
        problem = "does not exist" if not path.exists() else "is not a directory"
        raise ConfigError(f"experiment error: {where}.path = {str(path)!r} {problem}; accepted {ACCEPTED_PATH}")
    fmt = source_format(path)
    if fmt is None:
        raise ConfigError(f"experiment error: {where}.path = {str(path)!r} holds neither config.json nor "
                          f"manifest.json + meta.json; accepted {ACCEPTED_PATH}")
    if fmt == "huggingface":
        from megareuse.interop.errors import HFError
        from megareuse.interop.hf import model_config_from_hf
        from megareuse.interop.hf_data import read_json_object
        try:
            raw = read_json_object(path / "config.json", "a Hugging Face config.json")
            saved = model_config_from_hf(raw, max_seq_len=model.max_seq_len)
        except HFError as exc:
            raise ConfigError(f"experiment error: {where}.path = {str(path)!r}: {str(exc).splitlines()[0]}") from None
        positions = raw.get("max_position_embeddings")
        if isinstance(positions, int) and positions < model.max_seq_len:
            raise ConfigError(f"experiment error: {where}.path = {str(path)!r} was trained at "
                              f"max_position_embeddings = {positions} but model.max_seq_len = "
                              f"{model.max_seq_len}; accepted model.max_seq_len <= {positions}")
        saved_model = dataclasses.asdict(saved)
    else:
        from megareuse.engine import checkpoint as ckpt
        problem = ckpt.verify_checkpoint(path, checksums=False)
        if problem is not None:
            raise ConfigError(f"experiment error: {where}.path = {str(path)!r}: {problem}; accepted a complete "
                              "megareuse checkpoint directory")
        meta = ckpt.read_meta(path)
        saved_model = meta["config"]["model"]
        own = int(meta.get("D1") or 0) + int(meta.get("D2") or 0)
        if own != d1:
            raise ConfigError(f"experiment error: {where}.D1 = {d1}: accepted {own}, the tokens {path} records "
                              "(meta.json D1 + D2)")
        blend = meta["config"].get("data", {}).get("train")
        if source.get("domains") and blend != source["domains"]:
            base = where.rsplit(".checkpoints", 1)[0]
            raise ConfigError(f"experiment error: {base}.domains = {source['domains']!r}: accepted {blend!r}, "
                              f"the training blend {path} records (meta.json config.data.train)")
    diff = model_diff(saved_model, dataclasses.asdict(model))
    if diff:
        raise ConfigError(f"experiment error: {where}.path = {str(path)!r} holds another model than the "
                          f"training config's: {'; '.join(diff)}; accepted a checkpoint of the training "
                          "config's model (set train_config / overrides to its shape)")
    return fmt


def check_sources(train: dict, runs: list[RunSpec], root: Optional[Path] = None) -> None:
    """``check_source`` for every import step of ``runs`` (those already done under ``root`` are
    skipped: their source may be gone by now)."""
    for run in runs:
        if run.kind == "import" and not (root is not None and is_done(root, run)):
            check_source(run.source, _model(train, run.overrides))


# --------------------------------------------------------------------------- execution
def import_checkpoint(train: dict, root: Path, run: RunSpec) -> str:
    """The import step: ``import_hf`` into the run path, or a symlink to a megareuse checkpoint."""
    from megareuse.engine.checkpoint import verify_checkpoint
    from megareuse.interop.errors import HFError

    out = Path(root) / run.run_id
    model = _model(train, run.overrides)
    if out.is_dir() and verify_checkpoint(out, checksums=False) is None:
        return run.run_id  # imported before
    if out.is_symlink():  # a link whose checkpoint is gone or changed: not ours to repair
        raise ConfigError(f"experiment error: {run.source['where']}.path: {out} links to {os.readlink(out)}, "
                          "which is not a complete checkpoint any more; accepted the checkpoint back in place "
                          f"(or remove the link {out} to link again)")
    fmt = check_source(run.source, model)
    src = Path(run.source["path"])
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "megareuse":
        symlink_atomic(out, src)
        return run.run_id
    from megareuse.interop.hf import import_hf
    try:
        import_hf(src, out, d1=run.source["D1"], max_seq_len=model.max_seq_len)
    except HFError as exc:
        raise ConfigError(f"experiment error: {run.source['where']}.path = {str(src)!r}: "
                          f"{str(exc).splitlines()[0]}") from None
    return run.run_id


_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def evaluate_base(train: dict, root: Path, run: RunSpec, emit: Callable[[str], None] = print) -> str:
    """The evaluate step: the checkpoint's validation losses as the record of a base at D1, D2 = 0."""
    import torch

    from megareuse.engine import checkpoint as ckpt
    from megareuse.engine.ds import resolve_device
    from megareuse.engine.evaluate import evaluate
    from megareuse.engine.inputs import open_validation_data
    from megareuse.engine.weights import load_state_dict
    from megareuse.model import GPT, flops_per_token, non_embedding_param_count, param_count
    from megareuse.engine.init_source import model_diff
    from megareuse.records import build_record, write_record

    root = Path(root)
    out = root / run.run_id
    path = root / run.source["checkpoint"]
    where = run.source["where"]
    cfg = Config.from_dict(apply_overrides(train, run.overrides + [f"run.out_dir={out}"])).validate()
    problem = ckpt.verify_checkpoint(path)
    if problem is not None:
        raise ckpt.CheckpointError(f"sweep error: {where}: the imported checkpoint {path} is not usable: {problem}")
    meta = ckpt.read_meta(path)
    diff = model_diff(meta["config"]["model"], dataclasses.asdict(cfg.model))
    if diff:
        raise ConfigError(f"experiment error: {where}.path: {path} holds another model than the training "
                          f"config's: {'; '.join(diff)}")
    t0 = time.perf_counter()
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    tok, valid = open_validation_data(cfg.data, cfg.model)  # an evaluation reads no training split
    saved_sha = (meta.get("tokenizer") or {}).get("sha256")
    if saved_sha != tok.tokenizer.sha256:
        raise ckpt.CheckpointError(
            f"experiment error: {where}.path = {run.source['path']!r} was trained with another tokenizer (sha256 "
            f"{str(saved_sha)[:12]}...) than data.dir's ({tok.tokenizer.sha256[:12]}...); accepted data "
            "prepared with the checkpoint's tokenizer (megareuse prepare --tokenizer CHECKPOINT_DIR)")
    device = resolve_device(cfg.run.device)
    with torch.device(device):
        model = GPT(cfg.model)
    model.load_state_dict(load_state_dict(path, cfg.model.tie_embeddings, device, cfg.model))
    model.to(getattr(torch, _DTYPES.get(cfg.run.dtype, "float32"))).eval()

    def batch_loss(batch: torch.Tensor) -> torch.Tensor:  # the trainer's: the model's own head
        return model(batch[:, :-1], batch[:, 1:])

    losses = {d: evaluate(batch_loss, ds, cfg.run.eval_tokens, cfg.run.micro_batch_size, device)
              for d, ds in valid.items()}
    seconds = time.perf_counter() - t0
    d1 = int(run.source["D1"])
    step = int(Path(run.source["checkpoint"]).name.removeprefix("step_"))
    history = [{"step": step, "tokens": d1, **{f"valid_loss/{d}": v for d, v in losses.items()}}]
    record = build_record(
        run_id=out.name, series=cfg.run.series or run.series, stage="base", method="base",
        n_params=non_embedding_param_count(cfg.model), n_total=param_count(cfg.model), d1=d1, d2=0,
        tokens=d1, tokens_per_domain={}, history=history, wall_s=0.0,
        flops_per_token=flops_per_token(cfg.model, cfg.data.seq_len), config=cfg.to_dict(), out_dir=out,
        checkpoint=path, init_from=None)
    record["base_source"] = {"path": run.source["path"], "format": "megareuse" if path.is_symlink() else
                             "huggingface", "D1": d1, "domains": run.source.get("domains"), "evaluate_s": seconds}
    out.mkdir(parents=True, exist_ok=True)
    write_record(out, record)
    emit("eval " + json.dumps({"D1": d1, **{f"valid_loss/{d}": v for d, v in losses.items()}}))
    return run.run_id
