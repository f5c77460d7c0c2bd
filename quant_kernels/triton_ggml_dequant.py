"""Triton dequantization of the GGML types that have no fused dequant-matmul.

    w = dequantize(raw, ggml_type, cols, torch.float16)   # raw: uint8 [rows, row_bytes]

The I-quants (codebooks), MXFP4/NVFP4, TQ1_0/TQ2_0 and Q8_K are read as stored in the
GGUF (no repacking at load) and expanded to a dense ``[rows, cols]`` weight in
fp16/bf16/fp32 on every call; ``quantrt.quant.ggml_kernels.TritonDequantKernel`` then
hands it to cuBLAS.  The values are bit-identical to ``gguf_ref.dequantize`` (fp32), and
to it rounded once for fp16/bf16 (the kernels compute in fp32, then cast with
round-to-nearest-even).

The codebooks and sign tables come from the torch reference's caches (which take them
from gguf-py's ``gguf.quants`` classes: one source of those numbers) and are uploaded
once per device.  The block math is in triton_ggml_dequant_kernels.py, one small
function per type, picked from ``TYPES`` by GGML type.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch._subclasses.fake_tensor import is_fake
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as Q

from . import gguf_ref_iquants as iq

try:
    import triton

    from . import triton_ggml_dequant_kernels as _k
    HAS_TRITON = True
except ImportError:  # pragma: no cover - hosts without Triton keep the torch path
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Values written per program (its blocks times the block size): an untuned default, as
# many as a 4-warp program stores in 16 per-thread fp16 values; scripts/bench_ggml_dequant.py
# --sweep times the alternatives on the GPU.
VALUES_PER_PROGRAM = 2048


def _pow3() -> torch.Tensor:
    return torch.tensor([1, 3, 9, 27, 81], dtype=torch.int32)


@dataclass(frozen=True)
class _Spec:
    kernel: str                                     # name of the deq_* function
    tables: Callable[[], tuple[torch.Tensor, ...]]  # CPU tables, passed as t0, t1

    def fn(self):
        return getattr(_k, self.kernel)


TYPES: dict[Q, _Spec] = {
    Q.IQ2_XXS: _Spec("deq_iq2_xxs", lambda: (iq._grid("IQ2_XXS"), iq._ksigns())),
    Q.IQ2_XS: _Spec("deq_iq2_xs", lambda: (iq._grid("IQ2_XS"), iq._ksigns())),
    Q.IQ2_S: _Spec("deq_iq2_s", lambda: (iq._grid("IQ2_S"),)),
    Q.IQ3_XXS: _Spec("deq_iq3_xxs", lambda: (iq._grid("IQ3_XXS"), iq._ksigns())),
    Q.IQ3_S: _Spec("deq_iq3_s", lambda: (iq._grid("IQ3_S"),)),
    Q.IQ1_S: _Spec("deq_iq1_s", lambda: (iq._grid("IQ1_S"),)),
    Q.IQ1_M: _Spec("deq_iq1_m", lambda: (iq._grid("IQ1_S"),)),  # IQ1_M shares iq1s_grid
    Q.IQ4_NL: _Spec("deq_iq4_nl", lambda: (iq._kvalues("IQ4_NL"),)),
    Q.IQ4_XS: _Spec("deq_iq4_xs", lambda: (iq._kvalues("IQ4_NL"),)),
    Q.MXFP4: _Spec("deq_mxfp4", lambda: (iq._table("e8m0"), iq._kvalues("MXFP4"))),
    Q.NVFP4: _Spec("deq_nvfp4", lambda: (iq._table("ue4m3"), iq._kvalues("NVFP4"))),
    Q.TQ1_0: _Spec("deq_tq1_0", lambda: (_pow3(),)),
    Q.TQ2_0: _Spec("deq_tq2_0", lambda: ()),
    Q.Q8_K: _Spec("deq_q8_k", lambda: ()),
}
SUPPORTED = tuple(TYPES)


@functools.lru_cache(maxsize=None)
def _device_tables(qtype: Q, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The type's tables on ``device`` as flat contiguous tensors (t0, t1), uploaded
    once; a type with fewer than two passes a one-element placeholder it never reads."""
    tabs = [t.reshape(-1).contiguous().to(device) for t in TYPES[qtype].tables()]
    while len(tabs) < 2:
        tabs.append(torch.zeros(1, dtype=torch.int32, device=device))
    return tabs[0], tabs[1]


def _type_of(ggml_type: int) -> Q:
    try:
        qtype = Q(int(ggml_type))
    except ValueError:
        qtype = None
    if qtype not in TYPES:
        name = qtype.name if qtype is not None else f"unknown type {int(ggml_type)}"
        raise ValueError(f"GGML {name} has no Triton dequant kernel "
                         f"(has: {', '.join(t.name for t in TYPES)})")
    return qtype


def _check(raw: torch.Tensor, qtype: Q, cols: int | None, dtype: torch.dtype,
           out: torch.Tensor | None) -> tuple[int, int]:
    """(rows, cols) of a valid call, else a one-line ValueError."""
    block, size = GGML_QUANT_SIZES[qtype]
    if not isinstance(raw, torch.Tensor) or raw.dtype != torch.uint8 or raw.dim() != 2:
        what = (f"{raw.dtype} {list(raw.shape)}" if isinstance(raw, torch.Tensor)
                else type(raw).__name__)
        raise ValueError(f"{qtype.name} data must be uint8 [rows, row_bytes] as stored in "
                         f"the GGUF, got {what}")
    rows, row_bytes = raw.shape
    if row_bytes == 0 or row_bytes % size:
        raise ValueError(f"{qtype.name} rows have {row_bytes} bytes, not a positive multiple "
                         f"of the {size}-byte block")
    if raw.stride(1) != 1 or (rows > 1 and raw.stride(0) < row_bytes):
        raise ValueError(f"{qtype.name} data must have contiguous rows (strides "
                         f"{tuple(raw.stride())}); pass raw.contiguous()")
    n = row_bytes // size * block
    if cols is not None and int(cols) != n:
        raise ValueError(f"{qtype.name} rows of {row_bytes} bytes hold {n} values, not "
                         f"cols={cols}")
    if dtype not in OUT_DTYPES:
        raise ValueError(f"output dtype must be float16, bfloat16 or float32, got {dtype}")
    if not (raw.is_cuda or (INTERPRET and raw.device.type == "cpu")):
        raise ValueError(f"the Triton dequant runs on CUDA tensors (or on the CPU under "
                         f"TRITON_INTERPRET=1), data is on {raw.device}; use "
                         "gguf_ref.dequantize there")
    if out is not None and (tuple(out.shape) != (rows, n) or out.dtype != dtype
                            or out.device != raw.device or out.stride(1) != 1):
        raise ValueError(f"out must be {dtype} [{rows}, {n}] with contiguous rows on "
                         f"{raw.device}, got {out.dtype} {list(out.shape)} strides "
                         f"{tuple(out.stride())} on {out.device}")
    return rows, n


def dequantize(raw: torch.Tensor, ggml_type: int, cols: int | None = None,
               dtype: torch.dtype = torch.float16, out: torch.Tensor | None = None,
               values_per_program: int = VALUES_PER_PROGRAM) -> torch.Tensor:
    """GGML bytes as stored (uint8 ``[rows, row_bytes]``, on CUDA) -> ``[rows, cols]`` in
    ``dtype``; ``out`` (same shape and dtype, rows contiguous) is written in place.
    While torch.compile traces, the call goes through the custom op
    ``torch.ops.quantrt.ggml_dequant`` (with a fake impl)."""
    if not HAS_TRITON:
        raise ValueError("the Triton dequant needs triton installed")
    qtype = _type_of(ggml_type)
    rows, n = _check(raw, qtype, cols, dtype, out)
    if out is None and (torch.compiler.is_compiling() or is_fake(raw)):
        return _dequant_op(raw, int(qtype), n, dtype)
    if values_per_program < 1 or values_per_program & (values_per_program - 1):
        raise ValueError(f"values_per_program={values_per_program} must be a power of two")
    if out is None:
        out = torch.empty(rows, n, dtype=dtype, device=raw.device)
    if rows == 0:
        return out
    block, size = GGML_QUANT_SIZES[qtype]
    blocks_per_row = n // block
    n_blocks = rows * blocks_per_row
    sb = max(1, values_per_program // block)
    t0, t1 = _device_tables(qtype, raw.device)
    grid = (triton.cdiv(n_blocks, sb),)
    _k.ggml_dequant_kernel[grid](
        raw, out, t0, t1, n_blocks, blocks_per_row, raw.stride(0), out.stride(0),
        DEQ=TYPES[qtype].fn(), BLOCK=block, TYPE_SIZE=size, SB=sb,
        BF16_OUT=dtype == torch.bfloat16, num_warps=4)
    return out


@torch.library.custom_op("quantrt::ggml_dequant", mutates_args=())
def _dequant_op(raw: torch.Tensor, ggml_type: int, cols: int, dtype: torch.dtype
                ) -> torch.Tensor:
    return dequantize(raw, ggml_type, cols, dtype)


@_dequant_op.register_fake
def _dequant_fake(raw, ggml_type, cols, dtype):
    return raw.new_empty((raw.shape[0], cols), dtype=dtype)


__all__ = ["dequantize", "SUPPORTED", "TYPES", "HAS_TRITON", "VALUES_PER_PROGRAM"]
