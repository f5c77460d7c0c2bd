"""GPTQ checkpoints (AutoGPTQ ``checkpoint_format: gptq`` = v1, GPTQModel ``gptq_v2``).

Per linear layer, K = in_features, N = out_features, G = number of groups:

* ``qweight`` int32 ``[ceil(K*b/32), N]``: packed along K with the dense LSB-first
  layout of :mod:`formats.packing` (3-bit values straddle words, 32 values per 3 words,
  as AutoGPTQ's ``QuantLinear.pack`` does).
* ``qzeros`` int32 ``[G, ceil(N*b/32)]``: packed along N the same way.  **v1 stores
  zero - 1** (AutoGPTQ's ``zeros -= 1`` before packing; symmetric 4-bit gives
  0x77777777); v2 stores the zero itself.
* ``scales`` fp16 ``[G, N]``; ``g_idx`` int32 ``[K]``: the group of each input row,
  ``k // group_size`` unless desc_act/act-order permuted it.
* G = ceil(K/g) (1 for g = -1).  AutoGPTQ itself sizes ``qweight`` as ``K // 32 * b``
  rows and ``qzeros`` as ``N // 32 * b`` columns, i.e. it only writes K, N that are
  multiples of 32; we accept any K, N with the zero-padded ``ceil`` sizes, which agree
  with AutoGPTQ wherever it works.

v1 zero semantics: v1 stores zero - 1, and a zero of 0 has no unsigned field value.
Producers disagree on how it is written:

* GPTQModel (the maintained producer) packs the true zeros, then subtracts the
  per-field ones pattern (0x11111111 for 4-bit, 0x55555555 for 2-bit, 0x01010101 for
  8-bit) from each int32 word *arithmetically*: a -1 field borrows from the field above
  it.  Its reader adds the pattern back (``convert_gptq_v1_to_v2_format_module``), which
  undoes the borrow exactly.  3-bit fields straddle words, so there it shifts each field
  by one modulo 2**b instead (``_shift_gptq_qzeros``).
* AutoGPTQ's readers (and the exllama/vLLM kernels) add 1 to each field without carry
  or wrap, reading a stored 15 as 16.

:func:`unpack` follows GPTQModel by default (``v1_zero="gptqmodel"``, zeros in
[0, 2**b)); ``v1_zero="autogptq"`` gives per-field + 1 in [1, 2**b].  Checked
bit-exactly against GPTQModel-written fixtures, whose asymmetric layers have zeros of
0 next to zeros of 15 (the borrow case).
"""
from __future__ import annotations

import torch

from formats.packing import pack_bits, packed_length, unpack_bits
from quantrt.errors import FormatError

GPTQ_BITS = (2, 3, 4, 8)
V1_ZERO_MODES = ("gptqmodel", "autogptq")


def _ones_pattern(bits: int) -> int:
    """A 1 in every ``bits``-wide field of a 32-bit word (bits dividing 32)."""
    return sum(1 << (bits * i) for i in range(32 // bits))


def _add_words(words: torch.Tensor, value: int) -> torch.Tensor:
    """int32 words + value, wrapping modulo 2**32 (carries/borrows cross fields)."""
    w = (words.to(torch.int64) + value) & 0xFFFFFFFF
    return torch.where(w >= 1 << 31, w - (1 << 32), w).to(torch.int32)


def _check_common(bits: int, version: int) -> None:
    if bits not in GPTQ_BITS:
        raise FormatError(f"GPTQ: unsupported bits={bits}, expected one of {GPTQ_BITS}")
    if version not in (1, 2):
        raise FormatError(f"GPTQ: unknown checkpoint version {version!r} (1 = gptq, 2 = gptq_v2)")


def num_groups(in_features: int, group_size: int) -> int:
    return 1 if group_size in (-1, 0, None) else -(-in_features // group_size)


def default_g_idx(in_features: int, group_size: int, device=None) -> torch.Tensor:
    """``k // group_size`` (all zeros for g = -1): the g_idx of a checkpoint without act-order."""
    k = torch.arange(in_features, dtype=torch.int32, device=device)
    return torch.zeros_like(k) if group_size in (-1, 0, None) else k // group_size


def _expect(name: str, t: torch.Tensor, shape: tuple[int, ...], why: str) -> None:
    if tuple(t.shape) != shape:
        raise FormatError(f"GPTQ {name}: shape {tuple(t.shape)} but expected {shape} ({why})")


def unpack(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
           g_idx: torch.Tensor | None, bits: int, group_size: int, version: int = 1, *,
           in_features: int | None = None, v1_zero: str = "gptqmodel"):
    """Unpack one GPTQ layer -> ``(q int32 [K, N], zeros int32 [G, N], scales, g_idx int32 [K])``.

    K comes from ``g_idx`` (or ``in_features``, or ``qweight`` rows when exact).  Every
    tensor's shape is checked against K, N = ``scales.shape[1]`` and G; a FormatError
    names the tensor that disagrees.  v1 zeros: stored + 1, wrapped or not per ``v1_zero``
    (see module doc).
    """
    _check_common(bits, version)
    if v1_zero not in V1_ZERO_MODES:
        raise FormatError(f"GPTQ: v1_zero must be one of {V1_ZERO_MODES}, got {v1_zero!r}")
    for name, t in (("qweight", qweight), ("qzeros", qzeros)):
        if t.dtype != torch.int32 or t.ndim != 2:
            raise FormatError(f"GPTQ {name}: expected a 2-D int32 tensor, got {t.dtype} "
                              f"shape {tuple(t.shape)}")
    if scales.ndim != 2 or not scales.dtype.is_floating_point:
        raise FormatError(f"GPTQ scales: expected a 2-D float tensor, got {scales.dtype} "
                          f"shape {tuple(scales.shape)}")
    if g_idx is not None:
        if g_idx.ndim != 1:
            raise FormatError(f"GPTQ g_idx: expected 1-D [K], got shape {tuple(g_idx.shape)}")
        k = g_idx.shape[0]
        if in_features is not None and in_features != k:
            raise FormatError(f"GPTQ g_idx: length {k} but in_features is {in_features}")
    elif in_features is not None:
        k = in_features
    else:
        if (qweight.shape[0] * 32) % bits:
            raise FormatError(f"GPTQ qweight: {qweight.shape[0]} rows is not a whole number of "
                              f"{bits}-bit values; pass g_idx or in_features")
        k = qweight.shape[0] * 32 // bits
    n = scales.shape[1]
    g = num_groups(k, group_size)
    _expect("qweight", qweight, (packed_length(k, bits), n),
            f"K={k} {bits}-bit values packed along K, N={n} from scales")
    _expect("scales", scales, (g, n), f"ceil(K={k} / group_size={group_size}) groups x N")
    _expect("qzeros", qzeros, (g, packed_length(n, bits)),
            f"{g} groups x N={n} {bits}-bit zeros packed along N")
    if g_idx is None:
        g_idx = default_g_idx(k, group_size, qweight.device)
    else:
        if g_idx.dtype.is_floating_point:
            raise FormatError(f"GPTQ g_idx: expected integers, got {g_idx.dtype}")
        if k and (int(g_idx.min()) < 0 or int(g_idx.max()) >= g):
            raise FormatError(f"GPTQ g_idx: group indices span [{int(g_idx.min())}, "
                              f"{int(g_idx.max())}] but scales has {g} groups")
        g_idx = g_idx.to(torch.int32)
    q = unpack_bits(qweight, bits, k, axis=0, name="GPTQ qweight")
    word_level = version == 1 and v1_zero == "gptqmodel" and bits != 3
    if word_level:
        qzeros = _add_words(qzeros, _ones_pattern(bits))
    zeros = unpack_bits(qzeros, bits, n, axis=1, name="GPTQ qzeros")
    if version == 1 and not word_level:
        zeros = zeros + 1
        if v1_zero == "gptqmodel":
            zeros = zeros & ((1 << bits) - 1)
    return q, zeros, scales, g_idx


def dequantize(qweight, qzeros, scales, g_idx, bits: int, group_size: int, version: int = 1, *,
               in_features: int | None = None, dtype: torch.dtype | None = None,
               v1_zero: str = "gptqmodel") -> torch.Tensor:
    """W ``[N, K]`` (nn.Linear orientation) = ``scales[g] * (q - zero[g])`` per input row k.

    Computed in float32 and cast to ``dtype`` (default: the scales' dtype).  (q - z) is
    a small integer and scales have at most 24 significant bits, so the float32 product
    is exact and the cast rounds once: bit-identical to AutoGPTQ/AutoAWQ, which do the
    same multiply in fp16.
    """
    from quant_kernels.int_ref import dequant_int

    q, zeros, scales, g_idx = unpack(qweight, qzeros, scales, g_idx, bits, group_size, version,
                                     in_features=in_features, v1_zero=v1_zero)
    return dequant_int(q, scales, zeros, g_idx, dtype=dtype or scales.dtype)


def pack(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
         g_idx: torch.Tensor | None, bits: int, version: int = 1, *,
         group_size: int | None = None, scale_dtype: torch.dtype | None = torch.float16):
    """Inverse of :func:`unpack` -> ``(qweight, qzeros, scales, g_idx int32)``.

    Scales are cast to ``scale_dtype`` (fp16 like AutoGPTQ; None keeps their dtype).

    ``q`` int ``[K, N]`` in ``[0, 2**b)``; ``zeros`` int ``[G, N]`` in ``[0, 2**b)``.
    v1 writes zero - 1 as GPTQModel does (see the module doc: word-level subtraction,
    per-field for 3-bit); 2**b (an ``autogptq``-mode reading) is accepted as 0.
    """
    _check_common(bits, version)
    if q.ndim != 2 or zeros.ndim != 2 or scales.ndim != 2:
        raise FormatError(f"GPTQ pack: q, zeros, scales must be 2-D, got shapes "
                          f"{tuple(q.shape)}, {tuple(zeros.shape)}, {tuple(scales.shape)}")
    k, n = q.shape
    if zeros.shape != scales.shape or zeros.shape[1] != n:
        raise FormatError(f"GPTQ pack: zeros {tuple(zeros.shape)} and scales "
                          f"{tuple(scales.shape)} must both be [G, N={n}]")
    if g_idx is None:
        if group_size is None:
            raise FormatError("GPTQ pack: give g_idx or group_size")
        g_idx = default_g_idx(k, group_size, q.device)
    if tuple(g_idx.shape) != (k,):
        raise FormatError(f"GPTQ pack: g_idx shape {tuple(g_idx.shape)} but q has K={k} rows")
    if group_size is not None and zeros.shape[0] != num_groups(k, group_size):
        raise FormatError(f"GPTQ pack: {zeros.shape[0]} groups but ceil(K={k} / "
                          f"{group_size}) = {num_groups(k, group_size)}")
    z = zeros.to(torch.int64)
    if version == 1:
        if z.numel() and (int(z.min()) < 0 or int(z.max()) > (1 << bits)):
            raise FormatError(f"GPTQ pack: v1 zeros must lie in [0, {1 << bits}]")
        z = z & ((1 << bits) - 1)  # 2**b (autogptq reading of a zero of 0) is 0
        if bits == 3:
            z = (z - 1) & 7
    qweight = pack_bits(q, bits, axis=0, name="GPTQ q")
    qzeros = pack_bits(z, bits, axis=1, name="GPTQ zeros")
    if version == 1 and bits != 3:
        qzeros = _add_words(qzeros, -_ones_pattern(bits))
    # contiguous: these are written to files as they are (safetensors refuses strided views)
    return (qweight.contiguous(), qzeros.contiguous(),
            scales.to(scale_dtype or scales.dtype).contiguous(), g_idx.to(torch.int32).contiguous())
