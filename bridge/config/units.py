"""The duration and size grammar of the configuration: ``30s``, ``10m``, ``7d``; ``64MiB``, ``2GB``."""

from __future__ import annotations

import re

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


def parse_duration(value: object) -> float:
    """Seconds from ``30s``, ``10m``, ``2h``, ``7d``, ``1w``, ``500ms`` or a bare number of seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 10m or 7d")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2) or "s"]
    else:
        raise ValueError(f"{value!r} is not a duration: use a number with ms, s, m, h, d or w (30s, 10m, 7d)")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


def parse_size(value: object) -> int:
    """Bytes from ``64MiB``, ``2GiB`` (binary), ``64MB`` (decimal), ``512B`` or a bare number of bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 64MiB or 2GB")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (m := _SIZE.match(value)):
        size = int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "B").lower()])
    else:
        raise ValueError(f"{value!r} is not a size: use a number with B, KiB, MiB, GiB (binary) or KB, MB, GB")
    if size < 0:
        raise ValueError("a size cannot be negative")
    return size



def format_size(size: int) -> str:
    """``1.5 GiB``, ``312 MiB``, ``4 KiB``, ``17 B``: a size for people (binary units)."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}" if unit != "B" and value < 10 else f"{value:.0f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
