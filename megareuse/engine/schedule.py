"""Learning-rate schedules as pure functions of the step.

Every schedule warms up linearly from ``lr / warmup`` to the peak ``lr`` over ``warmup_steps``
steps, then:
- ``cosine``: cosine decay to ``min_lr_ratio * lr`` at the last step;
- ``constant``: stays at the peak;
- ``wsd`` (warmup-stable-decay): stays at the peak until the last ``decay_frac`` of the steps,
  then decays linearly to ``min_lr_ratio * lr``. A branch that starts its cooldown at step s of
  a long constant-LR run is the same schedule with ``total_steps`` = s + decay steps.

Steps are 0-based: ``lr_at(0)`` is the learning rate of the first optimizer step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from megareuse.config import ScheduleConfig


@dataclass(frozen=True)
class LRSchedule:
    kind: str
    lr: float
    total_steps: int
    warmup_steps: int
    min_lr_ratio: float = 0.1
    decay_frac: float = 0.2

    def __post_init__(self) -> None:
        if self.kind not in ScheduleConfig.KINDS:
            raise ValueError(f"schedule kind {self.kind!r}: accepted one of {', '.join(ScheduleConfig.KINDS)}")
        if self.total_steps <= 0:
            raise ValueError(f"schedule total_steps = {self.total_steps}: accepted a positive integer")

    @classmethod
    def from_config(cls, cfg: ScheduleConfig, lr: float, total_steps: int) -> "LRSchedule":
        warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
        return cls(cfg.kind, lr, total_steps, warmup, cfg.min_lr_ratio, cfg.decay_frac)

    @property
    def decay_start(self) -> int:
        """First step of the WSD decay phase (never inside the warmup)."""
        decay_steps = max(1, round(self.decay_frac * self.total_steps))
        return max(self.warmup_steps, self.total_steps - decay_steps)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        min_lr = self.min_lr_ratio * self.lr
        if self.kind == "constant":
            return self.lr
        if self.kind == "cosine":
            span = self.total_steps - 1 - self.warmup_steps
            progress = 1.0 if span <= 0 else min(1.0, (step - self.warmup_steps) / span)
            return min_lr + 0.5 * (self.lr - min_lr) * (1 + math.cos(math.pi * progress))
        start = self.decay_start
        if step < start:
            return self.lr
        span = self.total_steps - 1 - start
        progress = 1.0 if span <= 0 else min(1.0, (step - start) / span)
        return self.lr + (min_lr - self.lr) * progress
