"""A fake IHE XDS-I.b Imaging Document Source: the RAD-69 responder, on 127.0.0.1.

It follows the RAD-69 reference (shared/reference/rad69.md). It takes a RetrieveImagingDocumentSetRequest
as MTOM/XOP (multipart/related; type="application/xop+xml") or as a plain
``application/soap+xml`` body, checks it as a strict server would (SOAP 1.2 envelope,
WS-Addressing Action and MessageID, the body's elements in schema order), records it,
and answers with the Part-10 files it holds (``hold``), by SOP Instance UID.

What it answers is set with ``reset(mode=..., ...)``:

- ``ok``, ``partial``: every document it holds (in the asked study and series), in an
  MTOM multipart answer, the SOAP root part first; a RegistryError for each one it does
  not hold or is told is ``missing``. The status follows a reference server's rule: no
  errors Success, errors and some documents PartialSuccess, no documents Failure (as a
  plain SOAP body on HTTP 200).
- ``partial-oasis``: the same, PartialSuccess under the old oasis prefix.
- ``none``: nothing found: Failure in a plain SOAP body on HTTP 200.
- ``unknown-repository``: XDSUnknownRepositoryId for every document (as when the
  request names another repository), Failure.
- ``syntax``: every document fails with ``syntax_code`` (transfer syntax not available).
- ``fault`` / ``fault-sender``: a SOAP 1.2 Fault, HTTP 500 env:Receiver / 400 env:Sender.
- ``bad-gateway``: HTTP 502 with an HTML page; ``text``: HTTP 200 text/plain.
- ``inline``: a plain SOAP answer with each document inlined as base64.
- ``drop``, ``slow-bytes``, ``root-last``, ``shuffled``: ``ok`` with ``drop=True``
  (the connection closed in the middle of the second DICOM part), ``chunk_size=1``,
  ``root_last=True`` (the SOAP part after the DICOM parts, ``start`` naming it),
  ``shuffled=True`` (DICOM parts in reverse order of the DocumentResponses). The flags
  combine with the other modes (``reset(mode="partial", shuffled=True)``).

Transfer syntax: a file goes as stored if its syntax was asked for; a native one is
converted to explicit VR little endian if that was asked for; otherwise that document
fails with ``syntax_code``.

A malformed request (not SOAP 1.2, no or another Action, no MessageID, a body out of
schema order) gets a SOAP Fault: env:Sender with HTTP 400 (env:VersionMismatch with 500
for a SOAP 1.1 envelope); with ``malformed="registry-error"`` a body out of order gets
Failure with XDSIRequestError on HTTP 200 instead.
"""

from __future__ import annotations

import base64
import io
import itertools
import socket
import threading
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote
from xml.sax.saxutils import escape, quoteattr

import fakehttp
import pydicom
from peers import free_port
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian

from bridge.dimse.transcode import swap_to_little_endian
from bridge.web.multipart import MultipartError, content_type_params, read_parts

SOAP12 = "http://www.w3.org/2003/05/soap-envelope"
SOAP11 = "http://schemas.xmlsoap.org/soap/envelope/"
WSA = "http://www.w3.org/2005/08/addressing"
RAD = "urn:ihe:rad:xdsi-b:2009"
ITI = "urn:ihe:iti:xds-b:2007"
RS = "urn:oasis:names:tc:ebxml-regrep:xsd:rs:3.0"
XOP = "http://www.w3.org/2004/08/xop/include"
WSSE = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-secext-1.0.xsd"
SAML2 = "urn:oasis:names:tc:SAML:2.0:assertion"
ACTION = "urn:ihe:rad:2009:RetrieveImagingDocumentSet"
RESPONSE_ACTION = "urn:ihe:rad:2009:RetrieveImagingDocumentSetResponse"

SUCCESS = "urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Success"
FAILURE = "urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Failure"
PARTIAL = "urn:ihe:iti:2007:ResponseStatusType:PartialSuccess"
PARTIAL_OASIS = "urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:PartialSuccess"
ERROR = "urn:oasis:names:tc:ebxml-regrep:ErrorSeverityType:Error"

MODES = {"ok", "partial", "partial-oasis", "none", "unknown-repository", "syntax", "fault", "fault-sender",
         "bad-gateway", "text", "inline", "drop", "slow-bytes", "root-last", "shuffled"}
CONTENT_IDS = {"bracketed", "bare", "urlencoded"}
READ = 64 * 1024


@dataclass(frozen=True)
class DocumentRequest:
    study: str
    series: str
    document: str  # DocumentUniqueId: the SOP Instance UID
    repository: str
    home_community: str | None = None


@dataclass
class Request:
    """One POST as it came, and what it asked for."""

    path: str
    headers: dict[str, str]
    body: bytes = field(repr=False)
    packaging: str = ""  # "mtom" or "plain" (or "" when its media type was neither)
    content_type_params: dict[str, str] = field(default_factory=dict)
    action: str = ""  # wsa:Action, whitespace trimmed
    must_understand: str | None = None  # wsa:Action's env:mustUnderstand
    message_id: str = ""
    to: str = ""
    reply_to: str = ""
    saml_assertion: str | None = None  # the saml2:Assertion in wsse:Security, as XML text
    documents: list[DocumentRequest] = field(default_factory=list)  # in request order
    transfer_syntaxes: list[str] = field(default_factory=list)  # in order of preference
    rejected: str | None = None  # why the request was refused as malformed, if it was

    @property
    def studies(self) -> dict[str, dict[str, list[str]]]:
        """study -> series -> document UIDs, as grouped in the request."""
        grouped: dict[str, dict[str, list[str]]] = {}
        for d in self.documents:
            grouped.setdefault(d.study, {}).setdefault(d.series, []).append(d.document)
        return grouped


class Malformed(Exception):
    def __init__(self, reason: str, subcode: str | None = None, body: bool = False, version: bool = False) -> None:
        super().__init__(reason)
        self.subcode = subcode  # a wsa: fault subcode
        self.body = body  # the SOAP is fine, the RetrieveImagingDocumentSetRequest is not
        self.version = version


@dataclass
class _Held:
    path: Path
    study: str
    series: str
    syntax: UID


@dataclass
class _Options:
    mode: str = "ok"
    missing: frozenset[str] = frozenset()
    missing_code: str = "XDSMissingDocument"
    syntax_code: str = "urn:dicom:wado:0007"
    content_ids: str = "bracketed"
    content_id_header: str = "Content-ID"
    boundary: str = ""
    start_brackets: bool = True
    root_last: bool = False
    shuffled: bool = False
    drop: bool = False
    chunk_size: int | None = None
    malformed: str = "fault"
    fault_reason: str = "The Imaging Document Source failed to process the request"


class FakeImagingDocumentSource:
    """``url`` is the endpoint; ``hold`` the files it answers with; ``reset`` what it answers."""

    def __init__(self, repository_unique_id: str = "1.3.6.1.4.1.21367.13.80.110",
                 home_community_id: str | None = None, path: str = "/xdsi/ids") -> None:
        self.repository_unique_id = repository_unique_id
        self.home_community_id = home_community_id
        self.path = path
        self.port = free_port()
        self._held: dict[str, _Held] = {}
        self._requests: list[Request] = []
        self._counter = itertools.count(1)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self.reset()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"

    def hold(self, paths: Iterable[Path]) -> FakeImagingDocumentSource:
        """Answer with these Part-10 files, found by their SOP Instance UID."""
        for path in paths:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            with self._lock:
                self._held[str(ds.SOPInstanceUID)] = _Held(Path(path), str(ds.StudyInstanceUID),
                                                           str(ds.SeriesInstanceUID), ds.file_meta.TransferSyntaxUID)
        return self

    def reset(self, mode: str = "ok", missing: Sequence[str] = (), *, missing_code: str = "XDSMissingDocument",
              syntax_code: str = "urn:dicom:wado:0007", content_ids: str = "bracketed",
              content_id_header: str = "Content-ID", boundary: str | None = None, start_brackets: bool = True,
              root_last: bool = False, shuffled: bool = False, drop: bool = False, chunk_size: int | None = None,
              malformed: str = "fault", fault_reason: str | None = None) -> FakeImagingDocumentSource:
        """Forget the requests seen and answer from now on as told (see the module's docstring).

        ``missing``: SOP Instance UIDs answered as not found though held. ``missing_code``:
        XDSMissingDocument or XDSDocumentUniqueIdError. ``syntax_code``: urn:dicom:wado:0007
        (or 0006) or XDSRepositoryError. ``content_ids``: "bracketed" (``<id>``), "bare"
        (``id``) or "urlencoded" (ids with ':' and '@', the href percent-encoded, the
        header raw). ``content_id_header``: "Content-ID" or "Content-Id". ``boundary``:
        the MIME boundary (always quoted; may hold ':'). ``start_brackets``: the ``start``
        parameter as ``<id>`` or bare. ``chunk_size``: at most this many bytes per HTTP chunk.
        """
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}: one of {sorted(MODES)}")
        if content_ids not in CONTENT_IDS:
            raise ValueError(f"unknown content id style {content_ids!r}: one of {sorted(CONTENT_IDS)}")
        options = _Options(mode=mode, missing=frozenset(missing), missing_code=missing_code,
                           syntax_code=syntax_code, content_ids=content_ids, content_id_header=content_id_header,
                           boundary=boundary or f"MIMEBoundary_{uuid.uuid4().hex}", start_brackets=start_brackets,
                           root_last=root_last or mode == "root-last", shuffled=shuffled or mode == "shuffled",
                           drop=drop or mode == "drop", chunk_size=1 if mode == "slow-bytes" else chunk_size,
                           malformed=malformed, fault_reason=fault_reason or _Options.fault_reason)
        with self._lock:
            self._options = options
            self._requests.clear()
        return self

    def requests(self) -> list[Request]:
        with self._lock:
            return list(self._requests)

    def start(self) -> FakeImagingDocumentSource:
        def get(handler: BaseHTTPRequestHandler) -> None:
            _send(handler, 405, {"Content-Type": "text/plain", "Allow": "POST"}, b"RAD-69 takes POST only")

        self._server = fakehttp.serve(self.port, get, "fakeids", post=self._post)
        return self

    def stop(self) -> None:
        fakehttp.close(self._server)
        self._server = None

    # -- one request -------------------------------------------------------------------

    def _post(self, handler: BaseHTTPRequestHandler) -> None:
        body = _read_body(handler)
        request = Request(handler.path, dict(handler.headers.items()), body)
        with self._lock:
            options = self._options
            self._requests.append(request)
        if handler.path.split("?")[0] != self.path:
            _send(handler, 404, {"Content-Type": "text/plain"}, b"no such endpoint")
            return
        try:
            _parse(request)
        except Malformed as e:
            request.rejected = str(e)
            if e.body and options.malformed == "registry-error":
                errors = [("XDSIRequestError", str(e), "")]
                _send(handler, 200, _SOAP_TYPE, _envelope(_response(FAILURE, errors, ""), request.message_id))
            elif e.version:
                _send(handler, 500, _SOAP_TYPE, _fault("VersionMismatch", None, str(e)))
            else:
                _send(handler, 400, _SOAP_TYPE, _fault("Sender", e.subcode, str(e)))
            return
        self._answer(handler, request, options)

    def _answer(self, handler: BaseHTTPRequestHandler, request: Request, o: _Options) -> None:
        if o.mode in ("fault", "fault-sender"):
            http_status, code = (400, "Sender") if o.mode == "fault-sender" else (500, "Receiver")
            _send(handler, http_status, _SOAP_TYPE, _fault(code, None, o.fault_reason))
            return
        if o.mode == "bad-gateway":
            _send(handler, 502, {"Content-Type": "text/html; charset=utf-8"},
                  b"<html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1></body></html>")
            return
        if o.mode == "text":
            _send(handler, 200, {"Content-Type": "text/plain"}, b"The service is temporarily unavailable.\n")
            return
        found, errors = self._lookup(request, o)
        partial = PARTIAL_OASIS if o.mode == "partial-oasis" else PARTIAL
        status = SUCCESS if not errors else (partial if found else FAILURE)
        if not found:
            _send(handler, 200, _SOAP_TYPE, _envelope(_response(status, errors, ""), request.message_id))
            return
        if o.mode == "inline":
            self._inline(handler, request, status, errors, found, o)
            return
        self._mtom(handler, request, status, errors, found, o)

    def _lookup(self, request: Request, o: _Options) -> tuple[list[tuple[DocumentRequest, bytes | Path]],
                                                                 list[tuple[str, str, str]]]:
        """The documents to send (the file, or converted bytes) and the errors
        (code, context, location), in request order."""
        found: list[tuple[DocumentRequest, bytes | Path]] = []
        errors: list[tuple[str, str, str]] = []
        explicit = ExplicitVRLittleEndian in request.transfer_syntaxes
        for d in request.documents:
            held = self._held.get(d.document)
            if (o.mode == "unknown-repository" or d.repository != self.repository_unique_id):
                errors.append(("XDSUnknownRepositoryId", f"unknown repository {d.repository}", d.document))
            elif d.home_community and self.home_community_id and d.home_community != self.home_community_id:
                errors.append(("XDSUnknownCommunity", f"unknown community {d.home_community}", d.document))
            elif self.home_community_id and not d.home_community:
                errors.append(("XDSMissingHomeCommunityId", "a gateway needs the HomeCommunityId", d.document))
            elif (o.mode == "none" or d.document in o.missing or held is None
                  or (held.study, held.series) != (d.study, d.series)):
                errors.append((o.missing_code, f"document {d.document} not found", d.document))
            elif o.mode != "syntax" and held.syntax in request.transfer_syntaxes:
                found.append((d, held.path))
            elif o.mode != "syntax" and explicit and not held.syntax.is_compressed:
                found.append((d, _explicit_le(held.path)))
            else:
                errors.append((o.syntax_code, f"transfer syntax {held.syntax} of {d.document} is not available"
                               f" as any of {' '.join(request.transfer_syntaxes)}", d.document))
        return found, errors

    def _content_id(self, o: _Options) -> str:
        n = next(self._counter)
        if o.content_ids == "urlencoded":
            return f"{n}.urn:uuid:{uuid.uuid4()}@fakeids.example"
        return f"{n}.{uuid.uuid4().hex}.fakeids"

    def _mtom(self, handler: BaseHTTPRequestHandler, request: Request, status: str, errors: list[tuple[str, str, str]],
              found: list[tuple[DocumentRequest, bytes | Path]], o: _Options) -> None:
        root_id = self._content_id(o)
        ids = [self._content_id(o) for _ in found]
        documents = "".join(_document_response(d, f'<xop:Include xmlns:xop="{XOP}" href="cid:{quote(cid, safe="")}"/>',
                                               self.home_community_id)
                            for (d, _), cid in zip(found, ids, strict=True))
        root = _envelope(_response(status, errors, documents), request.message_id)

        def header(cid: str) -> str:
            return f"{o.content_id_header}: {'<' + cid + '>' if o.content_ids != 'bare' else cid}\r\n"

        dash = f"--{o.boundary}\r\n".encode()
        root_head = (f'Content-Type: application/xop+xml; charset=UTF-8; type="application/soap+xml"\r\n'
                     f"Content-Transfer-Encoding: binary\r\n{header(root_id)}\r\n").encode()
        root_part: list[bytes | Path] = [dash + root_head, root, b"\r\n"]
        order = list(zip(found, ids, strict=True))
        if o.shuffled:
            order.reverse()
        dicom: list[list[bytes | Path]] = [
            [dash + (f"Content-Type: application/dicom\r\nContent-Transfer-Encoding: binary\r\n{header(cid)}\r\n")
             .encode(), content, b"\r\n"] for (_, content), cid in order]
        parts = [*dicom, root_part] if o.root_last else [root_part, *dicom]
        pieces = [piece for part in parts for piece in part] + [f"--{o.boundary}--\r\n".encode()]
        # the cut: half-way through the second DICOM part's content (the last, if only one);
        # each part is three pieces (head, content, CRLF)
        cut = 3 * min(1, len(dicom) - 1) + (0 if o.root_last else 3) + 1 if o.drop else None
        start = f"<{root_id}>" if o.start_brackets else root_id
        content_type = (f'multipart/related; type="application/xop+xml"; boundary="{o.boundary}"; '
                        f'start="{start}"; start-info="application/soap+xml"')
        _stream(handler, content_type, _pieces(pieces, cut), o.chunk_size)

    def _inline(self, handler: BaseHTTPRequestHandler, request: Request, status: str,
                errors: list[tuple[str, str, str]], found: list[tuple[DocumentRequest, bytes | Path]],
                o: _Options) -> None:
        marker = "\0DOCUMENTS\0"
        head, tail = _envelope(_response(status, errors, marker), request.message_id).split(marker.encode())

        def body() -> Iterator[bytes]:
            yield head
            for d, content in found:
                before, after = _document_response(d, marker, self.home_community_id).split(marker)
                yield before.encode()
                data = content if isinstance(content, bytes) else content.read_bytes()
                for at in range(0, len(data), 57 * 1024):  # whole base64 lines per piece
                    yield base64.b64encode(data[at:at + 57 * 1024])
                yield after.encode()
            yield tail

        _stream(handler, _SOAP_TYPE["Content-Type"], body(), o.chunk_size)


# -- the request -----------------------------------------------------------------------


def _read_body(handler: BaseHTTPRequestHandler) -> bytes:
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        out = bytearray()
        while True:
            size = int(handler.rfile.readline().split(b";")[0].strip(), 16)
            if size == 0:
                while handler.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return bytes(out)
            out += handler.rfile.read(size)
            handler.rfile.readline()
    return handler.rfile.read(int(handler.headers.get("Content-Length") or 0))


def _parse(request: Request) -> None:
    """Fill ``request`` from its body; ``Malformed`` says what is wrong with it."""
    media, params = content_type_params(request.headers.get("Content-Type", ""))
    request.content_type_params = params
    if "action" in params and params["action"].strip() != ACTION:
        raise Malformed(f"the action parameter is {params['action']!r}", "wsa:ActionNotSupported")
    if media == "multipart/related":
        request.packaging = "mtom"
        xml = _root_part(request.body, params)
    elif media == "application/soap+xml":
        request.packaging = "plain"
        xml = request.body
    else:
        raise Malformed(f"a SOAP 1.2 request is application/soap+xml or MTOM, not {media}")
    try:
        envelope = ET.fromstring(xml)
    except ET.ParseError as e:
        raise Malformed(f"not XML: {e}") from None
    if envelope.tag == f"{{{SOAP11}}}Envelope":
        raise Malformed("a SOAP 1.1 envelope; this endpoint speaks SOAP 1.2", version=True)
    if envelope.tag != f"{{{SOAP12}}}Envelope":
        raise Malformed(f"the root element is {envelope.tag}, not a SOAP 1.2 Envelope")
    header, body = envelope.find(f"{{{SOAP12}}}Header"), envelope.find(f"{{{SOAP12}}}Body")
    if header is None:
        raise Malformed("no SOAP Header: WS-Addressing is required", "wsa:MessageAddressingHeaderRequired")
    action = header.find(f"{{{WSA}}}Action")
    if action is None:
        raise Malformed("no wsa:Action", "wsa:MessageAddressingHeaderRequired")
    request.action = (action.text or "").strip()
    request.must_understand = action.get(f"{{{SOAP12}}}mustUnderstand")
    if request.action != ACTION:
        raise Malformed(f"the action {request.action!r} is not {ACTION}", "wsa:ActionNotSupported")
    request.message_id = (header.findtext(f"{{{WSA}}}MessageID") or "").strip()
    if not request.message_id:
        raise Malformed("no wsa:MessageID", "wsa:MessageAddressingHeaderRequired")
    request.to = (header.findtext(f"{{{WSA}}}To") or "").strip()
    request.reply_to = (header.findtext(f"{{{WSA}}}ReplyTo/{{{WSA}}}Address") or "").strip()
    assertion = header.find(f"{{{WSSE}}}Security/{{{SAML2}}}Assertion")
    if assertion is not None:
        request.saml_assertion = ET.tostring(assertion, encoding="unicode")
    if body is None or len(body) != 1:
        raise Malformed("the SOAP Body holds one RetrieveImagingDocumentSetRequest")
    _parse_retrieve(body[0], request)


def _root_part(body: bytes, params: dict[str, str]) -> bytes:
    if params.get("type") != "application/xop+xml":
        raise Malformed(f"an MTOM request has type=\"application/xop+xml\", not {params.get('type')!r}")
    if params.get("start-info") != "application/soap+xml":
        raise Malformed(f"an MTOM request has start-info=\"application/soap+xml\", not {params.get('start-info')!r}")
    try:
        parts = read_parts([body], params.get("boundary", ""))
    except MultipartError as e:
        raise Malformed(f"the MTOM body does not parse: {e}") from None
    start = params.get("start", "").strip().strip("<>")
    root = next((p for p in parts if p.headers.get("content-id", "").strip("<> ") == start), None) if start else \
        (parts[0] if parts else None)
    if root is None:
        raise Malformed(f"no part has the start Content-ID {start!r}")
    root_media, root_params = content_type_params(root.headers.get("content-type", ""))
    if root_media != "application/xop+xml" or root_params.get("type") != "application/soap+xml":
        raise Malformed(f"the root part is {root.headers.get('content-type')!r}, "
                        "not application/xop+xml; type=\"application/soap+xml\"")
    return root.body


def _parse_retrieve(root: ET.Element, request: Request) -> None:
    """The RetrieveImagingDocumentSetRequest, in schema order (RAD-69 / ITI-43 schemas)."""
    def bad(reason: str) -> Malformed:
        return Malformed(reason, body=True)

    if root.tag != f"{{{RAD}}}RetrieveImagingDocumentSetRequest":
        raise bad(f"the body holds {root.tag}, not RetrieveImagingDocumentSetRequest")
    children = list(root)
    if not children or children[-1].tag != f"{{{RAD}}}TransferSyntaxUIDList":
        raise bad("TransferSyntaxUIDList comes last, once")
    *studies, syntaxes = children
    if not studies:
        raise bad("no StudyRequest")
    for study in studies:
        if study.tag != f"{{{RAD}}}StudyRequest":
            raise bad(f"{study.tag} where a StudyRequest belongs")
        study_uid = study.get("studyInstanceUID")
        if not study_uid:
            raise bad("a StudyRequest without studyInstanceUID")
        if not len(study):
            raise bad(f"StudyRequest {study_uid} without SeriesRequest")
        for series in study:
            series_uid = series.get("seriesInstanceUID")
            if series.tag != f"{{{RAD}}}SeriesRequest" or not series_uid:
                raise bad(f"{series.tag} (seriesInstanceUID {series_uid!r}) where a SeriesRequest belongs")
            if not len(series):
                raise bad(f"SeriesRequest {series_uid} without DocumentRequest")
            for document in series:
                if document.tag != f"{{{ITI}}}DocumentRequest":
                    raise bad(f"{document.tag} where a DocumentRequest belongs")
                request.documents.append(_document_request(document, study_uid, series_uid, bad))
    names = [c.tag for c in syntaxes]
    request.transfer_syntaxes = [(c.text or "").strip() for c in syntaxes]
    if not names or set(names) != {f"{{{RAD}}}TransferSyntaxUID"} or not all(request.transfer_syntaxes):
        raise bad("TransferSyntaxUIDList holds one or more TransferSyntaxUID")


def _document_request(element: ET.Element, study: str, series: str, bad: Any) -> DocumentRequest:
    fields = [(c.tag.removeprefix(f"{{{ITI}}}"), (c.text or "").strip()) for c in element]
    names = [name for name, _ in fields]
    if names not in (["RepositoryUniqueId", "DocumentUniqueId"],
                     ["HomeCommunityId", "RepositoryUniqueId", "DocumentUniqueId"]):
        raise bad(f"a DocumentRequest holds {names}: [HomeCommunityId,] RepositoryUniqueId, DocumentUniqueId")
    values = dict(fields)
    if not all(values.values()):
        raise bad(f"a DocumentRequest with an empty value: {values}")
    return DocumentRequest(study, series, values["DocumentUniqueId"], values["RepositoryUniqueId"],
                           values.get("HomeCommunityId"))


# -- the answer ------------------------------------------------------------------------

_SOAP_TYPE = {"Content-Type": "application/soap+xml; charset=UTF-8"}


def _envelope(body: str, relates_to: str) -> bytes:
    relates = f"<wsa:RelatesTo>{escape(relates_to)}</wsa:RelatesTo>" if relates_to else ""
    return (f'<?xml version="1.0" encoding="UTF-8"?>'
            f'<env:Envelope xmlns:env="{SOAP12}" xmlns:wsa="{WSA}"><env:Header>'
            f'<wsa:Action env:mustUnderstand="true">{RESPONSE_ACTION}</wsa:Action>'
            f"<wsa:MessageID>urn:uuid:{uuid.uuid4()}</wsa:MessageID>{relates}</env:Header>"
            f"<env:Body>{body}</env:Body></env:Envelope>").encode()


def _response(status: str, errors: list[tuple[str, str, str]], documents: str) -> str:
    error_list = "".join(f"<rs:RegistryError errorCode={quoteattr(code)} codeContext={quoteattr(context)} "
                         f'location={quoteattr(location)} severity="{ERROR}"/>' for code, context, location in errors)
    if error_list:
        error_list = f'<rs:RegistryErrorList highestSeverity="{ERROR}">{error_list}</rs:RegistryErrorList>'
    return (f'<xdsb:RetrieveDocumentSetResponse xmlns:xdsb="{ITI}" xmlns:rs="{RS}">'
            f'<rs:RegistryResponse status="{status}">{error_list}</rs:RegistryResponse>'
            f"{documents}</xdsb:RetrieveDocumentSetResponse>")


def _document_response(d: DocumentRequest, document: str, home: str | None) -> str:
    community = f"<xdsb:HomeCommunityId>{escape(home)}</xdsb:HomeCommunityId>" if home else ""
    return (f"<xdsb:DocumentResponse>{community}"
            f"<xdsb:RepositoryUniqueId>{escape(d.repository)}</xdsb:RepositoryUniqueId>"
            f"<xdsb:DocumentUniqueId>{escape(d.document)}</xdsb:DocumentUniqueId>"
            f"<xdsb:mimeType>application/dicom</xdsb:mimeType>"
            f"<xdsb:Document>{document}</xdsb:Document></xdsb:DocumentResponse>")


def _fault(code: str, subcode: str | None, reason: str) -> bytes:
    sub = (f'<env:Subcode><env:Value xmlns:wsa="{WSA}">{subcode}</env:Value></env:Subcode>' if subcode else "")
    return (f'<?xml version="1.0" encoding="UTF-8"?><env:Envelope xmlns:env="{SOAP12}"><env:Body><env:Fault>'
            f"<env:Code><env:Value>env:{code}</env:Value>{sub}</env:Code>"
            f'<env:Reason><env:Text xml:lang="en">{escape(reason)}</env:Text></env:Reason>'
            f"</env:Fault></env:Body></env:Envelope>").encode()


def _explicit_le(path: Path) -> bytes:
    """A native file (implicit VR, big endian, deflated) rewritten as explicit VR little endian."""
    ds = pydicom.dcmread(path)
    if ds.file_meta.TransferSyntaxUID == ExplicitVRBigEndian:
        swap_to_little_endian(ds)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out = io.BytesIO()
    pydicom.dcmwrite(out, ds, enforce_file_format=True)  # not save_as: it refuses to change endianness
    return out.getvalue()


class _Drop(Exception):
    """The answer stops here: the connection is closed mid-body."""


def _pieces(pieces: list[bytes | Path], cut: int | None) -> Iterator[bytes]:
    for i, piece in enumerate(pieces):
        if isinstance(piece, bytes):
            data: Iterable[bytes] = [piece]
        else:
            data = _read(piece)
        if i == cut:
            whole = b"".join(data)
            yield whole[:len(whole) // 2]
            raise _Drop
        yield from data


def _read(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(READ):
            yield chunk


def _send(handler: BaseHTTPRequestHandler, status: int, headers: dict[str, str], body: bytes) -> None:
    handler.send_response(status)
    for name, value in headers.items():
        handler.send_header(name, value)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def _stream(handler: BaseHTTPRequestHandler, content_type: str, body: Iterable[bytes], chunk_size: int | None) -> None:
    """``body`` with chunked transfer encoding, ``chunk_size`` bytes per chunk at most."""
    handler.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # 1-byte chunks, no Nagle waits
    handler.send_response(200)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Transfer-Encoding", "chunked")
    handler.end_headers()
    try:
        for piece in body:
            step = chunk_size or len(piece) or 1
            for at in range(0, len(piece), step):
                chunk = piece[at:at + step]
                handler.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        handler.wfile.write(b"0\r\n\r\n")
        handler.wfile.flush()
    except _Drop:
        handler.wfile.flush()
        handler.close_connection = True
    except (BrokenPipeError, ConnectionResetError):
        handler.close_connection = True
