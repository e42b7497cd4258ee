"""The attributes the archive's index holds, and C-FIND matching (PS3.4 C.2.2.2) as SQL.

Each attribute is a column of one of the four tables (``p`` patients, ``st`` studies,
``se`` series, ``i`` instances), or computed from the tables below it when a query asks
for it (the Number of ... Related counts, ModalitiesInStudy, SOPClassesInStudy: never
stored, so they stay right when an instance is added later or superseded).

A matching key becomes a condition with bound parameters, never text put into the
statement. ``bridge.dataset.query`` checks every record again, ignoring case in all text
(it drops only what surely does not match); SQL matches as DICOM does, so that what it
lets through, that check keeps:

- single value: equal; person names regardless of case (``str.casefold``; the index
  keeps each patient name case-folded as well, indexed). The one known difference: a
  ``?`` facing a letter whose case-folding is two letters (``ß``) matches it there, not here;
- wildcard: SQLite's ``GLOB``, whose ``*`` and ``?`` are DICOM's and which, unlike
  ``LIKE``, is case-sensitive as DICOM is for every VR but PN; ``[``, its only other
  special character, is escaped. ``%``, ``_`` and ``'`` are plain characters to it;
- range (DA, TM): compared as the stored DICOM text; the upper bound is a prefix (a TM
  ``-1030`` includes 10:30:59), and an empty value is never in a range;
- list: any of the values (``IN`` for plain values);
- ModalitiesInStudy, SOPClassesInStudy: a study matches when any of its series has the
  modality (any of its instances the SOP class).

A key the index does not hold is not matched here: the record is answered without it
and the C-FIND service answers it as unverified (0xFF01).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")

# The tables each level's records come from, joined to the levels above.
FROM = {
    "PATIENT": "patients p",
    "STUDY": "studies st JOIN patients p ON p.patient_key = st.patient_key",
    "SERIES": "series se JOIN studies st ON st.study_uid = se.study_uid"
              " JOIN patients p ON p.patient_key = st.patient_key",
    "IMAGE": "instances i JOIN series se ON se.series_uid = i.series_uid"
             " JOIN studies st ON st.study_uid = se.study_uid JOIN patients p ON p.patient_key = st.patient_key",
}
# Each level's record identity, the order records are given in.
ORDER = {"PATIENT": "p.patient_key", "STUDY": "st.study_uid", "SERIES": "se.series_uid",
         "IMAGE": "i.sop_instance_uid"}


@dataclass(frozen=True)
class Column:
    level: str
    expr: str  # the SQL expression of the stored value
    vr: str
    folded: str = ""  # for PN: the expression of the case-folded value


# Stored attributes, by keyword: what intake read (``dicomfile.INDEX_KEYWORDS``) and the UIDs.
COLUMNS = {
    "PatientID": Column("PATIENT", "p.patient_id", "LO"),
    "IssuerOfPatientID": Column("PATIENT", "p.issuer", "LO"),
    "PatientName": Column("PATIENT", "p.patient_name", "PN", "p.name_fold"),
    "PatientBirthDate": Column("PATIENT", "p.birth_date", "DA"),
    "PatientSex": Column("PATIENT", "p.sex", "CS"),
    "StudyInstanceUID": Column("STUDY", "st.study_uid", "UI"),
    "StudyDate": Column("STUDY", "st.study_date", "DA"),
    "StudyTime": Column("STUDY", "st.study_time", "TM"),
    "AccessionNumber": Column("STUDY", "st.accession", "SH"),
    "StudyID": Column("STUDY", "st.study_id", "SH"),
    "StudyDescription": Column("STUDY", "st.description", "LO"),
    "ReferringPhysicianName": Column("STUDY", "st.referring", "PN", "dicom_fold(st.referring)"),
    "SeriesInstanceUID": Column("SERIES", "se.series_uid", "UI"),
    "Modality": Column("SERIES", "se.modality", "CS"),
    "SeriesNumber": Column("SERIES", "se.series_number", "IS"),
    "SeriesDescription": Column("SERIES", "se.description", "LO"),
    "BodyPartExamined": Column("SERIES", "se.body_part", "CS"),
    "SeriesDate": Column("SERIES", "se.series_date", "DA"),
    "SeriesTime": Column("SERIES", "se.series_time", "TM"),
    "PerformedProcedureStepStartDate": Column("SERIES", "se.performed_date", "DA"),
    "PerformedProcedureStepStartTime": Column("SERIES", "se.performed_time", "TM"),
    "SOPInstanceUID": Column("IMAGE", "i.sop_instance_uid", "UI"),
    "SOPClassUID": Column("IMAGE", "i.sop_class_uid", "UI"),
    "InstanceNumber": Column("IMAGE", "i.instance_number", "IS"),
}

# What identifies a record and those above it (a patient: its ID and the ID's issuer).
IDENTIFYING = frozenset({"PatientID", "IssuerOfPatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"})

_SERIES_OF_PATIENT = "series c JOIN studies cs ON cs.study_uid = c.study_uid WHERE cs.patient_key = p.patient_key"
_INSTANCES_OF_STUDY = "instances c JOIN series cs ON cs.series_uid = c.series_uid WHERE cs.study_uid = st.study_uid"

# Computed attributes, by keyword: (level, SQL); multi-valued ones joined by backslashes.
COMPUTED = {
    "NumberOfPatientRelatedStudies": ("PATIENT", "SELECT count(*) FROM studies c WHERE c.patient_key = p.patient_key"),
    "NumberOfPatientRelatedSeries": ("PATIENT", f"SELECT count(*) FROM {_SERIES_OF_PATIENT}"),
    "NumberOfPatientRelatedInstances": (
        "PATIENT", "SELECT count(*) FROM instances ci JOIN series c ON c.series_uid = ci.series_uid"
                   " JOIN studies cs ON cs.study_uid = c.study_uid WHERE cs.patient_key = p.patient_key"),
    "NumberOfStudyRelatedSeries": ("STUDY", "SELECT count(*) FROM series c WHERE c.study_uid = st.study_uid"),
    "NumberOfStudyRelatedInstances": ("STUDY", f"SELECT count(*) FROM {_INSTANCES_OF_STUDY}"),
    "ModalitiesInStudy": (
        "STUDY", "SELECT group_concat(m, '\\') FROM (SELECT DISTINCT c.modality AS m FROM series c"
                 " WHERE c.study_uid = st.study_uid AND c.modality <> '' ORDER BY m)"),
    "SOPClassesInStudy": (
        "STUDY", "SELECT group_concat(u, '\\') FROM (SELECT DISTINCT c.sop_class_uid AS u FROM"
                 f" {_INSTANCES_OF_STUDY} ORDER BY u)"),
    "NumberOfSeriesRelatedInstances": ("SERIES", "SELECT count(*) FROM instances c WHERE c.series_uid = se.series_uid"),
}

# Computed attributes that are matched: a study matches when any of its series (instances)
# has the value.
_ANY_OF_STUDY = {
    "ModalitiesInStudy": ("SELECT 1 FROM series c WHERE c.study_uid = st.study_uid AND",
                          Column("STUDY", "c.modality", "CS")),
    "SOPClassesInStudy": (f"SELECT 1 FROM {_INSTANCES_OF_STUDY} AND", Column("STUDY", "c.sop_class_uid", "UI")),
}

# What the index keeps is the text intake read; a value of U+FFFF sorts after all of it,
# so ``value <= bound + TOP`` is "value's first len(bound) characters <= bound".
_TOP = "\uffff"
_NUMBERS = frozenset({"IS", "DS"})


class Matching(Protocol):
    """A matching key, as ``bridge.dataset.query.Key`` is one (the archive does not import
    the sources, which sit above it)."""

    @property
    def keyword(self) -> str: ...

    @property
    def kind(self) -> str: ...

    @property
    def values(self) -> tuple[str, ...]: ...


def fold(value: str | None) -> str:
    """A person name as PN matching compares it: regardless of case (as ``query`` does)."""
    return value.casefold() if value else ""


def above(attribute_level: str, level: str) -> bool:
    """Whether an attribute of ``attribute_level`` belongs to a record at ``level``: its own
    level or one above it."""
    return LEVELS.index(attribute_level) <= LEVELS.index(level)


def where(level: str, keys: Iterable[Matching]) -> tuple[list[str], list[object]]:
    """The conditions (to be joined with AND) and their parameters for the matching
    ``keys`` the index can match at ``level``: attributes of that level and the levels
    above it. Any other key is left to the C-FIND service."""
    clauses: list[str] = []
    params: list[object] = []
    for key in keys:
        if key.kind == "universal":
            continue
        column = COLUMNS.get(key.keyword)
        if column is not None and above(column.level, level):
            matched = _condition(column, key)
        elif key.keyword in _ANY_OF_STUDY and above("STUDY", level):
            select, member = _ANY_OF_STUDY[key.keyword]
            inner = _condition(member, key)
            matched = (f"EXISTS ({select} {inner[0]})", inner[1]) if inner else None
        else:
            continue
        if matched is not None:
            clauses.append(matched[0])
            params.extend(matched[1])
    return clauses, params


def _condition(column: Column, key: Matching) -> tuple[str, list[object]] | None:
    """``key`` matched against ``column``; None when it matches every record."""
    if key.kind == "range":
        return _range(column, key.values[0], key.values[1])
    values = key.values if key.kind == "list" else key.values[:1]
    if any(_matches_all(v, column.vr) for v in values):
        return None
    plain = [v for v in values if not _is_wildcard(v, column.vr)]
    if column.vr not in _NUMBERS and len(plain) == len(values):
        expr = column.folded or column.expr
        args: list[object] = [fold(v) if column.folded else v for v in values]
        if len(args) == 1:
            return f"{expr} = ?", args
        return f"{expr} IN ({', '.join('?' * len(args))})", args
    parts = [_one(column, v) for v in values]
    return "(" + " OR ".join(p[0] for p in parts) + ")", [a for p in parts for a in p[1]]


def _one(column: Column, value: str) -> tuple[str, list[object]]:
    if _is_wildcard(value, column.vr):
        if column.folded:
            return f"{column.folded} GLOB ?", [_glob(fold(value))]
        return f"{column.expr} GLOB ?", [_glob(value)]
    if column.vr in _NUMBERS:
        try:
            number = float(value)
        except ValueError:
            return f"{column.expr} = ?", [value]
        # "1", "01" and " 1 " are the same number (as ``query`` compares them)
        return f"({column.expr} <> '' AND CAST({column.expr} AS REAL) = ?)", [number]
    if column.folded:
        return f"{column.folded} = ?", [fold(value)]
    return f"{column.expr} = ?", [value]


def _range(column: Column, low: str, high: str) -> tuple[str, list[object]] | None:
    low, high = low.replace(":", ""), high.replace(":", "")
    if not low and not high:
        return None
    clauses: list[str] = [f"{column.expr} <> ''"]
    params: list[object] = []
    if low:
        clauses.append(f"{column.expr} >= ?")
        params.append(low)
    if high:
        clauses.append(f"{column.expr} <= ?")
        params.append(high + _TOP)
    return "(" + " AND ".join(clauses) + ")", params


def _is_wildcard(value: str, vr: str) -> bool:
    return vr not in ("UI", "DA", "TM", "DT", *_NUMBERS) and ("*" in value or "?" in value)


def _matches_all(value: str, vr: str) -> bool:
    """``*`` alone matches every value, an empty one too (as ``query`` has it)."""
    return _is_wildcard(value, vr) and value.strip("*") == ""


def _glob(pattern: str) -> str:
    """A DICOM wildcard pattern for GLOB: ``*`` and ``?`` are the same; ``[`` would open a
    character class, so it is written as the class of itself."""
    return pattern.replace("[", "[[]")
