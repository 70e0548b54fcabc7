"""Checkpoint saving that lets training go on (``run.async_save``).

A save has a part on the training thread and a part each rank does alone. On the training thread
each rank copies its own share of the state (its chunks of the fp32 weights and Adam moments,
engine/fragments.py ``collect``) to host memory, pinned on CUDA: nothing is gathered and no rank
waits for another. The rest runs on a background thread per rank while the next steps train:
writing that share to the rank's file, hashing and fsyncing it, then handing its entry (size,
sha256, chunks) to rank 0 through a small ``.hashes-rank<r>.json`` file in the checkpoint's
temporary directory; rank 0's thread, once every rank's entry is in, writes the index,
trainer.pt, meta.json, manifest.json, renames the directory into place and applies retention.

Crash safety is the synchronous save's: nothing is renamed into place before every file is on
disk and hashed, so a kill at any point leaves the previous checkpoints and a ``.tmp-step_*``
directory that the next start deletes. ``PendingSave.wait`` joins the thread and raises what it
raised (a full disk is the usual one-line CheckpointError); the trainer waits before the next
save, a rollback, the end of the run and on every way out.
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

from megareuse.atomic import write_text_atomic
from megareuse.engine import checkpoint as ckpt

HASHES = ".hashes-rank{rank}.json"


class PendingSave:
    """One checkpoint finishing on a background thread of this rank."""

    def __init__(self, step: int, work: Callable[[], Optional[Path]], root: Path):
        self.step, self.error, self.path = step, None, None
        self.started = time.perf_counter()
        self.seconds: Optional[float] = None

        def run() -> None:
            try:
                with ckpt.space_checked(root, step):  # a full disk: partial copy removed, one line
                    self.path = work()
            except BaseException as exc:  # raised again by wait(), on the training thread
                self.error = exc
            self.seconds = time.perf_counter() - self.started

        self.thread = threading.Thread(target=run, name=f"megareuse-save-{step}", daemon=True)
        self.thread.start()

    def wait(self, timeout: Optional[float] = None) -> Optional[Path]:
        """The committed checkpoint (rank 0; None elsewhere), or the thread's error raised."""
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise ckpt.CheckpointError(f"checkpoint error: the background write of step {self.step} "
                                       f"did not finish within {timeout:.0f} s")
        if self.error is not None:
            raise self.error
        return self.path


def publish_hashes(tmp: Path, rank: int, entries: dict[str, Any]) -> None:
    """This rank's manifest entries for the files it wrote, for rank 0 to collect."""
    write_text_atomic(tmp / HASHES.format(rank=rank), json.dumps(entries))  # never read half-written


def collect_hashes(tmp: Path, world_size: int, timeout_s: float) -> dict[str, Any]:
    """Every rank's published entries (rank 0), waiting up to ``timeout_s`` for them; the
    hash files are removed so they are not part of the checkpoint."""
    deadline = time.monotonic() + timeout_s
    entries: dict[str, Any] = {}
    for rank in range(world_size):
        file = tmp / HASHES.format(rank=rank)
        while not file.is_file():
            if time.monotonic() > deadline:
                raise ckpt.CheckpointError(f"checkpoint error: rank {rank} did not finish writing its part of "
                                           f"{tmp.name} within {timeout_s:.0f} s (parallel.timeout_s)")
            time.sleep(0.02)
        part = json.loads(file.read_text())
        if "error" in part:
            raise ckpt.CheckpointError(f"checkpoint error: rank {rank} could not write its part of {tmp.name}: "
                                       f"{part['error']}")
        entries.update(part)
        file.unlink()
    return entries
