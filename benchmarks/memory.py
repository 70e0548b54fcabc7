"""Peak memory per rank, measured, next to `megareuse estimate`, in one run.

    python benchmarks/memory.py [--model configs/model/llama_85m.yaml] [--world 4]
                                [--zero 0,1,2,3] [--tp 1,2] [--ac none,full] [--steps 2]

Each point is a short real training run (`torchrun` with ``--world`` gloo ranks on CPU: fp32,
micro-batch 1, sequence 128, tiny local data prepared once): it saves one checkpoint (the
streamed consolidation is part of the peak) and writes every rank's peak resident set size to
``summary.json`` (``peak_memory_mib``). Printed per point: the largest rank's peak RSS, the
model-state bytes the estimator gives a rank (weights + gradients + Adam + DeepSpeed buffers)
and its activation bytes, the measured model part (peak RSS minus the process baseline: torch,
DeepSpeed, gloo and data, measured by a one-layer, 64-wide run at the same ZeRO stage), and the
ratio measured / estimated total (the estimator's peak: model states + buffers + the larger of
activations with logits and the step/reduce transients), as a Markdown table (docs/estimate.md holds one). On CPU "device"
memory is 0 and is not shown.
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

from megareuse.config import load_config  # noqa: E402
from megareuse.engine.estimate import estimate  # noqa: E402

SEQ = 128


def run_point(data: Path, out: Path, model_cfg: str, world: int, tp: int, zero: int, ac: str, steps: int,
              extra: tuple[str, ...] = ()) -> dict:
    tokens = steps * SEQ * (world // tp)
    args = ["--config", str(model_cfg), f"data.dir={data}", f"run.out_dir={out}", "data.train={prose: 1.0}",
            "data.valid=[prose]", f"data.seq_len={SEQ}", f"model.max_seq_len={SEQ}", "run.micro_batch_size=1",
            f"run.train_tokens={tokens}", "run.eval_tokens=128", f"run.eval_interval={steps}",
            f"run.save_interval={steps}", "run.log_interval=1", "run.threads=1", f"parallel.tp={tp}",
            f"parallel.zero_stage={zero}", f"model.activation_checkpointing={ac}", "parallel.timeout_s=900",
            "schedule.warmup_steps=1", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", "--standalone",
           str(REPO / "megareuse" / "train.py"), *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"run failed (tp={tp} zero={zero} ac={ac}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    return {"rss": summary["peak_memory_mib"]["rss"], "device": summary["peak_memory_mib"]["device"],
            "wall_s": time.perf_counter() - t0}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(REPO / "configs" / "model" / "llama_85m.yaml"))
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--zero", default="0,1,2,3")
    ap.add_argument("--tp", default="1,2")
    ap.add_argument("--ac", default="none,full")
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args(argv)
    from megareuse.data.preprocess import prepare_default

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        prepare_default(data, domains=["prose"], vocab_size=512, progress=False)
        rows, baselines = [], {}
        tiny = ("model.n_layers=1", "model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2",
                "model.ffn_hidden=128", "model.vocab_size=512")
        for tp in map(int, args.tp.split(",")):
            for zero in map(int, args.zero.split(",")):
                if zero not in baselines:  # the process baseline of this stage: torch, DeepSpeed, gloo, data
                    base = run_point(data, Path(tmp) / f"base_z{zero}", args.model, args.world, 1, zero, "none", 1, tiny)
                    baselines[zero] = max(base["rss"])
                for ac in args.ac.split(","):
                    m = run_point(data, Path(tmp) / f"tp{tp}_z{zero}_{ac}", args.model, args.world, tp, zero, ac,
                                  args.steps)
                    cfg = load_config(args.model, [f"parallel.tp={tp}", f"parallel.zero_stage={zero}",
                                                   "run.micro_batch_size=1", f"data.seq_len={SEQ}",
                                                   f"model.max_seq_len={SEQ}", "run.train_tokens=100000"])
                    est = estimate(cfg, args.world)
                    total = est.total_ckpt if ac != "none" else est.total
                    fixed = est.model_states + est.buffers
                    measured = max(m["rss"]) - baselines[zero]
                    rows.append((tp, zero, ac, max(m["rss"]), min(m["rss"]), baselines[zero], measured,
                                 fixed / 2**20, (total - fixed) / 2**20, total / 2**20, m["wall_s"]))
                    print(f"tp={tp} zero={zero} ac={ac}: peak RSS per rank {m['rss']} MiB", flush=True)
    print(f"\n{args.world} gloo ranks, {Path(args.model).name}, fp32, micro-batch 1 x {SEQ} tokens, "
          f"{args.steps} steps + one checkpoint")
    print("| TP | ZeRO | AC | peak RSS, max rank (MiB) | min rank | baseline | measured model part | "
          "estimate: model states + buffers | estimate: peak on top (activations + logits, or the "
          "step/reduce transients) | estimate: total | measured / estimate | wall |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for tp, zero, ac, hi, lo, base, measured, fixed, top, total, wall in rows:
        print(f"| {tp} | {zero} | {ac} | {hi:.0f} | {lo:.0f} | {base:.0f} | {measured:.0f} | {fixed:.0f} | {top:.0f} | "
              f"{total:.0f} | {measured / total:.2f} | {wall:.0f} s |")

if __name__ == "__main__":
    main()
