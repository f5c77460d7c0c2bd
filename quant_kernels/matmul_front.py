"""The public front of every fused dequant-matmul (``wq_matmul``, ``g16_matmul``,
``lut4_matmul``, ``fp8_matmul``): input checks, leading dimensions, the optional ``out``
buffer, and the choice between the custom op (tracing) and a direct launch (eager calls and
CUDA-graph captures: the op's dispatch costs more host time than a decode GEMV).
"""
from __future__ import annotations

import os
from typing import Callable

import torch
from torch._subclasses.fake_tensor import is_fake

ACT_DTYPES = (torch.float16, torch.bfloat16)
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

Matmul2d = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def uses_triton(x: torch.Tensor, has_triton: bool) -> bool:
    """Whether the Triton kernels run on ``x``'s device (CUDA, or the CPU when
    interpreting); otherwise the torch reference does."""
    return has_triton and (x.is_cuda or (INTERPRET and x.device.type == "cpu"))


def by_rows(x: torch.Tensor, n: int, out: torch.Tensor | None, has_triton: bool,
            reference: Callable[[torch.Tensor], torch.Tensor], decode, gemm, dense,
            decode_max_m: int, dense_min_m: int) -> torch.Tensor:
    """``out[M, N]`` for a 2-D ``x``: the torch ``reference`` where Triton does not run,
    else ``decode`` up to ``decode_max_m`` rows, ``gemm`` below ``dense_min_m``, ``dense``
    (dequantize + cuBLAS) from there; each takes ``(x, out)``."""
    m = x.shape[0]
    if out is None:
        out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    if m == 0:
        return out
    if not uses_triton(x, has_triton):
        return out.copy_(reference(x))
    if x.stride(-1) != 1:
        x = x.contiguous()
    if m <= decode_max_m:
        return decode(x, out)
    if m < dense_min_m:
        return gemm(x, out)
    return dense(x, out)


def dense_matmul(x: torch.Tensor, dense: torch.Tensor, out: torch.Tensor | None
                 ) -> torch.Tensor:
    """``x @ dense.T`` into ``out`` (or a new tensor): the dequantize + cuBLAS paths' GEMM.
    CPU GEMMs in fp16/bf16 (the interpreter's runs) do not keep an fp32 sum throughout
    (4e-3 relative error at K = 384 in bf16), cuBLAS does: on the CPU the product is
    taken in fp32, so the CPU tests check the GPU's semantics."""
    if x.device.type != "cuda":
        y = torch.mm(x.float(), dense.float().t()).to(x.dtype)
        return y if out is None else out.copy_(y)
    return torch.mm(x, dense.t()) if out is None else torch.mm(x, dense.t(), out=out)


def check_activations(x: torch.Tensor, k: int, device: torch.device) -> None:
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"x has shape {tuple(x.shape)}, expected [..., K={k}]")
    if x.dtype not in ACT_DTYPES:
        raise ValueError(f"x must be float16 or bfloat16, got {x.dtype}")
    if x.device != device:
        raise ValueError(f"x is on {x.device}, the weight on {device}")


def matmul(x: torch.Tensor, k: int, n: int, device: torch.device, out: torch.Tensor | None,
           direct: Matmul2d, traced: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``x[..., K] @ W.T`` -> ``[..., N]``: ``direct(x2, out2)`` on the 2-D view, or
    ``traced(x2)`` (the custom op) while tracing.  ``out`` is written in place, outside the
    custom op (an op with ``mutates_args=()`` may not write into a caller's buffer)."""
    check_activations(x, k, device)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if out is None:
        if torch.compiler.is_compiling() or is_fake(x2):  # tracing: the op has a fake impl
            y = traced(x2)
        else:
            y = direct(x2, None)
        return y.reshape(*lead, n)
    if tuple(out.shape) != (*lead, n) or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(f"out must be {x.dtype} [{', '.join(map(str, (*lead, n)))}] "
                         f"on {x.device}, got {out.dtype} {list(out.shape)} on {out.device}")
    direct(x2, out.view(-1, n))  # raises if out cannot be viewed as [M, N]
    return out
