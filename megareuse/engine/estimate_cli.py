"""`megareuse estimate`: per-GPU memory and step FLOPs of a config before it is queued.

    megareuse estimate --config configs/model/llama_1b.yaml --world-size 8 --gpu-memory-gib 80 \\
        data.seq_len=2048 run.micro_batch_size=4 run.dtype=bf16 parallel.tp=2 parallel.zero_stage=1

prints the estimate for the configured layout (``megareuse.engine.estimate.format_estimate``)
and the same config under ZeRO 0-3 side by side; ``--json`` prints the configured estimate as
JSON instead. A bad input (unknown key, invalid value, world size not a multiple of
``parallel.tp``) prints one line prefixed ``megareuse estimate:`` on stderr and returns 2.
The command only reads the config: nothing is built, started or written.
"""
from __future__ import annotations

import argparse
import json
import sys

from megareuse.config import ConfigError


def cmd_estimate(args: argparse.Namespace) -> int:
    """Run the subcommand; 0 on success (a bad input raises: one stderr line and 2, megareuse/exits.py)."""
    from megareuse.config import load_config
    from megareuse.engine.estimate import estimate, estimate_all_stages, format_estimate

    if args.world_size < 1:
        raise ConfigError(f"config error: --world-size = {args.world_size}: accepted a positive integer")
    if args.gpu_memory_gib is not None and not args.gpu_memory_gib > 0:
        raise ConfigError(f"config error: --gpu-memory-gib = {args.gpu_memory_gib}: accepted a positive number")
    overrides = list(args.overrides)
    if args.gpu_memory_gib is not None and not any(o.startswith("run.device=") for o in overrides):
        overrides.append("run.device=cuda")  # sized against a GPU: NCCL's collectives, not gloo's
    cfg = load_config(args.config, overrides)
    est = estimate(cfg, args.world_size)
    if args.json:
        print(json.dumps(est.to_dict(), indent=2))
        return 0
    report = format_estimate(est, args.gpu_memory_gib)
    stages = estimate_all_stages(cfg, args.world_size, args.gpu_memory_gib)
    print(report)
    print()
    print(stages)
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``estimate`` subcommand to ``subparsers`` (from ``add_subparsers``); returns it."""
    p = subparsers.add_parser(
        "estimate", allow_abbrev=False,
        help="per-GPU memory (params, grads, optimizer, activations) and step FLOPs of a config",
        description="Estimate per-GPU memory under TP x DP and ZeRO 0-3, with and without activation "
                    "checkpointing, and the FLOPs of one optimizer step. Reads the config only.")
    p.add_argument("--config", required=True, help="YAML file (see configs/; model-only files work too)")
    p.add_argument("--world-size", type=int, default=1, help="number of GPUs (a multiple of parallel.tp)")
    p.add_argument("--gpu-memory-gib", type=float, default=None,
                   help="GPU memory in GiB: say whether it fits and the largest micro-batch that does")
    p.add_argument("--json", action="store_true", help="print the configured estimate as JSON (bytes)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.tp=2 run.dtype=bf16")
    p.set_defaults(func=cmd_estimate, value_errors=True)
    return p


def main(argv=None) -> int:
    """Stand-alone entry point: ``python -m megareuse.engine.estimate_cli --config ...``."""
    parser = argparse.ArgumentParser(prog="megareuse")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["estimate", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
