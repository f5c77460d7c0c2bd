"""Prefill kernels (M > 16) for ``WQWeight``: fused dequant GEMM, and dequant-to-fp16.

Fused GEMM (Triton tutorial 03's tiling): each program computes a ``[BLOCK_M, BLOCK_N]``
output tile; per K tile it loads the activations, the packed words and one scale/bias
per weight row, dequantizes the ``[BLOCK_N, BLOCK_K]`` weight tile in registers to the
activation dtype (``triton_wq_gemv``'s helpers: PTX f16x2 math on the GPU, else an fp32
unpack) and accumulates ``tl.dot(x, W^T)`` in fp32.  GROUP_M
swizzling makes neighbouring programs share weight tiles in L2.  Small-M buckets may
split K (fp32 partials + the reduction kernel of the decode path) to fill the SMs.

The weight tile is dequantized once per M tile, so at large M the dequant work grows
with M / BLOCK_M while cuBLAS does not pay it; above ``DEQUANT_GEMM_MIN_M`` (in
``triton_wq``) the wrapper instead dequantizes the whole weight once with
``_wq_dequant_kernel`` and calls cuBLAS.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_wq_gemv import interpret_tiles
from .triton_wq_tile import (INTERPRET, SPLITK_MAX_N, autotune_kwargs, check_split_tiles,
                             dequant_tile, dequant_tile_fast, fast_dequant_ok, grouped_tile,
                             launch_tuned, load_tile, mma, split_locks, split_range,
                             store_tile, splitk_workspace)
from .wq_layout import (WQWeight, check_pinned_k_tile, k_tile_ok, m_bucket, num_sms,
                        wide_tile_ok)

GEMM_M_CAP = 4096  # autotune buckets above this reuse the 4096 choice


@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def _wq_gemm_kernel(
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
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr,
    WIDE: tl.constexpr = False,
):
    # GROUP_M consecutive programs walk down a column of M tiles before moving to the
    # next N tile, so a weight tile is reused from L2 by GROUP_M programs.
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m, pid_n = grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    kt_lo, kt_hi = split_range(pid_k, K, BLOCK_K, SPLIT_K)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kt in range(kt_lo, kt_hi):
        k0 = kt * BLOCK_K
        kk = k0 + offs_k
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :] * stride_xk,
                    mask=m_mask[:, None] & (kk < K)[None, :], other=0.0)
        words, s, b = load_tile(qw_ptr, s_ptr, b_ptr, offs_n, N, k0, KW, GROUP,
                                stride_qn, stride_qk, stride_sn, stride_sg,
                                stride_bn, stride_bg, BITS, BLOCK_K, WIDE)
        if FAST:
            w = dequant_tile_fast(words, s, b, BITS, x_ptr.dtype.element_ty, WIDE)
        else:
            w = dequant_tile(words, s, b, BITS, x_ptr.dtype.element_ty, WIDE)
        acc = mma(x, tl.trans(w), acc)

    mask = m_mask[:, None] & n_mask[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    store_tile(acc, ws_ptr, lock_ptr, out_ptrs, offs_m[:, None] * N + offs_n[None, :], mask, M * N,
               pid, SPLIT_K)


@triton.jit
def _wq_dequant_kernel(
    # packed weight [N, KW], scales/bias [N, Gn] -> dense weight [N, K]
    qw_ptr, s_ptr, b_ptr, w_ptr,
    N, K, KW, GROUP,
    stride_qn, stride_qk, stride_sn, stride_sg, stride_bn, stride_bg, stride_wn, stride_wk,
    BITS: tl.constexpr, FAST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    k0 = tl.program_id(1) * BLOCK_K
    kk = k0 + tl.arange(0, BLOCK_K)
    words, s, b = load_tile(qw_ptr, s_ptr, b_ptr, offs_n, N, k0, KW, GROUP,
                            stride_qn, stride_qk, stride_sn, stride_sg,
                            stride_bn, stride_bg, BITS, BLOCK_K)
    if FAST:
        w = dequant_tile_fast(words, s, b, BITS, w_ptr.dtype.element_ty)
    else:
        w = dequant_tile(words, s, b, BITS, w_ptr.dtype.element_ty)
    # int64 rows: a dense [N, K] weight may pass 2**31 elements
    tl.store(w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + kk[None, :] * stride_wk, w,
             mask=n_mask[:, None] & (kk < K)[None, :])


def dequantize(w: WQWeight, dtype: torch.dtype, block_n: int = 32, block_k: int = 128,
               num_warps: int = 4) -> torch.Tensor:
    """The dense weight [N, K] (stored column order) in ``dtype`` (fp16/bf16); the tile
    (``block_k``: at most this many columns, fewer where the group needs it) and warps are
    exposed for scripts/bench_wq_dequant.py."""
    n, k = w.n, w.k
    out = torch.empty(n, k, device=w.device, dtype=dtype)
    bk = 32  # largest power of two <= block_k dividing the group (or any, per-channel)
    while bk < block_k and k_tile_ok(bk * 2, w.group_size, w.n_groups, w.kp):
        bk *= 2
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, bk))
    _wq_dequant_kernel[grid](
        w.qweight, w.scales, w.bias, out, n, k, w.qweight.shape[1], w.group_size,
        w.qweight.stride(0), w.qweight.stride(1), w.scales.stride(0), w.scales.stride(1),
        w.bias.stride(0), w.bias.stride(1), out.stride(0), out.stride(1),
        BITS=w.bits, FAST=fast_dequant_ok(dtype, w.bits), BLOCK_N=block_n, BLOCK_K=bk,
        num_warps=num_warps)
    return out


def _cfg(bm, bn, bk, sk=1, warps=4, stages=3, gm=8, wide=False):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": gm,
                          "SPLIT_K": sk, "WIDE": wide}, num_warps=warps, num_stages=stages)


# From scripts/sweep_wq.py on the H100 (BENCHMARKS.md): up to M = 256 the weight is
# streamed and the grid must fill 132 SMs, hence split K on the 64-row tiles.
GEMM_CONFIGS = [
    _cfg(64, 64, 128, 2, 4, 4), _cfg(64, 64, 128, 4, 4, 4), _cfg(64, 128, 128, 2, 4, 3),
    _cfg(64, 64, 128, 1, 4, 4), _cfg(32, 64, 128, 4, 4, 4),
    _cfg(128, 128, 64, 1, 8, 3), _cfg(128, 64, 128, 1, 4, 3),
    # group 32 / 64
    _cfg(64, 64, 32, 2, 4, 4), _cfg(64, 64, 32, 1, 4, 4), _cfg(128, 128, 32, 1, 8, 4),
    _cfg(64, 64, 64, 2, 4, 4), _cfg(64, 64, 64, 1, 4, 4),
    # the same, 128-wide K tiles with a scale per word (WIDE)
    _cfg(64, 64, 128, 2, 4, 4, wide=True), _cfg(64, 128, 128, 2, 4, 3, wide=True),
    _cfg(64, 64, 128, 1, 4, 4, wide=True), _cfg(128, 128, 128, 1, 8, 3, wide=True),
]
SAFE_GEMM_CONFIG = _cfg(64, 64, 32, 1, 4, 3)


def _prune_gemm(configs, named_args, **kwargs):
    a = {**named_args, **kwargs}
    n, k, group, mb = a["N"], a["K"], a["GROUP"], a["M_BUCKET"]
    n_groups = -(-k // group)
    kp = n_groups * group
    sms = num_sms(a["x_ptr"].device)
    kept = []
    for c in configs:
        bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        sk = c.kwargs["SPLIT_K"]
        if c.kwargs.get("WIDE"):
            if not wide_tile_ok(bk, group, n_groups, kp):
                continue
        elif not k_tile_ok(bk, group, n_groups, kp) or (bk == 32 and group % 64 == 0):
            continue
        if bm > max(32, mb) or (mb >= 512 and bm < 64):
            continue
        tiles = triton.cdiv(mb, bm) * triton.cdiv(n, bn)
        if sk > 1 and (n > SPLITK_MAX_N or mb > 256 or tiles >= sms or sk > triton.cdiv(k, bk)):
            continue
        kept.append(c)
    return kept or [SAFE_GEMM_CONFIG]


_gemm_tuned = triton.autotune(
    configs=GEMM_CONFIGS, key=["M_BUCKET", "N", "K", "GROUP", "BITS"],
    prune_configs_by={"early_config_prune": _prune_gemm}, **autotune_kwargs())(_wq_gemm_kernel)


def gemm(x: torch.Tensor, w: WQWeight, out: torch.Tensor,
         config: triton.Config | None = None) -> torch.Tensor:
    """``out[M, N] = x[M, K] @ W.T`` with the fused kernel; x already permuted."""
    m, k = x.shape
    n = w.n
    if config is None and INTERPRET:
        bn, bk, sk = interpret_tiles(n, w)
        config = _cfg(min(64, triton.next_power_of_2(m)), bn, bk, sk, gm=2)
    ws = splitk_workspace(x.device, m, n, GEMM_CONFIGS, config)
    fast = fast_dequant_ok(x.dtype, w.bits)
    args = (x, w.qweight, w.scales, w.bias, out, ws, split_locks(x.device),
            m, n, k, w.qweight.shape[1], w.group_size, m_bucket(m, GEMM_M_CAP),
            x.stride(0), x.stride(1), w.qweight.stride(0), w.qweight.stride(1),
            w.scales.stride(0), w.scales.stride(1), w.bias.stride(0), w.bias.stride(1),
            out.stride(0), out.stride(1))

    def grid(meta):
        tiles = triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"])
        check_split_tiles(tiles, meta["SPLIT_K"])
        return (tiles, meta["SPLIT_K"])
    if config is not None:
        check_pinned_k_tile(config.kwargs, w)
        _wq_gemm_kernel[grid(config.kwargs)](*args, BITS=w.bits, FAST=fast,
                                             **config.all_kwargs())
    else:
        launch_tuned(w.plans, ("gemm", m_bucket(m, GEMM_M_CAP), x.dtype), _wq_gemm_kernel,
                     _gemm_tuned, grid, args, {"BITS": w.bits, "FAST": fast})
    return out
