"""FP8 (transformers / vLLM ``fp8``, ``fbgemm_fp8``), compressed-tensors float-quantized,
bitsandbytes (nf4 / int8) and plain float (dequantized) writers."""
from __future__ import annotations

from typing import Any

import torch

from formats import bnb as bnb_format
from formats import fp8 as fp8_format
from quantrt.convert.intq import IntWeight
from quantrt.convert.writer_base import SafetensorsWriter, module_of
from quantrt.convert.writers_int import ct_config


class FloatWriter(SafetensorsWriter):
    """Unquantized safetensors in the requested dtype (any source dequantized)."""

    def add_linear(self, name: str, w: torch.Tensor, iw: IntWeight | None = None) -> None:
        self.add_tensor(name, w)

    def quantization_config(self) -> None:
        return None


class Fp8Writer(SafetensorsWriter):
    """``quant_method: fp8`` as transformers' FineGrainedFP8 saves it (``weight`` e4m3 +
    fp32 ``weight_scale_inv``: [1, 1] per tensor, [ceil(N/bn), ceil(K/bk)] per block), or
    per channel as ``fbgemm_fp8`` (fp32 ``weight_scale`` [N, 1]), the per-channel FP8
    format transformers and vLLM read."""

    def add_linear(self, name: str, w: torch.Tensor, iw: IntWeight | None = None) -> None:
        scheme = self.req.fp8_scheme
        q, scale = fp8_format.quantize(w, scheme, self.req.fp8_block)
        m = module_of(name)
        self.shards.add(f"{m}.weight", q)
        if scheme == "channel":
            self.shards.add(f"{m}.weight_scale", scale.float())
        else:
            self.shards.add(f"{m}.weight_scale_inv", scale.float().reshape(
                (1, 1) if scheme == "tensor" else scale.shape))

    def quantization_config(self) -> dict[str, Any]:
        if self.req.fp8_scheme == "channel":
            return {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0,
                    "modules_to_not_convert": ["lm_head"]}
        block = list(self.req.fp8_block) if self.req.fp8_scheme == "block" else None
        return {"quant_method": "fp8", "activation_scheme": "dynamic",
                "weight_block_size": block, "modules_to_not_convert": None,
                "scale_fmt": "float", "dequantize": False, "expert_dtype": "fp8",
                "modules_to_convert": None}


class CTFp8Writer(SafetensorsWriter):
    """compressed-tensors float-quantized: llm-compressor's FP8_DYNAMIC (channel scales,
    dynamic per-token activations) or FP8_BLOCK (128x128 block scales, dynamic per-group
    activations); scales in the model dtype, as llm-compressor stores them."""

    def add_linear(self, name: str, w: torch.Tensor, iw: IntWeight | None = None) -> None:
        scheme = self.req.fp8_scheme
        # Round the scale to its stored dtype first so the codes match what is written.
        _, scale = fp8_format.quantize(w, scheme, self.req.fp8_block)
        scale = scale.to(self.dtype).float()
        full = fp8_format.expand_block_scale(scale, tuple(w.shape), self.req.fp8_block) \
            if scheme == "block" else scale.reshape(-1, 1).expand(w.shape[0], 1) \
            if scheme == "channel" else scale.reshape(1, 1)
        q = (w.float() / full).clamp(-fp8_format.E4M3_MAX, fp8_format.E4M3_MAX)
        m = module_of(name)
        self.shards.add(f"{m}.weight", q.to(torch.float8_e4m3fn))
        self.shards.add(f"{m}.weight_scale", scale.to(self.dtype).reshape(
            (-1, 1) if scheme == "channel" else scale.shape))

    def quantization_config(self) -> dict[str, Any]:
        block = self.req.fp8_scheme == "block"
        weights = {"actorder": None, "block_structure": list(self.req.fp8_block) if block
                   else None, "dynamic": False, "group_size": None, "num_bits": 8,
                   "observer": "minmax", "observer_kwargs": {}, "scale_dtype": None,
                   "strategy": self.req.fp8_scheme, "symmetric": True, "type": "float",
                   "zp_dtype": None}
        acts = {"actorder": None, "block_structure": None, "dynamic": True,
                "group_size": self.req.fp8_block[1] if block else None, "num_bits": 8,
                "observer": None, "observer_kwargs": {}, "scale_dtype": None,
                "strategy": "group" if block else "token", "symmetric": True,
                "type": "float", "zp_dtype": None}
        return ct_config("float-quantized", weights, acts)


class BnbWriter(SafetensorsWriter):
    """bitsandbytes as transformers' ``save_pretrained`` serializes it: NF4 (blocksize 64,
    optional double quant) or LLM.int8 (row-wise absmax, ``SCB``, ``weight_format``)."""

    def add_linear(self, name: str, w: torch.Tensor, iw: IntWeight | None = None) -> None:
        m = module_of(name)
        if self.req.method == "bnb-int8":
            q, scb = bnb_format.quantize_int8(w.to(self.dtype).float())
            self.shards.add(f"{m}.weight", q)
            self.shards.add(f"{m}.SCB", scb)
            self.shards.add(f"{m}.weight_format", torch.tensor(0, dtype=torch.uint8))
            return
        # quant_state records the dtype of the tensor it was given: the model dtype.
        out = bnb_format.quantize_4bit(w.to(self.dtype), "nf4", 64, self.req.double_quant,
                                       prefix=f"{m}.weight")
        for k, t in out.items():
            self.shards.add(k, t)

    def quantization_config(self) -> dict[str, Any]:
        four = self.req.method == "bnb-nf4"
        return {"_load_in_4bit": four, "_load_in_8bit": not four,
                "bnb_4bit_compute_dtype": self.req.dtype, "bnb_4bit_quant_storage": "uint8",
                "bnb_4bit_quant_type": "nf4" if four else "fp4",
                "bnb_4bit_use_double_quant": self.req.double_quant,
                "llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False,
                "llm_int8_skip_modules": None, "llm_int8_threshold": 6.0,
                "load_in_4bit": four, "load_in_8bit": not four,
                "quant_method": "bitsandbytes"}
