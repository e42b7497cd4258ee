"""A RAD-69 answer read as a stream (``RetrieveDocumentSetResponse``, IHE ITI TF-2b
3.43 as used by RAD TF-3 4.69): fed the HTTP body chunk by chunk, whatever their sizes,
it hands over each document as a complete file as soon as it can, and at the end says
what the ``RegistryResponse`` said.

- **MTOM/XOP** (``multipart/related``). The root part is the one the ``start``
  parameter names (with or without ``<>``), else the first; it is parsed as XML as it
  arrives. Every other part goes to a temporary file as it arrives and is matched to
  its ``DocumentResponse`` by Content-ID (``Content-ID`` or ``Content-Id``, with or
  without ``<>``) against the ``xop:Include href`` after ``cid:``, URL-decoded: never by
  order. Parts that come before the root are kept on disk until it has come.
- **Plain SOAP** (``application/soap+xml``, also an error-only answer on HTTP 200, and a
  SOAP Fault). The XML goes to an ``XMLPullParser`` chunk by chunk, except the text of
  each ``Document`` element: a small scanner over the raw bytes takes that base64 text
  out of the stream and decodes it into a temporary file as it arrives, so neither the
  body nor one document is ever held in memory (only a tag, or a few bytes of base64,
  at a time). Each ``DocumentResponse`` is dropped from the parsed tree once read.

Temporary files are the reader's until handed over (``feed`` returns them); ``discard``
removes the rest (a body cut short, a caller that stops). A body that is not a RAD-69
answer (not SOAP, broken XML or multipart, cut short) raises ``AnswerError``.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import tempfile
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import unquote
from xml.etree import ElementTree as ET

from bridge.sources.rad69_wire import SOAP, SOAP11, RegistryError
from bridge.web.multipart import MultipartError, MultipartReader, PartData, PartStart, content_type_params

SOAP_TYPES = ("application/soap+xml", "application/xop+xml", "text/xml", "application/xml")
MAX_TAG = 64 * 1024  # one tag (with its attributes), a comment or a processing instruction


class AnswerError(ValueError):
    """A body that is not a readable RAD-69 answer."""


@dataclass(frozen=True)
class Document:
    """A document that came complete: its file (the receiver's now) and what its
    ``DocumentResponse`` said of it."""

    document_unique_id: str
    repository_unique_id: str
    home_community_id: str
    mime_type: str
    path: Path


@dataclass
class Answer:
    """What the answer said besides its documents: the ``RegistryResponse`` status and
    errors, or a SOAP Fault; the DocumentResponses whose content never came
    (``absent``: their DocumentUniqueIds), and oddities worth a log line."""

    status: str = ""
    errors: list[RegistryError] = field(default_factory=list)
    fault: str = ""
    absent: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def content_id(value: str) -> str:
    """A Content-ID or an ``href``'s ``cid:`` as compared: URL-decoded, without ``<>``."""
    value = value.strip()
    if value[:4].lower() == "cid:":
        value = value[4:]
    return unquote(value.strip()).strip().strip("<>").strip()


@dataclass
class _Response:
    """One ``DocumentResponse`` as parsed: its content by reference (``href``) or inline (``path``)."""

    document_unique_id: str
    repository_unique_id: str
    home_community_id: str
    mime_type: str
    href: str = ""
    path: Path | None = None

    def document(self, path: Path) -> Document:
        return Document(self.document_unique_id, self.repository_unique_id, self.home_community_id, self.mime_type,
                        path)


class AnswerReader:
    """Read one answer whose Content-Type is ``content_type``; temporary files go to
    ``folder``, named ``{prefix}...``. ``feed`` the body's chunks, then ``finish``;
    ``discard`` always (a ``finally``): it removes what was not handed over."""

    def __init__(self, content_type: str, folder: Path, prefix: str = "rad69-") -> None:
        media, params = content_type_params(content_type) if content_type else ("", {})
        self.folder, self.prefix = folder, prefix
        self.answer = Answer()
        self._soap: _Soap | None = None
        self._multipart: MultipartReader | None = None
        self._owned: set[Path] = set()  # files not handed over yet
        self._wanted: dict[str, _Response] = {}  # by Content-ID, once the root is read
        if media == "multipart/related":
            if not params.get("boundary"):
                raise AnswerError("a multipart/related answer without a boundary")
            try:
                self._multipart = MultipartReader(params["boundary"])
            except MultipartError as exc:
                raise AnswerError(str(exc)) from None
            self._start = content_id(params.get("start", ""))
            self._root_done = False
            self._parts = 0
            self._part: tuple[str, Path, BinaryIO] | None = None  # a non-root part being written
            self._in_root = False
            self._spooled: dict[str, Path] = {}  # parts complete before the root was
        elif media in SOAP_TYPES:
            self._soap = _Soap(self._temp)
        else:
            raise AnswerError(f"a {media or 'no Content-Type'} answer, neither SOAP nor MTOM multipart")

    # -- feeding ---------------------------------------------------------------------

    def feed(self, data: bytes) -> list[Document]:
        """The documents ``data`` completed, each a file the caller now owns."""
        try:
            if self._multipart is None:
                assert self._soap is not None
                return self._responses(self._soap.feed(data))
            return self._feed_multipart(data)
        except MultipartError as exc:
            raise AnswerError(f"the multipart body: {exc}") from None

    def finish(self) -> Answer:
        """After the last chunk: the answer's status, errors and what never came.
        ``AnswerError`` when the body ended early."""
        try:
            if self._multipart is not None:
                self._multipart.close()
                if not self._root_done:
                    raise AnswerError("no SOAP root part" + (f" with Content-ID {self._start}" if self._start else ""))
                for cid, path in self._spooled.items():
                    self._drop(path)
                    self.answer.problems.append(f"a part no DocumentResponse refers to (Content-ID {cid})")
                self._spooled.clear()
            else:
                assert self._soap is not None
                self._responses(self._soap.close())
                if self._wanted:
                    self.answer.problems.append("xop:Include in a SOAP body that is not multipart")
        except MultipartError as exc:
            raise AnswerError(f"the multipart body: {exc}") from None
        self.answer.absent += [r.document_unique_id for r in self._wanted.values()]
        self._wanted.clear()
        assert self._soap is not None
        self.answer.status, self.answer.errors, self.answer.fault = \
            self._soap.status, self._soap.errors, self._soap.fault
        return self.answer

    def discard(self) -> None:
        """Remove every file not handed over (the part being written among them)."""
        if self._multipart is not None and self._part is not None:
            self._part[2].close()
            self._part = None
        if self._soap is not None:
            self._soap.abandon()
        for path in list(self._owned):
            self._drop(path)

    # -- multipart -------------------------------------------------------------------

    def _feed_multipart(self, data: bytes) -> list[Document]:
        assert self._multipart is not None
        done: list[Document] = []
        for event in self._multipart.feed(data):
            if isinstance(event, PartStart):
                self._parts += 1
                cid = content_id(event.headers.get("content-id", ""))
                if not self._root_done and self._soap is None and (cid == self._start if self._start
                                                                     else self._parts == 1):
                    self._soap, self._in_root = _Soap(self._temp), True
                else:
                    path, out = self._temp()
                    self._part = (cid, path, out)
            elif isinstance(event, PartData):
                if self._in_root:
                    assert self._soap is not None
                    done += self._responses(self._soap.feed(event.data))
                else:
                    assert self._part is not None
                    self._part[2].write(event.data)
            elif self._in_root:
                assert self._soap is not None
                done += self._responses(self._soap.close())
                self._in_root, self._root_done = False, True
                for cid in [c for c in self._spooled if c in self._wanted]:
                    done.append(self._handed(self._wanted.pop(cid).document(self._spooled.pop(cid))))
            else:
                assert self._part is not None
                cid, path, out = self._part
                out.close()
                self._part = None
                if not self._root_done:
                    if cid in self._spooled:
                        self._stray(path, f"a second part with Content-ID {cid}")
                    else:
                        self._spooled[cid] = path
                elif (response := self._wanted.pop(cid, None)) is not None:
                    done.append(self._handed(response.document(path)))
                else:
                    self._stray(path, f"a part no DocumentResponse refers to (Content-ID {cid or 'none'})")
        return done

    def _responses(self, responses: list[_Response]) -> list[Document]:
        """DocumentResponses of the root: inline ones are complete, the others wait for their part."""
        done = []
        for response in responses:
            if response.path is not None:
                done.append(self._handed(response.document(response.path)))
            elif response.href:
                cid = content_id(response.href)
                if cid in self._wanted:
                    self.answer.problems.append(f"two DocumentResponses refer to Content-ID {cid}")
                    self.answer.absent.append(response.document_unique_id)
                else:
                    self._wanted[cid] = response
            else:
                self.answer.absent.append(response.document_unique_id)
        return done

    # -- files -----------------------------------------------------------------------

    def _temp(self) -> tuple[Path, BinaryIO]:
        fd, name = tempfile.mkstemp(prefix=self.prefix, suffix=".dcm", dir=self.folder)
        path = Path(name)
        self._owned.add(path)
        return path, os.fdopen(fd, "wb")

    def _handed(self, document: Document) -> Document:
        self._owned.discard(document.path)
        return document

    def _drop(self, path: Path) -> None:
        self._owned.discard(path)
        path.unlink(missing_ok=True)

    def _stray(self, path: Path, problem: str) -> None:
        self._drop(path)
        self.answer.problems.append(problem)


# -- the SOAP envelope, with base64 Document content taken out of the XML stream --------

_NORMAL, _BASE64 = range(2)
_DOCUMENT_TAG = re.compile(rb"<(?:[\w.-]+:)?Document(?=[\s/>])")
_TAG = re.compile(rb"<[^\"'>]*(?:(?:\"[^\"]*\"|'[^']*')[^\"'>]*)*>")
_ENTITY = re.compile(rb"&[^;&<]{0,10};")
_WHITESPACE = b" \t\r\n"


class _Soap:
    """A SOAP 1.2 envelope fed in chunks (see the module docstring): yields the
    DocumentResponses as each ends, and keeps the status, the errors and a Fault."""

    def __init__(self, temp: Callable[[], tuple[Path, BinaryIO]]) -> None:
        self._temp = temp
        self._parser: ET.XMLPullParser = ET.XMLPullParser(events=("start", "end"))
        self._buffer = bytearray()
        self._state = _NORMAL
        self._inline: deque[Path | None] = deque()  # one per Document start tag, in order
        self._out: BinaryIO | None = None
        self._path: Path | None = None
        self._base64 = bytearray()  # undecoded base64 (fewer than 4 significant characters)
        self._seen_text = False  # a Document's content began with base64 (not a child element)
        self._stack: list[ET.Element] = []
        self._document: Path | None = None  # the content of the last Document ended
        self._root = ""
        self.status = ""
        self.errors: list[RegistryError] = []
        self.fault = ""
        self._fault_code = ""
        self._fault_reason = ""

    def feed(self, data: bytes) -> list[_Response]:
        self._buffer += data
        responses: list[_Response] = []
        while self._step(responses):
            pass
        return responses

    def close(self) -> list[_Response]:
        responses: list[_Response] = []
        if self._state == _BASE64 or self._buffer.strip():
            if self._buffer.strip():  # a last tag still held back
                self._to_parser(bytes(self._buffer), responses)
                self._buffer.clear()
            if self._state == _BASE64:
                raise AnswerError("the SOAP body ends inside a Document")
        try:
            self._parser.close()
        except ET.ParseError as exc:
            raise AnswerError(f"the SOAP body ends early: {exc}") from None
        responses += self._events()
        if not self._root:
            raise AnswerError("an empty SOAP body")
        return responses

    def abandon(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None

    # -- the raw scanner -------------------------------------------------------------

    def _step(self, responses: list[_Response]) -> bool:
        buffer = self._buffer
        if self._state == _NORMAL:
            at = buffer.find(b"<")
            if at < 0:
                if buffer:
                    self._to_parser(bytes(buffer), responses)
                    buffer.clear()
                return False
            if at:
                self._to_parser(bytes(buffer[:at]), responses)
                del buffer[:at]
            end = self._markup_end()
            if end < 0:
                if len(buffer) > MAX_TAG:
                    raise AnswerError(f"a tag longer than {MAX_TAG} bytes")
                return False
            tag = bytes(buffer[:end])
            del buffer[:end]
            self._to_parser(tag, responses)
            if _DOCUMENT_TAG.match(tag):
                if tag.endswith(b"/>"):
                    self._inline.append(None)
                else:
                    self._state, self._seen_text = _BASE64, False
            return True
        # _BASE64: the Document's text, up to the next markup
        if not self._seen_text:
            stripped = buffer.lstrip(_WHITESPACE)
            if not stripped:
                return False
            if stripped[:1] == b"<" and stripped[:2] != b"</":  # a child (xop:Include): not inline content
                if len(stripped) < 2:
                    return False
                self._inline.append(None)
                self._state = _NORMAL
                return True
            self._seen_text = True
            self._path, self._out = self._temp()
        at = buffer.find(b"<")
        text = bytes(buffer if at < 0 else buffer[:at])
        amp = text.rfind(b"&")
        if amp >= 0 and b";" not in text[amp:] and at < 0:  # an entity not complete yet
            text = text[:amp]
        del buffer[:len(text)]
        self._decode(_ENTITY.sub(b"", text), last=False)
        if at < 0 or len(buffer) < 2:
            return False
        if buffer[:2] != b"</":
            raise AnswerError("markup inside a Document's base64 content")
        self._decode(b"", last=True)
        assert self._out is not None
        self._out.close()
        self._inline.append(self._path)
        self._out = self._path = None
        self._state = _NORMAL
        return True

    def _markup_end(self) -> int:
        """Where the markup at the start of the buffer ends (past its ``>``), or -1."""
        buffer = self._buffer
        for opener, closer in ((b"<!--", b"-->"), (b"<![CDATA[", b"]]>"), (b"<?", b"?>")):
            if buffer.startswith(opener):
                end = buffer.find(closer, len(opener))
                return end + len(closer) if end >= 0 else -1
            if opener.startswith(bytes(buffer)):
                return -1  # too few bytes to tell
        match = _TAG.match(buffer)
        return match.end() if match else -1

    def _decode(self, text: bytes, last: bool) -> None:
        self._base64 += text.translate(None, _WHITESPACE)
        usable = len(self._base64) if last else len(self._base64) // 4 * 4
        if not usable:
            return
        try:
            data = base64.b64decode(bytes(self._base64[:usable]), validate=True)
        except binascii.Error as exc:
            raise AnswerError(f"a Document's content is not base64: {exc}") from None
        del self._base64[:usable]
        assert self._out is not None
        self._out.write(data)

    # -- the XML ---------------------------------------------------------------------

    def _to_parser(self, data: bytes, responses: list[_Response]) -> None:
        try:
            self._parser.feed(data)
        except ET.ParseError as exc:
            raise AnswerError(f"the SOAP body is not well-formed XML: {exc}") from None
        responses += self._events()

    def _events(self) -> list[_Response]:
        responses: list[_Response] = []
        try:
            events: list[Any] = list(self._parser.read_events())
        except ET.ParseError as exc:
            raise AnswerError(f"the SOAP body is not well-formed XML: {exc}") from None
        for event, element in events:
            namespace, _, name = element.tag.rpartition("}")
            if event == "start":
                if not self._stack:
                    self._root = name
                    if name != "Envelope":
                        raise AnswerError(f"not a SOAP envelope: the root element is {name}")
                self._stack.append(element)
                if name == "RegistryResponse":
                    self.status = element.get("status", "").strip()
                continue
            self._stack.pop()
            if name == "Document":
                self._document = self._inline.popleft() if self._inline else None
            elif name == "DocumentResponse":
                responses.append(self._response(element))
                element.clear()
                if self._stack:
                    self._stack[-1].remove(element)
            elif name == "RegistryError":
                self.errors.append(RegistryError(
                    code=element.get("errorCode", "").strip(),
                    context=(element.get("codeContext") or element.text or "").strip(),
                    location=element.get("location", "").strip(), severity=element.get("severity", "").strip()))
            elif (namespace == "{" + SOAP and name == "Value" and self._stack[-1:]
                  and self._stack[-1].tag.endswith("}Code")) or (not namespace and name == "faultcode"):
                self._fault_code = self._fault_code or (element.text or "").strip()
            elif (namespace == "{" + SOAP and name == "Text" and self._stack[-1:]
                  and self._stack[-1].tag.endswith("}Reason")) or (not namespace and name == "faultstring"):
                self._fault_reason = self._fault_reason or " ".join((element.text or "").split())
            elif namespace in ("{" + SOAP, "{" + SOAP11) and name == "Fault":
                self.fault = f"{self._fault_code or 'env:Receiver'}: {self._fault_reason or '(no reason given)'}"
        return responses

    def _response(self, element: ET.Element) -> _Response:
        def text(local: str) -> str:
            for child in element:
                if child.tag.rpartition("}")[2] == local:
                    return (child.text or "").strip()
            return ""

        href = ""
        for child in element:
            if child.tag.rpartition("}")[2] == "Document":
                for include in child.iter():
                    if include.tag.rpartition("}")[2] == "Include":
                        href = include.get("href", "")
        path, self._document = self._document, None
        return _Response(text("DocumentUniqueId"), text("RepositoryUniqueId"), text("HomeCommunityId"),
                         text("mimeType"), href, None if href else path)

