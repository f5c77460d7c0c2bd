"""Prometheus metrics for ``GET /metrics``.

Gauges of the engine's state (requests running and waiting, KV blocks in use) are read at
scrape time, so they are exact then; per-request figures (tokens, time to first token, time
per output token, latency) are recorded by the server as each request ends.  Each app has
its own registry, so several servers in one process do not share counters.
"""
from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from quantrt.engine.async_engine import AsyncLLMEngine
from quantrt.engine.outputs import RequestOutput

_PREFIX = "quantrt_"
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0,
                 80.0, 160.0)
_TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5,
                 5.0)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, engine: AsyncLLMEngine, model_name: str) -> None:
        self.registry = registry = CollectorRegistry()
        labels = {"model_name": model_name}
        eng = engine.engine

        def gauge(name: str, doc: str, fn: Callable[[], float]) -> None:
            g = Gauge(_PREFIX + name, doc, list(labels), registry=registry)
            g.labels(**labels).set_function(fn)

        def running() -> int:
            # Read from the event loop while a step may run in the worker thread: a list
            # copy is atomic under the GIL, so this is a consistent snapshot.
            return len({seq.request_id for seq in list(eng.scheduler.running)})

        gauge("num_requests_running", "Requests with a sequence in the running batch.", running)
        gauge("num_requests_waiting", "Requests queued or preempted, not yet running.",
              lambda: max(0, engine.num_unfinished - running()))
        gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1).",
              lambda: 1 - eng.blocks.num_free / eng.blocks.num_blocks)
        gauge("kv_cache_blocks_used", "KV-cache blocks held by requests.",
              lambda: eng.blocks.num_blocks - eng.blocks.num_free)
        gauge("kv_cache_blocks_total", "KV-cache blocks.", lambda: eng.blocks.num_blocks)
        gauge("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
              lambda: eng.blocks.prefix_queries)
        gauge("prefix_cache_hits", "Prompt tokens served from the prefix cache.",
              lambda: eng.blocks.prefix_hits)

        names = list(labels)
        self._labels = labels
        self.prompt_tokens = Counter(_PREFIX + "prompt_tokens", "Prompt tokens processed.",
                                     names, registry=registry).labels(**labels)
        self.generation_tokens = Counter(_PREFIX + "generation_tokens", "Tokens generated.",
                                         names, registry=registry).labels(**labels)
        self.request_success = Counter(_PREFIX + "request_success",
                                       "Requests ended, by the finish reason of their first completion.",
                                       names + ["finished_reason"], registry=registry)
        self.ttft = Histogram(_PREFIX + "time_to_first_token_seconds",
                              "Time from arrival to the first generated token.", names,
                              buckets=_TTFT_BUCKETS, registry=registry).labels(**labels)
        self.tpot = Histogram(_PREFIX + "time_per_output_token_seconds",
                              "Mean time between generated tokens of a request.", names,
                              buckets=_TPOT_BUCKETS, registry=registry).labels(**labels)
        self.e2e = Histogram(_PREFIX + "e2e_request_latency_seconds",
                             "Time from arrival to the last token.", names,
                             buckets=_E2E_BUCKETS, registry=registry).labels(**labels)

    def track(self, num_prompt_tokens: int, arrival: float) -> RequestTracker:
        return RequestTracker(self, num_prompt_tokens, arrival)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTracker:
    """Timing of one engine request, fed with its delta outputs."""

    def __init__(self, metrics: ServerMetrics, num_prompt_tokens: int, arrival: float) -> None:
        self.metrics = metrics
        self.num_prompt_tokens = num_prompt_tokens
        self.arrival = arrival                    # time.perf_counter() when the request came
        self.first: float | None = None
        self.last: float | None = None
        self.tokens: dict[int, int] = {}          # completion index -> tokens so far
        self.reasons: dict[int, str] = {}
        self.done = False

    def on_output(self, out: RequestOutput) -> None:
        now = time.perf_counter()
        for c in out.outputs:
            if c.token_ids:
                self.tokens[c.index] = self.tokens.get(c.index, 0) + len(c.token_ids)
                if self.first is None:
                    self.first = now
                self.last = now
            if c.finish_reason is not None:
                self.reasons[c.index] = c.finish_reason

    def finish(self) -> None:
        """Record the request (once), however it ended: finished, aborted or failed."""
        if self.done:
            return
        self.done = True
        m = self.metrics
        m.prompt_tokens.inc(self.num_prompt_tokens)
        m.generation_tokens.inc(sum(self.tokens.values()))
        # One count per request: the reason its first completion ended (never reached the
        # engine, or cut short before any output: abort).
        reason = self.reasons.get(0, "abort")
        m.request_success.labels(**m._labels, finished_reason=reason).inc()
        if self.first is None:
            return
        m.ttft.observe(self.first - self.arrival)
        m.e2e.observe(self.last - self.arrival)
        longest = max(self.tokens.values())
        if longest > 1:
            m.tpot.observe((self.last - self.first) / (longest - 1))
