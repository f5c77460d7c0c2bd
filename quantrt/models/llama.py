"""The Llama family (Llama 2/3, SmolLM, Mistral, Qwen2, Qwen3): the plain decoder.

Members differ only in config settings (qkv bias, q/k norms, tied embeddings, rope
scaling, sliding window), so this is :class:`~quantrt.models.blocks.DecoderForCausalLM`
as it is: pre-norm blocks, SwiGLU MLP, q/k/v and gate/up stored apart in checkpoints.
"""
from __future__ import annotations

from quantrt.models.blocks import DecoderForCausalLM


class LlamaForCausalLM(DecoderForCausalLM):
    pass
