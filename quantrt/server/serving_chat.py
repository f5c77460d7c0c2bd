"""``POST /v1/chat/completions``: the conversation goes through the model's chat template
(from the tokenizer files or the GGUF), ``n`` replies come back as choices."""
from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from quantrt.engine.sequence import SamplingParams
from quantrt.server.errors import sse_error
from quantrt.server.generation import (
    DONE,
    ServerState,
    gather,
    new_id,
    run_prompt,
    sse,
    unless_disconnected,
    usage,
)
from quantrt.server.logprobs import chat_logprobs
from quantrt.server.protocol import ChatCompletionRequest


async def create_chat_completion(state: ServerState, body: ChatCompletionRequest,
                                 request: Request) -> JSONResponse | StreamingResponse:
    arrival = time.perf_counter()
    body.check_supported()
    state.check_model(body.model)
    messages = [m.as_template_message() for m in body.messages]
    prompt_ids = state.tokenizer.apply_chat_template(
        messages, add_generation_prompt=body.add_generation_prompt, tokenize=True)
    # OpenAI sets no default cap on a reply: whatever the context leaves.
    max_tokens = state.max_tokens(body.requested_max_tokens, len(prompt_ids), None)
    params = body.sampling_params(max_tokens, body.num_logprobs)
    state.check(prompt_ids, params)
    request_id = new_id("chatcmpl")
    if body.stream:
        return StreamingResponse(_stream(state, body, prompt_ids, params, request_id, arrival),
                                 media_type="text/event-stream")
    [results] = await unless_disconnected(
        request, gather(state, [prompt_ids], params, request_id, arrival))
    choices = []
    for c in results:
        lps = None
        if body.logprobs:
            lps = {"content": chat_logprobs(state.tokenizer, c.logprobs, prompt_ids,
                                            params.logprobs), "refusal": None}
        choices.append({"index": len(choices),
                        "message": {"role": "assistant", "content": c.text, "refusal": None},
                        "logprobs": lps, "finish_reason": c.finish_reason})
    return JSONResponse({
        "id": request_id, "object": "chat.completion", "created": state.created,
        "model": state.model_name, "choices": choices,
        "usage": usage(len(prompt_ids), sum(len(c.token_ids) for c in results))})


async def _stream(state: ServerState, body: ChatCompletionRequest, prompt_ids: list[int],
                  params: SamplingParams, request_id: str, arrival: float
                  ) -> AsyncIterator[str]:
    def chunk(index: int, delta: dict[str, Any], lps: dict | None, finish: str | None) -> str:
        return sse({"id": request_id, "object": "chat.completion.chunk",
                    "created": state.created, "model": state.model_name,
                    "choices": [{"index": index, "delta": delta, "logprobs": lps,
                                 "finish_reason": finish}],
                    "usage": None})

    contexts = [list(prompt_ids) for _ in range(params.n)]   # ids before each new token
    generated = 0
    try:
        # OpenAI's first chunk of each choice names the role and carries no text.
        for index in range(params.n):
            yield chunk(index, {"role": "assistant", "content": ""}, None, None)
        async for out in run_prompt(state, prompt_ids, params, request_id, arrival):
            for c in out.outputs:
                if not c.text and not c.token_ids and c.finish_reason is None:
                    continue
                generated += len(c.token_ids)
                lps = None
                if body.logprobs:
                    lps = {"content": chat_logprobs(state.tokenizer, c.logprobs or [],
                                                    contexts[c.index], params.logprobs),
                           "refusal": None}
                    contexts[c.index] += c.token_ids
                delta = {"content": c.text} if c.text or c.finish_reason is None else {}
                yield chunk(c.index, delta, lps, c.finish_reason)
        if body.include_usage:
            yield sse({"id": request_id, "object": "chat.completion.chunk",
                       "created": state.created, "model": state.model_name, "choices": [],
                       "usage": usage(len(prompt_ids), generated)})
    except Exception as exc:  # noqa: BLE001 -- the 200 is sent: report in the stream
        yield sse_error(exc)
    yield DONE
