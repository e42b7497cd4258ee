"""A small QIDO-RS server, for what Orthanc cannot show: the parameters the bridge sends
(Orthanc parses ``fuzzymatching`` but ignores it), pages that come slowly (to cancel
in the middle of a query), and error answers. On 127.0.0.1, in a thread.

Every request is recorded (path, parameters, when). ``records`` are the matches it
holds, as DICOM JSON; a request gets those its ``limit`` and ``offset`` select, after
``delay`` seconds, whatever else it asks for. ``answer``, when set, replaces that: a
function from the request to (HTTP status, JSON body).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import fakehttp
from peers import free_port


@dataclass
class Request:
    path: str
    params: dict[str, list[str]]
    at: float  # time.monotonic() when it arrived


def study(uid: str, patient_id: str, name: str, date: str = "20240101") -> dict[str, Any]:
    """A study as QIDO-RS answers it (PS3.18 F.2, DICOM JSON)."""
    return {
        "0020000D": {"vr": "UI", "Value": [uid]},
        "00100020": {"vr": "LO", "Value": [patient_id]},
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": name}]},
        "00080020": {"vr": "DA", "Value": [date]},
        "00080054": {"vr": "AE", "Value": ["FAKEQIDO"]},
        "00081190": {"vr": "UR", "Value": [f"http://127.0.0.1/dicom-web/studies/{uid}"]},
    }


class FakeQido:
    def __init__(self) -> None:
        self.port = free_port()
        self.records: list[dict[str, Any]] = []
        self.delay = 0.0
        self.answer: Callable[[Request], tuple[int, Any]] | None = None
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/dicom-web"

    def reset(self, records: list[dict[str, Any]] | None = None, delay: float = 0.0,
              answer: Callable[[Request], tuple[int, Any]] | None = None) -> None:
        with self._lock:
            self.records = records or []
            self.delay = delay
            self.answer = answer
            self.requests = []

    def seen(self) -> list[Request]:
        with self._lock:
            return list(self.requests)

    def start(self) -> FakeQido:
        fake = self

        def get(handler: BaseHTTPRequestHandler) -> None:
            parts = urlsplit(handler.path)
            request = Request(parts.path, parse_qs(parts.query, keep_blank_values=True), time.monotonic())
            with fake._lock:
                fake.requests.append(request)
                answer, delay, records = fake.answer, fake.delay, fake.records
            time.sleep(delay)  # a slow server, on purpose
            if answer is not None:
                status, body = answer(request)
            else:
                offset = int(request.params.get("offset", ["0"])[0])
                limit = int(request.params.get("limit", [str(len(records))])[0])
                status, body = 200, records[offset:offset + limit]
            data = json.dumps(body).encode() if body is not None else b""
            handler.send_response(status)
            handler.send_header("Content-Type", "application/dicom+json")
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            handler.wfile.write(data)

        self._server = fakehttp.serve(self.port, get, "fakeqido")
        return self

    def stop(self) -> None:
        fakehttp.close(self._server)
