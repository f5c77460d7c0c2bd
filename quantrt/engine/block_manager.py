"""KV-cache blocks: a pool with a free list and reference counts.  Plain Python; the model
runner alone owns the tensors the block ids index."""
from __future__ import annotations

from collections import deque

from quantrt.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("need at least one block of at least one token")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free: deque[int] = deque(range(num_blocks))
        self.refcount = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self.free)

    def blocks_needed(self, seq: Sequence, new_tokens: int) -> int:
        """Extra blocks ``seq`` needs to hold ``new_tokens`` more tokens in the cache."""
        total = seq.num_cached + new_tokens
        return max(0, -(-total // self.block_size) - len(seq.block_table))

    def can_grow(self, seq: Sequence, new_tokens: int) -> bool:
        return self.blocks_needed(seq, new_tokens) <= self.num_free

    def grow(self, seq: Sequence, new_tokens: int) -> None:
        need = self.blocks_needed(seq, new_tokens)
        if need > self.num_free:
            raise RuntimeError("out of KV-cache blocks; check can_grow first")
        for _ in range(need):
            block = self.free.popleft()
            self.refcount[block] = 1
            seq.block_table.append(block)

    def release(self, seq: Sequence) -> None:
        for block in reversed(seq.block_table):
            self.refcount[block] -= 1
            if self.refcount[block] == 0:
                self.free.append(block)
        seq.block_table.clear()
        seq.num_cached = 0

    def slots(self, seq: Sequence, start: int, count: int) -> list[int]:
        """Cache slots of token positions ``start .. start+count-1`` of ``seq``."""
        bs = self.block_size
        return [seq.block_table[p // bs] * bs + p % bs for p in range(start, start + count)]
