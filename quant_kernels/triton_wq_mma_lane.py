"""The lane-scaled slab of ``triton_wq_mma`` (groups of 32 or 64 columns): each lane's 32
columns of a 128-column slab sit in one group, whose scale and bias dequantize that lane's
A fragments before the MMA (``triton_wq_mma_ptx``), instead of scaling the slab's sums.
"""
from __future__ import annotations

import triton.language as tl

from .triton_wq_mma_ptx import (LANE_BF16_1, LANE_BF16_2, LANE_C1, LANE_C2, LANE_F16_1,
                                LANE_F16_2)
from .triton_wq_tile import INTERPRET, device_fn

SLAB_K = 128  # K columns per step of a warp (16 bytes of each row per lane)
SLAB = tl.constexpr(SLAB_K)
# Groups below a slab that take the lane-scaled block: a lane's 32 columns of a slab must
# sit in one group.
LANE_GROUPS = (32, 64)
INTERPRET_C = tl.constexpr(INTERPRET)


@device_fn
def _slab_dot_lane_emulated(qw_ptr, x_ptr, s_ptr, b_ptr, row, m, slab, stride_qn, stride_xm,
                            stride_sn, stride_sg, stride_bn, stride_bg, SMALL_G: tl.constexpr,
                            DTYPE: tl.constexpr):
    """Interpreter path of the lane-scaled block: the slab's dot product of weight row
    ``row``, dequantized per column group and rounded to DTYPE, with activation row ``m``."""
    offs_w = slab[:, None] * (SLAB // 8) + tl.arange(0, SLAB // 8)[None, :]
    words = tl.load(qw_ptr + row[:, None] * stride_qn + offs_w)
    q = (words[:, :, None] >> (4 * tl.arange(0, 8))[None, None, :]) & 15
    q = tl.reshape(q, [q.shape[0], SLAB]).to(tl.float32)
    cols = slab[:, None] * SLAB + tl.arange(0, SLAB)[None, :]
    g = cols // SMALL_G
    sc = tl.load(s_ptr + row[:, None] * stride_sn + g * stride_sg).to(tl.float32)
    bi = tl.load(b_ptr + row[:, None] * stride_bn + g * stride_bg).to(tl.float32)
    w = (q * sc + bi).to(DTYPE).to(tl.float32)
    x = tl.load(x_ptr + m[:, None] * stride_xm + cols).to(tl.float32)
    return tl.sum(w * x, axis=1)


@device_fn
def _pair(v, DTYPE: tl.constexpr):
    """A 16-bit value twice in one 32-bit register (the f16x2 / bf16x2 operand)."""
    h = v.to(DTYPE).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return h | (h << 16)


@device_fn
def slab_lane_scaled(a0, a1, a2, a3, a4, a5, a6, a7, w0, w1, w2, w3, w4, w5, w6, w7,
                      qw_ptr, x_ptr, s_ptr, b_ptr, xa0, xa1, lane, q, ld_lo, ld_hi, slab,
                      valid, M, stride_qn, stride_xm, stride_sn, stride_sg, stride_bn,
                      stride_bg, SMALL_G: tl.constexpr, MB: tl.constexpr,
                      DTYPE: tl.constexpr):
    """One 128-column slab with groups of SMALL_G (32 or 64) columns: each lane's 32
    columns sit in one group, whose scale and bias go into its A fragments."""
    if INTERPRET_C:
        c2 = 2 * q
        args = (stride_qn, stride_xm, stride_sn, stride_sg, stride_bn, stride_bg, SMALL_G,
                DTYPE)
        d0 = _slab_dot_lane_emulated(qw_ptr, x_ptr, s_ptr, b_ptr, ld_lo,
                                     tl.minimum(c2, M - 1), slab, *args)
        d1 = _slab_dot_lane_emulated(qw_ptr, x_ptr, s_ptr, b_ptr, ld_lo,
                                     tl.minimum(c2 + 1, M - 1), slab, *args)
        d2 = _slab_dot_lane_emulated(qw_ptr, x_ptr, s_ptr, b_ptr, ld_hi,
                                     tl.minimum(c2, M - 1), slab, *args)
        d3 = _slab_dot_lane_emulated(qw_ptr, x_ptr, s_ptr, b_ptr, ld_hi,
                                     tl.minimum(c2 + 1, M - 1), slab, *args)
        d4, d5, d6, d7 = d0, d1, d2, d3  # unused unless MB == 2
        if MB == 2:
            d4 = _slab_dot_lane_emulated(qw_ptr, x_ptr, s_ptr, b_ptr, ld_lo,
                                         tl.minimum(c2 + 8, M - 1), slab, *args)
            d5 = _slab_dot_lane_emulated(qw_ptr, x_ptr, s_ptr, b_ptr, ld_lo,
                                         tl.minimum(c2 + 9, M - 1), slab, *args)
            d6 = _slab_dot_lane_emulated(qw_ptr, x_ptr, s_ptr, b_ptr, ld_hi,
                                         tl.minimum(c2 + 8, M - 1), slab, *args)
            d7 = _slab_dot_lane_emulated(qw_ptr, x_ptr, s_ptr, b_ptr, ld_hi,
                                         tl.minimum(c2 + 9, M - 1), slab, *args)
    else:
        g = (slab * SLAB + 32 * q) // SMALL_G  # this lane's columns' group
        s_lo = _pair(tl.load(s_ptr + ld_lo * stride_sn + g * stride_sg), DTYPE)
        s_hi = _pair(tl.load(s_ptr + ld_hi * stride_sn + g * stride_sg), DTYPE)
        b_lo = _pair(tl.load(b_ptr + ld_lo * stride_bn + g * stride_bg), DTYPE)
        b_hi = _pair(tl.load(b_ptr + ld_hi * stride_bn + g * stride_bg), DTYPE)
        xo = slab.to(tl.int64) * (SLAB * 2)
        if MB == 1:
            if DTYPE == tl.bfloat16:
                d0, d1, d2, d3 = tl.inline_asm_elementwise(
                    LANE_BF16_1, LANE_C1, [w0, w1, w2, w3, w4, w5, w6, w7, xa0 + xo, s_lo,
                                           s_hi, b_lo, b_hi, lane],
                    dtype=(tl.float32,) * 4, is_pure=True, pack=1)
            else:
                d0, d1, d2, d3 = tl.inline_asm_elementwise(
                    LANE_F16_1, LANE_C1, [w0, w1, w2, w3, w4, w5, w6, w7, xa0 + xo, s_lo,
                                          s_hi, b_lo, b_hi, lane],
                    dtype=(tl.float32,) * 4, is_pure=True, pack=1)
            d4, d5, d6, d7 = d0, d1, d2, d3  # unused (MB == 1)
        else:
            if DTYPE == tl.bfloat16:
                d0, d1, d2, d3, d4, d5, d6, d7 = tl.inline_asm_elementwise(
                    LANE_BF16_2, LANE_C2, [w0, w1, w2, w3, w4, w5, w6, w7, xa0 + xo,
                                           xa1 + xo, s_lo, s_hi, b_lo, b_hi, lane],
                    dtype=(tl.float32,) * 8, is_pure=True, pack=1)
            else:
                d0, d1, d2, d3, d4, d5, d6, d7 = tl.inline_asm_elementwise(
                    LANE_F16_2, LANE_C2, [w0, w1, w2, w3, w4, w5, w6, w7, xa0 + xo,
                                          xa1 + xo, s_lo, s_hi, b_lo, b_hi, lane],
                    dtype=(tl.float32,) * 8, is_pure=True, pack=1)
    a0 += tl.where(valid, d0, 0.0)
    a1 += tl.where(valid, d1, 0.0)
    a2 += tl.where(valid, d2, 0.0)
    a3 += tl.where(valid, d3, 0.0)
    if MB == 2:
        a4 += tl.where(valid, d4, 0.0)
        a5 += tl.where(valid, d5, 0.0)
        a6 += tl.where(valid, d6, 0.0)
        a7 += tl.where(valid, d7, 0.0)
    return a0, a1, a2, a3, a4, a5, a6, a7
