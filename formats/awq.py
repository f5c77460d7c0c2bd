"""AWQ checkpoints (AutoAWQ ``version: gemm`` and ``gemv``), 4-bit.

K = in_features, N = out_features, g = group size (-1 = K), G = ceil(K/g).
w = (q - z) * s with unsigned q, z in [0, 16) -- no v1-style "-1" on the zeros.

GEMM (``awq/modules/linear/gemm.py``):
  qweight int32 ``[K, N/8]`` packed along **N**; nibble i of word c holds column
  ``8c + AWQ_ORDER[i]`` (same order as AutoAWQ's AWQ_ORDER, 0 2 4 6 1 3 5 7, chosen for
  its CUDA kernel's register layout); qzeros int32 ``[G, N/8]`` in the same order;
  scales fp16 ``[G, N]``.

GEMV (``awq/modules/linear/gemv.py``):
  qweight int32 ``[N, K/8]`` packed along **K** in plain order; qzeros int32 ``[N, W]``
  holding the ``[N, G]`` zeros packed along G in plain order; scales fp16 ``[N, 8W]``
  whose first G columns are the scales; the rest (and unused zero nibbles) are zero
  padding.  W = AutoAWQ's ``calculate_zeros_width``: ceil(G/8) rounded up to a multiple
  of 1 (g >= 128), 2 (g = 64) or 4 (g = 32) so its kernel's per-thread loads stay aligned.

AutoAWQ asserts N % 8 == 0 and K % g == 0 (and GEMV needs K % 8 == 0); partial
groups are accepted here (G = ceil(K/g)) but packing along N/K still needs whole words.
"""
from __future__ import annotations

import torch

from formats.packing import pack_bits, unpack_bits
from quantrt.errors import FormatError

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)          # nibble i <- column AWQ_ORDER[i]
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # column j <- nibble AWQ_REVERSE_ORDER[j]
_PACK = 8  # 4-bit values per int32


def _groups(k: int, group_size: int) -> tuple[int, int]:
    g = k if group_size in (-1, 0, None) else group_size
    return g, -(-k // g)


def calculate_zeros_width(in_features: int, group_size: int = 128, pack_num: int = 8) -> int:
    """Words per output row in GEMV qzeros (AutoAWQ's rule, g = -1 treated as one group)."""
    g, n_groups = _groups(in_features, group_size)
    if group_size in (-1, 0, None) or g >= 128:
        mult = 1
    elif g == 64:
        mult = 2
    elif g == 32:
        mult = 4
    else:
        raise FormatError(f"AWQ GEMV: group_size {group_size} has no zeros layout "
                          "(AutoAWQ supports 32, 64, >= 128)")
    base = -(-n_groups // pack_num)
    return -(-base // mult) * mult


def _check_bits(bits: int) -> None:
    if bits != 4:
        raise FormatError(f"AWQ: only 4-bit checkpoints exist, got w_bit={bits}")


def _interleave(cols: torch.Tensor, inverse: bool) -> torch.Tensor:
    """Reorder the last axis within each group of 8 columns."""
    order = torch.tensor(AWQ_REVERSE_ORDER if inverse else AWQ_ORDER, device=cols.device)
    n = cols.shape[-1]
    perm = (torch.arange(n // _PACK, device=cols.device)[:, None] * _PACK + order).reshape(-1)
    return cols[..., perm]


def _expect(name: str, t: torch.Tensor, shape: tuple[int, ...], why: str,
            dtype: torch.dtype | None = torch.int32) -> None:
    if dtype is not None and t.dtype != dtype:
        raise FormatError(f"AWQ {name}: expected {dtype}, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise FormatError(f"AWQ {name}: shape {tuple(t.shape)} but expected {shape} ({why})")


def unpack(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, bits: int = 4,
           group_size: int = 128, version: str = "gemm", *, in_features: int | None = None):
    """-> ``(q int32 [K, N], zeros int32 [G, N], scales [G, N])``, padding dropped."""
    _check_bits(bits)
    version = version.lower()
    if version == "gemm":
        if qweight.ndim != 2 or scales.ndim != 2:
            raise FormatError(f"AWQ GEMM: qweight {tuple(qweight.shape)} and scales "
                              f"{tuple(scales.shape)} must be 2-D")
        k, n = qweight.shape[0], scales.shape[1]
        g, n_groups = _groups(k, group_size)
        if n % _PACK:
            raise FormatError(f"AWQ GEMM scales: N={n} is not a multiple of {_PACK}")
        _expect("qweight", qweight, (k, n // _PACK), f"K rows x N={n}/8 words")
        _expect("scales", scales, (n_groups, n), f"ceil(K={k}/{g}) groups x N", None)
        _expect("qzeros", qzeros, (n_groups, n // _PACK), f"{n_groups} groups x N={n}/8 words")
        q = _interleave(unpack_bits(qweight, 4, n, axis=1, name="AWQ qweight"), inverse=True)
        z = _interleave(unpack_bits(qzeros, 4, n, axis=1, name="AWQ qzeros"), inverse=True)
        return q, z, scales
    if version == "gemv":
        if qweight.ndim != 2 or scales.ndim != 2:
            raise FormatError(f"AWQ GEMV: qweight {tuple(qweight.shape)} and scales "
                              f"{tuple(scales.shape)} must be 2-D")
        n = qweight.shape[0]
        k = in_features if in_features is not None else qweight.shape[1] * _PACK
        g, n_groups = _groups(k, group_size)
        width = calculate_zeros_width(k, group_size)
        _expect("qweight", qweight, (n, -(-k // _PACK)), f"N rows x K={k}/8 words")
        _expect("qzeros", qzeros, (n, width), f"calculate_zeros_width(K={k}, g={g})")
        _expect("scales", scales, (n, width * _PACK), f"8 x zeros width {width}", None)
        q = unpack_bits(qweight, 4, k, axis=1, name="AWQ qweight").t()
        z = unpack_bits(qzeros, 4, width * _PACK, axis=1, name="AWQ qzeros")[:, :n_groups].t()
        return q, z, scales[:, :n_groups].t()
    raise FormatError(f"AWQ: unknown version {version!r} (expected 'gemm' or 'gemv')")


def dequantize(qweight, qzeros, scales, bits: int = 4, group_size: int = 128,
               version: str = "gemm", *, in_features: int | None = None,
               dtype: torch.dtype | None = None) -> torch.Tensor:
    """W ``[N, K]`` = (q - z) * s; bit-identical to AutoAWQ's fp16 ``dequantize_gemm``."""
    from quant_kernels.int_ref import dequant_int

    q, z, s = unpack(qweight, qzeros, scales, bits, group_size, version, in_features=in_features)
    g, _ = _groups(q.shape[0], group_size)
    return dequant_int(q, s, z, group_size=g, dtype=dtype or scales.dtype)


def pack(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, bits: int = 4,
         group_size: int = 128, version: str = "gemm"):
    """Inverse of :func:`unpack`: ``q [K, N]``, ``zeros``/``scales [G, N]`` ->
    ``(qweight, qzeros, scales fp16)`` in the GEMM or GEMV layout."""
    _check_bits(bits)
    if q.ndim != 2 or zeros.shape != scales.shape or zeros.ndim != 2:
        raise FormatError(f"AWQ pack: q {tuple(q.shape)} must be [K, N] and zeros "
                          f"{tuple(zeros.shape)} / scales {tuple(scales.shape)} both [G, N]")
    k, n = q.shape
    g, n_groups = _groups(k, group_size)
    if zeros.shape != (n_groups, n):
        raise FormatError(f"AWQ pack: zeros {tuple(zeros.shape)} but ceil(K={k}/{g}) groups "
                          f"x N={n} = {(n_groups, n)}")
    version = version.lower()
    if version == "gemm":
        if n % _PACK:
            raise FormatError(f"AWQ GEMM pack: N={n} is not a multiple of {_PACK}")
        qweight = pack_bits(_interleave(q, inverse=False), 4, axis=1, name="AWQ q")
        qzeros = pack_bits(_interleave(zeros, inverse=False), 4, axis=1, name="AWQ zeros")
        return qweight, qzeros, scales.to(torch.float16)
    if version == "gemv":
        if k % _PACK:
            raise FormatError(f"AWQ GEMV pack: K={k} is not a multiple of {_PACK}")
        width = calculate_zeros_width(k, group_size)
        zt = torch.nn.functional.pad(zeros.t().to(torch.int32), (0, width * _PACK - n_groups))
        st = torch.nn.functional.pad(scales.t().to(torch.float16), (0, width * _PACK - n_groups))
        qweight = pack_bits(q.t(), 4, axis=1, name="AWQ q")
        return qweight, pack_bits(zt, 4, axis=1, name="AWQ zeros"), st
    raise FormatError(f"AWQ: unknown version {version!r} (expected 'gemm' or 'gemv')")
