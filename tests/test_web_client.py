"""The HTTP client that destinations and sources share (``bridge.web.client``), through its
public interface against the fake server of tests/fakestow.py: what a QIDO-RS or WADO-RS
source will see of it. STOW-RS through it is in test_dicomweb_destination.py."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest
from fakestow import FakeStow, Request

from bridge.config import HttpPeer
from bridge.errors import UpstreamMisconfigured, UpstreamUnavailable
from bridge.web.client import HttpClient


def client(url: str, **settings: Any) -> HttpClient:
    return HttpClient(HttpPeer.model_validate({"url": url, **settings}))


def test_a_query_and_what_each_status_means():
    study = {"0020000D": {"vr": "UI", "Value": ["1.2.3"]}}
    with FakeStow() as fake:
        fake.answer = lambda r: (200, {}, [study])
        web = client(fake.url)
        with web.request("GET", f"{web.url}/studies", params={"PatientID": "P 1"},
                         headers={"Accept": "application/dicom+json"}) as response:
            response.raise_for_upstream()
            assert response.status == 200 and json.loads(response.read(1 << 20)) == [study]
        asked = fake.requests[-1]
        assert asked.method == "GET" and asked.path == "/dicom-web/studies?PatientID=P+1"
        assert asked.headers["accept"] == "application/dicom+json" and asked.headers["user-agent"] == "dicom-bridge"

        later = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
        for status, headers, error, needle in [
            (503, {"Retry-After": later}, UpstreamUnavailable, "HTTP 503"),
            (429, {"Retry-After": "7"}, UpstreamUnavailable, "HTTP 429"),
            (403, {}, UpstreamMisconfigured, "HTTP 403"),
            (302, {"Location": "https://elsewhere/"}, UpstreamMisconfigured, "redirected"),
        ]:
            fake.answer = lambda r, s=status, h=headers: (s, h, b"the server says why")
            with web.request("GET", f"{web.url}/studies") as response, pytest.raises(error) as raised:
                response.raise_for_upstream(response.summary(response.read(1 << 20)))
            assert needle in str(raised.value) and "the server says why" in str(raised.value)
            if status == 503:
                assert 20 < raised.value.retry_after <= 30  # type: ignore[attr-defined]
            if status == 429:
                assert raised.value.retry_after == 7  # type: ignore[attr-defined]
        fake.answer = lambda r: (404, {}, None)  # an unknown study, or a wrong base URL: the caller knows which
        with web.request("GET", f"{web.url}/studies/1.2.3/metadata") as response:
            response.raise_for_upstream()
            assert response.status == 404
        web.close()


def test_a_401_renews_the_credentials_once_and_sends_the_body_again(tmp_path: Path):
    password = tmp_path / "password"
    password.write_text("old")
    bodies: list[Request] = []

    def answer(request: Request) -> tuple[int, dict[str, str], Any]:
        bodies.append(request)
        if request.headers.get("authorization") != "Basic dXNlcjpuZXc=":  # user:new
            password.write_text("new")  # renewed meanwhile, as a secret manager would
            return 401, {"WWW-Authenticate": "Basic"}, None
        return 200, {}, None

    with FakeStow() as fake:
        fake.answer = answer
        web = client(fake.url, auth={"type": "basic", "username": "user", "password_file": str(password)})
        with web.request("POST", f"{web.url}/token-less", body=b"payload",
                         headers={"Content-Type": "text/plain"}) as response:
            assert response.status == 200
        assert len(bodies) == 2
        password.write_text("old")
        web.close()
        web = client(fake.url, auth={"type": "basic", "username": "user", "password_file": str(password)})
        with web.request("OPTIONS", f"{web.url}/studies", retry=False) as response:  # as a probe asks
            assert response.status == 401
            with pytest.raises(UpstreamMisconfigured, match="HTTP 401"):
                response.raise_for_upstream()
        web.close()


def test_an_answer_that_breaks_off_and_a_server_that_is_gone(tmp_path: Path):
    with FakeStow() as fake:
        fake.answer = lambda r: (200, {"Content-Length": "100000"}, b"x" * 1000)
        web = client(fake.url)
        with web.request("GET", f"{web.url}/studies/1.2.3") as response, \
                pytest.raises(UpstreamUnavailable, match="reading the answer"):
            response.read(1 << 20)
        web.close()
    with pytest.raises(UpstreamUnavailable, match="ConnectionError"):
        web.request("GET", f"{fake.url}/studies")
    missing = client(fake.url, tls={"client_cert": str(tmp_path / "absent.pem")})
    with pytest.raises(UpstreamMisconfigured, match="absent.pem"):
        missing.request("GET", f"{fake.url}/studies")
