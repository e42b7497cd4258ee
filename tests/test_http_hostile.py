"""The HTTP server against clients that are slow, silent or too big: each gets a deadline
or a status, and the server keeps answering everyone else."""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from peers import Bridge, free_port, wait_for

TIMEOUT = 1.0  # http.request_timeout of the daemon under test
TOKEN = "ops 0123456789abcdef0123"


@pytest.fixture(scope="module")
def bridge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bridge]:
    workdir = tmp_path_factory.mktemp("hostile")
    tokens = workdir / "tokens"
    tokens.write_text(TOKEN + "\n")
    tokens.chmod(0o600)
    daemon = Bridge(workdir / "bridge", {
        "http": {"port": free_port(), "token_file": str(tokens), "request_timeout": f"{TIMEOUT}s"},
        "destinations": {"archive": {"type": "archive"}}, "rules": [{"name": "all", "store": ["archive"]}],
    }).start()
    yield daemon
    daemon.stop()


def http_port(bridge: Bridge) -> int:
    return int(bridge.config["http"]["port"])


def get(bridge: Bridge, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", http_port(bridge), timeout=10)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def closed_within(sock: socket.socket, seconds: float) -> float:
    """Seconds until the server closes ``sock`` (reads until EOF); fails past ``seconds``."""
    started = time.monotonic()
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        pytest.fail(f"the server kept the connection open for more than {seconds}s")
    return time.monotonic() - started


def test_a_connection_that_sends_nothing_is_closed_at_the_deadline(bridge):
    with socket.create_connection(("127.0.0.1", http_port(bridge)), timeout=10) as sock:
        assert closed_within(sock, TIMEOUT + 5) >= TIMEOUT * 0.5
    assert "sent no request head in 1s" in bridge.log()


def test_a_head_sent_a_byte_at_a_time_is_cut_off(bridge):
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200
    with socket.create_connection(("127.0.0.1", http_port(bridge)), timeout=10) as sock:
        started = time.monotonic()
        try:
            for byte in head:  # a byte every 20 ms: 4 s in all, four times the deadline
                sock.sendall(bytes([byte]))
                time.sleep(0.02)
                if time.monotonic() - started > TIMEOUT + 3:
                    pytest.fail("the server still took bytes of a head past its deadline")
        except (BrokenPipeError, ConnectionResetError):
            pass
        else:
            closed_within(sock, 5)
        assert time.monotonic() - started < TIMEOUT + 3


def test_silent_connections_do_not_keep_others_out(bridge):
    # More idle connections than the server serves at once (64): they are closed at the
    # deadline, and the server answers again.
    idle = [socket.create_connection(("127.0.0.1", http_port(bridge)), timeout=10) for _ in range(70)]
    try:
        status = wait_for(lambda: get(bridge, "/healthz")[0] == 200, TIMEOUT + 10, "/healthz to answer 200")
        assert status
    finally:
        for sock in idle:
            sock.close()


def test_a_body_that_stops_coming_gets_408(bridge):
    with socket.create_connection(("127.0.0.1", http_port(bridge)), timeout=10) as sock:
        sock.sendall(b"POST /api/query HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer 0123456789abcdef0123\r\nContent-Length: 100\r\n\r\n{\"a\":")
        sock.settimeout(TIMEOUT + 10)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(4096)
            assert chunk, "closed without an answer"
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]


def test_a_chunked_body_past_the_limit_gets_413(bridge):
    connection = http.client.HTTPConnection("127.0.0.1", http_port(bridge), timeout=30)
    chunks = (b"x" * 65536 for _ in range(40))  # 2.5 MiB, no declared length
    try:
        connection.request("POST", "/api/query", body=chunks, encode_chunked=True,
                           headers={"Authorization": "Bearer 0123456789abcdef0123",
                                    "Content-Type": "application/json"})
        response = connection.getresponse()
    except (BrokenPipeError, ConnectionResetError):
        pytest.fail("the server dropped the connection instead of answering 413")
    assert response.status == 413
    body = json.loads(response.read())
    assert "at most 1048576 bytes" in body["message"]
    connection.close()


def test_a_declared_length_past_the_limit_gets_413_unread(bridge):
    with socket.create_connection(("127.0.0.1", http_port(bridge)), timeout=10) as sock:
        sock.sendall(b"POST /api/query HTTP/1.1\r\nHost: x\r\nContent-Length: 1073741824\r\n\r\n")
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]


def test_the_correlation_id_comes_back_and_a_strange_one_is_replaced(bridge):
    status, headers, body = get(bridge, "/api/queue", {"X-Correlation-ID": "ticket-4711-abc"})
    assert status == 401
    assert headers["x-correlation-id"] == "ticket-4711-abc"
    assert json.loads(body)["correlation_id"] == "ticket-4711-abc"
    assert "[ticket-4711-abc]" in wait_for(lambda: "ticket-4711-abc" in bridge.log() and bridge.log(), 10, "the log")
    status, headers, body = get(bridge, "/api/queue", {"X-Correlation-ID": "<script>"})
    assert headers["x-correlation-id"] != "<script>"
    assert len(headers["x-correlation-id"]) == 32
    assert json.loads(body)["correlation_id"] == headers["x-correlation-id"]


def test_every_call_under_api_is_logged_with_who_made_it(bridge):
    get(bridge, "/api/nothing-here", {"Authorization": "Bearer wrong-token-wrong-token"})
    line = wait_for(lambda: next((ln for ln in bridge.log().splitlines() if "/api/nothing-here" in ln), None), 10,
                    "the call's log line")
    assert "from 127.0.0.1" in line and " 40" in line
    assert "Bearer" not in line and "wrong-token" not in line


def test_the_server_still_answers(bridge):
    status, _, body = get(bridge, "/healthz")
    assert (status, json.loads(body)) == (200, {"status": "alive"})
    assert not any(t in bridge.log() for t in ("Traceback", "Exception in ASGI"))
    assert Path(bridge.config_path).exists()
