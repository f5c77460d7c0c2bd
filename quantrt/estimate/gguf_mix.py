"""GGUF: per-tensor GGML types, read from a file's header or chosen by llama.cpp's rules
for a "what if" file type such as Q4_K_M.  GGUF weights stay packed in memory, but the
linear layers' blocks are repacked for the CUDA kernels (``layouts.GGML_ON_GPU``: Q5 and Q8
types widened to 8-bit words, fp16 scale and bias per 32 values), so GPU bytes can exceed
the file's.

The mixing rule is llama.cpp's ``llama_tensor_get_type`` (src/llama-quant.cpp) restricted to
the file types offered here and to Llama-family tensors; every deviation from the file
type's default type is one of these:

* ``output.weight`` (and ``token_embd.weight`` when it is tied to the output) -> Q6_K,
  except Q8_0 files keep Q8_0, and Q8_0 when hidden_size is not a multiple of the default
  type's block;
* ``attn_v``: Q2_K -> Q4_K if n_head/n_head_kv >= 4 else Q3_K; Q3_K_M -> Q5_K for the
  first 2 layers else Q4_K; Q4_K_M and Q5_K_M -> Q6_K in the layers where
  ``use_more_bits(i, n)`` (i < n/8, i >= 7n/8, or (i - n/8) % 3 == 2); then a "70B" model
  (80 layers with grouped-query attention: Llama 2/3 70B, Qwen2 72B) bumps Q3_K/Q4_K to
  Q5_K; then 8-expert models (Mixtral) use Q8_0;
* ``attn_k``: 8-expert models -> Q8_0;
* ``ffn_down``: Q2_K -> Q3_K; Q3_K_M -> Q5_K for i < n/16 else Q4_K; Q4_K_M and Q5_K_M ->
  Q6_K where ``use_more_bits``;
* ``attn_output``: 8-expert models -> Q5_K for Q2_K, Q3_K_M, Q4_K_M; others Q2_K -> Q3_K,
  Q3_K_M -> Q4_K;
* 1-D tensors (norms, biases) and the MoE router ``ffn_gate_inp`` are not quantized (F32,
  as llama.cpp's converter writes them);
* a row length (K) that is not a multiple of the chosen type's block falls back: Q4_K ->
  Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, Q2_K/Q3_K -> Q4_0 (then F16 if still not divisible).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Mapping

from quantrt.errors import ConfigError, FormatError
from quantrt.estimate.arch import Weight
from quantrt.estimate.layouts import GGML_ON_GPU, GPU_PREFIX, Context, Layout, TensorSpec

# file type -> default tensor type (llama_ftype_get_default_type)
FILE_TYPES = {"Q8_0": "Q8_0", "Q6_K": "Q6_K", "Q5_K_M": "Q5_K", "Q4_K_M": "Q4_K",
              "Q4_0": "Q4_0", "Q3_K_M": "Q3_K", "Q2_K": "Q2_K"}
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0", "Q3_K": "Q4_0", "Q2_K": "Q4_0"}
_BASE = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output", "gate": "ffn_gate",
         "up": "ffn_up", "down": "ffn_down", "router": "ffn_gate_inp", "q_norm": "attn_q_norm",
         "k_norm": "attn_k_norm"}


def gguf_names(w: Weight, merged_experts: bool = True) -> str:
    """llama.cpp's tensor name (without .weight/.bias) for ``w``."""
    if w.role == "embed":
        return "token_embd"
    if w.role == "lm_head":
        return "output"
    if w.role == "norm":
        if w.layer is None:
            return "output_norm"
        first = w.name.endswith("input_layernorm")
        return f"blk.{w.layer}." + ("attn_norm" if first else "ffn_norm")
    base = f"blk.{w.layer}.{_BASE[w.role]}"
    if w.expert is not None:
        return f"{base}_exps" if merged_experts else f"{base}.{w.expert}"
    return base


def _block(ggml_type: str) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    return GGML_QUANT_SIZES[GGMLQuantizationType[ggml_type]][0]


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def mixed_type(ftype: str, w: Weight, ctx: Context) -> str:
    """The GGML type llama.cpp gives ``w`` in a ``ftype`` file (see the module doc)."""
    arch = ctx.arch
    default = FILE_TYPES[ftype]
    if (not w.is_linear and w.role != "embed") or w.role == "router":
        return "F32"
    n, i = arch.layers, w.layer if w.layer is not None else 0
    eight_experts = arch.experts == 8
    t = default
    if w.role == "lm_head" or (w.role == "embed" and arch.tied):
        if arch.hidden % _block(default):
            t = "Q8_0"
        elif default != "Q8_0":
            t = "Q6_K"
    elif w.role == "v":
        if ftype == "Q2_K":
            t = "Q4_K" if arch.heads // arch.kv_heads >= 4 else "Q3_K"
        elif ftype == "Q3_K_M":
            t = "Q5_K" if i < 2 else "Q4_K"
        elif ftype in ("Q4_K_M", "Q5_K_M") and _use_more_bits(i, n):
            t = "Q6_K"
        # llama.cpp's LLM_TYPE_70B: 80 layers and grouped-query attention.
        if n == 80 and arch.kv_heads < arch.heads and t in ("Q3_K", "Q4_K"):
            t = "Q5_K"
        if eight_experts:
            t = "Q8_0"
    elif w.role == "k":
        if eight_experts:
            t = "Q8_0"
    elif w.role == "down":
        if ftype == "Q2_K":
            t = "Q3_K"
        elif ftype == "Q3_K_M":
            t = "Q5_K" if i < n // 16 else "Q4_K"
        elif ftype in ("Q4_K_M", "Q5_K_M") and _use_more_bits(i, n):
            t = "Q6_K"
    elif w.role == "o":
        if eight_experts:
            t = "Q5_K" if ftype in ("Q2_K", "Q3_K_M", "Q4_K_M") else t
        elif ftype == "Q2_K":
            t = "Q3_K"
        elif ftype == "Q3_K_M":
            t = "Q4_K"
    k = w.shape[-1]
    if k % _block(t):
        t = FALLBACK.get(t, t)
        if k % _block(t):
            t = "F16"
    return t


def _weight(w: Weight, shape: tuple[int, ...], ggml_type: str) -> TensorSpec:
    """A GGML weight: linear layers are repacked for the CUDA kernels (GGML_ON_GPU), the
    embedding stays as stored (its rows are dequantized per lookup)."""
    loaded = f"{GPU_PREFIX}{ggml_type}" if w.is_linear and ggml_type in GGML_ON_GPU else None
    return TensorSpec("weight", shape, ggml_type, loaded)


@dataclass(frozen=True)
class GGUFMix(Layout):
    """A GGUF file llama.cpp's ``llama-quantize`` would write with file type ``ftype``."""

    ftype: str = "Q4_K_M"
    family: ClassVar[str] = "gguf"
    min_capability: ClassVar[int] = 60
    dequantizes_weights: ClassVar[bool] = True   # large batches: dequantize + GEMM

    def __post_init__(self) -> None:
        if isinstance(self.ftype, str):
            object.__setattr__(self, "ftype", self.ftype.upper())
        if self.ftype not in FILE_TYPES:
            raise ConfigError(f"GGUF file type {self.ftype!r} is not one of "
                              f"{', '.join(FILE_TYPES)}")

    @property
    def label(self) -> str:
        return f"GGUF {self.ftype} (llama.cpp mix)"

    def quantizes(self, w: Weight) -> bool:
        return True

    def tensors(self, w, shape, full_k, ctx):
        out = [_weight(w, shape, mixed_type(self.ftype, w, ctx))]
        if w.bias:
            out.append(TensorSpec("bias", (shape[0],), "F32"))
        return out


@dataclass(frozen=True)
class GGUFFile(Layout):
    """The tensors of an existing GGUF file, from its header (gguf name -> GGML type)."""

    file_type: str
    types: Mapping[str, str] = field(default_factory=dict)
    family: ClassVar[str] = "gguf"
    min_capability: ClassVar[int] = 60
    dequantizes_weights: ClassVar[bool] = True

    @property
    def label(self) -> str:
        return f"GGUF {self.file_type}"

    def quantizes(self, w: Weight) -> bool:
        return True

    def type_of(self, w: Weight, suffix: str = "weight") -> str:
        for merged in (True, False):
            name = f"{gguf_names(w, merged)}.{suffix}"
            if name in self.types:
                return self.types[name]
        raise FormatError(f"the GGUF file has no tensor {gguf_names(w, False)}.{suffix}",
                          hint="its tensors do not match its own metadata")

    def tensors(self, w, shape, full_k, ctx):
        out = [_weight(w, shape, self.type_of(w))]
        if w.bias:
            out.append(TensorSpec("bias", (shape[0],), self.type_of(w, "bias")))
        return out
