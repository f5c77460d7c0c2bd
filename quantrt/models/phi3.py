"""Phi-3 (and Phi-3.5 / Phi-4-mini, which share its code in transformers).

A Llama-shaped decoder whose checkpoints store q/k/v as one ``qkv_proj`` and gate/up as one
``gate_up_proj`` (GGUF: ``attn_qkv``, ``ffn_up``), loaded as single-shard layers; its
longrope ("su") scaling and sliding window are configuration.
"""
from __future__ import annotations

from quantrt.models.blocks import DecoderForCausalLM


class Phi3ForCausalLM(DecoderForCausalLM):
    fused_checkpoint = True
