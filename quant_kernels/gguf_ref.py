"""Pure-torch dequantization of GGML block types, bit-exact with ``gguf.quants.dequantize``.

This is the reference path of quantrt's GGUF loader: any tensor of a supported type can
be turned into float32 on CPU without numpy round trips.  "Bit-exact" means every block
type does its float32 arithmetic in the same order as gguf-py (which mirrors the
``dequantize_row_*`` functions of ggml-quants.c), so ``torch.equal`` holds against
``gguf.quants.dequantize``; tests/test_gguf_ref.py checks this for every type.

Layout: this module holds the public API, the plain float types and the legacy 32-value
quants; K-quants and I-quants live in ``gguf_ref_kquants`` / ``gguf_ref_iquants``.
"""
from __future__ import annotations

import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as Q

from quantrt.errors import FormatError, UnsupportedError

# The K-/I-quant modules register their types when imported.
from . import gguf_ref_iquants, gguf_ref_kquants  # noqa: F401
from .gguf_ref_base import (GGMLBlockType, aligned_copy, f16, nibbles, registry,
                            split_bits_last, u32)

__all__ = ["GGMLBlockType", "dequantize", "block_info", "supported_types", "type_name"]


# --- plain float storage ----------------------------------------------------------------

class _FloatType(GGMLBlockType):
    """Block size 1: the bytes are already the values, so skip the block machinery."""

    torch_dtype: torch.dtype

    @classmethod
    def dequantize_bytes(cls, raw: torch.Tensor) -> torch.Tensor:
        raw = raw.reshape(-1)
        if raw.storage_offset() % cls.type_size:  # e.g. an mmap slice at an odd offset
            raw = aligned_copy(raw)
        out = raw.view(cls.torch_dtype).to(torch.float32)
        # F32 would otherwise alias the caller's (possibly read-only, mmapped) bytes
        return out.clone() if out.data_ptr() == raw.data_ptr() else out

    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        return cls.dequantize_bytes(blocks.contiguous()).reshape(-1, 1)


class F32(_FloatType, ggml_type=Q.F32, block_size=1, type_size=4):
    torch_dtype = torch.float32


class F16(_FloatType, ggml_type=Q.F16, block_size=1, type_size=2):
    torch_dtype = torch.float16


class BF16(_FloatType, ggml_type=Q.BF16, block_size=1, type_size=2):
    # bf16 -> f32 is a 16-bit left shift both in torch and in gguf-py, so exact.
    torch_dtype = torch.bfloat16


# --- legacy 32-value quants (ggml-quants.c dequantize_row_q4_0 ... q8_0) ----------------

class Q4_0(GGMLBlockType, ggml_type=Q.Q4_0, block_size=32, type_size=18):
    # fp16 d | 16 bytes of nibbles; w = d * (q - 8)
    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        d = f16(blocks, 0)
        q = nibbles(blocks[:, 2:]).to(torch.float32) - 8.0
        return d * q


class Q4_1(GGMLBlockType, ggml_type=Q.Q4_1, block_size=32, type_size=20):
    # fp16 d | fp16 m | 16 bytes of nibbles; w = d * q + m
    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        d, m = f16(blocks, 0), f16(blocks, 2)
        q = nibbles(blocks[:, 4:]).to(torch.float32)
        return d * q + m


def _q5_values(qh_bits: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """5-bit values 0..31: bit j of the uint32 ``qh`` is the high bit of element j."""
    hi = split_bits_last(qh_bits, range(32), 1).reshape(qs.shape[0], 32)
    return (nibbles(qs).to(torch.int64) | (hi << 4)).to(torch.float32)


class Q5_0(GGMLBlockType, ggml_type=Q.Q5_0, block_size=32, type_size=22):
    # fp16 d | uint32 qh | 16 bytes of nibbles; w = d * (q - 16)
    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        d = f16(blocks, 0)
        q = _q5_values(u32(blocks, 2, 1), blocks[:, 6:]) - 16.0
        return d * q


class Q5_1(GGMLBlockType, ggml_type=Q.Q5_1, block_size=32, type_size=24):
    # fp16 d | fp16 m | uint32 qh | 16 bytes of nibbles; w = d * q + m
    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        d, m = f16(blocks, 0), f16(blocks, 2)
        q = _q5_values(u32(blocks, 4, 1), blocks[:, 8:])
        return d * q + m


class Q8_0(GGMLBlockType, ggml_type=Q.Q8_0, block_size=32, type_size=34):
    # fp16 d | 32 x int8; w = q * d
    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        return blocks[:, 2:].view(torch.int8).to(torch.float32) * f16(blocks, 0)


# --- public API -------------------------------------------------------------------------

def _resolve(ggml_type: int) -> type[GGMLBlockType]:
    try:
        qtype = Q(int(ggml_type))
    except ValueError:
        raise UnsupportedError(f"unknown GGML tensor type {int(ggml_type)}",
                               hint="the file may need a newer quantrt") from None
    cls = registry().get(qtype)
    if cls is None:
        names = ", ".join(type_name(t) for t in supported_types())
        raise UnsupportedError(f"GGML tensor type {qtype.name} ({int(qtype)}) cannot be "
                               "dequantized by quantrt", hint=f"supported: {names}")
    return cls


# Types whose block math is plain tensor ops on the data's own device (no lookup tables).
DEVICE_SAFE = {Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K,
               Q.Q6_K, Q.Q8_K}


def qtype_of(cls: type[GGMLBlockType]) -> Q:
    return Q(int(cls.ggml_type))


def dequantize(data: torch.Tensor, ggml_type: int, shape: tuple[int, ...] | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dequantize GGML data to a float tensor.

    ``data`` is uint8 ``[..., row_bytes]`` as stored in the file; for F32/F16/BF16 it may
    also be a tensor of that dtype.  The result is ``[..., row_bytes // type_size *
    block_size]`` (or ``shape`` when given), computed in float32 and then cast to
    ``dtype``; it never shares memory with ``data``.  Raises UnsupportedError for types
    without a dequantizer and FormatError when the byte count does not fit the type.
    """
    cls = _resolve(ggml_type)
    if data.dtype != torch.uint8:
        if not (issubclass(cls, _FloatType) and data.dtype == cls.torch_dtype):
            raise TypeError(f"{cls.ggml_type.name} data must be uint8 bytes"
                            + (f" or {cls.torch_dtype}" if issubclass(cls, _FloatType) else "")
                            + f", got {data.dtype}")
        out = data.to(torch.float32)
        out = out.clone() if out.data_ptr() == data.data_ptr() else out  # never alias
        out = out if shape is None else _reshape(out, shape, cls)
        return out.to(dtype)

    lead = tuple(data.shape[:-1]) if data.dim() else ()
    row_bytes = data.shape[-1] if data.dim() else 1
    if row_bytes % cls.type_size:
        raise FormatError(f"{cls.ggml_type.name} tensor rows have {row_bytes} bytes, "
                          f"not a multiple of the {cls.type_size}-byte block")
    if data.device.type != "cpu" and qtype_of(cls) not in DEVICE_SAFE:
        # the codebook types' tables live on the CPU: dequantize there (correct, not fast;
        # the fused GPU kernels cover the common types)
        return dequantize(data.cpu(), ggml_type, shape, dtype).to(data.device)
    out = cls.dequantize_bytes(data.contiguous())
    out_shape = (*lead, row_bytes // cls.type_size * cls.block_size)
    out = out.reshape(out_shape) if shape is None else _reshape(out, shape, cls)
    return out if dtype == torch.float32 else out.to(dtype)


def _reshape(out: torch.Tensor, shape: tuple[int, ...], cls: type[GGMLBlockType]) -> torch.Tensor:
    shape = tuple(int(s) for s in shape)
    numel = 1
    for s in shape:
        numel *= s
    if numel != out.numel():
        raise FormatError(f"{cls.ggml_type.name} data holds {out.numel()} values, "
                          f"but shape {shape} needs {numel}")
    return out.reshape(shape)


def block_info(ggml_type: int) -> tuple[int, int]:
    """(block_size, type_size) of any type gguf knows, dequantizable or not.

    Loaders need byte sizes to walk a file even past tensors they cannot dequantize.
    """
    try:
        return GGML_QUANT_SIZES[Q(int(ggml_type))]
    except (ValueError, KeyError):
        raise UnsupportedError(f"unknown GGML tensor type {int(ggml_type)}") from None


def supported_types() -> list[int]:
    return sorted(int(t) for t in registry())


def type_name(ggml_type: int) -> str:
    try:
        return Q(int(ggml_type)).name
    except ValueError:
        return f"unknown({int(ggml_type)})"
