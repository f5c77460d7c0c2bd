"""CPU matmul on GGML Q4_0 / Q4_1 / Q8_0 weights through torch's int4 "tinygemm" CPU ops.

``torch.ops.aten._weight_int4pack_mm_for_cpu(x_bf16, packed, group, sz)`` computes
``x @ W.T`` with ``W[n, k] = (q[n, k] - 8) * scale[k // group, n] + zero[k // group, n]``
for 4-bit ``q``, without materialising W.  GGML's 32-value blocks map onto it with
group = 32:

* Q4_0  ``w = d * (q - 8)``  -> scale d, zero 0
* Q4_1  ``w = d * q + m``    -> scale d, zero m + 8d
* Q8_0  ``w = d * q`` with int8 q = 16 h + l (h = q >> 4 in -8..7, l = q & 15 in 0..15)
  -> two int4 matmuls: (h + 8 with scale 16d, zero 0) + (l with scale d, zero 8d)

The op wants bf16 activations/scales (fp32 or fp16 inputs were measured ~10x slower),
N a multiple of 16 (rows are padded, the output sliced) and K a multiple of the group.
bf16 scales and outputs make this ~2^-9 relative-precision, not bit-exact: it is a fast
path; gguf_ref stays the reference.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from gguf.constants import GGMLQuantizationType as Q

from quantrt.errors import FormatError, UnsupportedError

from .gguf_ref_base import f16, nibbles

GROUP = 32  # GGML block size of the supported types; also an allowed tinygemm group
_N_ALIGN = 16  # _convert_weight_to_int4pack_for_cpu requires N % 16 == 0
_TYPE_SIZE = {Q.Q4_0: 18, Q.Q4_1: 20, Q.Q8_0: 34}


@dataclass(frozen=True)
class CpuInt4Weight:
    """A GGML weight ``[n, k]`` repacked for tinygemm.

    ``packed[i]`` / ``scales_zeros[i]`` are one int4 matmul each: one part for
    Q4_0/Q4_1, two (high and low nibble of the int8 values) for Q8_0.  Both are padded
    to ``n_padded`` rows.
    """

    packed: tuple[torch.Tensor, ...]        # uint8 [n_padded, k // 2] (tinygemm layout)
    scales_zeros: tuple[torch.Tensor, ...]  # bf16 [k // GROUP, n_padded, 2]
    n: int
    k: int
    ggml_type: int              # -1 for integer formats packed by prepare_affine
    group: int = GROUP

    @property
    def n_padded(self) -> int:
        return self.packed[0].shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.packed, *self.scales_zeros))


def _ops_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


def _qtype(ggml_type: int) -> Q | None:
    try:
        return Q(int(ggml_type))
    except ValueError:
        return None


def supports(ggml_type: int, n: int, k: int) -> tuple[bool, str]:
    """Whether :func:`prepare` can take a ``[n, k]`` weight of this type, and why not."""
    qtype = _qtype(ggml_type)
    if qtype is None:
        return False, f"unknown GGML type {int(ggml_type)}"
    if qtype not in _TYPE_SIZE:
        return False, f"{qtype.name} has no int4 CPU path (only Q4_0, Q4_1, Q8_0)"
    if n < 1 or k < 1:
        return False, f"empty weight [{n}, {k}]"
    if k % GROUP:
        return False, f"K={k} is not a multiple of {GROUP}"
    if not _ops_available():
        return False, f"torch {torch.__version__} lacks aten::_weight_int4pack_mm_for_cpu"
    return True, ""


def _pack(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, n_pad: int
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """q int [n, k] in 0..15, scale/zero float32 [n, k // group] -> (packed, scales_zeros)."""
    n = q.shape[0]
    if n_pad > n:
        # padded rows get scale 0 and zero 0, i.e. an all-zero weight row
        q = torch.cat([q, q.new_full((n_pad - n, q.shape[1]), 8)])
        scale = torch.cat([scale, scale.new_zeros(n_pad - n, scale.shape[1])])
        zero = torch.cat([zero, zero.new_zeros(n_pad - n, zero.shape[1])])
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
    sz = torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()
    return packed, sz


def prepare(raw: torch.Tensor, ggml_type: int) -> CpuInt4Weight:
    """Repack GGML bytes ``uint8 [N, row_bytes]`` (one row = one output feature)."""
    qtype = _qtype(ggml_type)
    if qtype not in _TYPE_SIZE:
        name = qtype.name if qtype is not None else f"type {int(ggml_type)}"
        raise UnsupportedError(f"no int4 CPU matmul for GGML {name}",
                               hint="only Q4_0, Q4_1 and Q8_0")
    type_size = _TYPE_SIZE[qtype]
    if raw.dtype != torch.uint8 or raw.dim() != 2 or raw.shape[1] % type_size:
        raise FormatError(f"{qtype.name} weight must be uint8 [N, blocks * {type_size}], "
                          f"got {raw.dtype} {tuple(raw.shape)}")
    n, nb = raw.shape[0], raw.shape[1] // type_size
    k = nb * GROUP
    ok, why = supports(qtype, n, k)
    if not ok:
        raise UnsupportedError(why)
    n_pad = -(-n // _N_ALIGN) * _N_ALIGN
    blocks = raw.contiguous().reshape(n * nb, type_size)
    d = f16(blocks, 0).reshape(n, nb)

    if qtype == Q.Q4_0:
        q = nibbles(blocks[:, 2:]).reshape(n, k)
        parts = [_pack(q, d, torch.zeros_like(d), n_pad)]
    elif qtype == Q.Q4_1:
        m = f16(blocks, 2).reshape(n, nb)
        q = nibbles(blocks[:, 4:]).reshape(n, k)
        parts = [_pack(q, d, m + 8.0 * d, n_pad)]
    else:  # Q8_0
        q = blocks[:, 2:].view(torch.int8).reshape(n, k)
        hi = (q >> 4).to(torch.int32) + 8  # arithmetic shift: -8..7, stored offset by 8
        lo = (q & 15).to(torch.int32)
        parts = [_pack(hi, 16.0 * d, torch.zeros_like(d), n_pad),
                 _pack(lo, d, 8.0 * d, n_pad)]
    return CpuInt4Weight(packed=tuple(p for p, _ in parts),
                         scales_zeros=tuple(s for _, s in parts),
                         n=n, k=k, ggml_type=int(qtype))


TINYGEMM_GROUPS = (32, 64, 128, 256)


def supports_affine(n: int, k: int, group: int) -> tuple[bool, str]:
    """Whether :func:`prepare_affine` can take a ``[n, k]`` weight with this group size."""
    if group not in TINYGEMM_GROUPS:
        return False, f"group size {group} is not one of tinygemm's {TINYGEMM_GROUPS}"
    if n < 1 or k < 1:
        return False, f"empty weight [{n}, {k}]"
    if k % group:
        return False, f"K={k} is not a multiple of the group size {group}"
    if not _ops_available():
        return False, f"torch {torch.__version__} lacks aten::_weight_int4pack_mm_for_cpu"
    return True, ""


def prepare_affine(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                   group: int) -> CpuInt4Weight:
    """Integer formats (GPTQ, AWQ, HQQ, ...): ``W[n, k] = (q[n, k] - zero[n, g]) * scale[n, g]``
    with ``q`` in 0..15, ``g = k // group``; zeros may be fractional.

    tinygemm computes ``(q - 8) * s + z'``, so ``z' = (8 - zero) * s``.
    """
    n, k = q.shape
    ok, why = supports_affine(n, k, group)
    if not ok:
        raise UnsupportedError(why)
    if int(q.min()) < 0 or int(q.max()) > 15:
        raise FormatError("tinygemm takes 4-bit values in 0..15")
    s = scale.float()
    packed, sz = _pack(q, s, (8.0 - zero.float()) * s, -(-n // _N_ALIGN) * _N_ALIGN)
    return CpuInt4Weight(packed=(packed,), scales_zeros=(sz,), n=n, k=k, ggml_type=-1,
                         group=group)


def matmul(x: torch.Tensor, w: CpuInt4Weight) -> torch.Tensor:
    """``x @ W.T`` for ``x [..., K]`` of any float dtype -> ``[..., N]`` in ``x.dtype``."""
    if x.shape[-1] != w.k:
        raise ValueError(f"x has K={x.shape[-1]}, weight has K={w.k}")
    flat = x.dim() == 2
    x2 = (x if flat else x.reshape(-1, w.k)).to(torch.bfloat16).contiguous()
    if x2.shape[0] == 0:
        return x.new_zeros(*x.shape[:-1], w.n)
    mm = torch.ops.aten._weight_int4pack_mm_for_cpu
    if len(w.packed) == 1:
        y = mm(x2, w.packed[0], w.group, w.scales_zeros[0])
    else:
        # sum the two halves in fp32 so the bf16 rounding of each is not compounded
        y = mm(x2, w.packed[0], w.group, w.scales_zeros[0]).float()
        y += mm(x2, w.packed[1], w.group, w.scales_zeros[1]).float()
    if w.n_padded != w.n:
        y = y[:, :w.n]
    y = y.to(x.dtype)
    return y if flat else y.reshape(*x.shape[:-1], w.n)
