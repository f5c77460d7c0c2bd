"""Scheduling without a model: a fake step computes what was scheduled and appends a token."""
import random

import pytest

from quantrt.engine.block_manager import BlockManager
from quantrt.engine.scheduler import Scheduler
from quantrt.engine.sequence import SamplingParams, SeqStatus, Sequence, make_group

P = SamplingParams(max_tokens=5)


def fake_step(sched, max_tokens=5):
    """Schedule, 'compute', commit, fork, sample token 1, finish at max_tokens (the engine's
    order of events); returns the batch."""
    batch = sched.schedule()
    for seq, n in batch:
        seq.num_cached += n
        sched.blocks.commit(seq, seq.num_cached - n)
    sampled = [s for seq, _ in batch if seq.num_cached == len(seq)
               for s in [seq, *seq.fork_targets()]]
    for s in sampled:
        if s.awaiting_fork:
            sched.blocks.fork(s.group[0], s, len(s.prompt_ids))
            s.awaiting_fork = False
            sched.add_forked(s)
    for s in sampled:
        s.output_ids.append(1)
        if len(s.output_ids) >= max_tokens:
            sched.finish(s)
    return batch


def make(sched, n_tokens, arrival, n=1):
    group = make_group(list(range(arrival * 100, arrival * 100 + n_tokens)),
                       SamplingParams(max_tokens=5, n=n), str(arrival), arrival)
    sched.add(group[0])
    return group


def test_budget_and_seat_caps_hold():
    sched = Scheduler(BlockManager(200, 4), max_num_seqs=3, max_num_batched_tokens=10)
    seqs = [make(sched, n, i)[0] for i, n in enumerate([7, 3, 12, 5, 9])]
    while sched.has_work():
        batch = fake_step(sched)
        assert sum(n for _, n in batch) <= 10
        assert len(sched.running) <= 3
    assert all(s.finished for s in seqs) and sched.blocks.num_free == 200


def test_admission_is_first_come_first_served():
    sched = Scheduler(BlockManager(200, 4), max_num_seqs=2, max_num_batched_tokens=64)
    a, b, c = (make(sched, 5, i)[0] for i in range(3))
    fake_step(sched)
    assert sched.running == [a, b] and sched.waiting == [c]


def test_preempts_the_latest_arrival_and_readmits_it_first():
    # 6 blocks of 2 tokens: three 4-token prompts fit, but not their growth.
    sched = Scheduler(BlockManager(6, 2), max_num_seqs=8, max_num_batched_tokens=64)
    a, b, c = (make(sched, 4, i)[0] for i in range(3))
    d = make(sched, 4, 5)[0]
    fake_step(sched)
    assert sched.running == [a, b, c] and sched.waiting == [d]
    fake_step(sched)                  # a and b grow into new blocks: c must go
    assert sched.num_preemptions >= 1 and c.status is SeqStatus.WAITING
    assert sched.waiting[0] is c and c.block_table == [] and c.num_cached == 0
    while sched.has_work():
        fake_step(sched)
    assert sched.blocks.num_free == 6


def test_prefill_skips_cached_prefix():
    sched = Scheduler(BlockManager(50, 4), max_num_seqs=8, max_num_batched_tokens=64)
    prompt = list(range(11))
    first = Sequence(list(prompt), P, "a", arrival=0)
    sched.add(first)
    fake_step(sched)
    second = Sequence(list(prompt), P, "b", arrival=1)
    sched.add(second)
    batch = {s.seq_id: n for s, n in fake_step(sched)}
    # 11 tokens: two full blocks (8 tokens) come from the cache, 3 are computed.
    assert batch[second.seq_id] == 3 and second.num_prefix_hits == 8
    assert second.block_table[:2] == first.block_table[:2]


def test_a_group_reserves_its_seats_and_forks_after_prefill():
    sched = Scheduler(BlockManager(50, 4), max_num_seqs=4, max_num_batched_tokens=6)
    group = make(sched, 9, 0, n=3)
    other = make(sched, 2, 1, n=2)[0]
    fake_step(sched)                  # 6 of 9 prompt tokens: no fork yet, 3 seats held
    assert sched.running == [group[0]] and all(s.awaiting_fork for s in group[1:])
    assert sched.seats_taken() == 3 and sched.waiting == [other]   # needs 2 seats, 1 left
    fake_step(sched)                  # prompt done: the two others fork
    assert not any(s.awaiting_fork for s in group)
    assert [s.block_table[:2] for s in group[1:]] == [group[0].block_table[:2]] * 2
    assert sched.blocks.refcount[group[0].block_table[0]] == 3
    while sched.has_work():
        fake_step(sched)
    assert sched.blocks.num_free == 50


def test_remove_frees_blocks_from_either_queue():
    sched = Scheduler(BlockManager(10, 4), max_num_seqs=1, max_num_batched_tokens=64)
    a, b = make(sched, 6, 0)[0], make(sched, 6, 1)[0]
    fake_step(sched)
    sched.finish(b)                   # waiting
    sched.finish(a)                   # running
    assert not sched.has_work() and sched.blocks.num_free == 10


@pytest.mark.parametrize("seed", [3, 11])
def test_random_load_finishes_everything_without_leaks(seed):
    rng = random.Random(seed)
    sched = Scheduler(BlockManager(17, 3), max_num_seqs=5, max_num_batched_tokens=13)
    groups = [make(sched, rng.randrange(1, 20), i, n=rng.choice([1, 1, 2, 3])) for i in range(25)]
    for _ in range(2000):
        if not sched.has_work():
            break
        fake_step(sched)
    assert all(s.finished for g in groups for s in g)
    assert sched.blocks.num_free == 17 and not any(sched.blocks.refcount)
