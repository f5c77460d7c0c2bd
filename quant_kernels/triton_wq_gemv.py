"""Decode kernel (M <= 16) for ``WQWeight``, and the same kernel as the weight-stationary
"swap" GEMM for 16 < M <= 64.  Tile loading, dequantization and split-K live in
``triton_wq_tile``.

Each program owns ``BLOCK_N`` weight rows and a contiguous range of K tiles (its split).
Paths (BLOCK_M, chosen by the autotuner):

* BLOCK_M == 16: ``tl.dot(W_tile, x_tile^T)`` with M padded to 16 ("swap AB": weight rows
  fill the MMA's M side, which wgmma wants >= 64; the <= 16 activation rows its N side).
* BLOCK_M == 1 (M == 1, 8-bit or when ``triton_wq_gemv1`` cannot run): no tensor cores;
  with ``f = 1 + q / 2**b`` per tile
  ``sum_k x_k (q_k s + c) = s 2**b (sum_k f_k x_k - sum_k x_k) + c sum_k x_k``, so a
  weight costs shift, and/or, FMA.  The next tile's words are prefetched by hand.
* BLOCK_M 32/64 (``swap``): grid axis 2 walks M tiles.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_wq_tile import (INTERPRET, SPLITK_MAX_N,  # noqa: F401
                             autotune_kwargs, check_split_tiles, dequant_tile,
                             dequant_tile_fast, fast_dequant_ok, launch_tuned, load_tile,
                             mma, split_locks, split_range, store_tile, splitk_workspace,
                             unpack_unit)
from .wq_layout import (WQWeight, check_pinned_k_tile, k_tile_ok, m_bucket,  # noqa: F401
                        num_sms, wide_tile_ok, widest_k_tiles)

DECODE_MAX_M = 16


# ----------------------------------------------------------------------------- kernels
@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def _wq_gemv_kernel(
    # pointers: activations [M, K], packed weight [N, KW], scales/bias [N, Gn],
    # output [M, N], fp32 split-K partials [SPLIT_K, M, N], split-K tile counters
    x_ptr, qw_ptr, s_ptr, b_ptr, out_ptr, ws_ptr, lock_ptr,
    # sizes (M_BUCKET only keys the autotuner)
    M, N, K, KW, GROUP, M_BUCKET,
    # strides
    stride_xm, stride_xk, stride_qn, stride_qk, stride_sn, stride_sg,
    stride_bn, stride_bg, stride_om, stride_on,
    # meta
    BITS: tl.constexpr, FAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, WIDE: tl.constexpr = False,
):
    # BLOCK_M == 1: the FMA path (M == 1 only); else: tl.dot with M padded to BLOCK_M
    # (grid axis 2 walks M tiles: with BLOCK_M > 16 this is the weight-stationary
    # "swap AB" GEMM whose dequantized tile feeds the MMA from registers)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    kt_lo, kt_hi = split_range(pid_k, K, BLOCK_K, SPLIT_K)

    if BLOCK_M == 1:
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        # Software prefetch: the next tile's words are in flight while this one is
        # unpacked (Triton's pipeliner only stages loads that feed tl.dot).  Past the
        # split's end the row mask is all false, so the load touches no memory.
        # (a row limit of 0 rather than `n_mask & cond`: the interpreter turns `&` of a
        # block mask and a scalar condition into an int mask that tl.load rejects)
        words, s, b = load_tile(qw_ptr, s_ptr, b_ptr, offs_n, tl.where(kt_lo < kt_hi, N, 0),
                                kt_lo * BLOCK_K, KW, GROUP, stride_qn, stride_qk,
                                stride_sn, stride_sg, stride_bn, stride_bg, BITS, BLOCK_K, WIDE)
        for kt in range(kt_lo, kt_hi):
            k0 = kt * BLOCK_K
            nxt_words, nxt_s, nxt_b = load_tile(
                qw_ptr, s_ptr, b_ptr, offs_n, tl.where(kt + 1 < kt_hi, N, 0), k0 + BLOCK_K,
                KW, GROUP, stride_qn, stride_qk, stride_sn, stride_sg, stride_bn, stride_bg,
                BITS, BLOCK_K, WIDE)
            kk = k0 + offs_k
            x = tl.load(x_ptr + kk * stride_xk, mask=kk < K, other=0.0).to(tl.float32)
            if WIDE:
                acc += tl.sum(dequant_tile(words, s, b, BITS, tl.float32, True) * x[None, :],
                              axis=1)
            else:
                fx = tl.sum(unpack_unit(words, BITS) * x[None, :], axis=1)
                sx = tl.sum(x, axis=0)  # one scalar per tile, shared by every row
                acc += s.to(tl.float32) * (1 << BITS) * (fx - sx) + b.to(tl.float32) * sx
            words, s, b = nxt_words, nxt_s, nxt_b
        store_tile(acc, ws_ptr, lock_ptr, out_ptr + offs_n * stride_on, offs_n, n_mask, M * N,
                   pid_n, SPLIT_K)
    else:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for kt in range(kt_lo, kt_hi):
            k0 = kt * BLOCK_K
            words, s, b = load_tile(qw_ptr, s_ptr, b_ptr, offs_n, N, k0, KW, GROUP,
                                    stride_qn, stride_qk, stride_sn, stride_sg,
                                    stride_bn, stride_bg, BITS, BLOCK_K, WIDE)
            if FAST:
                w = dequant_tile_fast(words, s, b, BITS, x_ptr.dtype.element_ty, WIDE)
            else:
                w = dequant_tile(words, s, b, BITS, x_ptr.dtype.element_ty, WIDE)
            kk = k0 + offs_k
            xt = tl.load(x_ptr + offs_m[None, :] * stride_xm + kk[:, None] * stride_xk,
                         mask=m_mask[None, :] & (kk < K)[:, None], other=0.0)
            acc = mma(w, xt, acc)
        mask = n_mask[:, None] & m_mask[None, :]
        out_ptrs = out_ptr + offs_m[None, :] * stride_om + offs_n[:, None] * stride_on
        store_tile(acc, ws_ptr, lock_ptr, out_ptrs, offs_m[None, :] * N + offs_n[:, None], mask,
                   M * N, pid_m * tl.num_programs(0) + pid_n, SPLIT_K)


# ----------------------------------------------------------------------------- tuning
def _cfg(bm, bn, bk, sk, warps=4, stages=3, wide=False):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk,
                          "WIDE": wide}, num_warps=warps, num_stages=stages)


# From scripts/sweep_wq.py on the H100 (BENCHMARKS.md): a weight-streaming kernel needs
# ~4 programs per SM, so split K 4-8 ways unless N alone gives that many tiles.
GEMV_CONFIGS = [
    # tl.dot path (any M <= 16): the pipeliner stages loads through shared memory
    _cfg(16, 64, 128, 4, 4, 3), _cfg(16, 64, 128, 8, 4, 3), _cfg(16, 128, 128, 4, 8, 4),
    _cfg(16, 64, 256, 4, 4, 3), _cfg(16, 64, 64, 4, 4, 4), _cfg(16, 64, 32, 4, 4, 4),
    _cfg(16, 64, 128, 1, 4, 3), _cfg(16, 64, 64, 1, 4, 4),  # N alone fills the GPU (lm_head)
    # FMA path (M == 1): prefetches by hand, so one stage
    _cfg(1, 32, 128, 4, 2, 1), _cfg(1, 64, 128, 8, 4, 1), _cfg(1, 64, 128, 4, 4, 1),
    _cfg(1, 64, 128, 2, 2, 1), _cfg(1, 64, 256, 2, 4, 1), _cfg(1, 64, 64, 4, 4, 1),
    _cfg(1, 64, 32, 4, 4, 1), _cfg(1, 64, 128, 1, 4, 1), _cfg(1, 64, 64, 1, 4, 1),
    # groups of 32/64 (GGUF, HQQ): 128-wide tiles with a scale per word (WIDE)
    _cfg(16, 64, 128, 4, 4, 3, True), _cfg(16, 64, 128, 8, 4, 3, True),
    _cfg(16, 64, 128, 1, 4, 3, True), _cfg(1, 64, 128, 4, 4, 1, True),
    _cfg(1, 64, 128, 8, 4, 1, True), _cfg(1, 64, 128, 1, 4, 1, True),
]
SAFE_GEMV_CONFIG = _cfg(16, 32, 32, 1)  # fits every layout; the pruner's last resort


def interpret_tiles(n: int, w: WQWeight) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, SPLIT_K) for the interpreter, which cannot benchmark and pays
    per tl op, not per element: few large tiles; split K in two when there are 2 tiles."""
    block_k = next(bk for bk in (128, 64, 32) if k_tile_ok(bk, w.group_size, w.n_groups, w.kp))
    split = 2 if triton.cdiv(w.k, block_k) >= 2 else 1
    return min(128, max(16, triton.next_power_of_2(n))), block_k, split


def _prune_gemv(configs, named_args, **kwargs):
    a = {**named_args, **kwargs}
    n, k, group, mb = a["N"], a["K"], a["GROUP"], a["M_BUCKET"]
    n_groups = -(-k // group)
    tiles = widest_k_tiles(group, n_groups, n_groups * group)
    sms = num_sms(a["x_ptr"].device)
    kept = []
    for c in configs:
        bm, bn, bk, sk = (c.kwargs[key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K"))
        if c.kwargs.get("WIDE"):
            if not wide_tile_ok(bk, group, n_groups, n_groups * group):
                continue
        elif bk not in tiles:
            continue
        if bm == 1 and mb > 1:
            continue
        if sk > 1 and (n > SPLITK_MAX_N or triton.cdiv(n, bn) >= 2 * sms
                       or sk > triton.cdiv(k, bk)):
            continue
        kept.append(c)
    return kept or [SAFE_GEMV_CONFIG]


_gemv_tuned = triton.autotune(
    configs=GEMV_CONFIGS, key=["M_BUCKET", "N", "K", "GROUP", "BITS"],
    prune_configs_by={"early_config_prune": _prune_gemv}, **autotune_kwargs())(_wq_gemv_kernel)


def _args(x, w, out, ws, bucket_cap):
    m, k = x.shape
    return (x, w.qweight, w.scales, w.bias, out, ws, split_locks(x.device),
            m, w.n, k, w.qweight.shape[1], w.group_size, m_bucket(m, bucket_cap),
            x.stride(0), x.stride(1), w.qweight.stride(0), w.qweight.stride(1),
            w.scales.stride(0), w.scales.stride(1), w.bias.stride(0), w.bias.stride(1),
            out.stride(0), out.stride(1))


def _grid(m: int, n: int):
    def grid(meta):
        tiles = (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"],
                 triton.cdiv(m, max(meta["BLOCK_M"], 1)))
        check_split_tiles(tiles[0] * tiles[2], meta["SPLIT_K"])
        return tiles
    return grid


def run_config(x: torch.Tensor, w: WQWeight, out: torch.Tensor,
               config: triton.Config) -> torch.Tensor:
    """One launch of the weight-stationary kernel with a pinned config, any M (BLOCK_M == 1
    takes M == 1 only); x already permuted.  The prefill path uses it with BLOCK_M > 16."""
    m = x.shape[0]
    bm = config.kwargs["BLOCK_M"]
    if bm == 1 and m != 1:
        raise ValueError(f"config BLOCK_M=1 (the FMA path) takes M == 1, got M={m}")
    check_pinned_k_tile(config.kwargs, w)
    ws = splitk_workspace(x.device, m, w.n, [config], config)
    _wq_gemv_kernel[_grid(m, w.n)(config.kwargs)](
        *_args(x, w, out, ws, max(bm, 1)), BITS=w.bits,
        FAST=fast_dequant_ok(x.dtype, w.bits), **config.all_kwargs())
    return out


def gemv(x: torch.Tensor, w: WQWeight, out: torch.Tensor,
         config: triton.Config | None = None) -> torch.Tensor:
    """``out[M, N] = x[M, K] @ W.T`` for M <= 16; x already permuted, shapes checked.

    ``config`` pins one config (tests); otherwise autotuned (one fixed config when
    interpreting).
    """
    m = x.shape[0]
    if m > DECODE_MAX_M:
        raise ValueError(f"gemv takes M <= {DECODE_MAX_M}, got {m}")
    if config is None and INTERPRET:
        config = _cfg(1 if m == 1 else 16, *interpret_tiles(w.n, w))
    if config is not None:
        if config.kwargs["BLOCK_M"] < m:
            raise ValueError(f"config BLOCK_M={config.kwargs['BLOCK_M']} < M={m}")
        return run_config(x, w, out, config)
    ws = splitk_workspace(x.device, m, w.n, GEMV_CONFIGS)
    launch_tuned(w.plans, ("gemv", m_bucket(m, DECODE_MAX_M), x.dtype), _wq_gemv_kernel,
                 _gemv_tuned, _grid(m, w.n), _args(x, w, out, ws, DECODE_MAX_M),
                 {"BITS": w.bits, "FAST": fast_dequant_ok(x.dtype, w.bits)})
    return out


# ----------------------------------------------------------------------------- swap GEMM
# 16 < M <= 64: the same kernel with BLOCK_M > 16 (weight-stationary "swap AB"); from
# scripts/sweep_gemv.py it beats the x-stationary fused GEMM at M = 32 on every H100 shape
# measured (8192x8192: 36.6 us vs 49.9 us) and on some at M = 64, so triton_wq times both.
SWAP_MAX_M = 64
SWAP_CONFIGS = [
    _cfg(32, 64, 128, 4, 4, 4), _cfg(32, 128, 128, 4, 8, 3), _cfg(32, 64, 128, 8, 4, 3),
    _cfg(64, 64, 128, 2, 4, 4), _cfg(64, 128, 128, 2, 8, 3), _cfg(64, 128, 128, 4, 8, 3),
    _cfg(32, 64, 128, 4, 4, 4, True), _cfg(64, 64, 128, 2, 4, 4, True),
    _cfg(32, 64, 128, 8, 4, 3, True), _cfg(64, 128, 128, 2, 8, 3, True),
]
SAFE_SWAP_CONFIG = _cfg(32, 32, 32, 1)


def _prune_swap(configs, named_args, **kwargs):
    mb = {**named_args, **kwargs}["M_BUCKET"]
    kept = [c for c in _prune_gemv(configs, named_args, **kwargs)
            if c.kwargs["BLOCK_M"] in (mb, 2 * mb) or (mb < 32 and c.kwargs["BLOCK_M"] == 32)]
    return kept or [SAFE_SWAP_CONFIG]


_swap_tuned = triton.autotune(
    configs=SWAP_CONFIGS, key=["M_BUCKET", "N", "K", "GROUP", "BITS"],
    prune_configs_by={"early_config_prune": _prune_swap}, **autotune_kwargs())(_wq_gemv_kernel)


def swap(x: torch.Tensor, w: WQWeight, out: torch.Tensor) -> torch.Tensor:
    """``out[M, N] = x[M, K] @ W.T`` for 16 < M <= SWAP_MAX_M, weight-stationary; x already
    permuted.  Autotuned (one fixed config when interpreting)."""
    m = x.shape[0]
    if not DECODE_MAX_M < m <= SWAP_MAX_M:
        raise ValueError(f"swap takes {DECODE_MAX_M} < M <= {SWAP_MAX_M}, got {m}")
    if INTERPRET:
        return run_config(x, w, out, _cfg(64, *interpret_tiles(w.n, w)))
    ws = splitk_workspace(x.device, m, w.n, SWAP_CONFIGS)
    launch_tuned(w.plans, ("swap", m_bucket(m, SWAP_MAX_M), x.dtype), _wq_gemv_kernel,
                 _swap_tuned, _grid(m, w.n), _args(x, w, out, ws, SWAP_MAX_M),
                 {"BITS": w.bits, "FAST": fast_dequant_ok(x.dtype, w.bits)})
    return out
