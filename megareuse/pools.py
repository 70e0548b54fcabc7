"""Worker pools that stay quiet on Ctrl-C (used by prepare, prepare-hf and fit --workers)."""
from __future__ import annotations

import signal
from typing import Callable


def quiet_worker(init: Callable[..., None], *args) -> None:
    """A worker pool's initializer: SIGINT ignored, then ``init(*args)``. Ctrl-C reaches the whole
    process group; the parent reports it in one line (exit 130) and terminates the pool, where
    each worker would otherwise print a KeyboardInterrupt traceback of its own."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    init(*args)
