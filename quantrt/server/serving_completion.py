"""``POST /v1/completions``: one or several prompts (text or token ids), ``n`` choices
each; choice ``i * n + j`` is completion ``j`` of prompt ``i``, as OpenAI numbers them."""
from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from quantrt.engine.sequence import SamplingParams
from quantrt.server.errors import APIError, sse_error
from quantrt.server.generation import (
    DONE,
    Completion,
    ServerState,
    gather,
    merged,
    new_id,
    run_prompt,
    sse,
    unless_disconnected,
    usage,
)
from quantrt.server.logprobs import completion_logprobs, merge_completion_logprobs, prompt_logprobs
from quantrt.server.protocol import CompletionRequest

# OpenAI's default for the legacy completions endpoint.
DEFAULT_MAX_TOKENS = 16


def _prompts(tokenizer: Any, prompt: Any) -> list[tuple[str, list[int]]]:
    """(text, token ids) per prompt; the text of a token-id prompt is its decoding (echo)."""
    if isinstance(prompt, str) or (prompt and all(isinstance(t, int) for t in prompt)):
        items = [prompt]                      # one text, or one prompt of token ids
    else:
        items = list(prompt)
    if not items:
        raise APIError(400, "prompt must not be empty", param="prompt")
    out = []
    for item in items:
        if isinstance(item, str):
            out.append((item, tokenizer.encode(item)))
        else:
            out.append((tokenizer.decode(item, skip_special_tokens=False), list(item)))
    for _, ids in out:
        if not ids:
            raise APIError(400, "a prompt has no tokens", param="prompt")
    return out


class _Choice:
    """Streaming state of one choice: what was sent, for logprob offsets and context."""

    def __init__(self, prompt_ids: list[int], start_offset: int) -> None:
        self.context = list(prompt_ids)
        self.offset = start_offset


async def create_completion(state: ServerState, body: CompletionRequest,
                            request: Request) -> JSONResponse | StreamingResponse:
    arrival = time.perf_counter()
    body.check_supported()
    state.check_model(body.model)
    prompts = _prompts(state.tokenizer, body.prompt)
    params = None
    for _, ids in prompts:
        max_tokens = state.max_tokens(body.max_tokens, len(ids), DEFAULT_MAX_TOKENS)
        params = body.sampling_params(max_tokens, body.logprobs)
        state.check(ids, params)
    echo_lps = None
    if body.echo and body.logprobs is not None:
        echo_lps = [await unless_disconnected(request, state.engine.run_exclusive(
            lambda eng, ids=ids: prompt_logprobs(eng, ids, body.logprobs))) for _, ids in prompts]
    request_id = new_id("cmpl")
    if body.stream:
        return StreamingResponse(_stream(state, body, prompts, params, echo_lps, request_id,
                                         arrival),
                                 media_type="text/event-stream")
    results = await unless_disconnected(
        request, gather(state, [ids for _, ids in prompts], params, request_id, arrival))
    return JSONResponse(_response(state, body, prompts, results, echo_lps, request_id))


def _response(state: ServerState, body: CompletionRequest, prompts: list[tuple[str, list[int]]],
              results: list[list[Completion]], echo_lps: list | None, request_id: str
              ) -> dict[str, Any]:
    tok = state.tokenizer
    choices = []
    for i, ((text, ids), completions) in enumerate(zip(prompts, results)):
        for j, c in enumerate(completions):
            lps = None
            if body.logprobs is not None:
                start = len(text) if body.echo else 0
                lps = completion_logprobs(tok, c.logprobs, c.token_ids, ids, start, body.logprobs)
                if echo_lps is not None:
                    lps = merge_completion_logprobs(
                        completion_logprobs(tok, echo_lps[i], ids, [], 0, body.logprobs), lps)
            choices.append({"index": i * body.n + j,
                            "text": (text if body.echo else "") + c.text,
                            "logprobs": lps, "finish_reason": c.finish_reason})
    generated = sum(len(c.token_ids) for cs in results for c in cs)
    return {"id": request_id, "object": "text_completion", "created": state.created,
            "model": state.model_name, "choices": choices,
            "usage": usage(sum(len(ids) for _, ids in prompts), generated)}


async def _stream(state: ServerState, body: CompletionRequest,
                  prompts: list[tuple[str, list[int]]], params: SamplingParams,
                  echo_lps: list | None, request_id: str, arrival: float
                  ) -> AsyncIterator[str]:
    tok = state.tokenizer
    n = body.n

    def chunk(index: int, text: str, lps: dict | None, finish: str | None) -> str:
        return sse({"id": request_id, "object": "text_completion", "created": state.created,
                    "model": state.model_name,
                    "choices": [{"index": index, "text": text, "logprobs": lps,
                                 "finish_reason": finish}],
                    "usage": None})

    choices = {}
    for i, (text, ids) in enumerate(prompts):
        for j in range(n):
            choices[i * n + j] = _Choice(ids, len(text) if body.echo else 0)
    generated = 0
    try:
        if body.echo:
            for i, (text, ids) in enumerate(prompts):
                lps = (completion_logprobs(tok, echo_lps[i], ids, [], 0, body.logprobs)
                       if echo_lps is not None else None)
                for j in range(n):
                    yield chunk(i * n + j, text, lps, None)
        streams = [run_prompt(state, ids, params, f"{request_id}-{i}", arrival)
                   for i, (_, ids) in enumerate(prompts)]
        async for i, out in merged(streams):
            for c in out.outputs:
                if not c.text and not c.token_ids and c.finish_reason is None:
                    continue
                index = i * n + c.index
                generated += len(c.token_ids)
                lps = None
                if body.logprobs is not None:
                    ch = choices[index]
                    lps = completion_logprobs(tok, c.logprobs or [], c.token_ids, ch.context,
                                              ch.offset, body.logprobs)
                    ch.context += c.token_ids
                    ch.offset += sum(len(t) for t in lps["tokens"])
                yield chunk(index, c.text, lps, c.finish_reason)
        if body.include_usage:
            yield sse({"id": request_id, "object": "text_completion", "created": state.created,
                       "model": state.model_name, "choices": [],
                       "usage": usage(sum(len(ids) for _, ids in prompts), generated)})
    except Exception as exc:  # noqa: BLE001 -- the 200 is sent: report in the stream
        yield sse_error(exc)
    yield DONE
