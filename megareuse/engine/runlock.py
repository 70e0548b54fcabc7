"""One training process tree per run directory: ``<out_dir>/.megareuse.lock``.

Rank 0 takes an exclusive ``flock`` on the lock file for the run's whole life and writes its
identity into it (host, pid, start time). A second training on the same ``run.out_dir`` finds
the lock held and stops with one line naming the holder; it writes nothing. The kernel drops a
flock when its process dies, however it dies, so a lock file whose lock nobody holds is stale:
its previous holder (a SIGKILL, a lost node) is reported and the lock taken over, never taken
from a live process. Released (file removed) when the run ends, on every exit path.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
import weakref
from pathlib import Path
from typing import Callable

from megareuse.engine.checkpoint import CheckpointError

NAME = ".megareuse.lock"


class RunLockError(CheckpointError):
    """run.out_dir is in use by another training (one line naming the holder)."""


class RunLock:
    def __init__(self, out_dir: Path, emit: Callable[[str], None] = print):
        self.path = Path(out_dir) / NAME
        created = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = self._acquire()
        previous = _read(fd)
        if previous:
            emit(f"note: {self.path} was left by {_describe(previous)}, which no longer holds it "
                 "(it ended without releasing it); taking it over")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                  "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode(), 0)
        os.fsync(fd)
        self._finalizer = weakref.finalize(self, _release, self.path, fd, created)

    def _acquire(self) -> int:
        for _ in range(5):  # the file can be removed by its releasing holder between open and flock
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _describe(_read(fd))
                os.close(fd)
                raise RunLockError(f"run error: run.out_dir = {str(self.path.parent)!r} is in use by {holder} "
                                   f"(lock {self.path}); accepted another run.out_dir, or wait for that "
                                   "run to end") from None
            try:
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)  # locked a file that was just removed: take the new one
        raise RunLockError(f"run error: could not take the lock {self.path}: it kept being replaced")

    def release(self) -> None:
        """Remove the lock file and drop the lock (idempotent: a finalizer runs once)."""
        self._finalizer()


def _release(path: Path, fd: int, created: bool) -> None:
    try:
        path.unlink(missing_ok=True)  # while still holding it: nobody can take a half-removed lock
    finally:
        os.close(fd)
    if created:  # a run that failed before writing anything leaves no empty directory behind
        try:
            path.parent.rmdir()
        except OSError:
            pass


def _read(fd: int) -> dict:
    try:
        data = os.pread(fd, 4096, 0)
        return json.loads(data) if data.strip() else {}
    except (OSError, ValueError):
        return {"unreadable": True}


def _describe(info: dict) -> str:
    if not info or info.get("unreadable"):
        return "another process (lock file unreadable)"
    return f"pid {info.get('pid')} on host {info.get('host')} (since {info.get('since')})"
