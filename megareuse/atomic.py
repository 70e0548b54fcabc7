"""The project's one way to replace a file or publish a directory atomically.

A reader (another process, or a resumed run after a crash) sees the old content or the new,
never a half-written file: the new bytes go to a temporary sibling, are fsynced, renamed over the
target, and the directory entry is fsynced too.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Callable, IO


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (a no-op on file systems that cannot sync a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_synced(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write ``path`` in place with what ``write(fh)`` writes to a binary file handle, and fsync it
    (a file inside a directory that is published whole later)."""
    with open(path, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())


def _replace(path: Path, make: Callable[[Path], object]) -> None:
    """Make a temporary sibling of ``path`` with ``make(tmp)``, rename it over ``path``, fsync
    the directory; the temporary file is removed when anything fails."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        make(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_atomic(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Replace ``path`` with what ``write(fh)`` writes to a binary file handle."""
    _replace(path, lambda tmp: write_synced(tmp, write))


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8)."""
    write_atomic(path, lambda fh: fh.write(text.encode()))


def symlink_atomic(path: Path, target: Path) -> None:
    """Make ``path`` (absent, or a link) a symlink to the directory ``target``: the link appears whole."""
    def make(tmp: Path) -> None:
        tmp.unlink(missing_ok=True)  # left by a killed process that had this pid
        os.symlink(target, tmp, target_is_directory=True)
    _replace(path, make)


def publish_dir(staging: Path, final: Path, previous: Path | None = None) -> Path:
    """Rename the finished directory ``staging`` to ``final`` and fsync the parent, so the
    directory appears whole or not at all. ``final`` must not exist, unless ``previous`` names
    where an existing one is set aside first: it is deleted once the new one is in place (a crash
    between the two renames leaves it there, for the caller to restore)."""
    staging, final = Path(staging), Path(final)
    replacing = final.exists() or final.is_symlink()
    if replacing:
        if previous is None:
            raise FileExistsError(f"{final} appeared while it was being written; nothing published")
        os.rename(final, previous)
    os.rename(staging, final)
    fsync_dir(final.parent)
    if replacing:
        shutil.rmtree(previous) if previous.is_dir() and not previous.is_symlink() else previous.unlink()
    return final


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 1 MiB chunks (what checkpoints and data directories record)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
