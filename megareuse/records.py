"""Run records: the one interface between training and the law.

Every finished run writes ``<out_dir>/record.json``; ``megareuse collect RUNS_DIR`` gathers them
into a table (CSV and JSONL) whose columns the fitter reads: run_id, group, seed, stage, method,
N (non-embedding parameters), N_total, series, D1, D2, tokens, valid_loss_<domain>,
best_valid_loss_<domain>, tokens_<domain>, wall_s, tokens_per_s, flops, flops_6ND, out_dir, checkpoint.

Repeats. A sweep may run a cell again with other data-order seeds (an experiment series'
``seeds``, megareuse/sweep/grid.py): repeat r of the run ``RUN`` is the run ``RUN/seed=r``
(r = 2, 3, ...; its ``data.seed`` is the original's + r - 1). ``seed`` is the run's ``data.seed``
(written by ``build_record``; read from the record's config for older records); ``group`` is the
run id without a trailing ``/seed=r`` (``group_of``), so the original and its repeats share it and
every other run is a group of its own (group = run_id). Like run_id it is set by ``collect``
from the run's directory below RUNS_DIR. The fitter resamples whole groups and measures
run-to-run noise within them (megareuse/law/calibrate.py).
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path
from typing import Any, Iterable, Optional

from megareuse.atomic import write_text_atomic
from megareuse.errors import UserError
from megareuse.paths import check_input, check_output_dir

RECORD = "record.json"
SCHEMA = "megareuse-run-record/1"
REQUIRED = {"stage": str, "method": str, "N": int, "N_total": int, "D1": int, "D2": int, "tokens": int,
            "valid_loss": dict, "best_valid_loss": dict, "tokens_per_domain": dict}
LOSSES = ("valid_loss", "best_valid_loss")
REPEAT = re.compile(r"/seed=([1-9][0-9]*)$")  # the last path part of a repeat's run id


def repeat_run_id(run_id: str, repeat: int) -> str:
    """The run id of repeat ``repeat`` (2, 3, ...) of the run ``run_id``: ``RUN/seed=r``."""
    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 2:
        raise ValueError(f"repeat = {repeat!r}: accepted an integer >= 2 (1 is the original run)")
    return f"{run_id}/seed={repeat}"


def group_of(run_id: str) -> str:
    """The cell of a run: its run id without a trailing ``/seed=r`` (the original's run id)."""
    return REPEAT.sub("", run_id)


def _data_seed(record: dict[str, Any]) -> Optional[int]:
    seed = record.get("seed", ((record.get("config") or {}).get("data") or {}).get("seed"))
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else None


class RecordError(UserError, ValueError):
    """A record.json is unreadable or not a run record (one line naming the file)."""


def build_record(*, run_id: str, series: str, stage: str, method: str, n_params: int, n_total: int, d1: int,
                 d2: int, tokens: int, tokens_per_domain: dict[str, int], history: list[dict],
                 wall_s: float, flops_per_token: float, config: dict, out_dir: Path,
                 checkpoint: Path, init_from: dict | None) -> dict[str, Any]:
    """Assemble a record; ``history`` holds the eval records (step, tokens, valid_loss/<d>)."""
    domains = sorted({k.split("/", 1)[1] for rec in history for k in rec if k.startswith("valid_loss/")})
    final = {d: history[-1].get(f"valid_loss/{d}") for d in domains} if history else {}
    best = {d: min(r[f"valid_loss/{d}"] for r in history if f"valid_loss/{d}" in r) for d in domains}
    return {
        "schema": SCHEMA, "run_id": run_id, "series": series, "stage": stage, "method": method,
        "N": n_params, "N_total": n_total, "D1": d1, "D2": d2, "tokens": tokens,
        "tokens_per_domain": tokens_per_domain, "valid_loss": final, "best_valid_loss": best,
        "history": [{"step": r["step"], "tokens": r["tokens"],
                     **{d: r[f"valid_loss/{d}"] for d in domains if f"valid_loss/{d}" in r}}
                    for r in history],
        "wall_s": wall_s, "tokens_per_s": tokens / wall_s if wall_s > 0 else None,
        "flops": flops_per_token * tokens, "flops_6ND": 6 * n_params * tokens,
        "config": config, "out_dir": str(out_dir), "checkpoint": str(checkpoint),
        "init_from": init_from, "seed": _data_seed({"config": config}),
    }


def write_record(out_dir: Path, record: dict[str, Any]) -> Path:
    path = Path(out_dir) / RECORD
    write_text_atomic(path, json.dumps(record, indent=2))
    return path


def read_records(runs_dir: Path) -> list[dict[str, Any]]:
    """Every record.json under ``runs_dir`` (recursively), sorted by run_id."""
    runs_dir = check_input(runs_dir, "directory", "collect error: RUNS_DIR",
                           "a directory holding run directories with record.json", RecordError)
    records = []
    for path in sorted(runs_dir.rglob(RECORD)):
        record = read_record(path)
        record["run_id"] = path.parent.relative_to(runs_dir).as_posix()  # unique in the table
        record["group"], record["seed"] = group_of(record["run_id"]), _data_seed(record)
        records.append(record)
    return sorted(records, key=lambda r: r["run_id"])


def read_record(path: Path) -> dict[str, Any]:
    """One record.json, checked: valid JSON, our schema, the fields the table needs."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise RecordError(f"collect error: {path} is not valid JSON ({str(exc).splitlines()[0]}); "
                          "accepted a record.json written by `megareuse train` (rerun or remove that run)") from None
    if not isinstance(record, dict) or record.get("schema") != SCHEMA:
        schema = record.get("schema") if isinstance(record, dict) else type(record).__name__
        raise RecordError(f"collect error: {path} has schema {schema!r}; accepted {SCHEMA}")
    for key, kind in REQUIRED.items():
        if not isinstance(record.get(key), kind) or (kind is int and isinstance(record[key], bool)):
            raise RecordError(f"collect error: {path}: field {key!r} = {record.get(key)!r}; accepted "
                              f"{'an integer' if kind is int else 'a string' if kind is str else 'a mapping'}")
    for key in LOSSES:
        for domain, value in record[key].items():
            if value is not None and not _finite_number(value):
                raise RecordError(f"collect error: {path}: field {key}.{domain} = {value!r}; accepted a "
                                  "finite number (the validation loss; null when never measured)")
    for domain, value in record["tokens_per_domain"].items():
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            raise RecordError(f"collect error: {path}: field tokens_per_domain.{domain} = {value!r}; "
                              "accepted an integer >= 0")
    return record


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def flatten(record: dict[str, Any]) -> dict[str, Any]:
    """One table row: scalar fields plus per-domain columns."""
    row = {"run_id": record["run_id"], "group": record.get("group", group_of(record["run_id"])),
           "seed": _data_seed(record)}
    row.update({k: record[k] for k in ("series", "stage", "method", "N", "N_total", "D1", "D2", "tokens",
                                       "wall_s", "tokens_per_s", "flops", "flops_6ND", "out_dir", "checkpoint")})
    for domain, value in record["valid_loss"].items():
        row[f"valid_loss_{domain}"] = value
    for domain, value in record["best_valid_loss"].items():
        row[f"best_valid_loss_{domain}"] = value
    for domain, value in record["tokens_per_domain"].items():
        row[f"tokens_{domain}"] = value
    row["init_from"] = (record.get("init_from") or {}).get("path", "")
    return row


def _columns(rows: Iterable[dict]) -> list[str]:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    return columns


def collect(runs_dir: Path, out: Path | None = None) -> tuple[Path, Path, int]:
    """Write ``<out>.csv`` and ``<out>.jsonl`` (default ``<runs_dir>/runs``); returns both paths
    and the number of runs."""
    records = read_records(runs_dir)
    if not records:
        raise FileNotFoundError(f"collect error: no {RECORD} under {str(runs_dir)!r}")
    stem = Path(out) if out else Path(runs_dir) / "runs"
    if stem.suffix in (".csv", ".jsonl"):
        stem = stem.with_suffix("")
    rows = [flatten(r) for r in records]
    csv_path, jsonl_path = stem.with_suffix(".csv"), stem.with_suffix(".jsonl")
    check_output_dir(csv_path.parent, f"collect error: --out {str(out or stem)!r}: its directory", RecordError)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=_columns(rows), restval="")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(csv_path, table.getvalue())
    write_text_atomic(jsonl_path, "".join(json.dumps(r) + "\n" for r in rows))
    return csv_path, jsonl_path, len(rows)
