"""What both endpoints do with the engine: check a request before any byte is sent, run
its prompts as engine requests (metrics recorded, aborted however the HTTP side ends), and
gather streamed deltas into whole completions."""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request

from quantrt.engine.async_engine import AsyncLLMEngine
from quantrt.engine.outputs import RequestOutput, TokenLogprob
from quantrt.engine.sequence import SamplingParams
from quantrt.server.errors import APIError
from quantrt.server.metrics import ServerMetrics

T = TypeVar("T")
DONE = "data: [DONE]\n\n"


@dataclass
class ServerState:
    engine: AsyncLLMEngine
    model_name: str
    metrics: ServerMetrics
    api_key: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    draining: bool = False            # SIGTERM received: no new requests

    @property
    def tokenizer(self) -> Any:
        return self.engine.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        """Tokens one sequence may hold, prompt and completion together."""
        return self.engine.engine.max_model_len

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"The model `{name}` does not exist.", param="model",
                           code="model_not_found")
        if self.draining:
            raise APIError(503, "the server is shutting down", code="shutting_down")

    def max_tokens(self, requested: int | None, prompt_len: int, default: int | None) -> int:
        """The completion budget of one prompt; 400 when it cannot fit in the context.
        ``default`` None: whatever the context leaves (chat's behaviour)."""
        limit = self.max_model_len
        if prompt_len >= limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. "
                                f"However, your prompt has {prompt_len} tokens. Please reduce "
                                "the length of the prompt.", param="messages",
                           code="context_length_exceeded")
        max_tokens = requested if requested is not None else default
        if max_tokens is None:
            return limit - prompt_len
        if max_tokens >= 1 and prompt_len + max_tokens > limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. "
                                f"However, you requested {prompt_len + max_tokens} tokens "
                                f"({prompt_len} in the prompt, {max_tokens} in the "
                                "completion). Please reduce the length of the prompt or "
                                "completion.", param="max_tokens", code="context_length_exceeded")
        return max_tokens          # below 1: SamplingParams refuses it with its own message

    def check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Everything the engine would refuse, refused now (as a 400) while a status can
        still be sent: a stream's 200 goes out before its first token."""
        self.engine.engine.check_request(prompt_ids, params)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def run_prompt(state: ServerState, prompt_ids: list[int], params: SamplingParams,
                     request_id: str, arrival: float) -> AsyncIterator[RequestOutput]:
    """One engine request as delta outputs.  Leaving early (client gone, shutdown) aborts
    it in the engine, which frees its KV blocks.  ``arrival``: perf_counter() when the HTTP
    request came, the start of its time to first token."""
    tracker = state.metrics.track(len(prompt_ids), arrival)
    stream = state.engine.generate(prompt_ids, params, request_id=request_id, delta=True)
    try:
        async for out in stream:
            tracker.on_output(out)
            yield out
    finally:
        await stream.aclose()
        tracker.finish()


_END = object()


async def merged(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Items of several streams as they come, tagged with the stream's index.  Ends when all
    have ended; the first error ends it and stops (aborts) the others."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                queue.put_nowait((i, item))
        except Exception as exc:  # noqa: BLE001 -- re-raised in the consumer
            queue.put_nowait((i, exc))
        finally:
            queue.put_nowait((i, _END))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is _END:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class Completion:
    """One choice gathered from delta outputs."""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, text: str, token_ids: list[int], logprobs: list[TokenLogprob] | None,
            finish_reason: str | None) -> None:
        self.text += text
        self.token_ids += token_ids
        self.logprobs += logprobs or []
        self.finish_reason = finish_reason or self.finish_reason


async def gather(state: ServerState, prompts: list[list[int]], params: SamplingParams,
                 request_id: str, arrival: float) -> list[list[Completion]]:
    """Run every prompt to the end; per prompt, its ``n`` completions."""
    results = [[Completion() for _ in range(params.n)] for _ in prompts]
    streams = [run_prompt(state, ids, params, f"{request_id}-{i}", arrival)
               for i, ids in enumerate(prompts)]
    async for i, out in merged(streams):
        for c in out.outputs:
            results[i][c.index].add(c.text, c.token_ids, c.logprobs, c.finish_reason)
    return results


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, cancelling it (which aborts its engine requests) if the client hangs
    up first.  A non-streaming response is otherwise computed to the end for nobody."""
    task = asyncio.ensure_future(work)

    async def hung_up() -> None:
        # The body is read; the next ASGI message is the disconnect, if one comes.
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(hung_up())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task not in done:
        raise APIError(499, "the client closed the request")    # nobody reads this answer
    return task.result()


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
