"""RAD-69 on the wire (IHE RAD TF-3 4.69, XDS-I.b Retrieve Imaging Document Set): the
request a consumer sends, and what a RegistryError of the answer means.

The request is SOAP 1.2 with the WS-Addressing headers the WSDL requires (``Action``
with mustUnderstand, a fresh ``MessageID``, ``To``, ``ReplyTo`` anonymous), an optional
``wsse:Security`` header holding a SAML assertion, and a
``RetrieveImagingDocumentSetRequest`` body whose elements follow the schema's order:
``StudyRequest`` > ``SeriesRequest`` > ``DocumentRequest`` (``HomeCommunityId``?,
``RepositoryUniqueId``, ``DocumentUniqueId``), then ``TransferSyntaxUIDList``. It is sent
as MTOM/XOP (multipart/related with ``start`` and ``start-info``, the spec's packaging)
or as a plain ``application/soap+xml`` body. A request is small: it is built in memory.

The answer is read by ``bridge.sources.rad69_answer``.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from xml.etree import ElementTree as ET
from xml.sax.saxutils import escape, quoteattr

SOAP = "http://www.w3.org/2003/05/soap-envelope"
SOAP11 = "http://schemas.xmlsoap.org/soap/envelope/"  # only read: a gateway's Fault may come in SOAP 1.1
WSA = "http://www.w3.org/2005/08/addressing"
WSSE = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-secext-1.0.xsd"
XDSI = "urn:ihe:rad:xdsi-b:2009"
XDSB = "urn:ihe:iti:xds-b:2007"
RS = "urn:oasis:names:tc:ebxml-regrep:xsd:rs:3.0"
RIM = "urn:oasis:names:tc:ebxml-regrep:xsd:rim:3.0"
XOP = "http://www.w3.org/2004/08/xop/include"
ACTION = "urn:ihe:rad:2009:RetrieveImagingDocumentSet"
ANONYMOUS = "http://www.w3.org/2005/08/addressing/anonymous"

SUCCESS = "urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Success"
FAILURE = "urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Failure"
PARTIAL_SUCCESS = "urn:ihe:iti:2007:ResponseStatusType:PartialSuccess"


@dataclass(frozen=True)
class DocumentRequest:
    """One document asked for: a SOP instance of a series of a study."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str


@dataclass(frozen=True)
class Request:
    """A request ready to POST: its body and the Content-Type that goes with it."""

    body: bytes
    content_type: str
    message_id: str


def envelope(url: str, documents: Sequence[DocumentRequest], repository_unique_id: str,
             transfer_syntaxes: Sequence[str], home_community_id: str | None = None,
             saml_assertion: str | None = None, message_id: str | None = None) -> tuple[str, str]:
    """The SOAP 1.2 envelope (text) asking ``url`` for ``documents``, grouped by study,
    then series, in the order first met; and its ``wsa:MessageID`` (fresh unless given).
    ``saml_assertion`` is XML placed as it is inside ``wsse:Security``."""
    message_id = message_id or f"urn:uuid:{uuid.uuid4()}"
    studies: dict[str, dict[str, list[str]]] = {}
    for doc in documents:
        studies.setdefault(doc.study_uid, {}).setdefault(doc.series_uid, []).append(doc.sop_instance_uid)
    security = ""
    if saml_assertion is not None:
        security = f'<wsse:Security xmlns:wsse="{WSSE}" s:mustUnderstand="true">{saml_assertion.strip()}' \
                   "</wsse:Security>"
    community = f"<xdsb:HomeCommunityId>{escape(home_community_id)}</xdsb:HomeCommunityId>" \
        if home_community_id else ""
    repository = f"<xdsb:RepositoryUniqueId>{escape(repository_unique_id)}</xdsb:RepositoryUniqueId>"
    body: list[str] = []
    for study, series_map in studies.items():
        body.append(f"<xdsi:StudyRequest studyInstanceUID={quoteattr(study)}>")
        for series, sops in series_map.items():
            body.append(f"<xdsi:SeriesRequest seriesInstanceUID={quoteattr(series)}>")
            body += [f"<xdsb:DocumentRequest>{community}{repository}<xdsb:DocumentUniqueId>{escape(sop)}"
                     "</xdsb:DocumentUniqueId></xdsb:DocumentRequest>" for sop in sops]
            body.append("</xdsi:SeriesRequest>")
        body.append("</xdsi:StudyRequest>")
    body.append("<xdsi:TransferSyntaxUIDList>")
    body += [f"<xdsi:TransferSyntaxUID>{escape(ts)}</xdsi:TransferSyntaxUID>" for ts in transfer_syntaxes]
    body.append("</xdsi:TransferSyntaxUIDList>")
    text = (
        f'<?xml version="1.0" encoding="UTF-8"?>'
        f'<s:Envelope xmlns:s="{SOAP}" xmlns:a="{WSA}">'
        f"<s:Header>"
        f'<a:Action s:mustUnderstand="true">{ACTION}</a:Action>'
        f"<a:MessageID>{escape(message_id)}</a:MessageID>"
        f"<a:ReplyTo><a:Address>{ANONYMOUS}</a:Address></a:ReplyTo>"
        f'<a:To s:mustUnderstand="true">{escape(url)}</a:To>'
        f"{security}"
        f"</s:Header>"
        f"<s:Body>"
        f'<xdsi:RetrieveImagingDocumentSetRequest xmlns:xdsi="{XDSI}" xmlns:xdsb="{XDSB}">'
        f"{''.join(body)}"
        f"</xdsi:RetrieveImagingDocumentSetRequest>"
        f"</s:Body>"
        f"</s:Envelope>"
    )
    return text, message_id


def request(url: str, documents: Sequence[DocumentRequest], repository_unique_id: str,
            transfer_syntaxes: Sequence[str], packaging: str = "mtom", home_community_id: str | None = None,
            saml_assertion: str | None = None) -> Request:
    """The whole request body for ``url``: the envelope as the MTOM/XOP root part
    (``packaging="mtom"``) or as a plain SOAP 1.2 body (``"plain"``). SOAP 1.2 carries
    the action in the media type's ``action`` parameter, not a SOAPAction header."""
    text, message_id = envelope(url, documents, repository_unique_id, transfer_syntaxes, home_community_id,
                                saml_assertion)
    xml = text.encode("utf-8")
    if packaging == "plain":
        return Request(xml, f'application/soap+xml; charset=UTF-8; action="{ACTION}"', message_id)
    boundary = f"MIMEBoundary_{secrets.token_hex(16)}"
    root_id = f"root.{secrets.token_hex(8)}@dicom-bridge"
    head = (f"--{boundary}\r\n"
            f'Content-Type: application/xop+xml; charset=UTF-8; type="application/soap+xml"\r\n'
            f"Content-Transfer-Encoding: binary\r\n"
            f"Content-ID: <{root_id}>\r\n\r\n").encode("ascii")
    body = head + xml + f"\r\n--{boundary}--\r\n".encode("ascii")
    content_type = (f'multipart/related; type="application/xop+xml"; start="<{root_id}>"; '
                    f'start-info="application/soap+xml"; action="{ACTION}"; boundary="{boundary}"')
    return Request(body, content_type, message_id)


def check_assertion(text: str) -> str:
    """``text`` when it is one well-formed XML element (a SAML assertion); ``ValueError``
    otherwise, before anything is sent."""
    text = text.strip()
    if text.startswith("<?xml"):
        text = text.split("?>", 1)[1].strip()
    try:
        ET.fromstring(text)
    except ET.ParseError as exc:
        raise ValueError(f"not well-formed XML: {exc}") from None
    return text


# -- RegistryError --------------------------------------------------------------------

MISSING = "missing document"
CONFIGURATION = "configuration"
TRANSFER_SYNTAX = "transfer syntax not available"
OTHER = "error"

_MISSING_CODES = ("XDSMissingDocument", "XDSDocumentUniqueIdError")
_CONFIGURATION_CODES = ("XDSUnknownRepositoryId", "XDSUnknownCommunity", "XDSMissingHomeCommunityId")
_SYNTAX_CODES = ("urn:dicom:wado:0006", "urn:dicom:wado:0007")
_SYNTAX_WORDS = ("transfer syntax", "transfersyntax", "transfer-syntax")


@dataclass(frozen=True)
class RegistryError:
    """One ``rs:RegistryError`` of a ``RegistryResponse``."""

    code: str
    context: str = ""
    location: str = ""
    severity: str = ""

    @property
    def warning(self) -> bool:
        return self.severity.endswith(":Warning")

    @property
    def kind(self) -> str:
        """What the error means, whichever code a server uses for it: ``MISSING``,
        ``CONFIGURATION``, ``TRANSFER_SYNTAX`` or ``OTHER``."""
        code = self.code.strip()
        if code in _MISSING_CODES:
            return MISSING
        if code in _CONFIGURATION_CODES:
            return CONFIGURATION
        if code in _SYNTAX_CODES or (code == "XDSRepositoryError"
                                     and any(w in self.context.lower() for w in _SYNTAX_WORDS)):
            return TRANSFER_SYNTAX
        return OTHER

    def describe(self) -> str:
        """``missing document (XDSMissingDocument: the text)``, on one line, short."""
        context = " ".join(self.context.split())[:200]
        return f"{self.kind} ({self.code}{': ' + context if context else ''})"


def status_kind(status: str) -> str:
    """``Success``, ``PartialSuccess`` or ``Failure`` (or the status itself when it is
    none of these): any status ending in ``:PartialSuccess`` is partial, whichever
    namespace prefix it comes under."""
    for kind in ("PartialSuccess", "Success", "Failure"):
        if status.strip().endswith(f":{kind}"):
            return kind
    return status.strip() or "(no status)"
