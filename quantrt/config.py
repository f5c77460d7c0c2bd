"""Architecture configuration, read from an HF ``config.json`` or from GGUF metadata.

One dataclass describes every model quantrt runs; differences between architectures are
settings (q/k norms, qkv bias, tied embeddings, rope variants, per-layer sliding windows,
soft-capping, norm offsets), so shared model code never branches on an architecture name.
What an architecture fixes without saying so in its files is in
:mod:`quantrt.models.registry`.

KV cache accounting ignores sliding windows: every layer keeps the whole context (correct,
not minimal); the window only masks attention.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from quantrt.errors import ConfigError
from quantrt.models.registry import BY_NAME, GGUF_NAMES, HF_NAMES, ArchInfo

# HF ``architectures`` entries and GGUF ``general.architecture`` values we implement, mapped
# to the name of the model implementation that runs them.
HF_ARCHITECTURES = {name: info.family for name, info in HF_NAMES.items()}
GGUF_ARCHITECTURES = {name: info.family for name, info in GGUF_NAMES.items()}

ROPE_TYPES = ("default", "linear", "llama3", "dynamic", "yarn", "longrope")
# Gated-MLP activations: silu (SwiGLU) and GELU with the tanh approximation (GeGLU) or exact.
ACTIVATIONS = ("silu", "gelu_tanh", "gelu")
_HF_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh",
                   "gelu_new": "gelu_tanh", "gelu": "gelu"}
LAYER_TYPES = ("full_attention", "sliding_attention")


def _positive(name: str, value: float | None, optional: bool = True) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and value > 0):
        raise ConfigError(f"{name} must be a positive number, got {value!r}")


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    # llama3 scaling
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192
    # yarn
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    # longrope (Phi-3): per-frequency divisors up to / past the original context, and the
    # factor cos/sin are multiplied by
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    attention_factor: float | None = None

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise ConfigError(f"rope scaling type {self.rope_type!r} is not supported",
                              hint=f"supported: {', '.join(ROPE_TYPES)}")
        if not (self.theta > 0 and math.isfinite(self.theta)):
            raise ConfigError(f"rope theta must be a positive number, got {self.theta}")
        if self.factor <= 0:
            raise ConfigError(f"rope scaling factor must be positive, got {self.factor}")
        if self.rope_type == "longrope":
            if not self.short_factor or len(self.short_factor) != len(self.long_factor):
                raise ConfigError("rope scaling type 'longrope' needs short_factor and "
                                  "long_factor lists of equal length")
            for f in (*self.short_factor, *self.long_factor):
                _positive("a longrope factor", f, optional=False)
            _positive("the longrope attention factor", self.attention_factor)


@dataclass(frozen=True)
class ModelConfig:
    family: str
    architecture: str  # as named by the checkpoint (HF class name or GGUF arch)
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = field(default_factory=RopeConfig)
    rotary_dim: int | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    checkpoint_dtype: str = "float32"
    hidden_act: str = "silu"
    # Per layer "full_attention" / "sliding_attention"; empty: every layer alike (sliding when
    # a window is set).
    layer_types: tuple[str, ...] = ()
    local_rope: RopeConfig | None = None  # rotary of sliding layers, where it differs
    attn_softcap: float | None = None     # scores -> cap * tanh(scores / cap)
    final_softcap: float | None = None    # the same on the output logits
    attention_scale: float | None = None  # None: head_dim ** -0.5
    norm_offset: float = 0.0              # added to the checkpoint's norm weights on load
    embed_scale: float = 1.0              # embeddings are multiplied by this

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "vocab_size", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"model config field {name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_attention_heads ({self.num_heads}) is not a multiple of "
                              f"num_key_value_heads ({self.num_kv_heads})")
        rot = self.rotary_dim if self.rotary_dim is not None else self.head_dim
        if rot % 2 or rot > self.head_dim:
            raise ConfigError(f"rotary dimension {rot} must be even and <= head_dim {self.head_dim}")
        if not self.rms_norm_eps > 0:
            raise ConfigError(f"rms_norm_eps must be positive, got {self.rms_norm_eps}")
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"activation {self.hidden_act!r} is not supported",
                              hint=f"supported: {', '.join(ACTIVATIONS)}")
        if self.sliding_window is not None and (
                isinstance(self.sliding_window, bool) or not isinstance(self.sliding_window, int)
                or self.sliding_window <= 0):
            raise ConfigError(f"sliding_window must be a positive integer, got {self.sliding_window!r}")
        if self.layer_types:
            if len(self.layer_types) != self.num_layers or not set(self.layer_types) <= set(LAYER_TYPES):
                raise ConfigError(f"layer_types must list one of {LAYER_TYPES} for each of the "
                                  f"{self.num_layers} layers, got {list(self.layer_types)}")
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                raise ConfigError("layer_types has sliding layers but sliding_window is not set")
        for rope in (self.rope, self.local_rope):
            if rope is not None and rope.rope_type == "longrope" and len(rope.short_factor) != rot // 2:
                raise ConfigError(f"longrope factors have {len(rope.short_factor)} entries, the "
                                  f"rotary dimension {rot} needs {rot // 2}")
        _positive("attn_logit_softcapping", self.attn_softcap)
        _positive("final_logit_softcapping", self.final_softcap)
        _positive("the attention scale", self.attention_scale)
        _positive("the embedding scale", self.embed_scale, optional=False)
        if not math.isfinite(self.norm_offset):
            raise ConfigError(f"norm offset must be finite, got {self.norm_offset}")

    @property
    def arch_info(self) -> ArchInfo:
        return HF_NAMES.get(self.architecture) or GGUF_NAMES.get(self.architecture) or BY_NAME[self.family]

    @property
    def rot_dim(self) -> int:
        return self.rotary_dim if self.rotary_dim is not None else self.head_dim

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def attn_scale(self) -> float:
        return self.attention_scale if self.attention_scale is not None else self.head_dim ** -0.5

    def is_sliding(self, layer: int) -> bool:
        if self.sliding_window is None:
            return False
        return not self.layer_types or self.layer_types[layer] == "sliding_attention"

    def window(self, layer: int) -> int | None:
        """The sliding window of ``layer`` (None: it sees the whole context)."""
        return self.sliding_window if self.is_sliding(layer) else None

    def rope_for(self, layer: int) -> RopeConfig:
        return self.local_rope if self.local_rope is not None and self.is_sliding(layer) else self.rope

    def summary(self) -> dict[str, Any]:
        sliding = sum(self.is_sliding(i) for i in range(self.num_layers))
        return {
            "architecture": self.architecture, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "layers": self.num_layers,
            "heads": self.num_heads, "kv_heads": self.num_kv_heads, "head_dim": self.head_dim,
            "vocab_size": self.vocab_size, "context_length": self.max_position_embeddings,
            "rope_theta": self.rope.theta, "rope_scaling": self.rope.rope_type,
            "rope_factor": self.rope.factor,
            "rope_original_context": self.rope.original_max_position,
            "rope_local_theta": self.local_rope.theta if self.local_rope else None,
            "rotary_dim": self.rot_dim, "tie_word_embeddings": self.tie_word_embeddings,
            "sliding_window": self.sliding_window if sliding else None,
            "sliding_layers": sliding, "attn_softcap": self.attn_softcap,
            "final_softcap": self.final_softcap, "attention_scale": self.attn_scale,
            "activation": self.hidden_act, "norm_offset": self.norm_offset,
            "embed_scale": self.embed_scale,
        }


def _flat_rope(params: dict[str, Any], cfg: dict[str, Any], theta: Any) -> RopeConfig:
    """One rotary from one flat parameter dict (``theta`` when the dict names none)."""
    if not isinstance(params, dict):
        raise ConfigError("rope_parameters / rope_scaling must be JSON objects")
    theta = params.get("rope_theta", theta)
    rtype = params.get("rope_type", params.get("type", "default")) or "default"
    # Phi-3's configs say "su" (or "yarn", with short/long factors) for what is longrope.
    if rtype == "su" or (rtype == "yarn" and "short_factor" in params):
        rtype = "longrope"
    # transformers falls back to max_position_embeddings, not to Llama 3's 8192.
    original = int(params.get("original_max_position_embeddings")
                   or cfg.get("original_max_position_embeddings")
                   or cfg.get("max_position_embeddings") or 8192)
    factor, attention = params.get("factor"), params.get("attention_factor")
    if rtype == "longrope":
        # transformers: without a factor the context growth is it, and the default
        # attention factor is sqrt(1 + ln(factor) / ln(original context)).
        factor = factor or int(cfg.get("max_position_embeddings") or original) / original
        if attention is None:
            attention = (math.sqrt(1 + math.log(factor) / math.log(original))
                         if factor > 1 else 1.0)
    return RopeConfig(
        theta=float(theta), rope_type=str(rtype), factor=float(factor or 1.0),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position=original,
        beta_fast=float(params.get("beta_fast", 32.0)), beta_slow=float(params.get("beta_slow", 1.0)),
        short_factor=tuple(float(f) for f in params.get("short_factor") or ()),
        long_factor=tuple(float(f) for f in params.get("long_factor") or ()),
        attention_factor=None if attention is None else float(attention),
    )


def _ropes_from_hf(cfg: dict[str, Any], local: bool) -> tuple[RopeConfig, RopeConfig | None]:
    """The global rotary and (``local``: Gemma 3) the sliding layers' own."""
    # transformers 5 writes ``rope_parameters`` (theta inside, one dict per layer type where
    # they differ); 4.x writes rope_theta + rope_scaling (+ rope_local_base_freq).
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(scaling, dict):
        raise ConfigError("rope_parameters / rope_scaling must be JSON objects")
    theta = cfg.get("rope_theta", 10000.0)
    if "full_attention" in params or "sliding_attention" in params:
        rope = _flat_rope(params.get("full_attention") or {}, cfg, theta)
        sliding = params.get("sliding_attention")
        local_rope = _flat_rope(sliding, cfg, 10000.0) if sliding is not None else None
    else:
        rope = _flat_rope({**scaling, **params}, cfg, theta)
        base = cfg.get("rope_local_base_freq")
        local_rope = _flat_rope({"rope_theta": base}, cfg, base) if base is not None else None
    if not local or local_rope == rope:
        local_rope = None
    return rope, local_rope


_REQUIRED = object()


def _num(cfg: dict[str, Any], key: str, kind: type, default: Any = _REQUIRED) -> Any:
    """``cfg[key]`` as ``kind``; a null counts as absent (transformers writes nulls)."""
    value = cfg.get(key)
    if value is None:
        if default is _REQUIRED:
            raise ConfigError(f"config is missing the key {key!r}" if key not in cfg
                              else f"config key {key!r} is null")
        return default
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and kind is int and isinstance(value, float):
        ok = value.is_integer()
    if not ok or (isinstance(value, float) and not math.isfinite(value)):
        article = "an integer" if kind is int else "a number"
        raise ConfigError(f"config key {key!r} must be {article}, got {value!r}")
    return kind(value)


def _as_id_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)


def _located(exc: ConfigError, where: str) -> ConfigError:
    """``exc`` naming ``where`` when the raiser did not know the file."""
    if exc.where is not None:
        return exc
    return ConfigError(exc.message, where=where, hint=exc.hint)


def _layer_types(info: ArchInfo, layers: int, period: Any = None,
                 first_sliding: Any = None) -> tuple[str, ...]:
    """Per-layer types from a period (every ``period``-th layer global, as Gemma's
    ``sliding_window_pattern``; an int, or one bool per layer: True = sliding) or from the
    first sliding layer (Qwen2); () when neither applies."""
    if isinstance(period, (list, tuple)):
        if len(period) != layers:
            raise ConfigError(f"sliding window pattern lists {len(period)} layers, the model has {layers}")
        return tuple(LAYER_TYPES[bool(p)] for p in period)
    period = info.swa_period if period is None else period
    if period is not None:
        if isinstance(period, bool) or not isinstance(period, int) or period < 1:
            raise ConfigError(f"sliding window pattern must be a positive integer, got {period!r}")
        return tuple(LAYER_TYPES[(i + 1) % period != 0] for i in range(layers))
    if first_sliding is not None:
        return tuple(LAYER_TYPES[i >= int(first_sliding)] for i in range(layers))
    return ()


def _hf_layer_types(cfg: dict[str, Any], info: ArchInfo, layers: int) -> tuple[str, ...]:
    types = cfg.get("layer_types")
    if types is not None:
        if not isinstance(types, list) or not all(isinstance(t, str) for t in types):
            raise ConfigError(f"layer_types must be a list of strings, got {types!r}")
        return tuple(types)
    first = cfg.get(info.swa_first_layer_key) if info.swa_first_layer_key else None
    return _layer_types(info, layers, cfg.get("sliding_window_pattern"), first)


def from_hf_config(cfg: dict[str, Any], where: str = "config.json") -> ModelConfig:
    """Build a :class:`ModelConfig` from a transformers ``config.json`` dict."""
    if isinstance(cfg.get("text_config"), dict) and "hidden_size" not in cfg:
        cfg = {**cfg["text_config"], "architectures": cfg.get("architectures")}
    archs = cfg.get("architectures") or []
    if isinstance(archs, str):  # hand-written configs sometimes drop the list
        archs = [archs]
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise ConfigError(f"'architectures' must be a list of class names, got {archs!r}",
                          where=where)
    arch = next((a for a in archs if a in HF_NAMES), None)
    if arch is None:
        named = ", ".join(archs) if archs else f"model_type={cfg.get('model_type')!r}"
        raise ConfigError(f"unsupported architecture {named}", where=where,
                          hint=f"supported: {', '.join(sorted(HF_NAMES))}")
    info = HF_NAMES[arch]
    # Only absent keys take the config class's default: a null is an explicit "none".
    cfg = {**dict(info.hf_defaults), **cfg}
    try:
        heads = _num(cfg, "num_attention_heads", int)
        hidden = _num(cfg, "hidden_size", int)
        if not cfg.get("head_dim") and heads > 0 and hidden % heads:
            raise ConfigError(f"hidden_size {hidden} is not a multiple of num_attention_heads "
                              f"{heads} and there is no head_dim")
        head_dim = _num(cfg, "head_dim", int, hidden // heads if heads > 0 else 0)
        layers = _num(cfg, "num_hidden_layers", int)
        rope, local_rope = _ropes_from_hf(cfg, info.local_rope)
        # transformers 5 moved partial_rotary_factor into rope_parameters for some models
        partial = _num(cfg, "partial_rotary_factor", float, None)
        if partial is None:
            partial = _num(cfg.get("rope_parameters") or {}, "partial_rotary_factor", float, 1.0)
        window = (_num(cfg, "sliding_window", int) if cfg.get("sliding_window")
                  and cfg.get("use_sliding_window", True) else None)
        act = cfg.get("hidden_activation") or cfg.get("hidden_act") or info.activation
        scalar = _num(cfg, "query_pre_attn_scalar", float, None)
        return ModelConfig(
            family=info.family, architecture=arch, hidden_size=hidden,
            intermediate_size=_num(cfg, "intermediate_size", int),
            num_layers=layers, num_heads=heads,
            num_kv_heads=_num(cfg, "num_key_value_heads", int, heads), head_dim=head_dim,
            vocab_size=_num(cfg, "vocab_size", int), rms_norm_eps=_num(cfg, "rms_norm_eps", float, 1e-6),
            rope=rope, local_rope=local_rope,
            rotary_dim=int(head_dim * partial),
            max_position_embeddings=_num(cfg, "max_position_embeddings", int, 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", info.qkv_bias)),
            qk_norm=info.qk_norm, sliding_window=window,
            layer_types=_hf_layer_types(cfg, info, layers) if window else (),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=_as_id_tuple(cfg.get("eos_token_id")),
            checkpoint_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
            hidden_act=_HF_ACTIVATIONS.get(str(act), str(act)),
            attn_softcap=(_num(cfg, "attn_logit_softcapping", float, None)
                          if info.attn_softcap else None),
            final_softcap=_num(cfg, "final_logit_softcapping", float, None),
            attention_scale=None if scalar is None else scalar ** -0.5,
            norm_offset=info.norm_offset,
            embed_scale=math.sqrt(hidden) if info.embed_scale else 1.0,
        )
    except ConfigError as exc:
        raise _located(exc, where) from None
    except (TypeError, ValueError, OverflowError, ZeroDivisionError) as exc:
        raise ConfigError(f"config has an invalid value: {exc}", where=where) from None


def from_gguf_metadata(meta: dict[str, Any], where: str,
                       rope_factors: tuple[Any, Any] | None = None) -> ModelConfig:
    """Build a :class:`ModelConfig` from GGUF key/values (llama.cpp's names).

    ``rope_factors`` are the (short, long) longrope factors a Phi-3 GGUF stores as the
    tensors ``rope_factors_short/long.weight`` rather than as keys."""
    try:
        from quantrt.models.gguf_config import config_from_gguf

        return config_from_gguf(meta, where, rope_factors)
    except ConfigError as exc:
        raise _located(exc, where) from None
    except (TypeError, ValueError, OverflowError) as exc:
        raise ConfigError(f"GGUF metadata has an invalid value: {exc}", where=where) from None
