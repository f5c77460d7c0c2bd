"""Fused dequant-matmul for FP8 (e4m3fn) weights with fp16/bf16 activations (W8A16).

    w = pack_fp8(q, scales, block=None)     # q [N, K] float8_e4m3fn
    y = fp8_matmul(x, w)                    # x [..., K] fp16/bf16 -> [..., N]
    y = fp8_reference(x, w)                 # fp32 torch oracle / CPU path

Scales (float32 after packing): one per output row ``[N]`` (per-tensor shard scales
repeated per row, and per-channel), or one per ``bn x bk`` block ``[ceil(N/bn),
ceil(K/bk)]`` (DeepSeek / compressed-tensors layout, partial edge blocks allowed).  The
kernels index them as ``s[n // SBN, k // SBK]``: any ``bn`` works (a gather per row), and
the K tiles must divide ``bk`` (a multiple of 16), so a tile sits in one scale block.

Every e4m3 value is exact in fp16 and bf16, so a K tile is converted and fed to the MMA
as it is; the scale multiplies the fp32 result of the tile's dot (block scales) or the
accumulator once at the end (per-row), which keeps the inner loop convert + MMA.  This is
more exact than expanding ``q * s`` to fp16 first (one rounding per weight less).

* Conversion ``CVT``: ``.to()`` on tl.float8e4nv (one ``cvt.rn.f16x2.e4m3x2`` per pair;
  sm_89+).  Older GPUs (sm_80/86) take the bits path: sign and the 7 exponent/mantissa
  bits moved under fp16's exponent give exactly ``q * 2**-8`` (subnormals included), and
  the ``2**8`` goes into the scale.  The e4m3fn NaN codes (0x7F, 0xFF) become finite
  there; quantized weights never hold them.
* Decode (M <= 16): weight-stationary ``tl.dot(W_tile, x_tile^T)`` with M padded to 16
  ("swap AB": weight rows on the MMA's M side), split K so that small N fills the GPU;
  the last split to finish sums the fp32 partials in the same launch (``store_tile``).
* GEMM (16 < M < DEQUANT_GEMM_MIN_M): x-stationary tiles, GROUP_M swizzle, split K for
  small grids.
* M >= DEQUANT_GEMM_MIN_M: the weight is expanded once to x.dtype by a Triton kernel and
  multiplied by cuBLAS (the expansion is amortized over M rows).

The kernels live in ``triton_fp8_kernels``.  Autotuned on (M bucket, N, K, scale blocks,
conversion): run every M bucket once before capturing a CUDA graph.  The picked config is
kept per weight (``Fp8Weight.plans``) and launched directly afterwards.  Under
``TRITON_INTERPRET=1`` the kernels run on CPU tensors with fixed configs: the interpreter
loads tl.float8e4nv and converts it like the GPU (NaN codes aside), so no emulation is
needed; both conversion paths are tested there.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from . import matmul_front as front

try:
    from . import triton_fp8_kernels as _k
    HAS_TRITON = True
except ImportError:  # pragma: no cover - hosts without Triton keep the torch path
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DECODE_MAX_M = 16
# Not measured yet (scripts/bench_fp8_wo.py prints both paths at every M): for the
# integer formats dequant + cuBLAS won from M = 512 on the H100; FP8's conversion is
# cheaper than int4 unpacking, so the fused GEMM should hold out longer.
DEQUANT_GEMM_MIN_M = 1024


@dataclass(frozen=True)
class Fp8Weight:
    """An FP8 ``[N, K]`` weight and its float32 scales (see the module docstring)."""

    q: torch.Tensor                       # float8_e4m3fn [N, K], K-contiguous
    scales: torch.Tensor                  # float32 [N] or [ceil(N/bn), ceil(K/bk)]
    block: tuple[int, int] | None         # (bn, bk), None: one scale per row
    plans: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def n(self) -> int:
        return self.q.shape[0]

    @property
    def k(self) -> int:
        return self.q.shape[1]

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def scale_blocks(self) -> tuple[int, int]:
        """(SBN, SBK) as the kernels take them; SBK 0 means one scale per row."""
        return self.block if self.block is not None else (1, 0)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def pack_fp8(q: torch.Tensor, scales: torch.Tensor,
             block: tuple[int, int] | None = None) -> Fp8Weight:
    """Check and lay out ``q`` [N, K] float8_e4m3fn with one scale per tensor ([1]), per row
    ([N] or [N, 1]) or, with ``block=(bn, bk)``, per block ``[ceil(N/bn), ceil(K/bk)]``
    (``bk`` a multiple of 16).  Raises ValueError on bad input."""
    _check(isinstance(q, torch.Tensor) and q.dim() == 2 and q.dtype == torch.float8_e4m3fn,
           "q must be a 2-D float8_e4m3fn tensor [N, K]")
    n, k = q.shape
    _check(n >= 1 and k >= 1, f"empty weight [{n}, {k}]")
    _check(isinstance(scales, torch.Tensor) and scales.dtype.is_floating_point,
           "scales must be a floating-point tensor")
    _check(scales.device == q.device, f"scales are on {scales.device}, q on {q.device}")
    s = scales.float()
    if block is None:
        _check(s.numel() in (1, n) and (s.dim() <= 1 or tuple(s.shape) == (n, 1)),
               f"per-row scales must have shape [1], [N] or [N, 1] with N={n}, "
               f"got {tuple(scales.shape)}")
        s = s.reshape(-1).expand(n)
    else:
        bn, bk = (int(b) for b in block)
        _check(bn >= 1 and bk >= 16 and bk % 16 == 0,
               f"block must be (bn >= 1, bk a multiple of 16), got {tuple(block)}")
        want = (-(-n // bn), -(-k // bk))
        _check(tuple(s.shape) == want, f"block scales must have shape [ceil(N/bn), "
               f"ceil(K/bk)] = {list(want)}, got {tuple(scales.shape)}")
        block = (bn, bk)
    return Fp8Weight(q.contiguous(), s.contiguous(), block)


def dequantize_fp8_ref(w: Fp8Weight) -> torch.Tensor:
    """float32 W [N, K] = q * s (torch)."""
    sbn, sbk = w.scale_blocks
    s = w.scales.reshape(-1, 1) if sbk == 0 else \
        w.scales.repeat_interleave(sbn, 0)[:w.n].repeat_interleave(sbk, 1)[:, :w.k]
    return w.q.float() * s


def fp8_reference(x: torch.Tensor, w: Fp8Weight) -> torch.Tensor:
    """Oracle and CPU path: ``x @ W.T`` in fp32, cast to ``x.dtype``."""
    _check(x.shape[-1] == w.k, f"x has K={x.shape[-1]}, weight has K={w.k}")
    return (x.float() @ dequantize_fp8_ref(w).to(x.device).t()).to(x.dtype)


# ----------------------------------------------------------------------------- dispatch
def _matmul_2d(x: torch.Tensor, w: Fp8Weight, out: torch.Tensor | None) -> torch.Tensor:
    return front.by_rows(x, w.n, out, HAS_TRITON, lambda x: fp8_reference(x, w),
                         lambda x, o: _k.gemv(x, w, o), lambda x, o: _k.gemm(x, w, o),
                         lambda x, o: dequant_matmul(x, w, o), DECODE_MAX_M, DEQUANT_GEMM_MIN_M)


def dequant_matmul(x: torch.Tensor, w: Fp8Weight, out: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """The large-M path: Triton expansion of the whole weight to x.dtype, then cuBLAS."""
    return front.dense_matmul(x, _k.dequantize(w, x.dtype), out)


@torch.library.custom_op("quantrt::fp8_matmul", mutates_args=())
def _fp8_matmul_op(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, block_n: int,
                   block_k: int) -> torch.Tensor:
    w = Fp8Weight(q, scales, (block_n, block_k) if block_k else None)
    return _matmul_2d(x, w, None)


@_fp8_matmul_op.register_fake
def _fp8_matmul_fake(x, q, scales, block_n, block_k):
    torch._check(x.shape[1] == q.shape[1])
    return x.new_empty((x.shape[0], q.shape[0]))


def fp8_matmul(x: torch.Tensor, w: Fp8Weight, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x[..., K] @ W.T`` -> ``[..., N]`` in x.dtype (fp16/bf16), fp32 accumulation;
    ``out`` (shape [..., N], dtype x.dtype) is written in place (see ``matmul_front``)."""
    bn, bk = w.block or (0, 0)
    return front.matmul(
        x, w.k, w.n, w.device, out, lambda x2, o: _matmul_2d(x2, w, o),
        lambda x2: torch.ops.quantrt.fp8_matmul(x2, w.q, w.scales, bn, bk))


__all__ = ["Fp8Weight", "pack_fp8", "fp8_matmul", "fp8_reference", "dequant_matmul",
           "dequantize_fp8_ref", "DECODE_MAX_M", "DEQUANT_GEMM_MIN_M", "HAS_TRITON"]
