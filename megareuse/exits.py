"""What a command's exception means: one line on stderr and the process's exit code.

Every user error (bad config, data, checkpoint, launch or sweep request) ends with one line and
exit code 2, and nothing is written before the inputs have been checked. Training stops that
are not input errors exit with their own codes (megareuse/engine/guard.py): 75 checkpointed
after SIGTERM/SIGUSR1 (requeue), 3 stopped by the divergence guard, 124 another rank died or hung.
Shared by the ``megareuse`` CLI and the SLURM task entry (``python -m megareuse.sweep.slurm task``).
"""
from __future__ import annotations

import sys
from typing import Callable

EXIT_USER_ERROR = 2


def user_errors() -> tuple[type[BaseException], ...]:
    from megareuse.config import ConfigError
    from megareuse.data import CorruptDatasetError, PrepareError
    from megareuse.engine.checkpoint import CheckpointError
    from megareuse.engine.inputs import DataError
    from megareuse.engine.metrics import MetricsError
    from megareuse.parallel.launch import LaunchError
    from megareuse.sweep.local import SweepError
    return (ConfigError, DataError, CheckpointError, CorruptDatasetError, PrepareError,
            FileNotFoundError, LaunchError, SweepError, MetricsError)


def run_stops() -> dict[type[BaseException], int]:
    from megareuse.engine import guard
    from megareuse.engine.watchdog import RankFailure
    return {guard.Preempted: guard.EXIT_REQUEUE, guard.DivergenceError: guard.EXIT_DIVERGED,
            RankFailure: guard.EXIT_RANK_FAILURE}


def one_line(command: str, exc: BaseException) -> None:
    message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    print(f"megareuse {command}: {message}", file=sys.stderr, flush=True)


def guarded(command: str, fn: Callable[[], int]) -> int:
    """Run a command; its user errors and training stops become one line and an exit code."""
    stops = run_stops()
    try:
        return fn()
    except user_errors() as exc:
        one_line(command, exc)
        return EXIT_USER_ERROR
    except tuple(stops) as exc:
        one_line(command, exc)
        return next(code for kind, code in stops.items() if isinstance(exc, kind))
