"""Which sequences run in the next step, and how many of their tokens.

Every step mixes decodes (one token each) with prefill chunks of newly admitted prompts,
under a token budget (``max_num_batched_tokens``) and a sequence cap (``max_num_seqs``).
When KV blocks run out, the most recently admitted sequence is preempted: its blocks are
freed and it is recomputed from its tokens later, which changes no output.
"""
from __future__ import annotations

from collections import deque

from quantrt.engine.block_manager import BlockManager
from quantrt.engine.sequence import Sequence, SeqStatus


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

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
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)

    def schedule(self) -> list[tuple[Sequence, int]]:
        budget = self.max_num_batched_tokens
        batch: list[tuple[Sequence, int]] = []
        # Running sequences first, oldest first; preempt from the back when blocks run out.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
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
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            n = min(len(seq) - seq.num_cached, budget)
            if not self.blocks.can_grow(seq, n):
                break
            self.waiting.popleft()
            self.blocks.grow(seq, n)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            batch.append((seq, n))
            budget -= n
        return batch

    def finish(self, seq: Sequence) -> None:
        self.remove(seq)
        seq.status = SeqStatus.FINISHED
