"""Reliability policy of the training loop: stop signals, the divergence guard, loss spikes.

* ``StopSignals``: SIGTERM / SIGUSR1 (SLURM's warning before the time limit, or preemption)
  only set a flag in the handler. At each log, eval and save step the ranks agree on it with
  one host all-reduce (MAX over the world), so all of them checkpoint the same step and exit with
  ``EXIT_REQUEUE`` (75, EX_TEMPFAIL), which the SLURM scripts turn into a requeue.
* ``DivergenceGuard``: a step whose loss or gradient norm is not finite is skipped (the optimizer
  does not apply it). ``max_skips`` skips inside ``skip_window`` steps trigger ``on_divergence``:
  roll back to the last checkpoint with the learning rate multiplied by ``lr_factor`` (the data
  cursor is not rewound, so the batches that diverged are not replayed), or stop.
* ``SpikeDetector``: a train loss above ``spike_ratio`` x the running median of the last
  ``spike_window`` losses is logged as a spike.

Exit codes of ``megareuse train``: 0 done, 2 bad input, ``EXIT_DIVERGED`` (3) stopped by the
divergence guard, ``EXIT_REQUEUE`` (75) checkpointed after a stop signal, ``EXIT_RANK_FAILURE``
(124) a rank died or hung (megareuse/engine/watchdog.py).
"""
from __future__ import annotations

import bisect
import signal
import threading
from collections import deque
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megareuse.config import GuardConfig

EXIT_DIVERGED = 3
EXIT_REQUEUE = 75
EXIT_RANK_FAILURE = 124


class Preempted(Exception):
    """Training stopped at a step boundary after a stop signal; a checkpoint was written."""

    def __init__(self, signal_name: str, step: int, checkpoint: str):
        super().__init__(f"stopped by {signal_name} at step {step}; checkpoint {checkpoint}; "
                         f"continue with --resume auto (exit code {EXIT_REQUEUE}: requeue)")
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint


class DivergenceError(RuntimeError):
    """The divergence guard gave up (one line: what happened and what to change)."""


@dataclass
class GuardState:
    """What the guard carries across checkpoints (saved in trainer.pt)."""
    lr_scale: float = 1.0  # product of the lr_factor of every rollback so far
    skipped_steps: int = 0  # steps skipped for a non-finite loss or gradient norm (whole run)
    rollbacks: int = 0
    spikes: int = 0


class StopSignals:
    """Turn the configured signals into a flag that all ranks agree on at step boundaries."""

    def __init__(self, names: list[str]):
        self.received: Optional[int] = None
        self._previous: dict[int, object] = {}
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be installed from the main thread
        for name in names:
            signum = getattr(signal, name)
            self._previous[signum] = signal.signal(signum, self._handler)

    def _handler(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum

    def agreed(self, group=None) -> Optional[str]:
        """The signal any rank received (collective when distributed), or None. A host tensor:
        on CUDA the group's gloo backend carries it (parallel/backend.py), not NCCL."""
        code = torch.tensor([self.received or 0], dtype=torch.int64, device="cpu")
        if dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(code, op=dist.ReduceOp.MAX, group=group)
        return signal.Signals(int(code)).name if int(code) else None

    def close(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()


class SpikeDetector:
    """Running median of the last ``window`` finite train losses."""

    MIN_HISTORY = 10

    def __init__(self, window: int, ratio: float):
        self.window, self.ratio = window, ratio
        self._recent: deque[float] = deque()
        self._sorted: list[float] = []

    def median(self) -> float:
        n = len(self._sorted)
        return 0.5 * (self._sorted[(n - 1) // 2] + self._sorted[n // 2])

    def observe(self, loss: float) -> Optional[float]:
        """Record ``loss``; return the running median when ``loss`` is a spike against it."""
        spike = None
        if self.ratio > 0 and len(self._sorted) >= min(self.MIN_HISTORY, self.window):
            median = self.median()
            if loss > self.ratio * median:
                spike = median
        self._recent.append(loss)
        bisect.insort(self._sorted, loss)
        if len(self._recent) > self.window:
            old = self._recent.popleft()
            del self._sorted[bisect.bisect_left(self._sorted, old)]
        return spike


class DivergenceGuard:
    """Counts skipped steps in a sliding window and decides: continue, rollback or stop."""

    def __init__(self, cfg: GuardConfig, state: Optional[GuardState] = None):
        self.cfg = cfg
        self.state = state or GuardState()
        self._skips: deque[int] = deque()  # steps of recent skips
        self.spikes = SpikeDetector(cfg.spike_window, cfg.spike_ratio)

    def on_skip(self, step: int) -> Optional[str]:
        """Count a skipped step; returns None (go on), "rollback" or "stop"."""
        self.state.skipped_steps += 1
        self._skips.append(step)
        while self._skips and self._skips[0] <= step - self.cfg.skip_window:
            self._skips.popleft()
        if len(self._skips) < self.cfg.max_skips:
            return None
        self._skips.clear()
        if self.cfg.on_divergence == "rollback" and self.state.rollbacks < self.cfg.max_rollbacks:
            return "rollback"
        return "stop"

    def rolled_back(self) -> None:
        self.state.rollbacks += 1
        self.state.lr_scale *= self.cfg.lr_factor

    def stop_message(self, step: int) -> str:
        c = self.cfg
        why = ("guard.on_divergence = 'stop'" if c.on_divergence == "stop"
               else f"{self.state.rollbacks} rollbacks already (guard.max_rollbacks = {c.max_rollbacks})")
        return (f"training diverged: {c.max_skips} steps with a non-finite loss or gradient norm within "
                f"{c.skip_window} steps (at step {step}), {why}; lower optim.lr, raise optim.grad_clip "
                f"or check the data, then continue with --resume auto")
