"""I-quants (lattice/codebook types) and the fp4 microscaling types, as pure torch.

The codebooks (iq2xxs_grid and friends) and sign tables are not retyped here: they are
taken from gguf-py's ``gguf.quants`` classes the first time a type is used, so there is
one copy of those numbers in the environment.  The block math mirrors gguf-py's
``dequantize_blocks`` (ports of ggml-quants.c ``dequantize_row_iq*``) operation by
operation so results are bit-identical.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
from gguf import quants as gq
from gguf.constants import GGMLQuantizationType as Q

from .gguf_ref_base import (GGMLBlockType, f16, nibbles, sign_from_bits, split_bits_last,
                            u16, u32)


@functools.cache
def _grid(name: str) -> torch.Tensor:
    """float32 ``[n_entries, values_per_entry]`` codebook of gguf-py's class ``name``."""
    cls = getattr(gq, name)
    cls.init_grid()
    return torch.from_numpy(np.ascontiguousarray(cls.grid.reshape(cls.grid_shape)))


@functools.cache
def _ksigns() -> torch.Tensor:
    # ksigns_iq2xs: 7 stored sign bits -> 8 bits with even parity
    return torch.frombuffer(bytearray(gq.IQ2_XXS.ksigns), dtype=torch.uint8)


@functools.cache
def _kvalues(name: str) -> torch.Tensor:
    return torch.tensor(getattr(gq, name).kvalues, dtype=torch.float32)


def _signs_from_ksigns(packed: torch.Tensor, shifts: list[int]) -> torch.Tensor:
    """7-bit ksigns indices at ``shifts`` of ``packed`` -> ±1 ``[..., len(shifts), 8]``."""
    idx = split_bits_last(packed, shifts, 0x7F)
    return sign_from_bits(split_bits_last(_ksigns()[idx], range(8), 1))


class IQ2_XXS(GGMLBlockType, ggml_type=Q.IQ2_XXS, block_size=256, type_size=66):
    # fp16 d | 8 x (4 grid bytes | uint32: 4 x 7-bit sign index, 4-bit scale at 28)
    # same as dequantize_row_iq2_xxs
    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        d = f16(blocks, 0)
        aux = u32(blocks, 2, 16).reshape(n, 8, 2)[..., 1]
        db = (d * (0.5 + (aux >> 28).to(torch.float32)) * 0.25).reshape(n, 8, 1, 1)
        signs = _signs_from_ksigns(aux, [0, 7, 14, 21])
        idx = blocks[:, 2:].reshape(n, 8, 8)[..., :4].to(torch.int64)
        grid = _grid("IQ2_XXS")[idx]
        return (db * grid * signs).reshape(n, -1)


def _scales_4bit(scales: torch.Tensor) -> torch.Tensor:
    """Bytes of two 4-bit scales each -> ``[n, 2 * bytes]`` (low nibble first), as float32."""
    return split_bits_last(scales, [0, 4], 0x0F).reshape(scales.shape[0], -1).to(torch.float32)


class IQ2_XS(GGMLBlockType, ggml_type=Q.IQ2_XS, block_size=256, type_size=74):
    # fp16 d | 32 x uint16 (9-bit grid index, 7-bit sign index) | scales[8]
    # same as dequantize_row_iq2_xs
    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        d = f16(blocks, 0)
        qs = u16(blocks, 2, 32)
        db = (d * (0.5 + _scales_4bit(blocks[:, 66:74])) * 0.25).reshape(n, 16, 1, 1)
        signs = sign_from_bits(split_bits_last(_ksigns()[(qs >> 9).to(torch.int64)], range(8), 1))
        grid = _grid("IQ2_XS")[(qs & 511).to(torch.int64)]
        return (db * grid.reshape(n, 16, 2, 8) * signs.reshape(n, 16, 2, 8)).reshape(n, -1)


class IQ2_S(GGMLBlockType, ggml_type=Q.IQ2_S, block_size=256, type_size=82):
    # fp16 d | qs[32] (low 8 index bits) | signs[32] | qh[8] (2 high bits x4) | scales[8]
    # same as dequantize_row_iq2_s
    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        d = f16(blocks, 0)
        db = (d * (0.5 + _scales_4bit(blocks[:, 74:82])) * 0.25).reshape(n, 16, 1, 1)
        signs = sign_from_bits(split_bits_last(blocks[:, 34:66], range(8), 1)).reshape(n, 16, 2, 8)
        qh = split_bits_last(blocks[:, 66:74], [0, 2, 4, 6], 0x03).reshape(n, 32)
        idx = blocks[:, 2:34].to(torch.int64) | (qh.to(torch.int64) << 8)
        grid = _grid("IQ2_S")[idx].reshape(n, 16, 2, 8)
        return (db * grid * signs).reshape(n, -1)


class IQ3_XXS(GGMLBlockType, ggml_type=Q.IQ3_XXS, block_size=256, type_size=98):
    # fp16 d | qs[64] (grid indices) | 8 x uint32 (4 x 7-bit sign index, 4-bit scale)
    # same as dequantize_row_iq3_xxs
    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        d = f16(blocks, 0)
        aux = u32(blocks, 66, 8)
        db = (d * (0.5 + (aux >> 28).to(torch.float32)) * 0.5).reshape(n, 8, 1, 1)
        signs = _signs_from_ksigns(aux, [0, 7, 14, 21])
        grid = _grid("IQ3_XXS")[blocks[:, 2:66].to(torch.int64)].reshape(n, 8, 4, 8)
        return (db * grid * signs).reshape(n, -1)


class IQ3_S(GGMLBlockType, ggml_type=Q.IQ3_S, block_size=256, type_size=110):
    # fp16 d | qs[64] | qh[8] (9th index bit) | signs[32] | scales[4]
    # same as dequantize_row_iq3_s
    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        d = f16(blocks, 0)
        sc = split_bits_last(blocks[:, 106:110], [0, 4], 0x0F).reshape(n, 8)
        db = (d * (1 + 2 * sc.to(torch.int32)).to(torch.float32)).reshape(n, 8, 1, 1)
        signs = sign_from_bits(split_bits_last(blocks[:, 74:106], range(8), 1)).reshape(n, 8, 4, 8)
        qh = split_bits_last(blocks[:, 66:74], range(8), 1).reshape(n, 64)
        idx = blocks[:, 2:66].to(torch.int64) | (qh.to(torch.int64) << 8)
        grid = _grid("IQ3_S")[idx].reshape(n, 8, 4, 8)
        return (db * grid * signs).reshape(n, -1)


def _iq1_delta(bit_set: torch.Tensor) -> torch.Tensor:
    # IQ1_DELTA = 0.125, negated when the flag bit is set
    return torch.where(bit_set, -0.125, 0.125).to(torch.float32)


class IQ1_S(GGMLBlockType, ggml_type=Q.IQ1_S, block_size=256, type_size=50):
    # fp16 d | qs[32] (low 8 index bits) | 8 x uint16 (4 x 3 high index bits, 3-bit
    # scale at 12, delta sign at 15); same as dequantize_row_iq1_s
    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        d = f16(blocks, 0)
        qh = u16(blocks, 34, 8)
        dl = (d * (2 * ((qh >> 12) & 7) + 1).to(torch.float32)).reshape(n, 8, 1, 1)
        delta = _iq1_delta((qh & 0x8000) != 0).reshape(n, 8, 1, 1)
        hi = split_bits_last(qh, [0, 3, 6, 9], 7).reshape(n, 32).to(torch.int64)
        idx = blocks[:, 2:34].to(torch.int64) | (hi << 8)
        grid = _grid("IQ1_S")[idx].reshape(n, 8, 4, 8)
        return (dl * (grid + delta)).reshape(n, -1)


class IQ1_M(GGMLBlockType, ggml_type=Q.IQ1_M, block_size=256, type_size=56):
    # qs[32] | qh[16] (3 high index bits + delta flag per nibble) | 4 x uint16 scales;
    # the fp16 d is scattered over the top nibbles of those four uint16.
    # same as dequantize_row_iq1_m
    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        sc = u16(blocks, 48, 4)
        d_bits = ((sc[:, 0] >> 12) | ((sc[:, 1] >> 8) & 0x00F0)
                  | ((sc[:, 2] >> 4) & 0x0F00) | (sc[:, 3] & 0xF000))
        d_bytes = torch.stack([d_bits & 0xFF, d_bits >> 8], dim=-1).to(torch.uint8)
        d = d_bytes.view(torch.float16).to(torch.float32).reshape(n, 1)
        s3 = split_bits_last(sc, [0, 3, 6, 9], 0x07).reshape(n, 16)
        dl = (d * (2 * s3 + 1).to(torch.float32)).reshape(n, 8, 2, 1, 1)
        qh = split_bits_last(blocks[:, 32:48], [0, 4], 0xFF).reshape(n, 32)
        idx = blocks[:, :32].to(torch.int64) | ((qh & 0x07).to(torch.int64) << 8)
        delta = _iq1_delta((qh & 0x08) != 0).reshape(n, 8, 2, 2, 1)
        grid = _grid("IQ1_S")[idx].reshape(n, 8, 2, 2, 8)
        return (dl * (grid + delta)).reshape(n, -1)


class IQ4_NL(GGMLBlockType, ggml_type=Q.IQ4_NL, block_size=32, type_size=18):
    # fp16 d | 16 bytes of nibbles indexing kvalues_iq4nl; same as dequantize_row_iq4_nl
    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        q = _kvalues("IQ4_NL")[nibbles(blocks[:, 2:]).to(torch.int64)]
        return f16(blocks, 0) * q


class IQ4_XS(GGMLBlockType, ggml_type=Q.IQ4_XS, block_size=256, type_size=136):
    # fp16 d | uint16 scales_h (2 bits x8) | scales_l[4] (4 bits x8) | qs[128]
    # same as dequantize_row_iq4_xs
    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        d = f16(blocks, 0)
        sh = split_bits_last(u16(blocks, 2, 1), range(0, 16, 2), 0x03).reshape(n, 8)
        sl = split_bits_last(blocks[:, 4:8], [0, 4], 0x0F).reshape(n, 8).to(torch.int32)
        sc = ((sl | (sh << 4)) - 32).to(torch.float32)
        dl = (d * sc).reshape(n, 8, 1)
        q = nibbles(blocks[:, 8:].reshape(n, 8, 16)).to(torch.int64)
        return (dl * _kvalues("IQ4_NL")[q]).reshape(n, -1)


# --- fp4 with shared exponents (OCP MX / NVIDIA NVFP4) ------------------------------------

def _e8m0_half_table() -> torch.Tensor:
    # ggml_e8m0_to_fp32_half: 2^(e-128) as float32 bits, subnormal for e < 2
    e = torch.arange(256, dtype=torch.int64)
    bits = torch.where(e < 2, 0x00200000 << e, (e - 1) << 23)
    return bits.to(torch.int32).view(torch.float32)


def _ue4m3_half_table() -> torch.Tensor:
    # unsigned e4m3 (bias 7) times 0.5, 0 for 0x00 and 0x7F; bit 7 is ignored the way
    # gguf-py's NVFP4.ue4m3_to_fp32 ignores it.  All values are exact in float32.
    vals = []
    for x in range(256):
        exp, man = (x >> 3) & 0xF, x & 7
        raw = man * 2.0 ** -9 if exp == 0 else (1.0 + man / 8.0) * 2.0 ** (exp - 7)
        vals.append(0.0 if x in (0, 0x7F) else raw * 0.5)
    return torch.tensor(vals, dtype=torch.float32)


class MXFP4(GGMLBlockType, ggml_type=Q.MXFP4, block_size=32, type_size=17):
    # e8m0 exponent | 16 bytes of e2m1 nibbles; same as dequantize_row_mxfp4
    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        d = _table("e8m0")[blocks[:, :1].to(torch.int64)]
        return d * _kvalues("MXFP4")[nibbles(blocks[:, 1:]).to(torch.int64)]


class NVFP4(GGMLBlockType, ggml_type=Q.NVFP4, block_size=64, type_size=36):
    # 4 x ue4m3 scales (one per 16 values) | 4 x 8 bytes of e2m1 nibbles
    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        d = _table("ue4m3")[blocks[:, :4].to(torch.int64)].reshape(n, 4, 1)
        q = nibbles(blocks[:, 4:].reshape(n, 4, 8)).to(torch.int64)
        return (d * _kvalues("NVFP4")[q]).reshape(n, 64)


@functools.cache
def _table(name: str) -> torch.Tensor:
    return _e8m0_half_table() if name == "e8m0" else _ue4m3_half_table()
