"""Streaming multipart/related (RFC 2387, RFC 2046 section 5.1), both ways.

STOW-RS sends instances as a multipart/related body, and WADO-RS and RAD-69 answer with
one. dicomweb-client builds whole bodies in memory (and reads whole responses), which a
2 GB multi-frame instance cannot afford; so this part is ours:

- ``MultipartBody`` streams parts from files. It knows its length before the first byte
  (the sum of the parts), so requests sends a ``Content-Length`` instead of chunked
  transfer encoding, which some gateways refuse. Each iteration opens the files afresh:
  a retry sends a fresh body.
- ``MultipartReader`` parses a body incrementally, whatever the sizes of the chunks it
  is fed: part headers as they complete, part data as it arrives (never a whole part
  held), so a part can be written to a file as it comes.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import Any

CHUNK = 1 << 20  # bytes per read from a part's file, and the size small parts are gathered to
MAX_HEADER_BYTES = 64 * 1024  # one part's header block; more is not a sane body


class MultipartError(ValueError):
    """A body that does not parse as multipart, or a part file that is not as described."""


def content_type_params(value: str) -> tuple[str, dict[str, str]]:
    """``multipart/related; type="application/dicom"; boundary=x`` -> media type and
    parameters (names lower-cased, quotes removed)."""
    message = Message()
    message["content-type"] = value
    params = {str(k).lower(): str(v) for k, v in message.get_params([])[1:]}
    return message.get_content_type(), params


# -- writing ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FilePart:
    """A part whose content is the first ``size`` bytes of ``path``."""

    path: Path
    size: int
    content_type: str = "application/dicom"


class MultipartBody:
    """A multipart/related body streamed from files.

    Iterate for the bytes (chunks of about ``CHUNK``; small parts gathered together);
    ``len()`` is the exact length, which requests sends as Content-Length. Every
    iteration reads the files again from the start.
    """

    def __init__(self, parts: Sequence[FilePart], root_type: str = "application/dicom",
                 boundary: str | None = None) -> None:
        # 32 random hex digits: a body cannot be scanned for a collision before it is sent
        # (it may be gigabytes), and a chance of 2**-128 is not worth one.
        self.boundary = boundary or secrets.token_hex(16)
        self.parts = list(parts)
        self.content_type = f'multipart/related; type="{root_type}"; boundary={self.boundary}'
        self._length = sum(len(self._head(p)) + p.size + 2 for p in self.parts) + len(self._close())

    def _head(self, part: FilePart) -> bytes:
        return f"--{self.boundary}\r\nContent-Type: {part.content_type}\r\n\r\n".encode("ascii")

    def _close(self) -> bytes:
        return f"--{self.boundary}--\r\n".encode("ascii")

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[bytearray]:
        # Each file's bytes are read straight into the buffer that is sent (``readinto``,
        # which runs without the GIL), never copied again: gathering whole instances
        # into larger chunks cost two copies of every byte under the GIL. Small pieces
        # (part headers, small files) are still gathered, up to ``CHUNK``.
        pending = bytearray()
        for part in self.parts:
            pending += self._head(part)
            with open(part.path, "rb", buffering=0) as f:
                remaining = part.size
                while remaining:
                    n = min(remaining, CHUNK - len(pending))
                    if n >= _SMALL and len(pending) >= _SMALL:  # send what is gathered, then read
                        yield pending
                        pending = bytearray()
                        n = min(remaining, CHUNK)
                    pending = _read_after(f, pending, n, part)
                    remaining -= n
                    if len(pending) >= CHUNK:
                        yield pending
                        pending = bytearray()
            pending += b"\r\n"
        pending += self._close()
        yield pending


_SMALL = 64 * 1024  # pieces smaller than this are gathered; larger ones are read in place


def _read_after(f: Any, pending: bytearray, n: int, part: FilePart) -> bytearray:
    """``pending`` followed by the next ``n`` bytes of ``f``, read in place."""
    buffer = bytearray(len(pending) + n)
    buffer[:len(pending)] = pending
    view = memoryview(buffer)[len(pending):]
    try:
        while view:
            got = f.readinto(view)
            if not got:
                raise MultipartError(f"{part.path} is shorter than {part.size} bytes")
            view = view[got:]
    finally:
        view.release()
    return buffer


# -- reading ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PartStart:
    """A part begins; header names are lower-cased."""

    headers: dict[str, str]


@dataclass(frozen=True)
class PartData:
    data: bytes


@dataclass(frozen=True)
class PartEnd:
    pass


Event = PartStart | PartData | PartEnd

_PREAMBLE, _AFTER_DELIMITER, _HEADERS, _BODY, _EPILOGUE = range(5)


class MultipartReader:
    """An incremental multipart parser: ``feed`` bytes as they come, get events back.

    Events come in the order ``PartStart``, any number of ``PartData``, ``PartEnd``, per
    part. ``close`` checks that the closing delimiter was seen.
    """

    def __init__(self, boundary: str) -> None:
        if not 0 < len(boundary) <= 70:  # RFC 2046 section 5.1.1
            raise MultipartError("a boundary has 1 to 70 characters")
        self._delimiter = b"\r\n--" + boundary.encode("ascii")
        # The delimiter is CRLF "--" boundary; a body may open with one without the CRLF.
        self._buffer = bytearray(b"\r\n")
        self._state = _PREAMBLE

    @property
    def done(self) -> bool:
        return self._state == _EPILOGUE

    def feed(self, data: bytes) -> list[Event]:
        if self._state == _EPILOGUE:
            return []
        self._buffer += data
        events: list[Event] = []
        while self._step(events):
            pass
        return events

    def close(self) -> None:
        if self._state != _EPILOGUE:
            raise MultipartError("the body ends before its closing boundary")

    def _step(self, events: list[Event]) -> bool:
        """Parse what the buffer allows; False when more bytes are needed."""
        buffer, delimiter = self._buffer, self._delimiter
        if self._state in (_PREAMBLE, _BODY):
            at = buffer.find(delimiter)
            if at < 0:
                keep = len(delimiter) - 1  # a delimiter may straddle this chunk and the next
                if len(buffer) > keep:
                    if self._state == _BODY:
                        events.append(PartData(bytes(buffer[:-keep])))
                    del buffer[:-keep]
                return False
            if self._state == _BODY:
                if at:
                    events.append(PartData(bytes(buffer[:at])))
                events.append(PartEnd())
            del buffer[:at + len(delimiter)]
            self._state = _AFTER_DELIMITER
            return True
        if self._state == _AFTER_DELIMITER:
            if len(buffer) < 2:
                return False
            if buffer[:2] == b"--":
                self._state = _EPILOGUE
                buffer.clear()
                return False
            end = buffer.find(b"\r\n")
            if end < 0:
                if len(buffer) > 1024:
                    raise MultipartError("no line break after a boundary")
                return False
            if buffer[:end].strip(b" \t"):  # only transport padding may follow a boundary
                raise MultipartError("text after a boundary on its line")
            del buffer[:end + 2]
            self._state = _HEADERS
            return True
        if self._state == _HEADERS:
            if buffer[:2] == b"\r\n":  # a part without headers
                end, skip = 0, 2
            else:
                end, skip = buffer.find(b"\r\n\r\n"), 4
            if end < 0:
                if len(buffer) > MAX_HEADER_BYTES:
                    raise MultipartError(f"part headers longer than {MAX_HEADER_BYTES} bytes")
                return False
            events.append(PartStart(_headers(bytes(buffer[:end]))))
            del buffer[:end + skip]
            self._state = _BODY
            return True
        buffer.clear()  # the epilogue is ignored
        return False


def _headers(block: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    name = ""
    for line in block.decode("latin-1").split("\r\n") if block else []:
        if line[:1] in (" ", "\t") and name:  # folded onto the previous header
            headers[name] += " " + line.strip()
            continue
        key, colon, value = line.partition(":")
        if not colon:
            raise MultipartError(f"not a header line: {line[:80]!r}")
        name = key.strip().lower()
        headers[name] = value.strip()
    return headers


def iter_events(chunks: Iterable[bytes], boundary: str) -> Iterator[Event]:
    """Events of a whole body given as chunks; ``MultipartError`` if it is cut short."""
    reader = MultipartReader(boundary)
    for chunk in chunks:
        yield from reader.feed(chunk)
    reader.close()


@dataclass
class Part:
    headers: dict[str, str]
    body: bytes = field(repr=False)


def read_parts(chunks: Iterable[bytes], boundary: str) -> list[Part]:
    """Every part of a body, in memory: for small bodies only (responses, tests)."""
    parts: list[Part] = []
    pieces: list[bytes] = []
    for event in iter_events(chunks, boundary):
        if isinstance(event, PartStart):
            parts.append(Part(event.headers, b""))
            pieces = []
        elif isinstance(event, PartData):
            pieces.append(event.data)
        else:
            parts[-1].body = b"".join(pieces)
    return parts
