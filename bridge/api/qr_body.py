"""The bodies of ``POST /api/query`` and ``POST /api/retrieve`` (docs/api.md, "Query and
retrieve API"): validated field by field (pydantic: a bad field is a 400 naming it),
checked against the level (``problems``), and read into the C-FIND identifier the DIMSE
services would have been sent, parsed into the same ``Query`` (``query``).

Values keep DICOM's forms and limits: a Patient ID is LO (64 characters, no backslash)
and matched as it is (no wildcards), a Patient Name is PN with ``*`` and ``?``, an
Accession Number SH (16), modalities CS codes, dates DA (``YYYYMMDD``; ``YYYY-MM-DD`` is
read too), UIDs as PS3.5 9.1 defines them."""

from __future__ import annotations

import re
from datetime import date, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydicom.dataset import Dataset

from bridge.config.values import AETitle
from bridge.dataset.query import PATIENT_ROOT_FIND, STUDY_ROOT_FIND, UNIQUE, Query, parse
from bridge.dataset.uids import is_valid_uid

Level = Literal["PATIENT", "STUDY", "SERIES", "IMAGE"]
LEVELS: tuple[Level, ...] = ("PATIENT", "STUDY", "SERIES", "IMAGE")

MAX_RESULTS = 1000  # the most matches one query answers
DEFAULT_RESULTS = 100
MAX_UIDS = 1000  # UIDs in one list
MAX_MODALITIES = 32

# What each level's matches carry, besides the keys matched on (PS3.4 C.6.1.1, C.6.2.1).
RETURN_KEYS: dict[str, tuple[str, ...]] = {
    "PATIENT": ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "NumberOfPatientRelatedStudies"),
    "STUDY": ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
              "StudyTime", "AccessionNumber", "StudyID", "StudyDescription", "ModalitiesInStudy",
              "ReferringPhysicianName", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"),
    "SERIES": ("StudyInstanceUID", "SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription",
               "SeriesDate", "SeriesTime", "BodyPartExamined", "NumberOfSeriesRelatedInstances"),
    "IMAGE": ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "InstanceNumber",
              "ContentDate", "ContentTime", "Rows", "Columns", "NumberOfFrames"),
}

# The lowest level each field is a key of (PS3.4 C.6.2.1: no keys of lower levels than
# the one queried), and the attribute it matches.
FIELD_LEVEL: dict[str, Level] = {
    "patient_id": "PATIENT", "patient_name": "PATIENT", "accession_number": "STUDY", "modalities": "STUDY",
    "study_date": "STUDY", "max_age_years": "STUDY", "study_uid": "STUDY", "series_uid": "SERIES",
    "sop_instance_uid": "IMAGE",
}
UNIQUE_FIELD = {"PATIENT": "patient_id", "STUDY": "study_uid", "SERIES": "series_uid", "IMAGE": "sop_instance_uid"}


def _text(limit: int, wildcards: bool) -> Any:
    def check(value: str) -> str:
        if "\\" in value:
            raise ValueError("no backslash (it separates values in DICOM)")
        if not value.isprintable():
            raise ValueError("printable characters only")
        if len(value) > limit:
            raise ValueError(f"at most {limit} characters")
        if not wildcards and ("*" in value or "?" in value):
            raise ValueError("matched exactly: no wildcards (* or ?)")
        if not value.strip():
            raise ValueError("give a value, or leave the field out")
        return value.strip()

    return AfterValidator(check)


def _modality(value: str) -> str:
    code = value.strip().upper()
    if not re.fullmatch(r"[A-Z0-9_]{1,16}", code):
        raise ValueError(f"{value[:20]!r} is not a modality code (CS: letters, digits and _, at most 16)")
    return code


def _uid(value: str) -> str:
    if not is_valid_uid(value):
        raise ValueError(f"{value[:70]!r} is not a UID (digits and dots, at most 64 characters)")
    return value


def _date(value: str) -> str:
    compact = value.replace("-", "") if re.fullmatch(r"\d{4}-\d{2}-\d{2}", value) else value
    if re.fullmatch(r"\d{8}", compact):
        try:
            datetime.strptime(compact, "%Y%m%d")
            return compact
        except ValueError:
            pass
    raise ValueError(f"{value[:20]!r} is not a date: YYYYMMDD or YYYY-MM-DD")


def _listed(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


def _upper(value: Any) -> Any:
    return value.upper() if isinstance(value, str) else value


PatientId = Annotated[str, _text(64, wildcards=False)]
PatientName = Annotated[str, _text(194, wildcards=True)]  # PN: three groups of 64 and their "="
Accession = Annotated[str, _text(16, wildcards=True)]
Modality = Annotated[str, AfterValidator(_modality)]
Uids = Annotated[list[Annotated[str, AfterValidator(_uid)]], BeforeValidator(_listed),
                 Field(min_length=1, max_length=MAX_UIDS)]
DicomDate = Annotated[str, AfterValidator(_date)]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DateRange(Body):
    from_: DicomDate | None = Field(None, alias="from", description="the first day, YYYYMMDD or YYYY-MM-DD")
    to: DicomDate | None = Field(None, description="the last day, YYYYMMDD or YYYY-MM-DD")

    @model_validator(mode="after")
    def _ordered(self) -> DateRange:
        if self.from_ is None and self.to is None:
            raise ValueError("give from, to or both")
        if self.from_ is not None and self.to is not None and self.from_ > self.to:
            raise ValueError(f"from ({self.from_}) is after to ({self.to})")
        return self


class Keys(Body):
    """What to match, at which level, in which source."""

    source: str = Field(min_length=1, max_length=64,
                        description="a source of the configuration: 'local' or a key of sources")
    level: Annotated[Level, BeforeValidator(_upper)] = Field("STUDY", description="PATIENT, STUDY, SERIES or IMAGE")
    patient_id: PatientId | None = Field(None, description="Patient ID, matched exactly (no wildcards)")
    patient_name: PatientName | None = Field(None, description="Patient's Name; * and ? are wildcards")
    accession_number: Accession | None = Field(None, description="Accession Number; * and ? are wildcards")
    modalities: list[Modality] | None = Field(
        None, min_length=1, max_length=MAX_MODALITIES,
        description="modality codes, any of them (Modalities in Study at STUDY level, else Modality)")
    study_date: DateRange | None = Field(None, description="Study Date from and/or to, both days included")
    max_age_years: int | None = Field(None, ge=0, le=200,
                                      description="studies of the last this many years (a Study Date from today)")
    study_uid: Uids | None = Field(None, description="Study Instance UID, or a list of them")
    series_uid: Uids | None = Field(None, description="Series Instance UID, or a list of them")
    sop_instance_uid: Uids | None = Field(None, description="SOP Instance UID, or a list of them (IMAGE level)")


class QueryBody(Keys):
    max_results: int = Field(DEFAULT_RESULTS, ge=1, le=MAX_RESULTS,
                             description="the most matches answered (the newest first)")


class RetrieveBody(Keys):
    destination: AETitle = Field(description="a node of nodes, by its AE title or its key")


def problems(body: Keys, retrieve: bool, today: date) -> list[tuple[str, str]]:
    """(field, what is wrong) for each key the level does not have, and each key the
    level needs that is missing: a query at SERIES level needs ``study_uid``, at IMAGE
    level ``series_uid`` too; a retrieval needs its level's unique key, as a C-MOVE does
    (PS3.4 C.4.2.2.1). And ``max_age_years`` that leaves nothing of ``study_date``."""
    found: list[tuple[str, str]] = []
    dates = study_dates(body, today)
    if body.max_age_years is not None and dates is not None and "-" in dates:
        low, _, high = dates.partition("-")
        if low and high and low > high:
            found.append(("max_age_years", f"studies since {low}: none can be in study_date, which ends {high}"))
    depth = LEVELS.index(body.level)
    for name, lowest in FIELD_LEVEL.items():
        if getattr(body, name) is not None and LEVELS.index(lowest) > depth:
            found.append((name, f"a key of the {lowest} level and below: not at {body.level} level"))
    if retrieve:
        needed = [UNIQUE_FIELD[body.level]]
    else:
        needed = {"SERIES": ["study_uid"], "IMAGE": ["study_uid", "series_uid"]}.get(body.level, [])
    for name in needed:
        if getattr(body, name) is None:
            what = "a retrieval" if retrieve else "a query"
            found.append((name, f"{what} at {body.level} level needs it"))
    return found


def query(body: Keys, today: date, return_keys: bool = True) -> Query:
    """The ``Query`` a C-FIND (or C-MOVE) with these keys would be read into, at the
    body's level, Patient Root at PATIENT level and Study Root below; with the level's
    ``RETURN_KEYS`` unless not ``return_keys``. The identifier is UTF-8 (ISO_IR 192)."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.QueryRetrieveLevel = body.level
    if body.patient_id is not None:
        ds.PatientID = body.patient_id
    if body.patient_name is not None:
        ds.PatientName = body.patient_name
    if body.accession_number is not None:
        ds.AccessionNumber = body.accession_number
    if body.modalities is not None:
        setattr(ds, "ModalitiesInStudy" if body.level == "STUDY" else "Modality", _one_or_list(body.modalities))
    dates = study_dates(body, today)
    if dates is not None:
        ds.StudyDate = dates
    for name, keyword in (("study_uid", "StudyInstanceUID"), ("series_uid", "SeriesInstanceUID"),
                          ("sop_instance_uid", "SOPInstanceUID")):
        uids = getattr(body, name)
        if uids is not None:
            setattr(ds, keyword, _one_or_list(list(dict.fromkeys(uids))))
    for keyword in RETURN_KEYS[body.level] if return_keys else (UNIQUE[body.level],):
        if keyword not in ds:
            setattr(ds, keyword, None)
    return parse(ds, PATIENT_ROOT_FIND if body.level == "PATIENT" else STUDY_ROOT_FIND)


def study_dates(body: Keys, today: date) -> str | None:
    """The Study Date range (DA, ``from-to``, either end open) of ``study_date`` and
    ``max_age_years`` together, or None when neither is given."""
    low = body.study_date.from_ if body.study_date is not None else None
    high = body.study_date.to if body.study_date is not None else None
    if body.max_age_years is not None:
        year = today.year - body.max_age_years
        # 29 February, so many years ago, was perhaps not a day: the 28th then
        since = today.replace(year=year) if (today.month, today.day) != (2, 29) else date(year, 2, 28)
        low = max(low or "", since.strftime("%Y%m%d"))
    if low is None and high is None:
        return None
    if low == high:
        return low
    return f"{low or ''}-{high or ''}"


def _one_or_list(values: list[str]) -> str | list[str]:
    return values[0] if len(values) == 1 else values


class QueryAnswer(BaseModel):
    """What ``POST /api/query`` answers."""

    source: str
    level: Level
    count: int = Field(description="the matches answered")
    truncated: bool = Field(description="more matched than max_results (or find.max_results): the newest answered")
    matches: list[dict[str, Any]] = Field(description="each match's attributes by DICOM keyword, newest first")


class RetrieveAnswer(BaseModel):
    """What ``POST /api/retrieve`` answers (with ``message`` and ``correlation_id`` unless
    every instance was stored)."""

    source: str
    destination: str = Field(description="the node's key")
    level: Level
    located: int = Field(description="the instances that matched")
    completed: int = Field(description="stored by the node")
    warning: int = Field(description="stored by the node with a warning status")
    failed: int = Field(description="not fetched from the source, or not stored by the node")
    failed_sop_instance_uids: list[str]
    message: str | None = None
    correlation_id: str | None = None
