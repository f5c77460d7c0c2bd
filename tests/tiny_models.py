"""Random-init tiny HF checkpoints (odd sizes) with a byte-level tokenizer, for tests."""
from __future__ import annotations

import json
from pathlib import Path

import torch

VOCAB = 300  # 256 byte tokens + specials + padding rows, deliberately not a power of two

ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama-tied": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": True}),
    "llama3-rope": ("LlamaConfig", "LlamaForCausalLM", {"rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 24}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
}


def save_byte_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>")
    fast.add_special_tokens({"bos_token": "<s>", "eos_token": "</s>"})
    fast.save_pretrained(path)


def make_tiny_model(path: Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    import transformers

    cfg_name, model_name, extra = ARCHS[arch]
    torch.manual_seed(seed)
    kwargs = dict(vocab_size=VOCAB, hidden_size=72, intermediate_size=136, num_hidden_layers=2,
                  num_attention_heads=3, num_key_value_heads=1, max_position_embeddings=256,
                  rms_norm_eps=1e-6, bos_token_id=256, eos_token_id=257)
    kwargs.update(extra)
    kwargs.update(overrides)
    config = getattr(transformers, cfg_name)(**kwargs)
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():  # HF inits norms to 1 and biases to 0: make them informative
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    save_byte_tokenizer(path)
    return path


def read_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())
