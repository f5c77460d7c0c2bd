"""Triton block math for the GGML types without a fused kernel (I-quants, fp4, ternary, Q8_K).

Each ``deq_*`` function takes ``blk``, ``[SB, 1]`` uint8 pointers to the first byte of
``SB`` blocks *as stored in the GGUF*, and ``j``, ``[1, BLOCK]`` element indices inside a
block, and returns the ``[SB, BLOCK]`` values in fp32.  Every element loads the bytes it
needs itself (its grid index, sign byte, sub-block scale): neighbouring lanes read the
same few bytes, which the cache serves once, and the index math stays a direct
transcription of the torch reference (quant_kernels/gguf_ref_iquants.py /
gguf_ref_kquants.py), itself an operation-by-operation port of gguf-py.  The fp32
operations are in the reference's order and none is a multiply feeding an add, so the
compiler has nothing to contract into an FMA: results are bit-identical to
``gguf_ref.dequantize``.

Tables (codebooks, ksigns, kvalues, the e8m0 / ue4m3 scale decodings) arrive as ``t0``
/ ``t1`` pointers, uploaded once per device by triton_ggml_dequant.py.
"""
from __future__ import annotations

import triton
import triton.language as tl


# ----------------------------------------------------------------------------- bytes
# Byte loads assembled into wider fields: GGML blocks have odd sizes (17, 50, 66 bytes),
# so a wider load would be misaligned; everything is int32, values stay below 2**31
# except _u32's top bit, which only the masked shifts below ever see.
@triton.jit
def _u8(p):
    return tl.load(p).to(tl.int32)


@triton.jit
def _u16(p):
    return _u8(p) | (_u8(p + 1) << 8)


@triton.jit
def _u32(p):
    return _u16(p) | (_u16(p + 2) << 16)


@triton.jit
def _f16(p):
    return _u16(p).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _sign(bit):
    # bit 0/1 -> +1/-1 (gguf_ref_base.sign_from_bits)
    return 1.0 - 2.0 * bit.to(tl.float32)


@triton.jit
def _iq1_delta(flag):
    # IQ1_DELTA = 0.125, negated when the flag bit is set
    return tl.where(flag != 0, -0.125, 0.125)


@triton.jit
def _scale4(blk, off, s):
    # scale s of a run of bytes holding two 4-bit scales each, low nibble first
    return (_u8(blk + off + s // 2) >> (4 * (s % 2))) & 15


# ----------------------------------------------------------------------------- I-quants
@triton.jit
def deq_iq2_xxs(blk, j, t0, t1):
    # fp16 d | 8 x (4 grid bytes | uint32 aux: 4 x 7-bit ksigns index, scale at 28)
    # same as dequantize_row_iq2_xxs in ggml-quants.c; t0 = iq2xxs_grid, t1 = ksigns
    ib = j // 32
    aux = _u32(blk + 6 + ib * 8)
    db = _f16(blk) * (0.5 + ((aux >> 28) & 15).to(tl.float32)) * 0.25
    ks = tl.load(t1 + ((aux >> (7 * ((j // 8) % 4))) & 0x7F)).to(tl.int32)
    grid = tl.load(t0 + _u8(blk + 2 + ib * 8 + (j // 8) % 4) * 8 + j % 8)
    return db * grid * _sign((ks >> (j % 8)) & 1)


@triton.jit
def deq_iq2_xs(blk, j, t0, t1):
    # fp16 d | 32 x uint16 (9-bit grid index, 7-bit ksigns index) | scales[8]
    # same as dequantize_row_iq2_xs; t0 = iq2xs_grid, t1 = ksigns
    qs = _u16(blk + 2 + (j // 8) * 2)
    db = _f16(blk) * (0.5 + _scale4(blk, 66, j // 16).to(tl.float32)) * 0.25
    ks = tl.load(t1 + (qs >> 9)).to(tl.int32)
    grid = tl.load(t0 + (qs & 511) * 8 + j % 8)
    return db * grid * _sign((ks >> (j % 8)) & 1)


@triton.jit
def deq_iq2_s(blk, j, t0, t1):
    # fp16 d | qs[32] (low 8 index bits) | signs[32] | qh[8] (2 high bits x4) | scales[8]
    # same as dequantize_row_iq2_s; t0 = iq2s_grid
    t = j // 8
    db = _f16(blk) * (0.5 + _scale4(blk, 74, j // 16).to(tl.float32)) * 0.25
    sign = _sign((_u8(blk + 34 + t) >> (j % 8)) & 1)
    qh = (_u8(blk + 66 + t // 4) >> (2 * (t % 4))) & 3
    grid = tl.load(t0 + (_u8(blk + 2 + t) | (qh << 8)) * 8 + j % 8)
    return db * grid * sign


@triton.jit
def deq_iq3_xxs(blk, j, t0, t1):
    # fp16 d | qs[64] (grid indices) | 8 x uint32 (4 x 7-bit ksigns index, scale at 28)
    # same as dequantize_row_iq3_xxs; t0 = iq3xxs_grid (4 values an entry), t1 = ksigns
    aux = _u32(blk + 66 + (j // 32) * 4)
    db = _f16(blk) * (0.5 + ((aux >> 28) & 15).to(tl.float32)) * 0.5
    ks = tl.load(t1 + ((aux >> (7 * ((j // 8) % 4))) & 0x7F)).to(tl.int32)
    grid = tl.load(t0 + _u8(blk + 2 + j // 4) * 4 + j % 4)
    return db * grid * _sign((ks >> (j % 8)) & 1)


@triton.jit
def deq_iq3_s(blk, j, t0, t1):
    # fp16 d | qs[64] | qh[8] (9th index bit) | signs[32] | scales[4]
    # same as dequantize_row_iq3_s; t0 = iq3s_grid (4 values an entry)
    t = j // 4
    db = _f16(blk) * (1 + 2 * _scale4(blk, 106, j // 32)).to(tl.float32)
    sign = _sign((_u8(blk + 74 + j // 8) >> (j % 8)) & 1)
    qh = (_u8(blk + 66 + t // 8) >> (t % 8)) & 1
    grid = tl.load(t0 + (_u8(blk + 2 + t) | (qh << 8)) * 4 + j % 4)
    return db * grid * sign


@triton.jit
def deq_iq1_s(blk, j, t0, t1):
    # fp16 d | qs[32] (low 8 index bits) | 8 x uint16 (4 x 3 high index bits, 3-bit scale
    # at 12, delta sign at 15); same as dequantize_row_iq1_s; t0 = iq1s_grid
    qh = _u16(blk + 34 + (j // 32) * 2)
    dl = _f16(blk) * (2 * ((qh >> 12) & 7) + 1).to(tl.float32)
    hi = (qh >> (3 * ((j // 8) % 4))) & 7
    grid = tl.load(t0 + (_u8(blk + 2 + j // 8) | (hi << 8)) * 8 + j % 8)
    return dl * (grid + _iq1_delta(qh & 0x8000))


@triton.jit
def deq_iq1_m(blk, j, t0, t1):
    # qs[32] | qh[16] (3 high index bits + delta flag per nibble) | 4 x uint16 scales whose
    # top nibbles hold the fp16 d; same as dequantize_row_iq1_m; t0 = iq1s_grid
    d_bits = ((_u16(blk + 48) >> 12) | ((_u16(blk + 50) >> 8) & 0x00F0)
              | ((_u16(blk + 52) >> 4) & 0x0F00) | (_u16(blk + 54) & 0xF000))
    d = d_bits.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    u = j // 16
    s3 = (_u16(blk + 48 + (u // 4) * 2) >> (3 * (u % 4))) & 7
    dl = d * (2 * s3 + 1).to(tl.float32)
    t = j // 8
    qh = _u8(blk + 32 + t // 2) >> (4 * (t % 2))
    grid = tl.load(t0 + (_u8(blk + t) | ((qh & 7) << 8)) * 8 + j % 8)
    return dl * (grid + _iq1_delta(qh & 8))


@triton.jit
def deq_iq4_nl(blk, j, t0, t1):
    # fp16 d | 16 bytes of nibbles (element j low, j + 16 high) indexing kvalues_iq4nl
    # same as dequantize_row_iq4_nl; t0 = kvalues
    q = (_u8(blk + 2 + j % 16) >> (4 * (j // 16))) & 15
    return _f16(blk) * tl.load(t0 + q)


@triton.jit
def deq_iq4_xs(blk, j, t0, t1):
    # fp16 d | uint16 scales_h (2 bits x8) | scales_l[4] (4 bits x8) | 8 x 16 bytes nibbles
    # same as dequantize_row_iq4_xs; t0 = kvalues_iq4nl
    ib = j // 32
    sh = (_u16(blk + 2) >> (2 * ib)) & 3
    sc = (_scale4(blk, 4, ib) | (sh << 4)) - 32
    dl = _f16(blk) * sc.to(tl.float32)
    jj = j % 32
    q = (_u8(blk + 8 + ib * 16 + jj % 16) >> (4 * (jj // 16))) & 15
    return dl * tl.load(t0 + q)


# ----------------------------------------------------------------------------- fp4
@triton.jit
def deq_mxfp4(blk, j, t0, t1):
    # e8m0 exponent | 16 bytes of e2m1 nibbles; same as dequantize_row_mxfp4
    # t0 = ggml_e8m0_to_fp32_half per byte value, t1 = kvalues_mxfp4 (doubled e2m1)
    q = (_u8(blk + 1 + j % 16) >> (4 * (j // 16))) & 15
    return tl.load(t0 + _u8(blk)) * tl.load(t1 + q)


@triton.jit
def deq_nvfp4(blk, j, t0, t1):
    # 4 x ue4m3 scales (one per 16 values) | 4 x 8 bytes of e2m1 nibbles
    # t0 = ue4m3 decoding times 0.5 per byte value, t1 = kvalues (doubled e2m1)
    sub = j // 16
    jj = j % 16
    q = (_u8(blk + 4 + sub * 8 + jj % 8) >> (4 * (jj // 8))) & 15
    return tl.load(t0 + _u8(blk + sub)) * tl.load(t1 + q)


# ----------------------------------------------------------------------------- ternary, Q8_K
@triton.jit
def deq_tq1_0(blk, j, t0, t1):
    # qs[48] (5 trits a byte: 32 bytes x 5, then 16 bytes x 5) | qh[4] (4 trits a byte)
    # | fp16 d; same as dequantize_row_tq1_0: trit p of byte b is ((b * 3^p mod 256) * 3)
    # >> 8; t0 = int32 powers of 3
    in_qh = j >= 240
    in_q1 = j >= 160
    off = tl.where(in_qh, 48 + (j - 240) % 4, tl.where(in_q1, 32 + (j - 160) % 16, j % 32))
    p = tl.where(in_qh, (j - 240) // 4, tl.where(in_q1, (j - 160) // 16, j // 32))
    q = (_u8(blk + off) * tl.load(t0 + p)) & 0xFF   # uint8 wrap, as in ggml
    return _f16(blk + 52) * (((q * 3) >> 8) - 1).to(tl.float32)


@triton.jit
def deq_tq2_0(blk, j, t0, t1):
    # qs[64] (2-bit, value + 1; bytes h*32 + i hold elements h*128 + s*32 + i at bits 2s)
    # | fp16 d; same as dequantize_row_tq2_0
    q = (_u8(blk + (j // 128) * 32 + j % 32) >> (2 * ((j // 32) % 4))) & 3
    return _f16(blk + 64) * (q - 1).to(tl.float32)


@triton.jit
def deq_q8_k(blk, j, t0, t1):
    # fp32 d | int8 qs[256] | int16 bsums[16] (unused here); same as dequantize_row_q8_K
    b = _u8(blk + 4 + j)
    return _u32(blk).to(tl.float32, bitcast=True) * (b - ((b & 0x80) << 1)).to(tl.float32)


# ----------------------------------------------------------------------------- kernel
@triton.jit
def _to_bf16_rne(v):
    # fp32 -> bf16 rounded to nearest even by hand: Triton 3.9's interpreter truncates on
    # .to(tl.bfloat16), and torch's .to(torch.bfloat16) (the reference) rounds
    bits = v.to(tl.uint32, bitcast=True)
    r = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    r = tl.where(v != v, (bits >> 16) | 0x40, r)  # NaN stays a (quiet) NaN
    return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def ggml_dequant_kernel(raw_ptr, out_ptr, t0, t1, n_blocks, blocks_per_row, raw_stride,
                        out_stride, DEQ: tl.constexpr, BLOCK: tl.constexpr,
                        TYPE_SIZE: tl.constexpr, SB: tl.constexpr, BF16_OUT: tl.constexpr):
    """SB consecutive blocks (counted across rows) per program: raw [rows, row_bytes]
    uint8 -> out [rows, blocks_per_row * BLOCK]."""
    g = tl.program_id(0) * SB + tl.arange(0, SB)
    valid = g < n_blocks
    g = tl.minimum(g, n_blocks - 1)  # tail programs re-read the last block, store nothing
    row = (g // blocks_per_row).to(tl.int64)
    b = g % blocks_per_row
    blk = raw_ptr + (row * raw_stride + b * TYPE_SIZE)[:, None]
    j = tl.arange(0, BLOCK)[None, :]
    w = DEQ(blk, j, t0, t1)
    dst = out_ptr + (row * out_stride + b * BLOCK)[:, None] + j
    if BF16_OUT:
        tl.store(dst, _to_bf16_rne(w), mask=valid[:, None])
    else:
        tl.store(dst, w.to(out_ptr.dtype.element_ty), mask=valid[:, None])
