"""Fused dequant-matmul for every integer weight-only format (public API).

    w = pack_wq(q, scales, bias, group_size, bits, perm=None, dtype=torch.float16)
    y = wq_matmul(x, w)            # x [..., K] fp16/bf16 -> [..., N]
    y = wq_reference(x, w)         # pure torch fp32 oracle / CPU path

Dispatch on M (rows of x after flattening leading dims):

* M <= 16: ``triton_wq_mma`` (4-bit; 8-bit with fp16; groups of 32, 64 or whole slabs:
  mma.sync on tensor cores, weights unpacked in registers), on Hopper for 4-bit at M >= 9
  ``gluon_wq_decode`` (TMA ring, wgmma with the weight as register operand, split-K) or
  the FMA kernels -- ``triton_wq_gemv1`` at M = 1 (packed-half dot products in PTX), else
  ``triton_wq_gemv`` (split-K when N alone is too few programs) -- whichever is fastest,
  timed once per shape and M bucket;
* 16 < M <= 64: the fastest of ``triton_wq_gemv.swap`` (the decode kernel with M tiles
  of 32/64), ``triton_wq_gemm`` and, on Hopper, ``gluon_wq_gemm.ws_matmul`` (the Gluon
  GEMMs: warp-specialized TMA / dequant / wgmma, or for 4-bit ``gluon_wq_rs`` with the
  weight dequantized straight into wgmma's register operand), timed once per shape;
* 64 < M < DEQUANT_GEMM_MIN_M: the fastest of ``triton_wq_gemm`` (fused dequant tiled
  GEMM), ``gluon_wq_gemm`` and the dequantize + cuBLAS path below, timed once per shape
  and M bucket (on the H100 the fused kernels win at M = 64-128 for 4-bit groups of 128
  and lose 2-3x at M = 256 for groups of 32 and 8-bit weights, whose per-M-tile dequant
  costs more);
* M >= DEQUANT_GEMM_MIN_M: dequantize the whole weight once to x.dtype with a Triton
  kernel, then cuBLAS (its cost is amortized over M rows), or on Hopper
  ``gluon_wq_gemm`` where that is faster, timed once per M bucket up to 4096.

Under torch.compile, ``wq_matmul`` goes through the custom op ``torch.ops.quantrt.wq_matmul``
(with a fake impl); eager calls launch directly, with the autotuned config cached per weight
and M bucket (``WQWeight.plans``).
Autotuning benchmarks on the first call of each (M bucket, N, K, group, bits, dtype): run
every bucket once before capturing a CUDA graph.  Tuned configs are kept in Triton's
on-disk cache (Triton >= 3.2 ``cache_results``).

On CPU tensors it runs the Triton kernels under ``TRITON_INTERPRET=1`` (tests) and
``wq_reference`` otherwise.
"""
from __future__ import annotations

import os

import torch

from . import matmul_front as front
from .wq_layout import (WQWeight, dequantize_wq, m_bucket, pack_wq,  # noqa: F401
                        perm_from_g_idx, unpack_q, wq_reference)

try:
    from . import gluon_wq_decode as _decode
    from . import gluon_wq_gemm as _ws
    from . import triton_wq_gemm as _gemm
    from . import triton_wq_gemv as _gemv
    from . import triton_wq_gemv1 as _gemv1
    from . import triton_wq_mma as _mma
    from .triton_wq_tile import CHOICES as _CHOICE  # noqa: F401 (the tests read it)
    from .triton_wq_tile import timed_choice as _timed_choice
    HAS_TRITON = True
except ImportError:  # pragma: no cover - hosts without Triton keep the torch path
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DECODE_MAX_M = 16
# From M = 512 on, dequantize + cuBLAS beat the fused GEMM on every H100 shape measured
# (scripts/sweep_wq.py, BENCHMARKS.md: 8192x8192 M=512 154.7 us vs 168.6 us); at M = 256
# the fused kernel still won on three of the four shapes.
DEQUANT_GEMM_MIN_M = 512
# Above triton_wq_gemv.SWAP_MAX_M the timed choice may already pick dequantize + cuBLAS:
# from here a call may hold a dense copy of the weight (quantrt.estimate.memory mirrors it).
DENSE_FROM_M = 65
def _matmul_2d(x: torch.Tensor, w: WQWeight, out: torch.Tensor | None) -> torch.Tensor:
    m = x.shape[0]
    if out is None:
        out = torch.empty(m, w.n, device=x.device, dtype=x.dtype)
    if m == 0:
        return out
    if not front.uses_triton(x, HAS_TRITON):
        return out.copy_(wq_reference(x, w))
    if w.perm is not None:
        x = x.index_select(1, w.perm)
    if x.stride(-1) != 1:
        x = x.contiguous()
    if m <= DECODE_MAX_M:
        old = _gemv1.gemv1 if m == 1 and _gemv1.can_run(x, w)[0] else _gemv.gemv
        fns = {"mma": _mma.mma_matmul} if _mma.can_run(x, w)[0] else {}
        if _decode.can_run_decode(x, w)[0]:
            fns["rs"] = _decode.decode_matmul
        if not fns:
            return old(x, w, out)
        fns["fma"] = old
        return fns[_timed_choice(x, w, out, fns, DECODE_MAX_M, next(iter(fns)))](x, w, out)
    mid = {"gemm": _gemm.gemm}
    if _ws.can_run(x, w)[0]:
        mid["ws"] = _ws.ws_matmul
    if m <= _gemv.SWAP_MAX_M:
        fns = {"swap": _gemv.swap, **mid}
        return fns[_timed_choice(x, w, out, fns, _gemv.SWAP_MAX_M, "gemm")](x, w, out)
    if m < DEQUANT_GEMM_MIN_M:
        fns = {**mid, "dense": _dense_permuted}
        return fns[_timed_choice(x, w, out, fns, DEQUANT_GEMM_MIN_M, "gemm")](x, w, out)
    if "ws" in mid:
        fns = {"ws": _ws.ws_matmul, "dense": _dense_permuted}
        return fns[_timed_choice(x, w, out, fns, _ws.MAX_M_BUCKET, "dense")](x, w, out)
    return dequant_matmul(x, w, out, permuted=True)


def _dense_permuted(x: torch.Tensor, w: WQWeight, out: torch.Tensor) -> torch.Tensor:
    return dequant_matmul(x, w, out, permuted=True)


def dequant_matmul(x: torch.Tensor, w: WQWeight, out: torch.Tensor | None = None,
                   permuted: bool = False) -> torch.Tensor:
    """The large-M path: Triton dequant of the whole weight to x.dtype, then cuBLAS."""
    if w.perm is not None and not permuted:
        x = x.index_select(1, w.perm)
    return front.dense_matmul(x, _gemm.dequantize(w, x.dtype), out)


@torch.library.custom_op("quantrt::wq_matmul", mutates_args=())
def _wq_matmul_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                  bias: torch.Tensor, perm: torch.Tensor | None, k: int, group_size: int,
                  bits: int) -> torch.Tensor:
    w = WQWeight(qweight, scales, bias, perm, k, group_size, bits)
    return _matmul_2d(x, w, None)


@_wq_matmul_op.register_fake
def _wq_matmul_fake(x, qweight, scales, bias, perm, k, group_size, bits):
    torch._check(x.shape[1] == k)
    return x.new_empty((x.shape[0], qweight.shape[0]))


def wq_matmul(x: torch.Tensor, w: WQWeight, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x[..., K] @ W.T`` -> ``[..., N]`` in x.dtype, fp32 accumulation; ``out`` (shape
    [..., N], dtype x.dtype) is written in place.  Eager calls launch directly, which also
    keeps ``w.plans`` (see ``matmul_front``)."""
    return front.matmul(
        x, w.k, w.n, w.device, out, lambda x2, o: _matmul_2d(x2, w, o),
        lambda x2: torch.ops.quantrt.wq_matmul(x2, w.qweight, w.scales, w.bias, w.perm, w.k,
                                               w.group_size, w.bits))


__all__ = ["WQWeight", "pack_wq", "wq_reference", "wq_matmul", "dequant_matmul",
           "dequantize_wq", "perm_from_g_idx", "unpack_q", "DEQUANT_GEMM_MIN_M",
           "DECODE_MAX_M", "HAS_TRITON"]
