"""Training micro-batches built ahead of time, in a background thread (``run.prefetch``).

The step that consumes batch k no longer waits for it to be read from the memory-mapped
dataset (and, on CUDA, copied into pinned memory): a thread builds batches k+1 .. k+depth while
the device computes. Batches are a pure function of their first global sample, so the stream is
keyed by it: ``get(first)`` returns exactly ``dataset.batch(first, batch_size)``; a request for
another first sample than the one expected (a resume, a rollback) restarts the stream there.
"""
from __future__ import annotations

import queue
import threading
from typing import Any, Optional

import torch


class Prefetcher:
    """Micro-batches ``first, first + stride, ...`` of ``batch_size`` samples, ``depth`` ahead."""

    def __init__(self, dataset: Any, batch_size: int, stride: int, device: torch.device, depth: int = 2):
        if depth < 1 or batch_size < 1 or stride < 1:
            raise ValueError(f"Prefetcher: depth = {depth}, batch_size = {batch_size}, stride = {stride}: "
                             "accepted positive integers")
        self.dataset, self.batch_size, self.stride, self.depth = dataset, batch_size, stride, depth
        self.device = device
        self.pin = device.type == "cuda"
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._expected: Optional[int] = None

    def _produce(self, first: int, stop: threading.Event, out: queue.Queue) -> None:
        while not stop.is_set():
            try:
                batch = self.dataset.batch(first, self.batch_size)
                item = (first, batch.pin_memory() if self.pin else batch, None)
            except BaseException as exc:  # handed to the consumer, raised there
                item = (first, None, exc)
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[2] is not None:
                return
            first += self.stride

    def _restart(self, first: int) -> None:
        self.close()
        self._stop, self._queue = threading.Event(), queue.Queue(maxsize=self.depth)
        self._thread = threading.Thread(target=self._produce, args=(first, self._stop, self._queue),
                                        name="megareuse-prefetch", daemon=True)
        self._thread.start()

    def get(self, first: int) -> torch.Tensor:
        """``dataset.batch(first, batch_size)`` on the device (copied non-blocking from pinned memory)."""
        if first != self._expected or self._thread is None:
            self._restart(first)
        while True:
            try:
                key, batch, error = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive():
                    raise RuntimeError("the prefetch thread stopped without a batch") from None
        if error is not None:
            self._expected = None
            raise error
        assert key == first, (key, first)
        self._expected = first + self.stride
        return batch.to(self.device, non_blocking=self.pin)

    def close(self) -> None:
        """Stop the thread (it finishes the batch it is building); idempotent."""
        if self._thread is not None:
            self._stop.set()
            while True:  # unblock a producer waiting on a full queue
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
            self._thread.join(timeout=30)
            self._thread = None
        self._expected = None
