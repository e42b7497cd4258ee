"""What the daemon's two ASGI apps (``bridge.api``, ``bridge.static.serve``) share: the
one place an unexpected error becomes a 500, and log-safe request paths."""

from __future__ import annotations

from collections.abc import Callable

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send


def printable(text: str) -> str:
    """``text`` for a log line: control characters escaped, so that a request's path with
    a newline in it cannot forge a line of its own."""
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


async def guarded(app: ASGIApp, scope: Scope, receive: Receive, send: Send,
                  failed: Callable[[Scope, Exception], Response]) -> None:
    """Run ``app``; an exception it raises goes to ``failed``, which logs it (with its
    traceback, never sent) and gives the 500 to answer, sent when the answer has not begun
    (else it is cut short, and the client sees that). Not an exception handler for
    ``Exception``: Starlette calls that one and raises the exception again, for the
    server to log a second time."""
    started = False

    async def watch(message: Message) -> None:
        nonlocal started
        started = started or message["type"] == "http.response.start"
        await send(message)

    try:
        await app(scope, receive, watch)
    except Exception as exc:  # noqa: BLE001 - the one place that turns any error into a 500
        response = failed(scope, exc)
        if not started:
            await response(scope, receive, send)
