"""The project's one way to replace a file or publish a directory atomically.

A reader (another process, or a resumed run after a crash) sees the old content or the new,
never a half-written file: the new bytes go to a temporary sibling, are fsynced, renamed over the
target, and the directory entry is fsynced too.
"""
from __future__ import annotations

import hashlib
import os
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


def write_atomic(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Replace ``path`` with what ``write(fh)`` writes to a binary file handle."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8)."""
    write_atomic(path, lambda fh: fh.write(text.encode()))


def publish_dir(staging: Path, final: Path) -> Path:
    """Rename the finished directory ``staging`` to ``final`` (which must not exist) and fsync
    the parent, so the directory appears whole or not at all."""
    staging, final = Path(staging), Path(final)
    if final.exists():
        raise FileExistsError(f"{final} appeared while it was being written; nothing published")
    os.rename(staging, final)
    fsync_dir(final.parent)
    return final


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 1 MiB chunks (what checkpoints and data directories record)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
