"""Fused dequant-matmul for bitsandbytes 4-bit code-book weights (NF4, FP4) (public API).

    w = pack_lut4(packed, absmax, code, blocksize, (N, K), wdtype)
    y = lut4_matmul(x, w)            # x [..., K] fp16/bf16 -> [..., N]
    y = lut4_reference(x, w)         # fp32 torch oracle / CPU path

Semantics are bitsandbytes' ``dequantize_4bit`` followed by a matmul in x's dtype:
``w = float32(code[idx] * absmax[block])`` rounded to the weight's own dtype (the
quant_state's ``dtype``) and then to x's dtype; products accumulate in fp32.

Layout (made once, when the layer's kernel is built):

* ``codes`` uint8 ``[N, K/2]``: bitsandbytes' own bytes, viewed, not copied (two codes per
  byte, the even column in the high nibble).  K-contiguous rows are what the kernels
  want: a ``[BLOCK_N, BLOCK_K/2]`` tile is BLOCK_N runs of >= 16 contiguous bytes (whole
  32-byte sectors from BLOCK_K = 64 on), loaded as 16-byte vectors since every row starts
  16-byte aligned (K is a multiple of the block size, itself a multiple of 32).  A
  transposed ``[K/8, N]`` int32 layout would coalesce as well but costs a repack and a
  second copy of the weight at load, and buys nothing: the high/low nibbles of a byte are
  adjacent columns, which the kernels handle by pairing them with the even and odd
  activation columns (no in-register shuffle).
* ``absmax`` fp32 ``[K/blocksize, N]`` (double quant undone at load): block-major, so a
  K tile's scales for BLOCK_N rows are one coalesced load.  This needs every block inside
  one row (``K % blocksize == 0``); other shapes keep the torch expansion kernel.
* ``lut`` fp32 ``[16]``: the code book (``weight.quant_map``), gathered per code; it sits
  in L1 after the first touch.

Dispatch on M (rows of x after flattening leading dims):

* M <= DECODE_MAX_M: the weight-stationary kernel with split K (``triton_lut4_kernels``):
  an FMA path at M == 1, tensor cores (M padded to 16) otherwise;
* M < DEQUANT_GEMM_MIN_M: the same kernel with M tiles of 32..128 (an empty range on the
  H100's measurements: see the constant);
* from DEQUANT_GEMM_MIN_M on: a Triton kernel expands the whole weight to x.dtype once,
  then cuBLAS (the expansion is amortized over M rows; the fused kernel re-expands each
  weight tile for every M tile).

Under torch.compile the call goes through ``torch.ops.quantrt.lut4_matmul`` (fake impl
registered); eager calls launch directly with the autotuned config cached per weight
(``Lut4Weight.plans``).  On CPU tensors the Triton kernels run under
``TRITON_INTERPRET=1`` (tests), else the torch reference does.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from . import matmul_front as front

try:
    from . import triton_lut4_kernels as _k
    HAS_TRITON = True
except ImportError:  # pragma: no cover - hosts without Triton keep the torch path
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DECODE_MAX_M = 16
# Measured on the H100 (scripts/bench_lut4.py, NF4 blocksize 64, 8192x8192, BENCHMARKS.md):
# Triton expansion + cuBLAS 123 us at M = 64 and 129 us at M = 256, flat in M, against the
# fused tiled kernel's 185 and 394 us (its per-value gather and roundings are repeated for
# every M tile) and the decode kernel's 141 us at M = 16.  So every M above the decode range
# takes the expansion; the fused M tiles stay reachable through ``_k.fused`` (tests).
DEQUANT_GEMM_MIN_M = DECODE_MAX_M + 1
# The smallest K tile of the kernels: block sizes must be multiples of it.
MIN_BLOCK_K = 32
WEIGHT_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # -> kernels' WROUND


@dataclass(frozen=True)
class Lut4Weight:
    """A ``[N, K]`` 4-bit code-book weight in the kernels' layout (module docstring)."""

    codes: torch.Tensor      # uint8 [N, K/2], row-major, even column in the high nibble
    absmax: torch.Tensor     # float32 [K / blocksize, N]
    lut: torch.Tensor        # float32 [16]
    blocksize: int
    wdtype: torch.dtype      # the weight's own dtype: every value is rounded to it
    # Launch configs the autotuner picked, by (M bucket, x dtype): later calls launch
    # directly, skipping the autotuner's per-call work.
    plans: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def n(self) -> int:
        return self.codes.shape[0]

    @property
    def k(self) -> int:
        return self.codes.shape[1] * 2

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def wround(self) -> int:
        return WEIGHT_DTYPES[self.wdtype]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.absmax, self.lut))


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def layout_refusal(rows: int, cols: int, blocksize: int) -> str | None:
    """Why a ``[rows, cols]`` weight in blocks of ``blocksize`` cannot take this layout."""
    if blocksize < MIN_BLOCK_K or blocksize % MIN_BLOCK_K:
        return (f"block size {blocksize} is not a multiple of {MIN_BLOCK_K} (the kernels' "
                "smallest K tile)")
    if cols % blocksize:
        return (f"K={cols} is not a multiple of the block size {blocksize}: absmax blocks "
                "straddle weight rows")
    if rows < 1:
        return f"empty weight [{rows}, {cols}]"
    return None


def pack_lut4(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
              shape: tuple[int, int], wdtype: torch.dtype) -> Lut4Weight:
    """bitsandbytes' flat packed bytes (``ceil(N*K/2)``, any storage dtype), fp32 absmax
    (``N*K/blocksize``, double quant already undone) and 16-entry code -> Lut4Weight.
    Raises ValueError on input the layout cannot take."""
    rows, cols = (int(s) for s in shape)
    why = layout_refusal(rows, cols, int(blocksize))
    _check(why is None, f"pack_lut4: {why}")
    _check(wdtype in WEIGHT_DTYPES, f"pack_lut4: weight dtype {wdtype} (float32, float16 or "
                                    "bfloat16)")
    _check(isinstance(packed, torch.Tensor) and isinstance(absmax, torch.Tensor)
           and isinstance(code, torch.Tensor), "pack_lut4: packed, absmax and code are tensors")
    flat = packed.contiguous().reshape(-1)
    if flat.dtype != torch.uint8:  # bnb_4bit_quant_storage: the same bytes, another dtype
        flat = flat.view(torch.uint8)
    n = rows * cols
    _check(flat.numel() == n // 2, f"pack_lut4: {flat.numel()} bytes, but a [{rows}, {cols}] "
                                   f"weight has {n // 2}")
    _check(absmax.dtype.is_floating_point and absmax.numel() == n // blocksize,
           f"pack_lut4: absmax must hold {n // blocksize} floats (one per {blocksize} "
           f"values), got {absmax.dtype} with {absmax.numel()}")
    _check(code.dtype.is_floating_point and code.numel() == 16,
           f"pack_lut4: the code book must hold 16 floats, got {code.dtype} with {code.numel()}")
    dev = flat.device
    _check(absmax.device == dev and code.device == dev,
           f"pack_lut4: packed on {dev}, absmax on {absmax.device}, code on {code.device}")
    am = absmax.float().reshape(rows, cols // blocksize).t().contiguous()
    return Lut4Weight(flat.view(rows, cols // 2), am, code.float().reshape(16).contiguous(),
                      int(blocksize), wdtype)


def concat_lut4(ws: list[Lut4Weight]) -> Lut4Weight:
    """Weights sharing K, block size, code book and dtype, stacked along N (fused q/k/v)."""
    first = ws[0]
    for w in ws[1:]:
        _check(mergeable(first, w), "concat_lut4: the weights differ in K, block size, code "
                                    "book or dtype")
    if len(ws) == 1:
        return first
    return Lut4Weight(torch.cat([w.codes for w in ws]), torch.cat([w.absmax for w in ws], 1),
                      first.lut, first.blocksize, first.wdtype)


def mergeable(a: Lut4Weight, b: Lut4Weight) -> bool:
    return (a.k == b.k and a.blocksize == b.blocksize and a.wdtype == b.wdtype
            and a.device == b.device and torch.equal(a.lut, b.lut))


def dequantize_lut4_ref(w: Lut4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W ``[N, K]``: fp32 ``code * absmax``, rounded to ``w.wdtype``, then to ``dtype``."""
    c = w.codes.to(torch.int64)
    idx = torch.stack([c >> 4, c & 0xF], dim=-1).reshape(w.n, w.k)
    scale = w.absmax.t().repeat_interleave(w.blocksize, dim=1)
    return (w.lut[idx] * scale).to(w.wdtype).to(dtype)


def lut4_reference(x: torch.Tensor, w: Lut4Weight) -> torch.Tensor:
    """Oracle and CPU path: ``x @ W.T`` in fp32 on the weight rounded as bitsandbytes does
    (to its own dtype, then to x's), cast to ``x.dtype``."""
    _check(x.shape[-1] == w.k, f"x has K={x.shape[-1]}, the weight has K={w.k}")
    wt = dequantize_lut4_ref(w, x.dtype).float().to(x.device)
    return (x.float() @ wt.t()).to(x.dtype)


# ----------------------------------------------------------------------------- dispatch
def _matmul_2d(x: torch.Tensor, w: Lut4Weight, out: torch.Tensor | None) -> torch.Tensor:
    return front.by_rows(x, w.n, out, HAS_TRITON, lambda x: lut4_reference(x, w),
                         lambda x, o: _k.fused(x, w, o), lambda x, o: _k.fused(x, w, o),
                         lambda x, o: dequant_matmul(x, w, o), DECODE_MAX_M, DEQUANT_GEMM_MIN_M)


def dequant_matmul(x: torch.Tensor, w: Lut4Weight, out: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """The large-M path: Triton expansion of the whole weight to x.dtype, then cuBLAS."""
    return front.dense_matmul(x, _k.expand(w, x.dtype), out)


@torch.library.custom_op("quantrt::lut4_matmul", mutates_args=())
def _lut4_matmul_op(x: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor,
                    lut: torch.Tensor, blocksize: int, wround: int) -> torch.Tensor:
    wdtype = next(d for d, v in WEIGHT_DTYPES.items() if v == wround)
    return _matmul_2d(x, Lut4Weight(codes, absmax, lut, blocksize, wdtype), None)


@_lut4_matmul_op.register_fake
def _lut4_matmul_fake(x, codes, absmax, lut, blocksize, wround):
    torch._check(x.shape[1] == codes.shape[1] * 2)
    return x.new_empty((x.shape[0], codes.shape[0]))


def lut4_matmul(x: torch.Tensor, w: Lut4Weight, out: torch.Tensor | None = None
                ) -> torch.Tensor:
    """``x[..., K] @ W.T`` -> ``[..., N]`` in x.dtype (fp16/bf16), fp32 accumulation;
    ``out`` (shape [..., N], dtype x.dtype) is written in place (see ``matmul_front``)."""
    return front.matmul(
        x, w.k, w.n, w.device, out, lambda x2, o: _matmul_2d(x2, w, o),
        lambda x2: torch.ops.quantrt.lut4_matmul(x2, w.codes, w.absmax, w.lut, w.blocksize,
                                                 w.wround))


__all__ = ["Lut4Weight", "pack_lut4", "concat_lut4", "mergeable", "layout_refusal",
           "lut4_matmul", "lut4_reference", "dequant_matmul", "dequantize_lut4_ref",
           "DECODE_MAX_M", "DEQUANT_GEMM_MIN_M", "HAS_TRITON"]
