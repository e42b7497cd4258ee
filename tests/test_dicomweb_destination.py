"""``type: dicomweb``: STOW-RS from the bridge to a real Orthanc (with its DICOMweb plugin)
and, only for answers Orthanc cannot give, to the fake server in tests/fakestow.py.

Instances go in as a modality sends them (DCMTK storescu to the bridge, a subprocess);
what arrived is asked of Orthanc's REST API; what the bridge decided is read from its
queue database.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import forkserver
import numpy as np
import pydicom
import pytest
from corpus import ct_series
from fakestow import FakeStow, Request, form, response, stored
from peers import Bridge, free_port, storescu, wait_for
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from test_store import PROPOSE

from bridge.config import DicomwebDestination as DicomwebConfig
from bridge.destinations.dicomweb import DicomwebDestination
from bridge.errors import UpstreamMisconfigured, UpstreamUnavailable
from bridge.model import Done, Duplicate, Permanent, SpooledInstance, Transient, Warning

# -- helpers ---------------------------------------------------------------------------


def config(url: str, **destination: Any) -> dict[str, Any]:
    return {
        "ae_title": "BRIDGE",
        "destinations": {"web": {"type": "dicomweb", "url": url, **destination}},
        "rules": [{"name": "everything", "store": ["web"]}],
        "retry": {"initial": "1s", "max": "2s"},
    }


def rows(bridge: Bridge) -> dict[str, tuple[str, int, str]]:
    """SOP Instance UID -> (state, attempts, last error) of the web destination's rows."""
    return {r["sop_instance_uid"]: (r["state"], r["attempts"], r["last_error"] or "")
            for r in bridge.queue_rows("web")}


def settled(bridge: Bridge, count: int) -> dict[str, tuple[str, int, str]]:
    """The rows once ``count`` of them are done or dead (none pending any more)."""
    def check() -> dict[str, tuple[str, int, str]] | None:
        found = rows(bridge)
        finished = [r for r in found.values() if r[0] in ("done", "dead")]
        return found if len(finished) >= count else None

    return wait_for(check, 90, f"{count} rows done or dead")


def uid_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def send(bridge: Bridge, files: list[Path]) -> None:
    result = storescu(bridge.port, files)
    assert result.statuses == [0] * len(files), result.output[-2000:]


def spooled(path: Path) -> SpooledInstance:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return SpooledInstance(
        spool_path=path, size=path.stat().st_size, sha256="", sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=str(ds.SOPInstanceUID), study_uid=str(ds.StudyInstanceUID),
        series_uid=str(ds.SeriesInstanceUID), transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
        calling_ae="TEST", called_ae="BRIDGE", peer="127.0.0.1", received_at=datetime.now(UTC),
    )


def destination(url: str, tmp_path: Path, **settings: Any) -> DicomwebDestination:
    """The destination itself, as a delivery worker uses it (open, send, close)."""
    return DicomwebDestination("web", DicomwebConfig.model_validate({"type": "dicomweb", "url": url, **settings}),
                               tmp_path / "temp")


# -- Orthanc ---------------------------------------------------------------------------


@pytest.mark.slow
def test_a_hundred_mixed_instances_reach_orthanc_by_stow_and_by_c_store(tmp_path, corpus, orthanc_factory,
                                                                         bridge_factory):
    """Fan-out: every instance goes to one Orthanc by STOW-RS and to another by C-STORE."""
    web, pacs = orthanc_factory("web"), orthanc_factory("pacs", aet="PACS")
    settings = config(web.dicomweb, workers=2)
    settings["nodes"] = {"PACS": {"host": "127.0.0.1", "port": pacs.dicom_port}}
    settings["destinations"]["pacs"] = {"type": "dimse", "node": "PACS"}
    settings["rules"] = [{"name": "everything", "store": ["web", "pacs"]}]
    bridge = bridge_factory(settings)
    files = [*corpus, *ct_series(tmp_path / "ct", 100 - len(corpus), size=128)]
    assert len(files) == 100
    by_syntax: dict[str, list[Path]] = defaultdict(list)
    for path in files:
        by_syntax[str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)].append(path)
    for ts, group in by_syntax.items():
        result = storescu(bridge.port, group, extra=["-R", PROPOSE[ts]])
        assert result.statuses == [0] * len(group), f"{ts}:\n{result.output[-2000:]}"

    for orthanc in (web, pacs):
        wait_for(lambda o=orthanc: o.count() >= 100, 120, f"{orthanc.aet} to hold 100 instances")
        held = orthanc.instance_uids()
        assert set(held) == {uid_of(p) for p in files}
        for path in files:
            original = pydicom.dcmread(path)
            got = pydicom.dcmread(io.BytesIO(orthanc.get_bytes(f"/instances/{held[original.SOPInstanceUID]}/file")))
            assert got.SOPClassUID == original.SOPClassUID
            assert got.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID, (orthanc.aet, path.name)
            if "PixelData" in original:
                assert got.PixelData == original.PixelData, (orthanc.aet, path.name)
    wait_for(lambda: bridge.queue_states() == {"done": 200}, 30, "every row done")
    assert "WARNING" not in bridge.log() and "ERROR" not in bridge.log(), bridge.log()[-3000:]


def test_a_rule_s_modification_is_what_orthanc_receives(tmp_path, orthanc_factory, bridge_factory):
    pytest.importorskip("bridge.routing.modify")
    orthanc = orthanc_factory()
    settings = config(orthanc.dicomweb)
    settings["rules"][0]["modify"] = {"web": {"set": {"InstitutionName": "Main Hospital"},
                                              "remove": ["PatientName"]}}
    bridge = bridge_factory(settings)
    files = ct_series(tmp_path / "ct", 3)
    send(bridge, files)
    wait_for(lambda: orthanc.count() == 3, 60, "Orthanc to hold 3 instances")
    for uid, orthanc_id in orthanc.instance_uids().items():
        got = pydicom.dcmread(io.BytesIO(orthanc.get_bytes(f"/instances/{orthanc_id}/file")))
        original = pydicom.dcmread(next(p for p in files if uid_of(p) == uid))
        assert got.InstitutionName == "Main Hospital" and "PatientName" not in got
        assert got.PixelData == original.PixelData
    assert not list((bridge.data_dir / "spool" / "incoming").iterdir()), "temporary copies are removed"


def test_orthanc_s_answers_duplicates_and_a_part_it_cannot_read(tmp_path, orthanc_factory):
    """Orthanc answers 200 for instances it holds already, and 400 for a whole request
    with one unreadable part while it stores (and lists) the others."""
    orthanc = orthanc_factory()
    good = ct_series(tmp_path / "ct", 3)
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(good[0].read_bytes()[:132] + os.urandom(2000))  # a preamble and DICM, then noise
    web = destination(orthanc.dicomweb, tmp_path)
    web.open()
    try:
        batch = [spooled(good[0]), SpooledInstance(**{**spooled(good[2]).__dict__, "spool_path": bad,
                                                      "size": bad.stat().st_size,
                                                      "sop_instance_uid": generate_uid()}),
                 spooled(good[1])]
        outcomes = web.send(batch)
        assert isinstance(outcomes[0], Done) and isinstance(outcomes[2], Done), outcomes
        assert isinstance(outcomes[1], Permanent) and "HTTP 400" in outcomes[1].reason, outcomes
        assert set(orthanc.instance_uids()) == {uid_of(good[0]), uid_of(good[1])}
        again = web.send([spooled(good[0]), spooled(good[1]), spooled(good[2])])
        assert [type(o) for o in again] == [Done, Done, Done]
        assert set(orthanc.instance_uids()) == {uid_of(p) for p in good}
    finally:
        web.close()


def test_basic_auth_against_orthanc(tmp_path, orthanc_factory, bridge_factory):
    orthanc = orthanc_factory(users={"bridge": "correct horse"})
    secret = tmp_path / "password"
    secret.write_text("correct horse\n")
    bridge = bridge_factory(config(orthanc.dicomweb, auth={"type": "basic", "username": "bridge",
                                                           "password_file": str(secret)}))
    files = ct_series(tmp_path / "ct", 5)
    send(bridge, files)
    wait_for(lambda: orthanc.count() == 5, 60, "Orthanc to hold 5 instances")
    assert set(orthanc.instance_uids()) == {uid_of(p) for p in files}


def test_a_wrong_password_suspends_the_destination_and_is_never_logged(tmp_path, orthanc_factory,
                                                                       bridge_factory, monkeypatch):
    orthanc = orthanc_factory(users={"bridge": "correct horse"})
    wrong = "Tr0ub4dor&3-wrong"
    bridge = bridge_factory(config(orthanc.dicomweb, auth={"type": "basic", "username": "bridge",
                                                           "password": "env:WEB_PASSWORD"}), start=False)
    monkeypatch.setenv("WEB_PASSWORD", wrong)
    bridge.start()
    files = ct_series(tmp_path / "ct", 4)
    send(bridge, files)
    wait_for(lambda: bridge.destination_state("web")[0] == "suspended", 60, "the destination to be suspended")
    state, reason = bridge.destination_state("web")
    assert "HTTP 401" in reason, reason
    found = rows(bridge)
    assert len(found) == 4 and all(r[0] == "pending" and r[1] == 0 for r in found.values()), found
    assert orthanc.count() == 0
    bridge.stop()
    everything = bridge.log() + repr(found) + reason
    assert "destination web suspended" in bridge.log()
    assert wrong not in everything
    import base64
    assert base64.b64encode(f"bridge:{wrong}".encode()).decode() not in everything


# The filter reads the token every time, so a test can renew it as a token service would.
TOKEN_FILTER = """
function IncomingHttpRequestFilter(method, uri, ip, username, httpHeaders)
  local f = io.open('{path}', 'r')
  if f == nil then return false end
  local token = f:read('*a')
  f:close()
  return httpHeaders['authorization'] == 'Bearer ' .. token
end
"""


def test_a_bearer_token_from_a_file_is_read_again_when_it_changes(tmp_path, orthanc_factory, bridge_factory):
    accepted = tmp_path / "accepted-token"  # what Orthanc's Lua filter accepts
    accepted.write_text("token-one")
    orthanc = orthanc_factory(lua=TOKEN_FILTER.replace("{path}", str(accepted)),
                              headers={"Authorization": "Bearer token-one"})
    token = tmp_path / "token"
    token.write_text("token-one\n")
    bridge = bridge_factory(config(orthanc.dicomweb, auth={"type": "bearer", "token_file": str(token)}))
    first = ct_series(tmp_path / "one", 3)
    send(bridge, first)
    wait_for(lambda: orthanc.count() == 3, 60, "the first three instances")

    accepted.write_text("token-two")  # renewed by some other process: the bridge reads the file again
    orthanc.headers["Authorization"] = "Bearer token-two"
    token.write_text("token-two\n")
    second = ct_series(tmp_path / "two", 3)
    send(bridge, second)
    wait_for(lambda: orthanc.count() == 6, 60, "the next three instances")
    assert bridge.destination_state("web")[0] == "up"
    assert set(orthanc.instance_uids()) == {uid_of(p) for p in first + second}


def test_oauth2_client_credentials_renewed_before_they_expire(tmp_path, orthanc_factory, bridge_factory):
    """A fake token endpoint issues tokens of two seconds, each the only one Orthanc's Lua
    filter accepts: the bridge asks for a new one before the next batch."""
    accepted = tmp_path / "accepted-token"
    accepted.write_text("none yet")
    orthanc = orthanc_factory(lua=TOKEN_FILTER.replace("{path}", str(accepted)))
    issued: list[dict[str, str]] = []

    def token(request: Request) -> tuple[int, dict[str, str], Any]:
        issued.append({"authorization": request.headers.get("authorization", ""), **form(request)})
        value = f"token-{len(issued)}"
        accepted.write_text(value)
        orthanc.headers["Authorization"] = f"Bearer {value}"
        return 200, {"Content-Type": "application/json"}, {"access_token": value, "token_type": "Bearer",
                                                           "expires_in": 2}

    secret = tmp_path / "client-secret"
    secret.write_text("s3cr3t")
    with FakeStow() as endpoint:
        endpoint.token_answer = token
        bridge = bridge_factory(config(orthanc.dicomweb, auth={
            "type": "oauth2", "token_url": endpoint.url + "/token", "client_id": "bridge",
            "client_secret_file": str(secret), "scope": "stow"}))

        def count() -> int:
            try:
                return orthanc.count()
            except urllib.error.HTTPError:  # the token changed under the test's feet
                return -1

        send(bridge, ct_series(tmp_path / "one", 2))
        wait_for(lambda: count() == 2, 60, "the first two instances")
        time.sleep(2.0)  # the token's lifetime: the next batch needs a new one
        send(bridge, ct_series(tmp_path / "two", 2))
        wait_for(lambda: count() == 4, 60, "the next two instances")
    assert len(issued) >= 2
    import base64
    assert issued[0]["authorization"] == "Basic " + base64.b64encode(b"bridge:s3cr3t").decode()
    assert issued[0]["grant_type"] == "client_credentials" and issued[0]["scope"] == "stow"
    assert "s3cr3t" not in bridge.log()


# -- answers only the fake server gives --------------------------------------------------


def test_a_401_renews_the_token_once_then_suspends(tmp_path, monkeypatch):
    files = ct_series(tmp_path / "ct", 1)
    issued: list[str] = []
    valid = {"token": ""}

    def token(request: Request) -> tuple[int, dict[str, str], Any]:
        issued.append(f"token-{len(issued) + 1}")
        valid["token"] = issued[-1]
        return 200, {}, {"access_token": issued[-1], "token_type": "Bearer", "expires_in": 3600}

    def stow(request: Request) -> tuple[int, dict[str, str], Any]:
        if request.headers.get("authorization") != f"Bearer {valid['token']}":
            return 401, {"WWW-Authenticate": "Bearer"}, None
        return 200, {}, stored(request.uids)

    with FakeStow() as fake:
        fake.token_answer, fake.answer = token, stow
        monkeypatch.setenv("WEB_CLIENT_SECRET", "s3cr3t")
        web = destination(fake.url, tmp_path, auth={
            "type": "oauth2", "token_url": fake.url + "/token", "client_id": "bridge",
            "client_secret": "env:WEB_CLIENT_SECRET", "client_auth": "post"})
        assert [type(o) for o in web.send([spooled(files[0])])] == [Done]
        valid["token"] = "revoked"  # the server forgets the token: 401, a new token, sent again
        assert [type(o) for o in web.send([spooled(files[0])])] == [Done]
        assert issued == ["token-1", "token-2"]
        fake.answer = lambda r: (401, {}, None)
        with pytest.raises(UpstreamMisconfigured, match="HTTP 401"):
            web.send([spooled(files[0])])
        assert len(issued) == 3, "one renewal per 401, not a loop"
        tokens = [r for r in fake.requests if r.path.endswith("/token")]
        assert form(tokens[0]) == {"grant_type": "client_credentials", "client_id": "bridge",
                                   "client_secret": "s3cr3t"}


def test_failed_sop_sequence_409_duplicates_and_bisection(tmp_path, bridge_factory):
    """In one batch of eight: one instance listed in FailedSOPSequence with 0xC000 (dead),
    one with 0xA700 (retried), one with a WarningReason (done); then a 409 with 0x0111
    (duplicate: done), and a 400 for whole requests because of one instance: split until
    only that one is dead. ``queue retry`` sends the two dead ones again."""
    files = ct_series(tmp_path / "ct", 8)
    uids = [uid_of(p) for p in files]
    cannot, busy, warned, dup, poison = uids[1], uids[2], uids[3], uids[4], uids[6]
    tries: dict[str, int] = defaultdict(int)
    fixed = threading.Event()  # the server is mended: it takes everything

    def answer(request: Request) -> tuple[int, dict[str, str], Any]:
        for uid in request.uids:
            tries[uid] += 1
        if fixed.is_set():
            return 200, {}, stored(request.uids)
        if poison in request.uids:
            return 400, {"Content-Type": "text/plain"}, None
        if request.uids == [dup]:
            return 409, {}, response(failed={dup: 0x0111})
        failed = {u: code for u, code in ((cannot, 0xC000), (busy, 0xA700)) if u in request.uids}
        if busy in failed and tries[busy] > 1:
            del failed[busy]
        ok = [u for u in request.uids if u not in failed and u != dup]
        if dup in request.uids:
            failed[dup] = 0x0111
        return (202 if failed else 200), {}, response(ok, failed, {warned: 0xB000} if warned in ok else None)

    with FakeStow() as fake:
        fake.answer = answer
        bridge = bridge_factory(config(fake.url, batch={"max_instances": 8, "linger": "2s"}))
        send(bridge, files)
        found = settled(bridge, 8)
        fixed.set()
        retry = forkserver.run(["queue", "retry", "--config", str(bridge.config_path), "--destination", "web"],
                               timeout=60)
        assert retry.returncode == 0 and "retried 2 dead row(s)" in retry.stdout, retry.stdout + retry.stderr
        wait_for(lambda: bridge.queue_states() == {"done": 8}, 60, "the retried rows to be delivered")
    states = {uid: r[0] for uid, r in found.items()}
    assert states[cannot] == "dead" and "0xC000" in found[cannot][2]
    assert states[poison] == "dead" and "HTTP 400" in found[poison][2]
    assert {u: s for u, s in states.items() if u not in (cannot, poison)} == dict.fromkeys(
        [u for u in uids if u not in (cannot, poison)], "done")
    assert found[busy][1] == 1, "0xA700 is charged to its row once, then it is done"
    first = fake.stow_requests()[0]
    assert sorted(first.uids) == sorted(uids), "one request for the whole batch"
    assert not first.chunked and int(first.headers["content-length"]) > 0
    assert tries[poison] <= 5, "the bad instance is found by halving, not one request per instance"


def test_destination_level_answers(tmp_path):
    """429 with Retry-After, 503, a timeout, 404 on the base URL, 403, a redirect: the
    destination backs off or is suspended; no outcome is charged to an instance."""
    files = ct_series(tmp_path / "ct", 2)
    batch = [spooled(p) for p in files]
    with FakeStow() as fake:
        web = destination(fake.url, tmp_path, timeouts={"read": "1s"})
        for status, headers, error, needle in [
            (429, {"Retry-After": "7"}, UpstreamUnavailable, "HTTP 429"),
            (503, {}, UpstreamUnavailable, "HTTP 503"),
            (404, {}, UpstreamMisconfigured, "is url the DICOMweb base URL"),
            (403, {}, UpstreamMisconfigured, "HTTP 403"),
            (307, {"Location": "https://elsewhere/"}, UpstreamMisconfigured, "redirected"),
        ]:
            fake.answer = lambda r, s=status, h=headers: (s, h, None)
            with pytest.raises(error) as raised:
                web.send(batch)
            assert needle in str(raised.value)
            if status == 429:
                assert raised.value.retry_after == 7  # type: ignore[attr-defined]

        def slow(request: Request) -> tuple[int, dict[str, str], Any]:
            time.sleep(2)
            return 200, {}, stored(request.uids)

        fake.answer = slow
        with pytest.raises(UpstreamUnavailable, match="ReadTimeout"):
            web.send(batch)
        web.close()
    port = fake.server.server_address[1]
    with pytest.raises(UpstreamUnavailable, match="ConnectionError"):
        destination(f"http://127.0.0.1:{port}/dicom-web", tmp_path).send(batch)


def test_what_the_status_decides_for_instances_the_body_does_not_list(tmp_path):
    """Orthanc answers 200 with both sequences empty when its storage is full: retried.
    Without a list, 200 is done and a lone 409 a duplicate; a warning is a warning; a
    refusal (0x0124) of every instance suspends the destination."""
    files = ct_series(tmp_path / "ct", 2)
    with FakeStow() as fake:
        fake.answer = lambda r: (200, {}, stored(r.uids[:1]))
        outcomes = destination(fake.url, tmp_path).send([spooled(p) for p in files])
        assert isinstance(outcomes[0], Done) and isinstance(outcomes[1], Transient), outcomes
        fake.answer = lambda r: (200, {"Content-Type": "text/plain"}, None)  # no list at all: the status says
        assert [type(o) for o in destination(fake.url, tmp_path).send([spooled(p) for p in files])] == [Done, Done]
        fake.answer = lambda r: (409, {}, None)
        assert [type(o) for o in destination(fake.url, tmp_path).send([spooled(files[0])])] == [Duplicate]
        fake.answer = lambda r: (202, {}, response(r.uids, warnings={r.uids[0]: 0xB006}))
        assert isinstance(destination(fake.url, tmp_path).send([spooled(files[0])])[0], Warning)
        fake.answer = lambda r: (409, {}, response(failed=dict.fromkeys(r.uids, 0x0124)))
        with pytest.raises(UpstreamMisconfigured, match="refused every instance"):
            destination(fake.url, tmp_path).send([spooled(p) for p in files])


def test_tls_is_verified_unless_a_ca_bundle_says_whom_to_trust(tmp_path):
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key),
                    "-out", str(cert)], check=True, capture_output=True)
    files = ct_series(tmp_path / "ct", 1)
    with FakeStow(certificate=(cert, key)) as fake:
        with pytest.raises(UpstreamMisconfigured, match="TLS verification failed"):
            destination(fake.url, tmp_path).send([spooled(files[0])])
        web = destination(fake.url, tmp_path, tls={"ca_bundle": str(cert)})
        assert [type(o) for o in web.send([spooled(files[0])])] == [Done]


def self_signed(tmp_path: Path, name: str) -> tuple[Path, Path]:
    cert, key = tmp_path / f"{name}-cert.pem", tmp_path / f"{name}-key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    f"/CN={name}", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key),
                    "-out", str(cert)], check=True, capture_output=True)
    return cert, key


def test_a_client_certificate_gets_through_mutual_tls_and_a_refused_one_suspends(tmp_path):
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed")
    server, client = self_signed(tmp_path, "127.0.0.1"), self_signed(tmp_path, "bridge")
    stranger = self_signed(tmp_path, "stranger")  # a certificate the server's CA did not sign
    files = ct_series(tmp_path / "ct", 1)
    tls = {"ca_bundle": str(server[0])}
    # A TLS server that requires a client certificate signed by `client` (OpenSSL's own,
    # which sends the alerts a production server sends).
    port = free_port()
    s_server = subprocess.Popen(
        ["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-cert", str(server[0]), "-key", str(server[1]),
         "-Verify", "1", "-CAfile", str(client[0]), "-verify_return_error", "-www", "-quiet"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        def listening() -> bool:
            with socket.socket() as probe:
                return probe.connect_ex(("127.0.0.1", port)) == 0

        wait_for(listening, 10, "openssl s_server to listen")
        url = f"https://127.0.0.1:{port}/dicom-web"
        for refused in ({}, {"client_cert": str(stranger[0]), "client_key": str(stranger[1])}):
            with pytest.raises(UpstreamMisconfigured, match="refused our TLS client certificate"):
                destination(url, tmp_path, tls={**tls, **refused}).send([spooled(files[0])])
    finally:
        s_server.kill()
        s_server.wait()
    with FakeStow(certificate=server, client_ca=client[0]) as fake:
        web = destination(fake.url, tmp_path, tls={**tls, "client_cert": str(client[0]), "client_key": str(client[1])})
        assert [type(o) for o in web.send([spooled(files[0])])] == [Done]
    assert fake.uids_received() == {uid_of(files[0])}


# -- a 1 GB instance ---------------------------------------------------------------------


def big_multiframe(path: Path, frames: int, rows: int = 512, columns: int = 512) -> tuple[Path, list[int]]:
    """An uncompressed multi-frame instance of ``frames`` 16-bit frames, written without
    holding its pixels in memory; frame n is filled with n's pattern. Returns the path and
    the frame numbers whose content a test can check."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7.3"  # Multi-frame Grayscale Word SC
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality = "Big^Instance", "BIG", "OT"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, columns, frames
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.save_as(path, enforce_file_format=True)
    frame_bytes = rows * columns * 2
    base = frame(0, rows, columns)
    with open(path, "ab") as f:
        f.write(b"\xe0\x7f\x10\x00OW\x00\x00" + (frame_bytes * frames).to_bytes(4, "little"))
        for n in range(frames):
            f.write(base + np.uint16(n))  # frame(n): 16-bit sums wrap around as its mask does
    return path, [0, frames // 2, frames - 1]


def frame(n: int, rows: int = 512, columns: int = 512) -> np.ndarray:
    """Frame ``n`` of ``big_multiframe``'s instance: its 16-bit little endian pixels."""
    return ((np.arange(rows * columns, dtype=np.uint32) * 7 + n) & 0xFFFF).astype("<u2")


def peak_rss(pid: int) -> int:
    """VmHWM (the resident set's high-water mark) of ``pid``, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def _free_disk(path: Path) -> int:
    return shutil.disk_usage(path).free


@pytest.mark.slow
@pytest.mark.skipif(_free_disk(Path(os.environ.get("TMPDIR", "/tmp"))) < 3 << 30,
                    reason="needs 3 GB of free disk: the file, the spool copy, Orthanc's copy")
def test_a_1gb_instance_goes_through_in_bounded_memory(tmp_path, orthanc_factory, bridge_factory):
    orthanc = orthanc_factory()
    bridge = bridge_factory(config(orthanc.dicomweb, timeouts={"read": "10m"}))
    frames = (1 << 30) // (512 * 512 * 2)  # 2048 frames of 512 KiB
    path, checked = big_multiframe(tmp_path / "big.dcm", frames)
    uid = uid_of(path)
    assert bridge.proc is not None
    peak = [0]
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], peak_rss(bridge.proc.pid))  # type: ignore[union-attr]
            stop.wait(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        send(bridge, [path])
        path.unlink()  # the disk it held is Orthanc's now
        wait_for(lambda: rows(bridge).get(uid, ("",))[0] == "done", 300, "the 1 GB instance to be delivered")
    finally:
        stop.set()
        watcher.join()
    peak[0] = max(peak[0], peak_rss(bridge.proc.pid))
    print(f"\nbridge peak RSS while forwarding 1 GiB: {peak[0] / 2**20:.0f} MiB", file=sys.stderr)
    assert peak[0] < 400 << 20, f"peak RSS {peak[0] / 2**20:.0f} MiB"
    orthanc_id = orthanc.instance_uids()[uid]
    assert int(orthanc.get(f"/instances/{orthanc_id}/simplified-tags")["NumberOfFrames"]) == frames
    for n in checked:
        assert orthanc.get_bytes(f"/instances/{orthanc_id}/frames/{n}/raw") == frame(n).tobytes(), f"frame {n}"
