"""The Hugging Face model families megareuse reads and writes, and their config.json fields.

A family is a ``model_type`` whose computation ``megareuse.model.GPT`` reproduces exactly, with
the ``ModelConfig`` features it needs:

=========  =====================  ====================================================
model_type architectures          features
=========  =====================  ====================================================
llama      LlamaForCausalLM       RoPE scaling ``llama3`` / ``linear`` (Llama 3.1, 3.2),
                                  explicit head_dim, tied embeddings (3.2)
mistral    MistralForCausalLM     ``sliding_window`` (accepted when >= max_seq_len)
qwen2      Qwen2ForCausalLM       q/k/v biases (``qkv_bias``), ``use_sliding_window``
qwen3      Qwen3ForCausalLM       per-head q/k RMSNorm (``qk_norm``), explicit head_dim
=========  =====================  ====================================================

Everything else is refused with one line naming the config.json field and the accepted values
(``HFError``), before anything is written: other activations, biases on o_proj or the MLP
(llama/qwen3 ``attention_bias``, ``mlp_bias``), RoPE types other than default/linear/llama3
(yarn, dynamic, longrope) or partial rotary, and other model types (docs/hf.md says why for the
common ones). A window narrower than the training sequence would be banded attention, which
megareuse does not compute: ``max_seq_len`` defaults to min(max_position_embeddings, window).

Both transformers 4 (``rope_theta`` + ``rope_scaling``) and 5 (``rope_parameters``) configs are
read; exports write both. ``export_family`` picks the family a checkpoint is written as: its HF
base's when it was imported (so a continually pretrained Qwen3 stays a Qwen3), else the family
its features need (megareuse's own models export as Llama).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Optional

from megareuse.config import ConfigError, ModelConfig
from megareuse.interop.errors import HFError


@dataclass(frozen=True)
class Family:
    architecture: str
    qkv_bias: bool  # q/k/v biases are part of the architecture
    qk_norm: bool  # per-head q/k norms are part of the architecture
    window_switch: bool  # the window applies only with use_sliding_window (Qwen)
    o_bias_field: Optional[str]  # a config field that puts biases on q/k/v *and* o_proj


FAMILIES = {
    "llama": Family("LlamaForCausalLM", False, False, False, "attention_bias"),
    "mistral": Family("MistralForCausalLM", False, False, False, None),
    "qwen2": Family("Qwen2ForCausalLM", True, False, True, None),
    "qwen3": Family("Qwen3ForCausalLM", False, True, True, "attention_bias"),
}
ROPE_TYPES = {"default": "none", "linear": "linear", "llama3": "llama3"}


def _field(name: str, value: Any, accepted: str) -> HFError:
    return HFError(f"config.json field {name} = {value!r}: accepted {accepted}")


def _rope(raw: dict) -> dict[str, Any]:
    """ModelConfig's RoPE fields from ``rope_parameters`` (transformers 5) or ``rope_theta`` +
    ``rope_scaling`` (transformers 4)."""
    specs = []
    for where in ("rope_parameters", "rope_scaling"):
        spec = raw.get(where) or {}
        if not isinstance(spec, dict):
            raise _field(where, spec, "null or a mapping with rope_type default, linear or llama3")
        specs.append((where, spec))
    kind_of = {where: spec.get("rope_type", spec.get("type", "default")) for where, spec in specs}
    where, spec = next(((w, s) for w, s in specs if kind_of[w] != "default"), specs[0])
    kind = kind_of[where]
    if kind not in ROPE_TYPES:
        raise _field(f"{where}.rope_type", kind, "default, linear or llama3 (megareuse has no "
                     f"{kind} RoPE; yarn, dynamic and longrope change attention at inference lengths)")
    for name, holder in ((f"{where}.partial_rotary_factor", spec), ("partial_rotary_factor", raw)):
        if holder.get("partial_rotary_factor", 1.0) != 1.0:
            raise _field(name, holder["partial_rotary_factor"], "1.0 (rotary on the whole head)")
    if spec.get("attention_factor") not in (None, 1, 1.0):
        raise _field(f"{where}.attention_factor", spec["attention_factor"], "null or 1.0")
    theta = specs[0][1].get("rope_theta", spec.get("rope_theta", raw.get("rope_theta", 10000.0)))
    out: dict[str, Any] = {"rope_theta": float(theta), "rope_scaling": ROPE_TYPES[kind]}
    if kind == "default":
        return out
    try:
        out["rope_factor"] = float(spec["factor"])
        if kind == "llama3":
            out.update(rope_low_freq_factor=float(spec["low_freq_factor"]),
                       rope_high_freq_factor=float(spec["high_freq_factor"]),
                       rope_original_max_seq_len=int(spec["original_max_position_embeddings"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise _field(f"{where}", spec, f"a {kind} RoPE mapping with its numeric parameters (missing or bad {exc})")
    return out


def _window(raw: dict, family: Family, n_layers: int) -> Optional[int]:
    """The sliding window the model applies to at least one layer, or None."""
    window = raw.get("sliding_window")
    if window is None:
        return None
    if family.window_switch:
        types = raw.get("layer_types")
        used = ("sliding_attention" in types) if isinstance(types, list) else (
            bool(raw.get("use_sliding_window", False)) and int(raw.get("max_window_layers", n_layers)) < n_layers)
        if not used:
            return None
    if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
        raise _field("sliding_window", window, "null or a positive integer")
    return window


def model_config_from_hf(raw: dict, max_seq_len: Optional[int] = None) -> ModelConfig:
    """The megareuse ModelConfig of an HF config.json dict of a supported family
    (``max_seq_len`` overrides max_position_embeddings, e.g. to keep RoPE tables small).
    Raises HFError naming the field."""
    model_type = raw.get("model_type")
    if model_type not in FAMILIES:
        raise _field("model_type", model_type, "one of " + ", ".join(repr(t) for t in FAMILIES)
                     + " (docs/hf.md lists why others are refused)")
    family = FAMILIES[model_type]
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if isinstance(raw.get(name), bool) or not isinstance(raw.get(name), int) or raw[name] <= 0:
            raise _field(name, raw.get(name), "a positive integer")
    if raw.get("hidden_act", "silu") not in ("silu", "swish"):
        raise _field("hidden_act", raw.get("hidden_act"), "'silu' (SwiGLU; megareuse has no other activation)")
    if family.o_bias_field and raw.get(family.o_bias_field, False):
        raise _field(family.o_bias_field, raw[family.o_bias_field],
                     f"false ({model_type} puts it on o_proj too; megareuse has q/k/v biases only, Qwen2's layout)")
    if raw.get("mlp_bias", False):
        raise _field("mlp_bias", raw["mlp_bias"], "false (megareuse's MLP has no biases)")
    d, heads, layers = raw["hidden_size"], raw["num_attention_heads"], raw["num_hidden_layers"]
    head_dim = raw.get("head_dim")
    if head_dim is None and d % heads:
        raise _field("num_attention_heads", heads, f"a divisor of hidden_size={d} (or an explicit head_dim)")
    if head_dim is not None and (isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0):
        raise _field("head_dim", head_dim, "null or a positive integer")
    kv = raw.get("num_key_value_heads") or heads
    if not isinstance(kv, int) or heads % kv:
        raise _field("num_key_value_heads", kv, f"null or a divisor of num_attention_heads={heads}")
    window = _window(raw, family, layers)
    seq = int(raw.get("max_position_embeddings", 2048) if max_seq_len is None else max_seq_len)
    if max_seq_len is None and window is not None and window < seq:
        warnings.warn(f"import-hf: sliding_window = {window} < max_position_embeddings = {seq}: max_seq_len set "
                      f"to {window} (within the window attention is full causal)", stacklevel=3)
        seq = window
    cfg = ModelConfig(
        vocab_size=raw["vocab_size"], d_model=d, n_layers=layers, n_heads=heads,
        n_kv_heads=None if kv == heads else kv, ffn_hidden=raw["intermediate_size"], max_seq_len=seq,
        norm_eps=float(raw.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
        init_std=float(raw.get("initializer_range", 0.02)),
        head_dim=None if head_dim in (None, d // heads) and d % heads == 0 else head_dim,
        qkv_bias=family.qkv_bias, qk_norm=family.qk_norm, sliding_window=window, **_rope(raw))
    try:
        cfg.validate()
    except ConfigError as exc:
        raise HFError(f"config.json maps to an invalid megareuse model: {exc}") from None
    return cfg


# --------------------------------------------------------------------------- export
def export_family(cfg: ModelConfig, source: Optional[dict]) -> str:
    """The model_type ``cfg`` is written as: the imported base's family when it can hold the
    model, else the one its features need; HFError when none can."""
    def fits(model_type: str) -> bool:
        family = FAMILIES[model_type]
        return (family.qkv_bias == cfg.qkv_bias and family.qk_norm == cfg.qk_norm
                and (cfg.sliding_window is None or model_type != "llama"))

    wanted = (source or {}).get("model_type")
    if wanted in FAMILIES and fits(wanted):
        return wanted
    for model_type in ("llama", "mistral", "qwen2", "qwen3"):
        if fits(model_type):
            return model_type
    raise HFError(f"model.qkv_bias = {cfg.qkv_bias} with model.qk_norm = {cfg.qk_norm}: no transformers family "
                  "holds both (Qwen3's attention_bias also biases o_proj); accepted at most one of them")


def _rope_fields(cfg: ModelConfig) -> dict[str, Any]:
    """rope_theta + rope_scaling (transformers 4) and rope_parameters (transformers 5)."""
    kind = {v: k for k, v in ROPE_TYPES.items()}[cfg.rope_scaling]
    params: dict[str, Any] = {"rope_type": kind}
    if cfg.rope_scaling != "none":
        params["factor"] = cfg.rope_factor
    if cfg.rope_scaling == "llama3":
        params.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
                      original_max_position_embeddings=cfg.rope_original_max_seq_len)
    return {"rope_theta": cfg.rope_theta, "rope_scaling": None if kind == "default" else dict(params),
            "rope_parameters": {**params, "rope_theta": cfg.rope_theta}}


def hf_config_from_model(cfg: ModelConfig, dtype: str = "float32", source: Optional[dict] = None,
                         special_ids: Optional[dict] = None) -> dict[str, Any]:
    """The config.json of ``cfg`` in its export family (``export_family``), readable by
    transformers 4.40+ and 5. bos/eos/pad ids come from ``source`` (the imported config.json)
    when given, else from ``special_ids`` (the tokenizer's)."""
    model_type = export_family(cfg, source)
    family, source = FAMILIES[model_type], source or {}
    ids = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None, **(special_ids or {})}
    if source:
        ids = {key: source.get(key) for key in ids}
    out = {
        "architectures": [family.architecture], "model_type": model_type, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_size, "hidden_act": "silu",
        "max_position_embeddings": max(cfg.max_seq_len, int(source.get("max_position_embeddings") or 0)),
        "rms_norm_eps": cfg.norm_eps, **_rope_fields(cfg), "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": 0.0, "initializer_range": cfg.init_std, "use_cache": True,
    }
    if family.o_bias_field:
        out[family.o_bias_field] = False
    if model_type == "llama":
        out["mlp_bias"] = False
    if model_type == "mistral":
        out["sliding_window"] = cfg.sliding_window
    if family.window_switch:  # Qwen: the window applies to layers >= max_window_layers when switched on
        windowed = cfg.sliding_window is not None
        out.update(use_sliding_window=windowed, sliding_window=cfg.sliding_window,
                   max_window_layers=int(source.get("max_window_layers", 0)) if windowed else cfg.n_layers)
    return {**out, **ids, "dtype": dtype, "torch_dtype": dtype}
