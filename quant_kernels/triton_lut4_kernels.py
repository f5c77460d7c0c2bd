"""Triton kernels of ``triton_lut4`` (NF4/FP4 code-book weights): device code, autotuning
configs and launchers.  ``triton_lut4`` holds the layout, the dispatch on M and the custom
op; its docstring describes the layout.

The fused kernel is weight-stationary: each program owns ``BLOCK_N`` weight rows, one M
tile and a contiguous run of K tiles (its split); per K tile it loads ``[BLOCK_N,
BLOCK_K/2]`` code bytes and one absmax per row (a K tile never spans two absmax blocks:
BLOCK_K divides the block size), looks both nibbles up in the 16-entry table
(``tl.load(lut + code)``: a gather that hits L1, one instruction per value, where a
16-way select would be 15), scales, rounds to the weight's dtype and then x's, and
multiplies:

* BLOCK_M == 1 (M == 1): FMA dot products in fp32, the high nibbles against the even
  activation columns and the low ones against the odd columns (no nibble interleave);
  the next tile's bytes are prefetched by hand (Triton's pipeliner only stages loads
  that feed tl.dot).
* BLOCK_M >= 16: two ``tl.dot(W_half, x_half^T)`` per tile on tensor cores ("swap AB":
  weight rows on the MMA's M side, the few activation rows padded to 16 on its N side),
  the same even/odd pairing; with BLOCK_M 32..128 it is the prefill kernel below
  ``DEQUANT_GEMM_MIN_M``.  Grid axis 0 walks M tiles fastest, so the programs sharing a
  weight tile run together and reuse it from L2.

Split K: each split writes fp32 partials and the last one to arrive sums them in split
order (``triton_wq_tile.store_tile``: deterministic, one launch).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from .triton_wq_tile import (INTERPRET, SPLITK_MAX_N, autotune_kwargs, check_split_tiles,
                             device_fn, launch_tuned, mma, split_locks, split_range,
                             splitk_workspace, store_tile)
from .wq_layout import m_bucket, next_pow2, num_sms

if TYPE_CHECKING:
    from .triton_lut4 import Lut4Weight

M_CAP = 4096  # autotune buckets above this reuse the 4096 choice


# ----------------------------------------------------------------------------- device code
@device_fn
def _load_tile(c_ptr, a_ptr, offs_n, n_lim, k0, K, BS, stride_cn, stride_ck, stride_ab,
               stride_an, BLOCK_K: tl.constexpr):
    """Code bytes [BLOCK_N, BLOCK_K/2] of the K tile at k0 and their absmax [BLOCK_N].
    Rows >= n_lim read nothing (bytes 0, absmax 0: the values come out 0)."""
    n_mask = offs_n < n_lim
    offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    byte = tl.load(c_ptr + offs_n[:, None] * stride_cn + offs_b[None, :] * stride_ck,
                   mask=n_mask[:, None] & (offs_b < K // 2)[None, :], other=0)
    am = tl.load(a_ptr + (k0 // BS) * stride_ab + offs_n * stride_an, mask=n_mask, other=0.0)
    return byte, am


@device_fn
def _round(v, WROUND: tl.constexpr, DTYPE: tl.constexpr):
    """fp32 values rounded to the weight's own dtype (WROUND 1: fp16, 2: bf16, 0: fp32 kept)
    and then to DTYPE, as bitsandbytes' dequantize + the matmul's cast do."""
    if WROUND == 1:
        v = v.to(tl.float16)
    elif WROUND == 2:
        v = v.to(tl.bfloat16)
    return v.to(DTYPE)


@device_fn
def _values(byte, am, lut_ptr, WROUND: tl.constexpr, DTYPE: tl.constexpr):
    """Bytes [R, C] -> (even-column values, odd-column values), each [R, C] in DTYPE."""
    b = byte.to(tl.int32)
    hi = tl.load(lut_ptr + (b >> 4)) * am[:, None]
    lo = tl.load(lut_ptr + (b & 0xF)) * am[:, None]
    return _round(hi, WROUND, DTYPE), _round(lo, WROUND, DTYPE)


@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def _lut4_kernel(
    # activations [M, K], code bytes [N, K/2], absmax [K/BS, N], table [16], output [M, N],
    # fp32 split-K partials [SPLIT_K, M, N], split-K tile counters
    x_ptr, c_ptr, a_ptr, lut_ptr, out_ptr, ws_ptr, lock_ptr,
    M, N, K, BS, M_BUCKET,  # M_BUCKET only keys the autotuner
    stride_xm, stride_xk, stride_cn, stride_ck, stride_ab, stride_an, stride_om, stride_on,
    WROUND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    HALF: tl.constexpr = BLOCK_K // 2
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    pid_m = pid % num_m
    pid_n = pid // num_m
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_h = tl.arange(0, HALF)
    kt_lo, kt_hi = split_range(pid_k, K, BLOCK_K, SPLIT_K)

    if BLOCK_M == 1:
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        # (a row limit of 0 rather than `n_mask & cond`: the interpreter turns `&` of a
        # block mask and a scalar condition into an int mask that tl.load rejects)
        byte, am = _load_tile(c_ptr, a_ptr, offs_n, tl.where(kt_lo < kt_hi, N, 0),
                              kt_lo * BLOCK_K, K, BS, stride_cn, stride_ck, stride_ab,
                              stride_an, BLOCK_K)
        for kt in range(kt_lo, kt_hi):
            k0 = kt * BLOCK_K
            nxt_byte, nxt_am = _load_tile(c_ptr, a_ptr, offs_n, tl.where(kt + 1 < kt_hi, N, 0),
                                          k0 + BLOCK_K, K, BS, stride_cn, stride_ck,
                                          stride_ab, stride_an, BLOCK_K)
            ke = k0 + 2 * offs_h
            xe = tl.load(x_ptr + ke * stride_xk, mask=ke < K, other=0.0).to(tl.float32)
            xo = tl.load(x_ptr + (ke + 1) * stride_xk, mask=ke + 1 < K, other=0.0).to(tl.float32)
            w_hi, w_lo = _values(byte, am, lut_ptr, WROUND, DTYPE)
            acc += tl.sum(w_hi.to(tl.float32) * xe[None, :] + w_lo.to(tl.float32) * xo[None, :],
                          axis=1)
            byte, am = nxt_byte, nxt_am
        store_tile(acc, ws_ptr, lock_ptr, out_ptr + offs_n * stride_on, offs_n, n_mask, M * N,
                   pid, SPLIT_K)
    else:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for kt in range(kt_lo, kt_hi):
            k0 = kt * BLOCK_K
            byte, am = _load_tile(c_ptr, a_ptr, offs_n, N, k0, K, BS, stride_cn, stride_ck,
                                  stride_ab, stride_an, BLOCK_K)
            w_hi, w_lo = _values(byte, am, lut_ptr, WROUND, DTYPE)
            ke = k0 + 2 * offs_h
            x_ptrs = x_ptr + offs_m[None, :] * stride_xm + ke[:, None] * stride_xk
            xe = tl.load(x_ptrs, mask=m_mask[None, :] & (ke < K)[:, None], other=0.0)
            xo = tl.load(x_ptrs + stride_xk, mask=m_mask[None, :] & (ke + 1 < K)[:, None],
                         other=0.0)
            acc = mma(w_hi, xe, acc)
            acc = mma(w_lo, xo, acc)
        mask = n_mask[:, None] & m_mask[None, :]
        out_ptrs = out_ptr + offs_m[None, :] * stride_om + offs_n[:, None] * stride_on
        store_tile(acc, ws_ptr, lock_ptr, out_ptrs, offs_m[None, :] * N + offs_n[:, None], mask,
                   M * N, pid, SPLIT_K)


@triton.jit
def _lut4_expand_kernel(
    # code bytes [N, K/2], absmax [K/BS, N], table [16] -> dense weight [N, K]
    c_ptr, a_ptr, lut_ptr, w_ptr, N, K, BS,
    stride_cn, stride_ck, stride_ab, stride_an, stride_wn, stride_wk,
    WROUND: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    byte, am = _load_tile(c_ptr, a_ptr, offs_n, N, k0, K, BS, stride_cn, stride_ck,
                          stride_ab, stride_an, BLOCK_K)
    w_hi, w_lo = _values(byte, am, lut_ptr, WROUND, w_ptr.dtype.element_ty)
    # join puts each byte's two values side by side: [BN, BK/2, 2] is natural K order,
    # stored with plain contiguous (vector) stores
    w = tl.reshape(tl.join(w_hi, w_lo), [BLOCK_N, BLOCK_K])
    kk = k0 + tl.arange(0, BLOCK_K)
    # int64 rows: a dense [N, K] weight may pass 2**31 elements
    tl.store(w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + kk[None, :] * stride_wk, w,
             mask=(offs_n < N)[:, None] & (kk < K)[None, :])


# ----------------------------------------------------------------------------- tuning
def _cfg(bm, bn, bk, sk, warps=4, stages=3):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk},
                         num_warps=warps, num_stages=stages)


# Not swept on a GPU yet: the integer decode kernel's winners on the H100 (BENCHMARKS.md:
# ~4 programs per SM, split K 4-8 ways unless N alone gives that many tiles), with K
# tiles of 64 as well as 128 because a tile may not span two absmax blocks (bnb's
# default block is 64).  The FMA path prefetches by hand, so it runs one stage.
CONFIGS = [
    # M == 1, FMA
    _cfg(1, 64, 64, 4, 4, 1), _cfg(1, 64, 64, 8, 4, 1), _cfg(1, 128, 64, 4, 4, 1),
    _cfg(1, 64, 128, 4, 4, 1), _cfg(1, 32, 64, 8, 2, 1), _cfg(1, 64, 64, 1, 4, 1),
    _cfg(1, 64, 32, 8, 4, 1),  # block size 32
    # M <= 16, tensor cores with M padded to 16
    _cfg(16, 64, 64, 4, 4, 4), _cfg(16, 64, 64, 8, 4, 4), _cfg(16, 128, 64, 4, 8, 4),
    _cfg(16, 64, 128, 4, 4, 3), _cfg(16, 64, 32, 8, 4, 4), _cfg(16, 64, 64, 1, 4, 4),
    # 16 < M < DEQUANT_GEMM_MIN_M: M tiles of 32..128
    _cfg(32, 64, 64, 4, 4, 4), _cfg(32, 128, 64, 2, 8, 3), _cfg(64, 64, 64, 2, 4, 4),
    _cfg(64, 128, 64, 1, 8, 3), _cfg(64, 64, 128, 1, 4, 3), _cfg(128, 128, 64, 1, 8, 3),
    _cfg(32, 64, 32, 4, 4, 4), _cfg(64, 64, 32, 2, 4, 4), _cfg(128, 128, 32, 1, 8, 4),  # bs 32
]
SAFE_CONFIG = _cfg(16, 32, 32, 1)  # fits every shape; the pruner's last resort (M > 1)
SAFE_CONFIG_M1 = _cfg(1, 32, 32, 1, 4, 1)


def tile_ok(bk: int, bs: int, k: int) -> bool:
    """A K tile stays inside one absmax block and is no wider than K needs."""
    return bs % bk == 0 and bk <= max(32, next_pow2(k))


def m_tiles_ok(bm: int, mb: int) -> bool:
    """BLOCK_M for an M bucket: the FMA path or 16 at M == 1, 16 up to 16 rows, else
    tiles of at least half the bucket (capped at 64) and at most the bucket."""
    if mb == 1:
        return bm in (1, 16)
    if mb <= 16:
        return bm == 16
    return min(mb, 64) // 2 < bm <= mb if mb < 128 else bm >= 64


def prune(configs, n: int, k: int, bs: int, mb: int, sms: int) -> list:
    kept = []
    for c in configs:
        bm, bn, bk, sk = (c.kwargs[key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K"))
        if not tile_ok(bk, bs, k) or not m_tiles_ok(bm, mb):
            continue
        tiles = triton.cdiv(n, bn) * triton.cdiv(mb, max(bm, 1))
        if sk > 1 and (n > SPLITK_MAX_N or tiles >= 2 * sms or sk > triton.cdiv(k, bk)
                       or mb > 256):
            continue
        kept.append(c)
    return kept or [SAFE_CONFIG_M1 if mb == 1 else SAFE_CONFIG]


def _prune(configs, named_args, **kwargs):
    a = {**named_args, **kwargs}
    return prune(configs, a["N"], a["K"], a["BS"], a["M_BUCKET"], num_sms(a["x_ptr"].device))


_tuned = triton.autotune(configs=CONFIGS, key=["M_BUCKET", "N", "K", "BS", "WROUND"],
                         prune_configs_by={"early_config_prune": _prune},
                         **autotune_kwargs())(_lut4_kernel)


def interpret_config(m: int, w: Lut4Weight) -> triton.Config:
    """The interpreter cannot benchmark and pays per tl op, not per element: few large
    tiles; split K in two when there are 2 tiles."""
    bk = next(b for b in (128, 64, 32) if tile_ok(b, w.blocksize, w.k))
    bm = 1 if m == 1 else min(64, max(16, next_pow2(m)))
    return _cfg(bm, min(128, max(16, next_pow2(w.n))), bk, 2 if triton.cdiv(w.k, bk) >= 2 else 1)


# ----------------------------------------------------------------------------- launchers
def fused(x: torch.Tensor, w: Lut4Weight, out: torch.Tensor,
          config: triton.Config | None = None) -> torch.Tensor:
    """``out[M, N] = x[M, K] @ W.T`` with the fused kernel, any M (x K-contiguous, shapes
    checked by the caller).  ``config`` pins a config (tests); otherwise autotuned (a
    fixed config when interpreting)."""
    m = x.shape[0]
    mb = m_bucket(m, M_CAP)
    if config is None and INTERPRET:
        config = interpret_config(m, w)
    if config is not None:
        if config.kwargs["BLOCK_M"] == 1 and m != 1:
            raise ValueError(f"config BLOCK_M=1 (the FMA path) takes M == 1, got M={m}")
        tile_k = config.kwargs["BLOCK_K"]
        if not tile_ok(tile_k, w.blocksize, w.k):
            raise ValueError(f"config BLOCK_K={tile_k} does not divide the block size "
                             f"{w.blocksize}")
    kept = None if config is not None else prune(CONFIGS, w.n, w.k, w.blocksize, mb,
                                                   num_sms(x.device))
    ws = splitk_workspace(x.device, m, w.n, kept, config)
    args = (x, w.codes, w.absmax, w.lut, out, ws, split_locks(x.device), m, w.n, w.k,
            w.blocksize, mb, x.stride(0), x.stride(1), w.codes.stride(0), w.codes.stride(1),
            w.absmax.stride(0), w.absmax.stride(1), out.stride(0), out.stride(1))

    def grid(meta):
        tiles = triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(w.n, meta["BLOCK_N"])
        check_split_tiles(tiles, meta["SPLIT_K"])
        return (tiles, meta["SPLIT_K"])
    consts = {"WROUND": w.wround}
    if config is not None:
        _lut4_kernel[grid(config.kwargs)](*args, **consts, **config.all_kwargs())
    else:
        launch_tuned(w.plans, (mb, x.dtype), _lut4_kernel, _tuned, grid, args, consts)
    return out


def expand(w: Lut4Weight, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight [N, K] in ``dtype``, rounded as bitsandbytes does (via w.wdtype)."""
    out = torch.empty(w.n, w.k, device=w.device, dtype=dtype)
    block_n, block_k = 32, next(b for b in (128, 64, 32) if tile_ok(b, w.blocksize, w.k))
    grid = (triton.cdiv(w.n, block_n), triton.cdiv(w.k, block_k))
    _lut4_expand_kernel[grid](
        w.codes, w.absmax, w.lut, out, w.n, w.k, w.blocksize,
        w.codes.stride(0), w.codes.stride(1), w.absmax.stride(0), w.absmax.stride(1),
        out.stride(0), out.stride(1), WROUND=w.wround, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=4)
    return out
