"""QIDO-RS searches (PS3.18 8.3.4, 10.6) answered from a static tree's query objects.

``parse(params, level)`` reads a request's query parameters into a ``Search``, refusing
what cannot be a search (``BadQuery``: the caller's 400); ``Search.apply`` keeps the
query objects (DICOM JSON, as ``metadata.query_object`` and the tree's computed counts
make them) that match, then applies ``offset`` and ``limit``.

Matching (PS3.4 C.2.2.2), by the attribute's VR in the data dictionary:

- UI: list of UID matching; UIDs separated by commas (or backslashes), each validated;
- DA: a date or a range ``YYYYMMDD-YYYYMMDD`` with either end open; TM likewise;
- PN: wildcards ``*`` and ``?``, case-insensitive, against each component group;
- numbers (IS, DS, US, ...): equal as numbers;
- CS: any of the values separated by commas or backslashes (``ModalitiesInStudy=CT,MR``),
  wildcards allowed in each;
- other strings: wildcards, case-sensitive.

A multi-valued attribute of an object matches when any of its values does; an object
without the attribute matches only universal matching (an empty value, or ``*``).
Keys are keywords (``PatientID``) or tags (``00100020``). A valid attribute that the
level's query objects do not hold is ignored and named in ``Search.ignored`` (the caller
says so in a Warning header, PS3.18 8.3.4.3); ``includefield`` and ``fuzzymatching``
are accepted and change nothing.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword

from bridge.dataset.uids import is_valid_uid
from bridge.static.metadata import QUERY_KEYWORDS, Level

# What the tree adds to the query objects (PS3.4 C.6.1.1.2, C.6.1.1.3).
COMPUTED: dict[str, tuple[str, ...]] = {
    "STUDY": ("ModalitiesInStudy", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"),
    "SERIES": ("NumberOfSeriesRelatedInstances",),
    "INSTANCE": (),
}
IGNORED_PARAMS = frozenset({"includefield", "fuzzymatching"})

_NUMBER_VRS = frozenset({"IS", "DS", "US", "SS", "UL", "SL", "UV", "SV", "FL", "FD"})
_TAG = re.compile(r"[0-9A-Fa-f]{8}")
_DATE = re.compile(r"[0-9]{8}")
_TIME = re.compile(r"[0-9]{2}(:?[0-9]{2}(:?[0-9]{2}(\.[0-9]{1,6})?)?)?")

JsonObject = dict[str, dict[str, Any]]
Matcher = Callable[[JsonObject], bool]


class BadQuery(ValueError):
    """A query parameter that cannot be read as a search: the message says which and why."""


@dataclass(frozen=True)
class Search:
    """A parsed search: every matcher must hold; then ``offset`` objects are skipped and at
    most ``limit`` kept."""

    matchers: Sequence[Matcher] = ()
    offset: int = 0
    limit: int | None = None
    ignored: Sequence[str] = field(default_factory=tuple)

    @property
    def filters(self) -> bool:
        """Whether the answer can differ from the whole query file."""
        return bool(self.matchers) or self.offset > 0 or self.limit is not None

    def apply(self, objects: Iterable[JsonObject]) -> list[JsonObject]:
        found = [o for o in objects if all(match(o) for match in self.matchers)]
        end = None if self.limit is None else self.offset + self.limit
        return found[self.offset:end]


def supported(level: Level) -> frozenset[int]:
    """The tags a ``level`` query object holds, and so may be matched on."""
    return frozenset(tag_for_keyword(k) or 0 for k in QUERY_KEYWORDS[level] + COMPUTED[level])


def parse(params: Iterable[tuple[str, str]], level: Level) -> Search:
    """The search ``params`` (a query string's pairs, repeated keys allowed) ask for."""
    values: dict[int, list[str]] = {}
    offset, limit, ignored = 0, None, []
    tags = supported(level)
    for key, value in params:
        if key == "offset":
            offset = _count(key, value)
        elif key == "limit":
            limit = _count(key, value)
        elif key in IGNORED_PARAMS:
            continue
        else:
            tag = _tag(key)
            if tag is None:
                ignored.append(key)
            elif tag not in tags:
                ignored.append(keyword_for_tag(tag) or key)
            elif value != "":
                values.setdefault(tag, []).append(value)
    matchers = [m for tag, vs in values.items() if (m := _matcher(tag, ",".join(vs))) is not None]
    return Search(matchers, offset, limit, tuple(ignored))


def _count(key: str, value: str) -> int:
    if not value.isascii() or not value.isdigit():
        raise BadQuery(f"{key} must be a whole number, not {value!r}")
    return int(value)


def _tag(key: str) -> int | None:
    """The tag ``key`` names; None for a sequence path (``00081032.00080100``), which is
    valid but not matched here. Raises ``BadQuery`` for anything else."""
    if _TAG.fullmatch(key):
        return int(key, 16)
    if (tag := tag_for_keyword(key)) is not None:
        return int(tag)
    parts = key.split(".")
    if len(parts) > 1 and all(_TAG.fullmatch(p) or tag_for_keyword(p) is not None for p in parts):
        return None
    raise BadQuery(f"unknown query parameter {key!r}: not a DICOM keyword, a tag, limit, offset, "
                   "includefield or fuzzymatching")


def _matcher(tag: int, value: str) -> Matcher | None:
    key = f"{tag:08X}"
    name = keyword_for_tag(tag) or key
    vr = dictionary_VR(tag)
    if vr == "UI":
        uids = set(re.split(r"[,\\]", value))
        if bad := sorted(u for u in uids if not is_valid_uid(u)):
            raise BadQuery(f"{name}: {bad[0]!r} is not a valid UID")
        return lambda o: any(v in uids for v in _values(o, key))
    if vr == "DA":
        low, high = _range(name, value, _date)
        return lambda o: any(_in_range(str(v), low, high) for v in _values(o, key))
    if vr == "TM":
        low, high = _range(name, value, _time)
        return lambda o: any(_in_range(t, low, high) for v in _values(o, key) if (t := _stored_time(v)))
    if vr in _NUMBER_VRS:
        try:
            number = float(value)
        except ValueError:
            raise BadQuery(f"{name} must be a number, not {value!r}") from None
        return lambda o: any(_number(v) == number for v in _values(o, key))
    if vr == "CS":
        patterns = [_wildcard(p, False) for p in re.split(r"[,\\]", value)]
        if any(p is None for p in patterns):
            return None
        return lambda o: any(p.fullmatch(str(v)) for v in _values(o, key) for p in patterns if p)
    pattern = _wildcard(value, vr == "PN")
    if pattern is None:
        return None
    if vr == "PN":
        return lambda o: any(pattern.fullmatch(group) for v in _values(o, key) for group in _groups(v))
    return lambda o: any(pattern.fullmatch(str(v)) for v in _values(o, key))


def _values(obj: JsonObject, key: str) -> list[Any]:
    return [v for v in obj.get(key, {}).get("Value", ()) if v is not None]


def _groups(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [str(g) for g in value.values()]
    return [str(value)]


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _wildcard(value: str, ignore_case: bool) -> re.Pattern[str] | None:
    """``*`` any run of characters, ``?`` one character; None for universal matching."""
    if set(value) <= {"*"}:
        return None
    text = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in value)
    return re.compile(text, re.DOTALL | (re.IGNORECASE if ignore_case else 0))


def _range(name: str, value: str, read: Callable[[str, str, bool], str]) -> tuple[str | None, str | None]:
    """PS3.4 C.2.2.2.5: ``A``, ``A-B``, ``A-`` or ``-B``, each end normalised by ``read``."""
    if value.count("-") > 1 or value == "-":
        raise BadQuery(f"{name} must be a value or a range A-B (either end may be left out), not {value!r}")
    if "-" not in value:
        return read(value, name, False), read(value, name, True)
    low, high = value.split("-")
    lower = read(low, name, False) if low else None
    upper = read(high, name, True) if high else None
    if lower is not None and upper is not None and lower > upper:
        raise BadQuery(f"{name}: the range {value!r} ends before it begins")
    return lower, upper


def _date(value: str, name: str, end: bool = False) -> str:
    if not _DATE.fullmatch(value):
        raise BadQuery(f"{name}: {value!r} is not a date YYYYMMDD")
    try:
        datetime.strptime(value, "%Y%m%d")
    except ValueError:
        raise BadQuery(f"{name}: {value!r} is not a date YYYYMMDD") from None
    return value


def _time(value: str, name: str, end: bool = False) -> str:
    """A time as ``HHMMSS.ffffff``; the missing places zero, or the highest for a range's end."""
    if not _TIME.fullmatch(value):
        raise BadQuery(f"{name}: {value!r} is not a time HHMMSS.FFFFFF")
    digits, _, fraction = value.replace(":", "").partition(".")
    return f"{digits.ljust(6, '9' if end and not fraction else '0')}.{fraction.ljust(6, '9' if end else '0')}"


def _stored_time(value: Any) -> str | None:
    try:
        return _time(str(value), "")
    except BadQuery:
        return None


def _in_range(value: str, low: str | None, high: str | None) -> bool:
    return (low is None or value >= low) and (high is None or value <= high)
