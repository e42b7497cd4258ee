"""The frames of a Part-10 file's Pixel Data, as a static DICOMweb tree serves them (PS3.18 8.7.3).

``frames(path)`` yields every frame of the file, for every transfer syntax intake accepts;
``multipart_frame`` makes one of them the one-part ``multipart/related`` body a frame file
holds.

- Native Pixel Data (explicit and implicit VR little endian, deflated, explicit VR big
  endian) is cut into frames by pydicom's own frame function (``Decoder.iter_buffer``),
  which knows that YBR_FULL_422 holds two samples a pixel, not three. Big endian values
  are byte-swapped by their width (Bits Allocated; 8-bit values in OW by pairs of bytes,
  PS3.5 8.1.1), since every native frame is labelled explicit VR little endian
  (``1.2.840.10008.1.2.1``), ``application/octet-stream``. A 1-bit frame (a segmentation)
  need not begin on a byte boundary in the Pixel Data (PS3.5 8.1.1): it is re-packed to
  begin at the first bit of its first byte, the unused bits of its last byte zero, as it
  would be alone in an instance.
- Encapsulated Pixel Data gives one frame per frame, all its fragments joined (pydicom's
  ``generate_frames``: the Basic or Extended Offset Table, or the fragments themselves),
  labelled with the file's own transfer syntax and its media type (``MEDIA_TYPES``). A
  video (MPEG-2, MPEG-4 AVC, HEVC) is one frame: the whole stream.

Memory: the data set is read with values over ``DEFER_SIZE`` left on disk, and Pixel Data
is read one frame at a time from the file, native (little and big endian) and encapsulated
alike, so a 2 GB multi-frame needs about one frame in memory (two while a big endian frame
is swapped). Two exceptions: pydicom inflates a deflated data set whole into memory (its
frames are then cut from that), and a video's one frame is its whole stream.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from math import ceil
from pathlib import Path
from typing import Any, BinaryIO, cast

import numpy as np
import pydicom
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragments, generate_frames, parse_basic_offsets
from pydicom.filereader import read_file_meta_info
from pydicom.pixels import as_pixel_options, get_decoder, pack_bits, unpack_bits
from pydicom.pixels.decoders.base import DecodeRunner
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from bridge.errors import Truncated, Unparseable

NATIVE_SYNTAX = str(ExplicitVRLittleEndian)
OCTET_STREAM = "application/octet-stream"
DEFER_SIZE = 64 * 1024  # values longer than this stay on disk until asked for

_JPEG, _JLS, _JP2, _JPX, _HTJ2K = "image/jpeg", "image/jls", "image/jp2", "image/jpx", "image/jphc"
_MPEG2, _MP4 = "video/mpeg", "video/mp4"

MEDIA_TYPES: dict[str, str] = {
    "1.2.840.10008.1.2.4.50": _JPEG,  # baseline
    "1.2.840.10008.1.2.4.51": _JPEG,  # extended
    "1.2.840.10008.1.2.4.57": _JPEG,  # lossless
    "1.2.840.10008.1.2.4.70": _JPEG,  # lossless, first-order prediction
    "1.2.840.10008.1.2.4.80": _JLS,
    "1.2.840.10008.1.2.4.81": _JLS,
    "1.2.840.10008.1.2.4.90": _JP2,
    "1.2.840.10008.1.2.4.91": _JP2,
    "1.2.840.10008.1.2.4.92": _JPX,  # JPEG 2000 Part 2 multi-component
    "1.2.840.10008.1.2.4.93": _JPX,
    "1.2.840.10008.1.2.4.201": _HTJ2K,
    "1.2.840.10008.1.2.4.202": _HTJ2K,
    "1.2.840.10008.1.2.4.203": _HTJ2K,
    "1.2.840.10008.1.2.5": "image/dicom-rle",
    "1.2.840.10008.1.2.4.100": _MPEG2,
    "1.2.840.10008.1.2.4.100.1": _MPEG2,
    "1.2.840.10008.1.2.4.101": _MPEG2,
    "1.2.840.10008.1.2.4.101.1": _MPEG2,
    "1.2.840.10008.1.2.4.102": _MP4,
    "1.2.840.10008.1.2.4.102.1": _MP4,
    "1.2.840.10008.1.2.4.103": _MP4,
    "1.2.840.10008.1.2.4.103.1": _MP4,
    "1.2.840.10008.1.2.4.104": _MP4,
    "1.2.840.10008.1.2.4.104.1": _MP4,
    "1.2.840.10008.1.2.4.105": _MP4,
    "1.2.840.10008.1.2.4.105.1": _MP4,
    "1.2.840.10008.1.2.4.106": _MP4,
    "1.2.840.10008.1.2.4.106.1": _MP4,
    "1.2.840.10008.1.2.4.107": _MP4,  # HEVC
    "1.2.840.10008.1.2.4.108": _MP4,
}
"""The media type of an encapsulated transfer syntax's frames (PS3.18 8.7.3)."""

_PIXEL_KEYWORDS = {0x7FE00010: "PixelData", 0x7FE00008: "FloatPixelData", 0x7FE00009: "DoubleFloatPixelData"}
# PS3.5 7.3: a native big endian value's bytes are in the order of its width, Bits Allocated.
_BIG_ENDIAN = {16: ">u2", 32: ">u4", 64: ">u8"}


@dataclass(frozen=True)
class Frame:
    """One frame as a frame file holds it: ``number`` counts from 1, as in a frame URL."""

    number: int
    data: bytes
    content_type: str
    transfer_syntax: str


def media_type(transfer_syntax: str) -> tuple[str, str]:
    """The content type of the frames of a file in ``transfer_syntax``, and the transfer
    syntax they are labelled with: ``application/octet-stream`` and explicit VR little
    endian for every native syntax. Raises ``Unparseable`` for a syntax that has none."""
    uid = UID(transfer_syntax)
    if uid.is_transfer_syntax and not uid.is_encapsulated:
        return OCTET_STREAM, NATIVE_SYNTAX
    if (known := MEDIA_TYPES.get(str(uid))) is not None:
        return known, str(uid)
    raise Unparseable(f"no media type is known for frames in {uid.name} ({uid})")


def frames(path: Path) -> Iterator[Frame]:
    """Every frame of ``path``'s Pixel Data (or Float or Double Float Pixel Data), in order;
    none when it has no pixel data. See the module docstring for what each frame holds and
    what is kept in memory. Raises ``Unparseable`` when the data set or its pixel data cannot
    be read as described, ``Truncated`` when the file ends inside Pixel Data."""
    try:
        syntax = UID(read_file_meta_info(path).TransferSyntaxUID)
    except Exception as exc:
        raise Unparseable(f"cannot read the file meta information: {exc}") from exc
    content_type, label = media_type(syntax)
    defer = None if syntax == DeflatedExplicitVRLittleEndian else DEFER_SIZE
    with path.open("rb") as f:
        try:
            ds = pydicom.dcmread(f, defer_size=defer)
        except Exception as exc:
            raise Unparseable(f"cannot read the data set: {exc}") from exc
        tag = next((t for t in _PIXEL_KEYWORDS if t in ds), None)
        if tag is None:
            return
        elem = ds.get_item(tag, keep_deferred=True)
        if elem is None or not _length(elem):
            return
        options = _options(ds, syntax, _PIXEL_KEYWORDS[tag], elem)
        source = _source(f, elem)
        if syntax.is_encapsulated:
            data = _encapsulated(source, syntax, options)
        else:
            data = _native(source, _length(elem), options)
        for number, frame in enumerate(data, start=1):
            yield Frame(number, frame, content_type, label)


def new_boundary() -> str:
    """A boundary no frame's bytes will hold: ``BOUNDARY_<uuid4>``."""
    return f"BOUNDARY_{uuid.uuid4()}"


def multipart_content_type(frame: Frame, boundary: str) -> str:
    """The Content-Type of ``multipart_frame(frame, boundary)``'s body."""
    return f'multipart/related; type="{frame.content_type}"; boundary={boundary}'


def multipart_frame(frame: Frame, boundary: str) -> bytes:
    """The one-part ``multipart/related`` body of a frame file:
    ``--B CRLF Content-Type: <type>;transfer-syntax=<uid> CRLF CRLF <bytes> CRLF --B-- CRLF``.
    Raises ``ValueError`` if the frame's bytes hold the delimiter (use ``new_boundary()``)."""
    delimiter = f"\r\n--{boundary}".encode("ascii")
    if delimiter in frame.data:
        raise ValueError(f"frame {frame.number} holds the boundary {boundary!r}")
    head = f"--{boundary}\r\nContent-Type: {frame.content_type};transfer-syntax={frame.transfer_syntax}\r\n\r\n"
    return b"".join([head.encode("ascii"), frame.data, delimiter, b"--\r\n"])


def _length(elem: DataElement | RawDataElement) -> int:
    if isinstance(elem, RawDataElement) and elem.value is None:
        return int(elem.length)
    return len(elem.value or b"")


def _options(ds: Dataset, syntax: UID, keyword: str, elem: DataElement | RawDataElement) -> dict[str, Any]:
    """pydicom's decoding options: the Image Pixel module's values and where the value is."""
    try:
        options = as_pixel_options(ds, transfer_syntax_uid=syntax, pixel_keyword=keyword)
    except Exception as exc:
        raise Unparseable(f"cannot read the image pixel description: {exc}") from exc
    if elem.VR:
        options["pixel_vr"] = str(elem.VR)
    return options


def _source(f: BinaryIO, elem: DataElement | RawDataElement) -> BinaryIO:
    """The pixel data value as a file positioned at its first byte: the file itself when the
    value was left on disk, else the value read (small, or inflated)."""
    if isinstance(elem, RawDataElement) and elem.value is None:
        f.seek(elem.value_tell)
        return f
    return io.BytesIO(bytes(elem.value or b""))


def _native(source: BinaryIO, available: int, options: dict[str, Any]) -> Iterator[bytes]:
    syntax = UID(options["transfer_syntax_uid"])
    runner = DecodeRunner(syntax)
    try:
        runner.set_options(**options)
        count, bits = runner.number_of_frames, runner.bits_allocated
        length = runner.frame_length(unit="bytes")
    except Exception as exc:
        raise Unparseable(f"cannot read the image pixel description: {exc}") from exc
    if available < ceil(length * count):
        raise Unparseable(f"Pixel Data holds {available} bytes; {count} frames of this image need "
                          f"{ceil(length * count)}")
    if bits == 1:
        yield from _bit_packed(source, int(runner.frame_length(unit="pixels")), count)
        return
    length = int(length)
    big_endian = not syntax.is_little_endian
    pairs = big_endian and bits == 8 and options.get("pixel_vr") == "OW" and options["pixel_keyword"] == "PixelData"
    if big_endian and bits > 8 and bits not in _BIG_ENDIAN:
        raise Unparseable(f"big endian values of {bits} bits allocated cannot be byte-swapped")
    buffers = get_decoder(syntax).iter_buffer(source, **options)
    for index, (buffer, _) in enumerate(buffers):
        data = bytes(buffer)
        if len(data) < length + (length % 2 if pairs else 0):
            raise Truncated(f"the file ends in frame {index + 1} of its Pixel Data")
        if pairs:
            # pydicom hands 8-bit OW frames over whole words: one byte more, before an odd
            # frame's start or after an even one's end, when a frame's length is odd.
            odd = length % 2 and index % 2
            data = _swap(data, ">u2")[odd : odd + length]
        elif big_endian and bits > 8:
            data = _swap(data, _BIG_ENDIAN[bits])
        yield data


def _bit_packed(source: BinaryIO, pixels: int, count: int) -> Iterator[bytes]:
    # pydicom's own cut of one 1-bit frame (the bytes that hold it, neighbours' bits and all)
    # is a byte short when a frame starts late in a byte and its length in bits is not a
    # multiple of 8 (3-pixel frames: the third starts at bit 6 and needs two bytes).
    start = source.tell()
    for index in range(count):
        first = index * pixels
        size = (first + pixels + 7) // 8 - first // 8
        source.seek(start + first // 8)
        data = source.read(size)
        if len(data) < size:
            raise Truncated(f"the file ends in frame {index + 1} of its Pixel Data")
        if first % 8 == 0 and pixels % 8 == 0:
            yield data
            continue
        bits = cast(np.ndarray, unpack_bits(data, as_array=True))
        yield pack_bits(bits[first % 8 : first % 8 + pixels], pad=False)


def _encapsulated(source: BinaryIO, syntax: UID, options: dict[str, Any]) -> Iterator[bytes]:
    count = int(options["number_of_frames"])
    try:
        if MEDIA_TYPES.get(str(syntax)) in (_MPEG2, _MP4):
            parse_basic_offsets(source)
            yield b"".join(generate_fragments(source))
            return
        found = 0
        for frame in islice(generate_frames(source, number_of_frames=count,
                                            extended_offsets=options.get("extended_offsets")), count):
            found += 1
            yield frame
    except ValueError as exc:
        raise Unparseable(f"cannot read the encapsulated Pixel Data: {exc}") from exc
    if found < count:
        raise Unparseable(f"the encapsulated Pixel Data holds {found} frames, Number of Frames says {count}")


def _swap(data: bytes, dtype: str) -> bytes:
    return np.frombuffer(data, dtype=dtype).byteswap().tobytes()
