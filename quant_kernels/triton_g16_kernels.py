"""Triton kernels for ``G16Weight`` (g16_layout: 4 + 2-bit words, int8 scale per 16 values).

A K tile of ``BLOCK_K <= 256`` values (so one super-block ``d`` per row) is ``BLOCK_W =
BLOCK_K / 8`` words per row.  Value ``p`` of every word (``p = 0..7``) is unpacked as one
``[BLOCK_N, BLOCK_W]`` slice; all eight share the word's scale, so the ``[BLOCK_N,
BLOCK_K / 16]`` scales ``s = d * sc`` are widened to the word shape once per tile (each
sub-block's scale serves two words: an interleave with itself, register renaming).
Scales thus change every 16 values inside a tile while the K tile stays wide.

Unpacking (portable path) is the exact-float trick of triton_wq_tile: value bits go under
1.0's exponent, ``f = 1 + q / 2**QB`` (QB = 6 with the high pair, else 4), ``f - (1 +
zero / 2**QB)`` is ``(q - zero) / 2**QB`` exactly (Sterbenz), and ``tl.fma`` of it with
``2**QB s`` and ``b`` (0, or Q2_K's ``-dmin m``) rounds ``s (q - zero) + b`` once, as
``dequantize_row_q6_K`` / ``_q3_K`` / ``_q2_K`` (ggml-quants.c) do in fp32: the tile is
gguf-py's weight rounded once to the activation dtype.  With fp16 activations on the GPU
the PTX recipe ``g16_layout.ptx_f16`` does the same in f16x2 (~3 instructions per weight
instead of ~9, with ``s`` and ``b`` rounded to fp16 first: ~2^-11 relative).

* decode (``_g16_gemv_kernel``, M <= 16): program = ``BLOCK_N`` rows x one K split.
  BLOCK_M == 1 (M == 1): no tensor cores, ``sum_k x_k w_k`` per word is ``S * (sum_p f_p
  x_p - off * sum_p x_p) + b * sum_p x_p``, one FMA per weight, next tile's words
  prefetched by hand.  BLOCK_M == 16: the slices are dequantized to the activation dtype
  interleaved back into natural K order and fed to ``tl.dot`` with M padded to 16
  (weight rows on the MMA's M side).  (Eight ``k = BLOCK_K / 8`` dots against x read in
  slice order, skipping the interleave, gave wrong results or failed to compile with
  Triton 3.6 on the H100.)
* GEMM (``_g16_gemm_kernel``): Triton tutorial 03's tiling with GROUP_M swizzle and the
  same tile dequant; small grids split K.
* dequant (``_g16_dequant_kernel``): the dense weight in fp16/bf16 for cuBLAS at large M.

Split-K partials use triton_wq_tile's one-launch epilogue (``store_tile``).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .g16_layout import TYPES, ptx_f16
from .triton_wq_tile import device_fn, grouped_tile, mma, split_range, store_tile

# one recipe per (has the high pair, zero): Q6_K, Q3_K, Q2_K
ASM_HI = tl.constexpr(ptx_f16(True, TYPES[next(t for t in TYPES if TYPES[t][2])][1]))
ASM_Z4 = tl.constexpr(ptx_f16(False, 4))
ASM_Z0 = tl.constexpr(ptx_f16(False, 0))
ASM_CONSTRAINTS = tl.constexpr("=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r,r,r")


# ----------------------------------------------------------------------------- device
@device_fn
def _unit(lo, hi, P: tl.constexpr, HAS_HI: tl.constexpr):
    # exactly 1 + q / 64 (6-bit: nibble at bits 17-20, high pair at 21-22) or 1 + q / 16
    # (nibble at 19-22); constant shifts and masks, no int->float conversion
    if HAS_HI:
        if P <= 4:
            v = (lo << (17 - 4 * P)) & 0x1E0000
        else:
            v = (lo >> (4 * P - 17)) & 0x1E0000
        v = v | ((hi << (21 - 2 * P)) & 0x600000)
    else:
        if P <= 4:
            v = (lo << (19 - 4 * P)) & 0x780000
        else:
            v = (lo >> (4 * P - 19)) & 0x780000
    return (v | 0x3F800000).to(tl.float32, bitcast=True)


@device_fn
def _interleave(a, b):
    # a to even, b to odd columns (tl.interleave without its @jit wrapper: the
    # interpreter pays per @jit call)
    c = tl.join(a, b)
    return tl.reshape(c, [c.shape[0], 2 * c.shape[1]])


@device_fn
def _natural_order(s0, s1, s2, s3, s4, s5, s6, s7):
    # three interleave levels put leaf i at position bitreverse(i) of each word's 8
    lo = _interleave(_interleave(s0, s4), _interleave(s2, s6))
    hi = _interleave(_interleave(s1, s5), _interleave(s3, s7))
    return _interleave(lo, hi)


@device_fn
def _load_tile(qlo_ptr, qhi_ptr, sc_ptr, d_ptr, mn_ptr, dmin_ptr, offs_n, n_lim, k0, K,
               stride_ln, stride_lk, stride_hn, stride_hk, stride_sn, stride_sg,
               stride_dn, stride_dg, HAS_HI: tl.constexpr, HAS_MIN: tl.constexpr,
               BLOCK_K: tl.constexpr):
    """Words (lo, hi) ``[BLOCK_N, BLOCK_K / 8]`` of the K tile at k0, and per word the fp32
    ``S = 2**QB s`` and ``b`` (``w = s (q - zero) + b``); rows >= n_lim read nothing and
    get S = b = 0, as do words past K.  The tile must lie in one 256-value super-block."""
    BLOCK_W: tl.constexpr = BLOCK_K // 8
    BLOCK_S: tl.constexpr = BLOCK_K // 16
    n_ok = offs_n < n_lim
    n2 = offs_n[:, None]
    offs_w = k0 // 8 + tl.arange(0, BLOCK_W)
    mask = n_ok[:, None] & (offs_w < K // 8)[None, :]
    lo = tl.load(qlo_ptr + n2 * stride_ln + offs_w[None, :] * stride_lk, mask=mask, other=0)
    if HAS_HI:
        hi = tl.load(qhi_ptr + n2 * stride_hn + offs_w[None, :] * stride_hk, mask=mask,
                     other=0).to(tl.int32)
    else:
        hi = lo
    offs_s = k0 // 16 + tl.arange(0, BLOCK_S)
    smask = n_ok[:, None] & (offs_s < K // 16)[None, :]
    sc = tl.load(sc_ptr + n2 * stride_sn + offs_s[None, :] * stride_sg, mask=smask, other=0)
    d = tl.load(d_ptr + offs_n * stride_dn + (k0 // 256) * stride_dg, mask=n_ok, other=0.0)
    s = d.to(tl.float32)[:, None] * sc.to(tl.float32)  # exact: 11 x 8 significant bits
    if HAS_HI:
        S = s * 64.0
    else:
        S = s * 16.0
    if HAS_MIN:  # mn / dmin share sc / d's strides
        mn = tl.load(mn_ptr + n2 * stride_sn + offs_s[None, :] * stride_sg, mask=smask, other=0)
        dmin = tl.load(dmin_ptr + offs_n * stride_dn + (k0 // 256) * stride_dg, mask=n_ok,
                       other=0.0)
        b = -(dmin.to(tl.float32)[:, None] * mn.to(tl.float32))
    else:
        b = tl.zeros_like(S)
    return lo, hi, _interleave(S, S), _interleave(b, b)


@device_fn
def _weights(lo, hi, S, b, P: tl.constexpr, HAS_HI: tl.constexpr, ZERO: tl.constexpr,
             DTYPE: tl.constexpr):
    """Slice P in DTYPE: ``s (q - zero) + b`` rounded once in fp32, as ggml does."""
    if HAS_HI:
        q = _unit(lo, hi, P, HAS_HI) - (1.0 + ZERO / 64.0)   # (q - zero) / 64, exact
    else:
        q = _unit(lo, hi, P, HAS_HI) - (1.0 + ZERO / 16.0)
    # an explicit fma: a separate multiply and add would round twice
    return tl.fma(q, S, b).to(DTYPE)


@device_fn
def _slices(lo, hi, S, b, HAS_HI: tl.constexpr, ZERO: tl.constexpr, FAST: tl.constexpr,
            DTYPE: tl.constexpr):
    """The eight [BLOCK_N, BLOCK_K / 8] weight slices in DTYPE (FAST: fp16 PTX)."""
    if FAST:
        if HAS_HI:
            s = (S * (1.0 / 64.0)).to(tl.float16)
        else:
            s = (S * (1.0 / 16.0)).to(tl.float16)
        b = b.to(tl.float16)
        # the recipe goes in as the global constexpr itself (a local copy would not stay
        # a compile-time string)
        if HAS_HI:
            w0, w1, w2, w3, w4, w5, w6, w7 = tl.inline_asm_elementwise(
                ASM_HI, ASM_CONSTRAINTS, [lo, hi, s, b], dtype=(tl.float16,) * 8, is_pure=True,
                pack=2)
        elif ZERO == 4:
            w0, w1, w2, w3, w4, w5, w6, w7 = tl.inline_asm_elementwise(
                ASM_Z4, ASM_CONSTRAINTS, [lo, hi, s, b], dtype=(tl.float16,) * 8, is_pure=True,
                pack=2)
        else:
            w0, w1, w2, w3, w4, w5, w6, w7 = tl.inline_asm_elementwise(
                ASM_Z0, ASM_CONSTRAINTS, [lo, hi, s, b], dtype=(tl.float16,) * 8, is_pure=True,
                pack=2)
    else:
        w0 = _weights(lo, hi, S, b, 0, HAS_HI, ZERO, DTYPE)
        w1 = _weights(lo, hi, S, b, 1, HAS_HI, ZERO, DTYPE)
        w2 = _weights(lo, hi, S, b, 2, HAS_HI, ZERO, DTYPE)
        w3 = _weights(lo, hi, S, b, 3, HAS_HI, ZERO, DTYPE)
        w4 = _weights(lo, hi, S, b, 4, HAS_HI, ZERO, DTYPE)
        w5 = _weights(lo, hi, S, b, 5, HAS_HI, ZERO, DTYPE)
        w6 = _weights(lo, hi, S, b, 6, HAS_HI, ZERO, DTYPE)
        w7 = _weights(lo, hi, S, b, 7, HAS_HI, ZERO, DTYPE)
    return w0, w1, w2, w3, w4, w5, w6, w7


@device_fn
def _dequant(lo, hi, S, b, HAS_HI: tl.constexpr, ZERO: tl.constexpr, FAST: tl.constexpr,
             DTYPE: tl.constexpr):
    """[BLOCK_N, BLOCK_K] weights in DTYPE, natural K order."""
    w0, w1, w2, w3, w4, w5, w6, w7 = _slices(lo, hi, S, b, HAS_HI, ZERO, FAST, DTYPE)
    return _natural_order(w0, w1, w2, w3, w4, w5, w6, w7)


@device_fn
def _x_cols(x_ptr, offs_m, m_mask, kk, K, stride_xm, stride_xk):
    """Activations transposed, [len(kk), BLOCK_M] (the decode kernel's MMA B operand)."""
    return tl.load(x_ptr + offs_m[None, :] * stride_xm + kk[:, None] * stride_xk,
                   mask=m_mask[None, :] & (kk < K)[:, None], other=0.0)


@device_fn
def _x_rows(x_ptr, offs_m, m_mask, kk, K, stride_xm, stride_xk):
    """Activations [BLOCK_M, len(kk)] (the GEMM's MMA A operand)."""
    return tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :] * stride_xk,
                   mask=m_mask[:, None] & (kk < K)[None, :], other=0.0)


# ----------------------------------------------------------------------------- kernels
@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def _g16_gemv_kernel(
    # activations [M, K], weight tensors (g16_layout), output [M, N], split-K fp32
    # partials [SPLIT_K, M, N] and tile counters
    x_ptr, qlo_ptr, qhi_ptr, sc_ptr, d_ptr, mn_ptr, dmin_ptr, out_ptr, ws_ptr, lock_ptr,
    M, N, K, M_BUCKET,  # M_BUCKET only keys the autotuner
    stride_xm, stride_xk, stride_ln, stride_lk, stride_hn, stride_hk, stride_sn, stride_sg,
    stride_dn, stride_dg, stride_om, stride_on,
    HAS_HI: tl.constexpr, HAS_MIN: tl.constexpr, ZERO: tl.constexpr, FAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_w = tl.arange(0, BLOCK_K // 8)
    kt_lo, kt_hi = split_range(pid_k, K, BLOCK_K, SPLIT_K)  # the last splits may get none

    if BLOCK_M == 1:
        if HAS_HI:
            OFF: tl.constexpr = 1.0 + ZERO / 64.0
        else:
            OFF: tl.constexpr = 1.0 + ZERO / 16.0
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        # hand prefetch (the pipeliner stages only tl.dot operands); a row limit of 0
        # past the split's end makes the load touch no memory
        lo, hi, S, b = _load_tile(
            qlo_ptr, qhi_ptr, sc_ptr, d_ptr, mn_ptr, dmin_ptr, offs_n,
            tl.where(kt_lo < kt_hi, N, 0), kt_lo * BLOCK_K, K, stride_ln, stride_lk,
            stride_hn, stride_hk, stride_sn, stride_sg, stride_dn, stride_dg,
            HAS_HI, HAS_MIN, BLOCK_K)
        for kt in range(kt_lo, kt_hi):
            k0 = kt * BLOCK_K
            nlo, nhi, nS, nb = _load_tile(
                qlo_ptr, qhi_ptr, sc_ptr, d_ptr, mn_ptr, dmin_ptr, offs_n,
                tl.where(kt + 1 < kt_hi, N, 0), k0 + BLOCK_K, K, stride_ln, stride_lk,
                stride_hn, stride_hk, stride_sn, stride_sg, stride_dn, stride_dg,
                HAS_HI, HAS_MIN, BLOCK_K)
            fx = tl.zeros([BLOCK_N, BLOCK_K // 8], dtype=tl.float32)
            sx = tl.zeros([BLOCK_K // 8], dtype=tl.float32)
            for p in tl.static_range(8):
                kk = k0 + offs_w * 8 + p
                xp = tl.load(x_ptr + kk * stride_xk, mask=kk < K, other=0.0).to(tl.float32)
                fx += _unit(lo, hi, p, HAS_HI) * xp[None, :]
                sx += xp
            # per word: sum_p x_p (S (f_p - OFF) + b)
            acc += tl.sum(S * (fx - OFF * sx[None, :]) + b * sx[None, :], axis=1)
            lo, hi, S, b = nlo, nhi, nS, nb
        out_ptrs = out_ptr + offs_n * stride_on
        store_tile(acc, ws_ptr, lock_ptr, out_ptrs, offs_n, n_mask, M * N, pid_n, SPLIT_K)
    else:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for kt in range(kt_lo, kt_hi):
            k0 = kt * BLOCK_K
            lo, hi, S, b = _load_tile(
                qlo_ptr, qhi_ptr, sc_ptr, d_ptr, mn_ptr, dmin_ptr, offs_n, N, k0, K,
                stride_ln, stride_lk, stride_hn, stride_hk, stride_sn, stride_sg,
                stride_dn, stride_dg, HAS_HI, HAS_MIN, BLOCK_K)
            w0, w1, w2, w3, w4, w5, w6, w7 = _slices(lo, hi, S, b, HAS_HI, ZERO, FAST,
                                                     x_ptr.dtype.element_ty)
            w = _natural_order(w0, w1, w2, w3, w4, w5, w6, w7)
            xt = _x_cols(x_ptr, offs_m, m_mask, k0 + tl.arange(0, BLOCK_K), K,
                         stride_xm, stride_xk)
            acc = mma(w, xt, acc)
        mask = n_mask[:, None] & m_mask[None, :]
        out_ptrs = out_ptr + offs_m[None, :] * stride_om + offs_n[:, None] * stride_on
        store_tile(acc, ws_ptr, lock_ptr, out_ptrs, offs_m[None, :] * N + offs_n[:, None], mask,
                   M * N, pid_m * tl.num_programs(0) + pid_n, SPLIT_K)


@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def _g16_gemm_kernel(
    x_ptr, qlo_ptr, qhi_ptr, sc_ptr, d_ptr, mn_ptr, dmin_ptr, out_ptr, ws_ptr, lock_ptr,
    M, N, K, M_BUCKET,
    stride_xm, stride_xk, stride_ln, stride_lk, stride_hn, stride_hk, stride_sn, stride_sg,
    stride_dn, stride_dg, stride_om, stride_on,
    HAS_HI: tl.constexpr, HAS_MIN: tl.constexpr, ZERO: tl.constexpr, FAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr,
):
    # GROUP_M programs in a row walk down one column of M tiles, so each dequantized
    # weight tile's words come from L2 for all but the first of them
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m, pid_n = grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    kt_lo, kt_hi = split_range(pid_k, K, BLOCK_K, SPLIT_K)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kt in range(kt_lo, kt_hi):
        k0 = kt * BLOCK_K
        lo, hi, S, b = _load_tile(
            qlo_ptr, qhi_ptr, sc_ptr, d_ptr, mn_ptr, dmin_ptr, offs_n, N, k0, K,
            stride_ln, stride_lk, stride_hn, stride_hk, stride_sn, stride_sg,
            stride_dn, stride_dg, HAS_HI, HAS_MIN, BLOCK_K)
        w0, w1, w2, w3, w4, w5, w6, w7 = _slices(lo, hi, S, b, HAS_HI, ZERO, FAST,
                                                 x_ptr.dtype.element_ty)
        x = _x_rows(x_ptr, offs_m, m_mask, k0 + tl.arange(0, BLOCK_K), K, stride_xm,
                    stride_xk)
        w = _natural_order(w0, w1, w2, w3, w4, w5, w6, w7)
        acc = mma(x, tl.trans(w), acc)

    mask = m_mask[:, None] & n_mask[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    store_tile(acc, ws_ptr, lock_ptr, out_ptrs, offs_m[:, None] * N + offs_n[None, :], mask, M * N,
               pid, SPLIT_K)


@triton.jit
def _g16_dequant_kernel(
    qlo_ptr, qhi_ptr, sc_ptr, d_ptr, mn_ptr, dmin_ptr, w_ptr, N, K,
    stride_ln, stride_lk, stride_hn, stride_hk, stride_sn, stride_sg,
    stride_dn, stride_dg, stride_wn, stride_wk,
    HAS_HI: tl.constexpr, HAS_MIN: tl.constexpr, ZERO: tl.constexpr, FAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    kk = k0 + tl.arange(0, BLOCK_K)
    lo, hi, S, b = _load_tile(
        qlo_ptr, qhi_ptr, sc_ptr, d_ptr, mn_ptr, dmin_ptr, offs_n, N, k0, K,
        stride_ln, stride_lk, stride_hn, stride_hk, stride_sn, stride_sg,
        stride_dn, stride_dg, HAS_HI, HAS_MIN, BLOCK_K)
    w = _dequant(lo, hi, S, b, HAS_HI, ZERO, FAST, w_ptr.dtype.element_ty)
    # int64 rows: a dense [N, K] weight may pass 2**31 elements
    tl.store(w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + kk[None, :] * stride_wk, w,
             mask=(offs_n < N)[:, None] & (kk < K)[None, :])
