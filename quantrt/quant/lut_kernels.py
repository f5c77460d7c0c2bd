"""Kernels for the bitsandbytes layouts.

* :class:`TritonLut4Kernel` (CUDA + Triton): NF4/FP4 through the fused code-book
  dequant-matmul of ``quant_kernels.triton_lut4`` (codes stay packed, looked up per tile
  in registers; no dense weight per call).  Needs every absmax block inside one weight row
  (``K % blocksize == 0``, true of every real model) and block sizes that are multiples
  of 32; shards with one code book, block size and dtype run as one matmul.
* :class:`Lut4Kernel`: NF4/FP4 code books are not integer-affine, so none of the integer
  kernels applies.  The codes stay packed (two per byte); each call expands them through a
  256-entry byte -> (high code, low code) table, scales each block by its absmax (double
  quant is undone once at load: fp32 absmax costs 0.5 bit per weight) and runs one GEMM.
  Works on any device; the per-call expansion is the cost of keeping 4-bit weights.
* :class:`CpuInt8Kernel`: symmetric per-output-channel int8 (LLM.int8 weights) through
  torch's CPU int8 weight-only GEMM; the integer CPU kernel (tinygemm) takes up to 4 bits.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from formats import bnb as bnb_format
from quantrt.quant.base import fast_kernel_refusal
from quantrt.quant.packed import PackedKernel, ReferenceKernel


@dataclass
class _Codes:
    packed: torch.Tensor    # uint8 [ceil(n / 2)], first value of each pair in the high nibble
    code: torch.Tensor      # float32 [16]: the code book
    pairs: torch.Tensor     # float32 [256, 2]: the two code values a byte stands for
    absmax: torch.Tensor    # float32 [ceil(n / blocksize)]
    blocksize: int
    shape: tuple[int, int]
    dtype: torch.dtype      # the weight's own dtype (quant_state); bitsandbytes rounds to it

    def weight(self, dtype: torch.dtype) -> torch.Tensor:
        rows, cols = self.shape
        n = rows * cols
        vals = self.pairs.index_select(0, self.packed.int()).reshape(-1)[:n]
        if n % self.blocksize == 0:
            w = vals.view(-1, self.blocksize).mul_(self.absmax[:, None])
        else:
            w = vals * self.absmax.repeat_interleave(self.blocksize)[:n]
        return w.view(rows, cols).to(self.dtype).to(dtype)


def _codes(raw: dict, meta: dict, rows: int, cols: int, device: torch.device) -> _Codes:
    code = raw.get("weight.quant_map")
    code = (code if code is not None else bnb_format.get_code(meta["quant_type"])).float()
    byte = torch.arange(256)
    pairs = torch.stack([code[byte >> 4], code[byte & 0xF]], dim=1)
    absmax = bnb_format.dequantize_absmax(raw["weight.absmax"], raw.get("weight.nested_absmax"),
                                          raw.get("weight.nested_quant_map"),
                                          meta.get("nested_offset"),
                                          int(meta.get("nested_blocksize", 256)))
    packed = raw["weight"].contiguous().reshape(-1)
    if packed.dtype != torch.uint8:  # bnb_4bit_quant_storage: the same bytes, another dtype
        packed = packed.view(torch.uint8)
    return _Codes(packed.to(device), code.to(device), pairs.to(device),
                  absmax.float().to(device), int(meta["blocksize"]), (rows, cols),
                  getattr(torch, meta["dtype"]))


class TritonLut4Kernel(PackedKernel):
    name = "triton-lut4 (fused 4-bit code-book dequant-matmul)"

    @classmethod
    def can_implement(cls, method, layer, device, policy):
        why = fast_kernel_refusal(policy, device, "cuda")
        if why:
            return False, why
        from quant_kernels import triton_lut4

        if not triton_lut4.HAS_TRITON:
            return False, "triton is not installed"
        if getattr(layer, "bnb_meta", None) is None:
            return False, "not a bitsandbytes 4-bit layer"
        if layer.params_dtype not in (torch.float16, torch.bfloat16):
            return False, f"needs float16/bfloat16 activations, not {layer.params_dtype}"
        for meta, rows in zip(layer.bnb_meta, layer.output_sizes):
            why = triton_lut4.layout_refusal(rows, layer.input_size, int(meta["blocksize"]))
            if why:
                return False, why
        return True, ""

    def __init__(self, method, layer, device) -> None:
        from quant_kernels.triton_lut4 import concat_lut4, lut4_matmul, mergeable, pack_lut4

        pieces: list[list] = []
        for raw, meta, rows in zip(layer.raw_shards, layer.bnb_meta, layer.output_sizes):
            c = _codes(raw, meta, rows, layer.input_size, device)
            w = pack_lut4(c.packed, c.absmax, c.code, c.blocksize, c.shape, c.dtype)
            if pieces and mergeable(pieces[-1][-1], w):
                pieces[-1].append(w)
            else:  # another code book, block size or dtype: its own matmul
                pieces.append([w])
        self.parts = [concat_lut4(p) for p in pieces]
        self.matmul = lut4_matmul  # bound once: no import on every call

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.parts) == 1:
            return self.matmul(x, self.parts[0])
        return torch.cat([self.matmul(x, w) for w in self.parts], dim=-1)

    def tensors(self):
        return [t for w in self.parts for t in (w.codes, w.absmax, w.lut)]


class Lut4Kernel(PackedKernel):
    name = "lut4 (4-bit code-book expand + F.linear)"

    @classmethod
    def can_implement(cls, method, layer, device, policy):
        why = fast_kernel_refusal(policy, device)
        if why:
            return False, why
        if getattr(layer, "bnb_meta", None) is None:
            return False, "not a bitsandbytes 4-bit layer"
        return True, ""

    def __init__(self, method, layer, device) -> None:
        self.parts = [_codes(raw, meta, rows, layer.input_size, device)
                      for raw, meta, rows in zip(layer.raw_shards, layer.bnb_meta,
                                                 layer.output_sizes)]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        ws = [p.weight(x.dtype) for p in self.parts]
        return F.linear(x, ws[0] if len(ws) == 1 else torch.cat(ws))

    def tensors(self):
        return [t for p in self.parts for t in (p.packed, p.pairs, p.absmax)]


class CpuInt8Kernel(PackedKernel):
    """``torch._weight_int8pack_mm``: x [M, K] float, int8 W [N, K], scales [N] in x's dtype."""

    name = "cpu-int8pack (per-channel int8 weight-only GEMM)"

    @classmethod
    def can_implement(cls, method, layer, device, policy):
        why = fast_kernel_refusal(policy, device, "cpu")
        if why:
            return False, why
        if not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
            return False, "this torch build has no _weight_int8pack_mm"
        ints = method.shard_ints(layer)
        if ints is None:
            return False, "the format is not integer-affine"
        for w in ints:
            if w.bits != 8 or w.group_size != w.k or w.scales.shape[0] != 1:
                return False, "needs one int8 scale per output channel"
            if w.zeros.dtype.is_floating_point or not bool((w.zeros == 128).all()):
                return False, "needs symmetric int8 (zero point 128)"
        return True, ""

    def __init__(self, method, layer, device) -> None:
        ints = method.shard_ints(layer)
        q = torch.cat([w.q for w in ints], dim=1).t()
        self.q = (q.to(torch.int16) - 128).to(torch.int8).contiguous()
        self.scales = torch.cat([w.scales.reshape(-1) for w in ints]).float()
        self._scales_as: dict[torch.dtype, torch.Tensor] = {torch.float32: self.scales}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        scales = self._scales_as.get(x.dtype)
        if scales is None:
            scales = self._scales_as.setdefault(x.dtype, self.scales.to(x.dtype))
        return torch._weight_int8pack_mm(x.contiguous(), self.q, scales)

    def tensors(self):
        return [self.q, self.scales]


LUT4_KERNELS: tuple[type[PackedKernel], ...] = (TritonLut4Kernel, Lut4Kernel,
                                                 ReferenceKernel)
