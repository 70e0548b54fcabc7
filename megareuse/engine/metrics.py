"""Metrics: a JSONL log (one object per line), TensorBoard when installed, a progress line."""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

from megareuse.atomic import write_text_atomic
from megareuse.errors import UserError


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else (f"{minutes}m{secs:02d}s" if minutes else f"{secs}s")


def format_count(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.1f}{unit}"
    return f"{value:.0f}"


class MetricsLog:
    """Appends records to ``<out_dir>/metrics.jsonl``; mirrors scalars to TensorBoard if present.

    ``truncate_after(step)`` drops train/eval records of steps after a resumed checkpoint, so the
    loss curve of a resumed run reads as if it had never been interrupted; event records
    (rollback, preempted) are history and stay. TensorBoard shows the same: its writer is
    reopened with ``purge_step=step + 1`` (readers discard every earlier event of a later step)
    and the kept event records of later steps are written to it again.
    """

    def __init__(self, out_dir: Path, tensorboard: bool = True):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tb_dir = str(Path(out_dir) / "tensorboard")
        self._writer_cls = None
        self._tb = None  # opened at the first scalar, after any truncate_after
        self._purge_step: Optional[int] = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._writer_cls = SummaryWriter
            except Exception:  # tensorboard not installed: JSONL only
                pass

    def truncate_after(self, step: int) -> None:
        """Drop train/eval records after ``step``; events (skips, rollbacks, preemptions) stay.
        A torn last line (the process was killed while appending it) is dropped too."""
        kept = [r for r in read_metrics(self.path.parent)
                if r.get("step", 0) <= step or r.get("kind") not in ("train", "eval")]
        if self.path.exists():
            write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        if self._writer_cls is not None:
            self.close()
            self._purge_step = step + 1
            for record in kept:
                if record.get("step", 0) > step:
                    self._mirror(record)

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        self._mirror(record)

    def _mirror(self, record: dict[str, Any]) -> None:
        if self._writer_cls is None:
            return
        if self._tb is None:
            _after_earlier_event_files(Path(self._tb_dir))
            self._tb = self._writer_cls(self._tb_dir, purge_step=self._purge_step)
        step = record.get("step", 0)
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self._tb.add_scalar(f"{record.get('kind', 'train')}/{key}", value, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        self._tb, self._purge_step = None, None  # a later scalar appends to a new event file


def _after_earlier_event_files(tb_dir: Path, limit_s: float = 2.0) -> None:
    """Wait (at most ``limit_s``) until the clock's second is past every event file's in
    ``tb_dir``. Readers load event files in name order and apply a purge only to the files
    before it; the name is ``events.out.tfevents.<second>.<host>.<pid>.<counter>``, and within
    one second the counter sorts as text (10 before 9), so a new file must start a later second."""
    newest = -1
    for file in tb_dir.glob("events.out.tfevents.*"):
        stamp = file.name.split(".")[3]
        newest = max(newest, int(stamp)) if stamp.isdigit() else newest
    deadline = time.monotonic() + limit_s
    while int(time.time()) <= newest and time.monotonic() < deadline:
        time.sleep(0.05)


class MetricsError(UserError, ValueError):
    """metrics.jsonl is damaged before its last line (one line naming the file and line)."""


def read_metrics(out_dir: Path) -> list[dict[str, Any]]:
    """The records of ``<out_dir>/metrics.jsonl``. Only the last line can be torn (appends are
    whole lines; a kill mid-write leaves a partial one): it is skipped. A bad line elsewhere is
    damage, not a torn write: MetricsError."""
    path = Path(out_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    lines = [(n, line) for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1) if line.strip()]
    records = []
    for i, (n, line) in enumerate(lines):
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            if i == len(lines) - 1:
                break  # the torn tail of a killed append
            raise MetricsError(f"run error: {path} line {n} is not a JSON record ({str(exc).splitlines()[0]}); "
                               "accepted one JSON object per line (only a torn last line is repaired)") from None
        records.append(record)
    return records


def peak_memory_mib(device: Any = None) -> dict[str, float]:
    """This process's peak memory so far, MiB: "rss" (peak resident set size, from the kernel)
    and "device" (CUDA: max allocated by torch's allocator; 0 on CPU)."""
    import resource

    import torch

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    dev = 0.0
    if device is not None and device.type == "cuda":
        dev = torch.cuda.max_memory_allocated(device) / 2**20
    return {"rss": round(rss, 1), "device": round(dev, 1)}


def tune_host_allocator(threshold: int = 1 << 20) -> bool:
    """Serve every host allocation of ``threshold`` bytes or more with its own mmap (glibc).

    glibc raises its mmap threshold each time a large block is freed, after which blocks of up to
    32 MiB come from the heap and their memory is not given back: a rank streaming tensors one at
    a time (building, gathering, saving) then keeps every size it ever used. A fixed threshold
    returns them. Skipped when MALLOC_MMAP_THRESHOLD_ is set or the C library is not glibc;
    returns whether it was applied."""
    import ctypes

    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    M_MMAP_THRESHOLD = -3
    return bool(mallopt(M_MMAP_THRESHOLD, threshold))


class Progress:
    """A steady progress line: step, loss, lr, tokens/s, MFU (when the peak is known), peak
    memory of this rank, ETA."""

    def __init__(self, total_steps: int, tokens_per_step: int, flops_per_token: float,
                 peak_flops: float = 0.0, emit: Callable[[str], None] = print, device=None):
        self.device = device
        self.total_steps = total_steps
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.emit = emit
        self._t0: Optional[float] = None
        self._step0 = 0

    def start(self, step: int) -> None:
        self._t0, self._step0 = time.perf_counter(), step

    def rates(self, step: int) -> dict[str, float]:
        elapsed = max(time.perf_counter() - (self._t0 or time.perf_counter()), 1e-9)
        done = step - self._step0
        tok_s = done * self.tokens_per_step / elapsed
        out = {"tokens_per_s": tok_s, "elapsed_s": elapsed,
               "eta_s": (self.total_steps - step) * elapsed / done if done else float("nan")}
        if self.peak_flops > 0:
            out["mfu"] = tok_s * self.flops_per_token / self.peak_flops
        return out

    def line(self, step: int, loss: float, lr: float, extra: str = "") -> dict[str, float]:
        rates = self.rates(step)
        parts = [f"step {step}/{self.total_steps}", f"loss {loss:.4f}", f"lr {lr:.2e}",
                 f"{format_count(rates['tokens_per_s'])} tok/s"]
        if "mfu" in rates:
            parts.append(f"MFU {100 * rates['mfu']:.1f}%")
        memory = peak_memory_mib(self.device)
        parts.append(f"peak {memory['device'] if memory['device'] else memory['rss']:,.0f} MiB"
                     f"{' GPU' if memory['device'] else ''}")
        parts.append(f"ETA {format_duration(rates['eta_s'])}")
        if extra:
            parts.append(extra)
        self.emit(" | ".join(parts))
        return rates
