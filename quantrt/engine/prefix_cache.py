"""Prefix caching: a full KV block is named by a hash of its tokens chained with the hash of
the block before it, so equal names mean equal tokens at equal positions from the start of
the sequence, hence equal K/V.  A later request whose prompt starts with the same full
blocks reuses them instead of recomputing them.

blake2b-128 rather than Python's ``hash``: a collision would silently serve another
prompt's K/V, and 128 bits make that practically impossible (64 would be thin at scale).
"""
from __future__ import annotations

import hashlib
from array import array

from quantrt.engine.sequence import Sequence


def chain_hash(parent: bytes | None, tokens: list[int]) -> bytes:
    h = hashlib.blake2b(parent or b"", digest_size=16)
    h.update(array("q", tokens).tobytes())
    return h.digest()


def block_hash(seq: Sequence, i: int, block_size: int) -> bytes:
    """Hash of full block ``i`` of ``seq`` (memoized on the sequence)."""
    hashes = seq.block_hashes
    if i < len(hashes):
        return hashes[i]
    if (i + 1) * block_size > len(seq):
        raise ValueError(f"block {i} of a {len(seq)}-token sequence is not full")
    ids = seq.all_ids
    for j in range(len(hashes), i + 1):
        hashes.append(chain_hash(hashes[j - 1] if j else None,
                                 ids[j * block_size:(j + 1) * block_size]))
    return hashes[i]


class PrefixCache:
    """The two-way map between block hashes and the physical blocks holding them.

    A block is in the map from the step its last token's K/V was computed until the pool
    hands it to another use; that may be long after its last user released it (the block
    manager keeps such blocks on an LRU list and reuses the oldest last)."""

    def __init__(self) -> None:
        self._block_of: dict[bytes, int] = {}
        self._hash_of: dict[int, bytes] = {}

    def __len__(self) -> int:
        return len(self._block_of)

    def lookup(self, h: bytes) -> int | None:
        return self._block_of.get(h)

    def has_hash(self, block: int) -> bool:
        return block in self._hash_of

    def register(self, block: int, h: bytes) -> bool:
        """Name ``block`` by ``h``.  False when another block already holds that content
        (two requests computed it at once; the first one keeps the name)."""
        if h in self._block_of or block in self._hash_of:
            return False
        self._block_of[h] = block
        self._hash_of[block] = h
        return True

    def forget(self, block: int) -> None:
        h = self._hash_of.pop(block, None)
        if h is not None:
            del self._block_of[h]
