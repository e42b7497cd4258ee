"""``HttpServer``: uvicorn serving ``bridge.api.app`` in a thread of the daemon.

The socket is bound by ``bind`` (an address in use fails the start before anything is
written, as the DIMSE listener's does), and served once ``start`` runs. uvicorn runs with
the daemon's logging (no config of its own, no access log: calls under ``/api`` are
logged by the app, with their caller) and does not touch signals (it is not on the main
thread). TLS is uvicorn's: ``http.tls`` gives the certificate and key, and with
``client_ca_file`` a client certificate is required."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from bridge.api import app as api_app
from bridge.api.state import ApiState
from bridge.config import Config
from bridge.dimse.listener import bind_failure
from bridge.errors import StartError

LOGGER = logging.getLogger(__name__)

STOP_TIMEOUT = 10  # seconds a stop waits for calls in progress
MAX_CONNECTIONS = 64  # connections served at once; more get 503
KEEP_ALIVE = 5  # seconds an idle keep-alive connection is kept


class _Deadlines(H11Protocol):
    """uvicorn's h11 protocol, with a deadline on a request's head: uvicorn closes idle
    keep-alive connections, but waits forever for a head sent a byte at a time (or not
    at all on a new connection), and 64 such connections would take every slot. The
    body's deadline is the app's (``bridge.api.app``). Relies on uvicorn's ``conn`` (the
    h11 connection), ``loop`` and ``transport``, present from 0.29 to 0.55 at least."""

    head_timeout = 10.0  # seconds from a connection, or a request's first byte, to the end of its head
    _head: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_head()

    def data_received(self, data: bytes) -> None:
        if self._head is None and self.conn.their_state is h11.IDLE:
            self._await_head()
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE and self._head is not None:
            self._head.cancel()
            self._head = None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head is not None:
            self._head.cancel()
            self._head = None
        super().connection_lost(exc)

    def _await_head(self) -> None:
        self._head = self.loop.call_later(self.head_timeout, self._head_too_slow)

    def _head_too_slow(self) -> None:
        self._head = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            LOGGER.info("HTTP: closed a connection from %s that sent no request head in %.0fs",
                        self.client[0] if self.client else "?", self.head_timeout)
            self.transport.close()


class HttpServer:
    def __init__(self, config: Config, state: ApiState) -> None:
        self.config = config.http
        self.state = state
        self._socket: socket.socket | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def bind(self) -> None:
        host, port = self.config.host, self.config.port
        assert port is not None
        try:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            self._socket = socket.create_server((host, port), family=family, backlog=128)
        except OSError as exc:
            raise StartError(bind_failure("http.host, http.port", host, port, exc)) from exc
        self._socket.setblocking(False)

    @property
    def port(self) -> int:
        assert self._socket is not None
        return int(self._socket.getsockname()[1])

    @property
    def url(self) -> str:
        scheme = "https" if self.config.tls else "http"
        host = self.config.host if ":" not in self.config.host else f"[{self.config.host}]"
        return f"{scheme}://{host}:{self.port}"

    def start(self) -> None:
        assert self._socket is not None
        tls = self.config.tls
        settings = uvicorn.Config(
            api_app.build(self.state, self.config.request_timeout),
            http=type("Deadlines", (_Deadlines,), {"head_timeout": self.config.request_timeout}),
            log_config=None, access_log=False, lifespan="off",
            limit_concurrency=MAX_CONNECTIONS, timeout_keep_alive=KEEP_ALIVE, server_header=False,
            timeout_graceful_shutdown=STOP_TIMEOUT,
            ssl_certfile=str(tls.cert_file) if tls else None, ssl_keyfile=str(tls.key_file) if tls else None,
            ssl_ca_certs=str(tls.client_ca_file) if tls and tls.client_ca_file else None,
            ssl_cert_reqs=ssl.CERT_REQUIRED if tls and tls.client_ca_file else ssl.CERT_NONE,
        )
        try:
            settings.load()  # the certificate and key are read here: a bad one fails the start
        except (OSError, ssl.SSLError) as exc:
            raise StartError(f"http.tls: cannot load the certificate or key: {exc}") from exc
        self._server = uvicorn.Server(settings)
        sockets = [self._socket]
        self._thread = threading.Thread(target=self._run, args=(sockets,), name="HttpServer", daemon=True)
        self._thread.start()
        LOGGER.info("HTTP server on %s (metrics, health%s)", self.url,
                    ", API under /api" if self.state.tokens else "; the API under /api is off: no http.token_file")

    def _run(self, sockets: list[socket.socket]) -> None:
        assert self._server is not None
        try:
            self._server.run(sockets=sockets)
        except BaseException:  # noqa: BLE001 - a thread that dies silently hides the fault
            LOGGER.exception("the HTTP server stopped unexpectedly")
        else:
            if not self._server.should_exit:
                LOGGER.error("the HTTP server stopped unexpectedly")

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(STOP_TIMEOUT + 5)
        if self._socket is not None:
            self._socket.close()
