"""The KV block pool, refcounts and the prefix cache: plain Python, no model."""
import random

import pytest

from quantrt.engine.block_manager import BlockManager
from quantrt.engine.prefix_cache import chain_hash
from quantrt.engine.sequence import SamplingParams, Sequence

P = SamplingParams(max_tokens=4)


def seq_of(tokens):
    return Sequence(list(tokens), P)


def compute(bm, seq, n):
    """What the engine does for one scheduled chunk: grow, 'run the model', commit."""
    bm.grow(seq, n)
    seq.num_cached += n
    bm.commit(seq, seq.num_cached - n)


def check_invariants(bm, seqs):
    """Every block is in exactly one state; refcounts equal the tables that hold them."""
    held = [0] * bm.num_blocks
    for s in seqs:
        for b in s.block_table:
            held[b] += 1
    assert held == bm.refcount
    free, evictable = list(bm._free), list(bm._evictable)
    assert len(set(free)) == len(free) and not set(free) & set(evictable)
    in_use = {b for b in range(bm.num_blocks) if bm.refcount[b] > 0}
    assert in_use.isdisjoint(free) and in_use.isdisjoint(evictable)
    assert len(in_use) + len(free) + len(evictable) == bm.num_blocks
    assert all(bm.cache.has_hash(b) for b in evictable)


def test_counts_and_slots():
    bm = BlockManager(num_blocks=5, block_size=4)
    seq = seq_of(range(9))
    assert bm.blocks_needed(seq, 9) == 3
    bm.grow(seq, 9)
    assert bm.num_free == 2 and len(seq.block_table) == 3
    assert bm.slots(seq, 7, 2) == [seq.block_table[1] * 4 + 3, seq.block_table[2] * 4]
    seq.num_cached = 9
    assert not bm.can_grow(seq_of([0] * 13), 13)
    with pytest.raises(RuntimeError):
        bm.grow(seq_of([0] * 13), 13)
    bm.release(seq)
    assert bm.num_free == 5 and seq.block_table == [] and seq.num_cached == 0


def test_chain_hash_depends_on_everything_before():
    a, b = [1, 2, 3], [4, 5, 6]
    assert chain_hash(None, a) == chain_hash(None, list(a))
    assert chain_hash(None, a) != chain_hash(None, b)
    # The same block after a different prefix is different content (other positions).
    assert chain_hash(chain_hash(None, a), b) != chain_hash(chain_hash(None, b), b)
    assert chain_hash(None, [1, 2]) != chain_hash(None, [1, 2, 0])


@pytest.mark.parametrize("prompt_len", [3, 7, 8, 11])
def test_prefix_hit_reuses_full_blocks_and_leaves_one_token(prompt_len):
    bm = BlockManager(num_blocks=9, block_size=4)
    first = seq_of(range(100, 100 + prompt_len))
    compute(bm, first, prompt_len)
    again = seq_of(range(100, 100 + prompt_len))
    hits = bm.match_prefix(again)
    # Full blocks only, and never the whole prompt: its last token must run for logits.
    assert len(hits) == (prompt_len - 1) // 4
    assert hits == first.block_table[:len(hits)]
    assert bm.can_admit(again, hits, prompt_len - 4 * len(hits))
    bm.admit(again, hits, prompt_len - 4 * len(hits))
    assert again.num_cached == 4 * len(hits) and again.num_prefix_hits == 4 * len(hits)
    assert all(bm.refcount[b] == 2 for b in hits)
    check_invariants(bm, [first, again])
    bm.release(first)
    bm.release(again)
    assert bm.num_free == 9
    check_invariants(bm, [])


def test_partial_and_unfinished_blocks_are_not_cached():
    bm = BlockManager(num_blocks=6, block_size=4)
    s = seq_of(range(10))
    compute(bm, s, 6)                 # one full block, one half-computed
    assert len(bm.cache) == 1
    compute(bm, s, 4)
    assert len(bm.cache) == 2         # the third block holds 2 of 4 tokens: unnamed
    other = seq_of([*range(8), 77, 78, 79])
    assert bm.match_prefix(other) == s.block_table[:2]


def test_a_different_first_block_breaks_the_chain():
    bm = BlockManager(num_blocks=8, block_size=4)
    compute(bm, seq_of([1, 2, 3, 4, 5, 6, 7, 8, 9]), 9)
    assert bm.match_prefix(seq_of([0, 2, 3, 4, 5, 6, 7, 8, 9])) == []


def test_released_blocks_stay_reusable_until_evicted_lru():
    bm = BlockManager(num_blocks=4, block_size=2)
    a, b = seq_of([1, 2, 3]), seq_of([5, 6, 7])
    compute(bm, a, 3)
    compute(bm, b, 3)
    bm.release(a)                     # a's named block is released before b's
    bm.release(b)
    assert bm.num_free == 4 and len(bm._evictable) == 2
    a_block = bm.match_prefix(seq_of([1, 2, 3]))
    assert len(a_block) == 1
    # Plain free blocks go first; then the least recently released named block (a's).
    c = seq_of([9] * 6)
    bm.grow(c, 6)
    assert a_block[0] in c.block_table
    assert bm.match_prefix(seq_of([1, 2, 3])) == []
    assert len(bm.match_prefix(seq_of([5, 6, 7]))) == 1
    check_invariants(bm, [c])


def test_revived_blocks_count_against_free_space():
    bm = BlockManager(num_blocks=3, block_size=2)
    first = seq_of([1, 2, 3, 4, 5])
    compute(bm, first, 5)
    bm.release(first)                 # two named blocks become evictable, one plain free
    assert bm.num_free == 3
    longer = seq_of([1, 2, 3, 4, 5, 6, 7])
    hits = bm.match_prefix(longer)
    # Taking the 2 hits leaves 1 free block, but 7 tokens need 2 beyond them.
    assert len(hits) == 2 and not bm.can_admit(longer, hits, 3)
    short = seq_of([1, 2, 3, 4, 9])
    assert bm.can_admit(short, hits, 1)
    bm.admit(short, hits, 1)
    assert bm.num_free == 0
    check_invariants(bm, [short])


def test_fork_shares_full_blocks_only():
    bm = BlockManager(num_blocks=8, block_size=4)
    parent = seq_of(range(10))
    compute(bm, parent, 10)
    child = seq_of(range(10))
    bm.fork(parent, child, 10)
    assert child.block_table == parent.block_table[:2] and child.num_cached == 8
    assert bm.refcount[parent.block_table[0]] == 2 and bm.refcount[parent.block_table[2]] == 1
    compute(bm, child, 2)             # recomputes the partial block into a block of its own
    assert child.block_table[2] != parent.block_table[2]
    check_invariants(bm, [parent, child])
    bm.release(parent)
    check_invariants(bm, [child])
    bm.release(child)
    assert bm.num_free == 8


def test_disabled_prefix_caching_never_matches():
    bm = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=False)
    compute(bm, s := seq_of([1, 2, 3]), 3)
    bm.release(s)
    assert bm.match_prefix(seq_of([1, 2, 3])) == [] and bm.num_free == 4


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_random_workload_keeps_invariants_and_frees_everything(seed):
    rng = random.Random(seed)
    bm = BlockManager(num_blocks=23, block_size=3)
    prefixes = [[rng.randrange(50) for _ in range(rng.randrange(1, 10))] for _ in range(3)]
    live = []
    for _ in range(300):
        r = rng.random()
        if r < 0.4:
            s = seq_of(rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randrange(1, 6))])
            hits = bm.match_prefix(s)
            n = len(s) - 3 * len(hits)
            if bm.can_admit(s, hits, n):
                bm.admit(s, hits, n)
                s.num_cached = len(s)
                bm.commit(s, 3 * len(hits))
                live.append(s)
        elif r < 0.6 and live:
            parent = rng.choice(live)
            child = Sequence(list(parent.prompt_ids), P)
            bm.fork(parent, child, len(parent.prompt_ids))
            live.append(child)
        elif r < 0.8 and live:
            s = rng.choice(live)
            s.output_ids.append(rng.randrange(50))
            n = len(s) - s.num_cached
            if bm.can_grow(s, n):
                compute(bm, s, n)
            else:
                bm.release(s)
                live.remove(s)
        elif live:
            s = live.pop(rng.randrange(len(live)))
            bm.release(s)
        check_invariants(bm, live)
    for s in live:
        bm.release(s)
    assert bm.num_free == bm.num_blocks and all(c == 0 for c in bm.refcount)


def test_usage_counts_shared_slots_once():
    bm = BlockManager(num_blocks=8, block_size=4)
    parent = seq_of(range(10))
    compute(bm, parent, 10)
    child = seq_of(range(10))
    bm.fork(parent, child, 10)
    u = bm.usage([parent, child])
    assert (u.allocated, u.filled) == (12, 10)
    assert u.waste == pytest.approx(2 / 12)
