"""compressed-tensors checkpoints (llm-compressor output): pack-, int- and float-quantized.

pack-quantized (``compressors/pack_quantized``), weight [N, K] with b-bit ints:

* ``weight_packed`` int32 ``[N, ceil(K*b/32)]``: signed values + 2**(b-1) (offset
  binary), packed along K with :mod:`formats.packing`.  0.19 packs densely (values may
  straddle words); older releases packed floor(32/b) values per word -- identical for
  b in {1, 2, 4, 8}, different for 3/5/6/7 bits (``dense=False``).
* ``weight_scale`` ``[N, G]`` (group: G = K/g, compressed-tensors rejects K % g != 0 for
  K >= g), ``[N, 1]`` (channel) or one value (tensor).
* ``weight_zero_point`` (asymmetric group/channel only): signed zero points, offset
  and packed along **N**: int32 ``[ceil(N*b/32), G]``.
* ``weight_g_idx`` ``[K]`` (actorder "group", written by releases before its removal):
  group of each input column.
* ``weight_shape`` int ``[2]`` = (N, K): recovers K, which the packed width only bounds.

W = (q - zp) * scale, computed in the scale's dtype (compressed-tensors ``_dequantize``).

int-quantized / naive-quantized: ``weight`` int8 ``[N, K]`` (signed, unpacked), same
scales, optional unpacked ``weight_zero_point``.  float-quantized: ``weight`` e4m3 with a
tensor / channel / group / block ``weight_scale``.
"""
from __future__ import annotations

import torch

from formats import fp8
from formats.packing import pack_bits, packed_length, to_signed, to_unsigned, unpack_bits
from quantrt.errors import FormatError


def _shape_nk(weight_shape) -> tuple[int, int]:
    vals = [int(v) for v in (weight_shape.reshape(-1).tolist()
                             if isinstance(weight_shape, torch.Tensor) else weight_shape)]
    if len(vals) != 2 or min(vals) <= 0:
        raise FormatError(f"compressed-tensors weight_shape: {vals} is not a 2-D shape")
    return vals[0], vals[1]


def _scale_2d(scale: torch.Tensor, n: int) -> torch.Tensor:
    if scale.numel() == 1:
        return scale.reshape(1, 1).expand(n, 1)
    if scale.ndim != 2 or scale.shape[0] != n:
        raise FormatError(f"compressed-tensors weight_scale: shape {tuple(scale.shape)} but "
                          f"expected [N={n}, groups] (or one value for strategy tensor)")
    return scale


def _check_g_idx(g_idx, k: int, n_groups: int):
    if g_idx is None:
        return None
    if tuple(g_idx.shape) != (k,):
        raise FormatError(f"compressed-tensors weight_g_idx: shape {tuple(g_idx.shape)} "
                          f"but K={k}")
    if k and (int(g_idx.min()) < 0 or int(g_idx.max()) >= n_groups):
        raise FormatError(f"compressed-tensors weight_g_idx: indices span "
                          f"[{int(g_idx.min())}, {int(g_idx.max())}], scales have "
                          f"{n_groups} groups")
    return g_idx.to(torch.int32)


def _group_size(k: int, n_groups: int, g_idx, given: int | None = None) -> int | None:
    if g_idx is not None or n_groups == 1:
        return None
    # compressed-tensors requires K % g == 0, so K / G is the group size; ``given``
    # disambiguates hand-made partial last groups.
    g = given if given not in (None, -1, 0) else -(-k // n_groups)
    if -(-k // g) != n_groups:
        raise FormatError(f"compressed-tensors weight_scale: {n_groups} groups cannot tile K={k}")
    return g


def unpack_packed(weight_packed: torch.Tensor, weight_scale: torch.Tensor, weight_shape,
                  num_bits: int, weight_zero_point: torch.Tensor | None = None,
                  weight_g_idx: torch.Tensor | None = None, *, dense: bool = True):
    """-> ``(q int32 [N, K] signed, scale [N, G], zero_point int32 [N, G] signed | None,
    g_idx int32 [K] | None)``."""
    n, k = _shape_nk(weight_shape)
    if weight_packed.dtype != torch.int32 or weight_packed.ndim != 2:
        raise FormatError(f"compressed-tensors weight_packed: expected 2-D int32, got "
                          f"{weight_packed.dtype} shape {tuple(weight_packed.shape)}")
    want = (n, packed_length(k, num_bits, dense))
    if tuple(weight_packed.shape) != want:
        raise FormatError(f"compressed-tensors weight_packed: shape {tuple(weight_packed.shape)} "
                          f"but weight_shape ({n}, {k}) at {num_bits} bits needs {want}")
    scale = _scale_2d(weight_scale, n)
    n_groups = scale.shape[1]
    q = to_signed(unpack_bits(weight_packed, num_bits, k, axis=1, dense=dense,
                              name="compressed-tensors weight_packed"), num_bits)
    zp = None
    if weight_zero_point is not None:
        zwant = (packed_length(n, num_bits, dense), n_groups)
        if weight_zero_point.dtype != torch.int32 or tuple(weight_zero_point.shape) != zwant:
            raise FormatError(f"compressed-tensors weight_zero_point: {weight_zero_point.dtype} "
                              f"shape {tuple(weight_zero_point.shape)} but expected int32 {zwant} "
                              f"(N={n} zero points packed along N)")
        zp = to_signed(unpack_bits(weight_zero_point, num_bits, n, axis=0, dense=dense,
                                   name="compressed-tensors weight_zero_point"), num_bits)
    return q, scale, zp, _check_g_idx(weight_g_idx, k, n_groups)


def dequantize_unpacked(q: torch.Tensor, scale: torch.Tensor,
                        zero_point: torch.Tensor | None = None, g_idx: torch.Tensor | None = None,
                        dtype: torch.dtype | None = None, *,
                        group_size: int | None = None) -> torch.Tensor:
    """Signed ``q [N, K]`` with ``scale``/``zero_point [N, G]`` -> W ``[N, K]``."""
    from quant_kernels.int_ref import dequant_int

    if q.ndim != 2:
        raise FormatError(f"compressed-tensors weight: expected 2-D, got {tuple(q.shape)}")
    n, k = q.shape
    scale = _scale_2d(scale, n)
    if zero_point is not None:
        if zero_point.numel() == 1:
            zero_point = zero_point.reshape(1, 1).expand_as(scale)
        if zero_point.shape != scale.shape:
            raise FormatError(f"compressed-tensors weight_zero_point: shape "
                              f"{tuple(zero_point.shape)} but weight_scale is {tuple(scale.shape)}")
        zero_point = zero_point.to(torch.int32).t()
    g_idx = _check_g_idx(g_idx, k, scale.shape[1])
    gs = _group_size(k, scale.shape[1], g_idx, group_size)
    return dequant_int(q.t(), scale.t(), zero_point, g_idx, group_size=gs,
                       dtype=dtype or scale.dtype)


def dequantize_packed(weight_packed, weight_scale, weight_shape, num_bits: int,
                      weight_zero_point=None, weight_g_idx=None, *, dense: bool = True,
                      dtype: torch.dtype | None = None,
                      group_size: int | None = None) -> torch.Tensor:
    q, scale, zp, g_idx = unpack_packed(weight_packed, weight_scale, weight_shape, num_bits,
                                        weight_zero_point, weight_g_idx, dense=dense)
    return dequantize_unpacked(q, scale, zp, g_idx, dtype=dtype or weight_scale.dtype,
                               group_size=group_size)


def pack_packed(q: torch.Tensor, weight_scale: torch.Tensor, num_bits: int,
                zero_point: torch.Tensor | None = None, g_idx: torch.Tensor | None = None, *,
                dense: bool = True) -> dict:
    """Signed ``q [N, K]`` (in [-2**(b-1), 2**(b-1))) -> the pack-quantized tensors."""
    if q.ndim != 2:
        raise FormatError(f"compressed-tensors pack: q must be [N, K], got {tuple(q.shape)}")
    n, k = q.shape
    scale = _scale_2d(weight_scale, n)
    out = {"weight_packed": pack_bits(to_unsigned(q, num_bits), num_bits, axis=1, dense=dense,
                                      name="compressed-tensors q"),
           "weight_scale": weight_scale,
           "weight_shape": torch.tensor([n, k], dtype=torch.int64)}
    if zero_point is not None:
        if tuple(zero_point.shape) != tuple(scale.shape):
            raise FormatError(f"compressed-tensors pack: zero_point {tuple(zero_point.shape)} "
                              f"must match weight_scale {tuple(scale.shape)}")
        out["weight_zero_point"] = pack_bits(to_unsigned(zero_point, num_bits), num_bits,
                                             axis=0, dense=dense,
                                             name="compressed-tensors zero_point")
    if g_idx is not None:
        out["weight_g_idx"] = _check_g_idx(g_idx, k, scale.shape[1])
    return out


def dequantize_int(weight: torch.Tensor, weight_scale: torch.Tensor,
                   weight_zero_point: torch.Tensor | None = None,
                   weight_g_idx: torch.Tensor | None = None,
                   dtype: torch.dtype | None = None) -> torch.Tensor:
    """int-quantized / naive-quantized: int8 ``weight [N, K]`` -> W."""
    if weight.dtype != torch.int8:
        raise FormatError(f"compressed-tensors int-quantized weight: expected int8, got "
                          f"{weight.dtype}")
    return dequantize_unpacked(weight, weight_scale, weight_zero_point, weight_g_idx, dtype)


def dequantize_float(weight: torch.Tensor, weight_scale: torch.Tensor, *,
                     block_structure=None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """float-quantized FP8 ``weight [N, K]`` with strategy tensor ([1]), channel ([N, 1]),
    group ([N, K/g]) or block (``block_structure`` [bh, bw]: [ceil(N/bh), ceil(K/bw)])."""
    if weight.ndim != 2:
        raise FormatError(f"compressed-tensors float weight: expected 2-D, got "
                          f"{tuple(weight.shape)}")
    n, k = weight.shape
    if block_structure is None and weight_scale.ndim == 2 and weight_scale.shape[1] > 1:
        gs = _group_size(k, weight_scale.shape[1], None)
        if weight_scale.shape[0] != n:
            raise FormatError(f"compressed-tensors weight_scale: shape {tuple(weight_scale.shape)} "
                              f"but group strategy needs [N={n}, groups]")
        s = weight_scale.repeat_interleave(gs, dim=1)[:, :k]
        return fp8.dequantize(weight, s.contiguous(), block_size=(1, 1), dtype=dtype)
    return fp8.dequantize(weight, weight_scale, block_size=block_structure, dtype=dtype)
