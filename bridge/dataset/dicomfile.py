"""Reading what intake and destinations need from Part-10 files, without Pixel Data."""

from __future__ import annotations

import io
import os
import struct
from pathlib import Path
from typing import BinaryIO

from pydicom import dcmread
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag

from bridge.dataset.uids import is_valid_uid
from bridge.errors import InboundError, InvalidUid, MissingUid, NotDicom, Truncated, Unparseable

# Values longer than this stay on disk until asked for: the header of a 2 GB
# multi-frame instance costs kilobytes.
_DEFER = 16 * 1024


def read_header(path: Path) -> Dataset:
    """The file's meta and data set up to, not including, Pixel Data.

    Raises ``Truncated`` when the file ends before its data set does, ``Unparseable``
    (or ``NotDicom``) when it cannot be parsed otherwise.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(_HEAD)
            end = os.fstat(f.fileno()).st_size
            ds, stop = _read_from_head(head, end)
            if ds is None:
                f.seek(0)
                ds = read_plain_part10(f)
                if ds is None:
                    f.seek(0)
                    ds = dcmread(f, stop_before_pixels=True, defer_size=_DEFER)
                stop = f.tell()  # at the Pixel Data tag, if there is one
            # Values are converted lazily, when a rule or the index asks for them:
            # converting all of them here would double the cost of a C-STORE.
            if not _pixel_data_complete(f, ds, stop, end, head):
                raise Truncated("data set is truncated in Pixel Data")
            cut = _cut_after_last(f, ds, end) if stop >= end else None
            if cut:
                raise Truncated(cut)
    except InboundError:
        raise
    except Exception as exc:  # pydicom raises many kinds on garbage; all mean the same here
        raise unparseable("cannot parse data set", exc) from exc
    return ds


def unparseable(what: str, exc: Exception) -> Unparseable:
    """``what`` failed with ``exc`` while pydicom read a file: ``Truncated`` when the file
    ended first (``EOFError``), ``NotDicom`` when it is not Part 10, else ``Unparseable``;
    the reason names the exception's type."""
    kind = Truncated if isinstance(exc, EOFError) else NotDicom if isinstance(exc, InvalidDicomError) else Unparseable
    return kind(f"{what}: {type(exc).__name__}")


# The header is parsed from the file's first bytes, read at once: pydicom asks the file
# for its position before every element, and each of those is a system call that lets
# go of the GIL (one C-STORE's header: sixty of them, each a chance for another thread
# to take the GIL from intake). A header that does not end within them is read from the
# file.
_HEAD = 64 * 1024


def _read_from_head(head: bytes, size: int) -> tuple[FileDataset | None, int]:
    """(the header, where it stopped) parsed from ``head``, the first bytes of a file of
    ``size`` bytes; (None, 0) unless the header is plain Part 10 and ends within them."""
    buffer = io.BytesIO(head)
    try:
        ds = read_plain_part10(buffer)
    except Exception:
        return None, 0  # the file will say what is wrong
    stop = buffer.tell()
    if ds is None or (stop + 12 > len(head) and len(head) < size):
        return None, 0  # may have stopped at the end of ``head``, not at Pixel Data
    return ds, stop


# VRs whose explicit-VR element header has a 4-byte length (PS3.5 7.1.2).
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
# Transfer syntaxes a data set is read in as it is: (implicit VR, little endian).
# Any other standard syntax is explicit VR little endian (encapsulated pixel data).
_ENCODINGS = {
    "1.2.840.10008.1.2": (True, True),
    "1.2.840.10008.1.2.1": (False, True),
    "1.2.840.10008.1.2.2": (False, False),
}
_READ_AS_IS = ("1.2.840.10008.1.2.4.", "1.2.840.10008.1.2.5")  # JPEG family, RLE
_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00009, 0x7FE00008})


def _at_pixel_data(tag: int, vr: str | None, length: int) -> bool:
    return tag in _PIXEL_TAGS


def read_plain_part10(f: BinaryIO) -> FileDataset | None:
    """``dcmread(f, stop_before_pixels=True)`` for the common case, or None to let
    pydicom read the file (anything else: no preamble, File Meta not explicit VR little
    endian, an unknown, deflated or private transfer syntax, a Command Set in the file).

    The same data set, read by pydicom's own ``read_dataset``; the difference is the
    File Meta Information, whose seven elements pydicom converts and validates at once
    (a regular expression per UID, a third of reading a CT header). Here they stay raw,
    converted when asked for, like the rest of the header.
    """
    preamble = f.read(128)
    if f.read(4) != b"DICM":
        return None
    meta: dict[BaseTag, DataElement | RawDataElement] = {}
    while True:
        head = f.read(8)
        if len(head) < 8:
            return None
        group, element = struct.unpack("<HH", head[:4])
        if group != 2:
            f.seek(-8, os.SEEK_CUR)
            break
        vr = head[4:6]
        if vr in _LONG_VRS:
            extra = f.read(4)
            if len(extra) < 4:
                return None
            (length,) = struct.unpack("<L", extra)
        elif vr.isalpha() and vr.isupper():
            (length,) = struct.unpack("<H", head[6:8])
        else:
            return None  # implicit VR File Meta: pydicom knows what to make of it
        if length > _DEFER:
            return None
        value_tell = f.tell()
        value = f.read(length)
        if len(value) < length:
            return None
        tag = BaseTag((group << 16) | element)
        meta[tag] = RawDataElement(tag, vr.decode("ascii"), length, value, value_tell, False, True)
    syntax = meta.get(BaseTag(0x00020010))
    if syntax is None or not isinstance(syntax.value, bytes):
        return None
    uid = syntax.value.rstrip(b"\x00 ").decode("ascii", "replace")
    encoding = _ENCODINGS.get(uid) or ((False, True) if uid.startswith(_READ_AS_IS) else None)
    if encoding is None:
        return None
    peek = f.read(4)
    if len(peek) < 4 or struct.unpack("<H" if encoding[1] else ">H", peek[:2])[0] == 0:
        return None  # an empty data set, or a Command Set stored in the file
    f.seek(-4, os.SEEK_CUR)
    implicit, little = encoding
    dataset = read_dataset(f, implicit, little, stop_when=_at_pixel_data, defer_size=_DEFER)
    ds = FileDataset(f, dataset, preamble, FileMetaDataset(meta), implicit, little)
    ds.set_original_encoding(implicit, little, dataset._character_set)
    return ds


def required_uids(ds: Dataset) -> tuple[str, str, str, str]:
    """(SOP Class, SOP Instance, Study, Series) UIDs, each valid; else ``MissingUid`` or
    ``InvalidUid``."""
    values = []
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        # ``text`` reads the raw value without pydicom's conversion, whose own validation
        # (a regular expression per UID) is a fifth of this function's cost and repeats
        # the check below.
        value = text(ds, keyword)
        if not value:
            raise MissingUid(keyword)
        if not is_valid_uid(value):
            raise InvalidUid(keyword)
        values.append(value)
    return values[0], values[1], values[2], values[3]


# What the archive index and queue listings keep of each instance besides its UIDs
# (SpooledInstance.attributes). Ingest reads them from the header it has parsed anyway,
# so no destination needs to parse the file again; each costs intake about 2 us.
INDEX_KEYWORDS = (
    "PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate", "PatientSex",
    "StudyDate", "StudyTime", "AccessionNumber", "StudyID", "StudyDescription", "ReferringPhysicianName",
    "Modality", "SeriesNumber", "SeriesDescription", "BodyPartExamined", "SeriesDate", "SeriesTime",
    "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime", "InstanceNumber",
)

_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM",
                       "UC", "UI", "UR", "UT"})


def text(ds: Dataset, keyword: str) -> str:
    """A tag's value as plain text ('' when absent; values of a multi-valued tag joined
    by backslashes, as encoded); never raises.

    A text value still raw from the file and plain ASCII is decoded directly: through
    pydicom, each value's conversion and validation costs ~15 us of Python, and intake
    reads twenty of them per instance. Anything else (another character set, a value
    already converted, a deferred one) goes through pydicom.
    """
    tag = tag_for_keyword(keyword)
    try:
        if tag is None:
            return ""
        element = ds.get_item(tag)
        if element is None:
            return ""
        if isinstance(element, RawDataElement):
            raw = element.value
            if isinstance(raw, bytes) and raw.isascii() and b"\x1b" not in raw \
                    and (element.VR or dictionary_VR(tag)) in _TEXT_VRS:
                return raw.decode("ascii").strip(" \x00")
        value = ds[tag].value
    except Exception:
        return ""
    if value is None:
        return ""
    if isinstance(value, MultiValue | list):
        return "\\".join(str(v) for v in value)
    return str(value)


def attributes(ds: Dataset) -> dict[str, str]:
    """The ``INDEX_KEYWORDS`` values of a header, as text; absent or empty ones left out."""
    found = {}
    for keyword in INDEX_KEYWORDS:
        value = text(ds, keyword)
        if value:
            found[keyword] = value
    return found


def _cut_after_last(f: BinaryIO, ds: Dataset, end: int) -> str | None:
    """Why a data set that the reader took to end with the file of ``end`` bytes was cut
    short, or None: its last element's value goes past the end of the file, or a few
    bytes follow it, too few for another element (the next one's header, cut). Unknown
    (None) after a sequence of undefined length, and in a deflated data set (its offsets
    are in the inflated stream)."""
    if not ds:
        return _cut_in_meta(ds, end)
    ts = ds.file_meta.get("TransferSyntaxUID")
    if ts is None or ts.is_deflated:
        return None
    tag = max(ds.keys())
    last = ds.get_item(tag)
    if not isinstance(last, RawDataElement) or last.length == 0xFFFFFFFF or last.value_tell is None:
        return None
    value_end = last.value_tell + last.length
    if value_end > end:
        return f"data set is truncated in its header, within {BaseTag(tag)}"
    if value_end == end:
        return None
    f.seek(value_end, os.SEEK_SET)
    pixel_tag = b"\xe0\x7f\x10\x00" if ts.is_little_endian else b"\x7f\xe0\x00\x10"
    if f.read(4) == pixel_tag:
        return "data set is truncated in Pixel Data"
    return f"data set is truncated in its header, after {BaseTag(tag)}"


def _cut_in_meta(ds: Dataset, end: int) -> str | None:
    """For a data set read as empty: whether the file of ``end`` bytes ends within its File
    Meta Information (after the preamble, ``DICM`` and the group length element, PS3.10
    7.1), or within the first element after it."""
    try:
        length = ds.file_meta.get("FileMetaInformationGroupLength")
    except Exception:
        return None
    if not isinstance(length, int):
        return None
    if end < 144 + length:
        return "data set is truncated in its File Meta Information"
    if end > 144 + length:
        return "data set is truncated in its header, in its first element"
    return None


def _pixel_data_complete(f: BinaryIO, ds: Dataset, stop: int, end: int, head: bytes = b"") -> bool:
    """Whether the Pixel Data element (if any) fits in the file of ``end`` bytes: a
    truncated file fails.

    ``stop`` is where reading the header stopped: at the Pixel Data tag, if there is
    one. Only element and item headers are read (from ``head``, the file's first bytes,
    where they are there; else seeks in ``f``, not the pixel bytes), so this costs the
    same for a 2 GB multi-frame as for a thumbnail. Deflated data sets are not checked.
    """
    ts = ds.file_meta.get("TransferSyntaxUID")
    if ts is None or ts.is_deflated:
        return True
    order = "<" if ts.is_little_endian else ">"
    if stop + 12 <= len(head):
        head_at = head[stop:stop + 12]
    else:
        f.seek(stop, os.SEEK_SET)
        head_at = f.read(12)
    if len(head_at) < 8:
        return True  # no Pixel Data: nothing to check
    group, element = struct.unpack(order + "HH", head_at[:4])
    if (group, element) not in ((0x7FE0, 0x0010), (0x7FE0, 0x0008), (0x7FE0, 0x0009)):
        return True
    if ts.is_implicit_VR or not head_at[4:6].isalpha():  # pydicom reads implicit VR where it finds it
        length, value_at = struct.unpack(order + "L", head_at[4:8])[0], stop + 8
    elif head_at[4:6] in (b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN", b"UT", b"SQ", b"UC", b"UR"):
        if len(head_at) < 12:
            return False
        length, value_at = struct.unpack(order + "L", head_at[8:12])[0], stop + 12
    else:
        length, value_at = struct.unpack(order + "H", head_at[6:8])[0], stop + 8
    if length != 0xFFFFFFFF:
        return value_at + length <= end
    f.seek(value_at, os.SEEK_SET)
    while True:  # encapsulated: walk the items to the sequence delimiter
        item = f.read(8)
        if len(item) < 8:
            return False
        group, element, item_length = struct.unpack(order + "HHL", item)
        if (group, element) == (0xFFFE, 0xE0DD):
            return True
        if (group, element) != (0xFFFE, 0xE000) or f.tell() + item_length > end:
            return False
        f.seek(item_length, os.SEEK_CUR)
