"""Turn last-position logits into next tokens for a batch of sequences, each with its own
sampling parameters, in a handful of batched tensor ops.

Order of processing: penalties, then temperature, top-k, min-p, top-p, then one draw.
Log-probabilities are taken from the raw logits (vLLM's default and what "how likely did
the model find this token" means); sampling settings do not change them.
"""
from __future__ import annotations

import torch

from quantrt.engine.outputs import TokenLogprob
from quantrt.engine.sequence import Sequence


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """In place.  Per row: only the (rare) rows that ask for penalties cost anything."""
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


def filter_logits(logits: torch.Tensor, top_k: list[int], top_p: list[float],
                  min_p: list[float]) -> torch.Tensor:
    """Mask (to -inf) what top-k, min-p and top-p exclude, each row with its own settings.
    A disabled setting leaves its row exactly unchanged."""
    vocab = logits.shape[-1]
    dev = logits.device
    if any(0 < k < vocab for k in top_k):
        k = torch.tensor([k if 0 < k < vocab else vocab for k in top_k], device=dev)
        ordered = logits.sort(-1, descending=True).values
        kth = ordered.gather(1, (k - 1).unsqueeze(1))
        logits = logits.masked_fill(logits < kth, float("-inf"))   # ties with the k-th stay
    if any(m > 0 for m in min_p):
        probs = logits.softmax(-1)
        floor = torch.tensor(min_p, device=dev).unsqueeze(1) * probs.max(-1, keepdim=True).values
        logits = logits.masked_fill(probs < floor, float("-inf"))
    if any(p < 1 for p in top_p):
        ordered, order = logits.sort(-1, descending=True)
        probs = ordered.softmax(-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        # Disabled rows get a threshold of 2, which rounding in cumsum can never reach.
        limit = torch.tensor([p if p < 1 else 2.0 for p in top_p], device=dev).unsqueeze(1)
        ordered = ordered.masked_fill(probs.cumsum(-1) - probs >= limit, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, ordered)
    return logits


class Sampler:
    def __init__(self) -> None:
        self.generators: dict[int, torch.Generator] = {}

    def forget(self, seq: Sequence) -> None:
        self.generators.pop(seq.seq_id, None)

    def _generator(self, seq: Sequence, device: torch.device) -> torch.Generator:
        gen = self.generators.get(seq.seq_id)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(seq.seed)
            self.generators[seq.seq_id] = gen
        return gen

    def _draw(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        temps = torch.tensor([s.params.temperature for s in seqs], device=logits.device)
        logits = filter_logits(logits / temps.unsqueeze(1), [s.params.top_k for s in seqs],
                               [s.params.top_p for s in seqs], [s.params.min_p for s in seqs])
        probs = logits.softmax(-1)
        # argmax(p / E) with E ~ Exp(1) is a draw from p (the exponential race).  A seeded
        # row draws its noise from its own generator, so its tokens do not depend on which
        # other sequences share the batch; the rest share one draw from the global one.
        noise = torch.empty_like(probs)
        unseeded = [i for i, s in enumerate(seqs) if s.seed is None]
        if unseeded:
            noise[unseeded] = torch.empty(len(unseeded), probs.shape[1],
                                          device=probs.device).exponential_()
        for i, s in enumerate(seqs):
            if s.seed is not None:
                noise[i].exponential_(generator=self._generator(s, probs.device))
        return (probs / noise.clamp_min(1e-30)).argmax(-1)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]
                 ) -> tuple[list[int], list[TokenLogprob | None]]:
        """Row i of ``logits`` belongs to ``seqs[i]`` -> (tokens, logprobs per row)."""
        raw = logits.float()
        tokens = self.sample(raw, seqs)
        return tokens.tolist(), self.logprobs(raw, tokens, seqs)

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Next tokens as an int64 tensor on the logits' device; nothing waits for the
        device, so an engine can read them a step later (see ``deferrable``)."""
        raw = logits.float()
        penalized = [s.params.needs_penalties for s in seqs]
        logits = apply_penalties(raw.clone(), seqs) if any(penalized) else raw
        tokens = logits.argmax(-1)
        rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if rows:
            tokens[rows] = self._draw(logits[rows], [seqs[i] for i in rows])
        return tokens

    @staticmethod
    def deferrable(seq: Sequence) -> bool:
        """Whether this sequence's token can be read from the device one step late: its
        penalties would need the token on the host now, and logprobs are read with it."""
        return not seq.params.needs_penalties and seq.params.logprobs is None

    @staticmethod
    def logprobs(raw: torch.Tensor, tokens: torch.Tensor, seqs: list[Sequence]
                  ) -> list[TokenLogprob | None]:
        out: list[TokenLogprob | None] = [None] * len(seqs)
        rows = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        if not rows:
            return out
        lp = raw[rows].log_softmax(-1)
        chosen = tokens[rows].unsqueeze(1)
        chosen_lp = lp.gather(1, chosen)
        ranks = ((lp > chosen_lp).sum(-1) + 1).tolist()
        k = max(seqs[i].params.logprobs for i in rows)
        top_v, top_i = lp.topk(k, -1) if k else (lp[:, :0], lp[:, :0].long())
        top_v, top_i = top_v.tolist(), top_i.tolist()
        chosen_lp, chosen = chosen_lp.squeeze(1).tolist(), chosen.squeeze(1).tolist()
        for j, i in enumerate(rows):
            kk = seqs[i].params.logprobs
            out[i] = TokenLogprob(chosen[j], chosen_lp[j], ranks[j],
                                  tuple(zip(top_i[j][:kk], top_v[j][:kk])))
        return out
