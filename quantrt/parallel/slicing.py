"""Cutting loaded tensors along one axis by element ranges, where one stored index may
stand for ``unit`` elements (a block scale, a packed word).  Used by the methods'
``shard`` hooks; the ranges come from :mod:`quantrt.parallel.plan` and respect the units."""
from __future__ import annotations

import torch

Range = tuple[int, int]


def take(t: torch.Tensor, axis: int, ranges: list[Range], unit: int = 1) -> torch.Tensor:
    """Indices ``[a // unit, ceil(b / unit))`` of ``axis`` for each range, concatenated.
    One range is a view (a memory-mapped tensor stays unread until used)."""
    unit = max(1, unit)
    spans = [(a // unit, -(-b // unit)) for a, b in ranges]
    if len(spans) == 1:
        a, b = spans[0]
        return t.narrow(axis, a, b - a)
    return torch.cat([t.narrow(axis, a, b - a) for a, b in spans], dim=axis)


def row_ranges_to_index(ranges: list[Range], device: torch.device | None = None) -> torch.Tensor:
    return torch.cat([torch.arange(a, b, device=device) for a, b in ranges])
