"""The FastAPI app: routes, API-key check, and the engine's lifetime.

    app = build_app(AsyncLLMEngine.from_source("demo"), "demo", api_key=None)

``/v1/*`` needs ``Authorization: Bearer <key>`` when a key is set; ``/health`` and
``/metrics`` are open, as probes and scrapers carry no key.
"""
from __future__ import annotations

import hmac
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from quantrt.engine.async_engine import AsyncLLMEngine
from quantrt.server.errors import error_response, install_handlers
from quantrt.server.generation import ServerState
from quantrt.server.metrics import ServerMetrics
from quantrt.server.protocol import ChatCompletionRequest, CompletionRequest
from quantrt.server.serving_chat import create_chat_completion
from quantrt.server.serving_completion import create_completion


class _APIKeyCheck:
    """A plain ASGI middleware, so a wrong key is answered before the body is parsed (a
    bad key with a bad body is a 401, not a 400) and streams pass through untouched
    (Starlette's BaseHTTPMiddleware would sit between a stream and its disconnect)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                message = ("You didn't provide an API key." if not given else
                           "Incorrect API key provided.")
                await error_response(401, message, code="invalid_api_key")(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(engine: AsyncLLMEngine, model_name: str, api_key: str | None = None) -> FastAPI:
    state = ServerState(engine, model_name, ServerMetrics(engine, model_name), api_key)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        # After the HTTP server has drained (see launch.py): nothing is left to finish.
        await engine.shutdown()

    app = FastAPI(title="quantrt", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.quantrt = state
    install_handlers(app)
    if api_key:
        app.add_middleware(_APIKeyCheck, api_key=api_key)

    @app.get("/health")
    async def health() -> Response:
        # 503 once the engine is gone (a failed step, or shutting down): take it out of
        # rotation.
        if not engine.alive or state.draining:
            return error_response(503, "the engine is not serving", code="engine_unavailable")
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{
            "id": model_name, "object": "model", "created": state.created,
            "owned_by": "quantrt", "root": str(engine.engine.lm.source.path),
            "max_model_len": state.max_model_len}]})

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request
                          ) -> JSONResponse | StreamingResponse:
        return await create_completion(state, body, request)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request
                               ) -> JSONResponse | StreamingResponse:
        return await create_chat_completion(state, body, request)

    return app
