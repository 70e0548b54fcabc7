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
from typing import Optional

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


@dataclass(frozen=True)
class StepClock:
    """Optimizer steps <-> training tokens of one run, across resumes at other batch sizes.

    ``segments``: (first step, tokens before it, tokens per step), ascending. A run starts with
    one segment; a resume whose global batch differs (another DP size, micro-batch or
    accumulation) appends one at the step it resumes from, so step numbers (checkpoint names,
    metrics) stay continuous while every schedule quantity stays where it was in tokens: the LR
    schedule is evaluated at ``tokens_before(step) / base_tokens_per_step`` "steps of the first
    segment" (``LRSchedule`` takes fractional steps), the budget and the pinned save points are
    token counts. With one segment that is exactly ``step``."""
    segments: tuple[tuple[int, int, int], ...]

    @classmethod
    def start(cls, tokens_per_step: int) -> "StepClock":
        return cls(((0, 0, int(tokens_per_step)),))

    @property
    def base_tokens_per_step(self) -> int:
        return self.segments[0][2]

    @property
    def tokens_per_step(self) -> int:
        return self.segments[-1][2]

    def _segment(self, step: int) -> tuple[int, int, int]:
        return next(s for s in reversed(self.segments) if s[0] <= step)

    def tokens_before(self, step: int) -> int:
        """Tokens trained before optimizer step ``step`` (0-based) begins."""
        first, tokens, per_step = self._segment(step)
        return tokens + (step - first) * per_step

    def step_of(self, tokens: int) -> Optional[int]:
        """The step after which exactly ``tokens`` have been trained, or None when no step ends there."""
        first, before, per_step = next(s for s in reversed(self.segments) if s[1] <= tokens)
        done, rest = divmod(tokens - before, per_step)
        return None if rest else first + done

    def schedule_step(self, step: int) -> float:
        """``step`` in steps of the first segment: where the LR schedule is evaluated."""
        if len(self.segments) == 1:
            return step
        return self.tokens_before(step) / self.base_tokens_per_step

    def resumed(self, step: int, tokens_per_step: int) -> "StepClock":
        """This clock continued from ``step`` at ``tokens_per_step`` per step."""
        if tokens_per_step == self.tokens_per_step:
            return self
        kept = tuple(s for s in self.segments if s[0] < step)
        return StepClock(kept + ((step, self.tokens_before(step), int(tokens_per_step)),))

    def to_list(self) -> list[list[int]]:
        return [list(s) for s in self.segments]

    @classmethod
    def from_list(cls, segments) -> "StepClock":
        return cls(tuple((int(a), int(b), int(c)) for a, b, c in segments))
