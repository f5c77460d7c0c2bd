"""The lane-scaled slab of ``triton_wq_mma`` (groups of 32 or 64 columns): each lane's run
of a slab (32 columns at 4 bits, 16 at 8 bits) sits in one group, whose scale and bias
dequantize that lane's A fragments before the MMA (``triton_wq_mma_ptx``), instead of
scaling the slab's sums.  Also the slab geometry both slab kinds share.
"""
from __future__ import annotations

import triton.language as tl

from .triton_wq_tile import INTERPRET, device_fn

# Bytes of one weight row per slab: 16 per lane, 4 lanes per row (128 columns at 4 bits,
# 64 at 8 bits).
SLAB_BYTES = tl.constexpr(64)
INTERPRET_C = tl.constexpr(INTERPRET)


def slab_columns(bits: int) -> int:
    return SLAB_BYTES.value * 8 // bits


def lane_groups(bits: int) -> tuple[int, ...]:
    """Groups smaller than a slab that the lane-scaled block takes (a lane's run of
    columns must sit in one group)."""
    return (32, 64) if bits == 4 else (32,)


@device_fn
def _slab_values(qw_ptr, row, slab, stride_qn, BITS: tl.constexpr):
    """Interpreter path: the integer values [rows, SLAB] of weight rows ``row`` in ``slab``
    (fp32) and their column indices."""
    SLAB: tl.constexpr = SLAB_BYTES * 8 // BITS
    PER: tl.constexpr = 32 // BITS
    offs_w = slab[:, None] * (SLAB_BYTES // 4) + tl.arange(0, SLAB_BYTES // 4)[None, :]
    words = tl.load(qw_ptr + row[:, None] * stride_qn + offs_w)
    q = (words[:, :, None] >> (BITS * tl.arange(0, PER))[None, None, :]) & ((1 << BITS) - 1)
    q = tl.reshape(q, [q.shape[0], SLAB]).to(tl.float32)
    cols = slab[:, None] * SLAB + tl.arange(0, SLAB)[None, :]
    return q, cols


@device_fn
def _dot_emulated(qw_ptr, x_ptr, s_ptr, b_ptr, row, m, slab, stride_qn, stride_xm, stride_sn,
                  stride_sg, stride_bn, stride_bg, SMALL_G: tl.constexpr, BITS: tl.constexpr):
    """Interpreter path: the slab's dot product of weight row ``row`` with activation row
    ``m`` and the activations' sum, from plain loads in fp32 -- of the integers ``q``
    (slab-scaled, SMALL_G 0) or of the weights dequantized per column group and rounded
    to x's dtype (lane-scaled)."""
    q, cols = _slab_values(qw_ptr, row, slab, stride_qn, BITS)
    if SMALL_G > 0:
        g = cols // SMALL_G
        sc = tl.load(s_ptr + row[:, None] * stride_sn + g * stride_sg).to(tl.float32)
        bi = tl.load(b_ptr + row[:, None] * stride_bn + g * stride_bg).to(tl.float32)
        q = (q * sc + bi).to(x_ptr.dtype.element_ty).to(tl.float32)
    x = tl.load(x_ptr + m[:, None] * stride_xm + cols).to(tl.float32)
    return tl.sum(q * x, axis=1), tl.sum(x, axis=1)


@device_fn
def emulate_fragments(qw_ptr, x_ptr, s_ptr, b_ptr, q, ld_lo, ld_hi, slab, M, stride_qn,
                      stride_xm, stride_sn, stride_sg, stride_bn, stride_bg,
                      SMALL_G: tl.constexpr, MB: tl.constexpr, BITS: tl.constexpr):
    """Interpreter path: what a slab's PTX block returns lane-wise -- D fragments d0..d7
    (rows r / r + 8, activation rows 2q, 2q+1, and with MB == 2 also 2q+8, 2q+9) and the
    activation sums x0..x3 -- with the same indexing, from plain loads."""
    c2 = 2 * q
    args = (stride_qn, stride_xm, stride_sn, stride_sg, stride_bn, stride_bg, SMALL_G, BITS)
    d0, x0 = _dot_emulated(qw_ptr, x_ptr, s_ptr, b_ptr, ld_lo, tl.minimum(c2, M - 1), slab,
                           *args)
    d1, x1 = _dot_emulated(qw_ptr, x_ptr, s_ptr, b_ptr, ld_lo, tl.minimum(c2 + 1, M - 1),
                           slab, *args)
    d2, _x = _dot_emulated(qw_ptr, x_ptr, s_ptr, b_ptr, ld_hi, tl.minimum(c2, M - 1), slab,
                           *args)
    d3, _x = _dot_emulated(qw_ptr, x_ptr, s_ptr, b_ptr, ld_hi, tl.minimum(c2 + 1, M - 1),
                           slab, *args)
    d4, d5, d6, d7, x2, x3 = d0, d1, d2, d3, x0, x1  # unused unless MB == 2
    if MB == 2:
        d4, x2 = _dot_emulated(qw_ptr, x_ptr, s_ptr, b_ptr, ld_lo, tl.minimum(c2 + 8, M - 1),
                               slab, *args)
        d5, x3 = _dot_emulated(qw_ptr, x_ptr, s_ptr, b_ptr, ld_lo, tl.minimum(c2 + 9, M - 1),
                               slab, *args)
        d6, _x = _dot_emulated(qw_ptr, x_ptr, s_ptr, b_ptr, ld_hi, tl.minimum(c2 + 8, M - 1),
                               slab, *args)
        d7, _x = _dot_emulated(qw_ptr, x_ptr, s_ptr, b_ptr, ld_hi, tl.minimum(c2 + 9, M - 1),
                               slab, *args)
    return d0, d1, d2, d3, d4, d5, d6, d7, x0, x1, x2, x3


@device_fn
def _pair(v, DTYPE: tl.constexpr):
    """A 16-bit value twice in one 32-bit register (the f16x2 / bf16x2 operand)."""
    h = v.to(DTYPE).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return h | (h << 16)


@device_fn
def slab_scales_lane(s_ptr, b_ptr, q, ld_lo, ld_hi, slab, stride_sn, stride_sg, stride_bn,
                     stride_bg, SMALL_G: tl.constexpr, BITS: tl.constexpr):
    """This lane's group's scale and bias of rows r / r + 8 in ``slab``, each twice in one
    register (the f16x2 / bf16x2 operands of the lane-scaled PTX block)."""
    SLAB: tl.constexpr = SLAB_BYTES * 8 // BITS
    DTYPE: tl.constexpr = s_ptr.dtype.element_ty  # scales are in x's dtype (can_run)
    g = (slab * SLAB + (SLAB // 4) * q) // SMALL_G  # this lane's columns' group
    s_lo = _pair(tl.load(s_ptr + ld_lo * stride_sn + g * stride_sg), DTYPE)
    s_hi = _pair(tl.load(s_ptr + ld_hi * stride_sn + g * stride_sg), DTYPE)
    b_lo = _pair(tl.load(b_ptr + ld_lo * stride_bn + g * stride_bg), DTYPE)
    b_hi = _pair(tl.load(b_ptr + ld_hi * stride_bn + g * stride_bg), DTYPE)
    return s_lo, s_hi, b_lo, b_hi


@device_fn
def slab_lane_scaled(a0, a1, a2, a3, a4, a5, a6, a7, w0, w1, w2, w3, w4, w5, w6, w7,
                     s_lo, s_hi, b_lo, b_hi,
                     qw_ptr, x_ptr, s_ptr, b_ptr, xa0, xa1, lane, q, ld_lo, ld_hi, slab,
                     valid, M, stride_qn, stride_xm, stride_sn, stride_sg, stride_bn,
                     stride_bg, SMALL_G: tl.constexpr, MB: tl.constexpr, BITS: tl.constexpr,
                     ASM: tl.constexpr, ASM_C: tl.constexpr):
    """One slab with groups of SMALL_G (32 or 64) columns: each lane's run sits in one
    group, whose scale and bias (``slab_scales_lane``, loaded ahead) go into its A
    fragments."""
    SLAB: tl.constexpr = SLAB_BYTES * 8 // BITS
    if INTERPRET_C:
        d0, d1, d2, d3, d4, d5, d6, d7, _x0, _x1, _x2, _x3 = emulate_fragments(
            qw_ptr, x_ptr, s_ptr, b_ptr, q, ld_lo, ld_hi, slab, M, stride_qn, stride_xm,
            stride_sn, stride_sg, stride_bn, stride_bg, SMALL_G, MB, BITS)
    else:
        xo = slab.to(tl.int64) * (SLAB * 2)
        if MB == 1:
            d0, d1, d2, d3 = tl.inline_asm_elementwise(
                ASM, ASM_C, [w0, w1, w2, w3, w4, w5, w6, w7, xa0 + xo, s_lo, s_hi, b_lo,
                             b_hi, lane], dtype=(tl.float32,) * 4, is_pure=True, pack=1)
            d4, d5, d6, d7 = d0, d1, d2, d3  # unused (MB == 1)
        else:
            d0, d1, d2, d3, d4, d5, d6, d7 = tl.inline_asm_elementwise(
                ASM, ASM_C, [w0, w1, w2, w3, w4, w5, w6, w7, xa0 + xo, xa1 + xo, s_lo, s_hi,
                             b_lo, b_hi, lane], dtype=(tl.float32,) * 8, is_pure=True, pack=1)
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
