"""Marlin-format 4-bit checkpoints (IST-DASLab Marlin; AutoGPTQ ``checkpoint_format: marlin``;
vLLM ``quant_method: marlin``): symmetric ``w = (q - 8) * s``, group 128 or per-channel.

The layout is the Marlin kernel's register order, made by (same steps as ``Layer.pack`` in
IST-DASLab/marlin ``marlin/__init__.py``):

1. ``q`` [K, N] is cut into 16 x 16 tiles, stored tile row by tile row:
   ``[K/16, 16, N/16, 16] -> permute(0, 2, 1, 3) -> [K/16, N * 16]``;
2. every run of 1024 values is permuted by ``PERM`` (the mma.m16n8k16 fragment order,
   with the nibble interleave 0 2 4 6 1 3 5 7);
3. 8 consecutive values form an int32, value ``i`` at bits ``4 i`` -> ``B`` [K/16, N * 2];
4. scales ``[G, N]`` are permuted in runs of 64 (``SCALE_PERM``, grouped) or 32
   (``SCALE_PERM_SINGLE``, per-channel).

Requirements of the format: K % 16 == 0 and N % 64 == 0 (whole 1024-value runs per tile row).
"""
from __future__ import annotations

import torch

from formats.packing import pack_bits, unpack_bits
from quantrt.errors import FormatError

TILE = 16


def _perms() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    perm = []
    for i in range(32):
        col = i // 4
        rows = [2 * (i % 4), 2 * (i % 4) + 1, 2 * (i % 4 + 4), 2 * (i % 4 + 4) + 1]
        base = [16 * r + col + 8 * block for block in (0, 1) for r in rows]
        for j in range(4):
            perm.extend(p + 256 * j for p in base)
    interleave = torch.tensor([0, 2, 4, 6, 1, 3, 5, 7])
    perm_t = torch.tensor(perm).reshape(-1, 8)[:, interleave].reshape(-1)
    scale = torch.tensor([i + 8 * j for i in range(8) for j in range(8)])
    single = torch.tensor([2 * i + j for i in range(4) for j in (0, 1, 8, 9, 16, 17, 24, 25)])
    return perm_t, scale, single


PERM, SCALE_PERM, SCALE_PERM_SINGLE = _perms()


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel())
    return inv


def check_shape(k: int, n: int, group_size: int) -> None:
    if k % TILE or n % 64:
        raise FormatError(f"Marlin layout needs K % 16 == 0 and N % 64 == 0, got K={k}, N={n}")
    if group_size != -1 and (group_size < 1 or k % group_size):
        raise FormatError(f"Marlin: K={k} is not a multiple of group_size {group_size}")


def unpack(B: torch.Tensor, s: torch.Tensor, k: int, n: int, group_size: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """``B`` int32 [K/16, 2N], ``s`` [G, N] -> (q int32 [K, N] in 0..15, scales [G, N])."""
    check_shape(k, n, group_size)
    if B.dtype != torch.int32 or tuple(B.shape) != (k // TILE, n * TILE // 8):
        raise FormatError(f"Marlin B: expected int32 {(k // TILE, n * TILE // 8)}, got "
                          f"{B.dtype} {tuple(B.shape)}")
    g = 1 if group_size == -1 else k // group_size
    if tuple(s.shape) != (g, n):
        raise FormatError(f"Marlin s: expected shape {(g, n)}, got {tuple(s.shape)}")
    vals = unpack_bits(B, 4, n * TILE, axis=1, name="Marlin B")        # [K/16, 16 N]
    vals = vals.reshape(-1, PERM.numel())[:, _inverse(PERM)].reshape(k // TILE, n * TILE)
    q = vals.reshape(k // TILE, n // TILE, TILE, TILE).permute(0, 2, 1, 3).reshape(k, n)
    sp = SCALE_PERM if group_size != -1 else SCALE_PERM_SINGLE
    scales = s.reshape(-1, sp.numel())[:, _inverse(sp)].reshape(g, n)
    return q.contiguous(), scales


def dequantize(B, s, k: int, n: int, group_size: int, dtype=torch.float32) -> torch.Tensor:
    """W [N, K] = (q - 8) * s (float32 math, one cast)."""
    q, scales = unpack(B, s, k, n, group_size)
    g = k if group_size == -1 else group_size
    gi = torch.arange(k) // g
    return ((q.float() - 8) * scales.float()[gi]).t().contiguous().to(dtype)


def pack(q: torch.Tensor, scales: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`unpack`: q int [K, N] in 0..15, scales [G, N] -> (B, s)."""
    k, n = q.shape
    check_shape(k, n, group_size)
    tiles = q.reshape(k // TILE, TILE, n // TILE, TILE).permute(0, 2, 1, 3).reshape(k // TILE, -1)
    tiles = tiles.reshape(-1, PERM.numel())[:, PERM].reshape(k // TILE, n * TILE)
    B = pack_bits(tiles.to(torch.int64), 4, axis=1, name="Marlin q")
    sp = SCALE_PERM if group_size != -1 else SCALE_PERM_SINGLE
    s = scales.reshape(-1, sp.numel())[:, sp].reshape(scales.shape)
    return B, s.contiguous()
