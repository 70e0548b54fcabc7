"""Hugging Face checkpoints (Llama, Mistral, Qwen2, Qwen3) <-> megareuse checkpoints, streamed
one tensor at a time.

``import_hf(src, out, d1=...)`` reads a local HF directory (config.json, model.safetensors or
model-XXXXX-of-YYYYY.safetensors + model.safetensors.index.json) and writes the megareuse
checkpoint directory ``out`` (model.safetensors in fp32, meta.json, manifest.json, config.yaml, and the
tokenizer files), ready for ``megareuse train --init-from out``. ``export_hf(ckpt, out)`` writes
config.json + safetensors shards (+ tokenizer files) that transformers' ``AutoModelForCausalLM``
loads as the family the checkpoint came from (``hf_families.export_family``: a continually
pretrained Qwen3 stays a Qwen3; megareuse's own models are Llamas). megareuse checkpoints
always hold the consolidated single-device weights (model.safetensors), whatever TP degree /
ZeRO stage trained them and after growth, so export needs no resharding.

Weight names (no permutation is needed: megareuse's RoPE uses HF's rotate-half layout)::

    model.embed_tokens.weight                  tok_embeddings.weight
    model.layers.N.input_layernorm.weight      layers.N.attention_norm.weight
    model.layers.N.self_attn.{q,k,v,o}_proj    layers.N.attention.{wq,wk,wv,wo}  (.weight, .bias)
    model.layers.N.self_attn.{q,k}_norm        layers.N.attention.{q,k}_norm     (Qwen3)
    model.layers.N.post_attention_layernorm    layers.N.ffn_norm
    model.layers.N.mlp.{gate,up,down}_proj     layers.N.feed_forward.{w1,w3,w2}
    model.norm.weight / lm_head.weight         norm.weight / output.weight

Which config.json fields map to which ``ModelConfig`` features, and what is refused, is in
``hf_families``: anything ``megareuse.model.GPT`` does not compute exactly raises ``HFError``
with one line naming the field and the accepted values, before anything is written. Neither
direction imports ``transformers``; ``safetensors`` is needed (``pip install safetensors``).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Optional, Union

import torch
import yaml

from megareuse.config import Config, ConfigError
from megareuse.atomic import publish_dir
from megareuse.engine import checkpoint as ckpt
from megareuse.engine import weights
from megareuse.interop.errors import HFError
from megareuse.data.hf_tokenizer import JsonTokenizer
from megareuse.interop.hf_families import FAMILIES, hf_config_from_model, model_config_from_hf  # noqa: F401
from megareuse.interop.hf_data import file_sha256, hf_lineage, read_json_object, special_ids, tokenizer_entry
from megareuse.model import non_embedding_param_count, param_count
from megareuse.model.flops import weight_shapes
from megareuse.paths import check_input, check_output_dir

PathLike = Union[str, os.PathLike]
MODEL_TYPES = tuple(FAMILIES)
# tokenizer / generation files carried from an HF directory into the checkpoint and back out
CARRIED_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "generation_config.json")
EXPORT_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                 "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
_LOADABLE = {"F32", "F16", "BF16", "F64"}
_LAYER_NAMES = (("input_layernorm", "attention_norm"), ("self_attn.q_proj", "attention.wq"),
                ("self_attn.k_proj", "attention.wk"), ("self_attn.v_proj", "attention.wv"),
                ("self_attn.o_proj", "attention.wo"), ("post_attention_layernorm", "ffn_norm"),
                ("mlp.gate_proj", "feed_forward.w1"), ("mlp.up_proj", "feed_forward.w3"),
                ("mlp.down_proj", "feed_forward.w2"), ("self_attn.q_norm", "attention.q_norm"),
                ("self_attn.k_norm", "attention.k_norm"))
_TO_OURS = dict(_LAYER_NAMES)
_TO_HF = {ours: hf for hf, ours in _LAYER_NAMES}
_GLOBAL = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
           "lm_head.weight": "output.weight"}
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_OUR_LAYER = re.compile(r"^layers\.(\d+)\.(.+)\.(weight|bias)$")


def _safetensors():
    try:
        from safetensors import safe_open
        from safetensors.torch import save_file
    except ImportError:
        raise HFError("HF interop needs the safetensors package: pip install safetensors") from None

    def checked_open(path: str, framework: str = "pt"):
        try:
            return safe_open(path, framework=framework)
        except Exception as exc:  # safetensors' own error for a damaged header
            raise HFError(f"{path} is not a readable safetensors file ({str(exc).splitlines()[0]})") from None
    return checked_open, save_file


# --------------------------------------------------------------------------- names and shapes
def to_megareuse_name(name: str) -> Optional[str]:
    """megareuse key of an HF weight name (any supported family); None for names we do not know."""
    if name in _GLOBAL:
        return _GLOBAL[name]
    match = _HF_LAYER.match(name)
    if match and match.group(2) in _TO_OURS:
        return f"layers.{match.group(1)}.{_TO_OURS[match.group(2)]}.{match.group(3)}"
    return None


def to_hf_name(key: str) -> str:
    """HF weight name of a megareuse state-dict key (KeyError for unknown keys)."""
    reverse = {v: k for k, v in _GLOBAL.items()}
    if key in reverse:
        return reverse[key]
    match = _OUR_LAYER.match(key)
    if match and match.group(2) in _TO_HF:
        return f"model.layers.{match.group(1)}.{_TO_HF[match.group(2)]}.{match.group(3)}"
    raise KeyError(key)


# --------------------------------------------------------------------------- helpers
def _tokenizer_special_ids(src: Path) -> Optional[dict[str, Optional[int]]]:
    """bos/eos/pad ids of a checkpoint's tokenizer: its tokenizer.model, else its tokenizer.json
    (with tokenizer_config.json's special tokens); None when it holds neither."""
    if (src / "tokenizer.model").is_file() or not (src / "tokenizer.json").is_file():
        return special_ids(src / "tokenizer.model")
    tok = JsonTokenizer(src / "tokenizer.json")
    ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
    return {k: (None if v < 0 else v) for k, v in ids.items()}


def parse_size(text: Union[str, int]) -> int:
    """``"2GB"``, ``"500MB"``, ``"10KB"`` or a byte count -> bytes (> 0)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)?\s*", str(text).upper())
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    if not match or (match.group(2) or "") not in units or float(match.group(1)) <= 0:
        raise HFError(f"--max-shard-size = {text!r}: accepted a positive size such as 2GB, 500MB, 4GiB")
    return int(float(match.group(1)) * units[match.group(2) or ""])


def _weight_index(src: Path) -> dict[str, Path]:
    """HF tensor name -> safetensors file, from the index json or the single file."""
    index = src / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_object(index, "a safetensors index (model.safetensors.index.json)").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise HFError(f"{index} has no weight_map; accepted the sharded safetensors index format")
        files = {name: src / file for name, file in weight_map.items()}
        missing = sorted({str(p.name) for p in files.values() if not p.is_file()})
        if missing:
            raise HFError(f"{index} names missing shard {missing[0]}")
        return files
    single = src / "model.safetensors"
    if not single.is_file():
        found = "pytorch_model.bin" if (src / "pytorch_model.bin").exists() else "none"
        raise HFError(f"{src} has no model.safetensors or model.safetensors.index.json (found: {found}); "
                      "accepted safetensors weights (convert .bin files with save_pretrained)")
    safe_open, _ = _safetensors()
    with safe_open(str(single), framework="pt") as fh:
        return {name: single for name in fh.keys()}


def _publish(staging: Path, out: Path) -> None:
    """Rename the finished ``staging`` directory to ``out`` (new, or an empty directory)."""
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()  # an empty directory the user made
    if out.exists():
        raise HFError(f"--out {str(out)!r} appeared while writing; nothing written")
    publish_dir(staging, out)


def _check_new(out: Path) -> None:
    if out.is_symlink() or (out.exists() and (not out.is_dir() or any(out.iterdir()))):
        raise HFError(f"--out {str(out)!r} already exists; accepted a new path or an empty directory")
    check_output_dir(out, "--out", HFError)


# --------------------------------------------------------------------------- import
def import_hf(src: PathLike, out: PathLike, *, d1: int, max_seq_len: Optional[int] = None) -> Path:
    """Convert the HF directory ``src`` into the megareuse checkpoint directory ``out``.

    ``d1`` is the number of tokens the model was pretrained on (meta D1 = tokens_seen; stage 2
    refuses a base with D1 = 0). Every name, shape and dtype is checked from the safetensors
    headers before any tensor is read; tensors are then read one at a time (fp32 in model.safetensors).
    The checkpoint is written into a temporary sibling and renamed to ``out``. Returns ``out``.
    """

    src, out = Path(src), Path(out)
    check_input(src, "directory", "--from", "a Hugging Face model directory (config.json, *.safetensors)", HFError)
    if not (src / "config.json").is_file():
        raise HFError(f"--from {str(src)!r} has no config.json; accepted a Hugging Face model directory")
    _check_new(out)
    if isinstance(d1, bool) or not isinstance(d1, int) or d1 < 0:
        raise HFError(f"--d1 = {d1!r}: accepted a non-negative token count")
    raw = read_json_object(src / "config.json", "a Hugging Face config.json")
    cfg = model_config_from_hf(raw, max_seq_len)
    files = _weight_index(src)
    want = weight_shapes(cfg)
    plan: dict[Path, list[tuple[str, str]]] = {}  # file -> (our key, HF name), checked
    safe_open, _ = _safetensors()
    for path in sorted(set(files.values())):
        with safe_open(str(path), framework="pt") as fh:
            for name in fh.keys():
                key = to_megareuse_name(name)
                if key is None:
                    if name.endswith("rotary_emb.inv_freq"):
                        continue  # a buffer older transformers saved; recomputed from rope_theta
                    raise HFError(f"{path.name}: tensor {name} is not a weight megareuse knows for "
                                  f"model_type {raw.get('model_type')!r}; accepted model.embed_tokens, "
                                  "model.layers.N.{self_attn,mlp,*_layernorm}, model.norm, lm_head")
                if key == "output.weight" and cfg.tie_embeddings:
                    continue  # tied: the head is the embedding
                if key not in want:
                    raise HFError(f"{path.name}: tensor {name} does not fit config.json (num_hidden_layers="
                                  f"{cfg.n_layers}, model_type {raw.get('model_type')!r})")
                info = fh.get_slice(name)
                shape, dtype = tuple(info.get_shape()), info.get_dtype()
                if shape != want[key]:
                    raise HFError(f"{path.name}: tensor {name} has shape {shape}, config.json gives {want[key]}")
                if dtype not in _LOADABLE:
                    raise HFError(f"{path.name}: tensor {name} has dtype {dtype}; accepted "
                                  f"{', '.join(sorted(_LOADABLE))} (quantized weights are not supported)")
                plan.setdefault(path, []).append((key, name))
    found = {key for items in plan.values() for key, _ in items}
    missing = [k for k in want if k not in found and not (k == "output.weight" and cfg.tie_embeddings)]
    if missing:
        hint = " (config.json field tie_word_embeddings = false)" if missing[0] == "output.weight" else ""
        raise HFError(f"{src}: no tensor {to_hf_name(missing[0])} in the safetensors files{hint}")
    tokenizer = tokenizer_entry(src)
    if tokenizer and tokenizer["vocab_size"] > cfg.vocab_size:
        raise HFError(f"{tokenizer['file']} has {tokenizer['vocab_size']} tokens, more than config.json "
                      f"vocab_size={cfg.vocab_size}")
    if tokenizer is None:
        warnings.warn(f"import-hf: {src} has no tokenizer.model or tokenizer.json; stage 2 will need data "
                      "prepared with the base model's tokenizer", stacklevel=2)
    if d1 == 0:
        warnings.warn("import-hf: D1 = 0 recorded; `megareuse train --init-from` refuses a base without "
                      "pretraining tokens (pass --d1)", stacklevel=2)

    located = {key: (path, name) for path, items in plan.items() for key, name in items}
    order = [k for k in want if k in located and not (cfg.tie_embeddings and k in weights.TIED)]

    full = Config(model=cfg).to_dict()
    meta = {"stage": "base", "method": "hf-import", "tokens_seen": d1, "D1": d1, "D2": 0,
            "params": param_count(cfg), "non_embedding_params": non_embedding_param_count(cfg),
            "config": full, "layout": None, "tokenizer": tokenizer,
            "source": {"format": "huggingface", "dir": str(src.resolve()),
                       "config_sha256": file_sha256(src / "config.json"), "hf_config": raw,
                       "files": {p.name: p.stat().st_size for p in sorted(set(files.values()))}},
            "git_revision": ckpt.git_revision(), "torch_version": torch.__version__}
    extra = {name: src / name for name in CARRIED_FILES if (src / name).is_file()}
    out.parent.mkdir(parents=True, exist_ok=True)
    staging_root = out.parent / f".tmp-import-{out.name}-{os.getpid()}"
    try:
        tmp = ckpt.begin_checkpoint(staging_root, 0)
        (tmp / "config.yaml").write_text(yaml.safe_dump(full, sort_keys=False))
        written = _stream_import(tmp / weights.WEIGHTS, located, order, want)
        known = {weights.WEIGHTS: {"bytes": written[0], "sha256": written[1]}}
        _publish(ckpt.commit_checkpoint(staging_root, tmp, 0, meta, extra_files=extra, known=known), out)
    finally:
        shutil.rmtree(staging_root, ignore_errors=True)
    return out


def _stream_import(path: Path, located: dict[str, tuple[Path, str]], order: list[str],
                   want: dict[str, tuple[int, ...]]) -> tuple[int, str]:
    """Copy the HF tensors into model.safetensors one at a time, as fp32 (never the whole state
    dict in memory); returns (bytes, sha256)."""
    safe_open, _ = _safetensors()
    with weights.TensorWriter(path, {k: (want[k], torch.float32) for k in order}) as writer:
        handles: dict[Path, Any] = {}
        for key in order:
            shard, name = located[key]
            if shard not in handles:
                handles[shard] = safe_open(str(shard), framework="pt")
            writer.write(key, handles[shard].get_tensor(name).to(torch.float32))
        return writer.close()


# --------------------------------------------------------------------------- export
def export_hf(src: PathLike, out: PathLike, *, dtype: str = "float32",
              max_shard_size: Union[str, int] = "2GB") -> Path:
    """Write the megareuse checkpoint ``src`` as an HF directory ``out`` (new or empty) of its
    export family (``hf_families.export_family``).

    model.safetensors is memory-mapped and tensors are cast one shard at a time (``max_shard_size``,
    e.g. "2GB"; more than one shard adds model.safetensors.index.json). ``dtype`` is float32,
    bfloat16 or float16. Tokenizer files of the checkpoint are copied. Returns ``out``.
    """

    src, out = Path(src), Path(out)
    if dtype not in EXPORT_DTYPES:
        raise HFError(f"--dtype = {dtype!r}: accepted one of {', '.join(EXPORT_DTYPES)}")
    torch_dtype, limit = EXPORT_DTYPES[dtype], parse_size(max_shard_size)
    dtype_name = str(torch_dtype).replace("torch.", "")
    _check_new(out)
    problem = ckpt.verify_checkpoint(src)
    if problem or weights.weights_file(src) is None:
        raise HFError(f"--from {str(src)!r} is not a usable checkpoint: {problem or 'no ' + weights.WEIGHTS}; "
                      "accepted a checkpoint directory written by megareuse")
    meta = ckpt.read_meta(src)
    try:
        cfg = Config.from_dict(meta["config"]).model
        cfg.validate()
    except (KeyError, TypeError, ConfigError) as exc:
        raise HFError(f"{src}/meta.json has no valid model config ({exc})") from None
    sd = weights.open_weights(src, tied=False)
    problem = weights.weights_problem(sd, cfg, tied=cfg.tie_embeddings)
    if problem is not None:
        raise HFError(f"{weights.WEIGHTS} does not fit the meta.json config (model section): {problem}")
    want = weight_shapes(cfg)
    if cfg.tie_embeddings and "output.weight" in sd and not torch.equal(sd["output.weight"],
                                                                         sd["tok_embeddings.weight"]):
        raise HFError("model.tie_embeddings = true but model.safetensors's output.weight differs from "
                      "tok_embeddings.weight; accepted equal (tied) tensors")
    shards: list[list[str]] = [[]]
    size, item = 0, torch.tensor([], dtype=torch_dtype).element_size()
    for key in (k for k in want if not (k == "output.weight" and cfg.tie_embeddings)):
        nbytes = sd[key].numel() * item  # greedy plan from shapes: no tensor is touched
        if shards[-1] and size + nbytes > limit:
            shards, size = shards + [[]], 0
        shards[-1].append(key)
        size += nbytes
    _, save_file = _safetensors()
    source, lineage = hf_lineage(src, meta)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".tmp-export-{out.name}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        weight_map, total = {}, 0
        for n, group in enumerate(shards, 1):
            name = "model.safetensors" if len(shards) == 1 else f"model-{n:05d}-of-{len(shards):05d}.safetensors"
            tensors = {to_hf_name(k): sd[k].to(torch_dtype).contiguous() for k in group}
            save_file(tensors, str(staging / name), metadata={"format": "pt"})
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            weight_map.update({hf: name for hf in tensors})
            del tensors
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        hf_cfg = hf_config_from_model(cfg, dtype_name, source, _tokenizer_special_ids(src))
        (staging / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
        for name in CARRIED_FILES:  # the checkpoint's own, else its HF base's (same tokenizer)
            found = next((d / name for d in lineage if (d / name).is_file()), None)
            if found is not None:
                shutil.copyfile(found, staging / name)
        _publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
