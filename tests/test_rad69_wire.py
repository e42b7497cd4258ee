"""RAD-69 on the wire: the request as built (namespaces, WS-Addressing headers, element
order, MTOM packaging), and answers as real servers send them, fed to the streaming
reader in chunks of every size (bridge.sources.rad69_wire, bridge.sources.rad69_answer)."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import quote
from xml.etree import ElementTree as ET

import pytest
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from bridge.sources import rad69_wire as wire
from bridge.sources.rad69_answer import Answer, AnswerError, AnswerReader, Document
from bridge.web.multipart import content_type_params, read_parts

URL = "https://ids.example.org/services/ImagingDocumentSource"
REPO = "1.3.6.1.4.1.21367.13.80.110"
STUDY, SERIES = "1.2.3.4", "1.2.3.4.5"
NS = {"s": wire.SOAP, "a": wire.WSA, "i": wire.XDSI, "b": wire.XDSB, "w": wire.WSSE}
PARTIAL_OASIS = "urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:PartialSuccess"


def part10(sop_uid: str, syntax: str = ExplicitVRLittleEndian) -> bytes:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY, SERIES
    ds.PatientName = "Test^Rad69"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = syntax
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True, implicit_vr=syntax == ImplicitVRLittleEndian, little_endian=True)
    return out.getvalue() + b"\r\n--" * 3  # bytes that look like a delimiter's start, inside the part


# -- answers, built as servers send them ------------------------------------------------


def registry(status: str, errors: Iterable[tuple[str, str, str]] = (), severity: str = "Error") -> str:
    listed = "".join(
        f'<rs:RegistryError errorCode="{code}" codeContext="{context}" location="{location}" '
        f'severity="urn:oasis:names:tc:ebxml-regrep:ErrorSeverityType:{severity}"/>'
        for code, context, location in errors)
    error_list = f"<rs:RegistryErrorList>{listed}</rs:RegistryErrorList>" if listed else ""
    return f'<rs:RegistryResponse xmlns:rs="{wire.RS}" status="{status}">{error_list}</rs:RegistryResponse>'


def document_response(uid: str, content: str) -> str:
    return (f"<xdsb:DocumentResponse><xdsb:RepositoryUniqueId>{REPO}</xdsb:RepositoryUniqueId>"
            f"<xdsb:DocumentUniqueId>{uid}</xdsb:DocumentUniqueId><xdsb:mimeType>application/dicom</xdsb:mimeType>"
            f"<xdsb:Document>{content}</xdsb:Document></xdsb:DocumentResponse>")


def envelope(status: str, documents: str = "", errors: Iterable[tuple[str, str, str]] = ()) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?><env:Envelope xmlns:env="{wire.SOAP}" xmlns:wsa="{wire.WSA}">'
            f"<env:Header><wsa:Action>\n  urn:ihe:iti:2007:RetrieveDocumentSetResponse\n</wsa:Action></env:Header>"
            f'<env:Body><xdsb:RetrieveDocumentSetResponse xmlns:xdsb="{wire.XDSB}" xmlns:xop="{wire.XOP}">'
            f"{registry(status, errors)}{documents}</xdsb:RetrieveDocumentSetResponse></env:Body>"
            f"</env:Envelope>").encode()


def include(cid: str) -> str:
    return f'<xop:Include href="cid:{cid}"/>'


def mtom(root: bytes, parts: list[tuple[str, bytes]], boundary: str = "MIMEBoundary:urn:uuid:0a1b",
         root_last: bool = False, root_id: str = "<root.message@cxf.apache.org>",
         start: str | None = None) -> tuple[str, bytes]:
    """A MTOM answer: its Content-Type and body. ``parts``: (Content-ID header value, bytes)."""
    root_part = (f"Content-Type: application/xop+xml; charset=UTF-8; type=\"application/soap+xml\"\r\n"
                 f"Content-Transfer-Encoding: binary\r\nContent-ID: {root_id}\r\n\r\n").encode() + root
    others = [f"Content-Type: application/dicom\r\nContent-Transfer-Encoding: binary\r\n{header}\r\n\r\n".encode()
              + data for header, data in parts]
    ordered = [*others, root_part] if root_last else [root_part, *others]
    body = b"".join(f"--{boundary}\r\n".encode() + p + b"\r\n" for p in ordered) + f"--{boundary}--\r\n".encode()
    start = root_id if start is None else start
    content_type = (f'multipart/related; type="application/xop+xml"; boundary="{boundary}"; start="{start}"; '
                    f'start-info="application/soap+xml"')
    return content_type, body


def read(content_type: str, body: bytes, folder: Path, size: int) -> tuple[list[Document], Answer]:
    reader = AnswerReader(content_type, folder)
    documents: list[Document] = []
    try:
        for i in range(0, len(body), size):
            documents += reader.feed(body[i:i + size])
        return documents, reader.finish()
    finally:
        reader.discard()


CHUNKS = pytest.mark.parametrize("size", [1, 7, 4096, 1 << 20])


def uids(n: int) -> list[str]:
    return [generate_uid() for _ in range(n)]


def contents(documents: list[Document]) -> dict[str, bytes]:
    return {d.document_unique_id: d.path.read_bytes() for d in documents}


# -- the request ------------------------------------------------------------------------


def _root_xml(req: wire.Request) -> ET.Element:
    media, params = content_type_params(req.content_type)
    assert media == "multipart/related"
    parts = read_parts([req.body], params["boundary"])
    assert len(parts) == 1
    assert parts[0].headers["content-id"] == params["start"]
    assert parts[0].headers["content-type"] == 'application/xop+xml; charset=UTF-8; type="application/soap+xml"'
    return ET.fromstring(parts[0].body)


def test_the_mtom_request_has_its_parameters_headers_and_schema_order() -> None:
    docs = [wire.DocumentRequest(STUDY, SERIES, "1.9.1"), wire.DocumentRequest(STUDY, SERIES, "1.9.2"),
            wire.DocumentRequest(STUDY, "1.2.3.4.6", "1.9.3"), wire.DocumentRequest("1.2.3.7", "1.2.3.7.1", "1.9.4")]
    req = wire.request(URL, docs, REPO, ["1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.1"], "mtom",
                       home_community_id="urn:oid:1.2.3.99")
    _, params = content_type_params(req.content_type)
    assert params["type"] == "application/xop+xml"
    assert params["start-info"] == "application/soap+xml"
    assert params["action"] == wire.ACTION
    assert params["start"].startswith("<") and params["start"].endswith(">")
    assert 'boundary="' in req.content_type
    root = _root_xml(req)
    assert root.tag == f"{{{wire.SOAP}}}Envelope"
    header = root.find("s:Header", NS)
    assert header is not None
    action = header.find("a:Action", NS)
    assert action is not None and action.text == wire.ACTION
    assert action.get(f"{{{wire.SOAP}}}mustUnderstand") == "true"
    message_id = header.findtext("a:MessageID", namespaces=NS)
    assert message_id == req.message_id and message_id.startswith("urn:uuid:")
    assert header.findtext("a:To", namespaces=NS) == URL
    assert header.findtext("a:ReplyTo/a:Address", namespaces=NS) == wire.ANONYMOUS
    assert header.find("w:Security", NS) is None
    body = root.find("s:Body", NS)
    assert body is not None and [c.tag for c in body] == [f"{{{wire.XDSI}}}RetrieveImagingDocumentSetRequest"]
    request = body[0]
    assert [c.tag.split("}")[1] for c in request] == ["StudyRequest", "StudyRequest", "TransferSyntaxUIDList"]
    assert [c.get("studyInstanceUID") for c in request[:2]] == [STUDY, "1.2.3.7"]
    first = request[0]
    assert [s.get("seriesInstanceUID") for s in first] == [SERIES, "1.2.3.4.6"]
    document = first[0][0]
    assert document.tag == f"{{{wire.XDSB}}}DocumentRequest"
    assert [(c.tag, c.text) for c in document] == [(f"{{{wire.XDSB}}}HomeCommunityId", "urn:oid:1.2.3.99"),
                                                   (f"{{{wire.XDSB}}}RepositoryUniqueId", REPO),
                                                   (f"{{{wire.XDSB}}}DocumentUniqueId", "1.9.1")]
    assert [d.findtext("b:DocumentUniqueId", namespaces=NS) for d in first[0]] == ["1.9.1", "1.9.2"]
    syntaxes = request[2]
    assert [(c.tag, c.text) for c in syntaxes] == [(f"{{{wire.XDSI}}}TransferSyntaxUID", "1.2.840.10008.1.2.4.80"),
                                                   (f"{{{wire.XDSI}}}TransferSyntaxUID", "1.2.840.10008.1.2.1")]


def test_without_a_home_community_the_document_request_starts_with_the_repository() -> None:
    req = wire.request(URL, [wire.DocumentRequest(STUDY, SERIES, "1.9.1")], REPO, ["1.2.840.10008.1.2.1"])
    document = _root_xml(req).find(".//b:DocumentRequest", NS)
    assert document is not None
    assert [c.tag.split("}")[1] for c in document] == ["RepositoryUniqueId", "DocumentUniqueId"]


def test_each_request_has_a_fresh_message_id() -> None:
    docs = [wire.DocumentRequest(STUDY, SERIES, "1.9.1")]
    assert wire.request(URL, docs, REPO, ["1.2.840.10008.1.2.1"]).message_id != \
        wire.request(URL, docs, REPO, ["1.2.840.10008.1.2.1"]).message_id


def test_the_plain_request_is_soap_with_the_action_in_its_media_type() -> None:
    req = wire.request(URL, [wire.DocumentRequest(STUDY, SERIES, "1.9.1")], REPO, ["1.2.840.10008.1.2.1"], "plain")
    media, params = content_type_params(req.content_type)
    assert (media, params["charset"], params["action"]) == ("application/soap+xml", "UTF-8", wire.ACTION)
    assert ET.fromstring(req.body).tag == f"{{{wire.SOAP}}}Envelope"


def test_the_saml_assertion_goes_inside_wsse_security() -> None:
    assertion = wire.check_assertion('<?xml version="1.0"?>\n<saml2:Assertion '
                                     'xmlns:saml2="urn:oasis:names:tc:SAML:2.0:assertion" ID="_a1">'
                                     "<saml2:Issuer>idp</saml2:Issuer></saml2:Assertion>\n")
    req = wire.request(URL, [wire.DocumentRequest(STUDY, SERIES, "1.9.1")], REPO, ["1.2.840.10008.1.2.1"], "plain",
                       saml_assertion=assertion)
    security = ET.fromstring(req.body).find("s:Header/w:Security", NS)
    assert security is not None
    assert [c.tag for c in security] == ["{urn:oasis:names:tc:SAML:2.0:assertion}Assertion"]
    with pytest.raises(ValueError, match="well-formed"):
        wire.check_assertion("<saml2:Assertion>")


def test_text_is_escaped() -> None:
    req = wire.request(URL + "?a=1&b=2", [wire.DocumentRequest(STUDY, SERIES, "1.9.1")], "x<y", ["1.2.840.10008.1.2.1"],
                       "plain")
    root = ET.fromstring(req.body)
    assert root.findtext(".//a:To", namespaces=NS) == URL + "?a=1&b=2"
    assert root.findtext(".//b:RepositoryUniqueId", namespaces=NS) == "x<y"


# -- errors and statuses ----------------------------------------------------------------


@pytest.mark.parametrize(("code", "context", "kind"), [
    ("XDSMissingDocument", "", wire.MISSING),
    ("XDSDocumentUniqueIdError", "", wire.MISSING),
    ("XDSUnknownRepositoryId", "", wire.CONFIGURATION),
    ("XDSUnknownCommunity", "", wire.CONFIGURATION),
    ("XDSMissingHomeCommunityId", "", wire.CONFIGURATION),
    ("urn:dicom:wado:0006", "", wire.TRANSFER_SYNTAX),
    ("urn:dicom:wado:0007", "", wire.TRANSFER_SYNTAX),
    ("XDSRepositoryError", "Requested Transfer Syntax not supported", wire.TRANSFER_SYNTAX),
    ("XDSRepositoryError", "disk on fire", wire.OTHER),
    ("XDSIRequestError", "", wire.OTHER),
])
def test_registry_errors_are_classified(code: str, context: str, kind: str) -> None:
    assert wire.RegistryError(code, context).kind == kind


def test_statuses_in_either_namespace() -> None:
    assert wire.status_kind(wire.SUCCESS) == "Success"
    assert wire.status_kind(wire.FAILURE) == "Failure"
    assert wire.status_kind(wire.PARTIAL_SUCCESS) == "PartialSuccess"
    assert wire.status_kind(PARTIAL_OASIS) == "PartialSuccess"


# -- MTOM answers -----------------------------------------------------------------------


@CHUNKS
@pytest.mark.parametrize("root_last", [False, True])
def test_mtom_documents_are_matched_by_content_id_not_order(tmp_path: Path, size: int, root_last: bool) -> None:
    a, b, c = uids(3)
    root = envelope(wire.SUCCESS, document_response(a, include("1.urn:uuid:aa@apache.org"))
                    + document_response(b, include(quote("2.urn:uuid:bb@apache.org", safe="@")))
                    + document_response(c, include("3@x")))
    content_type, body = mtom(root, [("Content-Id: 3@x", part10(c)),  # bare, and Content-Id
                                     ("Content-ID: <2.urn:uuid:bb@apache.org>", part10(b)),  # %3A in the href
                                     ("Content-ID: <1.urn:uuid:aa@apache.org>", part10(a))], root_last=root_last)
    documents, answer = read(content_type, body, tmp_path, size)
    assert contents(documents) == {a: part10(a), b: part10(b), c: part10(c)}
    for d in documents:
        assert dcmread(d.path).SOPInstanceUID == d.document_unique_id
        assert d.repository_unique_id == REPO and d.mime_type == "application/dicom"
    assert (wire.status_kind(answer.status), answer.errors, answer.absent, answer.problems) == ("Success", [], [], [])
    assert sorted(tmp_path.iterdir()) == sorted(d.path for d in documents)  # nothing else left


def test_the_start_parameter_may_come_without_brackets(tmp_path: Path) -> None:
    a = generate_uid()
    root = envelope(wire.SUCCESS, document_response(a, include("doc1")))
    content_type, body = mtom(root, [("Content-ID: <doc1>", part10(a))], root_last=True, root_id="<root@x>",
                              start="root@x")
    documents, _ = read(content_type, body, tmp_path, 100)
    assert contents(documents) == {a: part10(a)}


def test_without_start_the_first_part_is_the_root(tmp_path: Path) -> None:
    a = generate_uid()
    root = envelope(wire.SUCCESS, document_response(a, include("doc1")))
    content_type, body = mtom(root, [("Content-ID: <doc1>", part10(a))])
    content_type = content_type.replace('start="<root.message@cxf.apache.org>"; ', "")
    documents, _ = read(content_type, body, tmp_path, 100)
    assert contents(documents) == {a: part10(a)}


@CHUNKS
@pytest.mark.parametrize("status", [wire.PARTIAL_SUCCESS, PARTIAL_OASIS])
def test_partial_success_keeps_what_came_and_every_error(tmp_path: Path, size: int, status: str) -> None:
    a, b, c = uids(3)
    root = envelope(status, document_response(a, include("a@x")),
                    errors=[("XDSMissingDocument", f"Document {b} not found", b),
                            ("XDSDocumentUniqueIdError", "unknown", c)])
    content_type, body = mtom(root, [("Content-ID: <a@x>", part10(a))])
    documents, answer = read(content_type, body, tmp_path, size)
    assert contents(documents) == {a: part10(a)}
    assert wire.status_kind(answer.status) == "PartialSuccess"
    assert [(e.code, e.location, e.kind) for e in answer.errors] == [
        ("XDSMissingDocument", b, wire.MISSING), ("XDSDocumentUniqueIdError", c, wire.MISSING)]
    assert answer.errors[0].context == f"Document {b} not found"


def test_a_part_nobody_refers_to_is_removed_and_a_reference_without_part_is_absent(tmp_path: Path) -> None:
    a, b = uids(2)
    root = envelope(wire.SUCCESS, document_response(a, include("a@x")) + document_response(b, include("b@x")))
    content_type, body = mtom(root, [("Content-ID: <a@x>", part10(a)), ("Content-ID: <zz@x>", part10(b))])
    documents, answer = read(content_type, body, tmp_path, 1000)
    assert contents(documents) == {a: part10(a)}
    assert answer.absent == [b]
    assert answer.problems and "zz@x" in answer.problems[0]
    assert list(tmp_path.iterdir()) == [documents[0].path]


def test_a_part_spooled_before_its_root_nobody_refers_to_is_removed(tmp_path: Path) -> None:
    a = generate_uid()
    root = envelope(wire.SUCCESS, document_response(a, include("a@x")))
    content_type, body = mtom(root, [("Content-ID: <a@x>", part10(a)), ("Content-ID: <other@x>", b"junk")],
                              root_last=True)
    documents, answer = read(content_type, body, tmp_path, 1000)
    assert contents(documents) == {a: part10(a)}
    assert list(tmp_path.iterdir()) == [documents[0].path]
    assert answer.problems


@pytest.mark.parametrize("size", [1, 1000])
def test_a_connection_dropped_mid_part_keeps_the_complete_and_removes_the_partial(tmp_path: Path, size: int) -> None:
    a, b = uids(2)
    root = envelope(wire.SUCCESS, document_response(a, include("a@x")) + document_response(b, include("b@x")))
    content_type, body = mtom(root, [("Content-ID: <a@x>", part10(a)), ("Content-ID: <b@x>", part10(b))])
    cut = body.index(part10(b)) + 50  # inside b's part
    reader = AnswerReader(content_type, tmp_path)
    documents: list[Document] = []
    for i in range(0, cut, size):
        documents += reader.feed(body[i:min(i + size, cut)])
    reader.discard()  # what a caller does when the read raises
    assert contents(documents) == {a: part10(a)}
    assert list(tmp_path.iterdir()) == [documents[0].path]


def test_a_body_cut_short_cannot_finish(tmp_path: Path) -> None:
    a = generate_uid()
    root = envelope(wire.SUCCESS, document_response(a, include("a@x")))
    content_type, body = mtom(root, [("Content-ID: <a@x>", part10(a))])
    reader = AnswerReader(content_type, tmp_path)
    reader.feed(body[:len(body) // 2])
    with pytest.raises(AnswerError):
        reader.finish()
    reader.discard()
    assert not list(tmp_path.iterdir())


def test_no_part_is_the_root(tmp_path: Path) -> None:
    a = generate_uid()
    root = envelope(wire.SUCCESS, document_response(a, include("a@x")))
    content_type, body = mtom(root, [("Content-ID: <a@x>", part10(a))], start="<elsewhere@x>")
    with pytest.raises(AnswerError, match="no SOAP root part"):
        read(content_type, body, tmp_path, 1000)
    assert not list(tmp_path.iterdir())


# -- plain SOAP answers -----------------------------------------------------------------


@CHUNKS
def test_failure_as_a_plain_soap_body(tmp_path: Path, size: int) -> None:
    a, b = uids(2)
    body = envelope(wire.FAILURE, errors=[("XDSUnknownRepositoryId", "unknown repository 1.2", ""),
                                          ("XDSMissingDocument", "", a)])
    documents, answer = read("application/soap+xml; charset=UTF-8", body, tmp_path, size)
    assert documents == []
    assert wire.status_kind(answer.status) == "Failure"
    assert [(e.code, e.location, e.kind) for e in answer.errors] == [
        ("XDSUnknownRepositoryId", "", wire.CONFIGURATION), ("XDSMissingDocument", a, wire.MISSING)]
    assert b not in answer.absent


@CHUNKS
def test_base64_inline_documents_are_decoded_into_files(tmp_path: Path, size: int) -> None:
    a, b = uids(2)
    wrapped = base64.encodebytes(part10(a)).decode()  # lines of 76, with newlines
    inline = document_response(a, wrapped) + document_response(b, base64.b64encode(part10(b)).decode())
    body = envelope(wire.SUCCESS, inline).replace(b"\n", b"&#13;\n", 3)  # entities in text are allowed too
    documents, answer = read("application/soap+xml", body, tmp_path, size)
    assert contents(documents) == {a: part10(a), b: part10(b)}
    assert answer.absent == [] and wire.status_kind(answer.status) == "Success"


def test_an_empty_inline_document_is_an_empty_file(tmp_path: Path) -> None:
    a, b = uids(2)
    body = envelope(wire.SUCCESS, document_response(a, "") + document_response(b, "<!-- none -->"))
    documents, answer = read("application/soap+xml", body, tmp_path, 3)
    assert contents(documents) == {a: b""}
    assert answer.absent == [b]


def test_base64_that_is_not_base64(tmp_path: Path) -> None:
    body = envelope(wire.SUCCESS, document_response(generate_uid(), "this is not base64!"))
    with pytest.raises(AnswerError, match="base64"):
        read("application/soap+xml", body, tmp_path, 5)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("size", [1, 4096])
def test_a_soap_fault(tmp_path: Path, size: int) -> None:
    body = (f'<env:Envelope xmlns:env="{wire.SOAP}"><env:Body><env:Fault>'
            "<env:Code><env:Value>env:Sender</env:Value><env:Subcode><env:Value>wsa:ActionNotSupported</env:Value>"
            "</env:Subcode></env:Code><env:Reason><env:Text xml:lang=\"en\">The [action] cannot be processed"
            "</env:Text></env:Reason></env:Fault></env:Body></env:Envelope>").encode()
    documents, answer = read('application/soap+xml; charset=utf-8; action="http://www.w3.org/2005/08/addressing/soap/fault"',
                             body, tmp_path, size)
    assert documents == []
    assert answer.fault == "env:Sender: The [action] cannot be processed"


@pytest.mark.parametrize(("content_type", "body"), [
    ("text/html", b"<html><body><h1>502 Bad Gateway</h1></body></html>"),
    ("text/plain", b"upstream connect error"),
    ("", b""),
])
def test_an_answer_neither_soap_nor_multipart_is_refused_at_once(tmp_path: Path, content_type: str,
                                                                 body: bytes) -> None:
    with pytest.raises(AnswerError, match="neither SOAP nor MTOM"):
        AnswerReader(content_type, tmp_path)


def test_html_labelled_as_soap_is_not_an_envelope(tmp_path: Path) -> None:
    with pytest.raises(AnswerError, match="not a SOAP envelope"):
        read("application/soap+xml", b"<html><body>502 Bad Gateway</body></html>", tmp_path, 10)


def test_broken_xml(tmp_path: Path) -> None:
    with pytest.raises(AnswerError, match="well-formed"):
        read("application/soap+xml", envelope(wire.SUCCESS)[:-20] + b"<oops", tmp_path, 10)


def test_a_multipart_answer_without_a_boundary(tmp_path: Path) -> None:
    with pytest.raises(AnswerError, match="boundary"):
        AnswerReader('multipart/related; type="application/xop+xml"', tmp_path)


def test_many_documents_in_one_answer_are_dropped_from_the_tree_as_read(tmp_path: Path) -> None:
    ids = uids(300)
    root = envelope(wire.SUCCESS, "".join(document_response(u, include(f"{i}@x")) for i, u in enumerate(ids)))
    content_type, body = mtom(root, [(f"Content-ID: <{i}@x>", part10(u)) for i, u in enumerate(ids)])
    documents, answer = read(content_type, body, tmp_path, 65536)
    assert sorted(d.document_unique_id for d in documents) == sorted(ids)
    assert answer.absent == []
