"""What a destination's answer means for one instance: DIMSE C-STORE statuses and STOW-RS
FailureReasons (the same codes, PS3.18 Table I.2-3), mapped in one place.

| status | kind | outcome |
| --- | --- | --- |
| 0x0000 | done | ``Done`` |
| 0xB000, 0xB006, 0xB007 (and 0xB0xx) | warning | ``Warning`` (delivered, with the caveat logged) |
| 0x0111 duplicate SOP instance | duplicate | ``Duplicate``: the destination's ``duplicates`` policy decides |
| 0xA7xx out of resources, 0x0110 processing failure | transient | ``Transient``: retried with backoff, charged |
| 0xA9xx, 0xCxxx, 0x0117 | permanent | ``Permanent``: dead at once, with the reason |
| 0x0122 SOP class not supported, 0x0124 not authorised | refused | ``Permanent`` (but the |
| | | destination is suspended when every instance of a batch gets it) |
| anything else | permanent | ``Permanent``, with the raw code in the reason |
"""

from __future__ import annotations

from enum import Enum

from bridge.model import Done, Duplicate, Outcome, Permanent, Transient, Warning

NAMES = {
    0x0000: "Success",
    0x0107: "Attribute list error",
    0x0110: "Processing failure",
    0x0111: "Duplicate SOP instance",
    0x0117: "Invalid object instance",
    0x0122: "SOP class not supported",
    0x0124: "Refused: not authorised",
    0xA700: "Refused: out of resources",
    0xA900: "Error: data set does not match SOP class",
    0xB000: "Coercion of data elements",
    0xB006: "Elements discarded",
    0xB007: "Data set does not match SOP class",
    0xC000: "Error: cannot understand",
}


class Kind(Enum):
    DONE = "done"
    WARNING = "warning"
    DUPLICATE = "duplicate"
    TRANSIENT = "transient"
    PERMANENT = "permanent"
    REFUSED = "refused"  # permanent for the instance; for a whole batch, the destination's problem


def classify(status: int) -> Kind:
    if status == 0x0000:
        return Kind.DONE
    if status & 0xFF00 == 0xB000:
        return Kind.WARNING
    if status == 0x0111:
        return Kind.DUPLICATE
    if status & 0xFF00 == 0xA700 or status == 0x0110:
        return Kind.TRANSIENT
    if status in (0x0122, 0x0124):
        return Kind.REFUSED
    return Kind.PERMANENT  # 0xA9xx, 0xCxxx, 0x0117, and every unknown code


def describe(status: int, comment: str = "") -> str:
    """``0xC000 Error: cannot understand (the peer's comment)`` for logs and queue reasons."""
    name = NAMES.get(status) or NAMES.get(status & 0xFF00) or "unknown status"
    text = f"0x{status:04X} {name}"
    return f"{text}: {comment}" if comment else text


def outcome(status: int, comment: str = "", duplicates: str = "supersede") -> Outcome:
    """The outcome of one instance's status (a DIMSE status or a STOW FailureReason)."""
    kind = classify(status)
    reason = describe(status, comment)
    if kind is Kind.DONE:
        return Done()
    if kind is Kind.WARNING:
        return Warning(reason)
    if kind is Kind.DUPLICATE:
        if duplicates == "supersede":
            return Duplicate(f"{reason}; the destination keeps the instance it holds")
        return Duplicate(reason)
    if kind is Kind.TRANSIENT:
        return Transient(reason, status=status)
    return Permanent(reason, status)
