"""What every section of the configuration builds on: the base model, and the value types
several sections share (durations, sizes, networks, AE titles and their globs, unions
chosen by the kind of value written), and how a relative path in the file is read."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Discriminator, Tag

from bridge.config.units import parse_duration, parse_size

Duration = Annotated[float, BeforeValidator(parse_duration)]
ByteSize = Annotated[int, BeforeValidator(parse_size)]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def _ae_title(value: str) -> str:
    value = value.strip()
    if not 0 < len(value) <= 16 or "\\" in value or not value.isprintable():
        raise ValueError(f"{value!r} is not an AE title: 1 to 16 printable characters, no backslash")
    return value


AETitle = Annotated[str, BeforeValidator(lambda v: _ae_title(str(v)))]


def _ae_pattern(value: str) -> str:
    """An AE title glob must be able to match an AE title: at most 16 characters
    (PS3.5 6.2), counting what the glob itself fixes (``*`` none, ``?`` and ``[...]`` one)."""
    fixed = len(re.sub(r"\[[^]]+\]|\?", "?", value).replace("*", ""))
    if fixed > 16:
        raise ValueError(f"{value!r} can never match: AE titles have at most 16 characters, this needs {fixed}")
    return value


AEPattern = Annotated[str, AfterValidator(_ae_pattern)]


def kind(value: Any) -> str | None:
    """The kind of a value as written in the file: a mapping, a list or a single value."""
    if isinstance(value, dict):
        return "mapping"
    if isinstance(value, list):
        return "list"
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        return "value"
    return None


def by_kind(expected: str) -> Discriminator:
    """A union validated against the member of the input's kind only (a value, a list, a
    mapping), so that an error names what was wrong with that member, not every member."""
    return Discriminator(kind, custom_error_type="wrong_kind", custom_error_message=f"expected {expected}")


def one_or_list(item: Any, expected: str) -> Any:
    return Annotated[
        Annotated[item, Tag("value")] | Annotated[list[item], Tag("list")],  # type: ignore[valid-type]
        by_kind(expected),
    ]


def resolve(base: Path, path: Path) -> Path:
    """``path`` as the file means it: ``~`` expanded, relative to ``base`` (the file's folder)."""
    path = path.expanduser()
    return path if path.is_absolute() else (base / path)
