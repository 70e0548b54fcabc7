"""The one parser of token, parameter and FLOP counts written the way people write them
("2.5M", "3T", "300K", "1e6"): the law's inputs (megareuse/law/data.py) and the Hugging Face
import's ``--d1`` (megareuse/interop/hf_cli.py) both read counts with it."""
from __future__ import annotations

SUFFIXES = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}


def parse_count(text, error: type[Exception] = ValueError) -> float:
    """'2.5M' -> 2.5e6; also K, B (or G), T suffixes and plain numbers. A text that is not a
    count raises ``error`` with one line saying what is accepted."""
    if isinstance(text, (int, float)):
        return float(text)
    s = str(text).strip()
    scale = SUFFIXES.get(s[-1:].upper(), None)
    try:
        return float(s[:-1]) * scale if scale else float(s)
    except ValueError:
        raise error(f"{text!r} is not a number; accepted e.g. 1e6, 2.5M, 300K") from None
