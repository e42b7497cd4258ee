"""A small STOW-RS server for the answers Orthanc cannot give (202 with a failure list,
409 with 0x0111, a 400 for a whole request, 429, a token endpoint), on 127.0.0.1.

Each request is parsed with the standard library's MIME parser (not the bridge's
reader) and recorded: its headers and the SOP Instance UID of every part. A test sets
``answer`` to a function from the request to (status, headers, JSON body or None, or
bytes sent as they are). GET and OPTIONS requests get an answer too, without a body.
"""

from __future__ import annotations

import email.parser
import email.policy
import io
import json
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pydicom


@dataclass
class Request:
    path: str
    headers: dict[str, str]
    method: str = "POST"
    uids: list[str] = field(default_factory=list)  # SOP Instance UID of each part, in order
    body: bytes = b""  # a form's body (token requests); parts are not kept
    chunked: bool = False


Answer = tuple[int, dict[str, str], Any]


def stored(uids: list[str]) -> dict[str, Any]:
    """A STOW response body listing ``uids`` as stored."""
    return response(referenced=uids)


def response(referenced: list[str] = (), failed: dict[str, int] | None = None,  # type: ignore[assignment]
             warnings: dict[str, int] | None = None) -> dict[str, Any]:
    """A DICOM JSON STOW response: ReferencedSOPSequence (with WarningReason where given)
    and FailedSOPSequence with each FailureReason."""
    def item(uid: str, extra: dict[str, Any]) -> dict[str, Any]:
        return {"00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.7"]},
                "00081155": {"vr": "UI", "Value": [uid]}, **extra}

    ok = [item(u, {"00081196": {"vr": "US", "Value": [(warnings or {})[u]]}} if u in (warnings or {}) else {})
          for u in referenced]
    bad = [item(u, {"00081197": {"vr": "US", "Value": [reason]}}) for u, reason in (failed or {}).items()]
    body: dict[str, Any] = {"00081199": {"vr": "SQ", "Value": ok}} if ok else {"00081199": {"vr": "SQ"}}
    body["00081198"] = {"vr": "SQ", "Value": bad} if bad else {"vr": "SQ"}
    return body


class FakeStow:
    """``url`` is the DICOMweb base URL; STOW goes to ``url + "/studies"``, tokens to
    ``url + "/token"``."""

    def __init__(self, certificate: tuple[Path, Path] | None = None, client_ca: Path | None = None) -> None:
        self.requests: list[Request] = []
        self.answer: Callable[[Request], Answer] = lambda r: (200, {}, stored(r.uids))
        self.token_answer: Callable[[Request], Answer] = lambda r: (404, {}, None)
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = self.headers.get("Content-Length")
                chunked = length is None
                data = self.rfile.read(int(length)) if length is not None else self._read_chunked()
                request = Request(self.path, {k.lower(): v for k, v in self.headers.items()}, chunked=chunked)
                if self.path.endswith("/token"):
                    request.body = data
                    status, headers, body = fake.token_answer(request)
                else:
                    request.uids = _uids(self.headers.get("Content-Type", ""), data)
                    status, headers, body = fake.answer(request)
                self._reply(request, status, headers, body)

            def do_GET(self) -> None:
                request = Request(self.path, {k.lower(): v for k, v in self.headers.items()}, method=self.command)
                self._reply(request, *fake.answer(request))

            do_OPTIONS = do_GET

            def _reply(self, request: Request, status: int, headers: dict[str, str], body: Any) -> None:
                with fake._lock:
                    fake.requests.append(request)
                content = body if isinstance(body, bytes) else b"" if body is None else json.dumps(body).encode()
                self.send_response(status)
                for name, value in {"Content-Type": "application/dicom+json", **headers}.items():
                    self.send_header(name, value)
                if "Content-Length" in headers:  # an answer that breaks off: the connection closes after it
                    self.close_connection = True
                else:
                    self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            def _read_chunked(self) -> bytes:
                out = io.BytesIO()
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    out.write(self.rfile.read(size))
                    self.rfile.readline()
                self.rfile.readline()
                return out.getvalue()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        scheme = "http"
        if certificate is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(str(certificate[0]), str(certificate[1]))
            if client_ca is not None:  # mutual TLS: a client certificate signed by this CA, or no connection
                context.verify_mode = ssl.CERT_REQUIRED
                context.load_verify_locations(str(client_ca))
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_address[1]}/dicom-web"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeStow:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def stow_requests(self) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.path.endswith("/studies")]

    def uids_received(self) -> set[str]:
        return {uid for r in self.stow_requests() for uid in r.uids}


def _uids(content_type: str, data: bytes) -> list[str]:
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + data
    )
    uids = []
    for part in message.iter_parts():  # type: ignore[attr-defined]
        payload = part.get_payload(decode=True)
        try:
            uids.append(str(pydicom.dcmread(io.BytesIO(payload), stop_before_pixels=True).SOPInstanceUID))
        except Exception:
            uids.append("unreadable")
    return uids


def form(request: Request) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(request.body.decode()).items()}
