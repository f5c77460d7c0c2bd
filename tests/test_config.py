"""ModelConfig from HF config.json (transformers 4.x and 5 layouts) and from GGUF metadata."""
from __future__ import annotations

import pytest

from quantrt.config import ModelConfig, RopeConfig, from_gguf_metadata, from_hf_config
from quantrt.errors import ConfigError

WHERE = "/models/m/config.json"

LLAMA31_4X = {  # Llama-3.1-8B-Instruct as transformers 4.4x writes it
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009], "hidden_size": 4096, "intermediate_size": 14336,
    "max_position_embeddings": 131072, "model_type": "llama", "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "vocab_size": 128256,
}
LLAMA31_5 = {  # the same model as transformers 5 writes it
    **{k: v for k, v in LLAMA31_4X.items() if k not in ("rope_scaling", "rope_theta", "torch_dtype")},
    "dtype": "bfloat16",
    "rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
                        "rope_theta": 500000.0},
}
SMOLLM2 = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 576, "intermediate_size": 1536,
    "max_position_embeddings": 8192, "num_attention_heads": 9, "num_hidden_layers": 30,
    "num_key_value_heads": 3, "rms_norm_eps": 1e-05, "rope_theta": 100000, "rope_scaling": None,
    "tie_word_embeddings": True, "vocab_size": 49152, "bos_token_id": 1, "eos_token_id": 2,
}
QWEN25 = {
    "architectures": ["Qwen2ForCausalLM"], "bos_token_id": 151643, "eos_token_id": 151645,
    "hidden_size": 3584, "intermediate_size": 18944, "max_position_embeddings": 32768,
    "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 131072,
    "use_sliding_window": False, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "vocab_size": 152064,
}
QWEN3_06B = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "head_dim": 128,
    "hidden_size": 1024, "intermediate_size": 3072, "max_position_embeddings": 40960,
    "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None,
    "use_sliding_window": False, "tie_word_embeddings": True, "vocab_size": 151936,
}
MISTRAL_V01 = {
    "architectures": ["MistralForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
    "max_position_embeddings": 32768, "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
    "sliding_window": 4096, "tie_word_embeddings": False, "vocab_size": 32000,
}
MISTRAL_V03 = {**MISTRAL_V01, "rope_theta": 1000000.0, "sliding_window": None, "head_dim": None,
               "vocab_size": 32768}


def test_llama31_transformers_4_and_5_agree():
    old, new = from_hf_config(LLAMA31_4X, WHERE), from_hf_config(LLAMA31_5, WHERE)
    assert old == new
    assert old.rope == RopeConfig(theta=500000.0, rope_type="llama3", factor=8.0,
                                  original_max_position=8192)
    assert (old.num_heads, old.num_kv_heads, old.head_dim) == (32, 8, 128)
    assert old.eos_token_ids == (128001, 128008, 128009) and old.bos_token_id == 128000
    assert old.checkpoint_dtype == "bfloat16" and not old.tie_word_embeddings
    assert not old.attention_bias and not old.qk_norm and old.sliding_window is None


def test_smollm2_tied():
    cfg = from_hf_config(SMOLLM2, WHERE)
    assert cfg.tie_word_embeddings and cfg.head_dim == 64 and cfg.rope.theta == 100000
    assert cfg.rope.rope_type == "default" and cfg.eos_token_ids == (2,)
    assert cfg.summary()["layers"] == 30


def test_qwen2_has_bias_and_no_sliding_window_unless_enabled():
    cfg = from_hf_config(QWEN25, WHERE)
    assert cfg.attention_bias and not cfg.qk_norm and cfg.sliding_window is None
    assert cfg.head_dim == 128 and cfg.rope.theta == 1e6


def test_qwen3_head_dim_is_explicit_and_uses_qk_norm():
    cfg = from_hf_config(QWEN3_06B, WHERE)
    assert cfg.head_dim == 128 != cfg.hidden_size // cfg.num_heads
    assert cfg.qk_norm and not cfg.attention_bias and cfg.tie_word_embeddings
    assert cfg.q_size == 16 * 128 and cfg.kv_size == 8 * 128


def test_mistral_sliding_window_and_null_head_dim():
    assert from_hf_config(MISTRAL_V01, WHERE).sliding_window == 4096
    v03 = from_hf_config(MISTRAL_V03, WHERE)
    assert v03.sliding_window is None and v03.head_dim == 128 and v03.rope.theta == 1e6


@pytest.mark.parametrize("rope_keys, expected", [
    ({"rope_scaling": {"type": "linear", "factor": 2.0}, "rope_theta": 10000.0},
     RopeConfig(10000.0, "linear", 2.0, original_max_position=4096)),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
     RopeConfig(10000.0, "dynamic", 2.0, original_max_position=4096)),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024},
      "rope_theta": 1e6}, RopeConfig(1e6, "yarn", 4.0, original_max_position=1024)),
    # yarn without its original length: transformers falls back to max_position_embeddings
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}},
     RopeConfig(1e6, "yarn", 4.0, original_max_position=4096)),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}},
     RopeConfig(5e5, original_max_position=4096)),
    ({"rope_parameters": {"rope_theta": 5e5}, "rope_theta": 1.0},
     RopeConfig(5e5, original_max_position=4096)),
    ({}, RopeConfig(10000.0, original_max_position=4096)),
], ids=["4x-linear", "4x-dynamic", "4x-yarn", "5-yarn-default-original", "5-default",
        "5-wins-over-4x", "none"])
def test_rope_layouts(rope_keys, expected):
    base = {k: v for k, v in SMOLLM2.items() if not k.startswith("rope")}
    cfg = from_hf_config({**base, "max_position_embeddings": 4096, **rope_keys}, WHERE)
    assert cfg.rope == expected


def test_rope_agrees_with_transformers():
    transformers = pytest.importorskip("transformers")
    for raw in (LLAMA31_4X, LLAMA31_5, {**QWEN25, "rope_scaling": {"type": "yarn", "factor": 4.0}}):
        cls = getattr(transformers, raw["architectures"][0].replace("ForCausalLM", "Config"))
        theirs = cls(**{k: v for k, v in raw.items() if k != "architectures"}).rope_parameters
        ours = from_hf_config(raw, WHERE).rope
        assert ours.theta == theirs["rope_theta"] and ours.rope_type == theirs["rope_type"]
        if ours.rope_type != "default":
            assert ours.factor == theirs["factor"]
            assert ours.original_max_position == theirs["original_max_position_embeddings"]


def test_partial_rotary_and_text_config_wrapper():
    cfg = from_hf_config({**SMOLLM2, "partial_rotary_factor": 0.5}, WHERE)
    assert cfg.rot_dim == 32
    wrapped = {"architectures": ["LlamaForCausalLM"], "text_config": dict(SMOLLM2)}
    assert from_hf_config(wrapped, WHERE) == from_hf_config(SMOLLM2, WHERE)


def test_architecture_choices():
    assert from_hf_config({**SMOLLM2, "architectures": "LlamaForCausalLM"}, WHERE).family == "llama"
    mixed = {**SMOLLM2, "architectures": ["FooModel", "MistralForCausalLM"]}
    assert from_hf_config(mixed, WHERE).architecture == "MistralForCausalLM"


@pytest.mark.parametrize("changes, needle", [
    ({"architectures": ["FooForCausalLM"]}, "unsupported architecture FooForCausalLM"),
    ({"architectures": None, "model_type": "foo"}, "model_type='foo'"),
    ({"architectures": [1, 2]}, "list of class names"),
    ({"hidden_size": None}, "'hidden_size' is null"),
    ({"vocab_size": "many"}, "'vocab_size' must be an integer"),
    ({"num_hidden_layers": 2.5}, "'num_hidden_layers' must be an integer"),
    ({"rms_norm_eps": float("nan")}, "'rms_norm_eps' must be a number"),
    ({"num_attention_heads": 0}, "num_heads must be a positive integer"),
    ({"num_key_value_heads": 2}, "not a multiple"),
    ({"hidden_size": 577}, "not a multiple of num_attention_heads"),
    ({"rope_scaling": {"rope_type": "longrope", "factor": 2.0}}, "'longrope'"),
    ({"rope_theta": -1}, "rope theta must be a positive"),
    ({"rope_parameters": [1, 2]}, "must be JSON objects"),
    ({"eos_token_id": "x"}, "invalid value"),
])
def test_bad_configs_name_the_file(changes, needle):
    raw = {**SMOLLM2, **changes}  # a None here is a JSON null
    with pytest.raises(ConfigError) as err:
        from_hf_config(raw, WHERE)
    assert err.value.where == WHERE, err.value.one_line()
    assert needle in err.value.message, err.value.one_line()


def test_missing_key_is_named():
    raw = {k: v for k, v in SMOLLM2.items() if k != "intermediate_size"}
    with pytest.raises(ConfigError, match="missing the key 'intermediate_size'") as err:
        from_hf_config(raw, WHERE)
    assert err.value.where == WHERE


# -- GGUF metadata -------------------------------------------------------------------------
def _gguf_meta(arch: str = "llama", **extra) -> dict:
    meta = {"general.architecture": arch, f"{arch}.block_count": 2, f"{arch}.context_length": 2048,
            f"{arch}.embedding_length": 64, f"{arch}.feed_forward_length": 128,
            f"{arch}.attention.head_count": 4, f"{arch}.attention.head_count_kv": 2,
            f"{arch}.rope.freq_base": 10000.0, f"{arch}.attention.layer_norm_rms_epsilon": 1e-5,
            "tokenizer.ggml.tokens": [f"t{i}" for i in range(50)],
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}
    return {**meta, **extra}


def test_gguf_llama():
    cfg = from_gguf_metadata(_gguf_meta(), "m.gguf")
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (2, 64, 4, 2)
    assert cfg.head_dim == 16 and cfg.vocab_size == 50 and cfg.max_position_embeddings == 2048
    assert cfg.eos_token_ids == (2,) and cfg.bos_token_id == 1 and cfg.checkpoint_dtype == "gguf"
    assert not cfg.attention_bias and not cfg.qk_norm


def test_gguf_qwen_flags_and_explicit_sizes():
    q2 = from_gguf_metadata(_gguf_meta("qwen2", **{"qwen2.vocab_size": 64}), "m.gguf")
    assert q2.attention_bias and q2.vocab_size == 64
    q3 = from_gguf_metadata(_gguf_meta("qwen3", **{"qwen3.attention.key_length": 32}), "m.gguf")
    assert q3.qk_norm and q3.head_dim == 32 and q3.rot_dim == 32


def test_gguf_yarn_and_linear_scaling():
    yarn = from_gguf_metadata(_gguf_meta(**{
        "llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0,
        "llama.rope.scaling.original_context_length": 512}), "m.gguf")
    assert yarn.rope == RopeConfig(10000.0, "yarn", 4.0, original_max_position=512)
    linear = from_gguf_metadata(_gguf_meta(**{"llama.rope.scaling.type": "linear",
                                              "llama.rope.scaling.factor": 2.0}), "m.gguf")
    assert linear.rope.rope_type == "linear" and linear.rope.original_max_position == 2048


def test_demo_gguf_metadata(demo_gguf):
    from formats.gguf_file import read_gguf

    cfg = from_gguf_metadata(read_gguf(demo_gguf).metadata, str(demo_gguf))
    assert isinstance(cfg, ModelConfig) and cfg.architecture == "llama"
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (30, 576, 9, 3)
    assert cfg.vocab_size == 49152 and cfg.intermediate_size == 1536 and cfg.rope.theta == 100000


@pytest.mark.parametrize("meta, needle", [
    (_gguf_meta("gemma"), "unsupported GGUF architecture 'gemma'"),
    ({k: v for k, v in _gguf_meta().items() if k != "llama.block_count"}, "'llama.block_count'"),
    ({k: v for k, v in _gguf_meta().items() if k != "tokenizer.ggml.tokens"}, "vocab"),
    (_gguf_meta(**{"llama.attention.head_count": "four"}), "invalid value"),
    (_gguf_meta(**{"llama.attention.head_count": 0}), "must be positive"),
    (_gguf_meta(**{"llama.attention.head_count_kv": 3}), "not a multiple"),
    (_gguf_meta(**{"llama.rope.scaling.type": "su"}), "'su'"),
    (_gguf_meta(**{"general.architecture": ["llama"]}), "invalid value"),
])
def test_bad_gguf_metadata_names_the_file(meta, needle):
    with pytest.raises(ConfigError) as err:
        from_gguf_metadata(meta, "/models/bad.gguf")
    assert err.value.where == "/models/bad.gguf" and needle in err.value.one_line()
