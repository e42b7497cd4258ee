"""WADO-RS (PS3.18 10.4) answers, part by part into temporary files, each checked once
it is complete.

dicomweb-client's retrieve reads a whole answer into memory, and every part with it,
which a series of 2 GB multi-frame instances cannot afford: so this is ours, on the
streaming reader of ``bridge.web.multipart``. A part's bytes go to its file as they
arrive; nothing larger than one read from the connection is held.

A part is taken when it is a Part-10 file (``dicomfile.read_header``: File Meta
Information, a data set that is not cut short) with a SOP Instance UID. A part that is a
bare data set (no preamble, no File Meta Information, as some servers send) is made
into a Part-10 file: its transfer syntax is the part's ``transfer-syntax`` parameter, or
read from the data set itself when its pixel data is not compressed.
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
import time
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pydicom import dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomFileLike
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from bridge.dataset import dicomfile
from bridge.errors import InboundError, MissingUid, NotDicom
from bridge.model import InstanceRef
from bridge.web.multipart import Event, MultipartError, PartData, PartEnd, PartStart, content_type_params, iter_events

# The instances as stored (``transfer-syntax=*``, PS3.18 8.7.3.5.2): a server that
# transcodes may lose information (a lossy syntax) and costs its time and ours.
ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
CHUNK = 256 * 1024  # the most bytes one read of an answer gives
HEARTBEAT = 2.0  # seconds between the Nones ``parts`` yields while a part is still arriving


def series_path(study_uid: str, series_uid: str) -> str:
    return f"/studies/{study_uid}/series/{series_uid}"


def instance_path(ref: InstanceRef) -> str:
    return f"/studies/{ref.study_uid}/series/{ref.series_uid}/instances/{ref.sop_instance_uid}"


@dataclass(frozen=True)
class Part:
    """One complete part: a Part-10 file at ``path`` holding the instance
    ``sop_instance_uid`` (the receiver's file now: it sends or removes it), or, with no
    ``path``, the ``problem`` that made it unusable (its file removed)."""

    path: Path | None
    sop_instance_uid: str = ""
    problem: str = ""


def parts(chunks: Iterable[bytes], content_type: str, folder: Path, prefix: str) -> Generator[Part | None, None, None]:
    """The parts of a WADO-RS answer whose body is ``chunks`` and whose Content-Type is
    ``content_type`` (multipart/related, or a single ``application/dicom``), each written
    to a new file in ``folder`` (named ``{prefix}...dcm``) and given as soon as it is
    complete, before the next one is read. ``None`` every ``HEARTBEAT`` seconds while
    a part is still arriving. ``MultipartError`` for an answer that is not multipart (or
    breaks its syntax); the errors of ``chunks`` (a read that fails or times out) pass
    through. Stopped early or failing, it removes the file of the part it was writing."""
    media, params = content_type_params(content_type) if content_type else ("", {})
    events: Iterable[Event]
    if media == "application/dicom":  # one instance, not wrapped in multipart
        events = _single(chunks, content_type)
    elif media.startswith("multipart/"):
        if not params.get("boundary"):
            raise MultipartError(f"a {media} answer without a boundary")
        events = iter_events(chunks, params["boundary"])
    else:
        raise MultipartError(f"a {media or 'no Content-Type'} answer, not multipart/related")
    out: BinaryIO | None = None
    path: Path | None = None
    headers: dict[str, str] = {}
    last = time.monotonic()
    try:
        for event in events:
            if isinstance(event, PartStart):
                fd, name = tempfile.mkstemp(prefix=prefix, suffix=".dcm", dir=folder)
                path, out, headers = Path(name), os.fdopen(fd, "wb"), event.headers
            elif isinstance(event, PartData):
                assert out is not None
                out.write(event.data)
                if time.monotonic() - last >= HEARTBEAT:
                    last = time.monotonic()
                    yield None
            else:
                assert out is not None and path is not None
                out.close()
                done, out, path = path, None, None
                yield checked(done, headers.get("content-type", ""))
                last = time.monotonic()
    finally:
        if out is not None:
            out.close()
        if path is not None:
            path.unlink(missing_ok=True)


def _single(chunks: Iterable[bytes], content_type: str) -> Iterator[Event]:
    yield PartStart({"content-type": content_type})
    for chunk in chunks:
        if chunk:
            yield PartData(chunk)
    yield PartEnd()


def checked(path: Path, content_type: str = "") -> Part:
    """The part in ``path``, checked (and made Part 10 when it is a bare data set);
    ``content_type`` is the part's own, whose ``transfer-syntax`` may say how a bare data
    set is encoded. The file is removed when it is not usable."""
    try:
        try:
            ds = dicomfile.read_header(path)
        except NotDicom:
            _add_file_meta(path, content_type)
            ds = dicomfile.read_header(path)
        if not ds.file_meta.get("TransferSyntaxUID"):
            raise NotDicom("no Transfer Syntax UID in its File Meta Information")
        uid = dicomfile.text(ds, "SOPInstanceUID")
        if not uid:
            raise MissingUid("SOPInstanceUID")
    except InboundError as exc:
        path.unlink(missing_ok=True)
        return Part(None, problem=exc.reason)
    return Part(path, uid)


def _add_file_meta(path: Path, content_type: str) -> None:
    """Rewrite ``path``, a data set without the preamble (and perhaps without File Meta
    Information), as a Part-10 file: preamble, File Meta Information, then the data set's
    bytes as they are. ``NotDicom`` when that cannot be done."""
    with open(path, "rb") as f:
        try:
            ds = dcmread(f, force=True, stop_before_pixels=True)
        except Exception as exc:  # pydicom raises many kinds on garbage
            raise dicomfile.unparseable("cannot parse data set", exc) from exc
        pixel_header = f.read(12)  # stopped at Pixel Data, if there is one
        f.seek(0)
        has_meta = f.read(2) == b"\x02\x00"
    syntax = str(ds.file_meta.get("TransferSyntaxUID", "") or "")
    if not syntax and content_type:
        syntax = content_type_params(content_type)[1].get("transfer-syntax", "").strip("*")
    if not syntax:
        syntax = _syntax_of(ds.original_encoding, pixel_header)
    if not (ds.get("SOPClassUID") and ds.get("SOPInstanceUID")):
        raise NotDicom("a data set without File Meta Information, and without its SOP Class or Instance UID")
    start = 0
    if has_meta:  # File Meta Information without the preamble
        length = ds.file_meta.get("FileMetaInformationGroupLength")
        if not isinstance(length, int):
            raise NotDicom("File Meta Information without the preamble, and without its group length")
        start = 12 + length
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = UID(syntax)
    fd, name = tempfile.mkstemp(prefix=path.stem + "-", suffix=".dcm", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out, open(path, "rb") as f:
            out.write(b"\x00" * 128 + b"DICM")
            write_file_meta_info(DicomFileLike(out), meta, enforce_standard=True)
            f.seek(start)
            shutil.copyfileobj(f, out, 1 << 20)
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise


def _syntax_of(encoding: tuple[bool | None, bool | None], pixel_header: bytes) -> str:
    """The transfer syntax of a bare data set read as ``encoding`` (implicit VR, little
    endian), whose Pixel Data element (if any) begins with ``pixel_header``: one of the
    uncompressed ones, or ``NotDicom`` when its pixel data is encapsulated (which of
    the compressed syntaxes cannot be told)."""
    implicit, little = encoding
    if implicit:
        return str(ImplicitVRLittleEndian)
    if len(pixel_header) == 12 and pixel_header[4:6] in (b"OB", b"OW") \
            and struct.unpack("<L" if little else ">L", pixel_header[8:12])[0] == 0xFFFFFFFF:
        raise NotDicom("a data set without File Meta Information whose compressed transfer syntax is not named "
                       "(no transfer-syntax in the part's Content-Type)")
    return str(ExplicitVRLittleEndian if little or little is None else ExplicitVRBigEndian)
