"""Base class, registry and bit-twiddling helpers for the pure-torch GGML dequantizers.

The subclasses (in ``gguf_ref.py``, ``gguf_ref_kquants.py``, ``gguf_ref_iquants.py``) only
write the per-block math.  Everything here exists so that math can stay a near
line-by-line mirror of gguf-py's ``gguf/quants.py`` (itself a port of
``ggml-quants.c``): bit-exactness is only guaranteed if the float32 operations happen in
the same order, so the helpers deliberately expose the same "shift a byte by a vector of
offsets, mask" idiom that gguf-py uses instead of cleverer fused forms.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

# Dequantizing a whole tensor at once allocates several full-size int/float
# temporaries; working on ~0.5M output values at a time keeps them near cache and was
# measured ~1.7x faster on token_embd of SmolLM2 (49152x576 Q8_0).  Much smaller
# chunks lose to per-op overhead, worst with several threads.
_CHUNK_VALUES = 1 << 19

_REGISTRY: dict[GGMLQuantizationType, type[GGMLBlockType]] = {}


class GGMLBlockType:
    """One GGML storage type: ``block_size`` values packed in ``type_size`` bytes.

    Subclasses register themselves by passing ``ggml_type=``, ``block_size=`` and
    ``type_size=`` as class keywords and implement :meth:`dequantize_blocks`.
    """

    ggml_type: ClassVar[GGMLQuantizationType]
    block_size: ClassVar[int]
    type_size: ClassVar[int]

    def __init_subclass__(cls, *, ggml_type: GGMLQuantizationType | None = None,
                          block_size: int = 0, type_size: int = 0, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if ggml_type is None:  # an intermediate helper class, not a storage type
            return
        # The sizes are restated in each subclass so the block math can be read on its
        # own; checking them against gguf's table catches a typo at import time.
        if GGML_QUANT_SIZES[ggml_type] != (block_size, type_size):
            raise AssertionError(f"{cls.__name__}: sizes {(block_size, type_size)} != "
                                 f"gguf's {GGML_QUANT_SIZES[ggml_type]}")
        if ggml_type in _REGISTRY:
            raise AssertionError(f"{ggml_type.name} registered twice")
        cls.ggml_type, cls.block_size, cls.type_size = ggml_type, block_size, type_size
        _REGISTRY[ggml_type] = cls

    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        """uint8 ``[n_blocks, type_size]`` -> float32 ``[n_blocks, block_size]``."""
        raise NotImplementedError

    @classmethod
    def dequantize_bytes(cls, raw: torch.Tensor) -> torch.Tensor:
        """Contiguous uint8 bytes -> flat float32 values, chunked over blocks."""
        n_blocks = raw.numel() // cls.type_size
        blocks = raw.reshape(n_blocks, cls.type_size)
        step = max(1, _CHUNK_VALUES // cls.block_size)
        if n_blocks <= step:
            return cls.dequantize_blocks(blocks).reshape(-1)
        out = torch.empty(n_blocks, cls.block_size, dtype=torch.float32, device=raw.device)
        for start in range(0, n_blocks, step):
            out[start:start + step] = cls.dequantize_blocks(blocks[start:start + step])
        return out.reshape(-1)


def registry() -> dict[GGMLQuantizationType, type[GGMLBlockType]]:
    return _REGISTRY


# --- helpers shared by the block math -------------------------------------------------

def aligned_copy(x: torch.Tensor) -> torch.Tensor:
    """A packed copy at storage offset 0, ready for a wider dtype ``.view``.

    Such views need the byte offset and row stride to be multiples of the new element
    size; a field slice (offset 2 for a uint32, odd type sizes like MXFP4's 17, or an
    mmap slice at an odd file offset) does not give that, and ``.contiguous()`` is a
    no-op on an already-contiguous single-row slice.
    """
    return x.clone(memory_format=torch.contiguous_format)


def f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The little-endian fp16 at byte ``start`` of each block, as float32 ``[n, 1]``."""
    return aligned_copy(blocks[:, start:start + 2]).view(torch.float16).float()


def f32(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The little-endian fp32 at byte ``start`` of each block, ``[n, 1]``."""
    return aligned_copy(blocks[:, start:start + 4]).view(torch.float32)


def u16(blocks: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """``count`` little-endian uint16 from byte ``start``, widened to int32 ``[n, count]``."""
    raw = aligned_copy(blocks[:, start:start + 2 * count]).view(torch.int16)
    # int32 so that the top bit stays a value bit and ">>" does not sign-extend.
    return raw.to(torch.int32) & 0xFFFF


def u32(blocks: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """``count`` little-endian uint32 from byte ``start``, widened to int64 ``[n, count]``."""
    raw = aligned_copy(blocks[:, start:start + 4 * count]).view(torch.int32)
    return raw.to(torch.int64) & 0xFFFFFFFF


def split_bits(x: torch.Tensor, shifts: range | list[int], mask: int) -> torch.Tensor:
    """``(x[..., None, :] >> shifts[:, None]) & mask``: adds a dim of len(shifts) before the last.

    This is gguf-py's ``reshape(..., 1, m) >> array(shifts).reshape(..., k, 1)`` idiom;
    callers reshape the result exactly as gguf-py does, which fixes the element order.
    """
    s = torch.tensor(list(shifts), dtype=x.dtype, device=x.device).reshape(-1, 1)
    return (x.unsqueeze(-2) >> s) & mask


def split_bits_last(x: torch.Tensor, shifts: range | list[int], mask: int) -> torch.Tensor:
    """``(x[..., :, None] >> shifts) & mask``: the new dim goes last (bits of one byte adjacent)."""
    s = torch.tensor(list(shifts), dtype=x.dtype, device=x.device)
    return (x.unsqueeze(-1) >> s) & mask


def nibbles(qs: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., m]`` -> ``[..., 2m]``: the m low nibbles, then the m high nibbles.

    That is how ggml lays out 4-bit values of one 32-value group (element j in the low
    nibble of byte j, element j+16 in the high nibble), e.g. dequantize_row_q4_0.
    """
    if qs.shape[-1] % 4:
        return torch.cat([qs & 0x0F, qs >> 4], dim=-1)
    # Four bytes per int32 op: byte-wise masks give the same bytes with a quarter of
    # the element count (~1.3x faster end to end for Q4_0/Q4_1).
    words = aligned_copy(qs).view(torch.int32)
    return torch.cat([words & 0x0F0F0F0F, (words >> 4) & 0x0F0F0F0F], dim=-1).view(torch.uint8)


def sign_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """Bit 0/1 -> float32 +1/-1 (gguf-py: ``np.where(signs == 0, 1, -1)``)."""
    return 1.0 - 2.0 * bits.to(torch.float32)
