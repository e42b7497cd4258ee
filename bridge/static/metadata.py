"""A data set in the DICOM JSON model (PS3.18 Annex F), for a static tree's metadata
files and query objects.

What a reader of the tree gets:

- keys are eight uppercase hex digits, in ascending order at every level (items of
  sequences too); no group length elements (gggg,0000), no File Meta Information
  (group 0002);
- each attribute has ``vr`` and at most one of ``Value``, ``BulkDataURI``,
  ``InlineBinary``; an empty attribute (an empty sequence too) has ``vr`` only, and an
  empty value among several is ``null`` (F.2.5);
- multi-valued strings are separate values, padding trimmed; UT, ST, LT and UR are
  single-valued (PS3.5 6.4), a backslash in them is text;
- PN values are objects with ``Alphabetic``, ``Ideographic``, ``Phonetic``, empty
  groups left out (F.2.2);
- text is decoded with the Specific Character Set in force where it stands (an item's
  own, else its parent's), ISO 2022 code extensions included: pydicom decodes;
- AT values are uppercase eight-hex-digit strings;
- IS values are JSON integers and DS values JSON floats (as pydicom's
  ``Dataset.to_json_dict`` gives them); FL and FD are floats, the other binary number
  VRs integers;
- binary VRs (OB, OD, OF, OL, OV, OW, UN) are ``InlineBinary`` (base64) up to a
  threshold of raw bytes, a lower one for private tags; above it a ``BulkDataURI`` the
  caller's ``bulk`` callback makes (inside sequences too); Pixel Data, Float Pixel Data
  and Double Float Pixel Data of the data set itself are a ``BulkDataURI`` to its frames.

Deliberate deviations from PS3.18, for values JSON numbers cannot carry:

- an IS or DS value that does not parse as its VR (``1a``, ``1.5`` as IS), or a DS that
  is not finite, is kept as its original string: CP-1861 allows strings for them, and a
  reader then sees what the file holds rather than nothing;
- a non-finite FL or FD value is the string ``NaN``, ``Infinity`` or ``-Infinity``
  (what JavaScript's ``Number()`` reads back), since JSON has no such numbers.

The walker is our own rather than pydicom's ``Dataset.to_json_dict``, which is right
about string splitting, AT and valid numbers (and is what ``Dataset.from_json`` reads
back: the tests check the round trip) but, in pydicom 3.0, raises on an invalid IS or
DS value and on an empty value in a multi-valued PN, keeps empty PN groups as ``""``
and empty values among several as ``""`` instead of ``null``, gives an empty sequence
``"Value": []``, keeps group length elements, orders keys as the data set holds them
rather than sorted, writes NaN (invalid JSON) for non-finite floats, compares its one
threshold with the base64 length for public and private tags alike, and has no notion
of Pixel Data's frames URI. It reuses pydicom for everything below the element: value
parsing and splitting, character set decoding, PN components, ambiguous VR resolution.
"""

from __future__ import annotations

import base64
import copy
import json
import math
import re
from collections.abc import Callable, Iterable
from typing import Any, Literal

from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filewriter import correct_ambiguous_vr_element
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName

# bulk(tag, value, vr) -> the BulkDataURI for a binary value above the threshold.
BulkHandler = Callable[[int, bytes, str], str]

# Roughly what static-DICOMweb writers inline: a public binary value (an ICC profile, a
# small LUT) stays in the metadata; private blobs, often large and rarely read, go out
# much sooner.
THRESHOLD = 128 * 1024
PRIVATE_THRESHOLD = 1024

BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
INT_VRS = frozenset({"US", "SS", "UL", "SL", "UV", "SV"})
FLOAT_VRS = frozenset({"FL", "FD"})

# Float Pixel Data, Double Float Pixel Data, Pixel Data.
PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})

# PS3.5 Table 6.2-1: what IS and DS may hold (Python's int() and float() take more:
# "1_000", "nan", "infinity").
_IS = re.compile(r" *[+-]?[0-9]+ *")
_DS = re.compile(r" *[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)? *")

Level = Literal["STUDY", "SERIES", "INSTANCE"]

# The attributes of each level's query object (without the counts and
# ModalitiesInStudy, which the caller computes over the level's instances). Instance:
# the image pixel description (PS3.3 C.7.6.3) that viewers read to lay out a grid
# before fetching any metadata.
QUERY_KEYWORDS: dict[str, tuple[str, ...]] = {
    "STUDY": (
        "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
        "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber",
        "StudyDescription", "ReferringPhysicianName",
    ),
    "SERIES": (
        "StudyInstanceUID", "SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription",
        "SeriesDate", "SeriesTime", "BodyPartExamined",
    ),
    "INSTANCE": (
        "SOPClassUID", "SOPInstanceUID", "InstanceNumber", "Rows", "Columns", "NumberOfFrames",
        "SamplesPerPixel", "PhotometricInterpretation", "PlanarConfiguration", "BitsAllocated",
        "BitsStored", "HighBit", "PixelRepresentation",
    ),
}
_QUERY_TAGS = {level: frozenset(tag_for_keyword(k) or 0 for k in kws) for level, kws in QUERY_KEYWORDS.items()}


def to_json(
    ds: Dataset,
    bulk: BulkHandler | None = None,
    threshold: int = THRESHOLD,
    *,
    private_threshold: int = PRIVATE_THRESHOLD,
    pixel_uri: str | None = None,
) -> dict[str, dict[str, Any]]:
    """``ds`` in the DICOM JSON model, as the module docstring describes.

    A binary value longer than ``threshold`` bytes (``private_threshold`` for a private
    tag) becomes ``{"BulkDataURI": bulk(tag, value, vr)}``; when ``bulk`` is None every
    binary value is inline. Pixel Data (and its float forms) of ``ds`` itself becomes
    ``{"BulkDataURI": pixel_uri}`` whatever its size (``./frames`` for instance metadata,
    ``./instances/I/frames`` for series metadata); without ``pixel_uri`` it is treated as
    any other binary value. Pixel Data inside a sequence (an icon image) is never
    frames: it goes through ``bulk``."""
    walker = _Walker(bulk, threshold, private_threshold)
    return walker.dataset(ds, None, pixel_uri)


def query_object(ds: Dataset, level: Level) -> dict[str, dict[str, Any]]:
    """The attributes of ``ds`` that a ``level`` query object lists (``QUERY_KEYWORDS``),
    in the encoding of ``to_json``; those ``ds`` lacks are left out. Counts and
    ModalitiesInStudy are the caller's to add."""
    if level not in _QUERY_TAGS:
        raise ValueError(f"query level must be STUDY, SERIES or INSTANCE, not {level!r}")
    return _Walker(None, THRESHOLD, PRIVATE_THRESHOLD).dataset(ds, _QUERY_TAGS[level], None)


def dumps(obj: Any) -> bytes:
    """Compact UTF-8 JSON: no spaces, non-ASCII text as itself. Raises ValueError for a
    NaN or infinity, which JSON cannot hold (``to_json`` never gives one)."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")


class _Walker:
    def __init__(self, bulk: BulkHandler | None, threshold: int, private_threshold: int) -> None:
        self.bulk = bulk
        self.threshold = threshold
        self.private_threshold = private_threshold

    def dataset(self, ds: Dataset, only: frozenset[int] | None, pixel_uri: str | None) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for tag in sorted(ds.keys()):
            if tag & 0xFFFF == 0 or tag >> 16 == 0x0002 or (only is not None and tag not in only):
                continue
            # Item access, not iteration over values: it converts a raw element with the
            # character set in force here and resolves an ambiguous VR if it can.
            out[f"{tag:08X}"] = self.element(ds[tag], ds, pixel_uri if tag in PIXEL_TAGS else None)
        return out

    def element(self, elem: DataElement, ds: Dataset, pixel_uri: str | None) -> dict[str, Any]:
        vr = _vr(elem, ds)
        if elem.is_empty:
            return {"vr": vr}
        value = elem.value
        if vr == "SQ":
            return {"vr": vr, "Value": [self.dataset(item, None, None) for item in value]}
        if vr in BINARY_VRS:
            return {"vr": vr, **self.binary(elem.tag, bytes(value), vr, pixel_uri)}
        return {"vr": vr, "Value": [_value(v, vr) for v in _values(value)]}

    def binary(self, tag: int, value: bytes, vr: str, pixel_uri: str | None) -> dict[str, str]:
        if pixel_uri is not None:
            return {"BulkDataURI": pixel_uri}
        limit = self.private_threshold if (tag >> 16) % 2 else self.threshold
        if self.bulk is not None and len(value) > limit:
            return {"BulkDataURI": self.bulk(tag, value, vr)}
        return {"InlineBinary": base64.b64encode(value).decode("ascii")}


def _vr(elem: DataElement, ds: Dataset) -> str:
    """The element's one VR. pydicom resolves ``US or SS`` and the like from the data set
    (Pixel Representation, Bits Allocated) when an element is read; one built in code
    may still carry the dictionary's alternatives."""
    vr = str(elem.VR)
    if " or " in vr:
        # On a copy: the caller's data set is not ours to change.
        vr = str(correct_ambiguous_vr_element(copy.copy(elem), ds, True).VR)
    return vr.split(" or ")[0]


def _values(value: Any) -> Iterable[Any]:
    return value if isinstance(value, MultiValue | list | tuple) else (value,)


def _value(v: Any, vr: str) -> Any:
    """One value of a non-binary, non-sequence element; ``None`` (``null``) when empty."""
    if v is None or v == "":
        return None
    if vr == "PN":
        return _person_name(v)
    if vr == "AT":
        return f"{int(v):08X}"
    if vr == "IS":
        # pydicom's IS is an int; a value it could not read is a str (or ISfloat for
        # 1.5), and so are the valid ones beside an invalid one in a multi-valued element.
        if isinstance(v, int):
            return int(v)
        return int(v) if isinstance(v, str) and _IS.fullmatch(v) else _original(v)
    if vr == "DS":
        # DSfloat or DSdecimal, else a str as for IS.
        if isinstance(v, str):
            return float(v) if _DS.fullmatch(v) and math.isfinite(float(v)) else v
        number = float(v)
        return number if math.isfinite(number) else _original(v)
    if vr in INT_VRS:
        return int(v)
    if vr in FLOAT_VRS:
        number = float(v)
        if math.isnan(number):
            return "NaN"
        return number if math.isfinite(number) else ("Infinity" if number > 0 else "-Infinity")
    # Text VRs; DA, DT and TM as the file wrote them even with pydicom's datetime_conversion on.
    return v if isinstance(v, str) else _original(v)


def _original(v: Any) -> str:
    original = getattr(v, "original_string", None)
    return original if isinstance(original, str) else str(v)


def _person_name(v: Any) -> dict[str, str] | None:
    """F.2.2: the component groups that are not empty, decoded."""
    name = v if isinstance(v, PersonName) else PersonName(v)
    groups = dict(zip(("Alphabetic", "Ideographic", "Phonetic"), name.components, strict=False))
    kept = {k: g for k, g in groups.items() if g}
    return kept or None
