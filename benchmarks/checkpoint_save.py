"""Checkpoint save: every rank writing its own share (the sharded format) against rank 0 writing
the consolidated state alone (the format before it), with every writer throttled, in one run.

    python benchmarks/checkpoint_save.py [--model configs/model/llama_85m.yaml] [--world 4]
                                         [--tp 2] [--zero 2] [--mbps 50]

One `torchrun` job of ``--world`` gloo ranks on CPU (fp32) trains one step of the model and then,
at its checkpoint, times both writers of the same state (weights and Adam moments) on every rank:
1. "rank 0": the save before the sharded format, into a scratch directory: DeepSpeed's own
   engine state (every rank its part), then the consolidated weights and moments
   (``consolidate.write_full``: each tensor gathered over TP and ZeRO, written by rank 0; the
   other ranks gather and wait);
2. "sharded": the trainer's own save (``Checkpointer.save``: each rank writes its chunks);
3. "sharded, async": the same save with ``run.async_save`` (each rank's share copied to host
   memory, written on a background thread): "training blocked" is the time until ``save``
   returned, the wall time includes the wait for the background write.
Every file write sleeps as a disk of ``--mbps`` MB/s would (per process: a node-local disk per
rank, or a parallel filesystem with per-client bandwidth), so the wall time shows who writes. Per
rank: bytes written, wall time, and the rise of its resident set over the save (peak during it
minus before it). Printed side by side, with bytes per parameter on disk.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
SEQ = 128


class Throttled:
    """A binary file whose writes take at least len / rate seconds (and are counted)."""

    written = 0

    def __init__(self, fh, rate: float):
        self._fh, self._rate = fh, rate

    def write(self, data) -> int:
        n = memoryview(data).nbytes
        start = time.perf_counter()
        out = self._fh.write(data)
        Throttled.written += n
        left = n / self._rate - (time.perf_counter() - start)
        if left > 0:
            time.sleep(left)
        return out

    def __getattr__(self, name):
        return getattr(self._fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._fh.close()


def rss_mib() -> float:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS")) / 1024


def peak_mib() -> float:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM")) / 1024


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def probe() -> None:
    """Runs inside each rank (``--probe``): patch the writers, time both saves, report."""
    import builtins

    import torch
    import torch.distributed as dist

    from megareuse.engine import checkpointer, consolidate, sharded, weights

    rate = float(os.environ["BENCH_MBPS"]) * 1e6
    report = Path(os.environ["BENCH_REPORT"])

    def throttled_open(file, mode="r", *args, **kwargs):
        fh = builtins.open(file, mode, *args, **kwargs)
        return Throttled(fh, rate) if "w" in mode and "b" in mode else fh

    weights.open = throttled_open  # the module-level name each writer calls
    sharded.open = throttled_open

    def engine_file_save(state_dict, path):  # DeepSpeed's checkpoint engine, through the same disk
        with throttled_open(path, "wb") as fh:
            torch.save(state_dict, fh)
    save = checkpointer.Checkpointer._save

    def measured(self, engine, *args, **kwargs):
        ps, rows = self.pstate, {}
        engine.checkpoint_engine.save = engine_file_save
        scratch = Path(os.environ["BENCH_SCRATCH"])
        for name in ("rank 0", "sharded", "sharded, async"):
            dist.barrier()
            Throttled.written, before = 0, rss_mib()
            reset_peak()
            start = time.perf_counter()
            if name == "rank 0":  # the save before the sharded format: DeepSpeed's copy, then rank 0's files
                engine.save_checkpoint(str(scratch / "deepspeed"), tag="state", save_latest=True)
                for moments, file in ((False, "model.safetensors"), (True, "optimizer.safetensors")):
                    consolidate.write_full(scratch / file if ps.rank == 0 else None, engine, engine.module,
                                           self.cfg.model, ps, moments)
                blocked = time.perf_counter() - start
            elif name == "sharded":
                path = save(self, engine, *args, **kwargs)
                blocked = time.perf_counter() - start
            else:  # the same step again, finished on a background thread (the first copy set aside)
                self.async_save = True
                save(self, engine, *args, **kwargs)
                blocked = time.perf_counter() - start
                self.wait()
                self.async_save = False
            dist.barrier()
            rows[name] = {"wall_s": time.perf_counter() - start, "blocked_s": blocked, "bytes": Throttled.written,
                          "rss_rise_mib": peak_mib() - before}
        with open(report / f"rank{ps.rank}.json", "w") as fh:
            json.dump(rows, fh)
        return path

    checkpointer.Checkpointer._save = measured
    from megareuse.cli import main as cli_main

    sys.exit(cli_main(["train", *sys.argv[2:]]))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(REPO / "configs" / "model" / "llama_85m.yaml"))
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--zero", type=int, default=2)
    ap.add_argument("--mbps", type=float, default=50.0, help="each writer's throttle, MB/s")
    args = ap.parse_args(argv)
    from megareuse.config import load_config
    from megareuse.data.preprocess import prepare_default
    from megareuse.model import param_count

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data, out, report, scratch = tmp / "data", tmp / "run", tmp / "report", tmp / "scratch"
        report.mkdir()
        scratch.mkdir()
        prepare_default(data, domains=["prose"], vocab_size=512, progress=False)
        dp = args.world // args.tp
        train = ["--config", args.model, f"data.dir={data}", f"run.out_dir={out}", "data.train={prose: 1.0}",
                 "data.valid=[prose]", f"data.seq_len={SEQ}", f"model.max_seq_len={SEQ}", "run.micro_batch_size=1",
                 f"run.train_tokens={SEQ * dp}", "run.eval_tokens=128", "run.eval_interval=1000",
                 "run.save_interval=1", "run.log_interval=1", "run.threads=1", f"parallel.tp={args.tp}",
                 f"parallel.zero_stage={args.zero}", "parallel.timeout_s=1800", "schedule.warmup_steps=1",
                 "run.async_save=false"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO),
               "BENCH_MBPS": str(args.mbps), "BENCH_REPORT": str(report), "BENCH_SCRATCH": str(scratch)}
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.world}", "--standalone",
               __file__, "--probe", *train]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:
            raise SystemExit(f"run failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
        ranks = [json.loads((report / f"rank{r}.json").read_text()) for r in range(args.world)]
        ckpt = out / "checkpoints" / "step_00000001"
        on_disk = {"rank 0": sum(f.stat().st_size for f in scratch.rglob("*") if f.is_file()),
                   "sharded": sum(f.stat().st_size for f in (ckpt / "state").iterdir())}
        on_disk["sharded, async"] = on_disk["sharded"]
        n = param_count(load_config(args.model, []).model)
    print(f"{args.world} gloo ranks (TP={args.tp}, DP={dp}, ZeRO-{args.zero}), {Path(args.model).name} "
          f"({n:,} parameters), fp32; every writer throttled to {args.mbps:g} MB/s")
    print("| path | save wall (s) | training blocked (s) | bytes written per rank (MB) | max rank / (total / world) | "
          "RSS rise per rank (MiB) | state on disk, bytes/param |")
    print("|---|---:|---:|---|---:|---|---:|")
    for name in ("rank 0", "sharded", "sharded, async"):
        walls = [r[name]["wall_s"] for r in ranks]
        written = [r[name]["bytes"] for r in ranks]
        share = max(written) / (sum(written) / args.world)
        blocked = max(r[name]["blocked_s"] for r in ranks)
        print(f"| {name} | {max(walls):.1f} | {blocked:.1f} | {', '.join(f'{b / 1e6:.0f}' for b in written)} | {share:.2f} | "
              f"{', '.join('%.0f' % r[name]['rss_rise_mib'] for r in ranks)} | {on_disk[name] / n:.2f} |")
    ratio = max(r["rank 0"]["wall_s"] for r in ranks) / max(r["sharded"]["wall_s"] for r in ranks)
    print(f"sharded save {ratio:.2f}x faster than the rank-0 path (world = {args.world})")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--probe":
        probe()
    else:
        main()
