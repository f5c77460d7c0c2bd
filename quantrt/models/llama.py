"""The Llama family (Llama 2/3, SmolLM, Mistral, Qwen2, Qwen3) as one implementation.

Differences between family members are config flags (qkv bias, q/k norms, tied embeddings,
rope scaling).  Parameter prefixes follow HF naming so checkpoint names map directly; q/k/v
and gate/up are fused into one layer each, loaded shard by shard.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from quantrt.config import ModelConfig
from quantrt.models.attention import AttentionMetadata, paged_attention, write_kv
from quantrt.models.layers import (QuantLinear, RMSNorm, RotaryEmbedding, VocabEmbedding,
                                   silu_and_mul)
from quantrt.quant.base import QuantConfig

KVCache = tuple[torch.Tensor, torch.Tensor]


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, qc: QuantConfig, prefix: str, dtype: torch.dtype,
                 rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.cfg = cfg
        self.qkv_proj = QuantLinear(cfg.hidden_size, [cfg.q_size, cfg.kv_size, cfg.kv_size],
                                    bias=cfg.attention_bias, quant_config=qc,
                                    prefix=f"{prefix}.qkv_proj", params_dtype=dtype,
                                    shard_names=["q_proj", "k_proj", "v_proj"])
        self.o_proj = QuantLinear(cfg.q_size, [cfg.hidden_size], bias=False, quant_config=qc,
                                  prefix=f"{prefix}.o_proj", params_dtype=dtype)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype, f"{prefix}.q_norm")
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype, f"{prefix}.k_norm")
        self.rotary = rotary
        self.scale = cfg.head_dim ** -0.5

    def forward(self, rope: tuple[torch.Tensor, torch.Tensor], h: torch.Tensor, kv: KVCache,
                meta: AttentionMetadata) -> torch.Tensor:
        cfg = self.cfg
        hq, hk = cfg.num_heads, cfg.num_kv_heads
        qkv = self.qkv_proj(h).view(-1, hq + 2 * hk, cfg.head_dim)
        v = qkv[:, hq + hk:]
        if cfg.qk_norm:
            q = self.rotary.apply(self.q_norm(qkv[:, :hq]), *rope)
            k = self.rotary.apply(self.k_norm(qkv[:, hq:hq + hk]), *rope)
        else:
            # q and k rotate together: one set of ops for both.
            qk = self.rotary.apply(qkv[:, :hq + hk], *rope)
            q, k = qk[:, :hq], qk[:, hq:]
        write_kv(kv[0], kv[1], k, v, meta.slot_mapping)
        o = paged_attention(q, kv[0], kv[1], meta, self.scale, cfg.sliding_window)
        return self.o_proj(o.reshape(-1, cfg.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, qc: QuantConfig, prefix: str, dtype: torch.dtype) -> None:
        super().__init__()
        self.gate_up_proj = QuantLinear(cfg.hidden_size, [cfg.intermediate_size] * 2, bias=False,
                                        quant_config=qc, prefix=f"{prefix}.gate_up_proj",
                                        params_dtype=dtype, shard_names=["gate_proj", "up_proj"])
        self.down_proj = QuantLinear(cfg.intermediate_size, [cfg.hidden_size], bias=False,
                                     quant_config=qc, prefix=f"{prefix}.down_proj",
                                     params_dtype=dtype)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(h)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, qc: QuantConfig, prefix: str, dtype: torch.dtype,
                 rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, qc, f"{prefix}.self_attn", dtype, rotary)
        self.mlp = LlamaMLP(cfg, qc, f"{prefix}.mlp", dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype,
                                       f"{prefix}.input_layernorm")
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype,
                                                f"{prefix}.post_attention_layernorm")

    def forward(self, rope: tuple[torch.Tensor, torch.Tensor], h: torch.Tensor, kv: KVCache,
                meta: AttentionMetadata) -> torch.Tensor:
        h = h + self.self_attn(rope, self.input_layernorm(h), kv, meta)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaForCausalLM(nn.Module):
    # checkpoint sub-module name -> (our fused module name, shard index)
    packed_modules = {
        "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, cfg: ModelConfig, qc: QuantConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.cfg = cfg
        self.dtype = dtype
        rotary = RotaryEmbedding(cfg.rope, cfg.head_dim, cfg.rot_dim, cfg.max_position_embeddings)
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size, quant_config=qc,
                                           prefix="model.embed_tokens", params_dtype=dtype)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(cfg, qc, f"model.layers.{i}", dtype, rotary)
            for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, "model.norm")
        self.lm_head = QuantLinear(cfg.hidden_size, [cfg.vocab_size], bias=False, quant_config=qc,
                                   prefix="lm_head", params_dtype=dtype)
        self.rotary = rotary

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache],
                meta: AttentionMetadata) -> torch.Tensor:
        h = self.embed_tokens(input_ids)
        rope = self.rotary.tables(positions, h.dtype)
        for layer, kv in zip(self.layers, kv_caches):
            h = layer(rope, h, kv, meta)
        return self.norm(h)

    def compute_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(h).float()

    # -- weight loading -------------------------------------------------------------------
    def checkpoint_module_names(self) -> list[str]:
        """HF names of every module the checkpoint holds tensors for (unfused)."""
        names = ["model.embed_tokens", "model.norm", "lm_head"]
        for i in range(self.cfg.num_layers):
            p = f"model.layers.{i}"
            names += [f"{p}.self_attn.{m}" for m in ("q_proj", "k_proj", "v_proj", "o_proj")]
            names += [f"{p}.mlp.{m}" for m in ("gate_proj", "up_proj", "down_proj")]
            names += [f"{p}.input_layernorm", f"{p}.post_attention_layernorm"]
            if self.cfg.qk_norm:
                names += [f"{p}.self_attn.q_norm", f"{p}.self_attn.k_norm"]
        return names

    def resolve(self, hf_name: str) -> tuple[nn.Module, str, int] | None:
        """Map an HF tensor name to (module, tensor name within it, shard) or None if unused."""
        if hf_name.startswith("model.rotary_emb") or hf_name.endswith("rotary_emb.inv_freq"):
            return None
        if hf_name == "lm_head.weight":
            return self.lm_head, "weight", 0
        parts = hf_name.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            mod_path, tensor_name = parts[:cut], ".".join(parts[cut:])
            if mod_path[0] == "model":
                mod_path = mod_path[1:]
            if mod_path and mod_path[-1] in self.packed_modules:
                fused, shard = self.packed_modules[mod_path[-1]]
                mod_path = mod_path[:-1] + [fused]
            else:
                shard = 0
            module = self._get(mod_path)
            if module is not None and hasattr(module, "load"):
                return module, tensor_name, shard
        return None

    def _get(self, path: list[str]) -> nn.Module | None:
        mod: Any = self
        for p in path:
            mod = getattr(mod, p, None) if not p.isdigit() else (
                mod[int(p)] if isinstance(mod, nn.ModuleList) and int(p) < len(mod) else None)
            if mod is None:
                return None
        return mod
