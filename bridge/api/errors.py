"""What a failed request answers: ``{"message": ..., "correlation_id": ...}`` with its
status, the same ID in the ``X-Correlation-ID`` header and in the log line of the call.
The message says what is wrong in the request or upstream, never an exception's text:
an unexpected error answers 500 with the ID only, and its traceback is logged under it.
(A queue database error answers 503 with SQLite's few words, ``database is locked``:
what an administrator acts on.) The OpenAPI document says so: 400 where FastAPI would
say 422, and the error body's schema (``ErrorAnswer``)."""

from __future__ import annotations

import logging
import re
import sqlite3
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from bridge.asgi import guarded, printable

LOGGER = logging.getLogger("bridge.api")

CORRELATION_HEADER = "X-Correlation-ID"
_GIVEN_ID = re.compile(r"[A-Za-z0-9._-]{8,64}")


class ErrorAnswer(BaseModel):
    """The body of every error answer."""

    message: str = Field(description="what is wrong; a 400 names the field")
    correlation_id: str = Field(description="the call's ID: the daemon's log line of the call has it too")
    errors: list[str] | None = Field(None, description="400: every problem, each naming its field")


def error_answers(statuses: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """``responses=`` of a route or router: these error statuses, each with its description
    and the ``ErrorAnswer`` body."""
    return {status: {"model": ErrorAnswer, "description": text} for status, text in statuses.items()}


class ApiError(Exception):
    """A request answered with ``status`` and ``message`` (and ``detail``, JSON, if any)."""

    def __init__(self, status: int, message: str, detail: dict[str, Any] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.detail = detail or {}
        self.headers = headers or {}


# Raised while the body is read: HTTPExceptions, because FastAPI turns any other
# exception met while reading a body into a 400.


class BodyTooLarge(HTTPException):
    """A request body (chunked, so of no declared length) went past the limit: 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"a request body may have at most {limit} bytes", {"Connection": "close"})


class BodyTimeout(HTTPException):
    """A request body paused for longer than the limit: 408."""

    def __init__(self, limit: float) -> None:
        super().__init__(408, f"the request body paused for more than {limit:g}s", {"Connection": "close"})


def correlation_id(request: Request) -> str:
    """The request's correlation ID: the client's ``X-Correlation-ID`` when it is a sane
    one, else a new one; set once by the middleware (``bridge.api.app``)."""
    state = request.scope.setdefault("state", {})
    if "correlation_id" not in state:
        given = request.headers.get(CORRELATION_HEADER, "")
        state["correlation_id"] = given if _GIVEN_ID.fullmatch(given) else uuid.uuid4().hex
    return str(state["correlation_id"])


def error_response(request: Request, status: int, message: str, detail: dict[str, Any] | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    cid = correlation_id(request)
    body = {**(detail or {}), "message": message, "correlation_id": cid}
    return JSONResponse(body, status_code=status, headers={**(headers or {}), CORRELATION_HEADER: cid})


def install(app: FastAPI) -> None:
    """The one place where exceptions become answers."""

    async def api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        if exc.status >= 500:
            LOGGER.warning("%s %s [%s]: %d %s", request.method, printable(request.url.path), correlation_id(request),
                           exc.status, exc.message)
        return error_response(request, exc.status, exc.message, exc.detail, exc.headers)

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        return error_response(request, exc.status_code, str(exc.detail), headers=dict(exc.headers or {}))

    async def queue_failed(request: Request, exc: Exception) -> JSONResponse:
        LOGGER.warning("%s %s [%s]: 503: the queue database: %s", request.method, printable(request.url.path),
                       correlation_id(request), exc)
        return error_response(request, 503, f"the queue database cannot be used now ({exc}); try again")

    async def invalid(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        problems = [_problem(e) for e in exc.errors()]
        return error_response(request, 400, "; ".join(problems), {"errors": problems})


    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(sqlite3.Error, queue_failed)
    app.add_middleware(_Unexpected)


class _Unexpected:
    """An unexpected error answers 500 with the correlation ID only, and is logged with
    its traceback under that ID (once)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await guarded(self.app, scope, receive, send, _failed)


def _failed(scope: Scope, exc: Exception) -> JSONResponse:
    request = Request(scope)
    cid = correlation_id(request)
    LOGGER.error("%s %s [%s] failed", scope.get("method"), printable(str(scope.get("path"))), cid, exc_info=exc)
    return error_response(request, 500, f"internal error; the daemon's log has it under {cid}")


def _problem(error: dict[str, Any]) -> str:
    """``field: what is wrong``, the field as a dotted path from the body (or the query)."""
    if error.get("type") == "json_invalid":  # its location is the character, not a field
        where = error.get("loc", ("body", 0))[-1]
        return f"body: not JSON: {error.get('ctx', {}).get('error', 'invalid')} (at character {where})"
    loc = [str(p) for p in error.get("loc", ()) if p not in ("body", "query", "path")]
    where = ".".join(loc) or "body"
    message = str(error.get("msg", "invalid"))
    message = message.removeprefix("Value error, ")
    return f"{where}: {message}"
