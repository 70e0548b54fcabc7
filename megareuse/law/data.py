"""Run tables for the law: loading CSV / JSONL, checking columns and values, token units.

A table has one row per run. Column names the law knows: D1, D2 (tokens of stage 1 and 2),
N (parameters), D (tokens of a single-stage run), the loss (column `loss` unless told
otherwise), and optionally weight, group (bootstrap and leave-one-out resample whole groups;
repeats of one cell with other seeds share a group, and their scatter measures run-to-run noise,
see calibrate.py; a row without a group is a group of its own) and run_id. Run records from
`megareuse collect` are JSONL or CSV with at least run_id, method, D1, D2, N and loss columns;
nested JSON objects are flattened with "_" (valid_loss.code -> valid_loss_code). Every problem
is reported as one line naming the column and what is accepted.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from megareuse import counts
from megareuse.errors import UserError
from megareuse.paths import check_input

KNOWN = ("D1", "D2", "N", "D")
TOKEN_COLUMNS = ("D1", "D2", "D")
LOSS_UNITS = ("nats", "bits")
UNITS = [(1.0, ""), (1e3, "K"), (1e6, "M"), (1e9, "B"), (1e12, "T")]


class LawError(UserError, ValueError):
    """A user error in law inputs: the message is one line naming the field and what is accepted."""


def parse_count(text) -> float:
    """'2.5M' -> 2.5e6 (megareuse/counts.py); a LawError when ``text`` is not a count."""
    return counts.parse_count(text, LawError)


def choose_unit(values: np.ndarray) -> tuple[float, str]:
    """The power of 1000 nearest the geometric mean of the values (so fitted A is well conditioned)."""
    centre = float(np.mean(np.log10(values))) if len(values) else 0.0
    return min(UNITS, key=lambda u: abs(math.log10(u[0]) - centre))


@dataclass
class RunTable:
    """Numeric columns (float arrays), the loss, weights, groups and run ids of a set of runs."""
    columns: dict[str, np.ndarray]
    loss: np.ndarray
    weight: np.ndarray
    group: np.ndarray
    run_id: np.ndarray
    source: str = "<memory>"
    sha256: str = ""
    loss_col: str = "loss"
    extra: dict = field(default_factory=dict)
    loss_unit: str = "nats"

    def __len__(self) -> int:
        return len(self.loss)

    def has(self, *names: str) -> bool:
        return all(n in self.columns for n in names)

    def subset(self, mask) -> "RunTable":
        idx = np.flatnonzero(mask) if np.asarray(mask).dtype == bool else np.asarray(mask, dtype=int)
        return RunTable({k: v[idx] for k, v in self.columns.items()}, self.loss[idx], self.weight[idx],
                        self.group[idx], self.run_id[idx], self.source, self.sha256, self.loss_col, self.extra,
                        self.loss_unit)

    def describe(self) -> str:
        digest = f", sha256 {self.sha256[:12]}" if self.sha256 else ""
        return f"{Path(self.source).name} ({len(self)} runs, loss column {self.loss_col}{digest})"

    def require(self, names: Sequence[str], what: str) -> None:
        """Check the columns exist with positive finite values (else one-line LawError)."""
        missing = [n for n in names if n not in self.columns]
        if missing:
            raise LawError(f"column {missing[0]!r} missing from {self.source} ({what} needs "
                           f"{', '.join(names)}, {self.loss_col}); columns present: "
                           f"{', '.join(self.columns) or 'none'}, {self.loss_col}")
        for name in list(names) + [self.loss_col]:
            values = self.loss if name == self.loss_col else self.columns[name]
            bad = np.flatnonzero(~(np.isfinite(values) & (values > 0)))
            if len(bad):
                rows = ", ".join(str(self.run_id[i]) for i in bad[:3]) + (" ..." if len(bad) > 3 else "")
                raise LawError(f"column {name!r} has {len(bad)} non-finite or non-positive values "
                               f"(runs {rows}) in {self.source}; accepted positive finite numbers "
                               f"(drop such rows with --where)")


def check_loss_unit(unit, name: str = "loss_unit") -> str:
    if unit not in LOSS_UNITS:
        raise LawError(f"{name} = {unit!r}: accepted {', '.join(LOSS_UNITS)} (the unit the loss is given in)")
    return unit


def table_from_arrays(loss, source: str = "<memory>", weight=None, group=None, run_id=None,
                      loss_col: str = "loss", loss_unit: str = "nats", **columns) -> RunTable:
    """Build a table in Python: table_from_arrays(loss, D1=..., D2=...)."""
    check_loss_unit(loss_unit)
    loss = np.asarray(loss, dtype=float).ravel()
    n = len(loss)
    cols = {}
    for name, values in columns.items():
        arr = np.asarray(values, dtype=float).ravel()
        if len(arr) != n:
            raise LawError(f"column {name!r} has {len(arr)} values; the loss has {n}")
        cols[name] = arr
    w = np.ones(n) if weight is None else np.asarray(weight, dtype=float).ravel()
    if len(w) != n or not np.all(np.isfinite(w) & (w >= 0)) or not w.sum() > 0:
        raise LawError("column 'weight': accepted one finite non-negative value per run, not all zero")
    ids = np.array([f"row{i + 1}" for i in range(n)]) if run_id is None else np.asarray(run_id).astype(str)
    groups = ids.copy() if group is None else np.asarray(group).astype(str)
    return RunTable(cols, loss, w, groups, ids, source, "", loss_col, loss_unit=loss_unit)


def merge_duplicates(table: RunTable) -> tuple[RunTable, str]:
    """Keep the first of each set of exact duplicate rows (same values in every numeric column,
    the same loss and weight): a row recorded twice is one run, and counting it twice narrows
    every bootstrap interval. Returns the table and a note ("" when nothing was merged)."""
    names = sorted(table.columns)
    keys = np.column_stack([table.columns[c] for c in names] + [table.loss, table.weight])
    _, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    if len(first) == len(table):
        return table, ""
    keep, inverse = np.sort(first), np.asarray(inverse).ravel()
    dropped = np.setdiff1d(np.arange(len(table)), keep)
    pairs = [f"{table.run_id[i]} = {table.run_id[first[inverse[i]]]}" for i in dropped]
    merged = table.subset(keep)
    merged.extra = dict(table.extra, duplicates_merged=len(dropped))
    note = (f"{len(dropped)} exact duplicate rows (same {', '.join(names)}, loss and weight) merged into "
            f"one run each: {', '.join(pairs[:5])}{' ...' if len(pairs) > 5 else ''}")
    return merged, note


def _flatten(record: Mapping, prefix: str = "") -> dict:
    out = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, name + "_"))
        else:
            out[name] = value
    return out


def _read_rows(path: Path, text: str) -> list[dict]:
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise LawError(f"{path} is not JSON ({exc.msg} at line {exc.lineno}); accepted a list of objects") from None
        if not all(isinstance(r, dict) for r in records):
            raise LawError(f"{path}: accepted a JSON list of objects, one per run")
        return [_flatten(r) for r in records]
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise LawError(f"{path}: line {i} is not JSON ({exc.msg}); accepted one JSON object per line") from None
            if not isinstance(rec, dict):
                raise LawError(f"{path}: line {i} is not a JSON object; accepted one object per line")
            rows.append(_flatten(rec))
        return rows
    if path.suffix.lower() in (".csv", ".tsv", ".txt"):
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
        return [dict(r) for r in csv.DictReader(io.StringIO(text), delimiter=delimiter)]
    raise LawError(f"{path}: unknown table type {path.suffix or '(none)'!r}; accepted .csv, .tsv, .jsonl, .json")


def _number(value, column: str, row: int, path: Path) -> float:
    if value is None or (isinstance(value, str) and not value.strip()):
        return float("nan")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise LawError(f"{path}: row {row} column {column!r} = {value!r} is not a number; "
                       f"accepted a finite positive number") from None


def _matches(row: dict, key: str, wanted: str) -> bool:
    value = row.get(key)
    if value is None:
        return False
    try:
        return float(value) == float(wanted)
    except (TypeError, ValueError):
        return str(value) == wanted


def _groups(numbered: list, run_id: list) -> Optional[list]:
    """The optional group column (seeds of one cell share a group): a row with no group, an empty
    one or null (a cell run once) is a group of its own (its run id); no group anywhere: None."""
    values = [r.get("group") for _, r in numbered]
    given = [v is not None and str(v).strip() != "" for v in values]
    if not any(given):
        return None
    return [str(v).strip() if g else rid for v, g, rid in zip(values, given, run_id)]


def load_table(path, loss_col: str = "loss", where: Optional[Mapping[str, str]] = None,
               rename: Optional[Mapping[str, str]] = None, loss_unit: str = "nats") -> RunTable:
    """Read a CSV/TSV/JSONL run table. `where` keeps rows whose column equals the value;
    `rename` maps a law column to a table column (e.g. {"D": "D2"}); `loss_unit` (nats or
    bits) labels the loss as given, it converts nothing."""
    check_loss_unit(loss_unit, "--loss-unit")
    path = check_input(path, "file", "runs table", "a .csv or .jsonl file", LawError)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise LawError(f"{path} is not UTF-8 text; accepted a .csv or .jsonl file") from None
    rows = _read_rows(path, text)
    if not rows:
        raise LawError(f"{path} has no rows; accepted a table with a header and one row per run")
    present = sorted({k for r in rows for k in r})
    canon = {k.replace(".", "_"): k for k in present}
    loss_key = loss_col if loss_col in present else canon.get(loss_col.replace(".", "_"))
    if loss_key is None:
        raise LawError(f"column {loss_col!r} (the loss, --loss-col) missing from {path}; "
                       f"columns present: {', '.join(present)}")
    numbered = list(enumerate(rows, 1))  # keep the file's row numbers for messages
    for key, wanted in (where or {}).items():
        if key not in present:
            raise LawError(f"--where {key}={wanted}: column {key!r} missing from {path}; "
                           f"columns present: {', '.join(present)}")
        numbered = [(i, r) for i, r in numbered if _matches(r, key, str(wanted))]
        if not numbered:
            raise LawError(f"--where {key}={wanted} keeps no rows of {path}")
    source_of = {name: name for name in KNOWN}
    for law_col, table_col in (rename or {}).items():
        if law_col not in KNOWN:
            raise LawError(f"rename {law_col}={table_col}: accepted law columns {', '.join(KNOWN)}")
        if table_col not in present:
            raise LawError(f"rename {law_col}={table_col}: column {table_col!r} missing from {path}")
        source_of[law_col] = table_col

    def numbers(key):
        return [_number(r.get(key), key, i, path) for i, r in numbered]

    columns = {law_col: np.array(numbers(table_col)) for law_col, table_col in source_of.items()
               if any(table_col in r for _, r in numbered)}
    loss = np.array(numbers(loss_key))
    weight = numbers("weight") if all("weight" in r for _, r in numbered) else None
    run_id = [str(r.get("run_id", f"row{i}")) for i, r in numbered]
    group = _groups(numbered, run_id)
    table = table_from_arrays(loss, source=str(path), weight=weight, group=group, run_id=run_id,
                              loss_col=loss_col, loss_unit=loss_unit, **columns)
    table.sha256 = hashlib.sha256(raw).hexdigest()
    table.extra = {"where": dict(where or {}), "rename": dict(rename or {})}
    return table
