"""`megareuse train` with every collective audited against the backends of a CUDA run
(tests/test_collectives.py; launched by torchrun on CPU, gloo).

    python tests/collective_probe.py <train args>

The backend string is the one the trainer requests when CUDA is available (``resolve_backend``
asked with CUDA reported present); the run itself uses gloo, which takes any tensor, so the
audit (megareuse/parallel/backend.py ``CollectiveAudit``) is what tells whether NCCL would
reject a call. Every rank writes ``$PROBE_DIR/rank<N>.json``: the spec and each call's op,
tensor devices, dtype and problem.

Nothing here is imported by the package: the audit is installed from outside.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def cuda_run_backend() -> str:
    """What ``parallel.backend = auto`` becomes in a process that sees a GPU."""
    import torch

    from megareuse.engine.ds import resolve_backend

    with mock.patch.object(torch.cuda, "is_available", lambda: True):
        return resolve_backend("auto")


def main(args: list[str]) -> int:
    from megareuse.cli import main as cli_main
    from megareuse.parallel.backend import CollectiveAudit

    audit = CollectiveAudit(cuda_run_backend())
    try:
        with audit.installed():
            return cli_main(["train", *args])
    finally:
        out = Path(os.environ["PROBE_DIR"]) / f"rank{os.environ.get('RANK', '0')}.json"
        out.write_text(json.dumps({"spec": audit.spec, "calls": [asdict(c) for c in audit.calls]}))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
