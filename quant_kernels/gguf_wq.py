"""GGUF block formats in the common integer layout (``WQWeight``), so the fused Triton
dequant-matmul kernels run them on the GPU.

Every type here is ``w = scale * q + bias`` over 32-value groups with unsigned ``q``:

* Q4_0  ``d (q - 8)``          -> scale d, bias -8 d            (same as dequantize_row_q4_0)
* Q4_1  ``d q + m``            -> scale d, bias m
* Q5_0  ``d (q - 16)``, 5-bit  -> widened to 8-bit words, bias -16 d
* Q5_1  ``d q + m``, 5-bit     -> widened to 8-bit words
* Q8_0  ``d q``, int8          -> q + 128, bias -128 d
* Q4_K  ``d sc q - dmin m`` per 32-value sub-block (6-bit sc, m) -> scale d sc, bias -dmin m
* Q5_K  the same with 5-bit q  -> widened to 8-bit words

The products ``d * sc`` and ``dmin * m`` are rounded once to the kernel's fp16/bf16
scales (the exact reference keeps them in fp32): ~2^-11 relative, below the fp16 GEMM's own
rounding.  Q6_K, Q2_K and Q3_K use 16-value sub-blocks, which this layout's groups (32 and
up) cannot hold: they have their own layout and kernels (g16_layout.py, triton_g16.py).
"""
from __future__ import annotations

import torch
from gguf.constants import GGMLQuantizationType as Q

from .gguf_ref import _q5_values
from .gguf_ref_base import f16, nibbles, split_bits, u32
from .gguf_ref_kquants import _scale_min_k4
from .wq_layout import WQWeight, pack_wq

GROUP = 32
TYPE_SIZE = {Q.Q4_0: (32, 18), Q.Q4_1: (32, 20), Q.Q5_0: (32, 22), Q.Q5_1: (32, 24),
             Q.Q8_0: (32, 34), Q.Q4_K: (256, 144), Q.Q5_K: (256, 176)}
SUPPORTED = tuple(TYPE_SIZE)


def _legacy(blocks: torch.Tensor, qtype: Q):
    """(q [n, 32], scale [n], bias [n], bits) of 32-value blocks."""
    d = f16(blocks, 0).reshape(-1)
    if qtype == Q.Q4_0:
        return nibbles(blocks[:, 2:]), d, -8 * d, 4
    if qtype == Q.Q4_1:
        return nibbles(blocks[:, 4:]), d, f16(blocks, 2).reshape(-1), 4
    if qtype == Q.Q5_0:
        return _q5_values(u32(blocks, 2, 1), blocks[:, 6:]), d, -16 * d, 8
    if qtype == Q.Q5_1:
        return _q5_values(u32(blocks, 4, 1), blocks[:, 8:]), d, f16(blocks, 2).reshape(-1), 8
    q = blocks[:, 2:].view(torch.int8).to(torch.int32) + 128  # Q8_0
    return q, d, -128 * d, 8


def _k_quant(blocks: torch.Tensor, qtype: Q):
    """(q [n, 256], scale [n, 8], bias [n, 8], bits) of Q4_K / Q5_K super-blocks."""
    n = blocks.shape[0]
    d, dmin = f16(blocks, 0), f16(blocks, 2)
    sc, mn = _scale_min_k4(blocks[:, 4:16])
    scale = d * sc.to(torch.float32)
    bias = -dmin * mn.to(torch.float32)
    if qtype == Q.Q4_K:
        q = split_bits(blocks[:, 16:].reshape(n, 4, 32), [0, 4], 0x0F).reshape(n, 256)
        return q, scale, bias, 4
    ql = split_bits(blocks[:, 48:].reshape(n, 4, 32), [0, 4], 0x0F).reshape(n, 8, 32)
    qh = split_bits(blocks[:, 16:48].reshape(n, 1, 32), range(8), 1).reshape(n, 8, 32)
    return (ql | (qh << 4)).reshape(n, 256), scale, bias, 8


def to_wq(raw: torch.Tensor, ggml_type: int, k: int, dtype: torch.dtype) -> WQWeight:
    """GGUF bytes ``uint8 [N, row_bytes]`` of a supported type -> WQWeight (same device)."""
    qtype = Q(int(ggml_type))
    if qtype not in TYPE_SIZE:
        raise ValueError(f"GGML {qtype.name} has no WQ layout (supported: "
                         f"{', '.join(t.name for t in SUPPORTED)})")
    block, size = TYPE_SIZE[qtype]
    n = raw.shape[0]
    if raw.dtype != torch.uint8 or raw.dim() != 2 or raw.shape[1] * block != k * size:
        raise ValueError(f"{qtype.name} weight must be uint8 [N, K / {block} * {size}] for "
                         f"K={k}, got {raw.dtype} {tuple(raw.shape)}")
    device = raw.device
    blocks = raw.cpu().contiguous().reshape(-1, size)  # the bit helpers build CPU index tensors
    q, scale, bias, bits = (_legacy if block == 32 else _k_quant)(blocks, qtype)
    q = q.reshape(n, k).to(torch.int32)
    scale = scale.reshape(n, k // GROUP)
    bias = bias.reshape(n, k // GROUP)
    return pack_wq(q.to(device), scale.to(device), bias.to(device), GROUP, bits, dtype=dtype)
