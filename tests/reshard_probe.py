"""`megareuse train` that, right after resuming, writes the state it just restored (every rank's
share of the fp32 weights and Adam moments, in the sharded format) to ``$PROBE_DUMP``, for
tests/test_reshard_matrix.py: the test compares it bitwise with the checkpoint it came from.

    torchrun ... tests/reshard_probe.py <train args> --resume <checkpoint>

Nothing here is imported by the package: the probe is patched in from outside.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def install() -> None:
    import torch.distributed as dist

    from megareuse.engine import checkpointer, fragments, sharded

    restore = checkpointer.Checkpointer.restore

    def probed_restore(self, engine, *args, **kwargs):
        state = restore(self, engine, *args, **kwargs)
        dump, ps = Path(os.environ["PROBE_DUMP"]) / sharded.STATE, self.pstate
        entry = sharded.write_chunks(dump / sharded.rank_file(ps.rank),
                                     fragments.collect(engine, self.cfg.model, ps, True, to_host=False))
        entries = [entry]
        if ps.world_size > 1:
            entries = [None] * ps.world_size if ps.rank == 0 else None
            dist.gather_object(entry, entries, dst=0)
        if ps.rank == 0:
            sharded.write_index(dump, fragments.state_shapes(engine, self.cfg.model, True),
                                [c for e in entries for c in e["chunks"]])
        return state

    checkpointer.Checkpointer.restore = probed_restore


if __name__ == "__main__":
    install()
    from megareuse.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
