"""Training throughput of megareuse against peers, measured in one run, interleaved.

    python benchmarks/train_throughput.py [--model tiny,25m] [--steps 30] [--warmup 10]
                                          [--rounds 2] [--peers megareuse,hf,bare,torchtitan]
                                          [--variants prefetch,sync-every-step,compile]
                                          [--save-timing] [--set model.compile=true] [--json FILE]
                                          [--in-process]

Every implementation trains the same model shape on the same batches (the same samples of a
small local corpus, prepared once), with AdamW, the same learning rate, weight decay and
gradient clipping, one after the other (each round starting with the next implementation), for
``--rounds`` rounds. Each run has a fresh Python process of its own (``--in-process``: all in
this one), so nothing one leaves in a process (the host allocator's heap, thread pools, compile
caches, the peak RSS) reaches the next:

- ``megareuse``: the real training loop, as ``megareuse train`` runs it (DeepSpeed engine,
  divergence guard, metrics log, progress line); throughput from the loop's own per-step clock
  in metrics.jsonl, steps after ``--warmup`` (the end-of-run evaluation and checkpoint are
  outside the timed steps);
- ``hf``: transformers' ``LlamaForCausalLM`` of the same shape + torch AdamW, a plain loop;
- ``bare``: a plain loop over megareuse's own ``GPT`` + torch AdamW (the model without the
  trainer: the difference to ``megareuse`` is the trainer's cost or gain);
- ``torchtitan``: torchtitan's Llama 3 model (the 0.2 series, ``pip install 'torchtitan>=0.2,<0.3'``)
  of the same shape, when it imports (skipped with the reason if not);
- ``megareuse[X]``: megareuse with one speed switch flipped against the device's defaults
  (``--variants``: prefetch / no-prefetch, sync-every-step, compile, sdpa / fused-attention), so
  each feature's effect is measured; its row shows how fast the default is against it.

``--save-timing`` also writes one checkpoint synchronously and one with ``run.async_save`` after
megareuse's run and prints how long each blocked training.

Printed per model: tokens/s of each (median over rounds), MFU where the device's peak is known,
peak memory (CUDA: max allocated; CPU: peak RSS of the process during that run), the ratio of
the medians to megareuse, and megareuse's ratio to each peer within each round (median and
range: both ran in the same round, so a shared machine's drift between rounds cancels). CPU
runs use fp32; CUDA runs bf16 (megareuse: DeepSpeed bf16; peers: autocast).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from megareuse.atomic import write_text_atomic  # noqa: E402
from megareuse.config import Config, load_config  # noqa: E402
from megareuse.model import flops_per_token, non_embedding_param_count, param_count  # noqa: E402

MODELS = {"tiny": "configs/model/tiny.yaml", "25m": "configs/model/llama_25m.yaml",
          "85m": "configs/model/llama_85m.yaml", "350m": "configs/model/llama_350m.yaml",
          "1.1b": "configs/model/llama_1b.yaml"}
PEERS = ("megareuse", "hf", "bare", "torchtitan")
# megareuse with one speed switch flipped against the device's defaults: each feature measured
VARIANTS = {"prefetch": ["run.prefetch=true"], "no-prefetch": ["run.prefetch=false"],
            "sync-every-step": ["run.sync_every_step=true"], "compile": ["model.compile=true"],
            "sdpa": ["model.attention=sdpa"], "fused-attention": ["model.attention=auto"]}
DEFAULT_VARIANTS = {"cpu": "prefetch,sync-every-step,compile", "cuda": "no-prefetch,sync-every-step,fused-attention"}


# ---------------------------------------------------------------- memory
def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # the kernel's peak RSS (VmHWM) restarts from the current RSS
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- the runs
def run_megareuse(cfg: Config, steps: int, warmup: int, out: Path, save_timing: bool) -> dict:
    """The real training loop; its throughput from the loop's own clock (metrics.jsonl) over the
    steps after ``warmup``. The run's final checkpoint is left out (a 1.1B one is ~17 GB); with
    ``save_timing`` a checkpoint is then written twice, synchronously and with run.async_save, and
    the seconds training is blocked (and the whole write) are reported for each."""
    from megareuse.engine import checkpoint as ckpt
    from megareuse.engine.metrics import read_metrics
    from megareuse.engine.trainer import Trainer
    cfg = Config.from_dict(cfg.to_dict())
    cfg.run.out_dir = str(out)
    cfg.run.train_tokens = steps * cfg.tokens_per_step
    cfg.run.log_interval = math.gcd(steps, warmup)  # losses are read (a host sync) at log steps only
    cfg.run.eval_interval = cfg.run.save_interval = 10**9  # evaluation and checkpoint at the end only
    cfg.run.eval_tokens = cfg.data.seq_len * cfg.run.micro_batch_size
    cfg.run.write_record = False
    trainer = Trainer(cfg, emit=lambda s: None)
    trainer.save = lambda: ckpt.checkpoint_dir(trainer.ckpt_root, trainer.state.step)  # no final checkpoint
    reset_peak(trainer.device)
    trainer.run()
    elapsed = {r["step"]: r["elapsed_s"] for r in read_metrics(out) if r.get("kind") == "train" and "elapsed_s" in r}
    seconds = elapsed[steps] - elapsed[warmup]
    got = {"tokens_per_s": (steps - warmup) * cfg.tokens_per_step / seconds, "peak_mib": peak_mib(trainer.device)}
    if save_timing:
        del trainer.save
        for mode in (False, True):
            trainer.checkpointer.async_save = mode
            sync(trainer.device)
            t0 = time.perf_counter()
            trainer.save()
            blocked = time.perf_counter() - t0
            trainer.checkpointer.wait()
            got[f"save_{'async' if mode else 'sync'}"] = {"blocked_s": blocked, "total_s": time.perf_counter() - t0}
    return got


def plain_loop(model: torch.nn.Module, loss_fn: Callable, cfg: Config, batches: list[torch.Tensor], steps: int,
               warmup: int, device: torch.device, bf16: bool) -> dict:
    """The loop a user writes by hand: forward, backward, clip, AdamW step; no logging."""
    o = cfg.optim
    params = list(model.parameters())
    decay = [p for p in params if p.ndim >= 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                            lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=device.type in ("cpu", "cuda"))
    reset_peak(device)
    t0 = time.perf_counter()
    for step in range(steps):
        if step == warmup:
            sync(device)
            t0 = time.perf_counter()
        for micro in range(cfg.run.grad_accum):
            batch = batches[(step * cfg.run.grad_accum + micro) % len(batches)].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = loss_fn(model, batch) / cfg.run.grad_accum
            loss.backward()
        if o.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, o.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync(device)
    seconds = time.perf_counter() - t0
    return {"tokens_per_s": (steps - warmup) * cfg.tokens_per_step / seconds, "peak_mib": peak_mib(device)}


def ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def build_hf(cfg: Config):
    from transformers import LlamaConfig, LlamaForCausalLM
    m = cfg.model
    hf = LlamaConfig(vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.ffn_hidden,
                     num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads, num_key_value_heads=m.n_kv_heads,
                     max_position_embeddings=m.max_seq_len, rms_norm_eps=m.norm_eps, rope_theta=m.rope_theta,
                     tie_word_embeddings=m.tie_embeddings, attention_bias=False, mlp_bias=False)
    hf._attn_implementation = "sdpa"
    model = LlamaForCausalLM(hf)
    return model, lambda model, b: ce(model(input_ids=b[:, :-1]).logits, b[:, 1:])


def build_bare(cfg: Config):
    from megareuse.model import GPT
    model = GPT(cfg.model)
    return model, lambda model, b: model(b[:, :-1], b[:, 1:])


TORCHTITAN = "torchtitan>=0.2,<0.3"  # 0.3 builds language models with flex / varlen attention only


def build_torchtitan(cfg: Config):
    """torchtitan's Llama 3 (the 0.2 series) of megareuse's shape: the same FFN width and head
    counts, plain RoPE (torchtitan's Llama 3.1 frequency scaling off), SDPA, tied embeddings
    where megareuse ties them. Its parameter count must equal megareuse's."""
    try:
        from torchtitan.models.llama3.model.args import RoPEScalingArgs, TransformerModelArgs
        from torchtitan.models.llama3.model.model import Transformer
    except Exception as exc:  # not installed, another series, or needs a newer torch than this one
        raise RuntimeError(f"torchtitan's Llama 3 does not import here ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''}); pip install '{TORCHTITAN}'") from None
    m = cfg.model
    base = int(2 * 4 * m.d_model / 3)  # torchtitan's width before its multiplier and rounding
    args = TransformerModelArgs(dim=m.d_model, n_layers=m.n_layers, n_heads=m.n_heads, n_kv_heads=m.n_kv_heads,
                                vocab_size=m.vocab_size, norm_eps=m.norm_eps, rope_theta=m.rope_theta,
                                max_seq_len=m.max_seq_len, multiple_of=m.ffn_hidden,
                                ffn_dim_multiplier=min(1.0, m.ffn_hidden / base),
                                rope_scaling_args=RoPEScalingArgs(scaling_factor=1.0))  # SDPA, causal: the default
    model = Transformer(args)
    with torch.no_grad():
        model.init_weights()
    if m.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    got, want = sum(p.numel() for p in model.parameters()), param_count(m)
    if got != want:
        raise ValueError(f"torchtitan's model has {got:,} parameters, megareuse's {want:,}: the shapes differ")
    return model, lambda model, b: ce(model(b[:, :-1]), b[:, 1:])


BUILDERS = {"hf": build_hf, "bare": build_bare, "torchtitan": build_torchtitan}


def model_config(name: str, data: Path, device: str, overrides: list[str], seq: Optional[int],
                 micro: Optional[int], accum: int, threads: Optional[int] = None) -> Config:
    path = MODELS.get(name, name)
    cuda = device == "cuda"
    seq = seq or (2048 if cuda else 128)
    micro = micro or (4 if cuda else 8)
    base = [f"data.dir={data}", "data.train={prose: 1.0}", "data.valid=[prose]", f"data.seq_len={seq}",
            f"model.max_seq_len={max(seq, 32)}", f"run.micro_batch_size={micro}", f"run.grad_accum={accum}",
            f"run.device={device}", f"run.dtype={'bf16' if cuda else 'fp32'}", "schedule.warmup_steps=1",
            "parallel.zero_stage=0", *([f"run.threads={threads}"] if threads else [])]
    return load_config(str(REPO / path), base + overrides)


def variant(cfg: Config, name: str) -> Config:
    from megareuse.config import apply_overrides
    return Config.from_dict(apply_overrides(cfg.to_dict(), VARIANTS[name])).validate()


def run_one(name: str, cfg: Config, peer: str, steps: int, warmup: int, work: Path, save_timing: bool) -> dict:
    """One implementation trained once, in this process: its result, or {"skipped": why}."""
    from megareuse.engine.ds import resolve_device
    from megareuse.engine.inputs import open_training_data
    device = resolve_device(cfg.run.device)
    torch.manual_seed(cfg.run.seed)
    try:
        if peer == "megareuse":
            return run_megareuse(cfg, steps, warmup, work / name, save_timing)
        if peer.startswith("megareuse["):
            return run_megareuse(variant(cfg, peer[10:-1]), steps, warmup, work / f"{name}-{peer[10:-1]}", False)
        data = open_training_data(cfg.data, cfg.model)
        per_step = cfg.run.micro_batch_size
        batches = [data.train.batch(i * per_step, per_step) for i in range(steps * cfg.run.grad_accum)]
        model, loss_fn = BUILDERS[peer](cfg)
        model = model.to(device)
        if cfg.model.compile:  # every block, as megareuse does
            blocks = model.model.layers if peer == "hf" else model.layers
            for layer in (blocks.values() if isinstance(blocks, torch.nn.ModuleDict) else blocks):
                layer.compile()
        return plain_loop(model, loss_fn, cfg, batches, steps, warmup, device, cfg.run.dtype == "bf16")
    except RuntimeError as exc:
        if peer != "torchtitan":
            raise
        return {"skipped": str(exc).splitlines()[0]}


def run_isolated(argv: list[str], name: str, peer: str, work: Path) -> dict:
    """``run_one`` in a fresh Python process: nothing one implementation leaves behind in a process
    (the host allocator's heap, thread pools, compile caches, imported modules, the peak RSS)
    reaches the next."""
    work.mkdir(parents=True, exist_ok=True)
    result = work / f"{name}-{peer}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--model", name, "--one", peer,
           "--result", str(result), "--work", str(work)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0 or not result.is_file():
        raise SystemExit(f"{peer} on {name} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}")
    got = json.loads(result.read_text())
    result.unlink()
    return got


def measure(name: str, cfg: Config, peers: list[str], rounds: int, run: Callable[[str, int], dict],
            progress: Optional[Callable[[dict], None]] = None) -> dict:
    """``rounds`` rounds of every peer in turn (``run(peer, round)``), then the medians. Each round
    starts one peer later than the one before, so no implementation always runs first. After each
    run ``progress`` gets the summary so far (a killed benchmark keeps what it measured)."""
    results: dict[str, dict] = {p: {"runs": []} for p in peers}
    for r in range(rounds):
        for peer in peers[r % len(peers):] + peers[:r % len(peers)]:
            if "skipped" in results[peer]:
                continue
            got = run(peer, r)
            if "skipped" in got:
                results[peer]["skipped"] = got["skipped"]
            else:
                results[peer]["runs"].append(got)
                print(f"  {name} round {r + 1}/{rounds} {peer:10s} {got['tokens_per_s']:>10,.0f} tok/s  "
                      f"peak {got['peak_mib']:,.0f} MiB", flush=True)
            if progress:
                progress(summarize(name, cfg, results))
    return summarize(name, cfg, results)


def summarize(name: str, cfg: Config, results: dict[str, dict]) -> dict:
    """One model's point: each implementation's median tokens/s, MFU, peak memory and megareuse's
    ratio to it within each round, over the runs it has so far (``results`` is left as it is)."""
    from megareuse.engine.ds import resolve_device
    from megareuse.engine.loop import peak_flops
    device = resolve_device(cfg.run.device)
    peak = peak_flops(device, cfg.run.peak_tflops)
    fpt = flops_per_token(cfg.model, cfg.data.seq_len)
    results = json.loads(json.dumps(results))  # a copy: the figures below are of these runs only
    ours = results.get("megareuse", {}).get("runs", [])
    for peer, res in results.items():
        if res["runs"]:
            res["tokens_per_s"] = statistics.median(x["tokens_per_s"] for x in res["runs"])
            if peer != "megareuse" and len(ours) == len(res["runs"]):
                # megareuse / this peer within each round (both ran in it): robust to the
                # machine's drift between rounds, which moves both alike
                res["paired_ratios"] = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(ours, res["runs"])]
            res["peak_mib"] = max(x["peak_mib"] for x in res["runs"])
            res["mfu"] = res["tokens_per_s"] * fpt / peak if peak else None
            for key in ("save_sync", "save_async"):
                if key in res["runs"][0]:
                    res[key] = {k: statistics.median(x[key][k] for x in res["runs"]) for k in ("blocked_s", "total_s")}
    return {"model": name, "params": param_count(cfg.model), "non_embedding_params": non_embedding_param_count(cfg.model),
            "seq_len": cfg.data.seq_len, "micro_batch": cfg.run.micro_batch_size, "grad_accum": cfg.run.grad_accum,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x {torch.get_num_threads()} threads",
            "dtype": cfg.run.dtype, "compile": cfg.model.compile, "attention": cfg.model.attention,
            "results": results}


def table(points: list[dict]) -> str:
    rows = ["| model | device | impl | tokens/s | MFU | peak MiB | vs megareuse | per round: median (range) |",
            "|---|---|---|---|---|---|---|---|"]
    for pt in points:
        ours = pt["results"].get("megareuse", {}).get("tokens_per_s")
        for peer, res in pt["results"].items():
            if "skipped" in res:
                rows.append(f"| {pt['model']} | {pt['device']} | {peer} | skipped: {res['skipped']} | | | | |")
                continue
            mfu = f"{100 * res['mfu']:.1f}%" if res.get("mfu") else "-"
            ratio = f"{ours / res['tokens_per_s']:.2f}x" if ours and peer != "megareuse" else "1.00x"
            if peer.startswith("megareuse["):  # a switch flipped: its gain over the default
                ratio = f"default {ours / res['tokens_per_s']:.2f}x of this"
            paired = res.get("paired_ratios")
            per_round = (f"{statistics.median(paired):.2f}x ({min(paired):.2f}-{max(paired):.2f})"
                         if paired else "")
            rows.append(f"| {pt['model']} | {pt['device']} | {peer} | {res['tokens_per_s']:,.0f} | {mfu} | "
                        f"{res['peak_mib']:,.0f} | {ratio} | {per_round} |")
    for pt in points:
        res = pt["results"].get("megareuse", {})
        if "save_sync" in res:
            rows.append(f"\n{pt['model']}: checkpoint save blocks training {res['save_sync']['blocked_s']:.2f} s "
                        f"synchronously, {res['save_async']['blocked_s']:.2f} s with run.async_save "
                        f"(whole write {res['save_sync']['total_s']:.2f} s / {res['save_async']['total_s']:.2f} s)")
    return "\n".join(rows)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="comma-separated: " + ", ".join(MODELS) +
                    " or config paths (default tiny,25m on CPU; 350m,1.1b on CUDA)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--peers", default=",".join(PEERS))
    ap.add_argument("--variants", default=None, help="megareuse with one switch flipped, comma-separated: " +
                    ", ".join(VARIANTS) + " or none (default: " + "; ".join(f"{k}: {v}" for k, v in DEFAULT_VARIANTS.items()) + ")")
    ap.add_argument("--save-timing", action="store_true", help="also time a checkpoint save, sync and async")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seq", type=int, default=None, help="sequence length (default 128 CPU, 2048 CUDA)")
    ap.add_argument("--micro-batch", type=int, default=None, help="default 8 CPU, 4 CUDA")
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--data", default=None, help="a prepared data directory (default: prepared into a temp dir)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="a config override for every implementation")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--in-process", action="store_true", help="run every implementation in this process "
                    "(default: each run in a fresh process; gpu.sh saves the start-ups within its time limit)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child: this peer, once
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not 0 < args.warmup < args.steps:
        ap.error(f"--warmup = {args.warmup}: accepted 1 .. --steps - 1 ({args.steps - 1})")
    peers = args.peers.split(",")
    bad = [p for p in peers if p not in PEERS]
    if bad:
        ap.error(f"--peers: {bad} unknown; accepted {', '.join(PEERS)}")
    variants = (DEFAULT_VARIANTS[args.device] if args.variants is None else args.variants).split(",")
    variants = [v for v in variants if v not in ("none", "")]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        ap.error(f"--variants: {bad} unknown; accepted {', '.join(VARIANTS)} or none")
    if variants and "megareuse" not in peers:
        ap.error("--variants needs megareuse among --peers (the variants are compared with it)")
    peers += [f"megareuse[{v}]" for v in variants]
    if args.threads:
        torch.set_num_threads(args.threads)
    config = lambda name, data: model_config(  # noqa: E731
        name, data, args.device, args.overrides, args.seq, args.micro_batch, args.grad_accum, args.threads)
    if args.one:  # a child of run_isolated
        got = run_one(args.model, config(args.model, Path(args.data)), args.one, args.steps, args.warmup,
                      Path(args.work), args.save_timing)
        Path(args.result).write_text(json.dumps(got))
        return
    models = (args.model or ("350m,1.1b" if args.device == "cuda" else "tiny,25m")).split(",")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data) if args.data else Path(tmp) / "data"
        if not args.data:
            from megareuse.data.preprocess import prepare_default
            prepare_default(data, domains=["prose"], vocab_size=2048, progress=False)
        child = ["--device", args.device, "--steps", str(args.steps), "--warmup", str(args.warmup),
                 "--grad-accum", str(args.grad_accum), "--data", str(data),
                 *[a for flag, v in (("--seq", args.seq), ("--micro-batch", args.micro_batch),
                                     ("--threads", args.threads)) if v for a in (flag, str(v))],
                 *[a for o in args.overrides for a in ("--set", o)], *(["--save-timing"] if args.save_timing else [])]
        points = []
        for name in models:
            cfg = config(name, data)
            print(f"{name}: {param_count(cfg.model):,} parameters, seq {cfg.data.seq_len}, batch "
                  f"{cfg.run.micro_batch_size} x {cfg.run.grad_accum}, {cfg.run.dtype}, compile={cfg.model.compile}, "
                  f"{'in this process' if args.in_process else 'each run in a fresh process'}", flush=True)
            work = Path(tmp) / name
            if args.in_process:
                run = lambda peer, r: run_one(name, cfg, peer, args.steps, args.warmup, work / f"r{r}",  # noqa: E731
                                              args.save_timing)
            else:
                run = lambda peer, r: run_isolated(child, name, peer, work / f"r{r}")  # noqa: E731
            done = list(points)
            save = lambda pt: write_json(args.json, done + [{**pt, "isolated": not args.in_process}],  # noqa: E731
                                         complete=False)
            points.append(measure(name, cfg, peers, args.rounds, run, save if args.json else None))
            points[-1]["isolated"] = not args.in_process
    print()
    print(table(points))
    if args.json:
        write_json(args.json, points, complete=True)


def write_json(path: str, points: list[dict], complete: bool) -> None:
    """The results so far, replaced atomically; ``complete`` is false until every run has ended."""
    write_text_atomic(Path(path), json.dumps({"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
                                              "argv": sys.argv[1:], "complete": complete, "points": points}, indent=2))


if __name__ == "__main__":
    main()
