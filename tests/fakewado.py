"""A small WADO-RS server, for the answers Orthanc cannot give: an answer that stops in
the middle of a part, HTML error pages, parts nobody asked for, bodies cut into odd
pieces, a part of hundreds of megabytes made up as it is sent. On 127.0.0.1, in a thread.

``answer`` is a function from the request's path to (HTTP status, headers, body); the
body is bytes (sent with a Content-Length) or an iterable of bytes and floats, sent
with chunked transfer encoding, one HTTP chunk per bytes and a pause of that many
seconds per float (cut short when the server stops). Every request's path is recorded.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import fakehttp
from peers import free_port

Body = bytes | Iterable[bytes | float]
Answer = tuple[int, dict[str, str], Body]


def multipart(parts: list[bytes], boundary: str = "wado-boundary",
              content_type: str = "application/dicom") -> bytes:
    """A multipart/related body of ``parts``, each with ``content_type``."""
    body = b"".join(f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode() + part + b"\r\n"
                    for part in parts)
    return body + f"--{boundary}--\r\n".encode()


def related(boundary: str = "wado-boundary") -> dict[str, str]:
    """The Content-Type header of a ``multipart`` body."""
    return {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'}


class FakeWado:
    def __init__(self) -> None:
        self.port = free_port()
        self.answer: Callable[[str], Answer] = lambda path: (404, {"Content-Type": "text/plain"}, b"not found")
        self.paths: list[str] = []
        self.accept: list[str] = []  # the Accept header of each request
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/dicom-web"

    def seen(self) -> list[str]:
        with self._lock:
            return list(self.paths)

    def start(self) -> FakeWado:
        fake = self

        def get(handler: BaseHTTPRequestHandler) -> None:
            path = handler.path.removeprefix("/dicom-web")
            with fake._lock:
                fake.paths.append(path)
                fake.accept.append(handler.headers.get("Accept", ""))
            status, headers, body = fake.answer(path)
            handler.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            handler.send_response(status)
            for name, value in headers.items():
                handler.send_header(name, value)
            try:
                if isinstance(body, bytes):
                    handler.send_header("Content-Length", str(len(body)))
                    handler.end_headers()
                    handler.wfile.write(body)
                    return
                handler.send_header("Transfer-Encoding", "chunked")
                handler.end_headers()
                for piece in body:
                    if isinstance(piece, float):
                        if fake._stopping.wait(piece):
                            return
                        continue
                    if piece:
                        handler.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                        handler.wfile.flush()
                handler.wfile.write(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client went away, as a closed retrieval does

        self._server = fakehttp.serve(self.port, get, "fakewado")
        return self

    def stop(self) -> None:
        self._stopping.set()
        fakehttp.close(self._server)
