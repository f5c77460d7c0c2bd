"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}`` with the
status an OpenAI client maps to its exception classes (400 BadRequestError, 401
AuthenticationError, 404 NotFoundError, 503 ...)."""
from __future__ import annotations

import json
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from quantrt.engine.async_engine import EngineDeadError
from quantrt.errors import QuantrtError

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error",
          404: "invalid_request_error", 405: "invalid_request_error",
          499: "invalid_request_error", 500: "server_error", 503: "service_unavailable"}


class APIError(Exception):
    """An HTTP error the handlers raise; rendered as OpenAI's error JSON."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status)


def as_api_error(exc: BaseException) -> APIError:
    """What an exception raised while serving a request means to the client."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, QuantrtError):            # bad sampling parameters, prompt too long ...
        # SamplingParams names the field first ("top_p must be in (0, 1]"): that is the param.
        m = re.match(r"([a-z_]+) must", exc.message)
        return APIError(400, exc.one_line(), param=m.group(1) if m else None)
    if isinstance(exc, EngineDeadError):
        return APIError(503, str(exc), code="engine_unavailable")
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}")


def sse_error(exc: BaseException) -> str:
    """An error after a stream has started (its 200 status is already sent)."""
    return f"data: {json.dumps(as_api_error(exc).body())}\n\n"


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    param = ".".join(loc) or None
    where = f" ({param})" if param else ""
    return f"{first.get('msg', 'invalid value')}{where}", param


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(QuantrtError)
    async def _quantrt_error(_: Request, exc: QuantrtError) -> JSONResponse:
        err = as_api_error(exc)
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(EngineDeadError)
    async def _dead(_: Request, exc: EngineDeadError) -> JSONResponse:
        err = as_api_error(exc)
        return JSONResponse(err.body(), status_code=err.status)

    # OpenAI answers a body that is not JSON, or not the right shape, with 400.
    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))
