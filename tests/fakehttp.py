"""What the tests' fake HTTP servers share: a loopback HTTP/1.1 server in a daemon thread,
its GET (and, if given, POST) requests answered by functions of the fake (``fakeqido``,
``fakewado``, ``retrievepeers.FakeDicomweb``, ``fakeids``)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Handle = Callable[[BaseHTTPRequestHandler], None]


def serve(port: int, get: Handle, name: str, post: Handle | None = None) -> ThreadingHTTPServer:
    """Serve on 127.0.0.1:``port``, each GET answered by ``get(handler)`` and each POST by
    ``post(handler)`` (501 without one), silently."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            get(self)

        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            if post is None:
                self.send_error(501)
            else:
                post(self)

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name=name, daemon=True).start()
    return server


def close(server: ThreadingHTTPServer | None) -> None:
    if server is not None:
        server.shutdown()
        server.server_close()
