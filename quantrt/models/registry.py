"""Which architectures quantrt runs: checkpoint names -> model class, plus the facts each
architecture fixes that its config files do not state.

Torch-free on purpose: configs are parsed (and bad ones rejected) before torch is imported.
Adding an architecture is one model file and one :class:`ArchInfo` row here.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ArchInfo:
    name: str
    hf: tuple[str, ...]                  # transformers ``architectures`` class names
    gguf: tuple[str, ...] = ()           # llama.cpp ``general.architecture`` values
    model: str = "llama:LlamaForCausalLM"  # quantrt.models.<module>:<class>
    family: str = "llama"                # the model implementation's short name
    qkv_bias: bool = False               # Qwen2 has biased q/k/v without a config key for it
    qk_norm: bool = False
    # HF checkpoints store norm weights as (multiplier - offset): Gemma's RMSNorm multiplies by
    # (1 + w).  llama.cpp's converter adds the offset into the GGUF, so GGUFs use 0.
    norm_offset: float = 0.0
    embed_scale: bool = False            # embeddings multiplied by sqrt(hidden_size)
    # Gemma 3 configs carry attn_logit_softcapping but transformers' Gemma 3 never applies it.
    attn_softcap: bool = True
    # Default layer pattern when a config has no ``layer_types``: every ``swa_period``-th
    # layer is global, the others slide (Gemma 2: 2, Gemma 3: 6); None: all layers alike.
    swa_period: int | None = None
    # ... or: layers from the index this config key names on slide (Qwen2's max_window_layers)
    swa_first_layer_key: str | None = None
    # Sliding layers rotate with their own base (Gemma 3: 10000, global layers 1e6).
    local_rope: bool = False
    activation: str = "silu"             # GGUFs do not name it; HF configs do
    # What transformers' config class assumes for keys a config.json leaves out, where that
    # changes the math (our parser's own fallbacks are Llama's); GGUF keys likewise, without
    # the "{arch}." prefix.
    hf_defaults: tuple[tuple[str, object], ...] = ()
    gguf_defaults: tuple[tuple[str, object], ...] = ()
    # llama.cpp scales Gemma queries by 1/sqrt(head_dim), except for the 27B models (told
    # apart by their layer count), which use 1/sqrt(hidden / heads); a GGUF stores no scale.
    gguf_wide_query_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if ":" not in self.model:
            raise ValueError(f"{self.name}: model must be 'module:Class', got {self.model!r}")
        if self.swa_period is not None and self.swa_period < 1:
            raise ValueError(f"{self.name}: swa_period must be >= 1")


ARCHITECTURES = (
    ArchInfo("llama", ("LlamaForCausalLM",), ("llama",)),
    # llama.cpp writes Mistral as "llama"; a file saying "mistral" uses the same tensor names.
    ArchInfo("mistral", ("MistralForCausalLM",), ("mistral",)),
    ArchInfo("qwen2", ("Qwen2ForCausalLM",), ("qwen2",), qkv_bias=True,
             swa_first_layer_key="max_window_layers", hf_defaults=(("max_window_layers", 28),)),
    ArchInfo("qwen3", ("Qwen3ForCausalLM",), ("qwen3",), qk_norm=True),
    ArchInfo("gemma2", ("Gemma2ForCausalLM",), ("gemma2",), model="gemma:Gemma2ForCausalLM",
             family="gemma2", norm_offset=1.0, embed_scale=True, swa_period=2,
             activation="gelu_tanh", gguf_wide_query_layers=(46,), hf_defaults=(
                 ("head_dim", 256), ("query_pre_attn_scalar", 256), ("sliding_window", 4096),
                 ("final_logit_softcapping", 30.0), ("attn_logit_softcapping", 50.0),
                 ("hidden_activation", "gelu_pytorch_tanh"), ("tie_word_embeddings", True))),
    # ForConditionalGeneration: the multimodal checkpoints (4B and up); we run their text model
    ArchInfo("gemma3", ("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration"), ("gemma3",),
             model="gemma:Gemma3ForCausalLM",
             family="gemma3", qk_norm=True, norm_offset=1.0, embed_scale=True,
             attn_softcap=False, swa_period=6, local_rope=True, activation="gelu_tanh",
             gguf_wide_query_layers=(62,), hf_defaults=(
                 ("head_dim", 256), ("query_pre_attn_scalar", 256), ("sliding_window", 4096),
                 ("rope_theta", 1_000_000.0), ("rope_local_base_freq", 10000.0),
                 ("hidden_activation", "gelu_pytorch_tanh"), ("tie_word_embeddings", True),
                 # a multimodal config's text_config states only what differs from these
                 ("vocab_size", 262_208), ("hidden_size", 2304), ("intermediate_size", 9216),
                 ("num_hidden_layers", 26), ("num_attention_heads", 8),
                 ("num_key_value_heads", 4), ("max_position_embeddings", 131_072)),
             # llama.cpp's fixed base for Gemma 3's sliding layers when the file names none
             gguf_defaults=(("rope.freq_base_swa", 10000.0),)),
    ArchInfo("phi3", ("Phi3ForCausalLM",), ("phi3",), model="phi3:Phi3ForCausalLM",
             family="phi3"),
)
BY_NAME = {a.name: a for a in ARCHITECTURES}
HF_NAMES = {n: a for a in ARCHITECTURES for n in a.hf}
GGUF_NAMES = {n: a for a in ARCHITECTURES for n in a.gguf}
