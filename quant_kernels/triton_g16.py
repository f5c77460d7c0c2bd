"""Fused dequant-matmul for GGUF types with 16-value sub-blocks (Q6_K, Q3_K, Q2_K).

    w = g16_layout.to_g16(raw, ggml_type, K)     # once, at load
    y = g16_matmul(x, w)                         # x [..., K] fp16/bf16 -> [..., N]
    y = g16_reference(x, w)                      # pure torch fp32 oracle / CPU path

Dispatch on M (rows of x after flattening), as triton_wq does for ``WQWeight``:

* M <= 16: the decode kernel (weight streamed once, split-K when N alone gives too few
  programs for the GPU);
* 16 < M < DEQUANT_GEMM_MIN_M: the fused tiled GEMM;
* M >= DEQUANT_GEMM_MIN_M: the weight dequantized once to x.dtype by a Triton kernel,
  then cuBLAS (its dequant cost is amortized over M rows).

Launch configs are autotuned per (M bucket, N, K, type) on the first call and cached in
``G16Weight.plans`` (run every bucket once before capturing a CUDA graph).  Under
torch.compile the call goes through the custom op ``torch.ops.quantrt.g16_matmul`` (with
a fake impl).  On CPU tensors the kernels run under ``TRITON_INTERPRET=1`` (tests), else
``g16_reference``.
"""
from __future__ import annotations

import os

import torch

from . import matmul_front as front
from .g16_layout import G16Weight, dequantize_g16, g16_reference, to_g16  # noqa: F401

try:
    import triton

    from . import triton_g16_kernels as _k
    from .triton_wq_tile import (SPLITK_MAX_N, autotune_kwargs, check_split_tiles, launch_tuned,
                                 split_locks, splitk_workspace)
    from .wq_layout import m_bucket, num_sms
    HAS_TRITON = True
except ImportError:  # pragma: no cover - hosts without Triton keep the torch path
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DECODE_MAX_M = 16
GEMM_M_CAP = 4096
# scripts/bench_q6k.py --sweep on the H100: the fused GEMM won at M = 64 on every shape
# (8192x8192: 87.9 us, dequant + cuBLAS 132.1), split at M = 128 (won 108 / 118 us against
# 120 / 134 on 4096x14336 / 8192x8192, lost 47 / 159 against 33 / 126 on the other two)
# and lost at M = 256 on every shape
DEQUANT_GEMM_MIN_M = 128


# ----------------------------------------------------------------------------- configs
def _cfg(bm, bn, bk, sk=1, warps=4, stages=3, gm=None):
    kw = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk}
    if gm is not None:
        kw["GROUP_M"] = gm
    return triton.Config(kw, num_warps=warps, num_stages=stages)


def fast_ok(dtype: torch.dtype) -> bool:
    """Whether the fp16 PTX dequant applies (GPU, fp16 activations, not disabled)."""
    return (not INTERPRET and dtype == torch.float16
            and os.environ.get("QUANTRT_G16_FAST_DEQUANT", "1") != "0")


if HAS_TRITON:
    # From scripts/bench_q6k.py --sweep on the H100 (CUDA graphs, 8 weight copies): at
    # M == 1 the FMA path with small tiles and one warp won on every shape (8192x8192:
    # 41.2 us, fp16 cuBLAS 50.7); M <= 16 the dot path (16, 64, 256) splitting K in two;
    # M = 64..256 the GEMM below, with dequant + cuBLAS from DEQUANT_GEMM_MIN_M.
    GEMV_CONFIGS = [
        _cfg(1, 16, 256, 4, 1, 1), _cfg(1, 16, 256, 8, 1, 1), _cfg(1, 16, 128, 8, 1, 1),
        _cfg(1, 16, 256, 2, 1, 1), _cfg(1, 32, 128, 8, 2, 1), _cfg(1, 32, 256, 4, 2, 1),
        _cfg(1, 64, 256, 1, 4, 1),  # N alone fills the GPU (lm_head)
        _cfg(16, 64, 256, 2, 4, 3), _cfg(16, 64, 128, 8, 4, 3), _cfg(16, 64, 128, 4, 4, 3),
        _cfg(16, 64, 256, 4, 4, 3), _cfg(16, 64, 256, 1, 4, 3),
    ]
    SAFE_GEMV_CONFIG = _cfg(16, 32, 128, 1)
    GEMM_CONFIGS = [
        _cfg(64, 64, 256, 2, 4, 3, 8), _cfg(64, 64, 128, 2, 4, 4, 8),
        _cfg(64, 64, 256, 1, 4, 3, 8), _cfg(128, 64, 128, 1, 4, 3, 8),
        _cfg(128, 128, 256, 1, 8, 2, 8), _cfg(128, 128, 128, 1, 8, 3, 8),
        _cfg(16, 64, 256, 8, 4, 3, 8),
    ]
    SAFE_GEMM_CONFIG = _cfg(64, 64, 128, 1, 4, 3, 8)  # BLOCK_K = 64 broke Triton 3.6


def _prune_gemv(configs, named_args, **kwargs):
    a = {**named_args, **kwargs}
    n, k, mb = a["N"], a["K"], a["M_BUCKET"]
    kept = []
    for c in configs:
        bm, bn, bk, sk = (c.kwargs[key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K"))
        if (bm == 1 and mb > 1) or bk > min(k, 256):
            continue
        # unlike the WQ decode kernel, split K stays on where N alone gives 2+ programs
        # per SM: the sweep's best at 4096x14336 and 8192x8192, M = 1, was 16-row tiles
        # split 4 ways (35.6 / 41.2 us; the unsplit configs left 65.4 / 56.5)
        if sk > 1 and (n > SPLITK_MAX_N or sk > triton.cdiv(k, bk)):
            continue
        kept.append(c)
    return kept or [SAFE_GEMV_CONFIG]


def _prune_gemm(configs, named_args, **kwargs):
    a = {**named_args, **kwargs}
    n, k, mb = a["N"], a["K"], a["M_BUCKET"]
    sms = num_sms(a["x_ptr"].device)
    kept = []
    for c in configs:
        bm, bn, bk, sk = (c.kwargs[key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K"))
        if bk > min(k, 256) or bm > max(32, mb) or (mb >= 512 and bm < 64):
            continue
        tiles = triton.cdiv(mb, bm) * triton.cdiv(n, bn)
        if sk > 1 and (n > SPLITK_MAX_N or mb > 256 or tiles >= sms or sk > triton.cdiv(k, bk)):
            continue
        kept.append(c)
    return kept or [SAFE_GEMM_CONFIG]


_KEY = ["M_BUCKET", "N", "K", "HAS_HI", "HAS_MIN", "ZERO", "FAST"]
if HAS_TRITON:
    _gemv_tuned = triton.autotune(configs=GEMV_CONFIGS, key=_KEY,
                                  prune_configs_by={"early_config_prune": _prune_gemv},
                                  **autotune_kwargs())(_k._g16_gemv_kernel)
    _gemm_tuned = triton.autotune(configs=GEMM_CONFIGS, key=_KEY,
                                  prune_configs_by={"early_config_prune": _prune_gemm},
                                  **autotune_kwargs())(_k._g16_gemm_kernel)


# ----------------------------------------------------------------------------- launch
def _weight_args(w: G16Weight, act_dtype: torch.dtype) -> tuple[tuple, tuple, dict]:
    """(pointers, strides, constexprs) of a weight; absent tensors pass a stand-in that
    the kernel never reads, and mn / dmin must share sc / d's strides."""
    if w.mn is not None and (w.mn.stride() != w.sc.stride() or w.dmin.stride() != w.d.stride()):
        raise ValueError("G16Weight.mn / dmin must have sc / d's strides")
    qhi = w.qhi if w.qhi is not None else w.qlo
    ptrs = (w.qlo, qhi, w.sc, w.d, w.mn if w.mn is not None else w.sc,
            w.dmin if w.dmin is not None else w.d)
    strides = (*w.qlo.stride(), *(qhi.stride() if w.qhi is not None else (0, 0)),
               *w.sc.stride(), *w.d.stride())
    consts = {"HAS_HI": w.qhi is not None, "HAS_MIN": w.mn is not None, "ZERO": w.zero,
              "FAST": fast_ok(act_dtype)}
    return ptrs, strides, consts


def gemv(x: torch.Tensor, w: G16Weight, out: torch.Tensor,
         config: triton.Config | None = None) -> torch.Tensor:
    """``out[M, N] = x[M, K] @ W.T`` for M <= 16 (shapes checked by the caller).
    ``config`` pins a config (tests); otherwise autotuned, or fixed when interpreting."""
    m, k = x.shape
    if m > DECODE_MAX_M:
        raise ValueError(f"gemv takes M <= {DECODE_MAX_M}, got {m}")
    if config is None and INTERPRET:  # few large tiles: the interpreter pays per tl op
        config = _cfg(1 if m == 1 else 16, min(64, max(16, triton.next_power_of_2(w.n))),
                      256, 2 if k >= 512 else 1)
    if config is not None and config.kwargs["BLOCK_M"] < m:
        raise ValueError(f"config BLOCK_M={config.kwargs['BLOCK_M']} < M={m}")
    ptrs, strides, consts = _weight_args(w, x.dtype)
    ws = splitk_workspace(x.device, m, w.n, GEMV_CONFIGS, config)
    args = (x, *ptrs, out, ws, split_locks(x.device), m, w.n, k, m_bucket(m, DECODE_MAX_M),
            x.stride(0), x.stride(1), *strides, out.stride(0), out.stride(1))

    def grid(meta):
        tiles = (triton.cdiv(w.n, meta["BLOCK_N"]), meta["SPLIT_K"],
                 triton.cdiv(m, meta["BLOCK_M"]))
        check_split_tiles(tiles[0] * tiles[2], meta["SPLIT_K"])
        return tiles
    if config is not None:
        _k._g16_gemv_kernel[grid(config.kwargs)](*args, **consts, **config.all_kwargs())
    else:
        launch_tuned(w.plans, ("gemv", m_bucket(m, DECODE_MAX_M), x.dtype),
                     _k._g16_gemv_kernel, _gemv_tuned, grid, args, consts)
    return out


def gemm(x: torch.Tensor, w: G16Weight, out: torch.Tensor,
         config: triton.Config | None = None) -> torch.Tensor:
    """``out[M, N] = x[M, K] @ W.T`` with the fused tiled GEMM (any M)."""
    m, k = x.shape
    if config is None and INTERPRET:
        config = _cfg(min(64, max(16, triton.next_power_of_2(m))),
                      min(64, max(16, triton.next_power_of_2(w.n))), 256,
                      2 if k >= 512 else 1, gm=2)
    ptrs, strides, consts = _weight_args(w, x.dtype)
    ws = splitk_workspace(x.device, m, w.n, GEMM_CONFIGS, config)
    args = (x, *ptrs, out, ws, split_locks(x.device), m, w.n, k, m_bucket(m, GEMM_M_CAP),
            x.stride(0), x.stride(1), *strides, out.stride(0), out.stride(1))

    def grid(meta):
        tiles = triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(w.n, meta["BLOCK_N"])
        check_split_tiles(tiles, meta["SPLIT_K"])
        return (tiles, meta["SPLIT_K"])
    if config is not None:
        _k._g16_gemm_kernel[grid(config.kwargs)](*args, **consts, **config.all_kwargs())
    else:
        launch_tuned(w.plans, ("gemm", m_bucket(m, GEMM_M_CAP), x.dtype),
                     _k._g16_gemm_kernel, _gemm_tuned, grid, args, consts)
    return out


def dequantize(w: G16Weight, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight [N, K] in ``dtype`` (fp16/bf16), by the Triton dequant kernel."""
    out = torch.empty(w.n, w.k, device=w.device, dtype=dtype)
    ptrs, strides, consts = _weight_args(w, dtype)
    block_n, block_k = 32, 256 if INTERPRET else 128
    grid = (triton.cdiv(w.n, block_n), triton.cdiv(w.k, block_k))
    _k._g16_dequant_kernel[grid](*ptrs, out, w.n, w.k, *strides, out.stride(0), out.stride(1),
                                 **consts, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)
    return out


# ----------------------------------------------------------------------------- dispatch
def _matmul_2d(x: torch.Tensor, w: G16Weight, out: torch.Tensor | None) -> torch.Tensor:
    return front.by_rows(x, w.n, out, HAS_TRITON, lambda x: g16_reference(x, w),
                         lambda x, o: gemv(x, w, o), lambda x, o: gemm(x, w, o),
                         lambda x, o: dequant_matmul(x, w, o), DECODE_MAX_M, DEQUANT_GEMM_MIN_M)


def dequant_matmul(x: torch.Tensor, w: G16Weight, out: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """The large-M path: Triton dequant of the whole weight to x.dtype, then cuBLAS."""
    return front.dense_matmul(x, dequantize(w, x.dtype), out)


@torch.library.custom_op("quantrt::g16_matmul", mutates_args=())
def _g16_matmul_op(x: torch.Tensor, qlo: torch.Tensor, qhi: torch.Tensor | None,
                   sc: torch.Tensor, d: torch.Tensor, mn: torch.Tensor | None,
                   dmin: torch.Tensor | None, k: int, zero: int) -> torch.Tensor:
    return _matmul_2d(x, G16Weight(qlo, qhi, sc, d, mn, dmin, k, zero), None)


@_g16_matmul_op.register_fake
def _g16_matmul_fake(x, qlo, qhi, sc, d, mn, dmin, k, zero):
    torch._check(x.shape[1] == k)
    return x.new_empty((x.shape[0], qlo.shape[0]))


def g16_matmul(x: torch.Tensor, w: G16Weight, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x[..., K] @ W.T`` -> ``[..., N]`` in x.dtype, fp32 accumulation; ``out`` (shape
    [..., N], dtype x.dtype) is written in place (see ``matmul_front``)."""
    return front.matmul(
        x, w.k, w.n, w.device, out, lambda x2, o: _matmul_2d(x2, w, o),
        lambda x2: torch.ops.quantrt.g16_matmul(x2, w.qlo, w.qhi, w.sc, w.d, w.mn, w.dmin,
                                                w.k, w.zero))


__all__ = ["G16Weight", "to_g16", "g16_matmul", "g16_reference", "dequantize_g16",
           "dequant_matmul", "dequantize", "gemv", "gemm", "DECODE_MAX_M",
           "DEQUANT_GEMM_MIN_M", "HAS_TRITON"]
