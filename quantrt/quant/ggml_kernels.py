"""Kernel choice for GGML block-quantized weights, kept apart from the GGUF format code.

Kernels are tried in priority order; each says ``can_implement(weight, device, policy)
-> (ok, reason)`` and the first that accepts runs.  The reasons of the faster kernels that
refused are kept so ``inspect`` and the logs can say why the fast path was not taken.
"""
from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import gguf
import torch
import torch.nn.functional as F

from quant_kernels import cpu_ggml, cpu_int4, gguf_ref
from quantrt.quant.base import fast_kernel_refusal

FLOAT_TYPES = {
    gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16,
}

# Above this many rows of activations, dequantizing the whole weight once and running a dense
# GEMM beats tinygemm's int4 kernel on 2 AVX2 cores (scripts/bench_cpu_int4.py: at M=8 int4
# is ~3x faster than dequant+GEMM for 1536x576, at M=64 dequant+GEMM wins).
CPU_INT4_MAX_ROWS = 32


@dataclass
class GGMLTensor:
    """A GGML tensor as stored: ``data`` is uint8 ``[rows, row_bytes]`` for block types, or
    a float tensor ``[rows, cols]`` for F32/F16/BF16."""

    data: torch.Tensor
    ggml_type: int
    shape: tuple[int, int]

    @property
    def type_name(self) -> str:
        return gguf.GGMLQuantizationType(self.ggml_type).name

    def to_float(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.ggml_type in FLOAT_TYPES:
            return self.data.to(dtype).reshape(self.shape)
        return gguf_ref.dequantize(self.data, self.ggml_type, self.shape).to(dtype)

    def to(self, device: torch.device) -> "GGMLTensor":
        return GGMLTensor(self.data.to(device), self.ggml_type, self.shape)


class GGMLKernel(ABC):
    reads_raw: ClassVar[bool] = True   # the GGML bytes stay on the device for this kernel

    name: ClassVar[str]

    @classmethod
    @abstractmethod
    def can_implement(cls, w: GGMLTensor, device: torch.device, policy: str) -> tuple[bool, str]:
        ...

    @abstractmethod
    def __init__(self, w: GGMLTensor, dtype: torch.dtype, device: torch.device) -> None:
        """``w`` is on ``device`` unless the class sets ``reads_raw = False`` (then it may
        still be the memory-mapped host copy: the kernel keeps only its own repacked one)."""

    @abstractmethod
    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    def tensors(self) -> list[torch.Tensor]:
        """Tensors the kernel holds beyond the stored GGML data (for memory accounting)."""
        return []


class DenseKernel(GGMLKernel):
    """F32/F16/BF16 tensors in a GGUF are not quantized: cast once, then a plain GEMM."""

    name = "F.linear (unquantized GGUF tensor)"

    @classmethod
    def can_implement(cls, w: GGMLTensor, device: torch.device, policy: str) -> tuple[bool, str]:
        if w.ggml_type not in FLOAT_TYPES:
            return False, f"{w.type_name} is block-quantized"
        return True, ""

    def __init__(self, w: GGMLTensor, dtype: torch.dtype, device: torch.device) -> None:
        self.weight = w.to_float(dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))

    def tensors(self) -> list[torch.Tensor]:
        return [self.weight]


class CpuGGMLKernel(GGMLKernel):
    """Our AVX2 extension (quant_kernels/cpu_ggml.py): int8-quantized activations dotted with
    the GGML blocks as stored, for every batch size (one code path, so batch invariant)."""

    name = "cpu-ggml (AVX2 int8-dot over GGML blocks)"

    @classmethod
    def can_implement(cls, w: GGMLTensor, device: torch.device, policy: str) -> tuple[bool, str]:
        why = fast_kernel_refusal(policy, device, "cpu")
        if why:
            return False, why
        return cpu_ggml.supports(w.ggml_type, w.shape[0], w.shape[1])

    def __init__(self, w: GGMLTensor, dtype: torch.dtype, device: torch.device) -> None:
        self.data = w.data.contiguous()  # the stored bytes themselves: no copy for a GGUF
        self.raw_ptr = w.data.data_ptr()
        self.ggml_type = w.ggml_type

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype is torch.float32:  # the model's CPU dtype: straight to the op (~1 us less)
            return cpu_ggml.ggml_mm(x, self.data, self.ggml_type)
        return cpu_ggml.matmul(x, self.data, self.ggml_type)

    def tensors(self) -> list[torch.Tensor]:
        return [] if self.data.data_ptr() == self.raw_ptr else [self.data]


class CpuInt4PackKernel(GGMLKernel):
    """torch's tinygemm CPU int4 kernel (bf16 activations) for Q4_0/Q4_1/Q8_0 at small M;
    dequantize + GEMM for prefill-sized batches."""

    name = "cpu-int4pack (tinygemm, bf16 activations)"

    @classmethod
    def can_implement(cls, w: GGMLTensor, device: torch.device, policy: str) -> tuple[bool, str]:
        why = fast_kernel_refusal(policy, device, "cpu")
        if why:
            return False, why
        return cpu_int4.supports(w.ggml_type, w.shape[0], w.shape[1])

    def __init__(self, w: GGMLTensor, dtype: torch.dtype, device: torch.device) -> None:
        self.raw = w
        self.packed = cpu_int4.prepare(w.data, w.ggml_type)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > CPU_INT4_MAX_ROWS:
            return F.linear(x, self.raw.to_float(x.dtype))
        return cpu_int4.matmul(x, self.packed)

    def tensors(self) -> list[torch.Tensor]:
        return [getattr(self.packed, f.name) for f in dataclasses.fields(self.packed)
                if isinstance(getattr(self.packed, f.name), torch.Tensor)]


class DequantKernel(GGMLKernel):
    """The torch reference: dequantize the whole weight on every call, then a dense GEMM.
    Exact with respect to gguf-py's dequantization; slow, but always available."""

    name = "dequantize + F.linear (torch reference)"

    @classmethod
    def can_implement(cls, w: GGMLTensor, device: torch.device, policy: str) -> tuple[bool, str]:
        return True, ""

    def __init__(self, w: GGMLTensor, dtype: torch.dtype, device: torch.device) -> None:
        self.raw = w

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.raw.to_float(x.dtype))


class TritonDequantKernel(GGMLKernel):
    """The GGML types without a fused kernel (I-quants, MXFP4/NVFP4, TQ1_0/TQ2_0, Q8_K) on
    CUDA: each call expands the bytes as stored with a Triton kernel
    (quant_kernels/triton_ggml_dequant.py) into x's dtype, then cuBLAS.  The dense weight
    is transient, so memory stays that of the GGUF."""

    name = "triton-dequant + F.linear (cuBLAS)"

    @classmethod
    def can_implement(cls, w: GGMLTensor, device: torch.device, policy: str) -> tuple[bool, str]:
        from quant_kernels import triton_ggml_dequant as tgd

        why = fast_kernel_refusal(policy, device, "cuda")
        if why:
            return False, why
        if not tgd.HAS_TRITON:
            return False, "triton is not installed"
        if w.ggml_type not in tgd.TYPES:
            return False, f"{w.type_name} has no Triton dequant kernel"
        return True, ""

    def __init__(self, w: GGMLTensor, dtype: torch.dtype, device: torch.device) -> None:
        from quant_kernels import triton_ggml_dequant as tgd

        self.data, self.ggml_type, self.cols = w.data.contiguous(), w.ggml_type, w.shape[1]
        self.dequantize = tgd.dequantize  # bound once: no import on every call

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize(self.data, self.ggml_type, self.cols, x.dtype))


class _RepackedTritonKernel(GGMLKernel):
    """A GGML weight repacked once at load into a fused Triton kernel's layout; subclasses
    name the layout: the GGML types it takes, the repack and the matmul."""

    reads_raw = False
    missing: ClassVar[str]   # what a refused type lacks, for the reason

    @staticmethod
    @abstractmethod
    def supported() -> tuple:
        """The GGML types the layout takes (importing the kernels lazily)."""

    @abstractmethod
    def repack(self, w: GGMLTensor) -> object:
        """``w`` in the kernel's layout, on the CPU."""

    @abstractmethod
    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` with x in ``self.act_dtype``."""

    @classmethod
    def can_implement(cls, w: GGMLTensor, device: torch.device, policy: str) -> tuple[bool, str]:
        from quant_kernels import triton_wq

        why = fast_kernel_refusal(policy, device, "cuda")
        if why:
            return False, why
        if not triton_wq.HAS_TRITON:
            return False, "triton is not installed"
        types = cls.supported()
        if w.ggml_type not in types:
            return False, (f"{w.type_name} has no {cls.missing} (fused: "
                           f"{', '.join(t.name for t in types)})")
        return True, ""

    def __init__(self, w: GGMLTensor, dtype: torch.dtype, device: torch.device) -> None:
        # the kernels take fp16/bf16 activations; an fp32 model runs them in fp16
        self.act_dtype = dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16
        self.w = self.repack(w).to(device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.act_dtype:
            return self.matmul(x)
        return self.matmul(x.to(self.act_dtype)).to(x.dtype)


class TritonWQKernel(_RepackedTritonKernel):
    """Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q5_K repacked once into the common integer layout and
    run by the fused Triton dequant-matmul (quant_kernels/gguf_wq.py)."""

    name = "triton-wq (fused dequant-matmul)"
    missing = "WQWeight layout"

    @staticmethod
    def supported() -> tuple:
        from quant_kernels import gguf_wq

        return gguf_wq.SUPPORTED

    def repack(self, w: GGMLTensor):
        from quant_kernels import gguf_wq

        return gguf_wq.to_wq(w.data, w.ggml_type, w.shape[1], self.act_dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        from quant_kernels.triton_wq import wq_matmul

        return wq_matmul(x, self.w)

    def tensors(self) -> list[torch.Tensor]:
        return [self.w.qweight, self.w.scales, self.w.bias]


class TritonG16Kernel(_RepackedTritonKernel):
    """Q6_K/Q3_K/Q2_K (a scale per 16 values) repacked once (quant_kernels/g16_layout.py)
    and run by their own fused Triton dequant-matmul (quant_kernels/triton_g16.py)."""

    name = "triton-g16 (fused dequant-matmul, 16-value sub-blocks)"
    missing = "16-value sub-blocks"

    @staticmethod
    def supported() -> tuple:
        from quant_kernels import g16_layout

        return g16_layout.SUPPORTED

    def repack(self, w: GGMLTensor):
        from quant_kernels import g16_layout

        return g16_layout.to_g16(w.data, w.ggml_type, w.shape[1])

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        from quant_kernels.triton_g16 import g16_matmul

        return g16_matmul(x, self.w)

    def tensors(self) -> list[torch.Tensor]:
        return self.w.tensors()


GGML_KERNELS: tuple[type[GGMLKernel], ...] = (DenseKernel, TritonWQKernel, TritonG16Kernel,
                                              CpuGGMLKernel, CpuInt4PackKernel,
                                              TritonDequantKernel, DequantKernel)


def pick_kernel(w: GGMLTensor, device: torch.device, policy: str
                ) -> tuple[type[GGMLKernel], tuple[tuple[str, str], ...]]:
    refused = []
    for kernel in GGML_KERNELS:
        ok, reason = kernel.can_implement(w, device, policy)
        if ok:
            return kernel, tuple(r for r in refused if r[0] != DenseKernel.name)
        refused.append((kernel.name, reason))
    raise AssertionError("the reference kernel accepts every tensor")
