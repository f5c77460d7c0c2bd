"""Architecture configuration, read from an HF ``config.json`` or from GGUF metadata.

One dataclass describes every model of the Llama family (Llama 2/3, SmolLM, Mistral,
Qwen2, Qwen3); the differences are flags (q/k norms, qkv bias, tied embeddings, rope
scaling), so the model code never branches on an architecture name.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from quantrt.errors import ConfigError

# HF ``architectures`` entries and GGUF ``general.architecture`` values we implement, mapped
# to our model family name.
HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "llama",
    "Qwen3ForCausalLM": "llama",
}
GGUF_ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama"}

ROPE_TYPES = ("default", "linear", "llama3", "dynamic", "yarn")


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

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise ConfigError(f"rope scaling type {self.rope_type!r} is not supported",
                              hint=f"supported: {', '.join(ROPE_TYPES)}")
        if not (self.theta > 0 and math.isfinite(self.theta)):
            raise ConfigError(f"rope theta must be a positive number, got {self.theta}")
        if self.factor <= 0:
            raise ConfigError(f"rope scaling factor must be positive, got {self.factor}")


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

    @property
    def rot_dim(self) -> int:
        return self.rotary_dim if self.rotary_dim is not None else self.head_dim

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def summary(self) -> dict[str, Any]:
        return {
            "architecture": self.architecture, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "layers": self.num_layers,
            "heads": self.num_heads, "kv_heads": self.num_kv_heads, "head_dim": self.head_dim,
            "vocab_size": self.vocab_size, "context_length": self.max_position_embeddings,
            "rope_theta": self.rope.theta, "rope_scaling": self.rope.rope_type,
            "tie_word_embeddings": self.tie_word_embeddings,
        }


def _rope_from_hf(cfg: dict[str, Any]) -> RopeConfig:
    # transformers 5 writes ``rope_parameters`` (theta inside); 4.x writes rope_theta + rope_scaling.
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(scaling, dict):
        raise ConfigError("rope_parameters / rope_scaling must be JSON objects")
    params = {**scaling, **params}
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    rtype = params.get("rope_type", params.get("type", "default")) or "default"
    # transformers falls back to max_position_embeddings, not to Llama 3's 8192.
    original = (params.get("original_max_position_embeddings")
                or cfg.get("original_max_position_embeddings")
                or cfg.get("max_position_embeddings") or 8192)
    return RopeConfig(
        theta=float(theta), rope_type=str(rtype), factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position=int(original),
        beta_fast=float(params.get("beta_fast", 32.0)), beta_slow=float(params.get("beta_slow", 1.0)),
    )


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
    arch = next((a for a in archs if a in HF_ARCHITECTURES), None)
    if arch is None:
        named = ", ".join(archs) if archs else f"model_type={cfg.get('model_type')!r}"
        raise ConfigError(f"unsupported architecture {named}", where=where,
                          hint=f"supported: {', '.join(sorted(HF_ARCHITECTURES))}")
    try:
        heads = _num(cfg, "num_attention_heads", int)
        hidden = _num(cfg, "hidden_size", int)
        if not cfg.get("head_dim") and heads > 0 and hidden % heads:
            raise ConfigError(f"hidden_size {hidden} is not a multiple of num_attention_heads "
                              f"{heads} and there is no head_dim")
        head_dim = _num(cfg, "head_dim", int, hidden // heads if heads > 0 else 0)
        return ModelConfig(
            family=HF_ARCHITECTURES[arch], architecture=arch, hidden_size=hidden,
            intermediate_size=_num(cfg, "intermediate_size", int),
            num_layers=_num(cfg, "num_hidden_layers", int), num_heads=heads,
            num_kv_heads=_num(cfg, "num_key_value_heads", int, heads), head_dim=head_dim,
            vocab_size=_num(cfg, "vocab_size", int), rms_norm_eps=_num(cfg, "rms_norm_eps", float, 1e-6),
            rope=_rope_from_hf(cfg),
            rotary_dim=int(head_dim * _num(cfg, "partial_rotary_factor", float, 1.0)),
            max_position_embeddings=_num(cfg, "max_position_embeddings", int, 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            # Qwen2 has biased q/k/v without saying so in its config.
            attention_bias=bool(cfg.get("attention_bias", arch == "Qwen2ForCausalLM")),
            qk_norm=arch == "Qwen3ForCausalLM",
            sliding_window=(_num(cfg, "sliding_window", int) if cfg.get("sliding_window")
                            and cfg.get("use_sliding_window", True) else None),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=_as_id_tuple(cfg.get("eos_token_id")),
            checkpoint_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
        )
    except ConfigError as exc:
        raise _located(exc, where) from None
    except (TypeError, ValueError, OverflowError) as exc:
        raise ConfigError(f"config has an invalid value: {exc}", where=where) from None


def from_gguf_metadata(meta: dict[str, Any], where: str) -> ModelConfig:
    """Build a :class:`ModelConfig` from GGUF key/values (llama.cpp's names)."""
    try:
        return _from_gguf_metadata(meta, where)
    except ConfigError as exc:
        raise _located(exc, where) from None
    except (TypeError, ValueError, OverflowError) as exc:
        raise ConfigError(f"GGUF metadata has an invalid value: {exc}", where=where) from None


def _from_gguf_metadata(meta: dict[str, Any], where: str) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ConfigError(f"unsupported GGUF architecture {arch!r}", where=where,
                          hint=f"supported: {', '.join(sorted(GGUF_ARCHITECTURES))}")

    def key(name: str, default: Any = None, required: bool = False) -> Any:
        full = f"{arch}.{name}"
        if full not in meta:
            if required:
                raise ConfigError(f"GGUF metadata lacks {full!r}", where=where)
            return default
        return meta[full]

    heads = int(key("attention.head_count", required=True))
    hidden = int(key("embedding_length", required=True))
    if heads <= 0:
        raise ConfigError(f"{arch}.attention.head_count must be positive, got {heads}")
    head_dim = int(key("attention.key_length", hidden // heads))
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = int(key("vocab_size", len(tokens) if tokens else 0))
    if vocab <= 0:
        raise ConfigError(f"GGUF metadata has neither {arch}.vocab_size nor tokenizer.ggml.tokens",
                          hint="the vocabulary size is unknown")
    context = int(key("context_length", 4096))
    rtype = key("rope.scaling.type", "none")
    rtype = {"none": "default", "linear": "linear", "yarn": "yarn"}.get(rtype, rtype)
    rope = RopeConfig(
        theta=float(key("rope.freq_base", 10000.0)), rope_type=rtype,
        factor=float(key("rope.scaling.factor", 1.0) or 1.0),
        original_max_position=int(key("rope.scaling.original_context_length", context)),
    )
    eos = meta.get("tokenizer.ggml.eos_token_id")
    return ModelConfig(
        family=GGUF_ARCHITECTURES[arch], architecture=arch, hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length", required=True)),
        num_layers=int(key("block_count", required=True)), num_heads=heads,
        num_kv_heads=int(key("attention.head_count_kv", heads)), head_dim=head_dim,
        vocab_size=vocab, rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        rope=rope, rotary_dim=int(key("rope.dimension_count", head_dim)),
        max_position_embeddings=context,
        tie_word_embeddings=False,  # decided by the loader from the presence of output.weight
        attention_bias=arch == "qwen2", qk_norm=arch == "qwen3",
        sliding_window=None,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=_as_id_tuple(eos),
        checkpoint_dtype="gguf",
    )
