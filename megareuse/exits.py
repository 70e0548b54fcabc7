"""What a command's exception means: one line on stderr and the process's exit code.

Every user error (bad config, data, checkpoint, launch or sweep request) and every failure of
the environment (an OS error: a full disk, a read-only or permission-denied path) ends with one
line and exit code 2, and nothing is written before the inputs have been checked. Training stops
that are not input errors exit with their own codes (megareuse/engine/guard.py): 75 checkpointed
after SIGTERM/SIGUSR1 (requeue), 3 stopped by the divergence guard, 124 another rank died or
hung; Ctrl-C (SIGINT) exits 130. Running out of memory is one line and 2 too.
``MEGAREUSE_TRACEBACK=1`` shows the traceback as well.
Shared by the ``megareuse`` CLI and the SLURM task entry (``python -m megareuse.sweep.slurm task``).
"""
from __future__ import annotations

import os
import sys
import traceback
from typing import Callable

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


def user_errors() -> tuple[type[BaseException], ...]:
    """Every user error (megareuse/errors.py ``UserError``: each part of the package raises its
    own subclass) and the environment's OS errors."""
    from megareuse.errors import UserError
    return (UserError, OSError)


def run_stops() -> dict[type[BaseException], int]:
    from megareuse.engine import guard
    from megareuse.engine.watchdog import RankFailure
    return {guard.Preempted: guard.EXIT_REQUEUE, guard.DivergenceError: guard.EXIT_DIVERGED,
            RankFailure: guard.EXIT_RANK_FAILURE}


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _say(command: str, message: str, exc: BaseException | None = None) -> None:
    if exc is not None and os.environ.get("MEGAREUSE_TRACEBACK") == "1":
        traceback.print_exception(exc, file=sys.stderr)
    message = message.removeprefix(f"{command}: ")  # "megareuse prepare: prepare: ..." says it twice
    print(f"megareuse {command}: {message}", file=sys.stderr, flush=True)


def one_line(command: str, exc: BaseException) -> None:
    if isinstance(exc, OSError) and exc.errno is not None:  # raised by the OS, not by our checks
        from megareuse.paths import os_error_line
        _say(command, os_error_line(exc), exc)
    else:
        _say(command, _first_line(exc), exc)


def _no_space(exc: BaseException) -> bool:
    text = str(exc)
    return "No space left on device" in text or "os error 28" in text


def _out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    import torch
    text = str(exc)
    return isinstance(exc, torch.OutOfMemoryError) or "can't allocate memory" in text or "out of memory" in text.lower()


def guarded(command: str, fn: Callable[[], int], value_errors: bool = False) -> int:
    """Run a command; its user errors and training stops become one line and an exit code. The
    error classes load only when something is raised (``except`` evaluates its expression then):
    a command that needs no torch, like prepare, never imports it. ``value_errors``: the
    command's checks may also raise a plain ValueError (a number that does not parse, a growth
    factor that does not divide): that is a user error too."""
    try:
        return fn()
    except user_errors() + ((ValueError,) if value_errors else ()) as exc:
        one_line(command, exc)
        return EXIT_USER_ERROR
    except tuple(run_stops()) as exc:
        one_line(command, exc)
        return next(code for kind, code in run_stops().items() if isinstance(exc, kind))
    except Exception as exc:  # libraries' own wrappers of OS conditions (safetensors, torch)
        if _no_space(exc):
            _say(command, f"no space left on device ({_first_line(exc)[:300]}); free space and run the "
                 "same command again", exc)
            return EXIT_USER_ERROR
        if not _out_of_memory(exc):
            raise
        _say(command, f"out of memory ({_first_line(exc)[:300]}); accepted a smaller model, batch "
             "(run.micro_batch_size) or more sharding: `megareuse estimate` gives the memory a config needs", exc)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        hint = "; continue from the last complete checkpoint with --resume auto" if command == "train" else ""
        _say(command, f"interrupted (SIGINT){hint}")
        return EXIT_INTERRUPTED
