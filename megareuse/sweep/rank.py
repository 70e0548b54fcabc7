"""Each rank's entry of a multi-GPU run of a local sweep: ``python -m megareuse.sweep.rank SPEC``.

A sweep worker whose slot holds several GPUs starts its training run under torchrun
(``local.torchrun_command``); every rank reads the run from SPEC, the JSON of the train config,
the sweep's root and the run, and trains it (the Trainer reads its rank from torchrun's
environment). A module of its own: ``megareuse.exits`` names the sweep's errors, so the entry that
uses it cannot live in ``sweep/local.py`` without an import cycle.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from megareuse.exits import guarded
from megareuse.sweep.grid import RunSpec
from megareuse.sweep.local import execute


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or not Path(args[0]).is_file():
        print(f"megareuse sweep: sweep error: arguments {args!r}: accepted one run spec file "
              "(written by a local sweep's worker)", file=sys.stderr)
        return 2

    def rank() -> int:
        from megareuse.engine.ds import shutdown_distributed

        spec = json.loads(Path(args[0]).read_text())
        execute(spec["train"], spec["root"], RunSpec(**spec["run"]), emit=lambda s: print(s, flush=True))
        shutdown_distributed()  # every rank finished the run: tear down before the interpreter does
        return 0
    return guarded("sweep", rank)


if __name__ == "__main__":
    sys.exit(main())
