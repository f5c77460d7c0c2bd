"""Gemma 2 and Gemma 3 (text).

Both: GeGLU MLP (gelu, tanh approximation), RMSNorm multiplying by (1 + w) in fp32 (the
+1 is added on load from HF checkpoints; llama.cpp's GGUFs store it added), a norm after
attention and after the MLP as well as before each, embeddings scaled by sqrt(hidden),
query scale from query_pre_attn_scalar, tied embeddings, sliding-window layers alternating
with global ones.  Gemma 2 soft-caps attention scores and final logits; Gemma 3 has q/k
norms and its own rotary base for sliding layers.  All of that is configuration
(:mod:`quantrt.models.registry`, :mod:`quantrt.config`); here only the block shape.
"""
from __future__ import annotations

from quantrt.models.blocks import DecoderForCausalLM


class Gemma2ForCausalLM(DecoderForCausalLM):
    sandwich_norms = True
    fp32_norms = True


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    # Gemma3ForConditionalGeneration checkpoints: transformers 4.x names (which 5.x also
    # writes) and 5.x's in-memory ones; the vision tower and projector are not loaded.
    checkpoint_renames = (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
                          ("model.language_model.", "model."))
    ignored_prefixes = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                        "model.multi_modal_projector.")
