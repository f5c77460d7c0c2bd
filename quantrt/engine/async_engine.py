"""The engine for asyncio servers: a background task steps the engine while requests come
and go, and each request streams its outputs as an async iterator.

    engine = AsyncLLMEngine(LLMEngine(quantrt.load("demo")))
    async for out in engine.generate("Hello", SamplingParams(max_tokens=16)):
        print(out.outputs[0].text)
    await engine.shutdown()

The engine is not thread-safe, so it is touched only by the background task: requests and
aborts are queued and applied between steps, and each step runs in one worker thread so
the event loop keeps serving while the model computes.
"""
from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Self, TypeVar

from quantrt.engine.inputs import one_prompt
from quantrt.engine.llm_engine import EngineConfig, LLMEngine, StepOutput
from quantrt.engine.outputs import (
    CompletionOutput,
    DeliveryState,
    RequestOutput,
    request_output,
)
from quantrt.engine.sequence import FinishReason, SamplingParams, Sequence
from quantrt.errors import ConfigError, QuantrtError

T = TypeVar("T")


class EngineDeadError(RuntimeError):
    """A step of the engine raised; the engine's state is unknown, so it takes no more work."""


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    queue: asyncio.Queue
    delivered: DeliveryState | None         # None: cumulative outputs
    group: list[Sequence] = field(default_factory=list)


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._requests: dict[str, _Request] = {}
        self._ops: list[tuple[str, str]] = []            # ("add" | "abort", request id)
        self._jobs: list[tuple[Callable[[LLMEngine], Any], asyncio.Future]] = []
        self._ids = itertools.count()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="quantrt-engine")
        self._task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._closing = False
        self._error: BaseException | None = None

    @classmethod
    def from_source(cls, source: Any, quantization: str | None = None, *, device: Any = None,
                    dtype: Any = None, kernels: str = "auto", **engine_options: Any
                    ) -> AsyncLLMEngine:
        from quantrt.loader import load

        config = EngineConfig.from_options(**engine_options)
        lm = load(source, quantization, device=device, dtype=dtype, kernels=kernels,
                  progress=False)
        return cls(LLMEngine(lm, config))

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    # -- the public API -------------------------------------------------------------------
    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                       request_id: str | None = None, delta: bool = False
                       ) -> AsyncIterator[RequestOutput]:
        """Stream one request: a RequestOutput after every step that advanced it, the last
        one with ``finished``.  ``delta=True`` puts only the new text, tokens and logprobs
        in each; otherwise each holds everything so far.  Leaving the loop early (break,
        cancellation) aborts the request."""
        self._check_alive()
        params = SamplingParams() if params is None else params
        text, ids = one_prompt(self.engine.tokenizer, prompt)
        if request_id is not None and request_id in self._requests:
            raise ConfigError(f"request id {request_id!r} is already running")
        self.engine.check_request(ids, params, request_id)
        while request_id is None or request_id in self._requests or request_id in self.engine.requests:
            request_id = f"async-{next(self._ids)}"
        req = _Request(request_id, text, ids, params, asyncio.Queue(),
                       DeliveryState() if delta else None)
        self._requests[request_id] = req
        self._submit("add", request_id)
        finished = False
        try:
            while not finished:
                item = await req.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished and request_id in self._requests:
                self._submit("abort", request_id)

    async def abort(self, request_id: str) -> None:
        """Stop a request and free its blocks; its stream ends with finish_reason "abort"."""
        if request_id in self._requests:
            self._submit("abort", request_id)

    async def run_exclusive(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run ``fn(engine)`` on the engine's worker thread between two steps, so that it
        may use the model and the KV cache (e.g. log-probabilities of an echoed prompt)
        without racing a step.  Its exception, if any, is raised here; the engine goes on."""
        self._check_alive()
        future = asyncio.get_running_loop().create_future()
        self._jobs.append((fn, future))
        self._kick()
        return await future

    async def shutdown(self) -> None:
        """Abort what is running, stop the background task and the worker thread."""
        self._closing = True
        task = self._task
        if task is not None and not task.done():
            self._wake.set()
            await task
        else:
            self._abort_all()
        self._executor.shutdown(wait=True)

    @property
    def num_unfinished(self) -> int:
        return len(self._requests)

    @property
    def alive(self) -> bool:
        """False after a failed step or a shutdown: generate() would raise EngineDeadError."""
        return self._error is None and not self._closing

    # -- the background task ----------------------------------------------------------------
    def _check_alive(self) -> None:
        if self._error is not None:
            raise EngineDeadError(f"the engine stopped after an error: {self._error!r}")
        if self._closing:
            raise EngineDeadError("the engine is shut down")

    def _submit(self, op: str, request_id: str) -> None:
        self._ops.append((op, request_id))
        self._kick()

    def _kick(self) -> None:
        if self._error is not None or self._closing:
            return                        # nothing steps any more; shutdown answers the rest
        if self._task is None or self._task.done():
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:          # a stream finalised after its event loop ended
                return
            # (Re)started on the running loop: an earlier loop may have ended (asyncio.run).
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._loop())
        self._wake.set()

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closing:
            self._apply_ops()
            await self._run_jobs(loop)
            if not self.engine.has_unfinished():
                self._wake.clear()
                if not self._ops and not self._jobs and not self._closing:
                    await self._wake.wait()
                continue
            try:
                outputs = await loop.run_in_executor(self._executor, self.engine.step)
            except Exception as exc:  # noqa: BLE001 -- handed to every waiting stream
                self._error = exc
                for req in self._requests.values():
                    req.queue.put_nowait(EngineDeadError(f"engine step failed: {exc!r}"))
                self._requests.clear()
                self._fail_jobs()
                return
            self._publish(outputs)
        self._abort_all()

    async def _run_jobs(self, loop: asyncio.AbstractEventLoop) -> None:
        jobs, self._jobs = self._jobs, []
        for fn, future in jobs:
            if future.done():                 # its caller went away
                continue
            try:
                result = await loop.run_in_executor(self._executor, fn, self.engine)
            except Exception as exc:  # noqa: BLE001 -- the caller's error, not the engine's
                if not future.done():
                    future.set_exception(exc)
            else:
                if not future.done():
                    future.set_result(result)

    def _fail_jobs(self) -> None:
        jobs, self._jobs = self._jobs, []
        for _, future in jobs:
            if not future.done():
                future.set_exception(EngineDeadError("the engine stopped before running this job"))

    def _apply_ops(self) -> None:
        ops, self._ops = self._ops, []
        for op, rid in ops:
            req = self._requests.get(rid)
            if req is None:
                continue
            if op == "add":
                try:
                    req.group = self.engine.add_request(req.prompt_ids, req.params, rid).group
                except QuantrtError as exc:   # checked in generate(); the engine may differ now
                    del self._requests[rid]
                    req.queue.put_nowait(exc)
            else:
                self._abort(req)

    def _publish(self, outputs: list[StepOutput]) -> None:
        touched = dict.fromkeys(out.seq.request_id for out in outputs)
        for rid in touched:
            req = self._requests.get(rid)
            if req is not None:
                self._deliver(req)

    def _deliver(self, req: _Request) -> None:
        out = request_output(req.group, req.prompt, req.delivered)
        if out.finished:
            del self._requests[req.request_id]
        req.queue.put_nowait(out)

    def _abort(self, req: _Request) -> None:
        if req.group:
            self.engine.abort(req.request_id)
            self._deliver(req)
            return
        # Never reached the engine: answer with n empty aborted completions.
        del self._requests[req.request_id]
        outs = [CompletionOutput(i, "", [], FinishReason.ABORT.value,
                                 [] if req.params.logprobs is not None else None)
                for i in range(req.params.n)]
        req.queue.put_nowait(RequestOutput(req.request_id, req.prompt, req.prompt_ids, outs, True))

    def _abort_all(self) -> None:
        for req in list(self._requests.values()):
            self._abort(req)
        self._fail_jobs()
