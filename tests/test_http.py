"""The daemon's HTTP server (bridge/api/), against a running daemon: what Prometheus,
a load balancer and an operator see of it. Metrics of a queue that fills while its
destination (DCMTK's storescp) is down and drains once it is back; /readyz with a full
spool and with a spool folder that cannot be written; the routes of docs/api.md; the
deprecated ``metrics:`` section; HTTPS with and without client certificates; and the
start refused for a token file that cannot be used.
"""

from __future__ import annotations

import http.client
import importlib.metadata
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from corpus import ct_series
from peers import REPO, Bridge, StoreSCP, fill, free_port, storescu, wait_for
from prometheus_client.parser import text_string_to_metric_families

TIMEOUT = 10  # seconds any one HTTP request may take


def http_config(port: int | None = None, **config: Any) -> dict[str, Any]:
    return {"http": {"host": "127.0.0.1", "port": port or free_port()}, **config}


def base_url(bridge: Bridge) -> str:
    return f"http://127.0.0.1:{bridge.config['http']['port']}"


def sample(url: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` in a scrape of ``url``/metrics whose labels
    include ``labels`` (0 when there is none)."""
    response = requests.get(f"{url}/metrics", timeout=TIMEOUT)
    assert response.status_code == 200
    return sum(s.value for family in text_string_to_metric_families(response.text) for s in family.samples
               if s.name == name and labels.items() <= s.labels.items())


def readyz(bridge: Bridge) -> tuple[int, dict[str, Any]]:
    response = requests.get(f"{base_url(bridge)}/readyz", timeout=TIMEOUT)
    return response.status_code, response.json()


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bridge", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


# -- metrics of a queue that fills and drains ------------------------------------------------------


def test_the_queue_fills_while_its_destination_is_down_and_drains_once_it_is_back(tmp_path, bridge_factory):
    pacs = StoreSCP(tmp_path / "pacs")  # its port chosen, nothing listening yet
    bridge = bridge_factory(http_config(
        nodes={"PACS": {"host": "127.0.0.1", "port": pacs.port, "ae_title": pacs.aet}},
        destinations={"pacs": {"type": "dimse", "node": "PACS"}},
        rules=[{"name": "all", "store": ["pacs"]}],
        retry={"initial": "1h", "max": "1h"},  # back only when resumed (or probed)
    ))
    url = base_url(bridge)

    def metric(name: str, **labels: str) -> Callable[[], float]:
        return lambda: sample(url, name, **labels)

    depth = metric("dicom_bridge_queue_depth", destination="pacs")
    oldest = metric("dicom_bridge_queue_oldest_pending_seconds", destination="pacs")
    done = metric("dicom_bridge_delivered_instances_total", destination="pacs", outcome="done")
    assert (depth(), oldest(), done()) == (0, 0, 0)  # published at start, before any image

    try:
        files = ct_series(tmp_path / "ct", 3)
        assert storescu(bridge.port, files).statuses == [0] * 3
        assert sample(url, "dicom_bridge_received_instances_total", calling_ae="STORESCU") == 3
        wait_for(lambda: metric("dicom_bridge_destination_state", destination="pacs", state="backing_off")() == 1,
                 15, "the destination to back off")
        assert sample(url, "dicom_bridge_destination_state", destination="pacs", state="up") == 0
        # The queue's gauges are refreshed by the housekeeping, every 5 s.
        wait_for(lambda: depth() == 3 and oldest() > 0, 15, "the queue depth and the oldest row's age")
        assert done() == 0

        pacs.start()
        resumed = cli("queue", "resume", "pacs", "--config", str(bridge.config_path))
        assert resumed.returncode == 0, resumed.stderr
        wait_for(lambda: done() == 3, 15, "three deliveries")
        wait_for(lambda: depth() == 0 and oldest() == 0, 15, "the queue to drain in the metrics")
        assert sample(url, "dicom_bridge_destination_state", destination="pacs", state="up") == 1
        assert sample(url, "dicom_bridge_destination_state", destination="pacs", state="backing_off") == 0
        assert len(pacs.files()) == 3
    finally:
        pacs.stop()


# -- readiness ----------------------------------------------------------------------------------------


def folder_destination(tmp_path: Path) -> dict[str, Any]:
    return {"destinations": {"out": {"type": "folder", "path": f"{tmp_path}/out/{{SeriesInstanceUID}}"}},
            "rules": [{"name": "all", "store": ["out"]}]}


def test_ready_and_not_when_the_spool_folder_cannot_be_written(tmp_path, bridge_factory):
    bridge = bridge_factory(http_config(**folder_destination(tmp_path)))
    status, body = readyz(bridge)
    assert status == 200, body
    assert body["ready"] is True
    assert set(body["checks"]) == {"listening", "queue", "spool"}
    assert all(check["ok"] for check in body["checks"].values()), body
    assert str(bridge.port) in body["checks"]["listening"]["detail"]

    # Root writes anywhere: a plain file in the folder's place is what stops it.
    incoming = bridge.data_dir / "spool" / "incoming"
    shutil.rmtree(incoming)
    incoming.write_text("not a folder")
    try:
        status, body = readyz(bridge)
        assert status == 503, body
        assert body["ready"] is False
        spool = body["checks"]["spool"]
        assert spool["ok"] is False
        assert str(incoming) in spool["detail"] and "not writable" in spool["detail"]
        assert body["checks"]["listening"]["ok"] and body["checks"]["queue"]["ok"]
    finally:
        incoming.unlink()
        incoming.mkdir()
    status, body = readyz(bridge)
    assert status == 200 and body["checks"]["spool"]["ok"], body


def test_not_ready_while_the_spool_has_less_than_min_free(tmp_path, tmpfs_factory, bridge_factory):
    disk = tmpfs_factory("spool-disk", "8m")
    bridge = bridge_factory(http_config(data_dir=str(disk / "data"), spool={"min_free": "3MiB"},
                                        **folder_destination(tmp_path)))
    assert readyz(bridge)[0] == 200
    filler = fill(disk, 1 << 20)
    status, body = readyz(bridge)
    assert status == 503, body
    spool = body["checks"]["spool"]
    assert spool["ok"] is False
    assert "below spool.min_free (3.0 MiB)" in spool["detail"] and "0xA700" in spool["detail"]
    filler.unlink()
    status, body = readyz(bridge)
    assert status == 200, body
    assert "free (spool.min_free 3.0 MiB)" in body["checks"]["spool"]["detail"]


# -- the routes -------------------------------------------------------------------------------------


def test_health_version_docs_body_limit_and_a_served_static_tree(tmp_path, bridge_factory):
    bridge = bridge_factory(http_config(
        destinations={"viewer": {"type": "static", "path": str(tmp_path / "tree"), "serve": "/static/x"}},
        rules=[{"name": "all", "store": ["viewer"]}],
    ))
    url = base_url(bridge)

    alive = requests.get(f"{url}/healthz", timeout=TIMEOUT)
    assert alive.status_code == 200 and alive.json() == {"status": "alive"}

    versions = requests.get(f"{url}/version", timeout=TIMEOUT).json()
    assert versions["dicom-bridge"] == importlib.metadata.version("dicom-bridge")
    assert versions["pynetdicom"] == importlib.metadata.version("pynetdicom")

    page = requests.get(f"{url}/docs", timeout=TIMEOUT)
    assert page.status_code == 200 and "text/html" in page.headers["Content-Type"]
    document = requests.get(f"{url}/openapi.json", timeout=TIMEOUT).json()
    assert document["info"]["title"] == "dicom-bridge"
    assert {"/healthz", "/readyz", "/metrics", "/version"} <= set(document["paths"])

    # A body declared larger than 1 MiB is refused before it is sent (as curl does, with
    # Expect: 100-continue): the daemon answers at once and reads none of it.
    connection = http.client.HTTPConnection("127.0.0.1", bridge.config["http"]["port"], timeout=TIMEOUT)
    try:
        connection.putrequest("POST", "/api/query")
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Content-Length", str((1 << 20) + 1))
        connection.putheader("Expect", "100-continue")
        connection.endheaders()
        answer = connection.getresponse()
        assert answer.status == 413
        assert b"at most 1048576 bytes" in answer.read()
    finally:
        connection.close()

    [image] = ct_series(tmp_path / "ct", 1)
    study = str(pydicom.dcmread(image, stop_before_pixels=True).StudyInstanceUID)
    assert storescu(bridge.port, [image]).statuses == [0]

    def studies() -> list[Any]:
        response = requests.get(f"{url}/static/x/studies", timeout=TIMEOUT)
        return response.json() if response.status_code == 200 else []

    listed = wait_for(studies, 15, "the study in the served tree")
    assert [s["0020000D"]["Value"] for s in listed] == [[study]]
    assert requests.get(f"{url}/static/x/studies/{study}/series", timeout=TIMEOUT).status_code == 200


def test_the_deprecated_metrics_section_serves_metrics_and_check_says_so(tmp_path, bridge_factory):
    port = free_port()
    bridge = bridge_factory({"metrics": {"host": "127.0.0.1", "port": port}, **folder_destination(tmp_path)})
    response = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=TIMEOUT)
    assert response.status_code == 200 and "dicom_bridge_queue_depth" in response.text
    checked = cli("check", "--config", str(bridge.config_path))
    assert checked.returncode == 0, checked.stderr
    assert "note: metrics is deprecated: read as http" in checked.stdout

    bridge.config["http"] = {"port": free_port()}
    bridge.write_config()
    both = cli("check", "--config", str(bridge.config_path))
    assert both.returncode == 1
    assert "metrics: replaced by http, which is set" in both.stderr


# -- HTTPS ------------------------------------------------------------------------------------------


def _pki_with_cryptography(folder: Path) -> None:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def issue(name: str, issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
              extensions: list[tuple[x509.ExtensionType, bool]]) -> tuple[x509.Name, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        issuer_name, issuer_key = issuer or (subject, key)
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                                  False))
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical)
        certificate = builder.sign(issuer_key, hashes.SHA256())
        (folder / f"{name}.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        (folder / f"{name}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        return subject, key

    def usage(ca: bool) -> x509.KeyUsage:
        return x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                             data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
                             encipher_only=False, decipher_only=False)

    ca = issue("ca", None, [(x509.BasicConstraints(ca=True, path_length=None), True), (usage(True), True)])
    leaf = [(x509.BasicConstraints(ca=False, path_length=None), True), (usage(False), True)]
    issue("server", ca, [*leaf, (x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                 False), (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)])
    issue("client", ca, [*leaf, (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)])


def _pki_with_openssl(folder: Path) -> None:
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=60)

    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    openssl("req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=ca")
    for name, extensions in (("server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"),
                             ("client", "extendedKeyUsage=clientAuth\n")):
        (folder / f"{name}.ext").write_text(extensions)
        openssl("req", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-days", "1", "-out", f"{name}.pem", "-extfile", f"{name}.ext")


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    """A CA (ca.pem), and the server's and a client's certificates it signed ({server,client}.{pem,key})."""
    folder = tmp_path / "pki"
    folder.mkdir()
    try:
        import cryptography  # noqa: F401
    except ImportError:
        if shutil.which("openssl") is None:
            pytest.skip("neither the cryptography package nor openssl is installed: no certificates to test with")
        _pki_with_openssl(folder)
    else:
        _pki_with_cryptography(folder)
    return folder


def test_https_and_client_certificates(tmp_path, pki, bridge_factory):
    tls = {"cert_file": str(pki / "server.pem"), "key_file": str(pki / "server.key")}
    plain_tls = bridge_factory({"http": {"host": "127.0.0.1", "port": free_port(), "tls": tls},
                                **folder_destination(tmp_path)}, name="tls")
    mutual = bridge_factory({"http": {"host": "127.0.0.1", "port": free_port(),
                                      "tls": {**tls, "client_ca_file": str(pki / "ca.pem")}},
                             **folder_destination(tmp_path)}, name="mutual")
    ca = str(pki / "ca.pem")
    client = (str(pki / "client.pem"), str(pki / "client.key"))

    def url(bridge: Bridge) -> str:
        return f"https://127.0.0.1:{bridge.config['http']['port']}/healthz"

    served = requests.get(url(plain_tls), verify=ca, timeout=TIMEOUT)
    assert served.status_code == 200 and served.json() == {"status": "alive"}
    with pytest.raises(requests.exceptions.ConnectionError):  # plain HTTP gets no answer from a TLS port
        requests.get(url(plain_tls).replace("https:", "http:"), timeout=TIMEOUT)

    with pytest.raises(requests.exceptions.ConnectionError):  # an SSLError, or the connection reset
        requests.get(url(mutual), verify=ca, timeout=TIMEOUT)
    with_certificate = requests.get(url(mutual), verify=ca, cert=client, timeout=TIMEOUT)
    assert with_certificate.status_code == 200


# -- a token file that cannot be used -----------------------------------------------------------------


@pytest.mark.parametrize(("content", "reason"), [
    (None, "no such file"),
    ("ops tooshort\n", "a token is at least 16 printable ASCII characters"),
])
def test_a_token_file_that_cannot_be_used_refuses_the_start(tmp_path, bridge_factory, content, reason):
    token_file = tmp_path / "tokens"
    if content is not None:
        token_file.write_text(content)
        token_file.chmod(0o600)
    config = http_config(**folder_destination(tmp_path))
    config["http"]["token_file"] = str(token_file)
    bridge = bridge_factory(config, start=False)
    result = cli("run", "--config", str(bridge.config_path), timeout=30)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert f"cannot start: http.token_file {token_file}" in output and reason in output
    assert "Traceback" not in output
