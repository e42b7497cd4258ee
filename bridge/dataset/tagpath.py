"""Tag paths as rules and modifications name them, and their values as text.

A path is a keyword (``Modality``), a tag (``(0010,0010)``), or steps into sequences
joined by dots: ``RequestAttributesSequence.ScheduledProcedureStepID`` (any item) or
``RequestAttributesSequence[0].ScheduledProcedureStepID`` (the first item).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator
from dataclasses import dataclass

from pydicom.datadict import dictionary_VR, keyword_dict, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence

_TAG = re.compile(r"^\(([0-9A-Fa-f]{4}),([0-9A-Fa-f]{4})\)$")
_STEP = re.compile(r"^(?P<name>\([0-9A-Fa-f]{4},[0-9A-Fa-f]{4}\)|[A-Za-z0-9]+)(?:\[(?P<index>\d+)\])?$")
_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM",
                       "UC", "UI", "UR", "UT"})


@dataclass(frozen=True)
class Step:
    tag: int
    index: int | None = None  # a sequence item; None: any item (only before the last step)


def tag_of(name: str) -> int:
    """The tag of a keyword or ``(gggg,eeee)``; ``ValueError`` with a hint otherwise."""
    if m := _TAG.match(name):
        return (int(m.group(1), 16) << 16) | int(m.group(2), 16)
    tag = tag_for_keyword(name)
    if tag is None:
        close = difflib.get_close_matches(name, list(keyword_dict), n=1, cutoff=0.75)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown keyword{hint}")
    return int(tag)


def parse(path: str) -> tuple[Step, ...]:
    """Parse a tag path; ``ValueError`` naming the bad step."""
    steps = []
    parts = path.split(".")
    for n, part in enumerate(parts):
        m = _STEP.match(part.strip())
        if not m:
            raise ValueError(f"{part!r} is neither a keyword nor (gggg,eeee)")
        try:
            tag = tag_of(m.group("name"))
        except ValueError as exc:
            raise ValueError(f"{m.group('name')}: {exc}" if len(parts) > 1 else str(exc)) from None
        last = n == len(parts) - 1
        if not last and _vr(tag) not in ("SQ", None):
            raise ValueError(f"{m.group('name')} is not a sequence")
        if last and m.group("index") is not None:
            raise ValueError(f"{part}: an index selects a sequence item; the last step names the element")
        steps.append(Step(tag, int(m.group("index")) if m.group("index") is not None else None))
    return tuple(steps)


def top_level(path: str) -> int:
    """The tag of a path that must not go into sequences (modifications)."""
    steps = parse(path)
    if len(steps) != 1:
        raise ValueError("only top-level elements can be modified")
    return steps[0].tag


def _vr(tag: int) -> str | None:
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return None


def values(ds: Dataset, steps: tuple[Step, ...]) -> list[str] | None:
    """The values at ``steps`` as text, one per value (a multi-valued element gives each);
    ``None`` when the element is absent everywhere, ``[]`` when present but empty."""
    found: list[str] | None = None
    for item in _items(ds, steps[:-1]):
        texts = element_texts(item, steps[-1].tag)
        if texts is not None:
            found = (found or []) + texts
    return found


def _items(ds: Dataset, steps: tuple[Step, ...]) -> Iterator[Dataset]:
    if not steps:
        yield ds
        return
    step, rest = steps[0], steps[1:]
    try:
        element = ds.get(step.tag)
        seq = element.value if element is not None else None
    except Exception:
        return
    if not isinstance(seq, DicomSequence):
        return
    chosen = seq if step.index is None else seq[step.index:step.index + 1]
    for item in chosen:
        yield from _items(item, rest)


def element_texts(ds: Dataset, tag: int) -> list[str] | None:
    """One element's values as text (see ``values``). Plain-ASCII text still raw from the
    file is split and decoded directly, without pydicom's per-value conversion."""
    try:
        element = ds.get_item(tag)
        if element is None:
            return None
        if isinstance(element, RawDataElement):
            raw = element.value
            if isinstance(raw, bytes) and raw.isascii() and b"\x1b" not in raw \
                    and (element.VR or _vr(tag)) in _TEXT_VRS:
                text = raw.decode("ascii").strip(" \x00")
                return [v.strip(" \x00") for v in text.split("\\")] if text else []
        value = ds[tag].value
    except Exception:
        return None  # unreadable counts as absent: a rule on it cannot match
    if isinstance(value, DicomSequence):
        return [f"{len(value)} item(s)"] if len(value) else []  # present when it has items
    if value is None or value == "":
        return []
    if isinstance(value, MultiValue | list | tuple):
        return [str(v) for v in value]
    if isinstance(value, bytes):
        return [value.hex()]
    return [str(value)]
