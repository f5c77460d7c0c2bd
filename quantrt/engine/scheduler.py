"""Which sequences run in the next step, and how many of their tokens.

Every step mixes decodes (one token each) with prefill chunks of newly admitted prompts,
under a token budget (``max_num_batched_tokens``) and a seat cap (``max_num_seqs``).
Service is first come, first served by request arrival: running sequences are served
oldest first, waiting ones are admitted oldest first and none jumps the queue.  When KV
blocks run out, the latest-arrived running sequence is preempted: its blocks are released
and it is recomputed from its tokens later (from the prefix cache where its blocks
survived), which changes no output.  An admitted prompt skips the full blocks the prefix
cache already holds.
"""
from __future__ import annotations

import bisect

from quantrt.engine.block_manager import BlockManager
from quantrt.engine.sequence import SeqStatus, Sequence


def _order(seq: Sequence) -> tuple[int, int]:
    return (seq.arrival, seq.index)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: list[Sequence] = []   # sorted by arrival
        self.running: list[Sequence] = []   # sorted by arrival
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        bisect.insort(self.waiting, seq, key=_order)

    def add_forked(self, seq: Sequence) -> None:
        """A completion forked from a running one: it takes the seat reserved for it."""
        seq.status = SeqStatus.RUNNING
        bisect.insort(self.running, seq, key=_order)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def seats_taken(self) -> int:
        return sum(seq.seats for seq in self.running)

    def remove(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.num_preemptions += 1
        self.running.remove(seq)
        self.blocks.release(seq)
        self.add(seq)

    def schedule(self) -> list[tuple[Sequence, int]]:
        budget = self.max_num_batched_tokens
        batch: list[tuple[Sequence, int]] = []
        # Running sequences first, oldest first; preempt the newest when blocks run out.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.draining:   # its last token is still on the device; it ends when read
                i += 1
                continue
            n = min(len(seq) - seq.num_cached, budget)
            while not self.blocks.can_grow(seq, n):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is not SeqStatus.RUNNING:
                break
            self.blocks.grow(seq, n)
            batch.append((seq, n))
            budget -= n
            i += 1
        # Then admit waiting sequences in arrival order while budget, seats and blocks allow.
        seats = self.seats_taken()
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            if seats + seq.seats > self.max_num_seqs:
                break
            hits = self.blocks.match_prefix(seq)
            cached = seq.num_cached + len(hits) * self.blocks.block_size
            n = min(len(seq) - cached, budget)
            if not self.blocks.can_admit(seq, hits, n):
                break
            self.waiting.pop(0)
            self.blocks.admit(seq, hits, n)
            seq.status = SeqStatus.RUNNING
            bisect.insort(self.running, seq, key=_order)
            batch.append((seq, n))
            budget -= n
            seats += seq.seats
        return batch

    def finish(self, seq: Sequence) -> None:
        self.remove(seq)
        seq.status = SeqStatus.FINISHED
