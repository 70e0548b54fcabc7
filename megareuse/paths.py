"""What is wrong with a path, in words, before anything uses it.

Commands check their input and output paths up front with these, so a user sees "is a file, not
a directory" or "is not writable (read-only file system)" naming the field, instead of an
exception from deep inside (or a message about something else). ``os_error_line`` words the
OS errors that can still happen later (a disk filling up mid-run) for the one-line exit.
"""
from __future__ import annotations

import errno
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Union

PathLike = Union[str, os.PathLike]


def input_problem(path: PathLike, want: str) -> Optional[str]:
    """None when ``path`` is an existing, readable ``want`` ("file" or "directory"), else what
    is wrong with it."""
    if want not in ("file", "directory"):
        raise ValueError(f"paths: want = {want!r}: accepted file, directory")
    path = Path(path)
    try:
        path.stat()
    except FileNotFoundError:
        parent = _first_existing_parent(path)
        if parent is not None and not parent.is_dir():
            return f"does not exist ({parent} is a file, not a directory)"
        return "does not exist"
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    is_dir = path.is_dir()
    if want == "directory" and not is_dir:
        return "is a file, not a directory"
    if want == "file" and is_dir:
        return "is a directory, not a file"
    mode = os.R_OK | (os.X_OK if is_dir else 0)
    if not os.access(path, mode):
        return "is not readable (permission denied)"
    return None


def output_dir_problem(path: PathLike) -> Optional[str]:
    """None when ``path`` is a writable directory or can be created as one, else what is wrong."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            return "is a file, not a directory"
        return _write_problem(path)
    parent = _first_existing_parent(path)
    if parent is None:
        return None
    if not parent.is_dir():
        return f"cannot be created: {parent} is a file, not a directory"
    problem = _write_problem(parent)
    return None if problem is None else f"cannot be created: {parent} {problem}"


def check_input(path: PathLike, want: str, field: str, accepted: str,
                error: type[Exception] = ValueError) -> Path:
    """``path`` when ``input_problem`` finds nothing wrong, else raise ``error`` with one line:
    ``{field} '{path}' {problem}; accepted {accepted}``."""
    problem = input_problem(path, want)
    if problem is not None:
        raise error(f"{field} {str(path)!r} {problem}; accepted {accepted}")
    return Path(path)


def check_output_dir(path: PathLike, field: str, error: type[Exception] = ValueError) -> Path:
    """``path`` when ``output_dir_problem`` finds nothing wrong, else raise ``error`` with one line
    naming ``field`` and the path."""
    problem = output_dir_problem(path)
    if problem is not None:
        raise error(f"{field} {str(path)!r} {problem}; accepted a writable directory or a new path under one")
    return Path(path)


@contextmanager
def naming(path: PathLike) -> Iterator[None]:
    """An OSError raised without a path (a ``write`` on an open file that hits a full disk) gets
    ``path`` as its filename, so its one line says where."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None and exc.errno is not None:
            raise OSError(exc.errno, exc.strerror or os.strerror(exc.errno), str(path)) from exc
        raise


def _write_problem(directory: Path) -> Optional[str]:
    try:
        if os.access(directory, os.W_OK | os.X_OK):
            return None
    except OSError as exc:
        return f"is not writable ({exc.strerror})"
    try:  # access() says no: ask the file system why (read-only mount or permissions)
        st = os.statvfs(directory)
        if st.f_flag & os.ST_RDONLY:
            return "is not writable (read-only file system)"
    except OSError:
        pass
    return "is not writable (permission denied)"


def _first_existing_parent(path: Path) -> Optional[Path]:
    for parent in path.absolute().parents:
        if parent.exists():
            return parent
    return None


def os_error_line(exc: OSError) -> str:
    """One line for an OS error: what failed, the path and the errno's name."""
    name = errno.errorcode.get(exc.errno or 0, "")
    what = exc.strerror or str(exc) or type(exc).__name__
    target = exc.filename if exc.filename is not None else ""
    if exc.filename2 is not None:
        target = f"{target} -> {exc.filename2}"
    where = f": {target}" if target != "" else ""
    hint = ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = "; free space (or raise the quota) and run the same command again"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "; accepted a path this user can write (or read, for inputs)"
    return f"os error: {what}{f' ({name})' if name else ''}{where}{hint}"


def disk_free(path: PathLike) -> Optional[int]:
    """Bytes free (to this user) on the file system holding ``path`` or its nearest parent."""
    path = Path(path)
    probe = path if path.exists() else _first_existing_parent(path)
    try:
        st = os.statvfs(probe if probe is not None else ".")
    except OSError:
        return None
    return st.f_bavail * st.f_frsize
