"""Tensor-parallel split rules: which rows and columns of every layer a rank holds.

Plain integer arithmetic, no torch: the loader uses these rules to cut each layer out of
the full checkpoint, and ``quantrt estimate --num-gpus`` uses the same ones to count the
bytes on each GPU.

* Attention is split by heads.  With at least as many KV heads as ranks, each rank takes
  a contiguous run of KV heads and the query heads that read them; with fewer, query heads
  are split and each rank holds the KV heads its queries need (a KV head is replicated on
  the ranks its query group spans).  Splits may be uneven (9 heads on 2 ranks: 5 + 4).
* The MLP's intermediate dimension is split at a unit that keeps whole quantization groups
  and packed words on both gate/up (output rows) and down (input columns).
* Embedding and lm_head are split by vocabulary rows.
* A cut that a layer's format cannot make (o_proj's input at a head boundary inside a
  quantization group) is widened to the nearest cuts it can make; the extra input columns
  are fed zeros ("padding"), the extra output rows are dropped.  Nothing is refused.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

Range = tuple[int, int]


@dataclass(frozen=True)
class TPRank:
    """Which rank of how many (no process group: plain data, picklable)."""

    rank: int
    size: int

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"tensor-parallel size must be a positive integer, got {self.size!r}")
        if not isinstance(self.rank, int) or not 0 <= self.rank < self.size:
            raise ValueError(f"rank {self.rank!r} is not in 0..{self.size - 1}")


def split_range(total: int, unit: int, size: int, rank: int) -> Range:
    """Rank's part of ``range(total)`` cut only at multiples of ``unit`` (the last part may
    end at ``total``), as evenly as whole units allow; earlier ranks take the extra units."""
    unit = max(1, min(unit, total))
    units = -(-total // unit)
    base, extra = divmod(units, size)
    start = rank * base + min(rank, extra)
    end = start + base + (1 if rank < extra else 0)
    return min(start * unit, total), min(end * unit, total)


def widen(r: Range, unit: int, total: int) -> Range:
    """The smallest range containing ``r`` whose ends are multiples of ``unit`` (or ``total``)."""
    unit = max(1, unit)
    return (r[0] // unit) * unit, min(-(-r[1] // unit) * unit, total)


def lcm(*units: int) -> int:
    out = 1
    for u in units:
        out = out * max(1, u) // math.gcd(out, max(1, u))
    return out


def head_split(num_heads: int, num_kv_heads: int, tp: TPRank) -> tuple[Range, Range]:
    """(query heads, KV heads) that ``tp.rank`` holds."""
    if num_heads < tp.size:
        raise ValueError(f"the model has {num_heads} attention heads, fewer than the "
                         f"tensor-parallel size {tp.size}")
    group = num_heads // num_kv_heads
    if num_kv_heads >= tp.size:
        k0, k1 = split_range(num_kv_heads, 1, tp.size, tp.rank)
        return (k0 * group, k1 * group), (k0, k1)
    q0, q1 = split_range(num_heads, 1, tp.size, tp.rank)
    return (q0, q1), (q0 // group, (q1 - 1) // group + 1)


@dataclass(frozen=True)
class ColumnCut:
    """Output rows a rank computes: per fused shard, the rows wanted and the (wider)
    rows stored; ``keep`` indexes the wanted rows in the layer's stored output."""

    wanted: tuple[tuple[Range, ...], ...]
    stored: tuple[tuple[Range, ...], ...]

    @property
    def keep(self) -> list[int] | None:
        if self.wanted == self.stored:
            return None
        out, base = [], 0
        for want, have in zip(self.wanted, self.stored):
            for (a, b), (c, d) in zip(want, have):
                out += range(base + a - c, base + b - c)
                base += d - c
        return out

    def sizes(self) -> list[int]:
        return [sum(b - a for a, b in shard) for shard in self.stored]


@dataclass(frozen=True)
class RowCut:
    """Input columns a rank multiplies: ``wanted`` are its own, ``stored`` the widened
    range its weight keeps; the input is zero-padded by ``pad`` (left, right)."""

    wanted: Range
    stored: Range

    @property
    def pad(self) -> tuple[int, int] | None:
        left, right = self.wanted[0] - self.stored[0], self.stored[1] - self.wanted[1]
        return None if left == right == 0 else (left, right)


def column_cut(wanted: list[list[Range]], shard_rows: list[int], unit: int) -> ColumnCut:
    stored = tuple(tuple(widen(r, unit, rows) for r in shard)
                   for shard, rows in zip(wanted, shard_rows))
    return ColumnCut(tuple(tuple(s) for s in wanted), stored)


def row_cut(wanted: Range, cols: int, unit: int) -> RowCut:
    return RowCut(wanted, widen(wanted, unit, cols))


def attention_cuts(num_heads: int, num_kv_heads: int, head_dim: int, fused: bool,
                   qkv_unit: int, o_unit: int, tp: TPRank) -> tuple[ColumnCut, RowCut]:
    """qkv (3 shards, or 1 fused [q; k; v] shard) and o_proj cuts."""
    (q0, q1), (k0, k1) = head_split(num_heads, num_kv_heads, tp)
    q_rows, kv_rows = num_heads * head_dim, num_kv_heads * head_dim
    q, kv = (q0 * head_dim, q1 * head_dim), (k0 * head_dim, k1 * head_dim)
    if fused:
        wanted = [[q, (q_rows + kv[0], q_rows + kv[1]),
                   (q_rows + kv_rows + kv[0], q_rows + kv_rows + kv[1])]]
        # each part widens inside its own block of the fused tensor
        stored = ((widen(q, qkv_unit, q_rows),
                   tuple(x + q_rows for x in widen(kv, qkv_unit, kv_rows)),
                   tuple(x + q_rows + kv_rows for x in widen(kv, qkv_unit, kv_rows))),)
        qkv = ColumnCut((tuple(wanted[0]),), stored)
    else:
        qkv = column_cut([[q], [kv], [kv]], [q_rows, kv_rows, kv_rows], qkv_unit)
    return qkv, row_cut(q, q_rows, o_unit)


def mlp_cuts(intermediate: int, fused: bool, gate_up_unit: int, down_unit: int,
             tp: TPRank) -> tuple[ColumnCut, RowCut]:
    """gate/up and down cuts over one intermediate range, aligned for both layers when
    that still gives every rank a part (else each layer widens its own cut)."""
    unit = coarsest_unit(intermediate, tp.size, lcm(gate_up_unit, down_unit), gate_up_unit)
    i = split_range(intermediate, unit, tp.size, tp.rank)
    if fused:
        g = widen(i, gate_up_unit, intermediate)
        cut = ColumnCut(((i, (intermediate + i[0], intermediate + i[1])),),
                        ((g, (intermediate + g[0], intermediate + g[1])),))
    else:
        cut = column_cut([[i], [i]], [intermediate] * 2, gate_up_unit)
    return cut, row_cut(i, intermediate, down_unit)


def coarsest_unit(total: int, size: int, *units: int) -> int:
    """The first of ``units`` that still gives each of ``size`` ranks at least one unit."""
    for unit in units:
        if -(-total // max(1, unit)) >= size:
            return unit
    return 1


