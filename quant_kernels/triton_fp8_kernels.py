"""Triton kernels of ``triton_fp8`` (FP8 weight-only matmul): device code, autotuning
configs and launchers.  ``triton_fp8`` holds the layout, the dispatch on M and the custom
op; its docstring describes the kernels."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from .triton_wq_tile import (INTERPRET, SPLITK_MAX_N, autotune_kwargs, check_split_tiles,
                             device_fn, grouped_tile, launch_tuned, mma, split_locks,
                             split_range, store_tile, splitk_workspace)
from .wq_layout import m_bucket, next_pow2, num_sms

if TYPE_CHECKING:
    from .triton_fp8 import Fp8Weight

DECODE_MAX_M = 16
GEMM_M_CAP = 4096  # autotune buckets above this reuse the 4096 choice
BITS_SCALE = 256.0  # the bits conversion yields q * 2**-8


_CVT: dict = {}


def cvt_ok(device: torch.device) -> bool:
    """Whether the hardware e4m3 -> f16 conversion exists (sm_89+; the interpreter too)."""
    if device.type != "cuda":
        return True
    ok = _CVT.get(device)  # cached: a decode GEMV is worth a few microseconds of host time
    if ok is None:
        ok = _CVT[device] = torch.cuda.get_device_capability(device) >= (8, 9)
    return ok


@device_fn
def _to_act(q, DTYPE: tl.constexpr, CVT: tl.constexpr):
    """FP8 tile -> DTYPE: exact values (CVT) or exact values * 2**-8 (bits path, uint8 in)."""
    if CVT:
        return q.to(DTYPE)
    else:
        b = q.to(tl.int32)
        h = ((b & 0x80) << 8) | ((b & 0x7F) << 7)
        return h.to(tl.int16).to(tl.float16, bitcast=True).to(DTYPE)


@device_fn
def _load_w(q_ptr, offs_n, n_mask, kk, K, stride_qn, stride_qk, CVT: tl.constexpr):
    """Weight tile [BLOCK_N, BLOCK_K] (0 outside the matrix) in its storage type."""
    mask = n_mask[:, None] & (kk < K)[None, :]
    ptrs = q_ptr + offs_n[:, None] * stride_qn + kk[None, :] * stride_qk
    if CVT:  # fp8 pointer: `other` must be a float
        return tl.load(ptrs, mask=mask, other=0.0)
    else:
        return tl.load(ptrs, mask=mask, other=0)


@device_fn
def _scale(s_ptr, offs_n, n_mask, k0, SBN, SBK, stride_sn, stride_sk, PER_ROW: tl.constexpr):
    """fp32 scales [BLOCK_N] of the rows for the K tile at k0 (per-row: k0 ignored)."""
    if PER_ROW:
        return tl.load(s_ptr + offs_n * stride_sn, mask=n_mask, other=0.0)
    else:
        return tl.load(s_ptr + (offs_n // SBN) * stride_sn + (k0 // SBK) * stride_sk,
                       mask=n_mask, other=0.0)


@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def _fp8_gemv_kernel(
    # activations [M, K], FP8 weight [N, K], fp32 scales, output [M, N],
    # split-K partials [SPLIT_K, M, N] and tile counters
    x_ptr, q_ptr, s_ptr, out_ptr, ws_ptr, lock_ptr,
    M, N, K, SBN, SBK, M_BUCKET,
    stride_xm, stride_xk, stride_qn, stride_qk, stride_sn, stride_sk, stride_om, stride_on,
    PER_ROW: tl.constexpr, CVT: tl.constexpr, SCALE_MUL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_m = tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    offs_k = tl.arange(0, BLOCK_K)
    kt_lo, kt_hi = split_range(pid_k, K, BLOCK_K, SPLIT_K)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for kt in range(kt_lo, kt_hi):
        k0 = kt * BLOCK_K
        kk = k0 + offs_k
        w = _to_act(_load_w(q_ptr, offs_n, n_mask, kk, K, stride_qn, stride_qk, CVT),
                    DTYPE, CVT)
        xt = tl.load(x_ptr + offs_m[None, :] * stride_xm + kk[:, None] * stride_xk,
                     mask=m_mask[None, :] & (kk < K)[:, None], other=0.0)
        if PER_ROW:
            acc = mma(w, xt, acc)
        else:
            s = _scale(s_ptr, offs_n, n_mask, k0, SBN, SBK, stride_sn, stride_sk, False)
            acc += mma(w, xt, tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)) * s[:, None]
    if PER_ROW:
        acc = acc * _scale(s_ptr, offs_n, n_mask, 0, SBN, SBK, stride_sn, stride_sk, True)[:, None]
    if SCALE_MUL != 1.0:
        acc = acc * SCALE_MUL
    mask = n_mask[:, None] & m_mask[None, :]
    out_ptrs = out_ptr + offs_m[None, :] * stride_om + offs_n[:, None] * stride_on
    store_tile(acc, ws_ptr, lock_ptr, out_ptrs, offs_m[None, :] * N + offs_n[:, None], mask, M * N,
               pid_n, SPLIT_K)


@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def _fp8_gemm_kernel(
    x_ptr, q_ptr, s_ptr, out_ptr, ws_ptr, lock_ptr,
    M, N, K, SBN, SBK, M_BUCKET,
    stride_xm, stride_xk, stride_qn, stride_qk, stride_sn, stride_sk, stride_om, stride_on,
    PER_ROW: tl.constexpr, CVT: tl.constexpr, SCALE_MUL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr,
):
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    # GROUP_M consecutive programs walk down a column of M tiles before the next N tile,
    # so each weight tile is read from DRAM once and from L2 by the others.
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
        w = _to_act(_load_w(q_ptr, offs_n, n_mask, kk, K, stride_qn, stride_qk, CVT),
                    DTYPE, CVT)
        if PER_ROW:
            acc = mma(x, tl.trans(w), acc)
        else:
            s = _scale(s_ptr, offs_n, n_mask, k0, SBN, SBK, stride_sn, stride_sk, False)
            acc += mma(x, tl.trans(w), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)) \
                * s[None, :]
    if PER_ROW:
        acc = acc * _scale(s_ptr, offs_n, n_mask, 0, SBN, SBK, stride_sn, stride_sk, True)[None, :]
    if SCALE_MUL != 1.0:
        acc = acc * SCALE_MUL
    mask = m_mask[:, None] & n_mask[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    store_tile(acc, ws_ptr, lock_ptr, out_ptrs, offs_m[:, None] * N + offs_n[None, :], mask, M * N,
               pid, SPLIT_K)


@triton.jit
def _fp8_dequant_kernel(
    q_ptr, s_ptr, w_ptr, N, K, SBN, SBK,
    stride_qn, stride_qk, stride_sn, stride_sk, stride_wn, stride_wk,
    PER_ROW: tl.constexpr, CVT: tl.constexpr, SCALE_MUL: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # fp32 product, one rounding to the output dtype (as the torch expansion does)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    kk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = n_mask[:, None] & (kk < K)[None, :]
    q = _load_w(q_ptr, offs_n, n_mask, kk, K, stride_qn, stride_qk, CVT)
    if PER_ROW:
        s = tl.load(s_ptr + offs_n * stride_sn, mask=n_mask, other=0.0)[:, None]
    else:
        s = tl.load(s_ptr + (offs_n // SBN)[:, None] * stride_sn + (kk // SBK)[None, :] * stride_sk,
                    mask=mask, other=0.0)
    w = (_to_act(q, tl.float16, CVT).to(tl.float32) * (s * SCALE_MUL)).to(w_ptr.dtype.element_ty)
    # int64 rows: a dense [N, K] weight may pass 2**31 elements
    tl.store(w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + kk[None, :] * stride_wk, w,
             mask=mask)


# ----------------------------------------------------------------------------- tuning
def _cfg(bn, bk, sk, warps=4, stages=4, bm=16):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk},
                         num_warps=warps, num_stages=stages)


def _gcfg(bm, bn, bk, sk=1, warps=4, stages=3, gm=8):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": gm,
                          "SPLIT_K": sk}, num_warps=warps, num_stages=stages)


# Not swept yet: the shapes the integer decode kernel won with on the H100 (BENCHMARKS.md:
# ~4 programs per SM, so split K 2-8 ways unless N alone gives that many tiles), with
# wider K tiles since a weight byte here is one value.
GEMV_CONFIGS = [
    _cfg(64, 128, 4), _cfg(64, 128, 8), _cfg(128, 128, 4, 8), _cfg(128, 128, 2),
    _cfg(64, 256, 4, 4, 3), _cfg(128, 256, 2, 8, 3), _cfg(32, 128, 8), _cfg(64, 64, 8, 4, 6),
    # N alone fills the GPU (lm_head-sized N)
    _cfg(64, 128, 1), _cfg(128, 128, 1, 8),
]
SAFE_GEMV_CONFIG = _cfg(32, 16, 1)  # a 16-wide K tile divides every bk; pruner's last resort
GEMM_CONFIGS = [
    # small M: the weight is streamed, the grid must fill the SMs (split K)
    _gcfg(32, 64, 128, 4, 4, 4), _gcfg(64, 64, 128, 2, 4, 4), _gcfg(64, 128, 128, 2, 4, 3),
    _gcfg(64, 64, 128, 1, 4, 4), _gcfg(64, 128, 128, 1, 4, 3), _gcfg(64, 64, 64, 1, 4, 5),
    # large M: compute-bound tiles
    _gcfg(128, 128, 64, 1, 8, 4), _gcfg(128, 128, 128, 1, 8, 3), _gcfg(128, 256, 64, 1, 8, 3),
    _gcfg(128, 64, 128, 1, 4, 3),
]
SAFE_GEMM_CONFIG = _gcfg(64, 64, 16, 1, 4, 3)


def k_tile_fits(bk: int, sbk: int, k: int) -> bool:
    """A K tile sits in one scale block (it divides bk; per-row scales: any) and is no
    wider than K needs."""
    return (sbk == 0 or sbk % bk == 0) and bk <= max(16, next_pow2(k))


def _prune_gemv(configs, named_args, **kwargs):
    a = {**named_args, **kwargs}
    n, k, sbk = a["N"], a["K"], a["SBK"]
    sms = num_sms(a["x_ptr"].device)
    kept = []
    for c in configs:
        bn, bk, sk = c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.kwargs["SPLIT_K"]
        if not k_tile_fits(bk, sbk, k):
            continue
        if sk > 1 and (n > SPLITK_MAX_N or triton.cdiv(n, bn) >= 2 * sms
                       or sk > triton.cdiv(k, bk)):
            continue
        kept.append(c)
    return kept or [SAFE_GEMV_CONFIG]


def _prune_gemm(configs, named_args, **kwargs):
    a = {**named_args, **kwargs}
    n, k, sbk, mb = a["N"], a["K"], a["SBK"], a["M_BUCKET"]
    sms = num_sms(a["x_ptr"].device)
    kept = []
    for c in configs:
        bm, bn, bk, sk = (c.kwargs[key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K"))
        if not k_tile_fits(bk, sbk, k) or bm > max(32, mb) or (mb >= 512 and bm < 64):
            continue
        tiles = triton.cdiv(mb, bm) * triton.cdiv(n, bn)
        if sk > 1 and (n > SPLITK_MAX_N or mb > 256 or tiles >= sms
                       or sk > triton.cdiv(k, bk)):
            continue
        kept.append(c)
    return kept or [SAFE_GEMM_CONFIG]


_KEY = ["M_BUCKET", "N", "K", "SBN", "SBK", "CVT"]
_gemv_tuned = triton.autotune(configs=GEMV_CONFIGS, key=_KEY,
                              prune_configs_by={"early_config_prune": _prune_gemv},
                              **autotune_kwargs())(_fp8_gemv_kernel)
_gemm_tuned = triton.autotune(configs=GEMM_CONFIGS, key=_KEY,
                              prune_configs_by={"early_config_prune": _prune_gemm},
                              **autotune_kwargs())(_fp8_gemm_kernel)


def interpret_tiles(n: int, w: Fp8Weight) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, SPLIT_K) for the interpreter, which cannot benchmark and pays per
    tl op, not per element: few large tiles; split K in two when there are 2 tiles."""
    sbk = w.scale_blocks[1]
    bk = next(b for b in (128, 64, 32, 16) if k_tile_fits(b, sbk, w.k))
    return min(128, max(16, next_pow2(n))), bk, 2 if triton.cdiv(w.k, bk) >= 2 else 1


# ----------------------------------------------------------------------------- launchers
def _launch_args(x, w, out, ws, bucket: int, cvt: bool):
    """Positional args and the layout constexprs shared by the GEMV and the GEMM."""
    m, k = x.shape
    sbn, sbk = w.scale_blocks
    q = w.q if cvt else w.q.view(torch.uint8)
    s = w.scales
    args = (x, q, s, out, ws, split_locks(x.device), m, w.n, k, sbn, sbk, bucket,
            x.stride(0), x.stride(1), q.stride(0), q.stride(1),
            s.stride(0), s.stride(1) if s.dim() == 2 else 0, out.stride(0), out.stride(1))
    return args, {"PER_ROW": sbk == 0, "CVT": cvt, "SCALE_MUL": 1.0 if cvt else BITS_SCALE}


def gemv(x: torch.Tensor, w: Fp8Weight, out: torch.Tensor,
         config: triton.Config | None = None, cvt: bool | None = None) -> torch.Tensor:
    """``out[M, N] = x[M, K] @ W.T`` for M <= 16 (x K-contiguous).  ``config`` pins a config
    and ``cvt`` the conversion (tests); otherwise autotuned / the GPU's best."""
    m = x.shape[0]
    if m > DECODE_MAX_M:
        raise ValueError(f"the FP8 GEMV takes M <= {DECODE_MAX_M}, got {m}")
    cvt = cvt_ok(x.device) if cvt is None else cvt
    if config is None and INTERPRET:
        config = _cfg(*interpret_tiles(w.n, w))
    configs = GEMV_CONFIGS if config is None else [config]
    ws = splitk_workspace(x.device, m, w.n, configs, config)
    args, consts = _launch_args(x, w, out, ws, m_bucket(m, DECODE_MAX_M), cvt)

    def grid(meta):
        tiles = triton.cdiv(w.n, meta["BLOCK_N"])
        check_split_tiles(tiles, meta["SPLIT_K"])
        return (tiles, meta["SPLIT_K"])
    if config is not None:
        _fp8_gemv_kernel[grid(config.kwargs)](*args, **consts, **config.all_kwargs())
    else:
        launch_tuned(w.plans, ("gemv", m_bucket(m, DECODE_MAX_M), x.dtype, cvt),
                     _fp8_gemv_kernel, _gemv_tuned, grid, args, consts)
    return out


def gemm(x: torch.Tensor, w: Fp8Weight, out: torch.Tensor,
         config: triton.Config | None = None, cvt: bool | None = None) -> torch.Tensor:
    """``out[M, N] = x[M, K] @ W.T`` with the tiled fused GEMM, any M (x K-contiguous)."""
    m = x.shape[0]
    cvt = cvt_ok(x.device) if cvt is None else cvt
    if config is None and INTERPRET:
        bn, bk, sk = interpret_tiles(w.n, w)
        config = _gcfg(min(64, max(16, next_pow2(m))), bn, bk, sk, gm=2)
    configs = GEMM_CONFIGS if config is None else [config]
    ws = splitk_workspace(x.device, m, w.n, configs, config)
    args, consts = _launch_args(x, w, out, ws, m_bucket(m, GEMM_M_CAP), cvt)

    def grid(meta):
        tiles = triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(w.n, meta["BLOCK_N"])
        check_split_tiles(tiles, meta["SPLIT_K"])
        return (tiles, meta["SPLIT_K"])
    if config is not None:
        _fp8_gemm_kernel[grid(config.kwargs)](*args, **consts, **config.all_kwargs())
    else:
        launch_tuned(w.plans, ("gemm", m_bucket(m, GEMM_M_CAP), x.dtype, cvt),
                     _fp8_gemm_kernel, _gemm_tuned, grid, args, consts)
    return out


def dequantize(w: Fp8Weight, dtype: torch.dtype, cvt: bool | None = None) -> torch.Tensor:
    """The dense weight [N, K] in ``dtype``: ``q * s`` in fp32, rounded once."""
    cvt = cvt_ok(w.device) if cvt is None else cvt
    out = torch.empty(w.n, w.k, device=w.device, dtype=dtype)
    sbn, sbk = w.scale_blocks
    q = w.q if cvt else w.q.view(torch.uint8)
    s = w.scales
    block_n, block_k = 32, 128
    grid = (triton.cdiv(w.n, block_n), triton.cdiv(w.k, block_k))
    _fp8_dequant_kernel[grid](
        q, s, out, w.n, w.k, sbn, max(sbk, 1), q.stride(0), q.stride(1),
        s.stride(0), s.stride(1) if s.dim() == 2 else 0, out.stride(0), out.stride(1),
        PER_ROW=sbk == 0, CVT=cvt, SCALE_MUL=1.0 if cvt else BITS_SCALE,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)
    return out
