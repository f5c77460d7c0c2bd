"""K-quants (256-value super-blocks) and the ternary TQ types, as pure torch.

Each ``dequantize_blocks`` follows the matching ``dequantize_row_*`` of ggml-quants.c in
the form gguf-py writes it (same reshapes, same float32 operation order), which is what
makes the results bit-identical to ``gguf.quants.dequantize``.
"""
from __future__ import annotations

import torch
from gguf.constants import GGMLQuantizationType as Q

from .gguf_ref_base import GGMLBlockType, f16, f32, split_bits

QK_K = 256


class Q2_K(GGMLBlockType, ggml_type=Q.Q2_K, block_size=256, type_size=84):
    # scales[16] (4-bit scale | 4-bit min) | qs[64] (2-bit) | fp16 d | fp16 dmin
    # same as dequantize_row_q2_K: w = d*sc*q - dmin*m per 16 values
    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        scales, qs = blocks[:, :16], blocks[:, 16:80]
        d, dmin = f16(blocks, 80), f16(blocks, 82)
        dl = (d * (scales & 0xF).to(torch.float32)).reshape(n, 16, 1)
        ml = (dmin * (scales >> 4).to(torch.float32)).reshape(n, 16, 1)
        q = split_bits(qs.reshape(n, 2, 32), [0, 2, 4, 6], 3)
        q = q.reshape(n, 16, 16).to(torch.float32)
        return (dl * q - ml).reshape(n, QK_K)


class Q3_K(GGMLBlockType, ggml_type=Q.Q3_K, block_size=256, type_size=110):
    # hmask[32] | qs[64] (low 2 bits) | scales[12] (16 x 6-bit, packed) | fp16 d
    # same as dequantize_row_q3_K
    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        hmask, qs, scales = blocks[:, :32], blocks[:, 32:96], blocks[:, 96:108]
        d = f16(blocks, 108)
        # bytes 0..7 hold the low 4 bits of the 16 scales (low nibbles first), bytes
        # 8..11 the high 2 bits, four per byte
        lo = split_bits(scales[:, :8], [0, 4], 0x0F).reshape(n, 16)
        hi = split_bits(scales[:, 8:12], [0, 2, 4, 6], 0x03).reshape(n, 16)
        sc = ((lo | (hi << 4)).to(torch.int32) - 32).to(torch.float32)
        dl = (d * sc).reshape(n, 16, 1)
        ql = split_bits(qs.reshape(n, 2, 32), [0, 2, 4, 6], 3).reshape(n, 16, 16)
        qh = split_bits(hmask.reshape(n, 1, 32), range(8), 1).reshape(n, 16, 16)
        # a *clear* hmask bit subtracts 4 (ggml stores the bit inverted)
        q = (ql.to(torch.int32) - ((qh ^ 1).to(torch.int32) << 2)).to(torch.float32)
        return (dl * q).reshape(n, QK_K)


def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 six-bit scales and mins packed in 12 bytes (get_scale_min_k4 in ggml)."""
    n = scales.shape[0]
    s = scales.reshape(n, 3, 4)
    d, m, m_d = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


class Q4_K(GGMLBlockType, ggml_type=Q.Q4_K, block_size=256, type_size=144):
    # fp16 d | fp16 dmin | scales[12] | qs[128]; same as dequantize_row_q4_K
    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        d, dmin = f16(blocks, 0), f16(blocks, 2)
        sc, mn = _scale_min_k4(blocks[:, 4:16])
        dl = (d * sc.to(torch.float32)).reshape(n, 8, 1)
        dm = (dmin * mn.to(torch.float32)).reshape(n, 8, 1)
        q = split_bits(blocks[:, 16:].reshape(n, 4, 32), [0, 4], 0x0F)
        q = q.reshape(n, 8, 32).to(torch.float32)
        return (dl * q - dm).reshape(n, QK_K)


class Q5_K(GGMLBlockType, ggml_type=Q.Q5_K, block_size=256, type_size=176):
    # fp16 d | fp16 dmin | scales[12] | qh[32] | qs[128]; same as dequantize_row_q5_K
    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        d, dmin = f16(blocks, 0), f16(blocks, 2)
        sc, mn = _scale_min_k4(blocks[:, 4:16])
        dl = (d * sc.to(torch.float32)).reshape(n, 8, 1)
        dm = (dmin * mn.to(torch.float32)).reshape(n, 8, 1)
        ql = split_bits(blocks[:, 48:].reshape(n, 4, 32), [0, 4], 0x0F).reshape(n, 8, 32)
        qh = split_bits(blocks[:, 16:48].reshape(n, 1, 32), range(8), 1).reshape(n, 8, 32)
        q = (ql | (qh << 4)).to(torch.float32)
        return (dl * q - dm).reshape(n, QK_K)


class Q6_K(GGMLBlockType, ggml_type=Q.Q6_K, block_size=256, type_size=210):
    # ql[128] | qh[64] | int8 scales[16] | fp16 d; same as dequantize_row_q6_K
    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        sc = blocks[:, 192:208].view(torch.int8).to(torch.float32)
        dl = (f16(blocks, 208) * sc).reshape(n, 16, 1)
        ql = split_bits(blocks[:, :128].reshape(n, 2, 64), [0, 4], 0x0F).reshape(n, 8, 32)
        qh = split_bits(blocks[:, 128:192].reshape(n, 2, 32), [0, 2, 4, 6], 3).reshape(n, 8, 32)
        q = ((ql | (qh << 4)).to(torch.int32) - 32).reshape(n, 16, 16).to(torch.float32)
        return (dl * q).reshape(n, QK_K)


class Q8_K(GGMLBlockType, ggml_type=Q.Q8_K, block_size=256, type_size=292):
    # fp32 d | int8 qs[256] | int16 bsums[16] (bsums only speed up dot products)
    # same as dequantize_row_q8_K; gguf-py has no Q8_K, the tests use a numpy reference
    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        return f32(blocks, 0) * blocks[:, 4:260].view(torch.int8).to(torch.float32)


class TQ1_0(GGMLBlockType, ggml_type=Q.TQ1_0, block_size=256, type_size=54):
    # qs[48] (5 trits per byte) | qh[4] (4 trits per byte) | fp16 d
    # same as dequantize_row_tq1_0: a byte b stores trits as the fixed-point fraction
    # b/256 in base 3, so trit i is ((b * 3^i mod 256) * 3) >> 8
    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        d = f16(blocks, 52)
        pow5 = torch.tensor([1, 3, 9, 27, 81], dtype=torch.uint8).reshape(5, 1)
        pow4 = torch.tensor([1, 3, 9, 27], dtype=torch.uint8).reshape(4, 1)
        # uint8 products wrap mod 256 on purpose (same as the uint8 math in ggml)
        q0 = (blocks[:, :32].reshape(n, 1, 32) * pow5).reshape(n, 160)
        q1 = (blocks[:, 32:48].reshape(n, 1, 16) * pow5).reshape(n, 80)
        qh = (blocks[:, 48:52].reshape(n, 1, 4) * pow4).reshape(n, 16)
        q = torch.cat([q0, q1, qh], dim=-1).to(torch.int32)
        q = ((q * 3) >> 8) - 1
        return d * q.to(torch.float32)


class TQ2_0(GGMLBlockType, ggml_type=Q.TQ2_0, block_size=256, type_size=66):
    # qs[64] (2-bit, value - 1) | fp16 d; same as dequantize_row_tq2_0
    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        q = split_bits(blocks[:, :64].reshape(n, 2, 32), [0, 2, 4, 6], 3).reshape(n, QK_K)
        return f16(blocks, 64) * (q.to(torch.int32) - 1).to(torch.float32)
