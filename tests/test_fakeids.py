"""tests/fakeids.py: the fake Imaging Document Source answers RAD-69 as the reference says.

Requests are built here by hand from /work/shared/reference/rad69.md (not with the
bridge's client), sent over a raw socket so the chunks of the answer can be seen, and
the answers read with ``bridge.web.multipart`` and ElementTree.
"""

from __future__ import annotations

import base64
import io
import socket
import uuid
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pydicom
import pytest
import requests
from corpus import ct_series, with_uid
from fakeids import (
    ACTION,
    FAILURE,
    ITI,
    PARTIAL,
    PARTIAL_OASIS,
    RAD,
    RS,
    SOAP12,
    SUCCESS,
    WSA,
    XOP,
    FakeImagingDocumentSource,
)
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid

from bridge.web.multipart import MultipartError, content_type_params, read_parts

REPOSITORY = "1.3.6.1.4.1.21367.13.80.110"
ANONYMOUS = "http://www.w3.org/2005/08/addressing/anonymous"
SAML = ('<saml2:Assertion xmlns:saml2="urn:oasis:names:tc:SAML:2.0:assertion" ID="_a1" Version="2.0">'
        "<saml2:Issuer>idp.example</saml2:Issuer></saml2:Assertion>")
WSSE = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-secext-1.0.xsd"


@dataclass(frozen=True)
class Doc:
    study: str
    series: str
    sop: str
    path: Path


@pytest.fixture(scope="module")
def docs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Doc]]:
    """Three CT images (explicit VR LE) of one series; a big endian MR (native) and a
    JPEG baseline image, each in a study of its own."""
    folder = tmp_path_factory.mktemp("ids")
    out: dict[str, list[Doc]] = {"ct": [], "mr": [], "jpeg": []}
    for path in ct_series(folder / "ct", 3):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        out["ct"].append(Doc(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, path))
    for name, source in (("mr", "MR_small_bigendian.dcm"), ("jpeg", "SC_rgb_jpeg_dcmtk.dcm")):
        uids = {key: generate_uid() for key in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")}
        path = with_uid(Path(get_testdata_file(source)), folder / f"{name}.dcm", **uids)
        out[name].append(Doc(uids["StudyInstanceUID"], uids["SeriesInstanceUID"], uids["SOPInstanceUID"], path))
    return out


@pytest.fixture(scope="module")
def server(docs: dict[str, list[Doc]]):
    """One fake for the module (stopping a server takes up to half a second)."""
    fake = FakeImagingDocumentSource(REPOSITORY).start()
    fake.hold(d.path for group in docs.values() for d in group)
    yield fake
    fake.stop()


@pytest.fixture
def ids(server: FakeImagingDocumentSource) -> FakeImagingDocumentSource:
    return server.reset()


# -- requests, by hand -----------------------------------------------------------------


def envelope(docs: list[Doc], syntaxes: tuple[str, ...] = (ExplicitVRLittleEndian,), *, to: str = "",
             repository: str = REPOSITORY, home: str | None = None, action: str = ACTION,
             message_id: str | None = None, saml: str | None = None, soap: str = SOAP12,
             document: str | None = None) -> bytes:
    """A RetrieveImagingDocumentSetRequest in a SOAP 1.2 envelope, grouped by study and series."""
    grouped: dict[str, dict[str, list[str]]] = {}
    for d in docs:
        grouped.setdefault(d.study, {}).setdefault(d.series, []).append(d.sop)
    community = f"<iti:HomeCommunityId>{home}</iti:HomeCommunityId>" if home else ""
    studies = "".join(
        f'<rad:StudyRequest studyInstanceUID="{study}">' + "".join(
            f'<rad:SeriesRequest seriesInstanceUID="{series}">' + "".join(
                document or f"<iti:DocumentRequest>{community}<iti:RepositoryUniqueId>{repository}"
                            f"</iti:RepositoryUniqueId><iti:DocumentUniqueId>{sop}</iti:DocumentUniqueId>"
                            "</iti:DocumentRequest>" for sop in sops) + "</rad:SeriesRequest>"
            for series, sops in by_series.items()) + "</rad:StudyRequest>"
        for study, by_series in grouped.items())
    syntax_list = "".join(f"<rad:TransferSyntaxUID>{uid}</rad:TransferSyntaxUID>" for uid in syntaxes)
    security = f'<wsse:Security xmlns:wsse="{WSSE}">{saml}</wsse:Security>' if saml else ""
    message = "" if message_id == "" else f"<wsa:MessageID>{message_id or f'urn:uuid:{uuid.uuid4()}'}</wsa:MessageID>"
    return (f'<?xml version="1.0" encoding="UTF-8"?><env:Envelope xmlns:env="{soap}" xmlns:wsa="{WSA}">'
            f'<env:Header><wsa:Action env:mustUnderstand="true">{action}</wsa:Action>{message}'
            f"<wsa:To>{to}</wsa:To><wsa:ReplyTo><wsa:Address>{ANONYMOUS}</wsa:Address></wsa:ReplyTo>{security}"
            f'</env:Header><env:Body><rad:RetrieveImagingDocumentSetRequest xmlns:rad="{RAD}" xmlns:iti="{ITI}">'
            f"{studies}<rad:TransferSyntaxUIDList>{syntax_list}</rad:TransferSyntaxUIDList>"
            f"</rad:RetrieveImagingDocumentSetRequest></env:Body></env:Envelope>").encode()


def mtom(soap: bytes, boundary: str = "MIMEBoundary:urn:uuid:0123", action: str | None = ACTION,
         start_brackets: bool = True) -> tuple[str, bytes]:
    root = "root.message@consumer.example"
    start = f"<{root}>" if start_brackets else root
    content_type = (f'multipart/related; type="application/xop+xml"; start="{start}"; '
                    f'start-info="application/soap+xml"; boundary="{boundary}"')
    if action is not None:
        content_type += f'; action="{action}"'
    body = (f'--{boundary}\r\nContent-Type: application/xop+xml; charset=UTF-8; type="application/soap+xml"\r\n'
            f"Content-Transfer-Encoding: binary\r\nContent-ID: <{root}>\r\n\r\n").encode() + soap
    return content_type, body + f"\r\n--{boundary}--\r\n".encode()


PLAIN = "application/soap+xml; charset=UTF-8"


@dataclass
class Reply:
    status: int
    headers: dict[str, str]  # names lower-cased
    chunks: list[bytes] = field(repr=False)
    complete: bool  # the body ended as announced (the last chunk, or Content-Length bytes)

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    @property
    def media(self) -> tuple[str, dict[str, str]]:
        return content_type_params(self.headers.get("content-type", ""))


def post(url: str, content_type: str, body: bytes) -> Reply:
    """POST over a raw socket; the answer's HTTP chunks as they were sent."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as s:
        s.sendall((f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: {content_type}\r\n"
                   f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body)
        data = bytearray()
        while chunk := s.recv(1 << 16):
            data += chunk
    head, _, rest = bytes(data).partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    if headers.get("transfer-encoding") != "chunked":
        length = int(headers.get("content-length", len(rest)))
        return Reply(int(status_line.split()[1]), headers, [rest[:length]], len(rest) >= length)
    chunks, complete = [], False
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            complete = True
            break
        if len(rest) < size + 2:
            chunks.append(rest[:size])
            break
        chunks.append(rest[:size])
        rest = rest[size + 2:]
    return Reply(int(status_line.split()[1]), headers, chunks, complete)


# -- answers, read -----------------------------------------------------------------------


@dataclass
class Answer:
    status: str
    errors: list[dict[str, str]]  # each RegistryError's attributes
    documents: list[tuple[str, ET.Element]]  # (DocumentUniqueId, its Document element), in order
    responses: list[ET.Element]  # the DocumentResponse elements


def registry(xml: bytes) -> Answer:
    root = ET.fromstring(xml)
    assert root.tag == f"{{{SOAP12}}}Envelope"
    response = root.find(f"{{{SOAP12}}}Body/{{{ITI}}}RetrieveDocumentSetResponse")
    assert response is not None
    assert response[0].tag == f"{{{RS}}}RegistryResponse"  # first, then the DocumentResponses
    errors = [dict(e.attrib) for e in response[0].iter(f"{{{RS}}}RegistryError")]
    responses = response.findall(f"{{{ITI}}}DocumentResponse")
    documents = [(r.findtext(f"{{{ITI}}}DocumentUniqueId"), r.find(f"{{{ITI}}}Document")) for r in responses]
    return Answer(response[0].get("status", ""), errors, documents, responses)  # type: ignore[arg-type]


@dataclass
class Mtom:
    answer: Answer
    parts: list  # every part, in order
    root_index: int
    by_cid: dict[str, bytes]  # content id (no <>) -> body, of the DICOM parts
    files: dict[str, bytes]  # DocumentUniqueId -> the Part-10 file its xop:Include names


def read_mtom(reply: Reply) -> Mtom:
    assert reply.status == 200
    assert reply.headers["transfer-encoding"] == "chunked"
    media, params = reply.media
    assert media == "multipart/related"
    assert params["type"] == "application/xop+xml"
    assert params["start-info"] == "application/soap+xml"
    parts = read_parts(reply.chunks, params["boundary"])
    start = params["start"].strip("<>")
    ids = [p.headers["content-id"].strip("<>") for p in parts]
    root_index = ids.index(start)
    root = parts[root_index]
    assert content_type_params(root.headers["content-type"]) == (
        "application/xop+xml", {"charset": "UTF-8", "type": "application/soap+xml"})
    answer = registry(root.body)
    by_cid = {cid: p.body for cid, p, in zip(ids, parts, strict=True) if p is not root}
    assert all(p.headers["content-type"] == "application/dicom" for p in parts if p is not root)
    files = {}
    for uid, document in answer.documents:
        include = document.find(f"{{{XOP}}}Include")
        assert include is not None
        href = include.get("href", "")
        assert href.startswith("cid:")
        files[uid] = by_cid[unquote(href.removeprefix("cid:"))]
    return Mtom(answer, parts, root_index, by_cid, files)


def ask(ids: FakeImagingDocumentSource, docs: list[Doc], *args, packaging: str = "mtom", **kwargs) -> Reply:
    soap = envelope(docs, *args, to=ids.url, **kwargs)
    return post(ids.url, *mtom(soap)) if packaging == "mtom" else post(ids.url, PLAIN, soap)


def missing_errors(answer: Answer) -> dict[str, str]:
    assert all(e["severity"] == "urn:oasis:names:tc:ebxml-regrep:ErrorSeverityType:Error" for e in answer.errors)
    return {e["location"]: e["errorCode"] for e in answer.errors}


# -- the tests ---------------------------------------------------------------------------


def test_all_found_comes_as_mtom_the_root_first_each_file_a_part_named_by_its_include(ids, docs) -> None:
    ct = docs["ct"]
    reply = ask(ids, ct)
    got = read_mtom(reply)
    assert got.root_index == 0
    assert (got.answer.status, got.answer.errors) == (SUCCESS, [])
    assert [uid for uid, _ in got.answer.documents] == [d.sop for d in ct]
    assert got.files == {d.sop: d.path.read_bytes() for d in ct}
    for response in got.answer.responses:
        assert [c.tag.removeprefix(f"{{{ITI}}}") for c in response] == [
            "RepositoryUniqueId", "DocumentUniqueId", "mimeType", "Document"]
        assert response.findtext(f"{{{ITI}}}RepositoryUniqueId") == REPOSITORY
        assert response.findtext(f"{{{ITI}}}mimeType") == "application/dicom"
    assert all(p.headers["content-id"].startswith("<") for p in got.parts)


def test_requests_are_recorded_with_what_they_asked(ids, docs) -> None:
    ct, mr = docs["ct"], docs["mr"]
    message_id = f"urn:uuid:{uuid.uuid4()}"
    ask(ids, [*ct, *mr], (JPEGBaseline8Bit, ExplicitVRLittleEndian), message_id=message_id)
    ask(ids, ct[:1], packaging="plain", saml=SAML)
    mtom_request, plain_request = ids.requests()
    assert mtom_request.packaging == "mtom" and plain_request.packaging == "plain"
    assert mtom_request.rejected is None and plain_request.rejected is None
    assert mtom_request.action == ACTION and mtom_request.must_understand == "true"
    assert mtom_request.message_id == message_id
    assert (mtom_request.to, mtom_request.reply_to) == (ids.url, ANONYMOUS)
    assert mtom_request.content_type_params["action"] == ACTION
    assert mtom_request.content_type_params["start"] == "<root.message@consumer.example>"
    assert mtom_request.headers["Content-Type"].startswith("multipart/related")
    assert mtom_request.transfer_syntaxes == [JPEGBaseline8Bit, ExplicitVRLittleEndian]
    assert mtom_request.studies == {ct[0].study: {ct[0].series: [d.sop for d in ct]},
                                    mr[0].study: {mr[0].series: [mr[0].sop]}}
    assert [(d.document, d.repository, d.home_community) for d in mtom_request.documents] == [
        (d.sop, REPOSITORY, None) for d in [*ct, *mr]]
    assert mtom_request.saml_assertion is None
    assert plain_request.saml_assertion is not None and 'ID="_a1"' in plain_request.saml_assertion
    ids.reset()
    assert ids.requests() == []


def test_a_plain_soap_request_gets_the_same_mtom_answer(ids, docs) -> None:
    got = read_mtom(ask(ids, docs["ct"], packaging="plain"))
    assert got.answer.status == SUCCESS and len(got.files) == 3


@pytest.mark.parametrize(("mode", "status"), [("partial", PARTIAL), ("partial-oasis", PARTIAL_OASIS)])
@pytest.mark.parametrize("code", ["XDSMissingDocument", "XDSDocumentUniqueIdError"])
def test_some_missing_is_partial_success_with_an_error_per_missing_document(ids, docs, mode, status, code) -> None:
    ct = docs["ct"]
    unknown = Doc(ct[0].study, ct[0].series, generate_uid(), Path("nowhere"))
    ids.reset(mode, missing=[ct[1].sop], missing_code=code)
    got = read_mtom(ask(ids, [*ct, unknown]))
    assert got.answer.status == status
    assert missing_errors(got.answer) == {ct[1].sop: code, unknown.sop: code}
    assert got.files == {d.sop: d.path.read_bytes() for d in (ct[0], ct[2])}


def test_a_document_asked_in_another_series_is_missing(ids, docs) -> None:
    ct = docs["ct"]
    elsewhere = Doc(ct[0].study, generate_uid(), ct[0].sop, ct[0].path)
    got = read_mtom(ask(ids, [elsewhere, ct[1]]))
    assert (got.answer.status, missing_errors(got.answer)) == (PARTIAL, {ct[0].sop: "XDSMissingDocument"})


def test_none_found_is_failure_in_a_plain_soap_body_on_200(ids, docs) -> None:
    ids.reset("none")
    reply = ask(ids, docs["ct"])
    assert reply.status == 200 and reply.media[0] == "application/soap+xml"
    answer = registry(reply.body)
    assert answer.status == FAILURE and answer.documents == []
    assert missing_errors(answer) == {d.sop: "XDSMissingDocument" for d in docs["ct"]}


def test_unknown_repository(ids, docs) -> None:
    ct = docs["ct"]
    replies = [ask(ids, ct, repository="1.2.3.4.5")]  # another repository asked for
    ids.reset("unknown-repository")
    replies.append(ask(ids, ct))  # this one's, answered as unknown all the same
    for reply in replies:
        answer = registry(reply.body)
        assert (reply.status, answer.status) == (200, FAILURE)
        assert missing_errors(answer) == {d.sop: "XDSUnknownRepositoryId" for d in ct}


def test_a_gateway_wants_its_home_community(docs) -> None:
    ct = docs["ct"][:1]
    gateway = FakeImagingDocumentSource(REPOSITORY, home_community_id="urn:oid:1.2.3.99").start()
    try:
        gateway.hold([ct[0].path])
        assert missing_errors(registry(ask(gateway, ct).body)) == {ct[0].sop: "XDSMissingHomeCommunityId"}
        wrong = registry(ask(gateway, ct, home="urn:oid:1.2.3.98").body)
        assert missing_errors(wrong) == {ct[0].sop: "XDSUnknownCommunity"}
        got = read_mtom(ask(gateway, ct, home="urn:oid:1.2.3.99"))
        assert got.answer.status == SUCCESS
        assert got.answer.responses[0][0].tag == f"{{{ITI}}}HomeCommunityId"
        assert gateway.requests()[-1].documents[0].home_community == "urn:oid:1.2.3.99"
    finally:
        gateway.stop()


@pytest.mark.parametrize("code", ["urn:dicom:wado:0007", "XDSRepositoryError"])
def test_syntax_mode_fails_every_document(ids, docs, code) -> None:
    ids.reset("syntax", syntax_code=code)
    answer = registry(ask(ids, docs["ct"]).body)
    assert answer.status == FAILURE and missing_errors(answer) == {d.sop: code for d in docs["ct"]}


def test_a_file_goes_as_stored_converted_to_explicit_le_or_fails_on_its_syntax(ids, docs) -> None:
    ct, mr, jpeg = docs["ct"][0], docs["mr"][0], docs["jpeg"][0]
    got = read_mtom(ask(ids, [ct, mr, jpeg], (ExplicitVRLittleEndian,)))
    assert got.answer.status == PARTIAL
    assert missing_errors(got.answer) == {jpeg.sop: "urn:dicom:wado:0007"}
    assert got.files[ct.sop] == ct.path.read_bytes()
    converted = pydicom.dcmread(io.BytesIO(got.files[mr.sop]))
    assert converted.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert converted.SOPInstanceUID == mr.sop
    assert (converted.pixel_array == pydicom.dcmread(mr.path).pixel_array).all()
    got = read_mtom(ask(ids, [jpeg], (JPEGBaseline8Bit, ExplicitVRLittleEndian)))
    assert got.files == {jpeg.sop: jpeg.path.read_bytes()}
    answer = registry(ask(ids, [ct], (JPEGBaseline8Bit,)).body)
    assert (answer.status, missing_errors(answer)) == (FAILURE, {ct.sop: "urn:dicom:wado:0007"})


@pytest.mark.parametrize(("mode", "status", "code"),
                         [("fault", 500, "env:Receiver"), ("fault-sender", 400, "env:Sender")])
def test_fault(ids, docs, mode, status, code) -> None:
    ids.reset(mode, fault_reason="the archive is down")
    reply = ask(ids, docs["ct"])
    assert (reply.status, reply.media[0]) == (status, "application/soap+xml")
    fault = ET.fromstring(reply.body).find(f"{{{SOAP12}}}Body/{{{SOAP12}}}Fault")
    assert fault is not None
    assert fault.findtext(f"{{{SOAP12}}}Code/{{{SOAP12}}}Value") == code
    assert fault.findtext(f"{{{SOAP12}}}Reason/{{{SOAP12}}}Text") == "the archive is down"


def test_bad_gateway_and_text(ids, docs) -> None:
    ids.reset("bad-gateway")
    reply = ask(ids, docs["ct"])
    assert (reply.status, reply.media[0]) == (502, "text/html") and b"<html>" in reply.body
    ids.reset("text")
    reply = ask(ids, docs["ct"])
    assert (reply.status, reply.media[0]) == (200, "text/plain")
    assert len(ids.requests()) == 1  # recorded all the same


def test_drop_closes_the_connection_in_the_middle_of_the_second_dicom_part(ids, docs) -> None:
    ct = docs["ct"]
    ids.reset("drop")
    reply = ask(ids, ct)
    assert reply.status == 200 and not reply.complete
    boundary = reply.media[1]["boundary"]
    with pytest.raises(MultipartError):
        read_parts(reply.chunks, boundary)
    first = ct[0].path.read_bytes()
    assert first in reply.body  # the first file whole, the second cut
    second = ct[1].path.read_bytes()
    assert reply.body.endswith(second[:len(second) // 2])


def test_slow_bytes_sends_one_byte_per_chunk(ids, docs) -> None:
    ids.reset("slow-bytes")
    reply = ask(ids, docs["ct"][:2])
    assert reply.complete and {len(c) for c in reply.chunks} == {1}
    assert read_mtom(reply).files == {d.sop: d.path.read_bytes() for d in docs["ct"][:2]}


@pytest.mark.parametrize("style", ["bracketed", "bare", "urlencoded"])
@pytest.mark.parametrize("header", ["Content-ID", "Content-Id"])
def test_content_id_styles(ids, docs, style, header) -> None:
    ids.reset(content_ids=style, content_id_header=header)
    reply = ask(ids, docs["ct"])
    assert (f"\r\n{header}: ".encode()) in reply.body
    got = read_mtom(reply)
    assert got.files == {d.sop: d.path.read_bytes() for d in docs["ct"]}
    raw = [p.headers["content-id"] for p in got.parts]
    hrefs = [doc.find(f"{{{XOP}}}Include").get("href") for _, doc in got.answer.documents]
    assert all(v.startswith("<") and v.endswith(">") for v in raw) == (style != "bare")
    if style == "urlencoded":
        assert all("%3A" in h and ":" not in h.removeprefix("cid:") for h in hrefs)
        assert all(":" in v and "@" in v for v in raw)
    else:
        assert [h.removeprefix("cid:") for h in hrefs] == [v.strip("<>") for v in raw[1:]]


def test_root_last_is_named_by_start(ids, docs) -> None:
    ids.reset("root-last")
    got = read_mtom(ask(ids, docs["ct"]))
    assert got.root_index == len(got.parts) - 1 == 3
    assert got.files == {d.sop: d.path.read_bytes() for d in docs["ct"]}


def test_shuffled_parts_come_in_another_order_than_the_document_responses(ids, docs) -> None:
    ct = docs["ct"]
    ids.reset("partial", missing=[ct[1].sop], shuffled=True, start_brackets=False, boundary="uuid:a:b:c")
    reply = ask(ids, ct)
    assert 'boundary="uuid:a:b:c"' in reply.headers["content-type"]
    assert not reply.media[1]["start"].startswith("<")
    got = read_mtom(reply)
    in_order = [d.path.read_bytes() for d in (ct[0], ct[2])]
    assert [p.body for p in got.parts[1:3]] == in_order[::-1]
    assert got.files == {d.sop: d.path.read_bytes() for d in (ct[0], ct[2])}


def test_inline_documents_are_base64_in_a_plain_soap_body(ids, docs) -> None:
    ids.reset("inline")
    reply = ask(ids, docs["ct"])
    assert reply.status == 200 and reply.media[0] == "application/soap+xml"
    assert reply.headers["transfer-encoding"] == "chunked"
    answer = registry(reply.body)
    assert answer.status == SUCCESS
    assert {uid: base64.b64decode(document.text or "") for uid, document in answer.documents} == {
        d.sop: d.path.read_bytes() for d in docs["ct"]}


def test_action_whitespace_and_no_action_parameter_are_accepted(ids, docs) -> None:
    soap = envelope(docs["ct"], action=f"\n   {ACTION}\n ")
    assert read_mtom(post(ids.url, *mtom(soap, action=None))).answer.status == SUCCESS


def _fault_of(reply: Reply) -> tuple[int, str, str | None]:
    fault = ET.fromstring(reply.body).find(f"{{{SOAP12}}}Body/{{{SOAP12}}}Fault")
    assert fault is not None
    code = fault.findtext(f"{{{SOAP12}}}Code/{{{SOAP12}}}Value") or ""
    return reply.status, code, fault.findtext(f"{{{SOAP12}}}Code/{{{SOAP12}}}Subcode/{{{SOAP12}}}Value")


SWAPPED = "<iti:DocumentRequest><iti:DocumentUniqueId>1.2.3</iti:DocumentUniqueId>" \
          "<iti:RepositoryUniqueId>{r}</iti:RepositoryUniqueId></iti:DocumentRequest>"
COMMUNITY_LAST = "<iti:DocumentRequest><iti:RepositoryUniqueId>{r}</iti:RepositoryUniqueId>" \
                 "<iti:DocumentUniqueId>1.2.3</iti:DocumentUniqueId><iti:HomeCommunityId>x</iti:HomeCommunityId>" \
                 "</iti:DocumentRequest>"


@pytest.mark.parametrize(("build", "expected"), [
    (lambda url, d: post(url, *mtom(envelope(d, action="urn:ihe:iti:2007:RetrieveDocumentSet"))),
     (400, "env:Sender", "wsa:ActionNotSupported")),
    (lambda url, d: post(url, *mtom(envelope(d), action="urn:ihe:iti:2007:RetrieveDocumentSet")),
     (400, "env:Sender", "wsa:ActionNotSupported")),
    (lambda url, d: post(url, PLAIN, envelope(d, message_id="")),
     (400, "env:Sender", "wsa:MessageAddressingHeaderRequired")),
    (lambda url, d: post(url, PLAIN, envelope(d, soap="http://schemas.xmlsoap.org/soap/envelope/")),
     (500, "env:VersionMismatch", None)),
    (lambda url, d: post(url, PLAIN, b"<not-xml"), (400, "env:Sender", None)),
    (lambda url, d: post(url, "text/xml", envelope(d)), (400, "env:Sender", None)),
    (lambda url, d: post(url, PLAIN, envelope(d, document=SWAPPED.format(r=REPOSITORY))), (400, "env:Sender", None)),
    (lambda url, d: post(url, PLAIN, envelope(d, document=COMMUNITY_LAST.format(r=REPOSITORY))),
     (400, "env:Sender", None)),
    (lambda url, d: post(url, PLAIN, envelope(d, syntaxes=())), (400, "env:Sender", None)),
    (lambda url, d: post(url, PLAIN, envelope(d).replace(b"studyInstanceUID", b"StudyInstanceUID")),
     (400, "env:Sender", None)),
], ids=["action", "action-parameter", "no-message-id", "soap-1.1", "not-xml", "text-xml", "document-order",
        "community-last", "no-syntax", "attribute-case"])
def test_malformed_requests_get_faults_and_are_recorded(ids, docs, build, expected) -> None:
    reply = build(ids.url, docs["ct"])
    assert _fault_of(reply) == expected
    (request,) = ids.requests()
    assert request.rejected


def test_a_malformed_body_may_get_xdsi_request_error_instead(ids, docs) -> None:
    ids.reset(malformed="registry-error")
    reply = post(ids.url, PLAIN, envelope(docs["ct"], document=SWAPPED.format(r=REPOSITORY)))
    answer = registry(reply.body)
    assert (reply.status, answer.status) == (200, FAILURE)
    assert [e["errorCode"] for e in answer.errors] == ["XDSIRequestError"]


def test_a_dropped_answer_is_an_error_for_an_http_client_not_a_hang(ids, docs) -> None:
    ids.reset("drop")
    content_type, body = mtom(envelope(docs["ct"], to=ids.url))
    with requests.post(ids.url, data=body, headers={"Content-Type": content_type}, stream=True, timeout=5) as reply:
        assert reply.status_code == 200
        with pytest.raises(requests.exceptions.ChunkedEncodingError):
            for _ in reply.iter_content(1 << 16):
                pass


def test_requests_in_parallel_are_each_answered_and_recorded(ids, docs) -> None:
    ct = docs["ct"]
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda d: read_mtom(ask(ids, [d])), [*ct, *ct[:1]]))
    assert [list(r.files) for r in replies] == [[d.sop] for d in [*ct, *ct[:1]]]
    assert len({r.message_id for r in ids.requests()}) == 4
