"""Byte-exact tensor layouts: what each quantization method stores for a weight of shape
[N, K], and what of it stays in GPU memory after loading.  This module holds the common
part, the unquantized and the FP8 layouts; packed-integer methods are in
:mod:`~quantrt.estimate.packed_int`, bitsandbytes and HQQ in
:mod:`~quantrt.estimate.bnb_hqq`, compressed-tensors in :mod:`~quantrt.estimate.compressed`
and GGUF in :mod:`~quantrt.estimate.gguf_mix`.

Each layout reproduces the tensors its reference library writes (checked against the
golden fixtures in tests/fixtures/, see formats/*.py and shared/notes/checkpoint-formats.md
for the layouts themselves), including the awkward parts a bits-per-weight guess misses:
GPTQ's 3-bit words straddling int32s, AWQ GEMV's padded zero/scale widths, bitsandbytes'
absmax per 64-block with its nested absmax per 256 and the JSON quant_state blob.  Which
modules stay unquantized follows each library's defaults and skip-list semantics.

``Layout.tensors`` gets the shape one GPU holds (tensor parallel partitions included) and
the full K, because GPTQ with act-order keeps row-parallel scales unsharded (vLLM).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from quantrt.errors import ConfigError
from quantrt.estimate.arch import Arch, Weight

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "int64": 8,
               "int32": 4, "int8": 1, "uint8": 1}


# quantrt runs integer weights on Triton kernels that autotune on first use, and Triton's
# benchmark clears the L2 cache by writing a 256 MiB buffer: measured as +257 MiB of peak
# allocation for AWQ, GPTQ and Marlin checkpoints on an H100.
TRITON_AUTOTUNE_BYTES = 256 << 20
WQ_GROUP_SIZES = (32, 64, 128, 256)   # quant_kernels/wq_layout.GROUP_SIZES, or K


# GGML linear weights on CUDA are repacked once at load for their fused kernels; bytes per
# block of values there (tests/test_estimate_gguf_gpu.py checks these against the repack):
# * quant_kernels/gguf_wq.to_wq (groups of 32): 4- or 8-bit words plus an fp16/bf16 scale
#   and bias per group: Q4_0/Q4_1/Q4_K 16 + 4, Q5_0/Q5_1/Q5_K/Q8_0 widened to 32 + 4;
# * quant_kernels/g16_layout.to_g16 (256 values): Q6_K as stored, Q3_K with its 3-bit values
#   in nibbles, Q2_K with its scales and mins widened.
GGML_ON_GPU = {"Q4_0": (32, 20), "Q4_1": (32, 20), "Q4_K": (32, 20), "Q5_0": (32, 36),
               "Q5_1": (32, 36), "Q5_K": (32, 36), "Q8_0": (32, 36), "Q6_K": (256, 210),
               "Q3_K": (256, 146), "Q2_K": (256, 164)}
GPU_PREFIX = "cuda:"   # TensorSpec.loaded_dtype "cuda:Q4_K": the repacked GGML layout


def nbytes(dtype: str, numel: int) -> int:
    """Bytes of ``numel`` elements: torch dtype names, GGML type names (Q4_K, F32...), or
    ``cuda:<GGML type>`` for a GGML linear weight as the CUDA kernels hold it."""
    if dtype in DTYPE_BYTES:
        return numel * DTYPE_BYTES[dtype]
    if dtype.startswith(GPU_PREFIX):
        ggml = dtype[len(GPU_PREFIX):]
        if ggml in GGML_ON_GPU:
            block, size = GGML_ON_GPU[ggml]
            return cdiv(numel, block) * size
        dtype = ggml  # kept as stored (dequantized per call)
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[dtype]]
    return cdiv(numel, block) * size


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def words(count: int, bits: int) -> int:
    """int32 words holding ``count`` dense LSB-first ``bits``-bit values (values may straddle
    words): formats.packing.packed_length(count, bits, dense=True)."""
    return cdiv(count * bits, 32)


def wq_bytes(n: int, k: int, bits: int, group_size: int, act_order: bool, compute: str) -> int:
    """GPU bytes of an integer [N, K] weight once quantrt repacks it for its Triton kernels
    (quant_kernels/wq_layout.pack_wq): values widened to 4 or 8 bits (2/3-bit become 4) in
    int32 words along K padded to whole groups, a scale and a zero term (``-z * s``) per
    group and row in the compute dtype, and the act-order permutation as int32 [K]."""
    g = k if group_size <= 0 or group_size >= k else group_size
    groups = cdiv(k, g)
    wbits = 4 if bits <= 4 else 8
    return (n * cdiv(groups * g * wbits, 32) * 4 + 2 * n * groups * DTYPE_BYTES[compute]
            + (4 * k if act_order else 0))


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str                      # on disk
    loaded_dtype: str | None = None  # in GPU memory, when it differs (plain tensors: compute dtype)
    kept: bool = True               # False: metadata the loader parses and drops

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def disk_bytes(self) -> int:
        return nbytes(self.dtype, self.numel)

    @property
    def loaded_bytes(self) -> int:
        return nbytes(self.loaded_dtype or self.dtype, self.numel) if self.kept else 0


@dataclass(frozen=True)
class Context:
    arch: Arch
    compute: str = "bfloat16"       # dtype of unquantized tensors in GPU memory

    @property
    def checkpoint(self) -> str:
        return self.arch.dtype


def component_match(name: str, key: str) -> bool:
    """transformers' skip lists (bitsandbytes, fp8, hqq): ``key`` names whole dotted parts."""
    return f".{key}." in f".{name}."


class Layout:
    """A method's tensors per weight.  Subclasses are frozen dataclasses of its settings."""

    family: ClassVar[str]
    min_capability: ClassVar[int] = 70     # vLLM's get_min_capability() of the method
    # Kernels that, for large batches, materialise the dequantized weight of a layer.
    dequantizes_weights: ClassVar[bool] = False
    # Transient memory the method's kernels take on first use (see TRITON_AUTOTUNE_BYTES).
    kernel_workspace: ClassVar[int] = 0

    @property
    def label(self) -> str:
        raise NotImplementedError

    def quantizes(self, w: Weight) -> bool:
        return False

    def quantized(self, w: Weight, n: int, k: int, full_k: int, ctx: Context) -> list[TensorSpec]:
        raise NotImplementedError

    def plain(self, name: str, shape: tuple[int, ...], ctx: Context) -> TensorSpec:
        return TensorSpec(name, shape, ctx.checkpoint, ctx.compute)

    def tensors(self, w: Weight, shape: tuple[int, ...], full_k: int,
                ctx: Context) -> list[TensorSpec]:
        """The tensors of ``w`` as one GPU holds them (``shape`` is its partition)."""
        if w.is_linear and self.quantizes(w):
            out = self.quantized(w, shape[0], shape[1], full_k, ctx)
        else:
            out = [self.plain("weight", shape, ctx)]
        if w.bias:
            out.append(self.plain("bias", (shape[0],), ctx))
        return out

    def loaded_bytes(self, w: Weight, shape: tuple[int, ...], full_k: int, ctx: Context) -> int:
        """GPU bytes of ``w`` after loading (by default: the tensors the loader keeps)."""
        return sum(s.loaded_bytes for s in self.tensors(w, shape, full_k, ctx))


class RepackedToWQ(Layout):
    """Integer-affine methods: on the GPU quantrt holds them in its common WQ layout
    (:func:`wq_bytes`), whatever the checkpoint stored, and autotunes their kernels."""

    kernel_workspace: ClassVar[int] = TRITON_AUTOTUNE_BYTES

    def wq_settings(self, w: Weight, k: int) -> tuple[int, int, bool] | None:
        """(bits, group size (<= 0: per channel), act-order) of quantized ``w`` with ``k``
        input columns; None: not affine along K, kept as stored."""
        raise NotImplementedError

    def loaded_bytes(self, w, shape, full_k, ctx):
        settings = self.wq_settings(w, shape[1]) if w.is_linear and self.quantizes(w) else None
        # The WQ kernels tile groups of WQ_GROUP_SIZES or whole rows; other layers take
        # the reference path, which keeps the weight as stored.
        if settings is None or not (settings[1] <= 0 or settings[1] >= shape[1]
                                    or settings[1] in WQ_GROUP_SIZES):
            return super().loaded_bytes(w, shape, full_k, ctx)
        bias = self.plain("bias", (shape[0],), ctx).loaded_bytes if w.bias else 0
        return wq_bytes(shape[0], shape[1], *settings, ctx.compute) + bias


@dataclass(frozen=True)
class Unquantized(Layout):
    dtype: str | None = None        # None: the checkpoint's own dtype (in memory: compute dtype)
    family: ClassVar[str] = "unquantized"

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in ("float32", "float16", "bfloat16"):
            raise ConfigError(f"unquantized dtype must be float32, float16 or bfloat16, "
                              f"got {self.dtype!r}")

    @property
    def label(self) -> str:
        return self.dtype or "checkpoint dtype"

    def plain(self, name: str, shape: tuple[int, ...], ctx: Context) -> TensorSpec:
        return TensorSpec(name, shape, self.dtype or ctx.checkpoint, self.dtype or ctx.compute)


@dataclass(frozen=True)
class FP8(Layout):
    """vLLM / transformers ``quant_method: fp8``: e4m3 weights, fp32 ``weight_scale_inv``
    per tensor ([1, 1]) or per [bn, bk] block (partial edge blocks have their own scale)."""

    block: tuple[int, int] | None = None
    static_activations: bool = False
    modules_to_not_convert: tuple[str, ...] = ()
    family: ClassVar[str] = "fp8"
    min_capability: ClassVar[int] = 80   # weight-only FP8 Marlin below 8.9

    @property
    def label(self) -> str:
        scales = f"block {self.block[0]}x{self.block[1]}" if self.block else "per-tensor"
        return f"FP8 e4m3 {scales}"

    def quantizes(self, w: Weight) -> bool:
        return w.role not in ("router", "lm_head") and not any(
            component_match(w.name, key) for key in self.modules_to_not_convert)

    def quantized(self, w, n, k, full_k, ctx):
        scale = (cdiv(n, self.block[0]), cdiv(k, self.block[1])) if self.block else (1, 1)
        out = [TensorSpec("weight", (n, k), "float8_e4m3fn"),
               TensorSpec("weight_scale_inv", scale, "float32")]
        return out + ([TensorSpec("input_scale", (), "float32")] if self.static_activations else [])
