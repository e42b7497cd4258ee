"""Routing: which destinations an instance goes to, decided by the configured rules.

For each operation only the rules with that verb are candidates, in file order; the
first that matches wins unless it says ``continue: true``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field

from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset

from bridge.config import Rule


@dataclass(frozen=True)
class Context:
    """Who sent the operation."""

    calling_ae: str
    called_ae: str
    peer: str


@dataclass
class Decision:
    """Where a stored instance goes: destination -> priority, and which rules said so."""

    destinations: dict[str, int] = field(default_factory=dict)
    rules: list[str] = field(default_factory=list)


def _matches_any(value: str, patterns: str | list[str]) -> bool:
    if isinstance(patterns, str):
        patterns = [patterns]
    return any(fnmatch.fnmatchcase(value, str(p)) for p in patterns)


def _tag_value(ds: Dataset, key: str) -> str | None:
    tag = tag_for_keyword(key)
    if tag is None and key.startswith("(") and key.endswith(")"):
        group, element = key[1:-1].split(",")
        tag = (int(group, 16) << 16) | int(element, 16)
    if tag is None or tag not in ds:
        return None
    value = ds[tag].value
    return "" if value is None else str(value)


def matches(rule: Rule, ctx: Context, ds: Dataset) -> bool:
    when = rule.when
    if when.calling_ae is not None and not _matches_any(ctx.calling_ae, when.calling_ae):
        return False
    if when.called_ae is not None and not _matches_any(ctx.called_ae, when.called_ae):
        return False
    for key, expected in when.tags.items():
        value = _tag_value(ds, key)
        if value is None or not _matches_any(value, expected if isinstance(expected, list) else str(expected)):
            return False
    return True


def route_store(rules: Sequence[Rule], ctx: Context, ds: Dataset, priorities: dict[str, int]) -> Decision:
    """Destinations for a C-STORE (or a watched file); ``priorities`` are the destinations' own."""
    decision = Decision()
    for rule in rules:
        if not rule.store or not matches(rule, ctx, ds):
            continue
        decision.rules.append(rule.name)
        for name in rule.store:
            priority = rule.priority if rule.priority is not None else priorities.get(name, 0)
            decision.destinations[name] = max(priority, decision.destinations.get(name, priority))
        if not rule.continue_:
            break
    return decision
