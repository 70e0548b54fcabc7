"""Hang guard: heartbeats through the job's rendezvous store name a dead or stuck rank.

Every rank runs a daemon thread that writes ``megareuse/heartbeat/<rank>`` to the TCP store at
MASTER_ADDR:MASTER_PORT (torchrun's agent store, or rank 0's) every ``interval_s``: a beat
counter, the training step and phase the main thread last reported, its host and pid. Writes
only; a rank reads the others only when something has gone wrong:

* the main thread's collective raised (gloo: peer closed the connection, or the collective timed
  out after ``parallel.timeout_s``): ``diagnose()`` watches the heartbeats for two intervals and
  names the ranks whose beat stopped (dead or stopped process) or that lag behind the others
  (stuck inside a step), and the trainer exits with that message;
* the main thread made no progress for ``timeout_s`` + one interval (a collective that never
  returns, a stuck data read): a second thread diagnoses, prints the report and ends the
  process with ``EXIT_RANK_FAILURE``, because the main thread cannot be interrupted.

The heartbeat goes on while a rank diagnoses, so survivors that diagnose at the same time see
each other beating and blame only the silent or lagging ranks.

The store connection is this module's own client, and every operation on it runs in a helper
thread that is abandoned after a short timeout: a store that is gone, or behind a network that
dropped without closing the connection, is reported as unreachable instead of blocking the
report (a TCP store client can wait far longer than its configured timeout in that case).
"""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from datetime import timedelta
from typing import Any, Callable, Optional

import torch.distributed as dist

from megareuse.engine.guard import EXIT_RANK_FAILURE

PREFIX = "megareuse/heartbeat/"
REPORTED = "reported a rank failure"  # a rank's last phase when it diagnosed a failure and exits


class RankFailure(RuntimeError):
    """A rank died or hung; the message names it."""


class Watchdog:
    def __init__(self, rank: int, world_size: int, timeout_s: float, master_addr: str,
                 master_port: int, interval_s: Optional[float] = None,
                 on_hang: Callable[[int], None] = os._exit):
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.interval_s = interval_s or min(10.0, max(0.5, timeout_s / 6))
        self.address = f"{master_addr}:{master_port}"
        self._on_hang = on_hang
        self._op_timeout = max(5.0, 2 * self.interval_s)
        self._store = dist.TCPStore(master_addr, master_port, is_master=False, wait_for_workers=False,
                                    timeout=timedelta(seconds=self._op_timeout))
        self._host, self._pid = socket.gethostname(), os.getpid()
        self._beat = 0
        self.step, self.phase = 0, "start"
        self._progress_t = time.monotonic()
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one store operation at a time
        self._publisher: Optional[threading.Thread] = None
        self._thread = threading.Thread(target=self._loop, name="megareuse-watchdog", daemon=True)
        self._hang: Optional[threading.Thread] = None

    # ------------------------------------------------------------------ main thread
    def start(self) -> "Watchdog":
        self._store_op(self._publish_record)
        self._thread.start()
        return self

    def progress(self, step: int, phase: str) -> None:
        """The main thread reached ``phase`` of ``step`` (train, eval, save)."""
        self.step, self.phase, self._progress_t = step, phase, time.monotonic()

    def reporting(self) -> None:
        """The main thread reports a failure itself: no hang report from the thread."""
        self._hang = self._hang or threading.current_thread()

    def stop(self, reported: bool = False) -> None:
        """End the heartbeat and wait (bounded) for a beat still in flight: a daemon thread left
        inside a store call while the interpreter finalizes can abort the process at exit.
        ``reported``: this rank diagnosed a failure and is exiting; its last record says so, so
        peers still diagnosing do not take its silence for a second failure."""
        self._stop.set()
        self._join(self._thread)  # first: it is what starts beats
        self._join(self._publisher)
        if reported and self.phase != REPORTED:
            self.phase = REPORTED
            try:
                self._store_op(self._publish_record)
            except Exception:  # the store is gone: peers diagnose that themselves
                pass

    def _join(self, thread: Optional[threading.Thread]) -> None:
        if thread is not None and thread.is_alive() and threading.current_thread() is not thread:
            thread.join(timeout=self._op_timeout)

    # ------------------------------------------------------------------ store access
    def _store_op(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` (store calls) in a daemon thread; TimeoutError when it does not return soon."""
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                with self._lock:
                    box["value"] = fn()
            except Exception as exc:  # re-raised in the caller
                box["error"] = exc
        worker = threading.Thread(target=run, daemon=True, name="megareuse-watchdog-store")
        worker.start()
        worker.join(self._op_timeout + 1.0)
        if worker.is_alive():
            raise TimeoutError(f"no answer within {self._op_timeout + 1.0:.0f} s")
        if "error" in box:
            raise box["error"]
        return box.get("value")

    def _publish_record(self) -> None:
        self._beat += 1
        record = {"beat": self._beat, "step": self.step, "phase": self.phase, "host": self._host,
                  "pid": self._pid, "idle_s": round(time.monotonic() - self._progress_t, 1)}
        self._store.set(f"{PREFIX}{self.rank}", json.dumps(record))

    def _publish(self) -> None:
        """One heartbeat, fire and forget: skipped while the previous one is still in flight."""
        if self._publisher is not None and self._publisher.is_alive():
            return
        self._publisher = threading.Thread(target=self._try_publish, daemon=True,
                                           name="megareuse-watchdog-beat")
        self._publisher.start()

    def _try_publish(self) -> None:
        try:
            with self._lock:
                if not self._stop.is_set():
                    self._publish_record()
        except Exception:  # the store is gone: a diagnosis will say so
            pass

    # ------------------------------------------------------------------ heartbeat thread
    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._publish()
            idle = time.monotonic() - self._progress_t
            if idle > self.timeout_s + self.interval_s and self._hang is None:
                self._hang = threading.Thread(target=self._report_hang, args=(idle,), daemon=True,
                                              name="megareuse-watchdog-hang")
                self._hang.start()

    def _report_hang(self, idle: float) -> None:
        report = self.diagnose() or "no rank could be blamed"
        if self._stop.is_set():
            return  # the main thread finished or is reporting itself
        print(f"rank failure: rank {self.rank} made no progress for {idle:.0f} s "
              f"(step {self.step}, {self.phase}; parallel.timeout_s = {self.timeout_s:g}): "
              f"{report}", file=sys.stderr, flush=True)
        self._on_hang(EXIT_RANK_FAILURE)

    # ------------------------------------------------------------------ diagnosis
    def _read_all(self) -> dict[int, Optional[dict]]:
        def read() -> dict[int, Optional[dict]]:
            out: dict[int, Optional[dict]] = {}
            for rank in range(self.world_size):
                key = f"{PREFIX}{rank}"
                out[rank] = json.loads(self._store.get(key)) if self._store.check([key]) else None
            return out
        return self._store_op(read)

    def diagnose(self, watch_s: Optional[float] = None) -> Optional[str]:
        """Name the ranks that stopped beating or lag behind (None: every rank looks healthy)."""
        watch_s = 2 * self.interval_s + 0.5 if watch_s is None else watch_s
        try:
            first = self._read_all()
            time.sleep(watch_s)
            second = self._read_all()
        except Exception as exc:
            first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            return (f"the job's rendezvous store at {self.address} is unreachable ({first_line}): "
                    "the process or node holding it (rank 0's) died or is cut off")
        exiting = {r for r, info in second.items() if info is not None and info.get("phase") == REPORTED}
        silent = [r for r in range(self.world_size) if r != self.rank and r not in exiting and
                  (second[r] is None or first[r] is None or second[r]["beat"] == first[r]["beat"])]
        if silent:
            return "; ".join(self._describe(r, second[r] or first[r], f"sent no heartbeat for {watch_s:.0f} s "
                                                                      "(process dead or stopped)")
                             for r in silent)
        ahead = max(info["step"] for info in second.values())
        behind = [r for r, info in second.items() if info["step"] < ahead and r not in exiting]
        if behind:
            return "; ".join(self._describe(r, second[r], f"is stuck (alive, idle {second[r]['idle_s']:.0f} s) "
                                                          f"while other ranks reached step {ahead}")
                             for r in behind)
        return None

    @staticmethod
    def _describe(rank: int, info: Optional[dict], what: str) -> str:
        if info is None:
            return f"rank {rank} {what}; it never reported"
        return (f"rank {rank} (host {info['host']}, pid {info['pid']}) {what}; "
                f"last at step {info['step']}, {info['phase']}")
