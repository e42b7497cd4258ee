"""Validation errors as an administrator reads them: ``path: message``, with the path as
written in the file (``destinations.pacs.node``, ``rules[0].when.tags.Modality``), not
as pydantic locates it; an unknown key gets a "did you mean" hint, or the keys that may
go there."""

from __future__ import annotations

import difflib
import types
import typing
from typing import Annotated, Any, Union

from pydantic import BaseModel, Discriminator, Tag

from bridge.config.values import kind


def hint(word: str, choices: list[str]) -> str:
    """`` (did you mean 'x'?)`` for the choice closest to ``word``; "" when none is close."""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if not close:
        close = [c for c in choices if c.lower() == word.lower()]
    return f" (did you mean {close[0]!r}?)" if close else ""


def describe(err: Any, raw: Any, root: type[BaseModel], prefix: str = "") -> str:
    """One pydantic error of validating ``raw`` as ``root``, as ``path: message`` (the path
    after ``prefix``), with a hint for unknown keys; "" when another error says it better."""
    path, model = _walk(err["loc"], raw, root)
    if not path and err["loc"]:
        return ""
    joiner = "." if prefix and path and not path.startswith("[") else ""
    where = prefix + joiner + path or "(top level)"
    if err["type"] == "extra_forbidden":
        key = str(err["loc"][-1])
        allowed = list(model.model_fields) if model else []
        aliases = [f.alias for f in model.model_fields.values() if f.alias] if model else []
        suggestion = hint(key, allowed + aliases)
        if not suggestion and model:  # nothing close: say what may go there
            keys = [f.alias or name for name, f in model.model_fields.items()]
            suggestion = f" (expected one of: {', '.join(keys)})"
        return f"{where}: unknown key{suggestion}"
    if err["type"] == "union_tag_invalid":
        return f"{where}.type: {err['ctx']['tag']!r} is not a known type (expected {err['ctx']['expected_tags']})"
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "missing":
        message = "required"
    return f"{where}: {message}"


def _walk(loc: tuple[Any, ...], raw: Any, root: type[BaseModel]) -> tuple[str, type[BaseModel] | None]:
    """Turn a pydantic location into a config path, and find the model that holds its last key.

    Discriminated unions put the tag into the location (``destinations.x.folder.path``);
    it is dropped, since it is not a key the administrator wrote.
    """
    parts: list[str] = []
    annotation: Any = root
    model: type[BaseModel] | None = None
    for item in loc:
        annotation = _unwrap(annotation, raw)
        members = _tagged_members(annotation)
        if members is not None:
            if item in members:  # the member a kind-discriminated union chose: not a key
                annotation = members[item]
                continue
            annotation = _unwrap(members.get(str(kind(raw)), annotation), raw)
        if item == "[key]":  # the error is in a mapping's key, which is already in the path
            continue
        if isinstance(raw, dict) and isinstance(item, str) and item not in raw and raw.get("type") == item:
            continue
        if isinstance(item, str) and not isinstance(raw, dict) and parts:
            # a union member's label, e.g. ``list[Rule]``: only the member of the input's kind speaks
            kinds: dict[type, str] = {list: "list", str: "str"}
            label = kinds.get(type(raw))
            if label and not item.startswith(label):
                return "", None
            continue
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
            field = _field(annotation, str(item))
            annotation = field.annotation if field else None
        elif typing.get_origin(annotation) is dict:
            annotation = typing.get_args(annotation)[1]
            model = None
        elif typing.get_origin(annotation) is list:
            annotation = typing.get_args(annotation)[0]
            model = None
        else:
            annotation = None
        parts.append(f"[{item}]" if isinstance(item, int) else ("." if parts else "") + str(item))
        raw = _child(raw, item)
    return "".join(parts), model


def _child(raw: Any, item: Any) -> Any:
    if isinstance(raw, dict):
        return raw.get(item)
    if isinstance(raw, list) and isinstance(item, int) and item < len(raw):
        return raw[item]
    return None


def _field(model: type[BaseModel], key: str) -> Any:
    if key in model.model_fields:
        return model.model_fields[key]
    for field in model.model_fields.values():
        if field.alias == key:
            return field
    return None


def _unwrap(annotation: Any, raw: Any) -> Any:
    """Strip Annotated/Optional; pick the member of a model union that matches ``raw``.
    A kind-discriminated union (``by_kind``) is returned as it is: its tag is in the path."""
    while True:
        origin = typing.get_origin(annotation)
        if _tagged_members(annotation) is not None:
            return annotation
        if origin is Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            members = [a for a in typing.get_args(annotation) if a is not type(None)]
            models = [m for m in members if isinstance(m, type) and issubclass(m, BaseModel)]
            tag = raw.get("type") if isinstance(raw, dict) else None
            chosen = [m for m in models if "type" in m.model_fields
                      and typing.get_args(m.model_fields["type"].annotation) == (tag,)]
            if chosen:
                annotation = chosen[0]
            elif isinstance(raw, dict) and models:
                annotation = models[0]
            elif isinstance(raw, list):
                annotation = next((m for m in members if typing.get_origin(m) is list), members[0])
            elif isinstance(raw, dict):
                annotation = next((m for m in members if typing.get_origin(m) is dict), members[0])
            else:
                annotation = members[0]
        else:
            return annotation


def _tagged_members(annotation: Any) -> dict[str, Any] | None:
    """The members of a union discriminated by ``by_kind``, by tag; None for anything else."""
    if typing.get_origin(annotation) is not Annotated:
        return None
    union, *metadata = typing.get_args(annotation)
    if not any(isinstance(m, Discriminator) for m in metadata):
        return None
    members = {}
    for member in typing.get_args(union):
        inner, *tags = typing.get_args(member)
        for tag in tags:
            if isinstance(tag, Tag):
                members[tag.tag] = inner
    return members
