"""Decode kernel (M <= 16) for 4- and 8-bit ``WQWeight`` on tensor cores: ``mma.sync`` with
the weights as the A operand, straight from the common layout (no repack).  Described
below for 4 bits; 8-bit words hold 4 columns, so a slab is 64 columns, a lane's run 16
and a slab 4 MMAs (``triton_wq_mma_ptx``).

The packed-half kernel (``triton_wq_gemv1``) does every multiply-add on the SM's FMA
pipes: ~35 instructions per packed word, so it is half issue-bound at M = 1 and its cost
grows with M.  Here the FMA pipes only unpack and the tensor cores do the dot products:

* a warp owns 16-row weight tiles; per 128-column slab of K, lane ``(r, q)`` (``r =
  lane / 4``, ``q = lane % 4``) loads 16 bytes of row ``r`` and 16 of row ``r + 8``
  (words ``4q .. 4q+3`` of the slab: K columns ``32q .. 32q+31``) and the activations of
  the same 32 columns (64 bytes per activation row);
* ``mma.m16n8k16`` sums over its 16 "logical" K indices in any order, so each lane's
  physical columns can be its own: logical pair ``(2q, 2q+1)`` of chunk ``t`` is physical
  ``32q + 4t + (0, 1)``, and ``(2q+8, 2q+9)`` is ``32q + 4t + (2, 3)``.  Then the A
  fragment is byte ``2h`` / ``2h + 1`` (``t = 2j + h``) of word ``j`` of rows ``r`` and
  ``r + 8`` -- the ``prmt`` + ``lop3`` magic-number unpack of ``wq_layout`` gives exactly
  those pairs -- and the B fragment is two consecutive int32 of the activations as loaded;
* per unpacked pair: ``prmt``, ``lop3``, one exact packed subtract (``q`` itself, so the
  tensor cores sum exact products ``q * x`` in fp32); ~13 instructions per word;
* scales and biases are applied per slab in fp32 to the MMA results: ``acc += s * D +
  b * X``, where ``X`` (the slab's activation sums) comes from one more MMA with an
  all-ones A.  So any group that is a multiple of 128 (or per-channel) works;  groups of
  32 or 64 (GGUF Q4_0/Q4_1, HQQ) instead dequantize the A fragments with each lane's own
  scale and bias (``triton_wq_mma_ptx``: "lane-scaled");
* activation rows are the MMA's N dimension: 8 per MMA (``MB`` = 1 for M <= 8, 2 up to 16),
  so M = 1..16 cost nearly the same;
* the warps of a program split its K range; their partial sums meet in one reduction.

``TRITON_INTERPRET=1`` cannot run PTX: there each lane's fragment values are computed
from plain loads in fp32 (same indexing, splitting, reduction and stores; the PTX is
checked by the GPU tests).
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .triton_wq_tile import INTERPRET, autotune_kwargs, device_fn, launch_tuned
from .triton_wq_mma_lane import (SLAB_BYTES, emulate_fragments, lane_groups, slab_columns,
                                 slab_lane_scaled, slab_scales_lane)
from .triton_wq_mma_ptx import (ASM_LOAD1, ASM_LOAD2, C_LOAD1, C_LOAD2, ptx_block,
                                ptx_constraints)
from .wq_layout import WQWeight

MAX_M = 16  # activation rows: two 8-column MMA blocks


# ----------------------------------------------------------------------------- kernel
@device_fn
def _apply(acc, valid, s, b, d, xs):
    return acc + tl.where(valid, s * d + b * xs, 0.0)


@device_fn
def _store_frag(out_ptr, acc, WARPS: tl.constexpr, m, n, M, N, stride_om, stride_on):
    total = tl.sum(tl.reshape(acc, [WARPS, 32]), axis=0)
    tl.store(out_ptr + m * stride_om + n * stride_on, total.to(out_ptr.dtype.element_ty),
             mask=(m < M) & (n < N))


@device_fn
def _load_words(wq_lo, wq_hi, sa, sb):
    """Words of slabs sa and sb (int64), rows r and r + 8: 16 per lane, 4 loads in flight."""
    return tl.inline_asm_elementwise(
        ASM_LOAD2, C_LOAD2,
        [wq_lo + sa * SLAB_BYTES, wq_hi + sa * SLAB_BYTES,
         wq_lo + sb * SLAB_BYTES, wq_hi + sb * SLAB_BYTES],
        dtype=(tl.int32,) * 16, is_pure=True, pack=1)


@device_fn
def _load_words1(wq_lo, wq_hi, sa):
    """Words of slab sa (int64), rows r and r + 8: 8 per lane, 2 loads in flight."""
    return tl.inline_asm_elementwise(
        ASM_LOAD1, C_LOAD1, [wq_lo + sa * SLAB_BYTES, wq_hi + sa * SLAB_BYTES],
        dtype=(tl.int32,) * 8, is_pure=True, pack=1)


@device_fn
def _slab_scaled(a0, a1, a2, a3, a4, a5, a6, a7, w0, w1, w2, w3, w4, w5, w6, w7,
                 s_lo, s_hi, b_lo, b_hi,
                 qw_ptr, x_ptr, s_ptr, b_ptr, xa0, xa1, lane, q, ld_lo, ld_hi, slab, valid, M,
                 stride_qn, stride_xm, stride_sn, stride_sg, stride_bn, stride_bg,
                 GS: tl.constexpr, MB: tl.constexpr, BITS: tl.constexpr, ASM: tl.constexpr,
                 ASM_C: tl.constexpr):
    """One slab, groups of whole slabs (or per-channel): the 16 x (8 MB) MMA block of this
    warp's rows, scaled per slab (``_scales``) and added to the accumulators (where
    ``valid``)."""
    if INTERPRET_C:
        d0, d1, d2, d3, d4, d5, d6, d7, x0, x1, x2, x3 = emulate_fragments(
            qw_ptr, x_ptr, s_ptr, b_ptr, q, ld_lo, ld_hi, slab, M, stride_qn, stride_xm,
            stride_sn, stride_sg, stride_bn, stride_bg, 0, MB, BITS)
    else:
        xo = slab.to(tl.int64) * (SLAB_BYTES * 16 // BITS)  # activation bytes per slab
        if MB == 1:
            d0, d1, d2, d3, x0, x1 = tl.inline_asm_elementwise(
                ASM, ASM_C, [w0, w1, w2, w3, w4, w5, w6, w7, xa0 + xo, lane],
                dtype=(tl.float32,) * 6, is_pure=True, pack=1)
            d4, d5, d6, d7, x2, x3 = d0, d1, d2, d3, x0, x1  # unused (MB == 1)
        else:
            d0, d1, d2, d3, d4, d5, d6, d7, x0, x1, x2, x3 = tl.inline_asm_elementwise(
                ASM, ASM_C, [w0, w1, w2, w3, w4, w5, w6, w7, xa0 + xo, xa1 + xo, lane],
                dtype=(tl.float32,) * 12, is_pure=True, pack=1)
    a0 = _apply(a0, valid, s_lo, b_lo, d0, x0)
    a1 = _apply(a1, valid, s_lo, b_lo, d1, x1)
    a2 = _apply(a2, valid, s_hi, b_hi, d2, x0)
    a3 = _apply(a3, valid, s_hi, b_hi, d3, x1)
    if MB == 2:
        a4 = _apply(a4, valid, s_lo, b_lo, d4, x2)
        a5 = _apply(a5, valid, s_lo, b_lo, d5, x3)
        a6 = _apply(a6, valid, s_hi, b_hi, d6, x2)
        a7 = _apply(a7, valid, s_hi, b_hi, d7, x3)
    return a0, a1, a2, a3, a4, a5, a6, a7


@device_fn
def _slab(a0, a1, a2, a3, a4, a5, a6, a7, w0, w1, w2, w3, w4, w5, w6, w7,
          sc, qw_ptr, x_ptr, s_ptr, b_ptr, xa0, xa1, lane, q, ld_lo, ld_hi, slab, valid, M,
          stride_qn, stride_xm, stride_sn, stride_sg, stride_bn, stride_bg,
          GS: tl.constexpr, MB: tl.constexpr, BITS: tl.constexpr, SMALL_G: tl.constexpr,
          ASM: tl.constexpr, ASM_C: tl.constexpr):
    """One 128-column slab of this warp's rows into the accumulators; ``sc`` is the slab's
    (s_lo, s_hi, b_lo, b_hi) from ``_scales``."""
    s_lo, s_hi, b_lo, b_hi = sc
    if SMALL_G > 0:
        a0, a1, a2, a3, a4, a5, a6, a7 = slab_lane_scaled(
            a0, a1, a2, a3, a4, a5, a6, a7, w0, w1, w2, w3, w4, w5, w6, w7, s_lo, s_hi,
            b_lo, b_hi, qw_ptr, x_ptr, s_ptr, b_ptr, xa0, xa1, lane, q, ld_lo, ld_hi, slab,
            valid, M, stride_qn, stride_xm, stride_sn, stride_sg, stride_bn, stride_bg,
            SMALL_G, MB, BITS, ASM, ASM_C)
    else:
        a0, a1, a2, a3, a4, a5, a6, a7 = _slab_scaled(
            a0, a1, a2, a3, a4, a5, a6, a7, w0, w1, w2, w3, w4, w5, w6, w7, s_lo, s_hi,
            b_lo, b_hi, qw_ptr, x_ptr, s_ptr, b_ptr, xa0, xa1, lane, q, ld_lo, ld_hi, slab,
            valid, M, stride_qn, stride_xm, stride_sn, stride_sg, stride_bn, stride_bg, GS,
            MB, BITS, ASM, ASM_C)
    return a0, a1, a2, a3, a4, a5, a6, a7


@device_fn
def _scales(s_ptr, b_ptr, q, ld_lo, ld_hi, slab, stride_sn, stride_sg, stride_bn, stride_bg,
            GS: tl.constexpr, SMALL_G: tl.constexpr, BITS: tl.constexpr):
    """Scales and biases of rows r / r + 8 for one slab: fp32 for the slab-scaled block,
    packed pairs for the lane-scaled one.  Each slab's group is a fresh 32-byte sector of
    a group-major table, i.e. a DRAM round trip; the kernel's SCALES_AHEAD says whether it
    is issued an iteration ahead, with the words."""
    if SMALL_G > 0:
        s_lo, s_hi, b_lo, b_hi = slab_scales_lane(s_ptr, b_ptr, q, ld_lo, ld_hi, slab,
                                                  stride_sn, stride_sg, stride_bn, stride_bg,
                                                  SMALL_G, BITS)
    else:
        if GS == 0:
            g = 0
        else:
            g = slab // GS
        s_lo = tl.load(s_ptr + ld_lo * stride_sn + g * stride_sg).to(tl.float32)
        s_hi = tl.load(s_ptr + ld_hi * stride_sn + g * stride_sg).to(tl.float32)
        b_lo = tl.load(b_ptr + ld_lo * stride_bn + g * stride_bg).to(tl.float32)
        b_hi = tl.load(b_ptr + ld_hi * stride_bn + g * stride_bg).to(tl.float32)
    return s_lo, s_hi, b_lo, b_hi


@triton.jit(do_not_specialize=["M", "N"])
def _wq_mma_kernel(
    # activations [M, K] (rows 16-byte aligned), packed 4-bit weight [N, K / 8] (rows
    # 16-byte aligned), scales/bias [N, Gn], output [M, N]
    x_ptr, qw_ptr, s_ptr, b_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_qn, stride_sn, stride_sg, stride_bn, stride_bg, stride_om, stride_on,
    # GS: slabs per scale group (0: one group, per-channel); MB: 8-row blocks of
    # activations (1: M <= 8, 2: M <= 16); WARPS (= num_warps) split K
    GS: tl.constexpr, MB: tl.constexpr, WARPS: tl.constexpr,
    # slabs per loop iteration (1 or 2; the next iteration's are loaded meanwhile): two
    # keep more bytes in flight, one needs fewer registers (more programs per SM)
    PAIR: tl.constexpr = 2,
    # groups of 32 or 64 columns (0: GS applies): scales go into the A fragments
    SMALL_G: tl.constexpr = 0,
    # 4 or 8; the slab's PTX block (triton_wq_mma_ptx.ptx_block) and its constraints
    BITS: tl.constexpr = 4, ASM: tl.constexpr = "", ASM_C: tl.constexpr = "",
    # 1: scales and biases are loaded an iteration ahead, with the words (``_scales``);
    # 0: in the iteration that uses them.  mma_matmul sets 1 for the lane-scaled block,
    # whose A fragments need them before any MMA, 0 for the slab-scaled one, which
    # applies them after the slab's MMAs (so their latency is hidden and ahead they only
    # hold registers); measured both ways in BENCHMARKS.md
    SCALES_AHEAD: tl.constexpr = 0,
    # PAIR == 1 only: slabs whose words are in flight while one is computed (1..3)
    DEPTH: tl.constexpr = 1,
):
    pid = tl.program_id(0)
    idx = tl.arange(0, 32 * WARPS)
    lane = idx % 32
    warp = idx // 32
    r = lane // 4
    q = lane % 4
    ld_lo = tl.minimum(pid * 16 + r, N - 1)       # weight rows r and r + 8 (clamped)
    ld_hi = tl.minimum(pid * 16 + r + 8, N - 1)
    m0 = tl.minimum(r, M - 1)                     # activation rows of the B fragments
    m1 = tl.minimum(r + 8, M - 1)
    SLAB: tl.constexpr = SLAB_BYTES * 8 // BITS  # columns per slab: 128 (4-bit), 64 (8-bit)
    n_slabs = K // SLAB
    # each warp takes a run of slabs, PAIR per iteration
    per_warp = tl.cdiv(tl.cdiv(n_slabs, WARPS), PAIR) * PAIR
    first = warp * per_warp
    end = tl.minimum(first + per_warp, n_slabs)
    last = n_slabs - 1

    a0 = tl.zeros([32 * WARPS], dtype=tl.float32)
    a1 = tl.zeros_like(a0)
    a2 = tl.zeros_like(a0)
    a3 = tl.zeros_like(a0)
    a4 = tl.zeros_like(a0)
    a5 = tl.zeros_like(a0)
    a6 = tl.zeros_like(a0)
    a7 = tl.zeros_like(a0)
    wq_lo = lane  # placeholders for the interpreter, which loads inside _slab
    wq_hi = lane
    xa0 = lane
    xa1 = lane
    w0, w1, w2, w3, w4, w5, w6, w7 = lane, lane, lane, lane, lane, lane, lane, lane
    w8, w9, w10, w11, w12, w13, w14, w15 = lane, lane, lane, lane, lane, lane, lane, lane
    if not INTERPRET_C:
        # byte addresses of this lane's 16 bytes of rows r and r + 8 in slab 0, and of
        # its 64 bytes of activation rows m0 / m1
        wq_lo = (qw_ptr + ld_lo * stride_qn + 4 * q).to(tl.int64, bitcast=True)
        wq_hi = (qw_ptr + ld_hi * stride_qn + 4 * q).to(tl.int64, bitcast=True)
        xa0 = (x_ptr + m0 * stride_xm + (SLAB // 4) * q).to(tl.int64, bitcast=True)
        xa1 = (x_ptr + m1 * stride_xm + (SLAB // 4) * q).to(tl.int64, bitcast=True)
    # the first iteration's words and scales; each iteration loads the next one's
    sc0 = _scales(s_ptr, b_ptr, q, ld_lo, ld_hi, tl.minimum(first, last),
                  stride_sn, stride_sg, stride_bn, stride_bg, GS, SMALL_G, BITS)
    sc1 = sc0
    if PAIR == 2:
        sc1 = _scales(s_ptr, b_ptr, q, ld_lo, ld_hi, tl.minimum(first + 1, last),
                      stride_sn, stride_sg, stride_bn, stride_bg, GS, SMALL_G, BITS)
        if not INTERPRET_C:
            (w0, w1, w2, w3, w4, w5, w6, w7, w8, w9, w10, w11, w12, w13, w14,
             w15) = _load_words(wq_lo, wq_hi, tl.minimum(first, last).to(tl.int64),
                                tl.minimum(first + 1, last).to(tl.int64))
    else:
        # PAIR == 1: DEPTH slabs in flight; the slabs after the first in n*/nn* (and scn,
        # scnn), shifted down each iteration
        scn = sc0
        scnn = sc0
        n0, n1, n2, n3, n4, n5, n6, n7 = w0, w1, w2, w3, w4, w5, w6, w7
        nn0, nn1, nn2, nn3, nn4, nn5, nn6, nn7 = w0, w1, w2, w3, w4, w5, w6, w7
        if DEPTH >= 2 and SCALES_AHEAD:
            scn = _scales(s_ptr, b_ptr, q, ld_lo, ld_hi, tl.minimum(first + 1, last),
                          stride_sn, stride_sg, stride_bn, stride_bg, GS, SMALL_G, BITS)
        if DEPTH >= 3 and SCALES_AHEAD:
            scnn = _scales(s_ptr, b_ptr, q, ld_lo, ld_hi, tl.minimum(first + 2, last),
                           stride_sn, stride_sg, stride_bn, stride_bg, GS, SMALL_G, BITS)
        if not INTERPRET_C:
            w0, w1, w2, w3, w4, w5, w6, w7 = _load_words1(
                wq_lo, wq_hi, tl.minimum(first, last).to(tl.int64))
            if DEPTH >= 2:
                n0, n1, n2, n3, n4, n5, n6, n7 = _load_words1(
                    wq_lo, wq_hi, tl.minimum(first + 1, last).to(tl.int64))
            if DEPTH >= 3:
                nn0, nn1, nn2, nn3, nn4, nn5, nn6, nn7 = _load_words1(
                    wq_lo, wq_hi, tl.minimum(first + 2, last).to(tl.int64))
    for it in range(0, per_warp // PAIR):
        sa = first + PAIR * it
        if SCALES_AHEAD == 0:
            sc0 = _scales(s_ptr, b_ptr, q, ld_lo, ld_hi, tl.minimum(sa, last),
                          stride_sn, stride_sg, stride_bn, stride_bg, GS, SMALL_G, BITS)
            if PAIR == 2:
                sc1 = _scales(s_ptr, b_ptr, q, ld_lo, ld_hi, tl.minimum(sa + 1, last),
                              stride_sn, stride_sg, stride_bn, stride_bg, GS, SMALL_G, BITS)
        if PAIR == 1:
            fetch = tl.minimum(sa + DEPTH, last)  # the slab DEPTH iterations ahead
            nsc = sc0
            if SCALES_AHEAD:
                nsc = _scales(s_ptr, b_ptr, q, ld_lo, ld_hi, fetch, stride_sn, stride_sg,
                              stride_bn, stride_bg, GS, SMALL_G, BITS)
            f0, f1, f2, f3, f4, f5, f6, f7 = w0, w1, w2, w3, w4, w5, w6, w7
            if not INTERPRET_C:
                f0, f1, f2, f3, f4, f5, f6, f7 = _load_words1(
                    wq_lo, wq_hi, fetch.to(tl.int64))
            a0, a1, a2, a3, a4, a5, a6, a7 = _slab(
                a0, a1, a2, a3, a4, a5, a6, a7, w0, w1, w2, w3, w4, w5, w6, w7, sc0,
                qw_ptr, x_ptr, s_ptr, b_ptr, xa0, xa1, lane, q, ld_lo, ld_hi,
                tl.minimum(sa, last), sa < end, M, stride_qn, stride_xm, stride_sn,
                stride_sg, stride_bn, stride_bg, GS, MB, BITS, SMALL_G, ASM, ASM_C)
            if DEPTH == 1:
                sc0 = nsc
                w0, w1, w2, w3, w4, w5, w6, w7 = f0, f1, f2, f3, f4, f5, f6, f7
            elif DEPTH == 2:
                sc0 = scn
                scn = nsc
                w0, w1, w2, w3, w4, w5, w6, w7 = n0, n1, n2, n3, n4, n5, n6, n7
                n0, n1, n2, n3, n4, n5, n6, n7 = f0, f1, f2, f3, f4, f5, f6, f7
            else:
                sc0 = scn
                scn = scnn
                scnn = nsc
                w0, w1, w2, w3, w4, w5, w6, w7 = n0, n1, n2, n3, n4, n5, n6, n7
                n0, n1, n2, n3, n4, n5, n6, n7 = nn0, nn1, nn2, nn3, nn4, nn5, nn6, nn7
                nn0, nn1, nn2, nn3, nn4, nn5, nn6, nn7 = f0, f1, f2, f3, f4, f5, f6, f7
        else:
            sb = sa + 1
            # the next pair's scales and words (clamped: never past the weight's last slab)
            nsc0 = sc0
            nsc1 = sc1
            if SCALES_AHEAD:
                nsc0 = _scales(s_ptr, b_ptr, q, ld_lo, ld_hi, tl.minimum(sa + 2, last),
                               stride_sn, stride_sg, stride_bn, stride_bg, GS, SMALL_G, BITS)
                nsc1 = _scales(s_ptr, b_ptr, q, ld_lo, ld_hi, tl.minimum(sa + 3, last),
                               stride_sn, stride_sg, stride_bn, stride_bg, GS, SMALL_G, BITS)
            if not INTERPRET_C:
                (n0, n1, n2, n3, n4, n5, n6, n7, n8, n9, n10, n11, n12, n13, n14,
                 n15) = _load_words(wq_lo, wq_hi, tl.minimum(sa + 2, last).to(tl.int64),
                                    tl.minimum(sa + 3, last).to(tl.int64))
            a0, a1, a2, a3, a4, a5, a6, a7 = _slab(
                a0, a1, a2, a3, a4, a5, a6, a7, w0, w1, w2, w3, w4, w5, w6, w7, sc0,
                qw_ptr, x_ptr, s_ptr, b_ptr, xa0, xa1, lane, q, ld_lo, ld_hi,
                tl.minimum(sa, last), sa < end, M, stride_qn, stride_xm, stride_sn, stride_sg,
                stride_bn, stride_bg, GS, MB, BITS, SMALL_G, ASM, ASM_C)
            a0, a1, a2, a3, a4, a5, a6, a7 = _slab(
                a0, a1, a2, a3, a4, a5, a6, a7, w8, w9, w10, w11, w12, w13, w14, w15, sc1,
                qw_ptr, x_ptr, s_ptr, b_ptr, xa0, xa1, lane, q, ld_lo, ld_hi,
                tl.minimum(sb, last), sb < end, M, stride_qn, stride_xm, stride_sn, stride_sg,
                stride_bn, stride_bg, GS, MB, BITS, SMALL_G, ASM, ASM_C)
            sc0 = nsc0
            sc1 = nsc1
            if not INTERPRET_C:
                w0, w1, w2, w3, w4, w5, w6, w7 = n0, n1, n2, n3, n4, n5, n6, n7
                w8, w9, w10, w11, w12, w13, w14, w15 = n8, n9, n10, n11, n12, n13, n14, n15

    # C fragment: lane (r, q) holds columns (activation rows) 2q, 2q + 1 of weight rows
    # r and r + 8; the warps' partial sums are added first
    l32 = tl.arange(0, 32)
    n_lo = pid * 16 + l32 // 4
    mc = 2 * (l32 % 4)
    _store_frag(out_ptr, a0, WARPS, mc, n_lo, M, N, stride_om, stride_on)
    _store_frag(out_ptr, a1, WARPS, mc + 1, n_lo, M, N, stride_om, stride_on)
    _store_frag(out_ptr, a2, WARPS, mc, n_lo + 8, M, N, stride_om, stride_on)
    _store_frag(out_ptr, a3, WARPS, mc + 1, n_lo + 8, M, N, stride_om, stride_on)
    if MB == 2:
        _store_frag(out_ptr, a4, WARPS, mc + 8, n_lo, M, N, stride_om, stride_on)
        _store_frag(out_ptr, a5, WARPS, mc + 9, n_lo, M, N, stride_om, stride_on)
        _store_frag(out_ptr, a6, WARPS, mc + 8, n_lo + 8, M, N, stride_om, stride_on)
        _store_frag(out_ptr, a7, WARPS, mc + 9, n_lo + 8, M, N, stride_om, stride_on)


INTERPRET_C = tl.constexpr(INTERPRET)


# ----------------------------------------------------------------------------- launch
def _cfg(warps: int, pair: int = 2, maxnreg: int | None = None, **knobs) -> triton.Config:
    """A launch config; ``knobs`` sets the kernel's other constexprs (DEPTH, and
    SCALES_AHEAD to measure it); ``maxnreg`` caps registers per thread (occupancy)."""
    return triton.Config({"WARPS": warps, "PAIR": pair, **knobs}, num_warps=warps,
                         num_stages=1, maxnreg=maxnreg)


# The warps of a program split its 16 rows' K range.  From scripts/bench_wq_mma.py on the
# H100: one slab per iteration won for K = 4096 (4096x14336 M=1: 15.3 us against 21.2),
# two for K >= 8192 (14336x4096: 17.7 against 19.9); 4 or 8 warps, rarely 16.  Two or
# three slabs in flight (DEPTH) won at M = 16 (8192x8192: 29.1 us against 31.0).
MMA_CONFIGS = ([_cfg(w, p) for w in (4, 8, 16) for p in (1, 2)]
               + [_cfg(4, 1, DEPTH=2), _cfg(4, 1, DEPTH=3), _cfg(8, 1, DEPTH=2)])

_tuned = triton.autotune(configs=MMA_CONFIGS, key=["N", "K", "GS", "MB", "SMALL_G", "BITS"],
                         **autotune_kwargs(graph=True))(_wq_mma_kernel)


@functools.lru_cache(maxsize=None)
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def can_run(x: torch.Tensor, w: WQWeight) -> tuple[bool, str]:
    """Whether this kernel takes (x, w), and why not: up to 16 rows; 4-bit (fp16/bf16) or
    8-bit (fp16); K a multiple of the slab (128 / 64 columns) with groups of whole slabs,
    of 32 (64 at 4 bits) or per-channel; 16-byte aligned rows."""
    m = x.shape[0]
    if not 1 <= m <= MAX_M:
        return False, f"M={m} (this kernel takes 1..{MAX_M} rows)"
    if w.bits not in (4, 8):
        return False, f"{w.bits}-bit weight (4- or 8-bit only)"
    if x.dtype not in (torch.float16, torch.bfloat16) or w.dtype != x.dtype:
        return False, f"activations {x.dtype}, scales {w.dtype} (fp16 or bf16, alike)"
    if w.bits == 8 and x.dtype != torch.float16:
        return False, "8-bit weights with bf16 activations (bf16 cannot hold 128 + q exactly)"
    slab, small = slab_columns(w.bits), lane_groups(w.bits)
    if w.k % slab or (w.group_size % slab and w.group_size != w.k
                      and w.group_size not in small):
        return False, (f"K={w.k}, group {w.group_size}: needs K in multiples of {slab} and "
                       f"groups of {', '.join(map(str, small))} or a multiple of {slab}")
    qw = w.qweight
    if qw.stride(1) != 1 or qw.stride(0) % 4 or qw.data_ptr() % 16:
        return False, "packed weight rows not 16-byte aligned"
    if x.stride(-1) != 1 or (m > 1 and x.stride(0) % 8) or x.data_ptr() % 16:
        return False, "activation rows not contiguous and 16-byte aligned"
    if x.is_cuda and _capability(x.device) < (8, 0):
        return False, "mma.sync m16n8k16 needs sm_80 or newer"
    if os.environ.get("QUANTRT_WQ_MMA", "1") == "0":
        return False, "disabled by QUANTRT_WQ_MMA=0"
    return True, ""


def mma_matmul(x: torch.Tensor, w: WQWeight, out: torch.Tensor,
               config: triton.Config | None = None) -> torch.Tensor:
    """``out[M, N] = x[M, K] @ W.T`` for M <= 16 (x already permuted; ``can_run`` holds)."""
    ok, why = can_run(x, w)
    if not ok:
        raise ValueError(f"the MMA decode kernel cannot take this input: {why}")
    m = x.shape[0]
    lane = w.group_size in lane_groups(w.bits) and w.group_size != w.k
    small = w.group_size if lane else 0
    gs = 0 if w.group_size == w.k or small else w.group_size // slab_columns(w.bits)
    mb = 1 if m <= 8 else 2
    asm = {"BITS": w.bits, "SMALL_G": small,
           "ASM": ptx_block(mb, x.dtype == torch.bfloat16, w.bits, lane),
           "ASM_C": ptx_constraints(mb, lane)}
    if config is None and INTERPRET:
        config = _cfg(2)
    if config is None or "SCALES_AHEAD" not in config.kwargs:
        asm["SCALES_AHEAD"] = int(lane)
    args = (x, w.qweight, w.scales, w.bias, out, m, w.n, w.k,
            x.stride(0), w.qweight.stride(0), w.scales.stride(0), w.scales.stride(1),
            w.bias.stride(0), w.bias.stride(1), out.stride(0), out.stride(1))
    grid = (triton.cdiv(w.n, 16),)
    if config is not None:
        _wq_mma_kernel[grid](*args, GS=gs, MB=mb, **asm, **config.all_kwargs())
        return out
    launch_tuned(w.plans, ("mma", mb, x.dtype), _wq_mma_kernel, _tuned, lambda meta: grid,
                 args, {"GS": gs, "MB": mb, **asm})
    return out
