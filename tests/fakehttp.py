"""What the tests' fake HTTP servers share: a loopback HTTP/1.1 server in a daemon thread,
its GET requests answered by a function of the fake (``fakeqido``, ``fakewado``,
``retrievepeers.FakeDicomweb``)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def serve(port: int, get: Callable[[BaseHTTPRequestHandler], None], name: str) -> ThreadingHTTPServer:
    """Serve on 127.0.0.1:``port``, each GET answered by ``get(handler)``, silently."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            get(self)

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name=name, daemon=True).start()
    return server


def close(server: ThreadingHTTPServer | None) -> None:
    if server is not None:
        server.shutdown()
        server.server_close()
