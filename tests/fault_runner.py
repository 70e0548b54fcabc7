"""`megareuse train` with one fault injected, for the fault-injection tests (tests/test_faults.py).

    python tests/fault_runner.py [--kill-at POINT --on-save N [--rank R]] [--nan-batches 5,6] [--spike-batches 9] -- <train args>

--kill-at POINT   SIGKILL this process (with --rank, only the rank R of a job) during its N-th
                  checkpoint save, at POINT:
                  shard      half-way through writing this rank's share (state/__<rank>_0.distcp)
                  index      after every rank's share is written, before rank 0 writes the index
                  manifest   half-way through writing manifest.json (before the rename)
                  rename     right after the rename that commits the checkpoint, before the
                             directory fsync and retention
                  retention  half-way through deleting a checkpoint that keep_last retires
--nan-batches B   the training loss (and so every gradient) is NaN on the listed global
                  batches of the data stream (1 = the first; without rollbacks, batch k is step k)
--spike-batches B the training loss is 4x its value on the listed batches (a loss spike)

Nothing here is imported by the package: the faults are injected by patching from outside.
"""
from __future__ import annotations

import argparse
import io
import os
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
POINTS = ("shard", "index", "manifest", "rename", "retention")


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install_kill(point: str, on_save: int, rank: int | None = None) -> None:
    import shutil

    from megareuse.engine import checkpoint as ckpt
    from megareuse.engine import sharded
    from megareuse.engine.trainer import Trainer

    saves = [0]
    original_save = Trainer.save

    def counting_save(self):
        self.checkpointer.wait()  # with run.async_save the previous save finishes first: N counts whole saves
        saves[0] += 1
        return original_save(self)

    Trainer.save = counting_save
    me = int(os.environ.get("RANK", "0"))
    armed = lambda: saves[0] == on_save and rank in (None, me)  # noqa: E731

    if point == "shard":
        original_chunks = sharded.write_chunks

        def write_chunks(path, chunks):
            if not armed():
                return original_chunks(path, chunks)
            writer = sharded.ChunkWriter(path)
            for name, offsets, tensor in chunks[: len(chunks) // 2]:
                writer.add(name, offsets, tensor)
            writer._fh.flush()
            os.fsync(writer._fh.fileno())
            die()
        sharded.write_chunks = write_chunks
    elif point == "index":
        original_index = sharded.write_index

        def write_index(*args, **kwargs):
            if armed():
                die()
            return original_index(*args, **kwargs)
        sharded.write_index = write_index
    elif point == "manifest":
        original_bytes = ckpt.write_synced

        def write_bytes_synced(path, write):
            if not (armed() and Path(path).name == ckpt.MANIFEST):
                return original_bytes(path, write)
            buf = io.BytesIO()
            write(buf)
            Path(path).write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
            die()
        ckpt.write_synced = write_bytes_synced
    elif point == "rename":
        original_rename = os.rename

        def rename(src, dst, *args, **kwargs):
            original_rename(src, dst, *args, **kwargs)
            if armed() and Path(src).name.startswith(".tmp-step_"):
                die()
        ckpt.os.rename = rename
    elif point == "retention":
        original_rmtree = shutil.rmtree

        def rmtree(path, *args, **kwargs):
            if armed() and Path(path).name.startswith("step_"):
                files = sorted(p for p in Path(path).rglob("*") if p.is_file())
                for file in files[: len(files) // 2]:
                    file.unlink()
                die()
            return original_rmtree(path, *args, **kwargs)
        ckpt.shutil.rmtree = rmtree


def install_loss_scale(batches: set[int], factor: float) -> None:
    """Multiply the training loss (and so the gradients) by ``factor`` on the listed batches."""
    from megareuse.engine.trainer import Trainer

    original = Trainer.batch_loss

    def batch_loss(self, batch):
        loss = original(self, batch)
        run = self.cfg.run
        position = self.state.samples // (run.micro_batch_size * run.grad_accum * self.pstate.dp_size) + 1
        return loss * factor if position in batches and self.engine.training else loss
    Trainer.batch_loss = batch_loss


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kill-at", choices=POINTS)
    parser.add_argument("--on-save", type=int, default=2)
    parser.add_argument("--rank", type=int, default=None, help="only this rank dies (default: every rank)")
    parser.add_argument("--nan-batches", default="")
    parser.add_argument("--spike-batches", default="")
    parser.add_argument("train_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from megareuse.engine.ds import _select_accelerator
    _select_accelerator()
    if args.kill_at:
        install_kill(args.kill_at, args.on_save, args.rank)
    for batches, factor in ((args.nan_batches, float("nan")), (args.spike_batches, 4.0)):
        if batches:
            install_loss_scale({int(b) for b in batches.split(",")}, factor)
    from megareuse.cli import main as cli_main
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    return cli_main(["train", *train_args])


if __name__ == "__main__":
    sys.exit(main())
