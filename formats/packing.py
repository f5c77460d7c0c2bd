"""LSB-first packing of b-bit unsigned integers into int32 words, and its inverse.

Two word layouts exist in real checkpoints; both read the words as one little-endian
bit stream in which word ``w`` holds stream bits ``[32w, 32w + 32)``:

* ``dense=True``: value ``i`` occupies stream bits ``[i*b, i*b + b)``.  A value may
  straddle two words when ``b`` does not divide 32; 32 values then fill exactly ``b``
  words.  This is GPTQ's layout (AutoGPTQ's 3-bit ``pack`` loop spills values 10 and 21
  across word boundaries) and compressed-tensors 0.19's ``pack_to_int32`` ("dense
  cross-element packing").  Word count: ``ceil(n*b/32)``.
* ``dense=False``: ``f = 32 // b`` values per word, value ``i`` in word ``i // f`` at shift
  ``(i % f) * b``; the top ``32 - f*b`` bits of each word stay zero.  Older
  compressed-tensors releases packed 3/5/6/7-bit values this way.  Word count:
  ``ceil(n/f)``.

For ``b`` in {1, 2, 4, 8} both layouts are identical.  When ``n`` is not a multiple of
the values per word the last word is zero-padded, as every reference writer does; the
unpacker takes the true ``n`` (the checkpoint's shape) and drops the padding.

Values stay as int64 inside so that shifts past bit 31 never overflow; the result is
reinterpreted as int32 (two's complement), which is what the checkpoints store.
"""
from __future__ import annotations

import torch

from quantrt.errors import FormatError

SUPPORTED_BITS = (1, 2, 3, 4, 5, 6, 7, 8)
# Row-chunking bounds the int64 temporaries (~8 bytes x a few per value) for
# model-sized matrices; it loops over slabs of rows, never over values.
_CHUNK_VALUES = 1 << 22
_U32 = (1 << 32) - 1


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise FormatError(f"cannot pack {bits}-bit values: supported widths are {SUPPORTED_BITS}")


def _period(bits: int, dense: bool) -> tuple[int, int]:
    """(values, words) of the smallest repeating unit of the layout."""
    if dense or 32 % bits == 0:
        return 32, bits
    return 32 // bits, 1


def packed_length(count: int, bits: int, dense: bool = True) -> int:
    """Number of int32 words that ``count`` packed ``bits``-bit values occupy."""
    _check_bits(bits)
    if dense or 32 % bits == 0:
        return -(-count * bits // 32)
    return -(-count // (32 // bits))


def _layout(bits: int, dense: bool, device) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    per, words = _period(bits, dense)
    idx = torch.arange(per, device=device, dtype=torch.int64)
    if words == 1 and per * bits < 32:  # per-word layout with unused top bits
        return torch.zeros_like(idx), idx * bits, per, words
    start = idx * bits
    return start // 32, start % 32, per, words


def _to_int32(words64: torch.Tensor) -> torch.Tensor:
    # Values are in [0, 2**32); move the top half to negatives before narrowing so the
    # cast never depends on implementation-defined wrap-around.
    return torch.where(words64 >= (1 << 31), words64 - (1 << 32), words64).to(torch.int32)


def _rows(t: torch.Tensor, axis: int) -> tuple[torch.Tensor, tuple[int, ...], int]:
    t = t.movedim(axis, -1)
    lead = tuple(t.shape[:-1])
    return t.reshape(-1, t.shape[-1]), lead, axis


def pack_bits(values: torch.Tensor, bits: int, axis: int = -1, *, dense: bool = True,
              name: str = "values") -> torch.Tensor:
    """Pack unsigned ``bits``-bit integers along ``axis`` into int32 words.

    ``values`` may be any integer dtype; every entry must lie in ``[0, 2**bits)``
    (a FormatError names ``name`` otherwise).  The packed axis shrinks to
    :func:`packed_length`; the other axes are unchanged.
    """
    _check_bits(bits)
    if values.dtype.is_floating_point or values.dtype == torch.bool:
        raise FormatError(f"{name}: expected integer values to pack, got {values.dtype}")
    if values.ndim == 0:
        raise FormatError(f"{name}: cannot pack a 0-d tensor")
    if values.numel() and (int(values.min()) < 0 or int(values.max()) >= (1 << bits)):
        raise FormatError(f"{name}: values must lie in [0, {1 << bits}) for {bits}-bit packing, "
                          f"got range [{int(values.min())}, {int(values.max())}]")
    rows, lead, axis = _rows(values, axis)
    n = rows.shape[-1]
    n_words = packed_length(n, bits, dense)
    word_of, shift, per, words_per = _layout(bits, dense, values.device)
    spill = (shift + bits) > 32
    out = torch.empty(rows.shape[0], n_words, dtype=torch.int32, device=values.device)
    step = max(1, _CHUNK_VALUES // max(n, 1))
    for r0 in range(0, rows.shape[0], step):
        v = rows[r0:r0 + step].to(torch.int64)
        v = torch.nn.functional.pad(v, (0, (-n) % per)).reshape(v.shape[0], -1, per)
        acc = torch.zeros(*v.shape[:2], words_per, dtype=torch.int64, device=v.device)
        # Fields never overlap, so adding them is the same as OR-ing them.
        acc.scatter_add_(2, word_of.expand_as(v), (v << shift) & _U32)
        if bool(spill.any()):
            hi = v[..., spill] >> (32 - shift[spill])
            acc.scatter_add_(2, (word_of[spill] + 1).expand_as(hi), hi)
        out[r0:r0 + step] = _to_int32(acc.reshape(v.shape[0], -1)[:, :n_words])
    return out.reshape(*lead, n_words).movedim(-1, axis)


def unpack_bits(words: torch.Tensor, bits: int, count: int, axis: int = -1, *,
                dense: bool = True, name: str = "packed") -> torch.Tensor:
    """Inverse of :func:`pack_bits`: int32 words -> int32 values in ``[0, 2**bits)``.

    ``count`` is the true (unpadded) length of the packed axis; the word count along
    ``axis`` must be exactly ``packed_length(count, bits, dense)``.
    """
    _check_bits(bits)
    if words.dtype not in (torch.int32, torch.uint32):
        raise FormatError(f"{name}: packed words must be int32, got {words.dtype}")
    if words.ndim == 0:
        raise FormatError(f"{name}: cannot unpack a 0-d tensor")
    need = packed_length(count, bits, dense)
    ax = axis % words.ndim
    if words.shape[ax] != need:
        raise FormatError(f"{name}: has {words.shape[ax]} words along dim {ax} of shape "
                          f"{tuple(words.shape)}, but {count} {bits}-bit values need {need}")
    rows, lead, axis = _rows(words, axis)
    word_of, shift, per, words_per = _layout(bits, dense, words.device)
    spill = (shift + bits) > 32
    nxt = torch.clamp(word_of + 1, max=words_per - 1)
    mask = (1 << bits) - 1
    out = torch.empty(rows.shape[0], count, dtype=torch.int32, device=words.device)
    step = max(1, _CHUNK_VALUES // max(count, 1))
    for r0 in range(0, rows.shape[0], step):
        w = rows[r0:r0 + step].to(torch.int64) & _U32
        w = torch.nn.functional.pad(w, (0, (-need) % words_per)).reshape(w.shape[0], -1, words_per)
        v = w[..., word_of] >> shift
        if bool(spill.any()):
            v = v | torch.where(spill, w[..., nxt] << (32 - shift), 0)
        out[r0:r0 + step] = (v & mask).reshape(w.shape[0], -1)[:, :count].to(torch.int32)
    return out.reshape(*lead, count).movedim(-1, axis)


def to_unsigned(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed b-bit values -> offset-binary (add ``2**(b-1)``), as compressed-tensors stores."""
    return values.to(torch.int32) + (1 << (bits - 1))


def to_signed(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Offset-binary b-bit values -> signed (subtract ``2**(b-1)``)."""
    return values.to(torch.int32) - (1 << (bits - 1))
