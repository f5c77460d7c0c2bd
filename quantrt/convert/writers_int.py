"""GPTQ (v1), AWQ (GEMM) and compressed-tensors pack-quantized writers.

Layouts and config keys are the ones GPTQModel / AutoGPTQ, AutoAWQ and llm-compressor
write (tests/fixtures/MANIFEST.json lists them); the packing is formats/'s, whose
readers are checked bit-exactly against those libraries' own files.
"""
from __future__ import annotations

from typing import Any

import torch

from formats import awq as awq_format
from formats import compressed_tensors as ct_format
from formats import gptq as gptq_format
from formats.packing import to_signed
from quantrt.convert.intq import IntWeight, rtn
from quantrt.convert.writer_base import QUANTIZER, SafetensorsWriter, module_of
from quantrt.errors import UnsupportedError


class _IntWriter(SafetensorsWriter):
    scale_dtype = torch.float16

    g_idx_seen = False  # a transcoded act-order source: the config must say so

    def int_weight(self, name: str, w: torch.Tensor, iw: IntWeight | None) -> IntWeight:
        if iw is None:
            iw = rtn(w, self.req.bits, self.req.group_size, self.req.sym, self.scale_dtype)
        self.g_idx_seen |= iw.g_idx is not None
        return iw


class GPTQWriter(_IntWriter):
    """GPTQ v1 (``checkpoint_format: gptq``): fp16 scales, zero - 1 in qzeros, g_idx."""

    def add_linear(self, name: str, w: torch.Tensor, iw: IntWeight | None = None) -> None:
        iw = self.int_weight(name, w, iw)
        g_idx = iw.g_idx if iw.g_idx is not None else gptq_format.default_g_idx(
            iw.q.shape[0], iw.group_size)
        qw, qz, sc, gi = gptq_format.pack(iw.q, iw.zeros, iw.scales, g_idx, iw.bits, 1,
                                          group_size=iw.group_size)
        m = module_of(name)
        for suffix, t in (("qweight", qw), ("qzeros", qz), ("scales", sc), ("g_idx", gi)):
            self.shards.add(f"{m}.{suffix}", t)

    def quantization_config(self) -> dict[str, Any]:
        r = self.req
        return {"bits": r.bits, "group_size": r.group_size,
                "desc_act": r.act_order or self.g_idx_seen,
                "sym": r.sym, "lm_head": False, "quant_method": "gptq",
                "checkpoint_format": "gptq", "format": "gptq", "method": "gptq",
                "pack_dtype": "int32",
                "true_sequential": r.true_sequential, "damp_percent": r.damp,
                "static_groups": False,
                "meta": {"quantizer": [QUANTIZER], "algorithm": r.algo}}

    def side_configs(self) -> dict[str, dict[str, Any]]:
        return {"quantize_config.json": self.quantization_config()}


class AWQWriter(_IntWriter):
    """AutoAWQ GEMM: 4-bit, zero points, qweight/qzeros packed along N in AWQ order."""

    def add_linear(self, name: str, w: torch.Tensor, iw: IntWeight | None = None) -> None:
        if w.shape[0] % 8:
            raise UnsupportedError(f"{name}: AWQ GEMM packs 8 output rows per word, and "
                                   f"N={w.shape[0]} is not a multiple of 8")
        iw = self.int_weight(name, w, iw)
        qw, qz, sc = awq_format.pack(iw.q, iw.zeros, iw.scales, 4, iw.group_size, "gemm")
        m = module_of(name)
        for suffix, t in (("qweight", qw), ("qzeros", qz), ("scales", sc)):
            self.shards.add(f"{m}.{suffix}", t)

    def quantization_config(self) -> dict[str, Any]:
        return {"quant_method": "awq", "bits": 4, "group_size": self.req.group_size,
                "version": "gemm", "zero_point": True, "modules_to_not_convert": None}


class CTIntWriter(_IntWriter):
    """compressed-tensors pack-quantized (llm-compressor's W4A16 / W8A16 presets):
    signed codes offset by 2**(b-1), scales in the model dtype, zero points packed
    along N for asymmetric weights, ``weight_g_idx`` for act-order."""

    @property
    def scale_dtype(self) -> torch.dtype:  # type: ignore[override]
        return self.dtype

    def add_linear(self, name: str, w: torch.Tensor, iw: IntWeight | None = None) -> None:
        iw = self.int_weight(name, w, iw)
        k = iw.q.shape[0]
        if iw.group_size > 0 and k > iw.group_size and k % iw.group_size:
            raise UnsupportedError(f"{name}: compressed-tensors needs K={k} to be a multiple "
                                   f"of the group size {iw.group_size}",
                                   hint="choose a group size that divides every K")
        b = iw.bits
        q = to_signed(iw.q.t(), b)
        zp = None if self.req.sym else to_signed(iw.zeros.t(), b)
        out = ct_format.pack_packed(q, iw.scales.t().to(self.dtype).contiguous(), b, zp,
                                    iw.g_idx)
        m = module_of(name)
        for suffix, t in out.items():
            self.shards.add(f"{m}.{suffix}", t)

    def quantization_config(self) -> dict[str, Any]:
        r = self.req
        channel = r.group_size <= 0
        weights = {"actorder": "group" if r.act_order or self.g_idx_seen else None,
                   "block_structure": None,
                   "dynamic": False, "group_size": None if channel else r.group_size,
                   "num_bits": r.bits, "observer": "minmax", "observer_kwargs": {},
                   "scale_dtype": None, "strategy": "channel" if channel else "group",
                   "symmetric": r.sym, "type": "int",
                   "zp_dtype": None if r.sym else "torch.int8"}
        return ct_config("pack-quantized", weights, None)


def ct_config(fmt: str, weights: dict[str, Any], acts: dict[str, Any] | None) -> dict[str, Any]:
    """A compressed-tensors 0.19 ``quantization_config`` with one group on every Linear
    but lm_head."""
    return {"config_groups": {"group_0": {"format": fmt, "input_activations": acts,
                                          "output_activations": None, "targets": ["Linear"],
                                          "weights": weights}},
            "format": fmt, "global_compression_ratio": None, "ignore": ["lm_head"],
            "kv_cache_scheme": None, "quant_method": "compressed-tensors",
            "quantization_status": "compressed", "sparsity_config": {},
            "transform_config": {}, "version": "0.19.0"}
