"""The rule schema: conditions (``when``), where an instance goes (``store``), which
sources answer queries and retrievals, and the modifications of each destination's copy.
How rules are evaluated is ``bridge.routing.rules``; how a copy is modified,
``bridge.routing.modify``."""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field, Tag, field_validator, model_validator

from bridge.config.values import AEPattern, Duration, Model, Network, by_kind, one_or_list
from bridge.dataset import elements, tagpath


def _scalar(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError("expected a single value (text or a number)")
    return value


Scalar = Annotated[str | int | float, BeforeValidator(_scalar)]


def _tag_path(value: str) -> str:
    tagpath.parse(value)
    return value


def _top_level_tag(value: str) -> str:
    elements.check_modifiable(tagpath.top_level(value))
    return value


def _creatable_tag(value: str) -> str:
    """A tag ``set`` or ``copy`` may create: it needs a VR from the dictionary."""
    elements.settable_vr(tagpath.top_level(value))
    return value


TagPath = Annotated[str, AfterValidator(_tag_path)]
TopLevelTag = Annotated[str, AfterValidator(_top_level_tag)]
CreatableTag = Annotated[TopLevelTag, AfterValidator(_creatable_tag)]


def _regex(value: str) -> str:
    try:
        re.compile(value)
    except re.error as exc:
        where = f" at position {exc.pos}" if exc.pos is not None else ""
        raise ValueError(f"bad regex: {exc.msg}{where}") from None
    return value


Regex = Annotated[str, AfterValidator(_regex)]


class TagMatch(Model):
    """A tag condition with operators; all given must hold. Any value of a multi-valued
    element (or of any sequence item on the path) may satisfy it."""

    equals: Scalar | None = Field(None, description="exactly this (no glob); numbers compare as numbers")
    regex: Regex | None = Field(None, description="a Python regular expression found in the value (re.search)")
    not_: TagCondition | None = Field(None, alias="not", description="the condition must not hold")
    present: bool | None = Field(None, description="true: the element is there and not empty; false: it is not")
    gt: Scalar | None = Field(None, description="greater than (numbers, and DA/TM/DT values, compare numerically)")
    ge: Scalar | None = Field(None, description="greater than or equal")
    lt: Scalar | None = Field(None, description="less than")
    le: Scalar | None = Field(None, description="less than or equal")


# A bare value is an equality that may be a glob (``CT*``); a list means any of.
_OneCondition = Annotated[
    Annotated[Scalar, Tag("value")] | Annotated[TagMatch, Tag("mapping")],
    by_kind("a value or a mapping of operators"),
]
TagCondition = Annotated[
    Annotated[Scalar, Tag("value")] | Annotated[TagMatch, Tag("mapping")]
    | Annotated[list[_OneCondition], Tag("list")],
    by_kind("a value, a list of values, or a mapping of operators (equals, regex, not, present, gt, ge, lt, le)"),
]
TagMatch.model_rebuild()


def _time_range(value: str) -> str:
    m = re.fullmatch(r"\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*", value)
    if not m or int(m.group(1)) > 24 or int(m.group(3)) > 24 or int(m.group(2)) > 59 or int(m.group(4)) > 59:
        raise ValueError(f"{value!r} is not a time range like 07:00-19:00")
    return value


TimeRange = Annotated[str, AfterValidator(_time_range)]
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def _weekdays(value: str) -> str:
    for part in value.lower().split("-"):
        if part.strip()[:3] not in WEEKDAYS or len(value.split("-")) > 2:
            raise ValueError(f"{value!r} is not a weekday or a range like mon-fri")
    return value


Weekday = Annotated[str, AfterValidator(_weekdays)]


class When(Model):
    """Conditions of a rule; all must hold. Strings may be globs; a list means any of."""

    calling_ae: one_or_list(AEPattern, "an AE title or a list of them") | None = Field(  # type: ignore[valid-type]
        None, description="the peer's AE title (globs)",
    )
    called_ae: one_or_list(AEPattern, "an AE title or a list of them") | None = Field(  # type: ignore[valid-type]
        None, description="the AE title the peer called (globs)",
    )
    peer: list[Network] | None = Field(None, description="the peer's address (CIDR networks or addresses)")
    time: one_or_list(TimeRange, "a time range or a list of them") | None = Field(  # type: ignore[valid-type]
        None, description="local time of day, e.g. 07:00-19:00 (a range may wrap past midnight)",
    )
    weekday: one_or_list(Weekday, "a weekday or a list of them") | None = Field(  # type: ignore[valid-type]
        None, description="mon..sun, or a range like mon-fri",
    )
    tags: dict[TagPath, TagCondition] = Field(
        default_factory=dict,
        description="keyword, (gggg,eeee) or Sequence[0].Keyword -> condition",
    )

    @field_validator("peer", mode="before")
    @classmethod
    def _networks(cls, value: Any) -> Any:
        values = [value] if isinstance(value, str) else value
        if isinstance(values, list):
            try:
                return [ipaddress.ip_network(str(v), strict=False) for v in values]
            except ValueError as exc:
                raise ValueError(str(exc)) from None
        return value


class Replace(Model):
    pattern: Regex = Field(description="a Python regular expression")
    with_: str = Field(alias="with", description="the replacement (\\1 for groups)")

    @model_validator(mode="after")
    def _groups(self) -> Replace:
        try:  # Python checks the replacement's group references against the pattern
            re.compile(self.pattern).sub(self.with_, "")
        except (re.error, IndexError) as exc:
            raise ValueError(f"with: {exc}") from None
        return self


class Modification(Model):
    """Changes to the outgoing copy for one destination, applied in this order: copy,
    replace, set, remove. The spooled original is never changed."""

    copy_: dict[CreatableTag, TopLevelTag] = Field(
        default_factory=dict, alias="copy", description="target keyword: source keyword",
    )
    replace: dict[TopLevelTag, Replace] = Field(default_factory=dict, description="regex replace in a value")
    set: dict[CreatableTag, one_or_list(Scalar, "a value or a list of values") | None] = Field(  # type: ignore[valid-type]
        default_factory=dict, description="keyword: new value (null: empty value)",
    )
    remove: list[TopLevelTag] = Field(default_factory=list, description="keywords or (gggg,eeee) to remove")

    @field_validator("set")
    @classmethod
    def _values(cls, value: dict[str, Any]) -> dict[str, Any]:
        """Each value must fit its element's VR; what depends on the data set (its
        character set) is checked when the copy is made."""
        errors = []
        for name, new in value.items():
            try:
                elements.element(tagpath.top_level(name), new)
            except ValueError as exc:
                errors.append(f"{name}: {exc}")
        if errors:
            raise ValueError("; ".join(errors))
        return value

    def keys(self) -> frozenset[str]:
        return frozenset([*self.copy_, *self.replace, *self.set, *self.remove])

    def merged(self, later: Modification) -> Modification:
        """This and a later rule's modification of the same destination: later keys win."""
        return Modification.model_validate({
            "copy": {**self.copy_, **later.copy_}, "replace": {**self.replace, **later.replace},
            "set": {**self.set, **later.set}, "remove": list(dict.fromkeys([*self.remove, *later.remove])),
        })


class Rule(Model):
    name: str
    when: When = Field(default_factory=When)
    store: list[str] = Field(default_factory=list, description="destinations for C-STORE and watched files")
    find: list[str] = Field(default_factory=list, description="sources asked for C-FIND")
    retrieve: list[str] = Field(default_factory=list, description="sources for C-MOVE and C-GET, in order")
    fuzzy_matching: bool = Field(False, description="a C-FIND this rule routes asks its dicomweb sources for "
                                 "fuzzy matching of person names (QIDO-RS fuzzymatching=true)")
    modify: dict[str, Modification] = Field(default_factory=dict, description="destination -> changes")
    continue_: bool = Field(False, alias="continue", description="later rules are still considered")
    ack: Literal["spooled", "delivered"] = Field(
        "spooled", description="when a C-STORE is answered: once spooled, or once every destination of this "
        "rule confirms",
    )
    ack_timeout: Duration = Field(
        20.0, gt=0, description="with ack: delivered, answer 0xA700 'delivery pending' after this long",
    )
    priority: int | None = Field(
        None, description="queue priority of what this rule stores (default: the destination's)",
    )
