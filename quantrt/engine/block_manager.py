"""KV-cache blocks: a pool with reference counts, per-sequence block tables and prefix
caching.  Plain Python; the model runner alone owns the tensors the block ids index.

A block is in exactly one of three states:
  in use      refcount > 0 (shared full blocks have one count per sequence holding them);
  free        refcount 0, no content worth keeping;
  evictable   refcount 0 but named in the prefix cache: a later request with the same
              prefix takes it back; otherwise it is reused, least recently released first,
              once no plain free block is left.
Only full blocks are ever shared, and a sequence writes only at positions past its
``num_cached``, so a shared block is never written: no copy-on-write is needed.
"""
from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Self

from quantrt.engine.prefix_cache import PrefixCache, block_hash
from quantrt.engine.sequence import Sequence


@dataclass
class KVUsage:
    """Slots of blocks in use vs slots holding a token's K/V (each shared slot counted once)."""
    allocated: int = 0
    filled: int = 0

    @property
    def waste(self) -> float:
        return 1 - self.filled / self.allocated if self.allocated else 0.0

    def __iadd__(self, other: KVUsage) -> Self:
        self.allocated += other.allocated
        self.filled += other.filled
        return self


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("need at least one block of at least one token")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.refcount = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self.cache = PrefixCache() if enable_prefix_caching else None
        self.prefix_queries = 0   # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0      # ... of which were found there
        self.num_evictions = 0    # named blocks handed out for new content

    # -- the pool -------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks that can be handed out (free or evictable)."""
        return len(self._free) + len(self._evictable)

    def _allocate(self) -> int:
        if self._free:
            block = self._free.popleft()
        else:
            block, _ = self._evictable.popitem(last=False)
            self.cache.forget(block)
            self.num_evictions += 1
        self.refcount[block] = 1
        return block

    def _ref(self, block: int) -> None:
        if self.refcount[block] == 0:
            del self._evictable[block]
        self.refcount[block] += 1

    def _unref(self, block: int) -> None:
        self.refcount[block] -= 1
        if self.refcount[block] < 0:
            raise RuntimeError(f"block {block} released more often than taken")
        if self.refcount[block] == 0:
            if self.cache is not None and self.cache.has_hash(block):
                self._evictable[block] = None
            else:
                self._free.append(block)

    # -- growing and releasing sequences --------------------------------------------------
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
            seq.block_table.append(self._allocate())

    def release(self, seq: Sequence) -> None:
        # Tail first: those blocks go to the LRU end first, so they are evicted before the
        # prompt's head blocks, which other requests are likelier to share.
        for block in reversed(seq.block_table):
            self._unref(block)
        seq.block_table.clear()
        seq.num_cached = 0

    def fork(self, parent: Sequence, child: Sequence, num_tokens: int) -> None:
        """Let ``child`` (no blocks yet) share the full blocks of ``parent``'s first
        ``num_tokens`` tokens; it recomputes the rest (less than one block)."""
        if child.block_table:
            raise RuntimeError("fork target already holds blocks")
        full = min(num_tokens, parent.num_cached) // self.block_size
        for block in parent.block_table[:full]:
            self._ref(block)
        child.block_table = parent.block_table[:full]
        child.num_cached = full * self.block_size
        child.block_hashes = parent.block_hashes[:full]

    # -- prefix caching -------------------------------------------------------------------
    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding the longest prefix of ``seq`` in whole blocks.  At least
        one token is left out: the model must run on it to produce the next logits."""
        if self.cache is None or seq.block_table or len(self.cache) == 0:
            return []
        hits = []
        for i in range((len(seq) - 1) // self.block_size):
            block = self.cache.lookup(block_hash(seq, i, self.block_size))
            if block is None:
                break
            hits.append(block)
        return hits

    def can_admit(self, seq: Sequence, hits: list[int], new_tokens: int) -> bool:
        """Whether ``seq`` can take ``hits`` and then grow by ``new_tokens`` past them."""
        cached = seq.num_cached + len(hits) * self.block_size
        need = max(0, -(-(cached + new_tokens) // self.block_size) - len(seq.block_table) - len(hits))
        revived = sum(1 for b in hits if self.refcount[b] == 0)  # leave the evictable pool
        return need <= self.num_free - revived

    def admit(self, seq: Sequence, hits: list[int], new_tokens: int) -> None:
        """Take the cached prefix blocks ``hits`` (see match_prefix), then grow."""
        if hits and seq.block_table:
            raise RuntimeError("prefix hits for a sequence that already holds blocks")
        for block in hits:
            self._ref(block)
        seq.block_table.extend(hits)
        seq.num_cached += len(hits) * self.block_size
        if self.cache is not None and not seq.output_ids:
            self.prefix_queries += len(seq)
            self.prefix_hits += len(hits) * self.block_size
            seq.num_prefix_hits = len(hits) * self.block_size
        self.grow(seq, new_tokens)

    def commit(self, seq: Sequence, first_new: int) -> None:
        """Name the blocks that became full with positions ``first_new .. num_cached-1``
        (just computed), so later requests can reuse them."""
        if self.cache is None:
            return
        bs = self.block_size
        for i in range(first_new // bs, seq.num_cached // bs):
            self.cache.register(seq.block_table[i], block_hash(seq, i, bs))

    def slots(self, seq: Sequence, start: int, count: int) -> list[int]:
        """Cache slots of token positions ``start .. start+count-1`` of ``seq``."""
        bs = self.block_size
        return [seq.block_table[p // bs] * bs + p % bs for p in range(start, start + count)]

    # -- accounting -----------------------------------------------------------------------
    def usage(self, seqs: list[Sequence]) -> KVUsage:
        """Slots of in-use blocks vs slots holding computed tokens of ``seqs``."""
        bs = self.block_size
        fill: dict[int, int] = {}
        for seq in seqs:
            for i, block in enumerate(seq.block_table):
                n = min(bs, max(0, seq.num_cached - i * bs))
                if n > fill.get(block, 0):
                    fill[block] = n
        in_use = self.num_blocks - self.num_free
        return KVUsage(allocated=in_use * bs, filled=sum(fill.values()))
