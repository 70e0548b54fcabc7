"""Typed run configuration: dataclasses, YAML loading, dotted overrides, validation.

A config file is YAML with up to seven sections (model, data, optim, schedule, run, parallel,
guard) and an
optional ``base: other.yaml`` key naming a file (relative to this one) whose values it
overrides. Command-line overrides are ``section.field=value`` with the value parsed as YAML.
``Config.validate()`` runs before anything is built or written and raises ``ConfigError``
with one line naming the field, the bad value and what is accepted.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from megareuse.errors import UserError
from megareuse.paths import input_problem


class ConfigError(UserError, ValueError):
    """A configuration value is wrong; the message is one line naming the field."""


def _fail(name: str, value: Any, accepted: str) -> None:
    raise ConfigError(f"config error: {name} = {value!r}: accepted {accepted}")


def _positive(name: str, value: Any) -> None:
    if value <= 0:
        _fail(name, value, "a positive number")


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        _fail(name, value, "one of " + ", ".join(choices))


@dataclass
class ModelConfig:
    vocab_size: int = 2048
    d_model: int = 96
    n_layers: int = 3
    n_heads: int = 4
    n_kv_heads: Optional[int] = None  # None: same as n_heads (MHA)
    ffn_hidden: int = 256  # SwiGLU hidden width
    max_seq_len: int = 128
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02  # output projections use init_std / sqrt(2 * n_layers)
    attention: str = "sdpa"
    activation_checkpointing: str = "none"  # none | full (every block) | selective (every k-th)
    checkpoint_every: int = 2  # selective: blocks k-1, 2k-1, ... are recomputed in the backward
    loss: str = "auto"  # plain | chunked | fused | auto: how the head computes the training loss
    loss_chunk_tokens: int = 1024  # chunked / fused: tokens (rows of logits) formed at a time
    compile: bool = False  # torch.compile each block (inductor; CPU and CUDA), ZeRO 0-2
    # features of the model families people reuse (docs/hf.md): all off for megareuse's own models
    head_dim: Optional[int] = None  # None: d_model // n_heads (Qwen3 sets it explicitly)
    qkv_bias: bool = False  # biases on the q, k, v projections, not on o (Qwen2 / Qwen2.5)
    qk_norm: bool = False  # RMSNorm on each head's q and k before RoPE, one gain of size head_dim (Qwen3)
    sliding_window: Optional[int] = None  # Mistral's window; accepted only when >= max_seq_len (full causal)
    rope_scaling: str = "none"  # none | linear | llama3: RoPE frequencies stretched for long context
    rope_factor: float = 1.0  # linear / llama3: the frequencies' divisor
    rope_low_freq_factor: float = 1.0  # llama3: wavelengths above original / low are divided by factor
    rope_high_freq_factor: float = 4.0  # llama3: wavelengths below original / high are kept
    rope_original_max_seq_len: int = 8192  # llama3: the context length the base was trained at

    ATTENTION_BACKENDS = ("sdpa", "eager", "triton", "auto")
    CHECKPOINTING = ("none", "full", "selective")
    LOSSES = ("plain", "chunked", "fused", "auto")
    ROPE_SCALINGS = ("none", "linear", "llama3")
    # how the model runs, not what it is: a checkpoint saved with other values (or without these
    # keys) still resumes and serves as run.init_from (engine/init_source.py model_diff skips them)
    RUNTIME_FIELDS = ("attention", "activation_checkpointing", "checkpoint_every", "loss", "loss_chunk_tokens",
                      "compile")

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_size(self) -> int:
        """Each attention head's dimension: ``head_dim``, or d_model // n_heads when unset."""
        return self.d_model // self.n_heads if self.head_dim is None else self.head_dim

    def validate(self, prefix: str = "model") -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "ffn_hidden", "max_seq_len",
                     "rope_theta", "norm_eps", "init_std", "checkpoint_every", "loss_chunk_tokens"):
            _positive(f"{prefix}.{name}", getattr(self, name))
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                _fail(f"{prefix}.n_heads", self.n_heads, f"a divisor of d_model={self.d_model} (or set model.head_dim)")
            if self.head_size % 2:
                _fail(f"{prefix}.n_heads", self.n_heads, "a value giving an even head_dim (RoPE)")
        elif isinstance(self.head_dim, bool) or self.head_dim <= 0 or self.head_dim % 2:
            _fail(f"{prefix}.head_dim", self.head_dim, "null (d_model / n_heads) or a positive even integer (RoPE)")
        self._validate_features(prefix)
        if self.n_kv_heads is not None and (self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads):
            _fail(f"{prefix}.n_kv_heads", self.n_kv_heads, f"null or a divisor of n_heads={self.n_heads}")
        for name in ("vocab_size", "d_model", "n_heads", "ffn_hidden", "max_seq_len"):
            if getattr(self, name) > 2**31 - 1:
                _fail(f"{prefix}.{name}", getattr(self, name), "at most 2147483647 (tensor sizes are int32-indexed)")
        if self.n_layers > 65536:
            _fail(f"{prefix}.n_layers", self.n_layers, "at most 65536")
        attn = 4 * self.d_model * self.n_heads * self.head_size
        size = 2 * self.vocab_size * self.d_model + self.n_layers * (attn + 3 * self.d_model * self.ffn_hidden)
        if size > 10**14:  # an upper bound of megareuse.model.param_count (not imported: no cycle)
            raise ConfigError(f"config error: the model has about {size:.3g} parameters "
                              f"(model.d_model = {self.d_model}, model.n_layers = {self.n_layers}, "
                              f"model.ffn_hidden = {self.ffn_hidden}, model.vocab_size = {self.vocab_size}); accepted at most 1e14")
        _choice(f"{prefix}.attention", self.attention, self.ATTENTION_BACKENDS)
        _choice(f"{prefix}.activation_checkpointing", self.activation_checkpointing, self.CHECKPOINTING)
        _choice(f"{prefix}.loss", self.loss, self.LOSSES)

    def _validate_features(self, prefix: str) -> None:
        """The reused families' features (qkv_bias, qk_norm, sliding_window, RoPE scaling)."""
        for name in ("qkv_bias", "qk_norm", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                _fail(f"{prefix}.{name}", getattr(self, name), "true or false")
        if self.sliding_window is not None and (isinstance(self.sliding_window, bool)
                                                or self.sliding_window < self.max_seq_len):
            _fail(f"{prefix}.sliding_window", self.sliding_window,
                  f"null or at least max_seq_len={self.max_seq_len} (a window that wide is full causal "
                  "attention; megareuse has no banded attention: lower model.max_seq_len)")
        _choice(f"{prefix}.rope_scaling", self.rope_scaling, self.ROPE_SCALINGS)
        if self.rope_scaling == "none":
            return
        if not self.rope_factor >= 1:
            _fail(f"{prefix}.rope_factor", self.rope_factor, "a number >= 1 (frequencies are divided by it)")
        if self.rope_scaling == "llama3":
            if not 0 < self.rope_low_freq_factor < self.rope_high_freq_factor:
                _fail(f"{prefix}.rope_low_freq_factor", self.rope_low_freq_factor,
                      f"a positive number below rope_high_freq_factor={self.rope_high_freq_factor}")
            _positive(f"{prefix}.rope_original_max_seq_len", self.rope_original_max_seq_len)


@dataclass
class DataConfig:
    dir: str = "data/prepared"  # output of `megareuse prepare`
    train: dict[str, float] = field(default_factory=lambda: {"prose": 1.0})  # domain -> weight
    valid: list[str] = field(default_factory=lambda: ["prose", "code"])
    seq_len: int = 128
    seed: int = 1234
    replay: float = 0.0  # stage 2: share of samples replayed from the base run's training blend
    tokenizer: Optional[str] = None  # tokenizer.model / tokenizer.json (or a dir holding one); wins over data.dir's

    def validate(self, prefix: str = "data") -> None:
        if not self.dir:
            _fail(f"{prefix}.dir", self.dir, "a directory written by `megareuse prepare`")
        if not self.train:
            _fail(f"{prefix}.train", self.train, "a mapping domain -> positive weight")
        for domain, weight in self.train.items():
            if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight <= 0:
                _fail(f"{prefix}.train.{domain}", weight, "a positive weight")
        if not self.valid:
            _fail(f"{prefix}.valid", self.valid, "a non-empty list of domains")
        _positive(f"{prefix}.seq_len", self.seq_len)
        if self.seed < 0:
            _fail(f"{prefix}.seed", self.seed, "a non-negative integer")
        if not 0 <= self.replay < 1:
            _fail(f"{prefix}.replay", self.replay, "a number in [0, 1)")
        if self.tokenizer is not None and not self.tokenizer.strip():
            _fail(f"{prefix}.tokenizer", self.tokenizer, "null (data.dir's tokenizer) or the path of a "
                  "tokenizer.model / tokenizer.json file or a directory holding one")


@dataclass
class OptimConfig:
    lr: float = 3e-3  # peak learning rate
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping

    def validate(self, prefix: str = "optim") -> None:
        _positive(f"{prefix}.lr", self.lr)
        _positive(f"{prefix}.eps", self.eps)
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                _fail(f"{prefix}.{name}", value, "a number in [0, 1)")
        for name in ("weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                _fail(f"{prefix}.{name}", getattr(self, name), "a non-negative number")


@dataclass
class ScheduleConfig:
    kind: str = "cosine"  # cosine | constant | wsd
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1  # final lr = min_lr_ratio * optim.lr (cosine, wsd)
    decay_frac: float = 0.2  # wsd: fraction of the steps spent in the final decay

    KINDS = ("cosine", "constant", "wsd")

    def validate(self, prefix: str = "schedule") -> None:
        _choice(f"{prefix}.kind", self.kind, self.KINDS)
        if self.warmup_steps < 0:
            _fail(f"{prefix}.warmup_steps", self.warmup_steps, "a non-negative integer")
        if not 0 <= self.min_lr_ratio <= 1:
            _fail(f"{prefix}.min_lr_ratio", self.min_lr_ratio, "a number in [0, 1]")
        if not 0 < self.decay_frac <= 1:
            _fail(f"{prefix}.decay_frac", self.decay_frac, "a number in (0, 1]")


@dataclass
class ParallelConfig:
    tp: int = 1  # tensor-parallel degree; data parallelism takes the rest of the world
    zero_stage: int = 0  # DeepSpeed ZeRO stage 0-3
    ds_config: Optional[str] = None  # JSON file whose keys are merged into the generated config
    backend: str = "auto"  # torch.distributed backend: auto (nccl on CUDA, else gloo), gloo, nccl
    timeout_s: float = 600.0  # collectives and rendezvous: a dead rank ends the job within this

    BACKENDS = ("auto", "gloo", "nccl")

    def validate(self, prefix: str = "parallel") -> None:
        _positive(f"{prefix}.tp", self.tp)
        if self.zero_stage not in (0, 1, 2, 3):
            _fail(f"{prefix}.zero_stage", self.zero_stage, "one of 0, 1, 2, 3")
        if self.ds_config is not None and not Path(self.ds_config).is_file():
            _fail(f"{prefix}.ds_config", self.ds_config, "null or an existing DeepSpeed JSON file")
        _choice(f"{prefix}.backend", self.backend, self.BACKENDS)
        _positive(f"{prefix}.timeout_s", self.timeout_s)


@dataclass
class GuardConfig:
    """Reliability: divergence guard, loss-spike log, preemption signals (docs/reliability.md)."""
    max_skips: int = 5  # steps with a non-finite loss or gradient norm tolerated in skip_window
    skip_window: int = 100  # steps; reaching max_skips inside it triggers on_divergence
    on_divergence: str = "rollback"  # rollback: to the last checkpoint, lr x lr_factor | stop
    lr_factor: float = 0.5  # learning-rate multiplier applied at each rollback
    max_rollbacks: int = 3  # rollbacks allowed in one run before it stops
    spike_window: int = 100  # train losses in the running median
    spike_ratio: float = 1.5  # loss > ratio x running median is logged as a spike; 0 disables
    signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])  # checkpoint + exit 75

    ACTIONS = ("rollback", "stop")
    SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGHUP")

    def validate(self, prefix: str = "guard") -> None:
        for name in ("max_skips", "skip_window", "spike_window"):
            _positive(f"{prefix}.{name}", getattr(self, name))
        if self.skip_window < self.max_skips:
            _fail(f"{prefix}.skip_window", self.skip_window, f"at least max_skips={self.max_skips}")
        _choice(f"{prefix}.on_divergence", self.on_divergence, self.ACTIONS)
        if not 0 < self.lr_factor <= 1:
            _fail(f"{prefix}.lr_factor", self.lr_factor, "a number in (0, 1]")
        if self.max_rollbacks < 0:
            _fail(f"{prefix}.max_rollbacks", self.max_rollbacks, "a non-negative integer")
        if self.spike_ratio != 0 and self.spike_ratio <= 1:
            _fail(f"{prefix}.spike_ratio", self.spike_ratio, "0 (off) or a number > 1")
        for name in self.signals:
            _choice(f"{prefix}.signals", name, self.SIGNALS)


@dataclass
class RunConfig:
    out_dir: str = "runs/base"
    train_tokens: int = 1_000_000  # D for this stage; steps = train_tokens // tokens_per_step
    init_from: Optional[str] = None  # stage 2: a base (or grown) checkpoint to start from
    keep_optimizer: bool = False  # stage 2: carry the base's optimizer state (same layout only)
    micro_batch_size: int = 16
    grad_accum: int = 1
    eval_interval: int = 50  # steps; the last step always evaluates
    eval_tokens: int = 65_536  # per validation domain
    save_interval: int = 100  # steps; the last step always saves
    keep_last: int = 2
    save_tokens: list[int] = field(default_factory=list)  # extra checkpoints kept for branching
    series: str = ""  # a label for the run table (e.g. the sweep series: base, cpt, scratch_code)
    write_record: bool = True  # write record.json at the end (sweeps switch it off for trunks)
    log_interval: int = 10
    seed: int = 1234
    device: str = "cpu"
    dtype: str = "fp32"
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default
    peak_tflops: float = 0.0  # per device, for MFU; 0 = unknown (MFU not shown)
    prefetch: Optional[bool] = None  # build the next micro-batches in a background thread; null: on CUDA only
    async_save: Optional[bool] = None  # finish checkpoints on a background thread; null: on CUDA only
    sync_every_step: bool = False  # read loss / grad norm on the host every step (else at log, eval, save steps)

    DEVICES = ("cpu", "cuda", "auto")
    DTYPES = ("fp32", "bf16")

    def validate(self, prefix: str = "run") -> None:
        if not self.out_dir:
            _fail(f"{prefix}.out_dir", self.out_dir, "a directory path")
        problem = None if self.init_from is None else input_problem(self.init_from, "directory")
        if problem is not None:
            raise ConfigError(f"config error: {prefix}.init_from = {self.init_from!r} {problem}; "
                              "accepted null or a checkpoint directory")
        if self.keep_optimizer and self.init_from is None:
            _fail(f"{prefix}.keep_optimizer", self.keep_optimizer, "false unless run.init_from is set")
        for name in ("train_tokens", "micro_batch_size", "grad_accum", "eval_interval",
                     "eval_tokens", "save_interval", "keep_last", "log_interval"):
            _positive(f"{prefix}.{name}", getattr(self, name))
        for tokens in self.save_tokens:
            if not 0 < tokens <= self.train_tokens:
                _fail(f"{prefix}.save_tokens", self.save_tokens, f"token counts in (0, train_tokens={self.train_tokens}]")
        for name in ("seed", "threads", "peak_tflops"):
            if getattr(self, name) < 0:
                _fail(f"{prefix}.{name}", getattr(self, name), "a non-negative number")
        _choice(f"{prefix}.device", self.device, self.DEVICES)
        _choice(f"{prefix}.dtype", self.dtype, self.DTYPES)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    run: RunConfig = field(default_factory=RunConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)

    def validate(self) -> "Config":
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate(f.name)
        if self.data.seq_len > self.model.max_seq_len:
            _fail("data.seq_len", self.data.seq_len, f"at most model.max_seq_len={self.model.max_seq_len}")
        for name in ("n_heads", "ffn_hidden", "vocab_size"):
            if getattr(self.model, name) % self.parallel.tp:
                _fail("parallel.tp", self.parallel.tp, f"a divisor of model.{name}={getattr(self.model, name)}")
        kv = self.model.kv_heads
        if kv % self.parallel.tp and self.parallel.tp % kv:
            _fail("parallel.tp", self.parallel.tp, f"a divisor or multiple of the KV heads ({kv})")
        if self.data.replay and self.run.init_from is None:
            _fail("data.replay", self.data.replay, "0 unless run.init_from names a base checkpoint")
        if self.model.compile and self.parallel.zero_stage == 3:
            _fail("model.compile", self.model.compile, "false with parallel.zero_stage = 3 (its parameter "
                  "hooks run inside the blocks)")
        if self.tokens_per_step > self.run.train_tokens:
            _fail("run.train_tokens", self.run.train_tokens,
                  f"at least one optimizer step of tokens ({self.tokens_per_step})")
        return self

    @property
    def tokens_per_step(self) -> int:
        """Tokens per optimizer step for one data-parallel replica (x DP size for the job)."""
        return self.run.micro_batch_size * self.run.grad_accum * self.data.seq_len

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Config":
        return _build(cls, raw, "")


# --------------------------------------------------------------------------- building
def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        return any(_type_ok(value, arg) for arg in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if tp is str:
        return isinstance(value, str)
    if origin is dict:
        kt, vt = typing.get_args(tp)
        return isinstance(value, dict) and all(_type_ok(k, kt) and _type_ok(v, vt) for k, v in value.items())
    if origin is list:
        (it,) = typing.get_args(tp)
        return isinstance(value, list) and all(_type_ok(v, it) for v in value)
    raise TypeError(f"unsupported config type {tp}")


def _type_name(tp: Any) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    if typing.get_origin(tp) is typing.Union:
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is dict:
        return "a mapping of " + " -> ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return "a list of " + _type_name(typing.get_args(tp)[0])
    return names.get(tp, str(tp))


def _unknown(name: str, key: str, accepted: list[str]) -> None:
    close = difflib.get_close_matches(key, accepted, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(f"config error: unknown key {name!r}{hint}; accepted: {', '.join(accepted)}")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"config error: {prefix or 'config'} = {raw!r}: accepted a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            _unknown(name, str(key), list(fields))
        tp = hints[key]
        if tp is float and isinstance(value, str):  # PyYAML reads 5e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, name)
        elif not _type_ok(value, tp):
            _fail(name, value, _type_name(tp))
        else:
            kwargs[key] = float(value) if tp is float else value
    return cls(**kwargs)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "train":
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml_mapping(path: str | Path, what: str = "config") -> dict[str, Any]:
    """A YAML file that holds a mapping (empty: {}); ConfigError naming the file otherwise."""
    path = Path(path)
    problem = input_problem(path, "file")
    if problem is not None:
        raise ConfigError(f"{what} error: {what} file {str(path)!r} {problem}; accepted a YAML file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"{what} error: {str(path)!r} is not UTF-8 text; accepted a YAML file") from None
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "parse error"
        raise ConfigError(f"{what} error: {str(path)!r} is not valid YAML: {first}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{what} error: {str(path)!r} must hold a mapping of sections")
    return raw


def read_yaml(path: str | Path, _seen: tuple = ()) -> dict[str, Any]:
    """Read a config YAML, resolving its ``base:`` chain (relative paths)."""
    path = Path(path)
    if path.resolve() in _seen:
        raise ConfigError(f"config error: {str(path)!r} includes itself through 'base'")
    raw = read_yaml_mapping(path)
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        _fail(f"{path}:base", base, "a path to another config file")
    return _merge(read_yaml(path.parent / base, _seen + (path.resolve(),)), raw)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides (value parsed as YAML) to a raw config mapping."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"config error: override {item!r}: accepted the form section.field=value")
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            value = text
        node = raw
        parts = key.split(".")
        if parts[:2] == ["data", "train"] and len(parts) > 3:  # a dotted domain: data.train.wiki.en=1
            parts = parts[:2] + [".".join(parts[2:])]
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config error: override {item!r}: {part!r} is not a section")
        node[parts[-1]] = value
    return raw


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Load, override and validate a config; raises ConfigError with a one-line message."""
    raw = read_yaml(path) if path else {}
    return Config.from_dict(apply_overrides(raw, list(overrides))).validate()
