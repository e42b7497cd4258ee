"""Reading what intake and destinations need from Part-10 files, without Pixel Data."""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import BinaryIO

from pydicom import dcmread
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

from bridge.errors import IntakeError
from bridge.uids import is_valid_uid

# Values longer than this stay on disk until asked for: the header of a 2 GB
# multi-frame instance costs kilobytes.
_DEFER = 16 * 1024


def read_header(path: Path) -> Dataset:
    """The file's meta and data set up to, not including, Pixel Data.

    Raises ``IntakeError(0xC000)`` when the file cannot be parsed.
    """
    try:
        with open(path, "rb") as f:
            ds = dcmread(f, stop_before_pixels=True, defer_size=_DEFER)
            stop = f.tell()  # at the Pixel Data tag, if there is one
            # Values are converted lazily, when a rule or the index asks for them:
            # converting all of them here would double the cost of a C-STORE.
            if not _pixel_data_complete(f, ds, stop):
                raise IntakeError(0xC000, "data set is truncated in Pixel Data")
    except IntakeError:
        raise
    except (InvalidDicomError, EOFError, ValueError, KeyError, OSError, NotImplementedError) as exc:
        raise IntakeError(0xC000, f"cannot parse data set: {type(exc).__name__}") from exc
    except Exception as exc:  # pydicom raises many kinds on garbage; all mean the same here
        raise IntakeError(0xC000, f"cannot parse data set: {type(exc).__name__}") from exc
    return ds


def required_uids(ds: Dataset) -> tuple[str, str, str, str]:
    """(SOP Class, SOP Instance, Study, Series) UIDs, each valid, or ``IntakeError(0xC000)``."""
    values = []
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        # ``text`` reads the raw value without pydicom's conversion, whose own validation
        # (a regular expression per UID) is a fifth of this function's cost and repeats
        # the check below.
        value = text(ds, keyword)
        if not value:
            raise IntakeError(0xC000, f"missing {keyword}")
        if not is_valid_uid(value):
            raise IntakeError(0xC000, f"invalid {keyword}")
        values.append(value)
    return values[0], values[1], values[2], values[3]


# What the archive index and queue listings keep of each instance besides its UIDs
# (SpooledInstance.attributes). Intake reads them from the header it has parsed anyway,
# so no destination needs to parse the file again.
INDEX_KEYWORDS = (
    "PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate", "PatientSex",
    "StudyDate", "StudyTime", "AccessionNumber", "StudyID", "StudyDescription", "ReferringPhysicianName",
    "Modality", "SeriesNumber", "SeriesDescription", "BodyPartExamined", "InstanceNumber",
)

_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM",
                       "UC", "UI", "UR", "UT"})


def text(ds: Dataset, keyword: str) -> str:
    """A tag's value as plain text ('' when absent; values of a multi-valued tag joined
    by backslashes, as encoded); never raises.

    A text value still raw from the file and plain ASCII is decoded directly: through
    pydicom, each value's conversion and validation costs ~15 us of Python, and intake
    reads sixteen of them per instance. Anything else (another character set, a value
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


def _pixel_data_complete(f: BinaryIO, ds: Dataset, stop: int) -> bool:
    """Whether the Pixel Data element (if any) fits in the file: a truncated file fails.

    ``dcmread(stop_before_pixels=True)`` leaves ``f`` at the Pixel Data tag. Only element
    and item headers are read (seeks, not the pixel bytes), so this costs the same for
    a 2 GB multi-frame as for a thumbnail. Deflated data sets are not checked here.
    """
    ts = ds.file_meta.get("TransferSyntaxUID")
    if ts is None or ts.is_deflated:
        return True
    end = f.seek(0, os.SEEK_END)
    f.seek(stop, os.SEEK_SET)
    order = "<" if ts.is_little_endian else ">"
    head = f.read(8)
    if len(head) < 8:
        return True  # no Pixel Data: nothing to check
    group, element = struct.unpack(order + "HH", head[:4])
    if (group, element) not in ((0x7FE0, 0x0010), (0x7FE0, 0x0008), (0x7FE0, 0x0009)):
        return True
    if ts.is_implicit_VR:
        length = struct.unpack(order + "L", head[4:8])[0]
    elif head[4:6] in (b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN", b"UT", b"SQ", b"UC", b"UR"):
        rest = f.read(4)
        if len(rest) < 4:
            return False
        length = struct.unpack(order + "L", rest)[0]
    else:
        length = struct.unpack(order + "H", head[6:8])[0]
    if length != 0xFFFFFFFF:
        return f.tell() + length <= end
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

