"""Turn last-position logits into next tokens for a batch of sequences with their own
sampling parameters."""
from __future__ import annotations

import torch

from quantrt.engine.sequence import Sequence


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    for row, seq in enumerate(seqs):
        p = seq.params
        if not p.needs_penalties or not seq.output_ids and p.repetition_penalty == 1.0:
            continue
        if p.repetition_penalty != 1.0:
            # HF/CTRL convention over prompt and output tokens: shrink positive logits,
            # grow negative ones.
            seen = torch.tensor(sorted(set(seq.all_ids)), device=logits.device)
            vals = logits[row, seen]
            logits[row, seen] = torch.where(vals > 0, vals / p.repetition_penalty,
                                            vals * p.repetition_penalty)
        if seq.output_ids and (p.presence_penalty or p.frequency_penalty):
            # OpenAI convention: output tokens only.
            ids, counts = torch.tensor(seq.output_ids, device=logits.device).unique(return_counts=True)
            logits[row, ids] -= p.presence_penalty + p.frequency_penalty * counts.to(logits.dtype)
    return logits


def _filter(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.max(), float("-inf"))
    if top_p < 1:
        sorted_logits, order = logits.sort(descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        drop = cum - sorted_logits.softmax(-1) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


class Sampler:
    def __init__(self) -> None:
        self.generators: dict[int, torch.Generator] = {}

    def forget(self, seq: Sequence) -> None:
        self.generators.pop(seq.seq_id, None)

    def _generator(self, seq: Sequence, device: torch.device) -> torch.Generator | None:
        if seq.params.seed is None:
            return None
        gen = self.generators.get(seq.seq_id)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(seq.params.seed)
            self.generators[seq.seq_id] = gen
        return gen

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        logits = apply_penalties(logits.float(), seqs)
        out: list[int] = []
        greedy = logits.argmax(-1).tolist()
        for row, seq in enumerate(seqs):
            p = seq.params
            if p.greedy:
                out.append(greedy[row])
                continue
            row_logits = _filter(logits[row:row + 1] / p.temperature, p.top_k, p.top_p, p.min_p)
            probs = row_logits.softmax(-1)
            gen = self._generator(seq, logits.device)
            out.append(int(torch.multinomial(probs, 1, generator=gen).item()))
        return out
