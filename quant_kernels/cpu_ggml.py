"""CPU matmul straight over GGML blocks with int8 activations (``csrc/ggml_gemm.cpp``).

``matmul(x, raw, type)`` computes ``x @ W.T`` for a weight stored as GGML rows
(``uint8 [N, K / 32 * block_bytes]``, the file's own bytes: nothing is repacked), for
Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0.  Each row of ``x`` is quantized to int8 in blocks of 32
(one fp32 scale per block), dotted with the weight blocks in integer arithmetic and scaled
per block, as llama.cpp does.  Error: the weights are used exactly, so the only loss is the
activation rounding, at most half a step (``max|x_block| / 254``) per value: output
``n`` is within ``sum_k |W[n, k]| * max|x_block(k)| / 254`` (plus fp32 rounding) of
``x @ W.T``.  Every output row is computed the same way whatever else is in the batch.
"""
from __future__ import annotations

import torch
from gguf.constants import GGMLQuantizationType as Q

from quant_kernels import cpu_ext

GROUP = 32
BLOCK_BYTES = {Q.Q4_0: 18, Q.Q4_1: 20, Q.Q5_0: 22, Q.Q5_1: 24, Q.Q8_0: 34}


def supports(ggml_type: int, n: int, k: int) -> tuple[bool, str]:
    """Whether :func:`matmul` takes a ``[n, k]`` weight of this type here, and why not."""
    try:
        qtype = Q(int(ggml_type))
    except ValueError:
        return False, f"unknown GGML type {int(ggml_type)}"
    if qtype not in BLOCK_BYTES:
        return False, (f"{qtype.name} has no int8-dot CPU path "
                       f"(only {', '.join(t.name for t in BLOCK_BYTES)})")
    if n < 1 or k < 1 or k % GROUP:
        return False, f"weight [{n}, {k}]: K must be a positive multiple of {GROUP}"
    return cpu_ext.status()


def ggml_mm(x: torch.Tensor, raw: torch.Tensor, ggml_type: int) -> torch.Tensor:
    """The op itself: fp32 ``x [M, K]`` only (callers on the hot path skip :func:`matmul`)."""
    return torch.ops.quantrt_cpu.ggml_mm.default(x, raw, ggml_type)


def matmul(x: torch.Tensor, raw: torch.Tensor, ggml_type: int) -> torch.Tensor:
    """``x [M, K]`` (any float dtype) @ W.T -> ``[M, N]`` in ``x.dtype``; ``raw`` is the
    contiguous GGML bytes of W."""
    if not cpu_ext.available():
        raise RuntimeError(f"the CPU extension is not available: {cpu_ext.status()[1]}")
    if x.dtype is torch.float32:
        return ggml_mm(x, raw, int(ggml_type))
    return ggml_mm(x.float(), raw, int(ggml_type)).to(x.dtype)
