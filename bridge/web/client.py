"""Requests to an HTTP peer (a DICOMweb server), for destinations and sources alike.

An ``HttpClient`` is built from the peer's settings (``bridge.config.HttpPeer``: base
URL, authentication, TLS, timeouts) and keeps one keep-alive connection to it. Each
request carries the peer's credentials, TLS settings and timeouts; redirects are not
followed. What goes wrong on the way becomes the upstream errors of ``bridge.errors``:

| what happens | raised |
| --- | --- |
| connection refused or reset, timeouts, an answer that breaks off | ``UpstreamUnavailable`` |
| TLS verification failed; the server refuses our client certificate (or its absence) | ``UpstreamMisconfigured`` |
| any other TLS failure | ``UpstreamUnavailable`` |
| a client certificate or CA bundle that cannot be read | ``UpstreamMisconfigured`` |
| a secret that cannot be read, a token endpoint that refuses us (``bridge.web.auth``) | ``UpstreamMisconfigured`` |
| a token endpoint that is down | ``UpstreamUnavailable`` |

Every HTTP status is returned, because a body can say more than its status (a STOW-RS
response lists instances on any status); the caller reads what it needs, then
``HttpResponse.raise_for_upstream`` raises for the statuses that are about the peer
rather than the request:

| HTTP status | raised |
| --- | --- |
| 408, 429, 5xx | ``UpstreamUnavailable``, with Retry-After (seconds or a date) |
| 401 (after one renewal of the credentials), 403, 407 | ``UpstreamMisconfigured`` |
| 3xx: a redirect | ``UpstreamMisconfigured``: ``url`` should be where it points |
| below 200 | ``UpstreamUnavailable`` |

A 404 and the other 4xx mean different things per request (a wrong base URL for STOW-RS,
an unknown study for WADO-RS) and are left to the caller.
"""

from __future__ import annotations

import email.utils
import logging
import re
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from types import TracebackType
from typing import Protocol, cast

import requests
import urllib3
from requests.adapters import HTTPAdapter

from bridge.config import HttpPeer
from bridge.errors import UpstreamError, UpstreamMisconfigured, UpstreamUnavailable
from bridge.web import auth as httpauth

LOGGER = logging.getLogger(__name__)

USER_AGENT = "dicom-bridge"
CHUNK = 64 * 1024  # bytes per read of a response body


class Body(Protocol):
    """A request body sent with a known Content-Length, which the client may send twice
    (again after a 401 or a dropped connection): each iteration yields it afresh, from
    the start (``bridge.web.multipart.MultipartBody`` does)."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[bytes | bytearray]: ...


class HttpResponse:
    """An answer whose body has not been read yet: ``read`` or ``iter_bytes`` it, then
    close it (or use it as a context manager)."""

    def __init__(self, url: str, response: requests.Response) -> None:
        self.url = url
        self.status = response.status_code
        self.reason = response.reason or ""
        self.headers: Mapping[str, str] = response.headers
        self.retry_after = retry_after(response.headers.get("Retry-After"))
        self._response = response

    def __enter__(self) -> HttpResponse:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._response.close()

    def iter_bytes(self, chunk_size: int = CHUNK) -> Iterator[bytes]:
        """The body as it arrives; ``UpstreamUnavailable`` when it breaks off or stalls
        for the read timeout."""
        try:
            yield from self._response.iter_content(chunk_size)
        except requests.RequestException as exc:
            raise UpstreamUnavailable(f"{self.url}: reading the answer: {describe(exc)}") from None

    def iter_available(self, chunk_size: int = CHUNK) -> Iterator[bytes]:
        """The body as it arrives, each piece what one read from the connection gave (at
        most ``chunk_size``), so that a caller can keep a deadline between pieces:
        ``iter_bytes`` waits for whole chunks, which a server sending a byte at a time
        delays without ever reaching the read timeout. ``UpstreamUnavailable`` as there."""
        raw = self._response.raw
        try:
            while piece := raw.read1(chunk_size, decode_content=True):
                yield piece
        except (urllib3.exceptions.HTTPError, OSError) as exc:  # requests does not wrap raw reads
            raise UpstreamUnavailable(f"{self.url}: reading the answer: {describe(exc)}") from None

    def read(self, limit: int) -> bytes:
        """The body, or its first ``limit`` bytes (a chunk more at most) when it is longer."""
        pieces, total = [], 0
        for piece in self.iter_bytes():
            pieces.append(piece)
            total += len(piece)
            if total >= limit:
                break
        return b"".join(pieces)

    def summary(self, content: bytes = b"") -> str:
        """``HTTP 503 Service Unavailable``; for a status of 300 and above, followed by the
        start of ``content`` (the body, as read) when it is printable text."""
        text = f"HTTP {self.status} {self.reason}".rstrip()
        if self.status >= 300 and content:
            start = " ".join(content[:200].decode("utf-8", "replace").split())
            if start.isprintable():
                text += f": {start}"
        return text

    def raise_for_upstream(self, what: str | None = None) -> None:
        """Raise the upstream error this status means for the peer as a whole (the table
        above); return for 2xx, 404 and the other 4xx. ``what`` describes the answer in
        the error (default: ``summary()``)."""
        status, what = self.status, what or self.summary()
        if 200 <= status < 300:
            return
        if status in (408, 429) or status >= 500:
            raise UpstreamUnavailable(f"{self.url}: {what}", self.retry_after)
        if status in (401, 403, 407):
            raise UpstreamMisconfigured(f"{self.url}: {what}"
                                        + (" (after renewing the credentials)" if status == 401 else ""))
        if 300 <= status < 400:
            raise UpstreamMisconfigured(f"{self.url}: {what}: redirected; set url to where it points")
        if 400 <= status < 500:
            return
        raise UpstreamUnavailable(f"{self.url}: unexpected {what}")


class HttpClient:
    """One HTTP peer, over one keep-alive connection: not shared between threads (each
    worker has its own client). ``open`` is implicit in the first request."""

    def __init__(self, peer: HttpPeer) -> None:
        self.peer = peer
        self.url = peer.url  # the base URL, without a final slash
        self._session: requests.Session | None = None
        self._auth: httpauth.Auth = httpauth.NoAuth()
        tls = peer.tls
        self._verify: bool | str = str(tls.ca_bundle) if tls.verify and tls.ca_bundle else tls.verify
        self._cert: str | tuple[str, str] | None = None
        if tls.client_cert is not None:
            self._cert = (str(tls.client_cert), str(tls.client_key)) if tls.client_key else str(tls.client_cert)

    def open(self) -> None:
        """Read the credentials (``UpstreamMisconfigured`` when a secret cannot be read)
        and set up the connection pool."""
        if self._session is not None:
            return
        self._auth = httpauth.build(self.peer.auth, self.peer.timeouts, self._verify)
        session = requests.Session()
        # One connection, kept alive between requests; no retries by urllib3: a failed
        # request is retried by ``request``, with a fresh body, or left to the caller.
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=1, max_retries=0)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        session.headers["User-Agent"] = USER_AGENT
        # The environment (HTTPS_PROXY, NO_PROXY) is read once here: requests reads it, and
        # looks for a .netrc, on every request otherwise (a millisecond of Python each).
        session.trust_env = False
        session.proxies = requests.utils.get_environ_proxies(self.url)
        self._session = session

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None

    def request(self, method: str, url: str, *, body: Body | bytes | None = None,
                headers: Mapping[str, str] | None = None, params: Mapping[str, str] | str | None = None,
                read_timeout: float | None = None, connect_timeout: float | None = None,
                retry: bool = True) -> HttpResponse:
        """Send a request to ``url`` (under the base URL) with the peer's credentials and
        return the answer, whatever its status, its body unread.

        With ``retry``, a 401 is answered by renewing the credentials once and sending
        again, and a connection that breaks before the answer (a keep-alive connection
        the server had closed) by sending again at once, once. ``read_timeout`` shortens
        the peer's, ``connect_timeout`` its connect timeout (a source bounds every wait by
        its ``find_timeout``). ``params`` is a mapping, or a query string already encoded
        (a QIDO-RS search chooses its own encoding). Errors name ``url``, never the query
        (which may hold patient data). Raises the upstream errors of the module's first table.
        """
        refreshed = reconnected = False
        while True:
            try:
                response = self._send(method, url, body, headers, params, read_timeout, connect_timeout)
            except (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError) as exc:
                if isinstance(exc, requests.exceptions.SSLError):
                    raise self._tls_error(url, exc) from None
                if not retry or reconnected or isinstance(exc, requests.exceptions.ConnectTimeout):
                    raise UpstreamUnavailable(f"{url}: {describe(exc)}") from None
                reconnected = True
                continue
            except requests.RequestException as exc:  # timeouts, and what the server's answer breaks
                raise UpstreamUnavailable(f"{url}: {describe(exc)}") from None
            except OSError as exc:  # requests' own: a client certificate or CA bundle it cannot find
                raise UpstreamMisconfigured(f"{url}: {exc}") from None
            if response.status_code == 401 and retry and not refreshed:
                response.close()
                refreshed = True
                if self._auth.refresh():
                    continue
            return HttpResponse(url, response)

    def _send(self, method: str, url: str, body: Body | bytes | None, headers: Mapping[str, str] | None,
              params: Mapping[str, str] | str | None, read_timeout: float | None,
              connect_timeout: float | None = None) -> requests.Response:
        self.open()
        assert self._session is not None
        timeouts = self.peer.timeouts
        read = timeouts.read if read_timeout is None else min(timeouts.read, read_timeout)
        connect = timeouts.connect if connect_timeout is None else min(timeouts.connect, connect_timeout)
        return self._session.request(
            # an iterable of bytearrays, which requests and urllib3 send like bytes
            method, url, data=cast(Iterable[bytes] | bytes | None, body), params=params,
            headers={**(headers or {}), **self._auth.headers()}, stream=True, allow_redirects=False,
            timeout=(connect, read), verify=self._verify, cert=self._cert,
        )

    def _tls_error(self, url: str, exc: Exception) -> UpstreamError:
        text = str(exc)
        if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text or "hostname" in text:
            return UpstreamMisconfigured(f"{url}: TLS verification failed: {describe(exc)}")
        if any(alert in text.lower() for alert in _CLIENT_CERTIFICATE_ALERTS):
            return UpstreamMisconfigured(f"{url}: the server refused our TLS client certificate "
                                         f"(or its absence): {describe(exc)}")
        return UpstreamUnavailable(f"{url}: TLS: {describe(exc)}")


# TLS alerts by which a server refuses the client's certificate, or its absence (RFC 8446 6.2).
_CLIENT_CERTIFICATE_ALERTS = ("alert certificate required", "alert bad certificate", "alert unknown ca",
                              "alert certificate unknown", "alert certificate expired", "alert certificate revoked")


def retry_after(value: str | None) -> float | None:
    """Retry-After (RFC 9110 10.2.3): seconds, or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def describe(exc: Exception) -> str:
    """A requests error in one line, without the noise of urllib3's nesting: the reason
    urllib3 gives (``Caused by NewConnectionError("...: Connection refused")``) unquoted,
    without the connection object's repr in front of it."""
    text = str(exc)
    for marker in ("Caused by ", "(Caused by "):
        if marker in text:
            text = text.split(marker, 1)[1].rstrip(")")
    if quoted := re.fullmatch(r"\w+\(([\"'])(.*)\1\)?", text, re.DOTALL):
        text = quoted.group(2)
    text = re.sub(r"^\w+\(host=[^)]*\): ", "", text)
    return f"{type(exc).__name__}: {' '.join(text.split())}"


class ClientPool:
    """``HttpClient``s for one peer, one per request in flight: an ``HttpClient`` is not
    shared between threads (its connection, its credentials' renewal). ``borrow`` gives
    an idle one or a new one; it goes back after a request that succeeded (or a caller
    that stopped early: its answer closed, the connection sound) and is closed after one
    that failed (its connection may be broken)."""

    def __init__(self, peer: HttpPeer, max_idle: int = 8) -> None:
        self.peer = peer
        self.max_idle = max_idle
        self._idle: list[HttpClient] = []
        self._lock = threading.Lock()
        self._closed = False

    @contextmanager
    def borrow(self) -> Iterator[HttpClient]:
        with self._lock:
            client = self._idle.pop() if self._idle else None
        if client is None:
            client = HttpClient(self.peer)
        try:
            yield client
        except GeneratorExit:
            self._give_back(client)
            raise
        except BaseException:
            client.close()
            raise
        self._give_back(client)

    def close(self) -> None:
        """Close the idle clients; one still in use is closed when given back."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for client in idle:
            client.close()

    def _give_back(self, client: HttpClient) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < self.max_idle:
                self._idle.append(client)
                return
        client.close()
