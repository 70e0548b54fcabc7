"""`megareuse import-hf`, `export-hf` and `prepare-hf`: Hugging Face Llama interop commands.

    megareuse import-hf --from hf/TinyLlama --out ckpt/tinyllama --d1 3T
    megareuse prepare-hf --tokenizer ckpt/tinyllama --out data/tl --domains prose,code
    megareuse export-hf --from runs/cpt/checkpoints/step_00000500 --out hf/cpt --dtype bfloat16

Hook into the CLI with ``register(subparsers)`` (from ``argparse``'s ``add_subparsers``). Each
command prints its result path on stdout; a bad input prints one line prefixed
``megareuse <command>:`` on stderr, returns 2 and writes nothing. See docs/hf.md.
"""
from __future__ import annotations

import argparse
import glob
import math
import sys
import warnings
from pathlib import Path


def parse_count(text: str, what: str = "--d1") -> int:
    """``"3T"``, ``"1.5e12"``, ``"2B"``, ``"100M"``, ``"64K"``, ``"1_000"`` -> int (>= 0)."""
    from megareuse.counts import parse_count as count
    from megareuse.interop.hf import HFError
    try:
        value = count(str(text).replace("_", ""))
    except ValueError:
        value = -1.0
    if not (math.isfinite(value) and value >= 0):
        raise HFError(f"{what} = {text!r}: accepted a non-negative token count such as 3T, 2.5e12, 500B")
    return int(round(value))


def _warn_to_stderr(command: str):
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"megareuse {command}: warning: {str(message).removeprefix(command + ': ')}", file=sys.stderr)
    return show


def cmd_import_hf(args: argparse.Namespace) -> int:
    """``import-hf``: HF directory -> megareuse checkpoint directory (printed)."""
    from megareuse.interop.hf import import_hf
    d1 = parse_count(args.d1, "--d1")
    with warnings.catch_warnings():
        warnings.showwarning = _warn_to_stderr("import-hf")
        out = import_hf(args.src, args.out, d1=d1, max_seq_len=args.max_seq_len)
    print(out)
    return 0


def cmd_export_hf(args: argparse.Namespace) -> int:
    """``export-hf``: megareuse checkpoint -> HF directory (printed)."""
    from megareuse.interop.hf import export_hf
    out = export_hf(args.src, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size)
    print(out)
    return 0


def _domains(args: argparse.Namespace):
    """``--files NAME=GLOB`` (repeatable) mapping, else the built-in ``--domains`` list."""
    from megareuse.interop.hf import HFError
    if not args.files:
        return [d for d in args.domains.split(",") if d]
    mapping: dict[str, list[Path]] = {}
    seen: dict[str, set[Path]] = {}
    for item in args.files:
        name, sep, pattern = item.partition("=")
        if not sep or not name or not pattern:
            raise HFError(f"--files {item!r}: accepted NAME=GLOB, e.g. prose=corpus/prose/*.txt")
        matched = [p for p in sorted(Path(p) for p in glob.glob(pattern, recursive=True)) if p.is_file()]
        if not matched:
            raise HFError(f"--files {item!r}: the pattern matches no files")
        taken = seen.setdefault(name, set())
        new = [p for p in matched if p.resolve() not in taken]
        taken.update(p.resolve() for p in new)
        if len(new) < len(matched):  # overlapping globs: each document is tokenized once
            print(f"megareuse prepare-hf: note: --files {item!r}: {len(matched) - len(new)} of its "
                  f"{len(matched)} files were already matched for domain {name!r}; each is taken once",
                  file=sys.stderr)
        mapping.setdefault(name, []).extend(new)
    return mapping


def cmd_prepare_hf(args: argparse.Namespace) -> int:
    """``prepare-hf``: tokenize corpora with an existing tokenizer (output dir printed)."""
    from megareuse.interop.hf_data import prepare_with_tokenizer
    if args.workers < 1:
        from megareuse.interop.hf import HFError
        raise HFError(f"--workers = {args.workers}: accepted an integer >= 1")
    prepare_with_tokenizer(args.out, _domains(args), args.tokenizer, workers=args.workers,
                           seed=args.seed, force=args.force, progress=False,
                           corpus_options={"code": {"max_bytes": args.code_max_bytes}})
    print(args.out)
    return 0


def register(subparsers) -> None:
    """Add ``import-hf``, ``export-hf`` and ``prepare-hf`` to ``subparsers``."""
    p = subparsers.add_parser(
        "import-hf", allow_abbrev=False,
        help="a local Hugging Face Llama checkpoint -> a megareuse checkpoint",
        description="Convert config.json + safetensors (sharded or not) into a megareuse checkpoint "
                    "directory usable with `megareuse train --init-from`. Never downloads.")
    p.add_argument("--from", dest="src", required=True, metavar="HF_DIR",
                   help="HF model directory (config.json, *.safetensors)")
    p.add_argument("--out", required=True, metavar="CKPT", help="checkpoint directory to create (new or empty)")
    p.add_argument("--d1", required=True, metavar="TOKENS",
                   help="tokens the model was pretrained on (e.g. 3T, 2.5e12); 0 records none and "
                        "stage 2 will refuse the checkpoint")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="model.max_seq_len (default: config.json max_position_embeddings)")
    p.set_defaults(func=cmd_import_hf)

    p = subparsers.add_parser(
        "export-hf", allow_abbrev=False,
        help="a megareuse checkpoint -> a Hugging Face Llama directory",
        description="Write config.json + safetensors (+ tokenizer files) loadable with "
                    "LlamaForCausalLM.from_pretrained, from any checkpoint (any TP / ZeRO layout, grown or not).")
    p.add_argument("--from", dest="src", required=True, metavar="CKPT",
                   help="checkpoint directory (step_XXXXXXXX or import/grow output)")
    p.add_argument("--out", required=True, metavar="HF_DIR", help="output directory (new or empty)")
    p.add_argument("--dtype", default="float32", metavar="DTYPE", help="float32 (default), bfloat16 or float16")
    p.add_argument("--max-shard-size", default="2GB", metavar="SIZE", help="largest safetensors shard (default 2GB)")
    p.set_defaults(func=cmd_export_hf)

    p = subparsers.add_parser(
        "prepare-hf", allow_abbrev=False,
        help="like `prepare`, but tokenize with an existing (imported) tokenizer",
        description="Write a prepared data directory (tokenizer copied, <domain>_{train,valid}.{bin,idx}) "
                    "with the tokenizer of an imported checkpoint, so stage 2 passes the tokenizer check.")
    p.add_argument("--tokenizer", required=True,
                   help="imported checkpoint, HF model directory, or tokenizer.model / tokenizer.json")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--domains", default="prose,code", help="built-in domains, comma-separated")
    p.add_argument("--files", action="append", default=[], metavar="NAME=GLOB",
                   help="a domain of your own: one document per file (repeatable; replaces --domains)")
    p.add_argument("--workers", type=int, default=2, help="tokenizer processes")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--code-max-bytes", type=int, default=5_000_000)
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=cmd_prepare_hf, value_errors=True)
