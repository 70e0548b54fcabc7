"""Model growth: pure operators on (ModelConfig, full state dict) pairs, and a checkpoint writer.

Operators (see docs/growth.md and the design notes on growth for the derivations):

- ``grow_width`` (factor k): d_model, n_heads, n_kv_heads and ffn_hidden all times k, head dim
  unchanged (an explicit ``head_dim`` stays explicit, None stays None: d/h = kd/kh). Every hidden
  unit is duplicated in blocks, so the wide residual stream is [h; h; ...]: embedding [E, E], norm
  gains [g; g] (same eps: mean([h; h]^2) = mean(h^2)), every projection tiled k x k and divided
  by k. Heads are duplicated as blocks of the projection rows and KV heads are multiplied by k too,
  so query-head copy ``c * H + h`` reads KV copy ``c * Hkv + h // G``: the
  same group size G and the right KV head (attention.py's repeat_interleave convention).
  Function-preserving. A tied head is untied: output = [E, E] / k (the grown config has
  ``tie_embeddings = False``). Optional symmetry-breaking noise (HyperCloning): each tiled
  matrix gets noise N_1..N_k on its k column blocks with N_1 + ... + N_k = 0, which cancels on
  duplicated inputs; its std is ``noise`` times the rms of the tiled block W / k (SNR in dB is
  -20 log10(noise)).
  The reused families' features stay exact: q/k/v biases (``qkv_bias``) are per output row, so
  they are copied with their rows ([b; b], never divided, never noised: twin rows must produce
  equal outputs); the noise cancels within each row whatever its bias. The per-head q/k norm
  gains (``qk_norm``, size head_dim, shared by all heads) are kept as they are: every head copy
  normalises the same q and k. RoPE scaling and ``sliding_window`` (>= max_seq_len) depend on
  head dim and positions only and are carried over unchanged. A tensor without a width rule
  (a feature added to the model but not to growth) is refused, never tiled blindly.
- ``stack_depth`` (G_stack): new layer i is a copy of base layer ``layer_map[i]``; the default map
  for factor g is the whole stack repeated g times. Not function-preserving.
- ``insert_identity``: new layers copy a base layer with its attention output projection (wo) and
  MLP down projection (w2) zeroed, so the block adds 0 to the residual stream; its inner weights
  are non-zero, so wo and w2 get gradient on the first step. The first occurrence of each base
  layer in the map keeps its weights; later occurrences are the identity blocks. Default map for
  factor g: each layer followed by g - 1 identity copies of itself (0,0,1,1,...). Exact also
  with ``qkv_bias`` / ``qk_norm``: those sit before wo (which has no bias), so the block still adds
  0. Both depth operators move every tensor of a block (biases and q/k norm gains included).
- ``grow``: depth first, then width (each layer then draws its own noise).

Factors are positive integers; a non-integer request (e.g. a sqrt(2) aspect-ratio step) is
rejected with one line. The base config is validated first (``ModelConfig.validate``, one line
naming the field), and every grown config carries the base's features (qkv_bias, qk_norm,
head_dim, rope_*, sliding_window). Head and KV-head counts always grow by the same k, so the GQA
group size and the head dim never change; nothing that the features allow needs refusing.
``grow_checkpoint`` reads a checkpoint, grows it, checks the grown weights against the grown config
(``weights_problem``) and writes a new checkpoint directory atomically (weights, metadata,
tokenizer; no optimizer state).
"""
from __future__ import annotations

import dataclasses
import math
import os
import shutil
import zlib
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from megareuse.config import Config, ModelConfig
from megareuse.engine import checkpoint as ckpt
from megareuse.atomic import publish_dir
from megareuse.engine import weights
from megareuse.model import non_embedding_param_count, param_count
from megareuse.model.flops import LAYER_WEIGHTS, QK_NORMS, QKV_BIASES, layer_shapes
from megareuse.paths import check_output_dir, naming

StateDict = dict[str, torch.Tensor]
LayerMap = Union[str, Sequence[int], None]
DEPTH_METHODS = ("stack", "identity")
ZEROED = ("attention.wo.", "feed_forward.w2.")  # an identity block's output side (any tensor of it)
# width growth, per tensor name (inside ``layers.N.`` for block tensors): "columns" repeats the
# columns k times (embedding), "head" tiles 1 x k / k (output head), "rows" repeats a per-unit
# vector k times (norm gains over d_model, q/k/v biases), "same" keeps it (q/k norm gains over
# head_dim), "tile" tiles k x k / k with the symmetry-breaking noise (every block matrix)
WIDTH_RULES = {"tok_embeddings.weight": "columns", "output.weight": "head", "norm.weight": "rows",
               "attention_norm.weight": "rows", "ffn_norm.weight": "rows",
               **{name: "tile" for name in LAYER_WEIGHTS if not name.endswith("norm.weight")},
               **dict.fromkeys(QKV_BIASES, "rows"), **dict.fromkeys(QK_NORMS, "same")}


# --------------------------------------------------------------------------- checking inputs
def _factor(name: str, value: Any) -> int:
    """A positive integer growth factor (an integral float or string is accepted) or ValueError."""
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not (math.isfinite(number) and number.is_integer() and number >= 1):
        hint = ("; a sqrt(2)-per-dimension step has no integer form: grow width and depth by the same "
                "integer (e.g. width=2, depth=2) to keep the depth/width ratio") if number > 1 else ""
        raise ValueError(f"growth: {name}={value!r}: accepted a positive integer factor{hint}")
    return int(number)


def _noise(noise: Any) -> float:
    number = isinstance(noise, (int, float)) and not isinstance(noise, bool)
    if not number or not math.isfinite(noise) or noise < 0:
        raise ValueError(f"growth: noise={noise!r}: accepted a number >= 0 (relative std; 0 disables)")
    return float(noise)


def parse_layer_map(layer_map: LayerMap) -> Optional[list[int]]:
    """``"0,1,0,1"`` or a sequence of ints -> list of ints; None stays None."""
    if layer_map is None:
        return None
    items = layer_map.split(",") if isinstance(layer_map, str) else list(layer_map)
    try:
        parsed = [int(str(x).strip()) for x in items]
    except ValueError:
        parsed = []
    if not parsed or any(isinstance(x, (bool, float)) for x in items):
        raise ValueError(f"growth: layer_map={layer_map!r}: accepted a non-empty list of base layer "
                         f"indices, e.g. 0,1,0,1")
    return parsed


def check_state_dict(cfg: ModelConfig, sd: StateDict) -> StateDict:
    """``sd`` as a plain dict after validating ``cfg`` and checking the keys and shapes of ``sd``
    against it (a tied head may be left out: it is the embedding). Raises ValueError naming the
    first problem."""
    from megareuse.engine.weights import weights_problem

    cfg.validate()  # ConfigError (a ValueError): one line naming the field
    sd = dict(sd)
    problem = weights_problem(sd, cfg, tied=cfg.tie_embeddings)
    if problem is not None:
        raise ValueError(f"growth: state dict does not fit the model config: {problem}; "
                         "accepted GPT(config).state_dict() names and shapes")
    if cfg.tie_embeddings and "output.weight" not in sd:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    return sd


def resolve_layer_map(n_layers: int, depth: Any = 1, layer_map: LayerMap = None,
                      depth_method: str = "stack") -> list[int]:
    """The layer map a depth operator applies: ``layer_map`` when given (checked against the
    base's ``n_layers`` and against ``depth`` when depth > 1), else the method's default for
    ``depth`` (stack: 0..L-1 repeated; identity: each layer repeated in place)."""
    if depth_method not in DEPTH_METHODS:
        raise ValueError(f"growth: depth_method={depth_method!r}: accepted one of {', '.join(DEPTH_METHODS)}")
    g, mapping = _factor("depth", depth), parse_layer_map(layer_map)
    if mapping is None:
        base = list(range(n_layers))
        return base * g if depth_method == "stack" else [i for i in base for _ in range(g)]
    if any(not 0 <= i < n_layers for i in mapping):
        raise ValueError(f"growth: layer_map={mapping}: accepted indices in [0, {n_layers - 1}] "
                         f"(the base has {n_layers} layers)")
    if g > 1 and len(mapping) != g * n_layers:
        raise ValueError(f"growth: layer_map has {len(mapping)} entries but depth={g} needs "
                         f"{g * n_layers}; accepted a map of length depth x {n_layers} or depth=1")
    if depth_method == "identity":
        firsts = [i for pos, i in enumerate(mapping) if i not in mapping[:pos]]
        if firsts != list(range(n_layers)):
            raise ValueError(f"growth: layer_map={mapping} with depth_method='identity': accepted maps whose "
                             f"first occurrences are 0..{n_layers - 1} in order (the base's layers, "
                             f"kept exact); repeats become identity blocks")
    return mapping


# --------------------------------------------------------------------------- width
def _generator(seed: int, key: str) -> torch.Generator:
    """A generator per (seed, key): the noise does not depend on state-dict order."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(key.encode())) % (1 << 62))


def tile(w: torch.Tensor, k_out: int, k_in: int, noise: float = 0.0,
         gen: Optional[torch.Generator] = None) -> torch.Tensor:
    """[[W / k_in] * k_in] * k_out (k_out row blocks, k_in column blocks), plus noise that sums to
    zero over the k_in column blocks of every row (std ``noise`` x rms(W / k_in))."""
    out = w.repeat(k_out, k_in) / k_in
    if noise > 0 and k_in > 1:
        rows, cols = out.shape[0], w.shape[1]
        z = torch.randn((rows, k_in, cols), generator=gen, dtype=torch.float64)
        z = (z - z.mean(dim=1, keepdim=True)) * math.sqrt(k_in / (k_in - 1))  # unit std, zero sum
        std = noise * float((w.double() / k_in).pow(2).mean().sqrt())
        out = out + (z * std).reshape(rows, k_in * cols).to(w.dtype)
    return out


def widened_config(cfg: ModelConfig, k: int) -> ModelConfig:
    """``cfg`` widened by k: d_model, n_heads, n_kv_heads (when set), ffn_hidden times k, the head
    untied when k > 1; every other field (head_dim, qkv_bias, qk_norm, rope_*, sliding_window, ...)
    kept. Raises ValueError if the head dim would change (it cannot for a valid config)."""
    new_cfg = dataclasses.replace(
        cfg, d_model=k * cfg.d_model, n_heads=k * cfg.n_heads, ffn_hidden=k * cfg.ffn_hidden,
        n_kv_heads=None if cfg.n_kv_heads is None else k * cfg.n_kv_heads,
        tie_embeddings=cfg.tie_embeddings and k == 1)
    if new_cfg.head_size != cfg.head_size:  # RoPE, the 1/sqrt(hd) scale and q/k norms need it fixed
        raise ValueError(f"growth: width={k} would change the head dim from {cfg.head_size} to "
                         f"{new_cfg.head_size} (model.head_dim={cfg.head_dim!r}); accepted a base whose "
                         f"d_model is a multiple of n_heads, or an explicit model.head_dim")
    return new_cfg


def _width_rule(key: str) -> str:
    name = key.split(".", 2)[2] if key.startswith("layers.") else key
    rule = WIDTH_RULES.get(name)
    if rule is None:
        raise ValueError(f"growth: tensor {key!r} has no width-growth rule (a model feature growth does "
                         f"not know); accepted the tensors of {', '.join(sorted(WIDTH_RULES))}")
    return rule


def grow_width(cfg: ModelConfig, sd: StateDict, factor: Any, noise: float = 0.0,
               seed: int = 0) -> tuple[ModelConfig, StateDict]:
    """Widen by ``factor`` (see the module docstring); ``noise`` is the relative std of the
    symmetry-breaking noise (0 = exact copies, which never diverge in training)."""
    k, noise = _factor("width", factor), _noise(noise)
    sd = check_state_dict(cfg, sd)
    new_cfg = widened_config(cfg, k)
    rules = {key: _width_rule(key) for key in sd}  # refuse before any tensor is built
    out: StateDict = {}
    for key, w in sd.items():
        w, rule = w.detach(), rules[key]
        if rule == "columns":
            out[key] = w.repeat(1, k)
        elif rule == "rows":  # a per-unit vector: each copy of a unit (or of a q/k/v row) gets its value
            out[key] = w.repeat(k)
        elif rule == "same":
            out[key] = w.clone()
        elif rule == "head":
            out[key] = tile(w, 1, k, noise, _generator(seed, key))
        else:
            out[key] = tile(w, k, k, noise, _generator(seed, key))
    if new_cfg.tie_embeddings:  # k == 1: keep the head the same tensor as the embedding
        out["output.weight"] = out["tok_embeddings.weight"]
    return new_cfg, out


# --------------------------------------------------------------------------- depth
def _remap_layers(cfg: ModelConfig, sd: StateDict, mapping: list[int],
                  zero_repeats: bool) -> tuple[ModelConfig, StateDict]:
    sd = check_state_dict(cfg, sd)
    out = {k: v.detach().clone() for k, v in sd.items() if not k.startswith("layers.")}
    if cfg.tie_embeddings:
        out["output.weight"] = out["tok_embeddings.weight"]
    names = list(layer_shapes(cfg))  # every tensor of a block, the features' biases and norms included
    for i, src in enumerate(mapping):
        repeat = src in mapping[:i]
        for name in names:
            w = sd[f"layers.{src}.{name}"].detach()
            zero = zero_repeats and repeat and name.startswith(ZEROED)
            out[f"layers.{i}.{name}"] = torch.zeros_like(w) if zero else w.clone()
    return dataclasses.replace(cfg, n_layers=len(mapping)), out


def stack_depth(cfg: ModelConfig, sd: StateDict, factor: Any = None,
                layer_map: LayerMap = None) -> tuple[ModelConfig, StateDict]:
    """G_stack: new layer i = base layer ``layer_map[i]`` (default: the stack repeated ``factor``
    times); embedding, final norm and head copied."""
    if factor is None and layer_map is None:
        raise ValueError("growth: stack_depth needs factor or layer_map; accepted a positive integer "
                         "factor or a list of base layer indices")
    mapping = resolve_layer_map(cfg.n_layers, 1 if factor is None else factor, layer_map, "stack")
    return _remap_layers(cfg, sd, mapping, zero_repeats=False)


def insert_identity(cfg: ModelConfig, sd: StateDict, factor: Any = None,
                    layer_map: LayerMap = None) -> tuple[ModelConfig, StateDict]:
    """Insert blocks that add 0 to the residual stream (zeroed wo and w2, other weights copied
    from their source layer). Default map for ``factor`` g: 0 x g, 1 x g, ...; an explicit map's
    first occurrences must be 0..L-1 in order. Exactly function-preserving."""
    if factor is None and layer_map is None:
        raise ValueError("growth: insert_identity needs factor or layer_map; accepted a positive "
                         "integer factor or a list of base layer indices")
    mapping = resolve_layer_map(cfg.n_layers, 1 if factor is None else factor, layer_map, "identity")
    return _remap_layers(cfg, sd, mapping, zero_repeats=True)


# --------------------------------------------------------------------------- composition
def describe_growth(cfg: ModelConfig, width: Any = 1, depth: Any = 1, depth_method: str = "stack",
                    layer_map: LayerMap = None, noise: float = 0.0, seed: int = 0) -> dict[str, Any]:
    """Check a growth request against the base config; return its metadata record (operator,
    factors, the resolved layer map, noise, seed). Raises ValueError (one line) on bad input."""
    k, noise = _factor("width", width), _noise(noise)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"growth: seed={seed!r}: accepted a non-negative integer")
    mapping = resolve_layer_map(cfg.n_layers, depth, layer_map, depth_method)
    deepens = mapping != list(range(cfg.n_layers))
    if k == 1 and not deepens:
        raise ValueError("growth: width=1 and depth=1 change nothing; accepted width >= 2, depth >= 2 "
                         "or a layer_map other than 0..L-1")
    if noise > 0 and k == 1:
        raise ValueError(f"growth: noise={noise}: accepted 0 when width=1 (noise breaks the symmetry "
                         f"of width copies only)")
    operator = "+".join(["width"] * (k > 1) + [depth_method] * deepens)
    depth_factor = len(mapping) / cfg.n_layers
    return {"operator": operator, "width_factor": k,
            "depth_factor": int(depth_factor) if depth_factor.is_integer() else depth_factor,
            "depth_method": depth_method if deepens else None, "layer_map": mapping,
            "noise": noise, "seed": seed, "untied_head": bool(cfg.tie_embeddings and k > 1),
            "function_preserving": not (deepens and depth_method == "stack")}


def grow(cfg: ModelConfig, sd: StateDict, width: Any = 1, depth: Any = 1, depth_method: str = "stack",
         layer_map: LayerMap = None, noise: float = 0.0, seed: int = 0) -> tuple[ModelConfig, StateDict]:
    """Depth (``depth_method`` with ``depth`` / ``layer_map``), then width (``width``, ``noise``,
    ``seed``). Every argument is checked before any tensor is built."""
    info = describe_growth(cfg, width, depth, depth_method, layer_map, noise, seed)
    check_state_dict(cfg, sd)
    if info["depth_method"] is not None:
        cfg, sd = _remap_layers(cfg, sd, info["layer_map"], zero_repeats=depth_method == "identity")
    if info["width_factor"] > 1:
        cfg, sd = grow_width(cfg, sd, info["width_factor"], info["noise"], seed)
    return cfg, sd


# --------------------------------------------------------------------------- checkpoints
def _check_fits_in_memory(cfg: ModelConfig, info: dict[str, Any]) -> None:
    """Growth holds the base and the grown fp32 weights in memory: refuse a request that cannot."""
    k = info["width_factor"]
    grown = dataclasses.replace(widened_config(cfg, k), n_layers=len(info["layer_map"]))
    need = 4 * (param_count(cfg) + 2 * param_count(grown))  # base, grown, one copy in flight
    have = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if need > have:
        raise ValueError(f"growth: width={k}, {len(info['layer_map'])} layers gives {param_count(grown):,} "
                         f"parameters, which need about {need / 2**30:,.1f} GiB of memory to grow; this machine "
                         f"has {have / 2**30:,.1f} GiB: accepted smaller --width/--depth")


def grow_checkpoint(src: Union[str, Path], out: Union[str, Path], *, width: Any = 1, depth: Any = 1,
                    depth_method: str = "stack", layer_map: LayerMap = None, noise: float = 0.0,
                    seed: int = 0) -> Path:
    """Grow checkpoint ``src`` and write the result as the checkpoint directory ``out`` (the path
    to give ``megareuse train --init-from``); returns ``out``.

    ``out`` must not exist. Everything is checked and computed before anything is written; the
    checkpoint is written into a temporary sibling and renamed into place. It holds model.safetensors,
    meta.json (stage "grow", D1 from the base, D2 = 0, the grown config, a "growth" record),
    the base's tokenizer file (tokenizer.model or tokenizer.json +
    tokenizer_config.json), and no optimizer or trainer state (stage 2 starts fresh).
    """
    src, out = Path(src), Path(out)
    if out.exists() or out.is_symlink():
        raise FileExistsError(f"grow error: --out {str(out)!r} already exists; accepted a new path "
                              f"(growth never overwrites)")
    check_output_dir(out, "grow error: --out", ckpt.CheckpointError)
    problem = ckpt.verify_checkpoint(src)
    if problem is not None:
        raise ckpt.CheckpointError(f"checkpoint {src} is not usable: {problem}")
    meta = ckpt.read_meta(src)
    if weights.weights_file(src) is None or not isinstance(meta.get("config"), dict) or "model" not in meta["config"]:
        raise ckpt.CheckpointError(f"grow error: --from {str(src)!r} holds no {weights.WEIGHTS} or no config in "
                                   f"meta.json; accepted a checkpoint written by megareuse train")
    base_cfg = Config.from_dict(meta["config"]).model
    base_cfg.validate()
    info = describe_growth(base_cfg, width, depth, depth_method, layer_map, noise, seed)
    _check_fits_in_memory(base_cfg, info)
    base_sd = weights.load_state_dict(src, base_cfg.tie_embeddings, model=base_cfg)
    new_cfg, new_sd = grow(base_cfg, base_sd, width, depth, depth_method, layer_map, noise, seed)
    new_cfg.validate()
    problem = weights.weights_problem(new_sd, new_cfg, tied=new_cfg.tie_embeddings)
    if problem is not None:  # a growth defect: never write weights the grown config cannot load
        raise ValueError(f"growth: the grown weights do not fit the grown config: {problem}")
    # tokens the base saw: D1 plus any stage-2 tokens (D2) when the base was itself a stage-2 run
    d1 = meta["D1"] + (meta.get("D2") or 0) if meta.get("D1") is not None else meta.get("tokens_seen")
    growth = {"base": str(src.resolve()), "base_stage": meta.get("stage"), "base_D1": meta.get("D1"),
              "base_D2": meta.get("D2"), "base_tokens_seen": meta.get("tokens_seen"),
              "base_params": param_count(base_cfg),
              "base_non_embedding_params": non_embedding_param_count(base_cfg), **info}
    new_meta = {"stage": "grow", "tokens_seen": 0, "D1": d1, "D2": 0,
                "params": param_count(new_cfg), "non_embedding_params": non_embedding_param_count(new_cfg),
                "config": dict(meta["config"], model=dataclasses.asdict(new_cfg)), "layout": None,
                "growth": growth, "tokenizer": meta.get("tokenizer"),
                "git_revision": ckpt.git_revision(), "torch_version": torch.__version__}
    extra = {name: src / name for name in ckpt.TOKENIZER_COPIES if (src / name).is_file()} or None
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".tmp-grow-{out.name}-{os.getpid()}"
    try:
        with naming(out):  # a full disk's write error names where
            tmp = ckpt.begin_checkpoint(staging, 0)
            written_file = weights.write_state_dict(tmp / weights.WEIGHTS, new_sd, new_cfg.tie_embeddings)
            known = {weights.WEIGHTS: {"bytes": written_file[0], "sha256": written_file[1]}}
            written = ckpt.commit_checkpoint(staging, tmp, 0, new_meta, extra_files=extra, known=known)
        if out.exists():
            raise FileExistsError(f"grow error: --out {str(out)!r} appeared while growing; nothing written")
        publish_dir(written, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
