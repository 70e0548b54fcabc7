"""Writing the law commands' outputs: JSON without non-finite floats, files written atomically."""
from __future__ import annotations

import math
from pathlib import Path

from megareuse.atomic import write_atomic


def finite_json(value):
    """JSON-safe copy: non-finite floats (a loss never reached, an undefined ratio) become null."""
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_outputs(out_dir, files: dict) -> list[str]:
    """Write {name: bytes or str} into out_dir, each file atomically (temp file + rename)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        data = content.encode() if isinstance(content, str) else content
        write_atomic(out / name, lambda fh, data=data: fh.write(data))
    return [str(out / n) for n in files]
