"""Atomic, self-describing checkpoints.

Layout of a run directory::

    <out_dir>/checkpoints/step_00000100/   model.safetensors, optimizer.safetensors, trainer.pt,
                                           deepspeed/, tokenizer.model, meta.json,
                                           manifest.json (written last)
    <out_dir>/checkpoints/.tmp-step_00000100-<pid>/   a write in progress (ignored)

A checkpoint is written into a temporary directory, every file fsynced, ``manifest.json`` (size
and sha256 of every file) written last, and the directory renamed into place, so a crash at any
point leaves either the complete checkpoint or something ``--resume`` ignores. ``meta.json``
carries what makes a result traceable: stage, D1, D2, tokens seen, config, tokenizer, git
revision.
"""
from __future__ import annotations

import errno
import functools
import json
import os
import re
import shutil
import subprocess
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from megareuse.atomic import file_sha256, fsync_dir, publish_dir, write_synced  # noqa: F401  (file_sha256: re-exported)
from megareuse.errors import UserError
from megareuse.paths import disk_free, input_problem

MANIFEST = "manifest.json"
TOKENIZER_COPIES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json")  # copied into checkpoints
META = "meta.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, incomplete or does not match the run."""


@functools.lru_cache(maxsize=1)
def git_revision() -> str:
    """The source tree's git revision ("<sha>[-dirty]"), or "unknown" outside a checkout, read
    once per process: the code a process runs is the code it imported, so a commit made in the
    checkout while a long run (or a sweep worker) goes on must not relabel its checkpoints. The
    trainer reads it when it is imported."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


def checkpoint_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def temp_dir(root: Path, step: int) -> Path:
    """Where the checkpoint of ``step`` is written before its rename (the same name on every rank)."""
    return Path(root) / f".tmp-{checkpoint_dir(root, step).name}"


def begin_checkpoint(root: Path, step: int) -> Path:
    """Create (afresh) the temporary directory a checkpoint of ``step`` is written into.

    The name is the same on every rank, so DeepSpeed's per-rank files land in one place; only
    one process (rank 0) calls this, before the others write."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(root, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


LOW_SPACE = 16 * 2**20  # bytes free below which a failed write is put down to a full disk


@contextmanager
def space_checked(root: Path, step: int) -> Iterator[None]:
    """Around a checkpoint's whole write: a write that fails for lack of space (ENOSPC, EDQUOT,
    or torch's "unexpected pos" error with the disk full) removes its partial temporary
    directory, so the space comes back, and raises one line that says so (a Ctrl-C mid-write
    removes it too). Earlier checkpoints are never touched by a write, so the run can continue
    from them."""
    try:
        yield
    except CheckpointError:
        raise
    except KeyboardInterrupt:  # Ctrl-C mid-write: the partial copy is of no use to anyone
        shutil.rmtree(temp_dir(root, step), ignore_errors=True)
        raise
    except (OSError, RuntimeError) as exc:
        free = disk_free(root)
        no_space = (exc.errno in (errno.ENOSPC, errno.EDQUOT) if isinstance(exc, OSError)
                    else free is not None and free < LOW_SPACE)
        if not no_space:
            raise
        shutil.rmtree(temp_dir(root, step), ignore_errors=True)
        shown = "unknown" if free is None else f"{free / 2**20:.1f} MiB"
        raise CheckpointError(f"checkpoint error: no space left on the device of {root} writing the "
                              f"checkpoint of step {step} ({shown} free); its partial write was removed "
                              "and earlier checkpoints are intact: free space, then continue with "
                              "--resume auto") from None


def write_object(tmp: Path, name: str, obj: Any) -> None:
    """torch.save ``obj`` as ``tmp/name``, fsynced."""
    write_synced(Path(tmp) / name, lambda fh: torch.save(obj, fh))


def commit_checkpoint(root: Path, tmp: Path, step: int, meta: dict[str, Any],
                      keep_last: Optional[int] = None,
                      extra_files: Optional[dict[str, Path]] = None,
                      pinned: frozenset[int] = frozenset(),
                      known: Optional[dict[str, dict[str, Any]]] = None) -> Path:
    """Finish a checkpoint: copy ``extra_files`` (name -> source, e.g. the tokenizer), write
    meta.json, fsync every file, write manifest.json (size and sha256 of every file) last,
    rename into place; then apply ``keep_last`` retention (never to the steps in ``pinned``).
    ``known`` holds manifest entries (relative path -> bytes, sha256) of files already fsynced
    and hashed where they were written (streamed weights; other ranks' engine files, see
    ``hash_files``): they are not read again. Called by one process."""
    root, tmp = Path(root), Path(tmp)
    final = checkpoint_dir(root, step)
    for name, source in (extra_files or {}).items():
        write_synced(tmp / name, lambda fh, source=source: fh.write(Path(source).read_bytes()))
    meta = dict(meta, step=step, saved_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    write_synced(tmp / META, lambda fh: fh.write(json.dumps(meta, indent=2).encode()))
    known = known or {}
    files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
    manifest = {name: known[name] for name in files if name in known}
    manifest.update(hash_files(tmp, [name for name in files if name not in known]))
    manifest = dict(sorted(manifest.items()))
    write_synced(tmp / MANIFEST, lambda fh: fh.write(json.dumps({"files": manifest}, indent=2).encode()))
    for directory in sorted({p.parent for p in tmp.rglob("*")}, key=lambda d: -len(d.parts)):
        fsync_dir(directory)
    # re-saving the same step (e.g. after a resume) sets the old copy aside (see clean_stale)
    publish_dir(tmp, final, previous=root / f".old-{final.name}-{os.getpid()}")
    _VERIFIED[final] = final.joinpath(MANIFEST).stat().st_mtime_ns  # hashed from disk just now
    if keep_last:
        apply_retention(root, keep_last, pinned)
    return final


def hash_files(tmp: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """fsync and hash the files ``names`` (relative to ``tmp``): their manifest entries. Ranks
    call this on disjoint shares of a checkpoint's files, so hashing is spread over the job."""
    entries = {}
    for name in names:
        file = Path(tmp) / name
        with open(file, "rb") as fh:  # files another process wrote are synced here
            os.fsync(fh.fileno())
        entries[name] = {"bytes": file.stat().st_size, "sha256": file_sha256(file)}
    return entries


# checkpoints this process has checksummed: path -> manifest mtime (each is read once)
_VERIFIED: dict[Path, int] = {}


def _verified(path: Path) -> bool:
    try:
        stamp = path.joinpath(MANIFEST).stat().st_mtime_ns
    except OSError:
        return False
    if _VERIFIED.get(path) == stamp:
        return True
    if verify_checkpoint(path) is not None:
        return False
    _VERIFIED[path] = stamp
    return True


def apply_retention(root: Path, keep_last: int, pinned: frozenset[int] = frozenset()) -> list[Path]:
    """Delete the rotating checkpoints older than the ``keep_last`` newest ones that verify
    (checksums included). A newer checkpoint that fails verification does not count (and stays
    for inspection), so a corrupt copy never costs the last good one; pinned steps are never
    touched. Returns what was deleted."""
    kept, deleted = 0, []
    for path in reversed(step_dirs(root)):
        if int(_STEP_DIR.match(path.name).group(1)) in pinned:
            continue
        if kept < keep_last:
            kept += _verified(path)
            continue
        shutil.rmtree(path, ignore_errors=True)
        _VERIFIED.pop(path, None)
        deleted.append(path)
    return deleted


def clean_stale(root: Path) -> list[str]:
    """Tidy what a crash during a save leaves behind; returns notes on what was done.

    ``.tmp-step_*`` (a write that never committed) is deleted. ``.old-step_*`` is the previous
    copy of a step set aside while the same step was re-saved: it goes back into place when the
    new copy never arrived, else it is deleted. Call from one process while nobody saves."""
    root = Path(root)
    notes = []
    if not root.is_dir():
        return notes
    for entry in sorted(root.iterdir()):
        old = re.match(r"^\.old-(step_\d{8})-\d+$", entry.name)
        if entry.name.startswith(".tmp-step_"):
            shutil.rmtree(entry, ignore_errors=True)
            notes.append(f"removed {entry.name}, an unfinished checkpoint write")
        elif old and not (root / old.group(1)).exists() and verify_checkpoint(entry) is None:
            os.rename(entry, root / old.group(1))
            notes.append(f"restored {old.group(1)} from {entry.name} (a re-save was interrupted)")
        elif old:
            shutil.rmtree(entry, ignore_errors=True)
            notes.append(f"removed {entry.name}, a superseded copy")
    return notes


def save_checkpoint(root: Path, step: int, tensors: dict[str, Any], meta: dict[str, Any],
                    keep_last: Optional[int] = None,
                    extra_files: Optional[dict[str, Path]] = None) -> Path:
    """Single-writer convenience: ``tensors`` (file stem -> object for torch.save), copies of
    ``extra_files`` and ``meta``, written atomically. Returns the checkpoint directory."""
    tmp = begin_checkpoint(root, step)
    for stem, obj in tensors.items():
        write_object(tmp, f"{stem}.pt", obj)
    return commit_checkpoint(root, tmp, step, meta, keep_last, extra_files)


def verify_checkpoint(path: Path, checksums: bool = True) -> Optional[str]:
    """Return None when ``path`` is a complete checkpoint, else the reason it is not."""
    path = Path(path)
    problem = input_problem(path, "directory")
    if problem is not None:
        return problem
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return "no manifest.json (not a checkpoint, or its write did not finish)"
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return "manifest.json is unreadable"
    except OSError as exc:
        return f"manifest.json cannot be read ({exc.strerror})"
    if not isinstance(files, dict):
        return "manifest.json is unreadable (its 'files' is not a mapping)"
    if META not in files:
        return f"manifest.json does not list {META} (not a checkpoint written by megareuse)"
    for name, info in files.items():
        if not (isinstance(info, dict) and isinstance(info.get("bytes"), int)
                and isinstance(info.get("sha256"), str)):
            return f"manifest.json is unreadable (entry {name!r} lacks an integer 'bytes' and a 'sha256')"
        if Path(name).is_absolute() or ".." in Path(name).parts:
            return f"manifest.json is unreadable (entry {name!r} points outside the checkpoint)"
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != info["bytes"]:
            return f"{name} has {file.stat().st_size} bytes, manifest says {info['bytes']}"
        if checksums and file_sha256(file) != info["sha256"]:
            return f"{name} fails its sha256 checksum"
    return None


def verify_checkpoint_shared(path: Path, rank: int, world_size: int) -> Optional[str]:
    """``verify_checkpoint`` by a whole job (collective over the default group): every rank checks
    the manifest and the sizes, hashes every ``world_size``-th file from its ``rank`` (a
    checkpoint's state is one file per rank, so each hashes about one), and the ranks agree on the
    first problem in the manifest's order. A resume then waits for one share of the hashing, not
    for rank 0 to hash everything."""
    import torch.distributed as dist

    path = Path(path)
    problem = verify_checkpoint(path, checksums=False)
    first: tuple[int, Optional[str]] = (-1, problem) if problem else (1 << 62, None)
    if problem is None:
        files = sorted(json.loads((path / MANIFEST).read_text())["files"].items())
        for index in range(rank, len(files), world_size):
            name, info = files[index]
            try:
                bad = file_sha256(path / name) != info["sha256"]
            except OSError as exc:  # gone or unreadable since the size check: still agree, then say it
                first = (index, f"{name} cannot be read ({exc.strerror or exc})")
                break
            if bad:
                first = (index, f"{name} fails its sha256 checksum")
                break
    everyone: list = [None] * world_size
    dist.all_gather_object(everyone, first)
    problem = min(everyone, key=lambda entry: entry[0])[1]
    if problem is None:
        _VERIFIED[path] = path.joinpath(MANIFEST).stat().st_mtime_ns
    return problem


def step_dirs(root: Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if _STEP_DIR.match(p.name) and p.is_dir())


def latest_checkpoint(root: Path, skipped: Optional[Callable[[Path, str], None]] = None) -> Optional[Path]:
    """The newest checkpoint that verifies (checksums included). Newer broken ones are skipped,
    each reported to ``skipped(path, problem)`` (default: a warning naming it). Only checkpoints
    newer than the result are checksummed."""
    for candidate in reversed(step_dirs(root)):
        problem = verify_checkpoint(candidate)
        if problem is None:
            return candidate
        if skipped is None:
            warnings.warn(f"skipping checkpoint {candidate}: {problem}", stacklevel=2)
        else:
            skipped(candidate, problem)
    return None


def read_meta(path: Path, config: bool = True) -> dict[str, Any]:
    """A checkpoint's meta.json: a JSON object, with a ``config`` mapping unless ``config`` is
    False (else CheckpointError naming the file)."""
    file = Path(path) / META
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint error: {file} does not exist; accepted a checkpoint written by megareuse") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint error: {file} is not valid JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("config", {} if not config else None), dict):
        raise CheckpointError(f"checkpoint error: {file} holds no config mapping; accepted a checkpoint written by megareuse")
    problem = _meta_problem(meta, config)
    if problem is not None:
        raise CheckpointError(f"checkpoint error: {file}: {problem}; accepted a checkpoint written by megareuse")
    return meta


# meta.json fields the tools read, and their types (None allowed where a field may be null)
_META_FIELDS = {"stage": (str,), "method": (str,), "D1": (int, type(None)), "D2": (int, type(None)),
                "tokens_seen": (int, type(None)), "tokenizer": (dict, type(None)), "growth": (dict, type(None)),
                "layout": (dict, type(None)), "init_from": (dict, type(None)), "step": (int,)}


def _meta_problem(meta: dict[str, Any], config: bool) -> Optional[str]:
    for key, kinds in _META_FIELDS.items():
        value = meta.get(key)
        if key in meta and (not isinstance(value, kinds) or isinstance(value, bool)):
            return f"field {key!r} = {value!r} has the wrong type"
    sections = meta.get("config", {})
    for section in ("model", "data", "run", "optim", "schedule", "parallel", "guard"):
        if not isinstance(sections.get(section, {}), dict):
            return f"config.{section} is not a mapping"
    if config and not isinstance(sections.get("model"), dict):
        return "config.model is missing"
    if not isinstance(sections.get("data", {}).get("train", {}), dict):
        return "config.data.train is not a mapping"
    return None


def load_checkpoint(path: Path, names: tuple[str, ...] = ("model", "optimizer", "trainer"),
                    map_location: str | torch.device = "cpu", checksums: bool = True,
                    config: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """Verify (``checksums=False``: sizes only, for a checkpoint verified just before) and load
    a checkpoint; returns (objects by stem, meta)."""
    path = Path(path)
    problem = verify_checkpoint(path, checksums=checksums)
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} is not usable: {problem}")
    objs = {}
    for name in names:
        file = path / f"{name}.pt"
        if file.is_file():
            try:
                objs[name] = torch.load(file, map_location=map_location, weights_only=True)
            except Exception as exc:  # pickle's and torch's own errors for a damaged file
                raise CheckpointError(f"checkpoint error: {file} is not readable by torch.load "
                                      f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    return objs, read_meta(path, config)
