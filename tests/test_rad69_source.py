"""The ``rad69`` source through its public interface: its configuration and ``check``'s
cross-references, and ``retrieve`` against a loopback HTTP server answering canned
RAD-69 bodies (the full fake Imaging Document Source is tests/fakeids.py's)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from peers import free_port
from pydicom.uid import ImplicitVRLittleEndian, generate_uid
from test_rad69_wire import SERIES, STUDY, document_response, envelope, include, mtom, part10

from bridge.config import Config, ConfigError, validate
from bridge.errors import UpstreamMisconfigured, UpstreamUnavailable
from bridge.metrics import Metrics
from bridge.model import InstanceRef, Retrieved
from bridge.sources import build
from bridge.sources import rad69_wire as wire
from bridge.sources.rad69 import Rad69Source

Answer = Callable[[BaseHTTPRequestHandler, bytes], None]


@pytest.fixture
def server() -> Iterator[tuple[str, list[Answer], list[bytes]]]:
    """A loopback server: each POST answered by the first of ``answers`` (popped; the last
    one stays), its request bodies kept."""
    answers: list[Answer] = []
    bodies: list[bytes] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers["Content-Length"]))
            bodies.append(body)
            answer = answers.pop(0) if len(answers) > 1 else answers[0]
            answer(self, body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/ids", answers, bodies
    httpd.shutdown()
    httpd.server_close()


def send(status: int, content_type: str, body: bytes, cut: int | None = None) -> Answer:
    def answer(handler: BaseHTTPRequestHandler, _: bytes) -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body[:cut])
        if cut is not None:
            handler.wfile.flush()
            handler.close_connection = True
    return answer


def raw(url: str, tmp_path: Path, **settings: Any) -> Config:
    return validate({
        "data_dir": str(tmp_path / "data"),
        "destinations": {"archive": {"type": "archive"}},
        "sources": {"ids": {"type": "rad69", "url": url, "repository_unique_id": "1.2.3.99", "locate": "local",
                            "retrieve_timeout": "3s", **settings}},
        "rules": [{"name": "r", "store": ["archive"], "find": ["local"], "retrieve": ["ids"]}],
    }, base=tmp_path)


def source(url: str, tmp_path: Path, metrics: Metrics | None = None, **settings: Any) -> Rad69Source:
    built = build("ids", raw(url, tmp_path, **settings), metrics or Metrics())
    assert isinstance(built, Rad69Source)
    return built


def rad69_errors(metrics: Metrics) -> float | None:
    return metrics.registry.get_sample_value("dicom_bridge_upstream_errors_total",
                                             {"source": "ids", "operation": "rad69"})


def refs(n: int) -> list[InstanceRef]:
    return [InstanceRef(STUDY, SERIES, generate_uid(), "1.2.840.10008.5.1.4.1.1.7") for _ in range(n)]


def collect(items: Iterable[Retrieved | None]) -> tuple[dict[str, bytes], dict[str, str]]:
    files, failures = {}, {}
    for item in items:
        if item is None:
            continue
        if item.path is not None:
            files[item.ref.sop_instance_uid] = item.path.read_bytes()
            item.path.unlink()
        else:
            failures[item.ref.sop_instance_uid] = item.failure
    return files, failures


def incoming(tmp_path: Path) -> list[Path]:
    folder = tmp_path / "data" / "spool" / "incoming"
    return list(folder.iterdir()) if folder.exists() else []


# -- configuration ------------------------------------------------------------------------


def test_check_refuses_a_find_rule_naming_rad69_and_a_locate_that_cannot_query(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        validate({
            "destinations": {"archive": {"type": "archive"}},
            "sources": {
                "ids": {"type": "rad69", "url": "https://h/ids", "repository_unique_id": "1.2", "locate": "other"},
                "other": {"type": "rad69", "url": "https://h/ids", "repository_unique_id": "1.2", "locate": "lcal"},
                "bad": {"type": "rad69", "url": "https://h/ids", "repository_unique_id": "1.2", "locate": "local",
                        "transfer_syntaxes": ["1.2.840.10008.1.2"]},
            },
            "rules": [{"name": "r", "store": ["archive"], "find": ["ids"], "retrieve": ["ids"]}],
        }, base=tmp_path)
    errors = "\n".join(caught.value.errors)
    assert "rules[0].find[0]: source 'ids' is rad69, which cannot query" in errors
    assert "sources.ids.locate: source 'other' is rad69 too" in errors
    assert "sources.other.locate: unknown source 'lcal' (did you mean 'local'?)" in errors
    assert "sources.bad.transfer_syntaxes: " in errors and "1.2.840.10008.1.2.1" in errors


def test_defaults(tmp_path: Path) -> None:
    settings = raw("https://h/ids", tmp_path).sources["ids"]
    assert settings.type == "rad69"
    assert (settings.transfer_syntaxes, settings.packaging, settings.batch_size, settings.parallel) == (
        ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"], "mtom", 100, 2)


def test_find_is_refused_and_locate_is_the_locate_sources(tmp_path: Path) -> None:
    ids = source("https://h/ids", tmp_path)
    assert ids.locator.name == "local"
    with pytest.raises(UpstreamMisconfigured, match="RAD-69 cannot query"):
        next(iter(ids.find(None)))  # type: ignore[arg-type]
    ids.close()


# -- retrieval ----------------------------------------------------------------------------


def test_a_partial_success_delivers_what_came_and_fails_the_rest_with_its_error(server: Any,
                                                                                tmp_path: Path) -> None:
    url, answers, bodies = server
    a, b, c = refs(3)
    root = envelope(wire.PARTIAL_SUCCESS, document_response(a.sop_instance_uid, include("a@x")),
                    errors=[("XDSMissingDocument", "not here", b.sop_instance_uid),
                            ("urn:dicom:wado:0007", "no such syntax", "")])
    answers.append(send(200, *mtom(root, [("Content-ID: <a@x>", part10(a.sop_instance_uid))])))
    ids = source(url, tmp_path)
    files, failures = collect(ids.retrieve([a, b, c]))
    assert files == {a.sop_instance_uid: part10(a.sop_instance_uid)}
    assert "missing document (XDSMissingDocument: not here)" in failures[b.sop_instance_uid]
    assert "transfer syntax not available" in failures[c.sop_instance_uid]
    assert len(bodies) == 1 and bodies[0].count(b"<xdsb:DocumentRequest>") == 3
    assert not incoming(tmp_path)


def test_batches_and_parallel_requests(server: Any, tmp_path: Path) -> None:
    url, answers, bodies = server
    wanted = refs(7)

    def answer(handler: BaseHTTPRequestHandler, body: bytes) -> None:
        asked = [r for r in wanted if r.sop_instance_uid.encode() in body]
        root = envelope(wire.SUCCESS, "".join(document_response(r.sop_instance_uid, include(f"{i}@x"))
                                              for i, r in enumerate(asked)))
        send(200, *mtom(root, [(f"Content-ID: <{i}@x>", part10(r.sop_instance_uid))
                               for i, r in enumerate(asked)]))(handler, body)

    answers.append(answer)
    files, failures = collect(source(url, tmp_path, batch_size=3, parallel=3).retrieve(wanted))
    assert set(files) == {r.sop_instance_uid for r in wanted} and not failures
    assert sorted(b.count(b"<xdsb:DocumentRequest>") for b in bodies) == [1, 3, 3]


def test_a_file_that_is_not_the_instance_asked_for_fails(server: Any, tmp_path: Path) -> None:
    url, answers, _ = server
    (a,) = refs(1)
    root = envelope(wire.SUCCESS, document_response(a.sop_instance_uid, include("a@x")))
    answers.append(send(200, *mtom(root, [("Content-ID: <a@x>", part10("1.2.3.666"))])))
    files, failures = collect(source(url, tmp_path).retrieve([a]))
    assert not files and "1.2.3.666 instead" in failures[a.sop_instance_uid]
    assert not incoming(tmp_path)


def test_a_syntax_not_offered_fails(server: Any, tmp_path: Path) -> None:
    url, answers, _ = server
    (a,) = refs(1)
    root = envelope(wire.SUCCESS, document_response(a.sop_instance_uid, include("a@x")))
    answers.append(send(200, *mtom(root, [("Content-ID: <a@x>", part10(a.sop_instance_uid))])))
    files, failures = collect(source(url, tmp_path, transfer_syntaxes=["1.2.840.10008.1.2.4.80",
                                                                       "1.2.840.10008.1.2.1"]).retrieve([a]))
    assert files  # explicit LE is offered
    answers[0] = send(200, *mtom(root, [("Content-ID: <a@x>", part10(a.sop_instance_uid, ImplicitVRLittleEndian))]))
    files, failures = collect(source(url, tmp_path, transfer_syntaxes=["1.2.840.10008.1.2.1"]).retrieve([a]))
    assert not files and "not offered" in failures[a.sop_instance_uid]


def test_a_soap_fault_fails_every_document_with_its_reason(server: Any, tmp_path: Path) -> None:
    url, answers, _ = server
    fault = (f'<env:Envelope xmlns:env="{wire.SOAP}"><env:Body><env:Fault><env:Code><env:Value>env:Receiver'
             "</env:Value></env:Code><env:Reason><env:Text>database down</env:Text></env:Reason></env:Fault>"
             "</env:Body></env:Envelope>").encode()
    answers.append(send(500, "application/soap+xml", fault))
    wanted = refs(2)
    files, failures = collect(source(url, tmp_path).retrieve(wanted))
    assert not files
    assert all("SOAP Fault (HTTP 500): env:Receiver: database down" in f for f in failures.values())
    assert len(failures) == 2


def test_a_502_page_fails_the_source_when_nothing_came(server: Any, tmp_path: Path) -> None:
    url, answers, _ = server
    answers.append(send(502, "text/html", b"<html><body>Bad Gateway</body></html>"))
    metrics = Metrics()
    with pytest.raises(UpstreamUnavailable, match="502"):
        collect(source(url, tmp_path, metrics).retrieve(refs(2)))
    assert rad69_errors(metrics) == 1


def test_a_source_down_fails_and_counts(tmp_path: Path) -> None:
    metrics = Metrics()
    down = source(f"http://127.0.0.1:{free_port()}/ids", tmp_path, metrics)
    assert rad69_errors(metrics) == 0
    with pytest.raises(UpstreamUnavailable, match="refused"):
        collect(down.retrieve(refs(2)))
    assert rad69_errors(metrics) == 1


def test_a_soap_fault_counts_once_per_request(server: Any, tmp_path: Path) -> None:
    url, answers, _ = server
    fault = (f'<env:Envelope xmlns:env="{wire.SOAP}"><env:Body><env:Fault><env:Code><env:Value>env:Receiver'
             "</env:Value></env:Code><env:Reason><env:Text>down</env:Text></env:Reason></env:Fault>"
             "</env:Body></env:Envelope>").encode()
    answers.append(send(500, "application/soap+xml", fault))
    metrics = Metrics()
    collect(source(url, tmp_path, metrics, batch_size=2).retrieve(refs(4)))
    assert rad69_errors(metrics) == 2


def test_a_connection_dropped_mid_part_keeps_what_was_complete(server: Any, tmp_path: Path) -> None:
    url, answers, _ = server
    a, b = refs(2)
    root = envelope(wire.SUCCESS, document_response(a.sop_instance_uid, include("a@x"))
                    + document_response(b.sop_instance_uid, include("b@x")))
    content_type, body = mtom(root, [("Content-ID: <a@x>", part10(a.sop_instance_uid)),
                                     ("Content-ID: <b@x>", part10(b.sop_instance_uid))])
    answers.append(send(200, content_type, body, cut=body.index(part10(b.sop_instance_uid)) + 40))
    files, failures = collect(source(url, tmp_path).retrieve([a, b]))
    assert set(files) == {a.sop_instance_uid}
    assert "broke off" in failures[b.sop_instance_uid]
    assert not incoming(tmp_path)


def test_closed_early_removes_what_was_not_handed_over(server: Any, tmp_path: Path) -> None:
    url, answers, _ = server
    wanted = refs(6)
    root = envelope(wire.SUCCESS, "".join(document_response(r.sop_instance_uid, include(f"{i}@x"))
                                          for i, r in enumerate(wanted)))
    answers.append(send(200, *mtom(root, [(f"Content-ID: <{i}@x>", part10(r.sop_instance_uid))
                                          for i, r in enumerate(wanted)])))
    items = source(url, tmp_path, batch_size=2, parallel=3).retrieve(wanted)
    first = next(i for i in items if i is not None)
    assert first.path is not None
    items.close()  # type: ignore[attr-defined]
    assert incoming(tmp_path) == [first.path]
