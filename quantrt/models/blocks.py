"""The decoder every architecture is built from, written against a paged KV cache.

An architecture is a subclass of :class:`DecoderForCausalLM` that sets a few class
attributes (norm placement, norm style, whether its checkpoints fuse q/k/v and gate/up);
everything else comes from the :class:`~quantrt.config.ModelConfig` (q/k norms, biases,
activation, per-layer sliding windows and rotaries, soft-caps, embedding scale, norm offset).
Parameter prefixes follow HF naming so checkpoint names map directly; q/k/v and gate/up are
one layer each, loaded shard by shard when the checkpoint has them apart.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from quant_kernels import cpu_layers, fused_ops
from quantrt.config import ModelConfig, RopeConfig
from quantrt.models.attention import AttentionMetadata, paged_attention, write_kv
from quantrt.models.layers import (
    QuantLinear,
    RMSNorm,
    RotaryEmbedding,
    VocabEmbedding,
    act_and_mul,
)
from quantrt.quant.base import QuantConfig

KVCache = tuple[torch.Tensor, torch.Tensor]
Rope = tuple[torch.Tensor, torch.Tensor]

# checkpoint sub-module name -> (our fused module name, shard index)
SPLIT_CHECKPOINT = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
}


class Attention(nn.Module):
    def __init__(self, model: DecoderForCausalLM, layer: int, prefix: str) -> None:
        super().__init__()
        cfg, qc, dtype = model.cfg, model.qc, model.dtype
        self.cfg = cfg
        split = model.fused_checkpoint is False
        self.qkv_proj = QuantLinear(
            cfg.hidden_size, [cfg.q_size, cfg.kv_size, cfg.kv_size] if split else
            [cfg.q_size + 2 * cfg.kv_size], bias=cfg.attention_bias, quant_config=qc,
            prefix=f"{prefix}.qkv_proj", params_dtype=dtype,
            shard_names=["q_proj", "k_proj", "v_proj"] if split else None)
        self.o_proj = QuantLinear(cfg.q_size, [cfg.hidden_size], bias=False, quant_config=qc,
                                  prefix=f"{prefix}.o_proj", params_dtype=dtype)
        if cfg.qk_norm:
            self.q_norm = model.make_norm(cfg.head_dim, f"{prefix}.q_norm")
            self.k_norm = model.make_norm(cfg.head_dim, f"{prefix}.k_norm")
        self.rotary = model.rotary_for(layer)
        self.window = cfg.window(layer)
        # heads this rank computes (all of them unless tensor parallel cut the layer)
        self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.num_kv_heads

    def forward(self, ropes: dict[int, Rope], h: torch.Tensor, kv: KVCache,
                meta: AttentionMetadata) -> torch.Tensor:
        cfg = self.cfg
        hq, hk = self.num_heads, self.num_kv_heads
        qkv = self.qkv_proj(h)
        rope = ropes[id(self.rotary)]
        if not cfg.qk_norm and kv[0].dtype == qkv.dtype and cpu_layers.fits(qkv):
            # CPU: rotary, cache write and attention in one call (the ops below cost ~40 us)
            o = cpu_layers.attention_block(qkv, rope, kv, meta, hq, hk, cfg.attn_scale,
                                           self.window, cfg.attn_softcap)
            return self.o_proj(o)
        if not cfg.qk_norm and kv[0].dtype == qkv.dtype and fused_ops.usable(qkv):
            # GPU: rotary of q and k, and the cache write of k and v, in one launch
            q = fused_ops.rope_write_kv(qkv, *rope, kv[0], kv[1], meta.slot_mapping, hq, hk,
                                        cfg.head_dim)
            o = paged_attention(q, kv[0], kv[1], meta, cfg.attn_scale, self.window,
                                cfg.attn_softcap)
            return self.o_proj(o.reshape(-1, hq * cfg.head_dim))
        qkv = qkv.view(-1, hq + 2 * hk, cfg.head_dim)
        v = qkv[:, hq + hk:]
        if cfg.qk_norm:
            q = self.rotary.apply(self.q_norm(qkv[:, :hq]), *rope)
            k = self.rotary.apply(self.k_norm(qkv[:, hq:hq + hk]), *rope)
        else:
            # q and k rotate together: one set of ops for both.
            qk = self.rotary.apply(qkv[:, :hq + hk], *rope)
            q, k = qk[:, :hq], qk[:, hq:]
        write_kv(kv[0], kv[1], k, v, meta.slot_mapping)
        o = paged_attention(q, kv[0], kv[1], meta, cfg.attn_scale, self.window, cfg.attn_softcap)
        return self.o_proj(o.reshape(-1, hq * cfg.head_dim))


class GatedMLP(nn.Module):
    def __init__(self, model: DecoderForCausalLM, prefix: str) -> None:
        super().__init__()
        cfg, qc, dtype = model.cfg, model.qc, model.dtype
        split = model.fused_checkpoint is False
        self.act = cfg.hidden_act
        self.gate_up_proj = QuantLinear(
            cfg.hidden_size, [cfg.intermediate_size] * 2 if split else [2 * cfg.intermediate_size],
            bias=False, quant_config=qc, prefix=f"{prefix}.gate_up_proj", params_dtype=dtype,
            shard_names=["gate_proj", "up_proj"] if split else None)
        self.down_proj = QuantLinear(cfg.intermediate_size, [cfg.hidden_size], bias=False,
                                     quant_config=qc, prefix=f"{prefix}.down_proj",
                                     params_dtype=dtype)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.down_proj(act_and_mul(self.gate_up_proj(h), self.act))


class DecoderLayer(nn.Module):
    """Pre-norm residual blocks.  ``sandwich`` (Gemma 2/3) also normalises each block's
    output before the residual add: post_attention_layernorm then is that post-norm, and
    pre/post_feedforward_layernorm surround the MLP; otherwise post_attention_layernorm is
    the MLP's pre-norm (Llama naming)."""

    def __init__(self, model: DecoderForCausalLM, layer: int) -> None:
        super().__init__()
        prefix = f"model.layers.{layer}"
        self.sandwich = model.sandwich_norms
        self.self_attn = Attention(model, layer, f"{prefix}.self_attn")
        self.mlp = GatedMLP(model, f"{prefix}.mlp")
        names = ["input_layernorm", "post_attention_layernorm"]
        if self.sandwich:
            names += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
        for name in names:
            setattr(self, name, model.make_norm(model.cfg.hidden_size, f"{prefix}.{name}"))

    def forward(self, ropes: dict[int, Rope], h: torch.Tensor, kv: KVCache,
                meta: AttentionMetadata) -> torch.Tensor:
        attn = self.self_attn(ropes, self.input_layernorm(h), kv, meta)
        if not self.sandwich:
            # (on the GPU the model takes forward_fused instead)
            h = h + attn
            return h + self.mlp(self.post_attention_layernorm(h))
        h = h + self.post_attention_layernorm(attn)
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))

    def forward_fused(self, ropes: dict[int, Rope], h: torch.Tensor, residual: torch.Tensor | None,
                      kv: KVCache, meta: AttentionMetadata
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """GPU pre-norm layers (``DecoderForCausalLM.fuses_residual``): the hidden state
        arrives as ``residual + h`` with the add still pending, so that add and this
        layer's input norm are one kernel, as are the attention's residual add and the
        MLP's norm.  Returns the MLP output and the residual it is to be added to."""
        norm = self.input_layernorm
        if residual is None:
            residual, x = h, norm(h)
        else:
            residual, x = fused_ops.add_rms_norm(residual, h, norm.weight, norm.eps)
        attn = self.self_attn(ropes, x, kv, meta)
        norm = self.post_attention_layernorm
        residual, x = fused_ops.add_rms_norm(residual, attn, norm.weight, norm.eps)
        return self.mlp(x), residual


class DecoderForCausalLM(nn.Module):
    # Gemma's post-block norms (see DecoderLayer)
    sandwich_norms: ClassVar[bool] = False
    # norms scale in fp32 before casting back to the activation dtype (Gemma)
    fp32_norms: ClassVar[bool] = False
    # the checkpoint stores qkv_proj and gate_up_proj fused (Phi-3) instead of q/k/v, gate/up
    fused_checkpoint: ClassVar[bool] = False
    # (checkpoint prefix, ours): multimodal checkpoints keep the text model under other names
    checkpoint_renames: ClassVar[tuple[tuple[str, str], ...]] = ()
    # tensors of other modalities, which a text model does not load
    ignored_prefixes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: ModelConfig, qc: QuantConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.cfg = cfg
        self.qc = qc
        self.dtype = dtype
        self.packed_modules = {} if self.fused_checkpoint else dict(SPLIT_CHECKPOINT)
        # one rotary per distinct rope (Gemma 3: global and local), shared by its layers
        ropes: list[RopeConfig] = []
        for i in range(cfg.num_layers):
            if cfg.rope_for(i) not in ropes:
                ropes.append(cfg.rope_for(i))
        self.rotaries = nn.ModuleList(
            RotaryEmbedding(r, cfg.head_dim, cfg.rot_dim, cfg.max_position_embeddings)
            for r in ropes)
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size, quant_config=qc,
                                           prefix="model.embed_tokens", params_dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(self, i) for i in range(cfg.num_layers))
        self.norm = self.make_norm(cfg.hidden_size, "model.norm")
        self.lm_head = QuantLinear(cfg.hidden_size, [cfg.vocab_size], bias=False, quant_config=qc,
                                   prefix="lm_head", params_dtype=dtype)
        self.tp_vocab_widths: list[int] | None = None   # per rank, when tensor parallel

    # -- building blocks ------------------------------------------------------------------
    def make_norm(self, size: int, prefix: str) -> RMSNorm:
        return RMSNorm(size, self.cfg.rms_norm_eps, self.dtype, prefix,
                       offset=self.cfg.norm_offset, fp32=self.fp32_norms)

    def rotary_for(self, layer: int) -> RotaryEmbedding:
        rope = self.cfg.rope_for(layer)
        return next(r for r in self.rotaries if r.rope == rope)

    @property
    def rotary(self) -> RotaryEmbedding:
        """The global layers' rotary (the one rope_freqs.weight rescales)."""
        return self.rotary_for(next((i for i in range(self.cfg.num_layers)
                                     if not self.cfg.is_sliding(i)), 0))

    # -- forward --------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache],
                meta: AttentionMetadata) -> torch.Tensor:
        h = self.embed_tokens(input_ids)
        if self.cfg.embed_scale != 1.0:
            # in the activation dtype, as transformers does (sqrt(3072) is 55.5 in bf16)
            h = h * torch.tensor(self.cfg.embed_scale, dtype=h.dtype)
        ropes = {id(r): r.tables(positions, h.dtype, meta) for r in self.rotaries}
        if self.fuses_residual(h):
            residual = None
            for layer, kv in zip(self.layers, kv_caches):
                h, residual = layer.forward_fused(ropes, h, residual, kv, meta)
            return fused_ops.add_rms_norm(residual, h, self.norm.weight, self.norm.eps)[1]
        for layer, kv in zip(self.layers, kv_caches):
            h = layer(ropes, h, kv, meta)
        return self.norm(h)

    def fuses_residual(self, h: torch.Tensor) -> bool:
        """Whether the layers pass the residual add on to the next norm's kernel (GPU,
        pre-norm layers whose norms cast before scaling)."""
        return (not self.sandwich_norms and not self.fp32_norms and h.dim() == 2
                and self.cfg.num_layers > 0 and fused_ops.usable(h))

    def compute_logits(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(h)
        if self.tp_vocab_widths is not None:  # vocab-parallel head: every rank gets all
            logits = self.lm_head.tp_gather.all_gather_rows(logits, self.tp_vocab_widths)
        logits = logits.float()
        cap = self.cfg.final_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    # -- weight loading -------------------------------------------------------------------
    def checkpoint_module_names(self) -> list[str]:
        """HF names of every module the checkpoint holds tensors for (unfused)."""
        names = []
        for module in self.modules():
            if hasattr(module, "load"):
                names += getattr(module, "shard_prefixes", [module.prefix])
        return names

    def canonical_name(self, name: str) -> str | None:
        """A checkpoint tensor's name as a text-only HF checkpoint spells it, or None for a
        tensor of another modality."""
        if name.startswith(self.ignored_prefixes):
            return None
        for old, new in self.checkpoint_renames:
            if name.startswith(old):
                return new + name[len(old):]
        return name

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
