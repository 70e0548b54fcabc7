"""Stage 2 from a checkpoint: continual pretraining (CPT) or training after growth.

``run.init_from`` names a base checkpoint (or one written by `megareuse grow`). Stage 2 loads its
consolidated weights, re-warms the learning rate to its peak and decays it over the stage's own
token budget D2 (counted from zero), starts the optimizer fresh unless ``run.keep_optimizer``,
reads D1 from the checkpoint's metadata, and can replay a share ``data.replay`` of samples from
the base run's training blend next to the new domain.
"""
from __future__ import annotations

import dataclasses

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from megareuse.config import Config, ModelConfig
from megareuse.engine import checkpoint as ckpt


@dataclass(frozen=True)
class InitSource:
    """What stage 2 starts from, read and checked from a checkpoint's metadata."""

    path: Path
    meta: dict[str, Any]
    D1: int  # tokens the base model was trained on
    stage: str  # "cpt" (from a base checkpoint) or "grow" (from a grown one)
    method: str  # "cpt", or the growth operator ("width", "stack", "identity", ...)
    base_train: dict[str, float]  # the base run's training blend (domain -> weight)

    def describe(self) -> dict[str, Any]:
        return {"path": str(self.path), "stage": self.meta.get("stage"), "D1": self.D1,
                "method": self.method, "step": self.meta.get("step"),
                "growth": self.meta.get("growth")}


def model_diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Fields where a checkpoint's model config differs from the run's, one string each.

    ``ModelConfig.RUNTIME_FIELDS`` (attention backend, activation checkpointing, loss
    implementation) are not part of the model's shape and are ignored. A field the checkpoint
    does not record (saved before the field existed) has its default value.
    """
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    return [f"model.{k}: checkpoint {saved.get(k, defaults.get(k))!r} vs config {v!r}"
            for k, v in current.items()
            if k not in ModelConfig.RUNTIME_FIELDS and saved.get(k, defaults.get(k)) != v]


def open_init_source(path: str | Path, cfg: Config, tokenizer_sha256: str) -> InitSource:
    """Verify ``path`` and check it fits the run: same model shape, same tokenizer."""
    path = Path(path)
    problem = ckpt.verify_checkpoint(path)
    if problem:
        raise ckpt.CheckpointError(f"run error: run.init_from = {str(path)!r}: {problem}; accepted a "
                                   "complete checkpoint directory")
    meta = ckpt.read_meta(path)
    diff = model_diff(meta["config"]["model"], asdict(cfg.model))
    if diff:
        raise ckpt.CheckpointError(f"run error: run.init_from = {str(path)!r} holds another model "
                                   f"shape: {'; '.join(diff)}")
    saved_sha = meta.get("tokenizer", {}).get("sha256")
    if saved_sha != tokenizer_sha256:
        raise ckpt.CheckpointError(
            f"run error: run.init_from = {str(path)!r} was trained with another tokenizer (sha256 "
            f"{str(saved_sha)[:12]}...) than this run's ({tokenizer_sha256[:12]}..., data.tokenizer or data.dir's); "
            "accepted data prepared with the base model's tokenizer (its copy is in the checkpoint)")
    # a base checkpoint has D2 = 0; a stage-2 checkpoint used as a base saw D1 + D2 tokens
    d1 = int(meta.get("D1") or 0) + int(meta.get("D2") or 0)
    if d1 <= 0:
        raise ckpt.CheckpointError(f"run error: run.init_from = {str(path)!r} records no training "
                                   "tokens (D1); accepted a trained base checkpoint")
    growth = meta.get("growth")
    stage = "grow" if growth else "cpt"
    method = growth["operator"] if growth else "cpt"
    base_train = meta["config"]["data"]["train"]
    return InitSource(path, meta, d1, stage, method, dict(base_train))


def replay_blend(train: dict[str, float], replay: float, base_train: dict[str, float]) -> dict[str, float]:
    """The stage-2 training blend: the new domains with total weight ``1 - replay`` and the base
    run's blend with total weight ``replay`` (a domain in both gets the sum)."""
    if replay == 0:
        return dict(train)
    new_total, base_total = sum(train.values()), sum(base_train.values())
    blend = {d: (1 - replay) * w / new_total for d, w in train.items()}
    for domain, weight in base_train.items():
        blend[domain] = blend.get(domain, 0.0) + replay * weight / base_total
    return blend
