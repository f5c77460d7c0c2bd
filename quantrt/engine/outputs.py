"""What callers get back: per request, its prompt and its ``n`` completions (text, token
ids, log-probabilities, why each stopped).  Built from the engine's sequences, either as
the whole result so far or as the part not yet delivered (for streaming)."""
from __future__ import annotations

from dataclasses import dataclass, field

from quantrt.engine.sequence import Sequence


@dataclass(frozen=True)
class TokenLogprob:
    """Log-probabilities at one generated position, from the raw model distribution
    (log_softmax of the logits, before penalties, temperature and filtering)."""
    token_id: int                      # the token that was sampled
    logprob: float
    rank: int                          # 1 + how many tokens the model found likelier
    top: tuple[tuple[int, float], ...] = ()   # the k likeliest (token id, logprob), best first

    def as_dict(self) -> dict[int, float]:
        """{token id: logprob} for the sampled token and the top alternatives."""
        return {**dict(self.top), self.token_id: self.logprob}


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None          # "stop", "length", "abort"; None while running
    logprobs: list[TokenLogprob] | None = None
    cumulative_logprob: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0         # prompt tokens served from the prefix cache


@dataclass
class DeliveryState:
    """How much of each completion of a request was already delivered (streaming)."""
    tokens: list[int] = field(default_factory=list)
    chars: list[int] = field(default_factory=list)


def request_output(seqs: list[Sequence], prompt: str | None,
                   delivered: DeliveryState | None = None) -> RequestOutput:
    """The state of one request.  With ``delivered``, only what is new since the previous
    call with the same state (which is then advanced); without, everything so far."""
    if delivered is not None and not delivered.tokens:
        delivered.tokens, delivered.chars = [0] * len(seqs), [0] * len(seqs)
    outs = []
    for seq in seqs:
        text, ids, lps = seq.visible_text, seq.output_ids, seq.logprobs
        if delivered is not None:
            t0, c0 = delivered.tokens[seq.index], delivered.chars[seq.index]
            delivered.tokens[seq.index], delivered.chars[seq.index] = len(ids), len(text)
            text, ids, lps = text[c0:], ids[t0:], (lps[t0:] if lps is not None else None)
        outs.append(CompletionOutput(
            index=seq.index, text=text, token_ids=list(ids),
            finish_reason=seq.finish_reason.value if seq.finish_reason else None,
            logprobs=list(lps) if lps is not None else None,
            cumulative_logprob=seq.cumulative_logprob if seq.logprobs is not None else None))
    first = seqs[0]
    return RequestOutput(request_id=first.request_id, prompt=prompt,
                         prompt_token_ids=list(first.prompt_ids), outputs=outs,
                         finished=all(s.finished for s in seqs),
                         num_cached_tokens=first.num_prefix_hits)
