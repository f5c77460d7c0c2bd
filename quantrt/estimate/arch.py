"""The architecture facts an estimate needs, and the list of every weight tensor it implies.

Dense models go through :func:`quantrt.config.from_hf_config` / ``from_gguf_metadata`` so that
their configs are validated once, the same way the loader does.  Mixtral (MoE) is not a model
quantrt runs, so its attention part is read as the Mistral it is and the experts are added
here from the raw config (``num_local_experts``, ``num_experts_per_tok``).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Iterator

from quantrt.config import HF_ARCHITECTURES, ModelConfig, from_gguf_metadata, from_hf_config
from quantrt.errors import ConfigError

MOE_ARCHITECTURES = {"MixtralForCausalLM": "MistralForCausalLM"}
SUPPORTED = sorted({*HF_ARCHITECTURES, *MOE_ARCHITECTURES})

# How tensor parallelism splits each role (vLLM's layers): column-parallel linears split
# their output rows, row-parallel ones their input columns, embedding and lm_head the
# vocabulary; K/V heads are split too but replicated once there are more GPUs than heads.
SPLIT = {
    "q": "column", "k": "kv", "v": "kv", "gate": "column", "up": "column",
    "o": "row", "down": "row", "embed": "vocab", "lm_head": "vocab",
}
LINEAR_ROLES = ("q", "k", "v", "o", "gate", "up", "down", "router", "lm_head")
CHECKPOINT_DTYPES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class Arch:
    name: str                  # HF class name or GGUF architecture
    hidden: int
    intermediate: int          # dense MLP width, or one expert's
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_position: int
    tied: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    experts: int = 0           # 0 = dense MLP
    experts_per_token: int = 0
    windows: tuple[int | None, ...] = ()   # per layer: sliding window, or None (full)
    dtype: str = "bfloat16"    # unquantized tensors in the checkpoint

    def __post_init__(self) -> None:
        for name in ("hidden", "intermediate", "layers", "heads", "kv_heads", "head_dim",
                     "vocab", "max_position"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.heads % self.kv_heads:
            raise ConfigError(f"{self.heads} attention heads are not a multiple of "
                              f"{self.kv_heads} KV heads")
        if self.experts < 0 or (self.experts and not 0 < self.experts_per_token <= self.experts):
            raise ConfigError(f"MoE needs 0 < experts_per_token <= experts, got "
                              f"{self.experts_per_token} of {self.experts}")
        if self.windows and len(self.windows) != self.layers:
            raise ConfigError(f"{len(self.windows)} sliding windows for {self.layers} layers")
        if self.dtype not in CHECKPOINT_DTYPES:
            raise ConfigError(f"checkpoint dtype {self.dtype!r} is not one of "
                              f"{', '.join(CHECKPOINT_DTYPES)}")

    @property
    def q_size(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.kv_heads * self.head_dim

    def window(self, layer: int) -> int | None:
        return self.windows[layer] if self.windows else None

    def parameters(self) -> int:
        """Parameter count (tied embeddings counted once)."""
        return sum(w.numel for w in weights(self))


@dataclass(frozen=True)
class Weight:
    """One weight of the model in HF naming: a linear layer or a plain tensor."""

    name: str                  # module name, e.g. model.layers.3.self_attn.q_proj
    role: str                  # q k v o gate up down router lm_head embed norm q_norm k_norm
    shape: tuple[int, ...]     # linear: (N, K) = (out, in); others as stored
    layer: int | None = None
    expert: int | None = None
    bias: bool = False

    @property
    def is_linear(self) -> bool:
        return self.role in LINEAR_ROLES

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n + (self.shape[0] if self.bias else 0)


def weights(arch: Arch) -> Iterator[Weight]:
    """Every weight in checkpoint order; lm_head only when not tied to the embedding."""
    h, f = arch.hidden, arch.intermediate
    yield Weight("model.embed_tokens", "embed", (arch.vocab, h))
    for i in range(arch.layers):
        p = f"model.layers.{i}"
        yield Weight(f"{p}.input_layernorm", "norm", (h,), i)
        for role, n in (("q", arch.q_size), ("k", arch.kv_size), ("v", arch.kv_size)):
            yield Weight(f"{p}.self_attn.{role}_proj", role, (n, h), i, bias=arch.qkv_bias)
        yield Weight(f"{p}.self_attn.o_proj", "o", (h, arch.q_size), i)
        if arch.qk_norm:
            yield Weight(f"{p}.self_attn.q_norm", "q_norm", (arch.head_dim,), i)
            yield Weight(f"{p}.self_attn.k_norm", "k_norm", (arch.head_dim,), i)
        yield Weight(f"{p}.post_attention_layernorm", "norm", (h,), i)
        if arch.experts:
            moe = f"{p}.block_sparse_moe"
            yield Weight(f"{moe}.gate", "router", (arch.experts, h), i)
            for e in range(arch.experts):
                # Mixtral names: w1 = gate, w3 = up, w2 = down.
                yield Weight(f"{moe}.experts.{e}.w1", "gate", (f, h), i, e)
                yield Weight(f"{moe}.experts.{e}.w2", "down", (h, f), i, e)
                yield Weight(f"{moe}.experts.{e}.w3", "up", (f, h), i, e)
        else:
            yield Weight(f"{p}.mlp.gate_proj", "gate", (f, h), i)
            yield Weight(f"{p}.mlp.up_proj", "up", (f, h), i)
            yield Weight(f"{p}.mlp.down_proj", "down", (h, f), i)
    yield Weight("model.norm", "norm", (h,))
    if not arch.tied:
        yield Weight("lm_head", "lm_head", (arch.vocab, h))


# -- from configs ----------------------------------------------------------------------------
def _dtype(name: str) -> str:
    # Older configs say "float"/"half"; an unknown or quantized name ("int8") is treated as
    # the usual 16-bit, which is what such checkpoints keep their unquantized tensors in.
    name = name.removeprefix("torch.")
    name = {"float": "float32", "half": "float16"}.get(name, name)
    return name if name in CHECKPOINT_DTYPES else "bfloat16"


def _windows(cfg: dict[str, Any], mc: ModelConfig) -> tuple[int | None, ...]:
    """Per-layer sliding windows: ``layer_types`` when given (transformers 5), else Qwen2's
    ``max_window_layers`` (layers from that index on slide), else every layer."""
    if not mc.sliding_window:
        return ()
    kinds = cfg.get("layer_types")
    if isinstance(kinds, list) and len(kinds) == mc.num_layers:
        return tuple(mc.sliding_window if k == "sliding_attention" else None for k in kinds)
    first = cfg.get("max_window_layers") if mc.architecture == "Qwen2ForCausalLM" else 0
    first = first if isinstance(first, int) and not isinstance(first, bool) else 0
    return tuple(mc.sliding_window if i >= first else None for i in range(mc.num_layers))


def _from_model_config(mc: ModelConfig, name: str, **extra: Any) -> Arch:
    return Arch(name=name, hidden=mc.hidden_size, intermediate=mc.intermediate_size,
                layers=mc.num_layers, heads=mc.num_heads, kv_heads=mc.num_kv_heads,
                head_dim=mc.head_dim, vocab=mc.vocab_size, max_position=mc.max_position_embeddings,
                tied=mc.tie_word_embeddings, qkv_bias=mc.attention_bias, qk_norm=mc.qk_norm,
                **extra)


def _int(cfg: dict[str, Any], key: str, where: str) -> int:
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"config key {key!r} must be a positive integer, got {value!r}",
                          where=where)
    return value


def arch_from_hf(cfg: dict[str, Any], where: str = "config.json") -> Arch:
    """An :class:`Arch` from a transformers ``config.json`` dict."""
    text = cfg.get("text_config")
    if isinstance(text, dict) and "hidden_size" not in cfg:
        cfg = {**text, "architectures": cfg.get("architectures")}
    archs = cfg.get("architectures") or []
    archs = [archs] if isinstance(archs, str) else archs
    if not isinstance(archs, list):
        raise ConfigError(f"'architectures' must be a list of class names, got {archs!r}",
                          where=where)
    moe = next((a for a in archs if a in MOE_ARCHITECTURES), None)
    if moe is None and not any(a in HF_ARCHITECTURES for a in archs):
        named = ", ".join(map(str, archs)) if archs else f"model_type={cfg.get('model_type')!r}"
        raise ConfigError(f"estimate does not know architecture {named}", where=where,
                          hint=f"supported: {', '.join(SUPPORTED)}")
    if moe is None:
        mc = from_hf_config(cfg, where)
        return _from_model_config(mc, mc.architecture, windows=_windows(cfg, mc),
                                  dtype=_dtype(mc.checkpoint_dtype))
    # The attention, norms and embeddings of an MoE model are its dense base's.
    mc = from_hf_config({**cfg, "architectures": [MOE_ARCHITECTURES[moe]]}, where)
    experts = _int(cfg, "num_local_experts", where)
    top_k = _int(cfg, "num_experts_per_tok", where)
    return _from_model_config(mc, moe, experts=experts, experts_per_token=top_k,
                              windows=_windows(cfg, mc), dtype=_dtype(mc.checkpoint_dtype))


def arch_from_gguf(meta: dict[str, Any], tensor_names: set[str], where: str) -> Arch:
    """An :class:`Arch` from GGUF metadata (experts from ``{arch}.expert_count``)."""
    mc = from_gguf_metadata(meta, where)
    arch = meta.get("general.architecture")
    experts = int(meta.get(f"{arch}.expert_count", 0) or 0)
    top_k = int(meta.get(f"{arch}.expert_used_count", 0) or 0)
    bias = any(n.endswith("attn_q.bias") for n in tensor_names)
    return replace(_from_model_config(mc, str(arch), experts=experts, experts_per_token=top_k),
                   tied="output.weight" not in tensor_names, qkv_bias=bias)
