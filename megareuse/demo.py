"""`megareuse demo`: the main job at laptop scale.

For now: prepare the two local corpora (prose, code), train a tiny base model on prose,
evaluate it on both domains, and print and write a summary. It grows into the whole
reuse-or-scratch study as the stages land.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Sequence

from megareuse.config import ConfigError, load_config
from megareuse.engine.metrics import format_duration, read_metrics

REPO = Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO / "configs" / "train" / "tiny_base.yaml"


def _section(title: str) -> None:
    print(f"\n== {title} ==", flush=True)


def _summary_markdown(cfg, summary: dict, losses: dict[str, float], history: list[dict],
                      times: dict[str, float]) -> str:
    from megareuse.model import non_embedding_param_count, param_count
    lines = ["# megareuse demo", "",
             f"Model: d_model {cfg.model.d_model}, {cfg.model.n_layers} layers, {cfg.model.n_heads} heads "
             f"({cfg.model.kv_heads} KV), FFN {cfg.model.ffn_hidden}, vocab {cfg.model.vocab_size}: "
             f"{param_count(cfg.model):,} parameters ({non_embedding_param_count(cfg.model):,} non-embedding).",
             f"Base training on {', '.join(cfg.data.train)}: {summary['tokens']:,} tokens "
             f"({summary['steps']} steps of {cfg.tokens_per_step} tokens), "
             f"{cfg.schedule.kind} schedule, peak lr {cfg.optim.lr:g}.", "",
             "| phase | wall time |", "|---|---|"]
    lines += [f"| {k} | {format_duration(v)} |" for k, v in times.items()]
    lines += ["", "Validation loss (nats/token) of the final checkpoint:", "",
              "| domain | loss | perplexity |", "|---|---|---|"]
    import math
    lines += [f"| {d} | {v:.4f} | {math.exp(v):.1f} |" for d, v in losses.items()]
    if history:
        domains = list(losses)
        lines += ["", "Loss history at evaluation points:", "",
                  "| step | tokens | " + " | ".join(domains) + " |",
                  "|---|---|" + "---|" * len(domains)]
        for rec in history:
            lines.append(f"| {rec['step']} | {rec['tokens']:,} | "
                         + " | ".join(f"{rec.get(f'valid_loss/{d}', float('nan')):.4f}" for d in domains) + " |")
    return "\n".join(lines) + "\n"


def run_demo(out: str | Path = "runs/demo", fresh: bool = False, overrides: Sequence[str] = ()) -> Path:
    from megareuse.data.preprocess import prepare_default
    from megareuse.engine.evaluate import evaluate_checkpoint
    from megareuse.engine.trainer import Trainer

    out = Path(out)
    if not DEMO_CONFIG.is_file():
        raise ConfigError(f"config error: demo config {DEMO_CONFIG} not found; run the demo from a "
                          "source checkout (pip install -e .)")
    data_dir, run_dir = out / "data", out / "base"
    cfg = load_config(DEMO_CONFIG, [f"data.dir={data_dir}", f"run.out_dir={run_dir}", *overrides])
    if fresh and run_dir.exists():
        shutil.rmtree(run_dir)
    times: dict[str, float] = {}

    _section("1/3 prepare the local corpora")
    t0 = time.perf_counter()
    if (data_dir / "prepare.json").is_file():
        print(f"using the prepared data in {data_dir}")
    else:
        prepare_default(data_dir, domains=["prose", "code"], vocab_size=cfg.model.vocab_size)
    times["prepare"] = time.perf_counter() - t0

    _section("2/3 train a tiny base model on prose")
    t0 = time.perf_counter()
    summary = Trainer(cfg, resume="auto").run()
    times["train"] = time.perf_counter() - t0

    _section("3/3 evaluate the final checkpoint")
    t0 = time.perf_counter()
    losses = evaluate_checkpoint(summary["checkpoint"])
    times["evaluate"] = time.perf_counter() - t0

    history = [r for r in read_metrics(run_dir) if r.get("kind") == "eval"]
    report = _summary_markdown(cfg, summary, losses, history, times)
    (out / "summary.md").write_text(report)
    (out / "summary.json").write_text(json.dumps({"valid_loss": losses, "times_s": times,
                                                  "train": summary}, indent=2))
    _section("summary")
    print(report)
    print(f"written to {out.resolve()}/summary.md")
    return out
