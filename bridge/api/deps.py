"""What the API's routes depend on (FastAPI dependencies): the running daemon, and the
caller, who must present a bearer token of ``http.token_file`` under ``/api``."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from bridge.api.errors import ApiError
from bridge.api.runtime import Runtime
from bridge.api.state import ApiState


def api_state(request: Request) -> ApiState:
    state = request.app.state.api
    assert isinstance(state, ApiState)
    return state


def runtime(request: Request) -> Runtime:
    return api_state(request).runtime


def caller(request: Request) -> str:
    """The name of the token the request presents; 401 without a valid one, 403 when the
    admin API is off (no ``http.token_file``). The outcome is logged with the call."""
    tokens = api_state(request).tokens
    if tokens is None:
        raise ApiError(403, "the API under /api is off: set http.token_file in the configuration")
    scheme, _, presented = request.headers.get("authorization", "").partition(" ")
    who = tokens.who(presented.strip()) if scheme.lower() == "bearer" and presented.strip() else None
    if who is None:
        request.scope.setdefault("state", {})["caller"] = "(no valid token)"
        raise ApiError(401, "a bearer token of http.token_file is needed: 'Authorization: Bearer <token>'",
                       headers={"WWW-Authenticate": "Bearer"})
    request.scope.setdefault("state", {})["caller"] = who
    return who


Caller = Annotated[str, Depends(caller)]
RuntimeDep = Annotated[Runtime, Depends(runtime)]
