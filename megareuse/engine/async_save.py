"""Checkpoint saving that lets training go on (``run.async_save``).

A save has a collective part and a part each rank can do alone. The collective part stays on
the training thread: DeepSpeed's ``save_checkpoint`` (whose files are only *staged* here: every
tensor copied to host memory, nothing written), and the layout-free weights and Adam moments,
gathered one tensor at a time and streamed to rank 0's files (no rank ever holds the whole
model, so they cannot be staged). The rest runs on a background thread per rank while the next
steps train: writing the staged DeepSpeed files, fsyncing and hashing them, and on rank 0,
once every rank's hashes are in (small ``.hashes-rank<r>.json`` files in the checkpoint's
temporary directory), trainer.pt, meta.json, manifest.json, the rename that commits the
checkpoint, and retention.

Crash safety is the synchronous save's: nothing is renamed into place before every file is on
disk and hashed, so a kill at any point leaves the previous checkpoints and a ``.tmp-step_*``
directory that the next start deletes. ``PendingSave.wait`` joins the thread and raises what it
raised (a full disk is the usual one-line CheckpointError); the trainer waits before the next
save, a rollback, the end of the run and on every way out.
"""
from __future__ import annotations

import copy
import json
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from megareuse.atomic import write_text_atomic
from megareuse.engine import checkpoint as ckpt

HASHES = ".hashes-rank{rank}.json"


def to_host(obj: Any) -> Any:
    """A copy of ``obj`` whose tensors are host tensors of their own (later in-place updates of
    the originals do not reach it); containers are rebuilt, other values deep-copied."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if type(obj) in (dict, OrderedDict):
        return type(obj)((k, to_host(v)) for k, v in obj.items())
    if type(obj) in (list, tuple):
        return type(obj)(to_host(v) for v in obj)
    try:
        return copy.deepcopy(obj)
    except Exception:  # noqa: BLE001 - an object that cannot be copied is kept (it is not a tensor)
        return obj


class StagingCheckpointEngine:
    """Stands in for DeepSpeed's checkpoint engine while a save is staged: ``save`` keeps a host
    copy of the state dict instead of writing it; everything else goes to the real engine."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.staged: list[tuple[Any, str]] = []

    def save(self, state_dict: Any, path: str) -> None:
        self.staged.append((to_host(state_dict), path))

    def preserves_storage_sharing(self) -> bool:
        return False  # to_host copies each tensor: DeepSpeed need not clone views first

    def commit(self, info: Any) -> bool:
        return True  # written (and committed by megareuse) in the background

    def is_decoupled(self) -> bool:
        return False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def take(self) -> list[tuple[Any, str]]:
        staged, self.staged = self.staged, []
        return staged


def stage_engine_state(engine: Any, directory: Path) -> list[tuple[Any, str]]:
    """Run DeepSpeed's ``save_checkpoint`` into ``directory`` (collective) with its files staged
    in host memory: [(state dict, path)] to write."""
    real = engine.checkpoint_engine
    staging = StagingCheckpointEngine(real)
    engine.checkpoint_engine = staging
    try:
        engine.save_checkpoint(str(directory), tag="state", save_latest=True)
    finally:
        engine.checkpoint_engine = real
    return staging.take()


def write_staged(staged: list[tuple[Any, str]]) -> list[Path]:
    """torch.save each staged state dict to its path, fsynced; the paths written."""
    written = []
    for state, path in staged:
        ckpt.write_object(Path(path).parent, Path(path).name, state)
        written.append(Path(path))
    return written


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
