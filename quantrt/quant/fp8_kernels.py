"""Kernels for FP8 (e4m3) weights.

* :class:`Fp8ScaledMMKernel` (W8A8): CUDA GPUs with FP8 tensor cores (compute capability
  8.9+: L4, H100).  Activations are quantized per token (dynamic; fbgemm bounds the scale by
  ``activation_scale_ub``) or with the checkpoint's static ``input_scale``, then
  ``torch._scaled_mm`` multiplies with one scale per weight row (per-tensor shard scales
  and per-channel scales alike).  Block-scaled weights take the next kernel.
* :class:`Fp8TritonKernel` (W8A16, CUDA sm_80+): fp16/bf16 activations times the FP8
  weights in one fused Triton kernel (``quant_kernels.triton_fp8``: the weights are
  converted per tile in registers, scales applied to the fp32 tile results); per-tensor,
  per-channel and block scales.  It takes what the W8A8 kernel refuses: block scales,
  GPUs without FP8 tensor cores, shapes that are not multiples of 16.
* :class:`Fp8DequantKernel` (W8A16, any device): the weights stay FP8; each call expands
  them to the activation dtype (fp32 product, one cast: small scales would lose bits in
  fp16) and runs one GEMM.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from formats import fp8 as fp8_format
from quant_kernels.fp8_act import quant_per_token
from quantrt.quant.base import fast_kernel_refusal
from quantrt.quant.packed import PackedKernel, ReferenceKernel

E4M3_MAX = fp8_format.E4M3_MAX
# cuBLASLt's fp8 "fast accumulation" (no periodic promotion of the tensor cores' partial
# sums to fp32).  Measured on the H100 (scripts/sweep_wq.py): GEMM error 2.1e-3..3.3e-3
# instead of 1.7e-3 against fp32 math on the same operands, next to 2.6e-2 from the
# per-token activation quantization itself; 8192x8192 M=1024 107.6 us instead of 117.8.
FAST_ACCUM = True


def _row_scales(method, layer) -> torch.Tensor:
    """float32 [N]: every row's weight scale (per-tensor shard scales repeated per row)."""
    out = []
    for raw, rows in zip(layer.raw_shards, layer.output_sizes):
        s = method.weight_scale(raw).reshape(-1)
        out.append(s.expand(rows) if s.numel() == 1 else s)
    return torch.cat(out)


def w8a8_matmul(x: torch.Tensor, w_t: torch.Tensor, w_scale: torch.Tensor,
                in_scale: torch.Tensor | None = None, ub: float | None = None,
                fast_accum: bool | None = None) -> torch.Tensor:
    """``x [M, K] @ W.T`` with FP8 weights ``w_t`` ([K, N] column-major e4m3) and row scales
    ``w_scale`` [1, N]: x is quantized per token (one Triton pass on CUDA) or with the
    static per-tensor ``in_scale``, then one ``torch._scaled_mm``."""
    if in_scale is not None:
        s = in_scale.expand(x.shape[0], 1).contiguous()
        xq = (x.float() / s).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    else:
        xq, s = quant_per_token(x, ub)
    # Row-wise scaled FP8 GEMMs produce bfloat16 (what cuBLASLt supports for them).
    y = torch._scaled_mm(xq, w_t, scale_a=s, scale_b=w_scale, out_dtype=torch.bfloat16,
                         use_fast_accum=FAST_ACCUM if fast_accum is None else fast_accum)
    return y.to(x.dtype)


class Fp8ScaledMMKernel(PackedKernel):
    name = "fp8 W8A8 (torch._scaled_mm, per-token activation scales)"

    @classmethod
    def can_implement(cls, method, layer, device, policy):
        why = fast_kernel_refusal(policy, device, "cuda")
        if why:
            return False, why
        if not hasattr(torch, "_scaled_mm"):
            return False, "this torch build has no _scaled_mm"
        if torch.cuda.get_device_capability(device) < (8, 9):
            return False, "needs FP8 tensor cores (compute capability 8.9 or newer)"
        if layer.params_dtype not in (torch.float16, torch.bfloat16):
            return False, f"needs float16/bfloat16 activations, not {layer.params_dtype}"
        if method.p.scheme == "block":
            return False, "block-wise weight scales (this path takes per-tensor/per-channel)"
        if layer.input_size % 16 or layer.output_size % 16:
            return False, f"K={layer.input_size} and N={layer.output_size} must be multiples of 16"
        return True, ""

    def __init__(self, method, layer, device) -> None:
        w = torch.cat([raw["weight"] for raw in layer.raw_shards]).to(device)
        self.w_t = w.t()  # column-major [K, N], the layout _scaled_mm wants on the right
        self.w_scale = _row_scales(method, layer).reshape(1, -1).to(device)
        self.in_scale = None
        if method.p.activation == "static":
            # Every shard sees the same input: the largest scale clips none of them.
            self.in_scale = torch.stack([raw["input_scale"].float().reshape(())
                                         for raw in layer.raw_shards]).max().to(device)
        self.ub = method.p.activation_ub

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return w8a8_matmul(x, self.w_t, self.w_scale, self.in_scale, self.ub)

    def tensors(self):
        return [t for t in (self.w_t, self.w_scale, self.in_scale) if t is not None]


class Fp8TritonKernel(PackedKernel):
    name = "fp8 weight-only (fused Triton dequant-matmul)"

    @staticmethod
    def scale_block(method) -> tuple[int, int] | None:
        """(bn, bk) of the method's block scales, or None for one scale per row."""
        return method.p.block if method.p.scheme == "block" else None

    @staticmethod
    def shard_scale(method, raw: dict) -> torch.Tensor:
        """One shard's stored scale as float32 ([1], [N, 1] or the block grid)."""
        return method.weight_scale(raw)

    @classmethod
    def can_implement(cls, method, layer, device, policy):
        why = fast_kernel_refusal(policy, device, "cuda")
        if why:
            return False, why
        from quant_kernels.triton_fp8 import HAS_TRITON

        if not HAS_TRITON:
            return False, "Triton is not installed"
        if torch.cuda.get_device_capability(device) < (8, 0):
            return False, "needs compute capability 8.0 or newer (fp16/bf16 tensor cores)"
        if layer.params_dtype not in (torch.float16, torch.bfloat16):
            return False, f"needs float16/bfloat16 activations, not {layer.params_dtype}"
        block = cls.scale_block(method)
        if block is not None and block[1] % 16:
            return False, (f"block {block[0]}x{block[1]}: the kernel's K tiles (16 wide and "
                           "up) must divide the block width")
        return True, ""

    def __init__(self, method, layer, device) -> None:
        from quant_kernels.triton_fp8 import pack_fp8

        raws = list(zip(layer.raw_shards, layer.output_sizes))
        q = torch.cat([raw["weight"] for raw, _ in raws])
        scales = [self.shard_scale(method, raw) for raw, _ in raws]
        block = self.scale_block(method)
        if block is None:  # every row's scale (per-tensor shard scales repeated)
            s = torch.cat([t.reshape(-1).expand(rows) if t.numel() == 1 else t.reshape(-1)
                           for t, (_, rows) in zip(scales, raws)])
        elif all(rows % block[0] == 0 for _, rows in raws[:-1]):
            s = torch.cat(scales)  # the shards' block grids tile the fused weight
        else:
            # a shard ends inside a block row (tensor-parallel or fused cuts): one scale
            # row per weight row, still one scale per bk columns
            s = torch.cat([t.repeat_interleave(block[0], 0)[:rows]
                           for t, (_, rows) in zip(scales, raws)])
            block = (1, block[1])
        self.w = pack_fp8(q.to(device), s.to(device), block)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from quant_kernels.triton_fp8 import fp8_matmul

        return fp8_matmul(x, self.w)

    def tensors(self):
        return [self.w.q, self.w.scales]


class Fp8DequantKernel(PackedKernel):
    name = "fp8 weight-only (expand + F.linear)"

    @classmethod
    def can_implement(cls, method, layer, device, policy):
        why = fast_kernel_refusal(policy, device)
        if why:
            return False, why
        return True, ""

    def __init__(self, method, layer, device) -> None:
        self.block = method.p.block if method.p.scheme == "block" else None
        if self.block is None:  # one scale per row: all shards as one matrix
            self.parts = [(torch.cat([raw["weight"] for raw in layer.raw_shards]).to(device),
                           _row_scales(method, layer).reshape(-1, 1).to(device))]
        else:  # each shard has its own block grid
            self.parts = [(raw["weight"].to(device), method.weight_scale(raw).to(device))
                          for raw in layer.raw_shards]

    def _weight(self, q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.block is None:
            return (q.float() * s).to(dtype)
        bn, bk = self.block
        rows, cols = q.shape
        if rows % bn or cols % bk:  # partial edge blocks
            return fp8_format.dequantize(q, s, block_size=self.block, dtype=dtype)
        blocks = q.float().view(rows // bn, bn, cols // bk, bk) * s[:, None, :, None]
        return blocks.view(rows, cols).to(dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        ws = [self._weight(q, s, x.dtype) for q, s in self.parts]
        return F.linear(x, ws[0] if len(ws) == 1 else torch.cat(ws))

    def tensors(self):
        return [t for part in self.parts for t in part]


# W8A8 first: checkpoints quantized for dynamic activation scales run as their producers
# intended where FP8 tensor cores exist; the fused W8A16 kernel takes the rest on CUDA.
FP8_KERNELS: tuple[type[PackedKernel], ...] = (Fp8ScaledMMKernel, Fp8TritonKernel,
                                               Fp8DequantKernel, ReferenceKernel)
