"""A ``Query`` as QIDO-RS searches (PS3.18 10.6, 8.3.4), and QIDO-RS results as data sets.

Pure functions, without HTTP: ``bridge.sources.dicomweb`` sends what ``qido_searches``
makes, page after page, and reads the answers with ``record``.

What each kind of matching key becomes:

| key | query parameter |
| --- | --- |
| single value | ``PatientID=12345`` |
| wildcard (``*``, ``?``) | as it is: ``PatientName=SMITH*`` |
| DA, TM, DT range | ``StudyDate=20240101-20241231`` (either end may be open) |
| list of UIDs | comma-separated, PS3.18 8.3.4.1 ``uid-list-match``, at most ``UID_CHUNK`` UIDs in one search |
| list of other values | one search per value (QIDO-RS has lists of UIDs only), answers merged by UID |
| return key (universal) | ``includefield=`` its keyword (a tag's 8 hex digits when it has none) |

Every search asks for at least what the C-FIND needs, and anything it sends may match
more than the key would: the C-FIND service checks every answer against the query again
(``Query.matches``). A key is never sent in a way that could match less; one that cannot
be sent safely is left out of the search and asked for with ``includefield`` instead, so
that the service can check it:

- Characters outside a URL query's plain ones (RFC 3986: letters, digits, ``-._~!$'()*,:@/?``)
  would have to be percent-encoded, and Orthanc 1.10's DICOMweb plugin does not decode
  them (``PatientID=P%31`` matches nothing there; ``Smith%5EJohn`` neither). In a value
  that may hold wildcards, each such ASCII character (``^`` between name components, a
  space) becomes ``?`` and each run of other characters ``*``: ``Müller^Jürgen`` is
  asked as ``M*ller?J*rgen``. In a value of any other VR (``+`` in a DT offset or a
  number) the key is left out.
- A comma in a value other than a UID: servers (Orthanc) read it as a list.
- A person name with several component groups (``Yamada^Tarou=山田^太郎``): its first
  group followed by ``*`` (servers match one group, or the whole value).
- A wildcard that matches everything (``*``), a range open at both ends, a list with an
  empty value, a list of more than ``MAX_SPLIT`` values when searches multiply.

Levels and paths: STUDY queries ``/studies``; SERIES ``/studies/{uid}/series`` when the
query names one study (``/series`` otherwise); IMAGE ``/studies/{uid}/series/{uid}/instances``,
``/studies/{uid}/instances`` or ``/instances``. QIDO-RS has no patients resource: PATIENT
queries ``/studies`` and ``Patients`` folds the studies into patients.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from pydicom.datadict import dictionary_keyword
from pydicom.dataset import Dataset
from pydicom.valuerep import IS

from bridge.dataset.query import Key, Query
from bridge.dataset.uids import is_valid_uid

UID_CHUNK = 50  # UIDs in one search: 50 of 64 characters keep the URL within 4 KB
MAX_SPLIT = 16  # values of a list that are asked one search each
MAX_SEARCHES = 64  # searches one query may become, before lists are left to the service

# Tags in the DICOM JSON model (PS3.18 F.2), as QIDO-RS answers name them.
SOP_INSTANCE_UID = "00080018"
# The unique key of each level's results; patients are folded from studies.
UNIQUE_TAG = {"PATIENT": "0020000D", "STUDY": "0020000D", "SERIES": "0020000E", "IMAGE": SOP_INSTANCE_UID}
# Dropped from every answer: RetrieveURL and RetrieveAETitle are the upstream's (the
# service gives the bridge's own), and the values are decoded text, so the upstream's
# Specific Character Set (Orthanc names its own default, whatever the JSON holds) would
# only mislead.
DROPPED = frozenset({"00081190", "00080054", "00080005"})

# What a query value may hold unencoded: RFC 3986's unreserved characters and those
# sub-delimiters that no server reads as a separator (not & = + ; #).
_SAFE = "-._~!$'()*,:@/?"
_PLAIN = re.compile(r"[A-Za-z0-9\-._~!$'()*,:@/?]")
_WILDCARD_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"})
_PATIENT_COUNTS = {"NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries",
                   "NumberOfPatientRelatedInstances"}


@dataclass(frozen=True)
class QidoSearch:
    """One QIDO-RS search transaction, before paging: the resource under the base URL,
    its query parameters (without ``limit`` and ``offset``), and the UIDs its path names
    (``StudyInstanceUID`` of ``/studies/{uid}/series``), which results may leave out."""

    path: str
    params: tuple[tuple[str, str], ...]
    fixed: tuple[tuple[str, str], ...] = ()

    def query_string(self, limit: int, offset: int) -> str:
        """The parameters and the page, encoded: every value is plain already (see the
        module's docstring), so nothing is percent-encoded."""
        pairs = [*self.params, ("limit", str(limit)), ("offset", str(offset))]
        return "&".join(f"{name}={quote(value, safe=_SAFE)}" for name, value in pairs)


@dataclass
class _Plan:
    """What a query becomes, key by key: parameters every search carries, the lists a
    search is made per value (or chunk) of, and the keys asked for as ``includefield``."""

    common: list[tuple[str, str]] = field(default_factory=list)
    splits: list[tuple[Key, list[tuple[str, str]]]] = field(default_factory=list)
    include: list[str] = field(default_factory=list)


def qido_searches(query: Query, include: Iterable[str] | None = None) -> list[QidoSearch]:
    """The QIDO-RS searches that together answer ``query`` (a superset of its matches).

    Return keys become ``includefield``; ``include`` replaces them (``locate`` asks for
    the UIDs and SOP class of each instance only). ``fuzzymatching=true`` when the query
    asks for it (PS3.18 8.3.4.2: what it means is the server's).
    """
    path, fixed = _resource(query)
    consumed = {keyword for keyword, _ in fixed}
    plan = _Plan()
    for key in query.keys:
        if key.keyword in consumed:
            continue
        if key.keyword in _PATIENT_COUNTS and query.level == "PATIENT":
            continue  # counted while folding studies into patients
        if key.matching:
            _plan_key(key, plan)
        elif include is None:
            plan.include.append(parameter_name(key))
    if include is not None:
        plan.include.extend(include)
    plan.include.extend(_needed(query, include is not None))
    _limit_splits(plan)
    names = list(dict.fromkeys(plan.include))
    params = [*plan.common, *(("includefield", name) for name in names)]
    if query.fuzzy:
        params.append(("fuzzymatching", "true"))
    searches = []
    for combination in itertools.product(*(values for _, values in plan.splits)):
        searches.append(QidoSearch(path, (*combination, *params), fixed))
    return searches


def parameter_name(key: Key) -> str:
    """The attribute as QIDO-RS names it: the keyword, or the tag's 8 hex digits for one
    without a keyword (private, or unknown to pydicom) (PS3.18 8.3.4.1)."""
    try:
        return dictionary_keyword(key.tag) or f"{key.tag:08X}"
    except KeyError:
        return f"{key.tag:08X}"


def _resource(query: Query) -> tuple[str, tuple[tuple[str, str], ...]]:
    """The resource path and the UIDs it fixes: nested when the query names one study
    (and, at IMAGE level, one series)."""
    if query.level in ("PATIENT", "STUDY"):
        return "/studies", ()
    study = _single_uid(query.key("StudyInstanceUID"))
    series = _single_uid(query.key("SeriesInstanceUID"))
    if query.level == "SERIES":
        if study:
            return f"/studies/{study}/series", (("StudyInstanceUID", study),)
        return "/series", ()
    if study and series:
        return (f"/studies/{study}/series/{series}/instances",
                (("StudyInstanceUID", study), ("SeriesInstanceUID", series)))
    if study:
        return f"/studies/{study}/instances", (("StudyInstanceUID", study),)
    return "/instances", ()


def _single_uid(key: Key | None) -> str | None:
    if key is None or key.kind != "single" or not is_valid_uid(key.values[0]):
        return None
    return key.values[0]


def _plan_key(key: Key, plan: _Plan) -> None:
    name = parameter_name(key)
    if key.kind == "list":
        if key.vr == "UI":
            uids = [v for v in key.values if is_valid_uid(v)]
            if len(uids) == len(key.values):
                chunks = [",".join(uids[i:i + UID_CHUNK]) for i in range(0, len(uids), UID_CHUNK)]
                plan.splits.append((key, [(name, chunk) for chunk in chunks]))
                return
        else:
            values = [_value(v, key.vr) for v in key.values]
            if all(values) and len(values) <= MAX_SPLIT:
                plan.splits.append((key, [(name, v) for v in dict.fromkeys(values) if v]))
                return
        plan.include.append(name)
        return
    if key.kind == "range":
        low, high = (_value(v, key.vr) if v else "" for v in key.values)
        if (low or high) and low is not None and high is not None:
            plan.common.append((name, f"{low}-{high}"))
        else:
            plan.include.append(name)
        return
    value = _value(key.values[0], key.vr)
    if value is None or (key.vr == "UI" and "," in value):
        plan.include.append(name)
    else:
        plan.common.append((name, value))


def _value(value: str, vr: str) -> str | None:
    """``value`` as a query parameter that matches at least what it matches (see the
    module's docstring), or None when it cannot be sent."""
    if vr == "PN" and "=" in value:
        value = value.split("=", 1)[0].rstrip("*") + "*"
    if "," in value and vr != "UI":
        return None
    if vr not in _WILDCARD_VRS:
        return value if all(_PLAIN.fullmatch(c) for c in value) else None
    # A '?' may stand for a character beyond ASCII, several bytes in UTF-8: a server that
    # matches '?' to one byte (Orthanc 1.10) would miss it. '*' matches more, never less.
    out: list[str] = []
    for c in value:
        if _PLAIN.fullmatch(c) and c != "?":
            out.append(c)
        elif c.isascii() and c != "?":
            out.append("?")
        elif not out or out[-1] != "*":
            out.append("*")
    sent = "".join(out)
    return None if sent.strip("*") == "" else sent


def _needed(query: Query, locating: bool) -> list[str]:
    """``includefield`` beyond the query's keys: what folding patients needs, and the
    Patient ID of Patient Root answers (the unique key above the study)."""
    keys = {k.keyword for k in query.keys}
    needed = []
    if query.level == "PATIENT":
        needed.append("IssuerOfPatientID")  # patients are told apart by ID and issuer
        if "NumberOfPatientRelatedSeries" in keys:
            needed.append("NumberOfStudyRelatedSeries")
        if "NumberOfPatientRelatedInstances" in keys:
            needed.append("NumberOfStudyRelatedInstances")
    elif query.root == "patient" and "PatientID" not in keys and not locating:
        needed.append("PatientID")
    return needed


def _limit_splits(plan: _Plan) -> None:
    """Leave the longest lists of values other than UIDs to the service (``includefield``)
    while the searches would be more than ``MAX_SEARCHES``."""
    def count() -> int:
        total = 1
        for _, values in plan.splits:
            total *= len(values)
        return total

    while count() > MAX_SEARCHES:
        others = [s for s in plan.splits if s[0].vr != "UI"]
        if not others:
            return  # UIDs only: every chunk must be asked
        longest = max(others, key=lambda s: len(s[1]))
        plan.splits.remove(longest)
        plan.include.append(parameter_name(longest[0]))


# -- answers ------------------------------------------------------------------------------


def record(item: dict[str, Any], fixed: Iterable[tuple[str, str]] = ()) -> Dataset:
    """One QIDO-RS result (DICOM JSON, PS3.18 F.2) as a data set of decoded values, without
    what ``DROPPED`` lists or bulk data (which QIDO-RS results do not carry), and with the
    UIDs the search's path fixed when the result leaves them out. ``ValueError`` for
    what is not DICOM JSON."""
    if not isinstance(item, dict):
        raise ValueError(f"a result is a JSON {type(item).__name__}, not an object")
    kept = {tag: element for tag, element in item.items()
            if tag.upper() not in DROPPED and not (isinstance(element, dict) and "BulkDataURI" in element)}
    try:
        ds = Dataset.from_json(kept)
    except Exception as exc:  # pydicom raises several kinds for malformed DICOM JSON
        raise ValueError(f"not DICOM JSON: {exc}") from exc
    for keyword, uid in fixed:
        if keyword not in ds:
            setattr(ds, keyword, uid)
    return ds


def first_value(item: dict[str, Any], tag: str) -> str | None:
    """The first value of ``tag`` in a DICOM JSON result, as text (for UIDs: deduplicating
    results before converting them)."""
    element = item.get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    if isinstance(values, list) and values and isinstance(values[0], str | int | float):
        return str(values[0])
    return None


class Patients:
    """Studies folded into patients (QIDO-RS has no patients resource), told apart by
    Patient ID and Issuer of Patient ID, each with the patient-level keys of the query
    from its first study. Number of Patient Related Studies counts the studies found;
    Series and Instances add the studies' own counts, when every study gave them.

    Without counts asked for, ``add`` gives each patient as soon as its first study comes;
    with counts, ``rest`` gives them all once every study has been seen."""

    def __init__(self, query: Query) -> None:
        self.counting = bool({k.keyword for k in query.keys} & _PATIENT_COUNTS)
        self._tags = {k.tag for k in query.keys if k.level == "PATIENT" and k.keyword not in _PATIENT_COUNTS}
        self._tags |= {0x00100010, 0x00100020, 0x00100021}  # PatientName, PatientID, IssuerOfPatientID
        self._patients: dict[tuple[str, str], _Patient] = {}

    def add(self, study: Dataset) -> Dataset | None:
        """Fold ``study`` in; the patient to answer now, if any."""
        key = (str(study.get("PatientID", "") or ""), str(study.get("IssuerOfPatientID", "") or ""))
        patient = self._patients.get(key)
        if patient is None:
            out = Dataset()
            for tag in sorted(self._tags):
                if tag in study:
                    out.add(study[tag])
            patient = self._patients[key] = _Patient(out)
            patient.count(study)
            return None if self.counting else out
        patient.count(study)
        return None

    def rest(self) -> Iterator[Dataset]:
        """Once every study is in: the patients not answered yet, with their counts."""
        if not self.counting:
            return
        for patient in self._patients.values():
            ds = patient.dataset
            ds.NumberOfPatientRelatedStudies = IS(patient.studies)
            if patient.series is not None:
                ds.NumberOfPatientRelatedSeries = IS(patient.series)
            if patient.instances is not None:
                ds.NumberOfPatientRelatedInstances = IS(patient.instances)
            yield ds


@dataclass
class _Patient:
    dataset: Dataset
    studies: int = 0
    series: int | None = 0
    instances: int | None = 0

    def count(self, study: Dataset) -> None:
        self.studies += 1
        self.series = _add(self.series, study.get("NumberOfStudyRelatedSeries"))
        self.instances = _add(self.instances, study.get("NumberOfStudyRelatedInstances"))


def _add(total: int | None, value: Any) -> int | None:
    if total is None or value is None or value == "":
        return None
    try:
        return total + int(value)
    except (TypeError, ValueError):
        return None
