"""`megareuse <command>`: the command-line entry point.

Commands: prepare (corpora -> tokenizer + indexed datasets), train (one stage of training),
evaluate (validation loss of a checkpoint), consolidate (one fp32 file), grow, sweep, collect, fit, plan, estimate,
import-hf / export-hf / prepare-hf (Hugging Face Llama checkpoints), demo (the whole study).
Errors and stops end with one line on stderr and an exit code (megareuse/exits.py): 2 for bad
input, 75 checkpointed after a stop signal, 3 diverged, 124 another rank died or hung.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

from megareuse.config import ConfigError
from megareuse.exits import guarded


def _domain_list(value: Optional[str], error: type[Exception], prefix: str) -> Optional[list[str]]:
    """The names of a comma-separated ``--domains``; None when the flag was not given (the
    command's default). An empty value or entry is refused as ``error``, its message after ``prefix``."""
    if value is None:
        return None
    names = value.split(",")
    if not all(name.strip() for name in names):
        raise error(f"{prefix}--domains = {value!r}: accepted a comma-separated list of domain names, "
                    "e.g. prose,code")
    return names


def cmd_prepare(args: argparse.Namespace) -> int:
    from megareuse.data.preprocess import PrepareError, prepare, prepare_default
    if args.input and args.domains is not None:
        raise PrepareError("prepare: --domains (built-in corpora) and --input (your own) were both given; "
                           "accepted one of them")
    if args.valid_docs is not None and args.valid_fraction is not None:
        raise PrepareError("prepare: --valid-docs and --valid-fraction were both given; accepted one of them")
    domains = _domain_list(args.domains, PrepareError, "prepare: ")
    valid = args.valid_docs if args.valid_docs is not None else (
        0.05 if args.valid_fraction is None else args.valid_fraction)
    common = dict(vocab_size=args.vocab_size, workers=args.workers, seed=args.seed, force=args.force,
                  valid=valid, tokenizer=args.tokenizer)
    if args.input:
        from megareuse.data.sources import parse_input
        inputs: dict[str, list[str]] = {}
        for spec in args.input:
            domain, pattern = parse_input(spec)
            inputs.setdefault(domain, []).append(pattern)
        info = prepare(args.out, inputs, fmt=args.format, split=args.split, text_key=args.text_key,
                       skip_bad=args.skip_bad, **common)
    else:
        if domains is not None:
            common["domains"] = domains
        info = prepare_default(args.out, **common)
    for name, d in info["domains"].items():
        skipped = d["empty_documents_skipped"] + d["bad_records_skipped"]
        print(f"{name}: {d['train']['documents']:,} train documents ({d['train']['tokens']:,} tokens), "
              f"{d['valid']['documents']:,} valid ({d['valid']['tokens']:,} tokens)"
              + (f", {d['empty_documents_skipped']:,} empty and {d['bad_records_skipped']:,} bad skipped"
                 if skipped else ""))
    print(f"prepared {args.out} (tokenizer {info['tokenizer']}, vocab {info['vocab_size']})")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from megareuse.config import load_config
    from megareuse.engine.ds import shutdown_distributed
    from megareuse.engine.trainer import Trainer
    overrides = list(args.overrides)
    if args.init_from is not None:
        overrides.append(f"run.init_from={args.init_from}")
    if args.keep_optimizer:
        overrides.append("run.keep_optimizer=true")
    cfg = load_config(args.config, overrides)
    summary = Trainer(cfg, resume=args.resume).run()
    print(json.dumps(summary["valid_loss"]))
    shutdown_distributed()  # the run ended on every rank: tear down before the interpreter does
    return 0


def cmd_grow(args: argparse.Namespace) -> int:
    from megareuse.reuse.growth import grow_checkpoint
    out = grow_checkpoint(args.from_, args.out, width=args.width, depth=args.depth,
                          depth_method=args.depth_method, layer_map=args.layer_map,
                          noise=args.noise, seed=args.seed)
    print(f"grown checkpoint: {out} (train it with --init-from {out})")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from pathlib import Path

    from megareuse.records import collect
    from megareuse.sweep.grid import format_plan, load_experiment, plan_experiment
    from megareuse.sweep.local import run_planned
    if args.nodes < 1 or args.gpus_per_node < 1:
        raise ConfigError(f"config error: --nodes = {args.nodes}, --gpus-per-node = {args.gpus_per_node}: "
                          "accepted integers >= 1")
    if args.workers < 1 or args.dp < 1:
        raise ConfigError(f"config error: --workers = {args.workers}, --dp = {args.dp}: accepted integers >= 1")
    _check_sweep_device_flags(args)
    exp = load_experiment(args.config, args.overrides)
    runs = plan_experiment(exp, dp=args.dp)
    if args.dry_run:
        print(format_plan(runs))
        return 0
    if args.slurm:
        from megareuse.sweep.slurm import runtime_dp, write_slurm
        job_dp = runtime_dp(Path(args.config), tuple(args.overrides), args.nodes, args.gpus_per_node)
        runs = plan_experiment(exp, dp=job_dp)  # checkpoint steps depend on the jobs' DP
        submit = write_slurm(runs, Path(args.config), Path(args.out), Path(args.slurm), dp=job_dp,
                             nodes=args.nodes, gpus_per_node=args.gpus_per_node, time=args.time,
                             partition=args.partition, account=args.account,
                             extra_overrides=tuple(args.overrides), exclusive=not args.share_nodes)
        print(f"wrote SLURM scripts; submit them with: bash {submit}")
        return 0
    run_planned(exp, Path(args.out), dp=args.dp, only=args.run, workers=args.workers,
                gpus_per_run=args.gpus_per_run, runs_per_gpu=args.runs_per_gpu or 1)
    if args.run is None:
        csv_path, _, n = collect(Path(args.out))
        print(f"{n} runs -> {csv_path}")
    return 0


def _check_sweep_device_flags(args: argparse.Namespace) -> None:
    """The local sweep's device flags: in range, and not given where they mean nothing (with
    --slurm a run's GPUs are --nodes x --gpus-per-node; --run runs in this process under its
    launcher). --share-nodes is for --slurm only."""
    if args.gpus_per_run is not None and args.gpus_per_run < 0:
        raise ConfigError(f"config error: --gpus-per-run = {args.gpus_per_run}: accepted an integer >= 0")
    if args.runs_per_gpu is not None and args.runs_per_gpu < 1:
        raise ConfigError(f"config error: --runs-per-gpu = {args.runs_per_gpu}: accepted an integer >= 1")
    local = [f for f, v in (("--gpus-per-run", args.gpus_per_run), ("--runs-per-gpu", args.runs_per_gpu))
             if v is not None]
    if local and args.slurm:
        raise ConfigError(f"config error: {local[0]} is for a local sweep; with --slurm each train run "
                          "gets --nodes x --gpus-per-node GPUs (--share-nodes lets small runs share a node)")
    if local and args.run:
        raise ConfigError(f"config error: {local[0]} is for a local sweep; --run executes one run in "
                          "this process, on the GPUs its launcher gives it")
    if args.share_nodes and not args.slurm:
        raise ConfigError("config error: --share-nodes is for --slurm; locally, --runs-per-gpu lets "
                          "small runs share a GPU")


def cmd_collect(args: argparse.Namespace) -> int:
    from megareuse.records import collect
    csv_path, jsonl_path, n = collect(args.runs_dir, args.out)
    print(f"{n} runs -> {csv_path}, {jsonl_path}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from megareuse.engine.evaluate import evaluate_checkpoint
    if args.tokens is not None and args.tokens <= 0:
        raise ConfigError(f"config error: --tokens = {args.tokens}: accepted a positive integer")
    domains = _domain_list(args.domains, ConfigError, "config error: ")
    losses = evaluate_checkpoint(args.checkpoint, data_dir=args.data, domains=domains,
                                 max_tokens=args.tokens, device=args.device)
    print(json.dumps(losses))
    return 0


def cmd_consolidate(args: argparse.Namespace) -> int:
    from megareuse.engine.consolidate import consolidate
    n, size = consolidate(Path(args.from_), Path(args.out), moments=args.optimizer)
    print(f"{n} tensors ({size / 2**20:.1f} MiB) -> {args.out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from megareuse.demo import run_demo
    if args.workers < 1:
        raise ConfigError(f"config error: --workers = {args.workers}: accepted an integer >= 1")
    run_demo(args.out, fresh=args.fresh, overrides=args.overrides, preset=args.preset, workers=args.workers)
    return 0


class _Parser(argparse.ArgumentParser):
    """No abbreviated options (``--resum`` is not ``--resume``) and one-line errors. Subparsers are
    of the same class (argparse's default ``parser_class``)."""

    def __init__(self, *args, allow_abbrev: bool = False, **kwargs) -> None:
        super().__init__(*args, allow_abbrev=allow_abbrev, **kwargs)

    def error(self, message: str):
        if message.startswith("unrecognized arguments"):
            options = [a.option_strings[0] for a in self._actions
                       if a.option_strings and a.dest != "help" and a.help != argparse.SUPPRESS]
            message += "; accepted options: " + ", ".join(options)
        self.exit(2, f"{self.prog}: error: {message}\n")


_OVERRIDE = re.compile(r"[A-Za-z_]\w*(\.\w+)+=")


def looks_like_override(arg: str) -> bool:
    """Whether ``arg`` is a dotted ``section.field=value`` override."""
    return _OVERRIDE.match(arg) is not None


def _bare_resume(argv: list[str]) -> list[str]:
    """``--resume KEY=VALUE`` is a bare ``--resume`` (auto) followed by an override."""
    return [f"{a}=auto" if a == "--resume" and i + 1 < len(argv) and looks_like_override(argv[i + 1])
            else a for i, a in enumerate(argv)]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse a command line; a command's options may come before, between or after its dotted
    overrides (argparse's intermixed parsing, which does not take subparsers: so the top parser
    only picks the command)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    if not argv or argv[0] not in commands:
        return parser.parse_args(argv)  # -h, or no or an unknown command: the top parser says so
    args = commands[argv[0]].parse_intermixed_args(_bare_resume(argv[1:]))
    args.command = argv[0]
    return args


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="megareuse", description="Reuse-or-scratch studies for LLM pretraining, and the trainer that runs them.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("prepare", help="corpora (your own or built-in) -> tokenizer + .bin/.idx, streamed",
                       description="Tokenize corpora into a prepared data directory: per domain, "
                                   "<domain>_{train,valid}.{bin,idx} (Megatron's format) and one tokenizer.")
    p.add_argument("--out", required=True, help="output directory (appears only when complete)")
    p.add_argument("--input", action="append", default=[], metavar="DOMAIN=PATH_OR_GLOB",
                   help="your corpus: a file, a glob (** recurses) or an HF save_to_disk directory; "
                        "repeat for more files or domains")
    p.add_argument("--domains", default=None, help="built-in corpora instead of --input, comma-separated: "
                                                   "prose, code, pycode, mix (default prose,code)")
    p.add_argument("--format", default=None, choices=("jsonl", "jsonl.gz", "jsonl.zst", "parquet", "text", "hf"),
                   help="input format (default: from each file name; other names are text)")
    p.add_argument("--text-key", default="text", help="the text field of jsonl/parquet/HF records")
    p.add_argument("--split", default="file", choices=("file", "lines"),
                   help="text input: a document per file (default) or per non-blank line")
    p.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="reuse this tokenizer.model / tokenizer.json (or a directory holding one) "
                        "instead of training a new one")
    p.add_argument("--vocab-size", type=int, default=2048, help="of a newly trained tokenizer")
    p.add_argument("--valid-docs", type=int, default=None, metavar="N", help="validation documents per domain")
    p.add_argument("--valid-fraction", type=float, default=None, metavar="F",
                   help="validation share of each domain's documents (default 0.05)")
    p.add_argument("--workers", type=int, default=2, help="tokenizer processes")
    p.add_argument("--seed", type=int, default=1234, help="tokenizer sample and validation draw")
    p.add_argument("--skip-bad", action="store_true",
                   help="count and skip bad records (not JSON, no text key, invalid UTF-8) instead of failing")
    p.add_argument("--force", action="store_true", help="replace an existing prepared directory")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train one stage from a YAML config")
    p.add_argument("--config", required=True, help="YAML file (see configs/)")
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue from the latest complete checkpoint in run.out_dir "
                        "('auto', the default) or from the checkpoint directory given; "
                        "--resume followed by a KEY=VALUE override is a bare --resume "
                        "(write --resume=DIR for a directory named like one)")
    p.add_argument("--init-from", default=None, metavar="CKPT",
                   help="stage 2: start from this base (or grown) checkpoint (= run.init_from)")
    p.add_argument("--keep-optimizer", action="store_true",
                   help="stage 2: carry the base's optimizer state (= run.keep_optimizer)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.n_layers=4 (options "
                                                "may come before, between or after them)")
    # the deepspeed launcher (and torch's older launch) append --local_rank=N; LOCAL_RANK is read
    # from the environment, so the flag is accepted and ignored
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="validation loss per domain of a checkpoint")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", default=None, help="prepared data directory (default: the run's)")
    p.add_argument("--domains", default=None,
                   help="comma-separated domains (or path prefixes) to evaluate (default: the run's data.valid)")
    p.add_argument("--tokens", type=int, default=None, help="tokens per domain")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("consolidate", help="a checkpoint's fp32 weights (and Adam moments) in one safetensors "
                                           "file, as DeepSpeed's zero_to_fp32 gives")
    p.add_argument("--from", dest="from_", required=True, metavar="CKPT")
    p.add_argument("--out", required=True, help="the .safetensors file to write (must not exist)")
    p.add_argument("--optimizer", action="store_true", help="also the Adam moments (exp_avg.<name>, exp_avg_sq.<name>)")
    p.set_defaults(func=cmd_consolidate)

    p = sub.add_parser("grow", help="grow a checkpoint (width, depth by stacking or identity)")
    p.add_argument("--from", dest="from_", required=True, metavar="CKPT")
    p.add_argument("--out", required=True, help="the grown checkpoint directory (must not exist)")
    p.add_argument("--width", type=int, default=1, help="width factor k (d, heads, FFN x k)")
    p.add_argument("--depth", type=int, default=1, help="depth factor g (layers x g)")
    p.add_argument("--depth-method", choices=("stack", "identity"), default="stack")
    p.add_argument("--layer-map", default=None, help='explicit source layer per new layer, e.g. "0,1,0,1"')
    p.add_argument("--noise", type=float, default=0.0, help="function-preserving symmetry-breaking noise")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_grow, value_errors=True)  # growth checks raise ValueError

    p = sub.add_parser("sweep", help="plan and run a D1 x D2 grid (locally, or write SLURM jobs)")
    p.add_argument("--config", required=True, help="experiment YAML (see configs/experiments/)")
    p.add_argument("--out", required=True, help="root directory of the sweep's runs")
    p.add_argument("--dry-run", action="store_true", help="print the plan with token and FLOP totals")
    p.add_argument("--workers", type=int, default=1, help="runs at a time (local)")
    p.add_argument("--gpus-per-run", type=int, default=None, metavar="G",
                   help="local: GPUs of each worker's runs, through CUDA_VISIBLE_DEVICES (default 1 on a "
                        "GPU node with run.device cuda or auto, else 0); G > 1 runs each under torchrun "
                        "with G ranks (plan with --dp G / parallel.tp)")
    p.add_argument("--runs-per-gpu", type=int, default=None, metavar="K",
                   help="local: workers that may share a GPU (default 1); their memory is yours to "
                        "check (megareuse estimate)")
    p.add_argument("--run", "--run-id", dest="run", default=None, metavar="RUN_ID",
                   help="execute this one run of the plan")
    p.add_argument("--dp", type=int, default=1, help="data-parallel ranks per run (token accounting)")
    p.add_argument("--slurm", default=None, metavar="DIR", help="write sbatch job arrays to DIR instead")
    p.add_argument("--nodes", type=int, default=1, help="--slurm: nodes per run")
    p.add_argument("--gpus-per-node", type=int, default=8, help="--slurm: GPUs (ranks) per node")
    p.add_argument("--time", default="24:00:00", help="--slurm: time limit per job")
    p.add_argument("--partition", default=None, help="--slurm: partition")
    p.add_argument("--account", default=None, help="--slurm: account")
    p.add_argument("--share-nodes", action="store_true",
                   help="--slurm: train tasks do not take whole nodes (no --exclusive, --mem=0), so "
                        "SLURM packs runs of few GPUs onto shared nodes")
    p.add_argument("overrides", nargs="*", help="dotted overrides for every run's training config")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("collect", help="gather run records (record.json) into a CSV/JSONL table")
    p.add_argument("runs_dir")
    p.add_argument("--out", default=None, help="output path stem (default RUNS_DIR/runs)")
    p.set_defaults(func=cmd_collect)

    from megareuse.engine.estimate_cli import register as register_estimate
    from megareuse.law.commands import register as register_law

    from megareuse.interop.hf_cli import register as register_hf

    register_law(sub)  # fit, plan
    from megareuse.law.design_cli import register as register_design
    register_design(sub)  # design
    register_estimate(sub)
    register_hf(sub)  # import-hf, export-hf, prepare-hf

    p = sub.add_parser("demo", help="the whole study at laptop scale: prepare, sweep, fit, plan, report")
    p.add_argument("--out", default="runs/demo", help="output directory")
    p.add_argument("--fresh", action="store_true", help="discard the earlier demo runs in --out")
    p.add_argument("--preset", default="laptop", help="laptop (default, ~9 min on 2 cores), workstation, overtrained or settle "
                   "(configs/experiments/)")
    p.add_argument("--workers", type=int, default=1, help="runs at a time")
    p.add_argument("overrides", nargs="*", help="dotted overrides for every run's training config")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        args = parse_args(argv)
    except KeyboardInterrupt:  # Ctrl-C while the command's modules load
        print("megareuse: interrupted (SIGINT)", file=sys.stderr, flush=True)
        return 130
    return guarded(args.command, lambda: args.func(args), getattr(args, "value_errors", False))


if __name__ == "__main__":
    sys.exit(main())
