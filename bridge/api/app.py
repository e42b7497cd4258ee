"""The HTTP server's app: ``build(state)``.

Routes of its own: ``/metrics``, ``/healthz``, ``/readyz``, ``/version``, ``/docs`` (and
``/openapi.json``); under ``/api``, the admin API (``bridge.api.admin``) and the JSON
query and retrieve API (``bridge.api.qr``). Static DICOMweb trees are served at the
paths their destinations name (``serve``), in front of all that (``_Front``), which
also bounds request bodies, gives every request its correlation ID and logs each call
under ``/api`` with who made it."""

from __future__ import annotations

import asyncio
import logging
import time
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bridge.api import admin, errors, health, qr
from bridge.api.deps import runtime
from bridge.api.errors import CORRELATION_HEADER, BodyTimeout, BodyTooLarge, correlation_id, error_response
from bridge.api.state import ApiState
from bridge.asgi import printable

LOGGER = logging.getLogger("bridge.api")

MAX_BODY = 1 << 20  # bytes a request body may have: the API's bodies are small JSON


def daemon_version() -> str:
    try:
        return version("dicom-bridge")
    except PackageNotFoundError:  # run from a source tree that was not installed
        return "unknown"


def build(state: ApiState, body_timeout: float = 10.0) -> ASGIApp:
    """The app; a request body may pause for ``body_timeout`` seconds at most."""
    app = FastAPI(
        title="dicom-bridge",
        version=daemon_version(),
        description="The DICOM bridge daemon's HTTP API: health, metrics, the admin API and the JSON "
                    "query and retrieve API (under /api, with a bearer token of http.token_file).",
        redoc_url=None,
    )
    app.state.api = state
    errors.install(app)

    @app.get("/healthz", tags=["health"], summary="The process is alive")
    def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz", tags=["health"], summary="Ready to take images: listening, queue usable, spool writable",
             responses={503: {"description": "a check failed; the body says which"}})
    def readyz(request: Request) -> JSONResponse:
        answer = health.readiness(runtime(request))
        if not answer["ready"]:
            failed = [f"{name}: {c['detail']}" for name, c in answer["checks"].items() if not c["ok"]]
            LOGGER.warning("not ready: %s", "; ".join(failed))
        return JSONResponse(answer, status_code=200 if answer["ready"] else 503)

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics",
             response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
    def metrics(request: Request) -> Response:
        return Response(generate_latest(runtime(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/version", tags=["health"], summary="The daemon's version, and its libraries'")
    def daemon_versions() -> dict[str, str]:
        return {name: _version(name) for name in ("dicom-bridge", "pynetdicom", "pydicom", "fastapi", "uvicorn")}

    app.include_router(admin.router)
    app.include_router(qr.router)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return _Front(app, state, body_timeout)


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, saying what the app answers: 400 (not FastAPI's 422) for a
    request that is not valid, and every error's body (``errors.ErrorAnswer``)."""
    if app.openapi_schema:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    document = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    schemas.setdefault("ErrorAnswer", errors.ErrorAnswer.model_json_schema(
        ref_template="#/components/schemas/{model}"))
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorAnswer"}}}
    for path, operations in document.get("paths", {}).items():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            invalid = responses.pop("422", None)
            if invalid is not None or "400" in responses:
                responses["400"] = {"description": responses.get("400", {}).get(
                    "description", "the request is not valid; the message names the field"), "content": error}
            if path.startswith("/api"):
                responses.setdefault("401", {"description": "no valid bearer token"})
                responses.setdefault("403", {"description": "the API is off (no http.token_file)"})
            for status, response in responses.items():
                if status[0] in "45" and status != "503" or status == "503" and path.startswith("/api"):
                    response["content"] = error
    app.openapi_schema = document
    return document


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


class _Front:
    """In front of the app: static trees at their paths; request bodies bounded by
    ``MAX_BODY`` (413); under ``/api``, the correlation ID header on every answer and one
    log line per call: method, path, caller, status, time."""

    def __init__(self, app: FastAPI, state: ApiState, body_timeout: float) -> None:
        self.app = app
        self.state = state
        self.body_timeout = body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        for prefix, _, tree in self.state.static:
            if path == prefix or path.startswith(prefix + "/"):
                await tree({**scope, "root_path": scope.get("root_path", "") + prefix}, receive, send)
                return
        declared = _content_length(scope)
        if declared is not None and declared > MAX_BODY:  # answered before a byte of it is read
            refused = BodyTooLarge(MAX_BODY)
            await error_response(Request(scope), refused.status_code, str(refused.detail),
                                 headers=dict(refused.headers or {}))(scope, receive, send)
            return
        receive = _bounded(receive, self.body_timeout)
        if not (path == "/api" or path.startswith("/api/")):
            await self.app(scope, receive, send)
            return
        await self._api_call(scope, receive, send)

    async def _api_call(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope)
        cid = correlation_id(request)  # fixed now, for the handlers, the answer and the log
        started = time.monotonic()
        status = 500

        async def answer(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-correlation-id"]
                message = {**message, "headers": [*headers, (CORRELATION_HEADER.lower().encode(), cid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, answer)
        finally:
            state = scope.get("state", {})
            client = scope.get("client") or ("?", 0)
            LOGGER.info("api: %s %s by %s from %s: %d in %.0f ms [%s]", scope["method"], printable(scope["path"]),
                        state.get("caller", "(not authenticated)"), client[0], status,
                        (time.monotonic() - started) * 1000, cid)


def _content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", []):
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _bounded(receive: Receive, timeout: float) -> Receive:
    """``receive``, failing once more than ``MAX_BODY`` bytes of body came (a chunked body
    declares no length), or when the body pauses for ``timeout`` seconds. Once the body is
    whole, ``receive`` waits as long as it likes (for the client to go, while a long
    answer streams)."""
    seen = 0
    whole = False

    async def bounded() -> Message:
        nonlocal seen, whole
        if whole:
            return await receive()
        try:
            message = await asyncio.wait_for(receive(), timeout)
        except TimeoutError:
            raise BodyTimeout(timeout) from None
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > MAX_BODY:
                raise BodyTooLarge(MAX_BODY)
            whole = not message.get("more_body", False)
        return message

    return bounded
