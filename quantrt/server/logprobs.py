"""Log-probabilities in the two shapes OpenAI uses: chat's ``{"content": [{"token",
"logprob", "bytes", "top_logprobs"}]}`` and the legacy completions' parallel lists
(``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``); plus the prompt's own
log-probabilities for ``echo`` with ``logprobs``, which the engine does not produce."""
from __future__ import annotations

from typing import Any

from quantrt.engine.llm_engine import LLMEngine
from quantrt.engine.outputs import TokenLogprob
from quantrt.server.errors import APIError

# Tokens of context decoded before each token: enough for a character split over several
# byte-level tokens (up to 4 bytes) and for SentencePiece's context-dependent leading space.
_CONTEXT = 6
_PENDING = "\ufffd"         # what decoding shows for the bytes of an unfinished character


def token_pieces(tokenizer: Any, ids: list[int], context: list[int] = ()) -> list[str]:
    """The text each token adds after what precedes it (``context``, then the earlier ids).

    Decoding a token alone drops SentencePiece's leading space and splits multi-byte
    characters, so each piece is the difference of two decodes of a short window.  A token
    that ends inside a character adds "" and the token completing it carries the whole
    character, so the pieces always join to the text (and offsets into it stay right).
    Special tokens are shown (``<|im_end|>``): they are what the log-probability is about."""
    full = list(context[-_CONTEXT:]) + list(ids)
    pieces = []
    for i in range(len(full) - len(ids), len(full)):
        window = full[max(0, i - _CONTEXT):i]
        before = tokenizer.decode(window, skip_special_tokens=False).rstrip(_PENDING)
        after = tokenizer.decode(window + [full[i]], skip_special_tokens=False)
        if after.endswith(_PENDING):
            pieces.append("")
        elif after.startswith(before):
            pieces.append(after[len(before):])
        else:                # the window's decoding shifted (rare): the token on its own
            pieces.append(tokenizer.decode([full[i]], skip_special_tokens=False))
    return pieces


def _alt_text(tokenizer: Any, token_id: int, cache: dict[int, str]) -> str:
    if token_id not in cache:
        cache[token_id] = tokenizer.decode([token_id], skip_special_tokens=False)
    return cache[token_id]


def chat_logprobs(tokenizer: Any, logprobs: list[TokenLogprob], context: list[int],
                  num_top: int) -> list[dict[str, Any]]:
    """Entries of a chat choice's ``logprobs.content``; ``context``: the ids before them."""
    pieces = token_pieces(tokenizer, [lp.token_id for lp in logprobs], context)
    cache: dict[int, str] = {}
    out = []
    for lp, piece in zip(logprobs, pieces):
        top = [{"token": (t := _alt_text(tokenizer, tid, cache)), "logprob": v,
                "bytes": list(t.encode("utf-8"))} for tid, v in lp.top[:num_top]]
        out.append({"token": piece, "logprob": lp.logprob, "bytes": list(piece.encode("utf-8")),
                    "top_logprobs": top})
    return out


def completion_logprobs(tokenizer: Any, logprobs: list[TokenLogprob | None],
                        token_ids: list[int], context: list[int], start_offset: int,
                        num_top: int) -> dict[str, list]:
    """The legacy ``logprobs`` object for ``token_ids``; entry i may be None (the first
    prompt token has no log-probability).  ``text_offset`` counts from ``start_offset``."""
    pieces = token_pieces(tokenizer, token_ids, context)
    cache: dict[int, str] = {}
    tokens, values, tops, offsets = [], [], [], []
    offset = start_offset
    for lp, piece in zip(logprobs, pieces):
        tokens.append(piece)
        offsets.append(offset)
        offset += len(piece)
        if lp is None:
            values.append(None)
            tops.append(None)
            continue
        values.append(lp.logprob)
        top = {_alt_text(tokenizer, tid, cache): v for tid, v in lp.top[:num_top]}
        # The legacy format lists the sampled token among the alternatives too.
        top.setdefault(piece, lp.logprob)
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops,
            "text_offset": offsets}


def merge_completion_logprobs(a: dict[str, list] | None, b: dict[str, list]) -> dict[str, list]:
    if a is None:
        return b
    return {key: a[key] + b[key] for key in a}


def prompt_logprobs(engine: LLMEngine, prompt_ids: list[int], num_top: int
                    ) -> list[TokenLogprob | None]:
    """Log-probability of each prompt token given the ones before it (None for the first),
    from the raw model distribution like the engine's.  Runs one prefill of the prompt in
    scratch blocks: call it through ``AsyncLLMEngine.run_exclusive``."""
    import torch

    if -(-len(prompt_ids) // engine.blocks.block_size) > engine.blocks.num_free:
        raise APIError(503, "the KV cache is full; retry the echo with logprobs later",
                       code="kv_cache_full")
    logits = engine.runner.logits_for(prompt_ids, engine.blocks)
    logp = torch.log_softmax(logits[:-1].float(), dim=-1)
    targets = torch.tensor(prompt_ids[1:], device=logp.device)
    chosen = logp.gather(1, targets[:, None])[:, 0]
    # rank = 1 + how many tokens the model found likelier, as the engine reports it
    ranks = (logp > chosen[:, None]).sum(dim=1) + 1
    top_v, top_i = (logp.topk(num_top, dim=-1) if num_top else (None, None))
    out: list[TokenLogprob | None] = [None]
    for j, tok in enumerate(prompt_ids[1:]):
        top = (tuple(zip(top_i[j].tolist(), top_v[j].tolist())) if num_top else ())
        out.append(TokenLogprob(tok, float(chosen[j]), int(ranks[j]), top))
    return out
