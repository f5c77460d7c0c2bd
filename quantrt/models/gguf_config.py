"""ModelConfig from GGUF metadata, with llama.cpp's conventions: what its converter writes
and what llama.cpp assumes for what the file leaves out.  Called through
:func:`quantrt.config.from_gguf_metadata` (which turns stray exceptions into ConfigErrors)."""
from __future__ import annotations

import math
from typing import Any

from quantrt.config import ModelConfig, RopeConfig, _as_id_tuple, _layer_types
from quantrt.errors import ConfigError
from quantrt.models.registry import GGUF_NAMES


def config_from_gguf(meta: dict[str, Any], where: str,
                     rope_factors: tuple[Any, Any] | None) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch not in GGUF_NAMES:
        raise ConfigError(f"unsupported GGUF architecture {arch!r}", where=where,
                          hint=f"supported: {', '.join(sorted(GGUF_NAMES))}")
    info = GGUF_NAMES[arch]
    defaults = dict(info.gguf_defaults)

    def key(name: str, default: Any = None, required: bool = False) -> Any:
        full = f"{arch}.{name}"
        if full not in meta:
            if required:
                raise ConfigError(f"GGUF metadata lacks {full!r}", where=where)
            return defaults.get(name, default)
        return meta[full]

    heads = int(key("attention.head_count", required=True))
    hidden = int(key("embedding_length", required=True))
    layers = int(key("block_count", required=True))
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
    short, long = rope_factors if rope_factors is not None else ((), ())
    if rope_factors is not None:
        rtype = "longrope"
    attn_factor = key("rope.scaling.attn_factor")
    rope = RopeConfig(
        theta=float(key("rope.freq_base", 10000.0)), rope_type=rtype,
        factor=float(key("rope.scaling.factor", 1.0) or 1.0),
        original_max_position=int(key("rope.scaling.original_context_length", context)),
        short_factor=tuple(float(f) for f in short), long_factor=tuple(float(f) for f in long),
        attention_factor=None if attn_factor is None else float(attn_factor),
    )
    # llama.cpp writes 0 for "no window" (Phi-3 without one).
    window = int(key("attention.sliding_window", 0) or 0) or None
    types = _layer_types(info, layers, key("attention.sliding_window_pattern")) if window else ()
    local_rope = RopeConfig(theta=float(key("rope.freq_base_swa", rope.theta)),
                            original_max_position=context) if info.local_rope else None
    scale = key("attention.scale")
    if scale is None and layers in info.gguf_wide_query_layers:
        scale = (hidden // heads) ** -0.5  # llama.cpp's integer division, as it does
    eos = meta.get("tokenizer.ggml.eos_token_id")
    return ModelConfig(
        family=info.family, architecture=arch, hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length", required=True)),
        num_layers=layers, num_heads=heads,
        num_kv_heads=int(key("attention.head_count_kv", heads)), head_dim=head_dim,
        vocab_size=vocab, rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        rope=rope, local_rope=None if local_rope == rope else local_rope,
        rotary_dim=int(key("rope.dimension_count", head_dim)),
        max_position_embeddings=context,
        tie_word_embeddings=False,  # decided by the loader from the presence of output.weight
        attention_bias=info.qkv_bias, qk_norm=info.qk_norm,
        sliding_window=window, layer_types=types,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=_as_id_tuple(eos),
        checkpoint_dtype="gguf",
        hidden_act=info.activation,
        attn_softcap=(float(key("attn_logit_softcapping")) if info.attn_softcap
                      and key("attn_logit_softcapping") else None),
        final_softcap=float(key("final_logit_softcapping")) if key("final_logit_softcapping") else None,
        attention_scale=None if scale is None else float(scale),
        # llama.cpp's converter already added Gemma's +1 to the stored norm weights
        norm_offset=0.0,
        embed_scale=math.sqrt(hidden) if info.embed_scale else 1.0,
    )
