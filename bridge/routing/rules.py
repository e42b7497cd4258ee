"""Routing: which destinations (or sources) an operation goes to, decided by the rules.

For each operation only the rules with that verb (``store``, ``find``, ``retrieve``)
are candidates, in file order; the first that matches wins unless it says
``continue: true``. A rule matches when all its conditions hold. Each condition that
fails says why in words, which ``dicom-bridge route`` prints.

Rules are compiled once (``RuleSet``); an association keeps the rule set it started
with, so a reload never changes the routing of an association in progress.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from pydicom.dataset import Dataset

from bridge.config import WEEKDAYS, Modification, Rule, TagMatch
from bridge.dataset import tagpath

Verb = Literal["store", "find", "retrieve"]


@dataclass(frozen=True)
class Context:
    """Who sent the operation, and when (local time; None: now)."""

    calling_ae: str
    called_ae: str
    peer: str
    now: datetime | None = None


@dataclass
class Verdict:
    """One rule considered for one operation: did it match, and if not, why."""

    rule: str
    index: int  # in the rule list: rules[index]
    matched: bool
    reason: str  # the first condition that failed, or "" when it matched
    targets: list[str]
    modify: dict[str, Modification]
    stop: bool = False  # the rule matched and ended the search (no ``continue``)


@dataclass
class Decision:
    """Where an operation goes: destination (or source) -> priority, in rule order; the
    modifications per destination; the rules that matched; every verdict if explained."""

    destinations: dict[str, int] = field(default_factory=dict)
    modify: dict[str, Modification] = field(default_factory=dict)
    # ack: delivered: the destinations that must confirm before the C-STORE is answered,
    # and for how long to wait (the shortest of the rules that asked)
    await_delivery: set[str] = field(default_factory=set)
    ack_timeout: float = 0.0
    rules: list[str] = field(default_factory=list)
    verdicts: list[Verdict] = field(default_factory=list)


# A compiled condition returns None when it holds, or the reason it does not.
Check = Callable[[Context, Dataset], str | None]


class RuleSet:
    """Rules compiled for evaluation; ``priorities`` are the destinations' own."""

    def __init__(self, rules: Sequence[Rule], priorities: dict[str, int] | None = None) -> None:
        self.rules = list(rules)
        self.priorities = dict(priorities or {})
        self._checks = [_compile(rule) for rule in self.rules]

    def store(self, ctx: Context, ds: Dataset, explain: bool = False) -> Decision:
        return self.route("store", ctx, ds, explain)

    def route(self, verb: Verb, ctx: Context, ds: Dataset, explain: bool = False) -> Decision:
        """Evaluate the rules of ``verb`` against ``ds`` (a header, or a C-FIND/C-MOVE identifier)."""
        decision = Decision()
        stopped = False
        for index, (rule, checks) in enumerate(zip(self.rules, self._checks, strict=True)):
            targets = getattr(rule, verb)
            if not targets:
                continue
            if stopped:
                if explain:
                    decision.verdicts.append(Verdict(rule.name, index, False, "not considered: an earlier rule "
                                                     "matched without continue", list(targets), rule.modify))
                continue
            reason = next((why for check in checks if (why := check(ctx, ds)) is not None), None)
            if explain:
                decision.verdicts.append(Verdict(rule.name, index, reason is None, reason or "", list(targets),
                                                 rule.modify, stop=reason is None and not rule.continue_))
            if reason is not None:
                continue
            decision.rules.append(rule.name)
            for name in targets:
                priority = rule.priority if rule.priority is not None else self.priorities.get(name, 0)
                decision.destinations[name] = max(priority, decision.destinations.get(name, priority))
                if verb == "store" and name in rule.modify:
                    earlier = decision.modify.get(name)
                    decision.modify[name] = earlier.merged(rule.modify[name]) if earlier else rule.modify[name]
            if verb == "store" and rule.ack == "delivered":
                decision.await_delivery.update(targets)
                decision.ack_timeout = min(decision.ack_timeout or rule.ack_timeout, rule.ack_timeout)
            if not rule.continue_:
                stopped = True
        return decision


# -- compiling conditions ----------------------------------------------------------------


def _compile(rule: Rule) -> list[Check]:
    when = rule.when
    checks: list[Check] = []
    if when.calling_ae is not None:
        checks.append(_ae_check("calling_ae", _as_list(when.calling_ae), lambda c: c.calling_ae))
    if when.called_ae is not None:
        checks.append(_ae_check("called_ae", _as_list(when.called_ae), lambda c: c.called_ae))
    if when.peer is not None:
        checks.append(_peer_check(list(when.peer)))
    if when.time is not None:
        checks.append(_time_check(_as_list(when.time)))
    if when.weekday is not None:
        checks.append(_weekday_check(_as_list(when.weekday)))
    for key, condition in when.tags.items():
        checks.append(_tag_check(key, condition))
    return checks


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _ae_check(what: str, patterns: list[str], get: Callable[[Context], str]) -> Check:
    def check(ctx: Context, _: Dataset) -> str | None:
        value = get(ctx)
        if any(fnmatch.fnmatchcase(value, p) for p in patterns):
            return None
        return f"{what}: {value!r} is not {_alternatives(patterns)}"
    return check


def _peer_check(networks: list[Any]) -> Check:
    def check(ctx: Context, _: Dataset) -> str | None:
        try:
            address = ipaddress.ip_address(ctx.peer)
        except ValueError:
            return f"peer: {ctx.peer!r} is not a network address"
        if any(address.version == net.version and address in net for net in networks):
            return None
        return f"peer: {ctx.peer} is not in {', '.join(map(str, networks))}"
    return check


def _minutes(text: str) -> int:
    hours, minutes = text.strip().split(":")
    return int(hours) * 60 + int(minutes)


def _time_check(ranges: list[str]) -> Check:
    spans = [tuple(_minutes(part) for part in r.split("-")) for r in ranges]

    def inside(minute: int, start: int, end: int) -> bool:
        return start <= minute < end if start <= end else (minute >= start or minute < end)

    def check(ctx: Context, _: Dataset) -> str | None:
        now = ctx.now or datetime.now()
        minute = now.hour * 60 + now.minute
        if any(inside(minute, start, end) for start, end in spans):
            return None
        return f"time: {now:%H:%M} is outside {', '.join(ranges)}"
    return check


def _weekday_check(specs: list[str]) -> Check:
    days: set[int] = set()
    for spec in specs:
        ends = [WEEKDAYS.index(part.strip().lower()[:3]) for part in spec.split("-")]
        start, end = ends[0], ends[-1]
        day = start
        while True:
            days.add(day)
            if day == end:
                break
            day = (day + 1) % 7

    def check(ctx: Context, _: Dataset) -> str | None:
        today = (ctx.now or datetime.now()).weekday()
        if today in days:
            return None
        return f"weekday: {WEEKDAYS[today]} is not {', '.join(specs)}"
    return check


def _tag_check(key: str, condition: Any) -> Check:
    steps = tagpath.parse(key)
    test = _value_test(condition)

    def check(_: Context, ds: Dataset) -> str | None:
        values = tagpath.values(ds, steps)
        why = test(values)
        return None if why is None else f"tags.{key}: {why}"
    return check


# A value test gets the element's values (None: absent) and returns None or why not.
ValueTest = Callable[[list[str] | None], str | None]


def _value_test(condition: Any) -> ValueTest:
    if isinstance(condition, list):
        tests = [_value_test(c) for c in condition]

        def any_of(values: list[str] | None) -> str | None:
            reasons = [t(values) for t in tests]
            if any(r is None for r in reasons):
                return None
            return f"{_shown(values)} matches none of {_described(condition)}"
        return any_of
    if isinstance(condition, TagMatch):
        return _match_test(condition)
    return _equals_test(condition, glob=isinstance(condition, str))


def _shown(values: list[str] | None) -> str:
    if values is None:
        return "absent"
    if not values:
        return "empty"
    shown = "\\".join(values[:4]) + ("\\..." if len(values) > 4 else "")
    return repr(shown)


def _described(condition: Any) -> str:
    if isinstance(condition, list):
        return "[" + ", ".join(_described(c) for c in condition) + "]"
    if isinstance(condition, TagMatch):
        return "{" + ", ".join(f"{k}: {_described(v)}" for k, v in
                               condition.model_dump(by_alias=True, exclude_none=True).items()) + "}"
    return repr(condition)


def _number(text: Any) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _candidates(values: list[str]) -> list[str]:
    return values or [""]  # present but empty compares as the empty string


def _equals_test(expected: Any, glob: bool) -> ValueTest:
    number = _number(expected) if not isinstance(expected, str) else None

    def holds(value: str) -> bool:
        if number is not None:
            return _number(value) == number
        if glob:
            return fnmatch.fnmatchcase(value, str(expected))
        return value == str(expected)

    def test(values: list[str] | None) -> str | None:
        if values is None:
            return f"absent, expected {expected!r}"
        if any(holds(v) for v in _candidates(values)):
            return None
        return f"{_shown(values)} is not {expected!r}"
    return test


_ORDER = {"gt": (lambda a, b: a > b, ">"), "ge": (lambda a, b: a >= b, ">="),
          "lt": (lambda a, b: a < b, "<"), "le": (lambda a, b: a <= b, "<=")}


def _compare_test(op: str, bound: Any) -> ValueTest:
    compare, symbol = _ORDER[op]
    bound_number = _number(bound)

    def holds(value: str) -> bool:
        number = _number(value)
        if number is not None and bound_number is not None:
            return bool(compare(number, bound_number))  # numbers, and DA/TM/DT values
        return bool(compare(value, str(bound)))

    def test(values: list[str] | None) -> str | None:
        if values is None:
            return f"absent, expected {symbol} {bound!r}"
        if any(holds(v) for v in values):
            return None
        return f"{_shown(values)} is not {symbol} {bound!r}"
    return test


def _match_test(match: TagMatch) -> ValueTest:
    tests: list[ValueTest] = []
    if match.present is not None:
        want = match.present

        def presence(values: list[str] | None) -> str | None:
            there = bool(values)
            if there == want:
                return None
            return f"{_shown(values)}, expected it {'present' if want else 'absent'}"
        tests.append(presence)
    if match.equals is not None:
        tests.append(_equals_test(match.equals, glob=False))
    if match.regex is not None:
        pattern = re.compile(match.regex)

        def regex(values: list[str] | None) -> str | None:
            if values is None:
                return f"absent, expected to match /{match.regex}/"
            if any(pattern.search(v) for v in _candidates(values)):
                return None
            return f"{_shown(values)} does not match /{match.regex}/"
        tests.append(regex)
    for op in ("gt", "ge", "lt", "le"):
        bound = getattr(match, op)
        if bound is not None:
            tests.append(_compare_test(op, bound))
    if match.not_ is not None:
        inner = _value_test(match.not_)
        negated = match.not_

        def negation(values: list[str] | None) -> str | None:
            if inner(values) is not None:
                return None
            return f"{_shown(values)} matches {_described(negated)}, which it must not"
        tests.append(negation)

    def all_of(values: list[str] | None) -> str | None:
        return next((why for test in tests if (why := test(values)) is not None), None)
    return all_of


def _alternatives(patterns: list[str]) -> str:
    return repr(patterns[0]) if len(patterns) == 1 else "any of " + ", ".join(map(repr, patterns))


# -- static analysis, for ``dicom-bridge check`` -------------------------------------------


def warnings(rules: Sequence[Rule], accept_calling_ae: list[str] | None = None,
             ae_title: str | None = None, check_called_ae: bool = False) -> list[str]:
    """Rules that can never match, are shadowed by an earlier rule, or modify a key that
    another matching rule also modifies. Paths are ``rules[i]``."""
    found: list[str] = []
    for i, rule in enumerate(rules):
        where = f"rules[{i}] ({rule.name})"
        if not (rule.store or rule.find or rule.retrieve):
            found.append(f"{where}: has no store, find or retrieve: it is never used")
        found.extend(f"{where}: {why}" for why in _never(rule, accept_calling_ae, ae_title, check_called_ae))
        for verb in ("store", "find", "retrieve"):
            if not getattr(rule, verb):
                continue
            for j, earlier in enumerate(rules[:i]):
                if getattr(earlier, verb) and not earlier.continue_ and _covers(earlier, rule):
                    found.append(f"{where}: shadowed for {verb} by rules[{j}] ({earlier.name}), which matches "
                                 "everything it matches and does not continue")
                    break
    for i, rule in enumerate(rules):
        for j in range(i + 1, len(rules)):
            later = rules[j]
            if not rule.continue_:
                break
            for name in set(rule.modify) & set(later.modify):
                for key in sorted(rule.modify[name].keys() & later.modify[name].keys()):
                    found.append(f"rules[{j}] ({later.name}).modify.{name}: changes {key}, as rules[{i}] "
                                 f"({rule.name}) does; when both match, rules[{j}] wins")
    return list(dict.fromkeys(found))


def _never(rule: Rule, accept: list[str] | None, ae_title: str | None, check_called: bool) -> list[str]:
    reasons = []
    when = rule.when
    if when.calling_ae is not None and accept is not None:
        wanted = _as_list(when.calling_ae)
        if not any(_globs_overlap(w, a) for w in wanted for a in accept):
            reasons.append(f"can never match: calling_ae {_alternatives(wanted)} is refused by accept.calling_ae")
    if when.called_ae is not None and check_called and ae_title is not None:
        wanted = _as_list(when.called_ae)
        if not any(fnmatch.fnmatchcase(ae_title, w) for w in wanted):
            reasons.append(f"can never match: called_ae {_alternatives(wanted)} is refused "
                           f"(accept.check_called_ae: only {ae_title!r})")
    for key, condition in when.tags.items():
        if isinstance(condition, TagMatch) and condition.present is False and (
            condition.equals is not None or condition.regex is not None
            or any(getattr(condition, op) is not None for op in _ORDER)
        ):
            reasons.append(f"can never match: tags.{key} must be absent and have a value")
    return reasons


def _globs_overlap(a: str, b: str) -> bool:
    """Whether some AE title could match both globs (exact when one has no wildcard)."""
    if not any(c in a for c in "*?["):
        return fnmatch.fnmatchcase(a, b)
    if not any(c in b for c in "*?["):
        return fnmatch.fnmatchcase(b, a)
    return True  # two globs: assume they may overlap


def _covers(earlier: Rule, later: Rule) -> bool:
    """Whether ``earlier`` matches everything ``later`` matches: it has no conditions, or
    only conditions that ``later`` has too, identically."""
    mine = earlier.when.model_dump(exclude_none=True, exclude_defaults=True)
    theirs = later.when.model_dump(exclude_none=True, exclude_defaults=True)
    tags_mine, tags_theirs = mine.pop("tags", {}), theirs.pop("tags", {})
    return all(theirs.get(k) == v for k, v in mine.items()) and all(
        tags_theirs.get(k) == v for k, v in tags_mine.items()
    )
