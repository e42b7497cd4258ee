"""A C-FIND identifier, read once (PS3.4 C.2.2, C.4.1): the level, the matching keys and
how each one matches, the return keys. Every source answers a ``Query``; what a source
answers is checked against it again (``Query.matches``) and cut to what was asked for
(``Query.shape``) before the requester sees it.

Text values are decoded with the identifier's own Specific Character Set, so a source
compares and sends Python strings; the response is encoded in the requester's set by
the C-FIND service.

Matching, per PS3.4 C.2.2.2:

| kind | when | example |
| --- | --- | --- |
| universal | the value is empty (a return key) | ``PatientName=`` |
| single | a value without wildcards | ``PatientID=12345`` |
| wildcard | ``*`` or ``?`` in a value of a text VR (not DA, DT, TM, UI, numbers) | ``PatientName=SMITH*`` |
| range | ``-`` in a DA, DT or TM value | ``StudyDate=20240101-20241231`` |
| list | several values (``\\``): any of them | ``ModalitiesInStudy=CT\\MR``, a UID list |

A key that is a sequence is a return key (its items are not matched).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal

from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import Tag

LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
Level = Literal["PATIENT", "STUDY", "SERIES", "IMAGE"]
Root = Literal["patient", "study"]

PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
ROOTS: dict[str, Root] = {PATIENT_ROOT_FIND: "patient", STUDY_ROOT_FIND: "study"}
PATIENT_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.1.2"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
PATIENT_ROOT_GET = "1.2.840.10008.5.1.4.1.2.1.3"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
MOVE_ROOTS: dict[str, Root] = {PATIENT_ROOT_MOVE: "patient", STUDY_ROOT_MOVE: "study"}
GET_ROOTS: dict[str, Root] = {PATIENT_ROOT_GET: "patient", STUDY_ROOT_GET: "study"}

# The unique key of each level (PS3.4 C.3).
UNIQUE = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID",
          "IMAGE": "SOPInstanceUID"}

# Where the attributes that queries use belong (PS3.4 C.3, C.6.1.1, C.6.2.1); any other
# attribute is taken to belong to the level queried.
_LEVEL_OF = {
    **dict.fromkeys((
        "PatientName", "PatientID", "IssuerOfPatientID", "OtherPatientIDsSequence", "PatientBirthDate",
        "PatientBirthTime", "PatientSex", "OtherPatientNames", "EthnicGroup", "PatientComments",
        "NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries", "NumberOfPatientRelatedInstances",
    ), "PATIENT"),
    **dict.fromkeys((
        "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "StudyID", "StudyDescription",
        "ReferringPhysicianName", "ModalitiesInStudy", "SOPClassesInStudy", "NameOfPhysiciansReadingStudy",
        "AdmittingDiagnosesDescription", "PatientAge", "PatientSize", "PatientWeight", "Occupation",
        "AdditionalPatientHistory", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
        "IssuerOfAccessionNumberSequence", "ProcedureCodeSequence", "InstitutionName",
    ), "STUDY"),
    **dict.fromkeys((
        "SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription", "SeriesDate", "SeriesTime",
        "BodyPartExamined", "Laterality", "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime",
        "RequestAttributesSequence", "NumberOfSeriesRelatedInstances", "ProtocolName", "OperatorsName",
        "PerformingPhysicianName", "StationName", "Manufacturer",
    ), "SERIES"),
    **dict.fromkeys((
        "SOPInstanceUID", "SOPClassUID", "InstanceNumber", "ContentDate", "ContentTime", "AcquisitionDate",
        "AcquisitionTime", "Rows", "Columns", "NumberOfFrames", "ImageType", "AvailableTransferSyntaxUID",
    ), "IMAGE"),
}

# Attributes of the request itself, never matched nor returned as asked.
_CONTROL = {0x00080005, 0x00080052, 0x00080054, 0x00080056, 0x00081190, 0x00088001}  # SpecificCharacterSet, level, ...

_NO_WILDCARDS = frozenset({"DA", "DT", "TM", "UI", "DS", "IS", "FL", "FD", "SL", "SS", "UL", "US", "SV", "UV",
                           "AT", "OB", "OW", "OF", "OD", "OL", "OV", "UN", "SQ"})
_RANGES = frozenset({"DA", "DT", "TM"})

Kind = Literal["universal", "single", "wildcard", "range", "list"]


class QueryError(Exception):
    """An identifier the C-FIND cannot be answered for: ``status`` and an ErrorComment."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment


@dataclass(frozen=True)
class Key:
    """One attribute of the identifier: its matching, if it has a value."""

    keyword: str  # the dictionary keyword, or the tag as "(gggg,eeee)" for one pydicom does not know
    tag: int
    vr: str
    level: Level  # the level it belongs to
    kind: Kind
    values: tuple[str, ...] = ()  # single, wildcard: one; list: several; range: (low, high), either may be ""

    @property
    def matching(self) -> bool:
        return self.kind != "universal"

    def matches(self, value: str | Iterable[str]) -> bool:
        """Whether a record's value (or any of its values) matches this key; a universal key
        matches anything."""
        if self.kind == "universal":
            return True
        candidates = [value] if isinstance(value, str) else [str(v) for v in value]
        return any(self._matches_one(c) for c in candidates)

    def _matches_one(self, value: str) -> bool:
        if self.kind == "range":
            return _in_range(value, self.values[0], self.values[1], self.vr)
        if self.kind == "list":
            return any(_match_value(pattern, value, self.vr) for pattern in self.values)
        return _match_value(self.values[0], value, self.vr)


@dataclass(frozen=True)
class Query:
    """A C-FIND request, decoded: ``level``, ``root`` (from the SOP class), the keys in
    identifier order, and the identifier itself (decoded, for a source that forwards it)."""

    level: Level
    root: Root
    keys: tuple[Key, ...]
    identifier: Dataset = field(compare=False, repr=False)
    fuzzy: bool = False  # the rule asks for fuzzy matching of person names

    @property
    def sop_class(self) -> str:
        return PATIENT_ROOT_FIND if self.root == "patient" else STUDY_ROOT_FIND

    @property
    def unique_key(self) -> str:
        return UNIQUE[self.level]

    @property
    def matching(self) -> tuple[Key, ...]:
        """The keys with a value to match."""
        return tuple(k for k in self.keys if k.matching)

    def key(self, keyword: str) -> Key | None:
        return next((k for k in self.keys if k.keyword == keyword), None)

    def matches(self, result: Dataset) -> tuple[bool, bool]:
        """``(matches, verified)`` for a record a source answered: it matches unless a value it
        carries contradicts a matching key (text compared regardless of case; person names
        not at all when the query is fuzzy); verified when it carries every matching key
        (a key it lacks could not be checked: answered with 0xFF01)."""
        verified = True
        for key in self.matching:
            if self.fuzzy and key.vr == "PN":
                continue  # the source matched it its own fuzzy way: nothing to check it against
            element = result.get(key.tag)
            if element is None or element.VR == "SQ":
                verified = False
                continue
            values = _texts(element)
            if not values:
                if key.kind == "wildcard" and key.values[0].strip("*") == "":
                    continue  # "*" matches an empty value too
                verified = False  # a source that could not match it answers it empty
                continue
            if not key.matches(values):
                return False, verified
        return True, verified

    def shape(self, result: Dataset, retrieve_ae: str) -> Dataset:
        """The response identifier for ``result``: every key asked for (empty when the
        source has no value), the level's unique key, the Query/Retrieve Level and the
        bridge's AE title as Retrieve AE Title; nothing else (no upstream RetrieveURL, no
        upstream AE title). Values stay decoded text; the service encodes them."""
        out = Dataset()
        out.QueryRetrieveLevel = self.level
        out.RetrieveAETitle = retrieve_ae
        for key in self.keys:
            element = result.get(key.tag)
            if element is None:
                out.add(DataElement(key.tag, key.vr, [] if key.vr == "SQ" else None))
            else:
                out.add(element)
        if self.unique_key not in out and self.unique_key in result:
            out.add(result[self.unique_key])
        return out


def parse(identifier: Dataset, sop_class: str, fuzzy: bool = False) -> Query:
    """Read a C-FIND, C-MOVE or C-GET request's identifier under ``sop_class`` (Patient
    or Study Root; ``retrieval_problem`` says what a retrieval's identifier lacks).

    Raises ``QueryError``: 0xA900 for a Query/Retrieve Level missing or not one of the
    root (Study Root has no PATIENT level), 0xC000 for a value that cannot be decoded or
    read as its VR requires (a range in a text VR is read as a literal value).
    """
    root = ROOTS.get(sop_class) or MOVE_ROOTS.get(sop_class) or GET_ROOTS.get(sop_class)
    if root is None:
        raise QueryError(0x0122, "SOP class not supported")
    try:
        identifier.decode()  # text values as str, by the identifier's own Specific Character Set
        level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    except Exception as exc:
        raise QueryError(0xC000, _comment(f"cannot decode identifier: {exc}")) from exc
    if level not in LEVELS:
        raise QueryError(0xA900, "QueryRetrieveLevel missing or invalid" if not level
                         else f"QueryRetrieveLevel {level[:16]} invalid")
    if root == "study" and level == "PATIENT":
        raise QueryError(0xA900, "Study Root has no PATIENT level")
    keys = []
    for tag in identifier.keys():
        if int(tag) in _CONTROL or tag.element == 0 or tag.group in (0x0000, 0x0002):
            continue
        try:
            keys.append(_key(identifier[tag], level))
        except Exception as exc:
            raise QueryError(0xC000, _comment(f"cannot read {Tag(tag)}: {exc}")) from exc
    return Query(level=level, root=root, keys=tuple(keys), identifier=identifier, fuzzy=fuzzy)  # type: ignore[arg-type]


def retrieval_problem(query: Query) -> str:
    """What a C-MOVE or C-GET identifier lacks (PS3.4 C.4.2.2.1), or "": the unique key of
    its level with a value (one, or a list of UIDs), so that a retrieval never widens to
    all there is for want of a key. The unique keys of the levels above, which the
    standard asks for too, are used when present and not required: requesters that leave
    them out are common, and the level's own key names what to send."""
    key = UNIQUE[query.level]
    if any(k.keyword == key and k.kind in ("single", "list") for k in query.keys):
        return ""
    return f"{key} missing or empty"


def _key(element: DataElement, level: str) -> Key:
    vr = element.VR
    if vr in ("UN", None) or "or" in str(vr):
        vr = _dictionary_vr(element.tag) or "UN"
    keyword = keyword_for_tag(element.tag) or str(Tag(element.tag))
    belongs: Level = _LEVEL_OF.get(keyword, level)  # type: ignore[assignment]
    if vr == "SQ":
        return Key(keyword, int(element.tag), vr, belongs, "universal")
    values = _texts(element)
    if not values or all(v == "" for v in values):
        return Key(keyword, int(element.tag), vr, belongs, "universal")
    if len(values) > 1:
        return Key(keyword, int(element.tag), vr, belongs, "list", tuple(v.strip() for v in values))
    value = values[0].strip()
    if vr in _RANGES and "-" in value:
        low, _, high = value.partition("-")
        return Key(keyword, int(element.tag), vr, belongs, "range", (low.strip(), high.strip()))
    if vr not in _NO_WILDCARDS and ("*" in value or "?" in value):
        return Key(keyword, int(element.tag), vr, belongs, "wildcard", (value,))
    return Key(keyword, int(element.tag), vr, belongs, "single", (value,))


def _texts(element: DataElement) -> list[str]:
    """An element's values as text ([] when empty)."""
    value = element.value
    if value is None or value == "" or value == b"":
        return []
    if isinstance(value, MultiValue | list | tuple):
        return [_text(v) for v in value]
    return [_text(value)]


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("ascii", "replace").strip(" \0")
    return str(value).strip(" \0") if not isinstance(value, float | int) else format(value, "g")


@lru_cache(maxsize=1024)
def _dictionary_vr(tag: int) -> str | None:
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return None
    return vr.split(" or ")[0]


@lru_cache(maxsize=4096)
def _wildcard(pattern: str) -> re.Pattern[str]:
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.compile(regex + r"\Z", re.DOTALL | re.IGNORECASE)


def _match_value(pattern: str, value: str, vr: str) -> bool:
    # The check of what a source answered drops only what surely does not match: sources
    # differ on case (Orthanc ignores it for IDs and descriptions too), so text compares
    # regardless of case; how case counts is the source's own matching.
    fold = vr not in _NO_WILDCARDS
    if fold and ("*" in pattern or "?" in pattern):
        return _wildcard(pattern).match(value) is not None
    if vr in ("DS", "IS"):
        try:
            return float(pattern) == float(value)
        except ValueError:
            return pattern == value
    if fold:
        return pattern.casefold() == value.casefold()
    return pattern == value


def _in_range(value: str, low: str, high: str, vr: str) -> bool:
    """``value`` within ``low``-``high`` (either open), compared as DICOM DA/TM/DT text:
    a TM or DT bound matches every value it is a prefix of (``-1030`` includes 10:30:59)."""
    value = value.replace(":", "").strip()
    if vr == "DA":
        value = value.replace(".", "")[:8]
    if low and value < low.replace(":", ""):
        return False
    if high:
        bound = high.replace(":", "")
        if value[:len(bound)] > bound:
            return False
    return True


def _comment(text: str) -> str:
    return text[:64]

