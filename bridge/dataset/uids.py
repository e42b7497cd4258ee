"""Validation of what comes from datasets before it may name anything on disk."""

from __future__ import annotations

import re
import unicodedata

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def is_valid_uid(value: object) -> bool:
    """PS3.5 9.1: digits and dots, at most 64 characters, no empty component."""
    return isinstance(value, str) and len(value) <= 64 and bool(_UID.match(value))


def sanitise(value: object, max_length: int = 64) -> str:
    """A tag value made safe as one path component: ASCII letters, digits, ``._-``; never ``.``/``..``."""
    text = unicodedata.normalize("NFKD", str(value)).encode("ascii", "ignore").decode()
    text = _UNSAFE.sub("_", text).strip("._")[:max_length]
    return text or "_"
