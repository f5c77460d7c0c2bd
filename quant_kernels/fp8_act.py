"""Dynamic per-token FP8 (e4m3) quantization of activations in one Triton launch.

    xq, scale = quant_per_token(x, ub=None)    # x [M, K] fp16/bf16 -> fp8 [M, K], fp32 [M, 1]

``scale = max(min(amax(|x_row|), ub) / 448, 1e-12)`` and ``xq = clamp(x / scale)`` rounded
to e4m3: the same numbers as the torch expression it replaces in the W8A8 kernel
(``quantrt.quant.fp8_kernels``), which spends four passes over x (abs/amax, float(),
divide/clamp, cast).  Here one program per row reads the row once (K <= 8192: it stays
in registers; longer rows are read twice, the second time from L2) and writes one byte
per value.
"""
from __future__ import annotations

import os

import torch

E4M3_MAX = 448.0

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False


def quant_per_token_ref(x: torch.Tensor, ub: float | None = None):
    """Torch version (CPU path and oracle)."""
    amax = x.abs().amax(dim=-1, keepdim=True).float()
    if ub is not None:
        amax = amax.clamp(max=ub)
    s = (amax / E4M3_MAX).clamp(min=1e-12)
    xq = (x.float() / s).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return xq, s


if HAS_TRITON:
    @triton.jit
    def _quant_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, UB,
                           HAS_UB: tl.constexpr, BLOCK: tl.constexpr, ONE_PASS: tl.constexpr):
        # ONE_PASS (K <= BLOCK): the row stays in registers between amax and quantize.
        # div_rn: IEEE division like torch's (the default fp32 division may differ by an ulp)
        row = tl.program_id(0).to(tl.int64)
        xr = x_ptr + row * stride_xm
        if ONE_PASS:
            offs = tl.arange(0, BLOCK)
            v = tl.load(xr + offs, mask=offs < K, other=0.0).to(tl.float32)
            a = tl.max(tl.abs(v), axis=0)
        else:
            amax = tl.zeros([BLOCK], dtype=tl.float32)
            for k0 in range(0, K, BLOCK):
                offs = k0 + tl.arange(0, BLOCK)
                v = tl.load(xr + offs, mask=offs < K, other=0.0).to(tl.float32)
                amax = tl.maximum(amax, tl.abs(v))
            a = tl.max(amax, axis=0)
        if HAS_UB:
            a = tl.minimum(a, UB)
        s = tl.maximum(a / 448.0, 1e-12)
        tl.store(s_ptr + row, s)
        if ONE_PASS:
            q = tl.minimum(tl.maximum(tl.div_rn(v, s), -448.0), 448.0)
            tl.store(q_ptr + row * stride_qm + offs, q.to(tl.float8e4nv), mask=offs < K)
        else:
            for k0 in range(0, K, BLOCK):
                offs = k0 + tl.arange(0, BLOCK)
                v = tl.load(xr + offs, mask=offs < K, other=0.0).to(tl.float32)
                q = tl.minimum(tl.maximum(tl.div_rn(v, s), -448.0), 448.0)
                tl.store(q_ptr + row * stride_qm + offs, q.to(tl.float8e4nv), mask=offs < K)


# Rows up to this long stay in registers (32 fp32 per thread at 8 warps); longer ones take
# two passes of TWO_PASS_BLOCK columns.  scripts/bench_fp8_act.py on the H100 (BENCHMARKS.md,
# session 12): K = 14336 ran at 61-70% of a device copy in one pass of 16384 (64 registers
# per thread), at 84-87% in two passes of 2048 on 8 warps (M = 4096: 100.5 -> 73.3 us);
# K = 8192 is faster in one pass (M = 1024: 10.5 against 12.2-14.9 us).
ONE_PASS_MAX_K = 8192
TWO_PASS_BLOCK = 2048


def quant_per_token(x: torch.Tensor, ub: float | None = None):
    """(fp8 [M, K], fp32 scales [M, 1]) of a 2-D fp16/bf16/fp32 x; CUDA through Triton."""
    if x.dim() != 2:
        raise ValueError(f"quant_per_token takes a 2-D [M, K] tensor, got shape {tuple(x.shape)}")
    # CUDA only: the interpreter rounds some values to the wrong e4m3 binade (Triton 3.9)
    if not (HAS_TRITON and x.is_cuda):
        return quant_per_token_ref(x, ub)
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    q = torch.empty(m, k, device=x.device, dtype=torch.float8_e4m3fn)
    s = torch.empty(m, 1, device=x.device, dtype=torch.float32)
    if m:
        one_pass = k <= ONE_PASS_MAX_K
        block = triton.next_power_of_2(max(k, 16)) if one_pass else TWO_PASS_BLOCK
        launch(x, q, s, ub, block, one_pass, 8 if block >= 2048 else 4)
    return q, s


def launch(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, ub: float | None, block: int,
           one_pass: bool, num_warps: int) -> None:
    """One launch of the kernel with an explicit config (``quant_per_token`` picks it;
    scripts/bench_fp8_act.py sweeps it): ``one_pass`` needs ``block >= K``."""
    _quant_rows_kernel[(x.shape[0],)](x, q, s, x.shape[1], x.stride(0), q.stride(0),
                                      float(ub) if ub is not None else 0.0,
                                      HAS_UB=ub is not None, BLOCK=block, ONE_PASS=one_pass,
                                      num_warps=num_warps)
