"""The configuration file: typed models, the embedded default, and error reporting.

Every setting is declared once here (type, default, help); docs/configuration.md is
checked against these models by a test. Loading validates the whole file and reports
every error at once, each with its path and, for unknown keys, a "did you mean" hint.
Relative paths in a file are resolved against the file's folder.
"""

from __future__ import annotations

import difflib
import ipaddress
import string
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator
from pydicom.datadict import keyword_dict

from bridge.errors import ConfigError
from bridge.uids import is_valid_uid
from bridge.units import parse_duration, parse_size

Duration = Annotated[float, BeforeValidator(parse_duration)]
ByteSize = Annotated[int, BeforeValidator(parse_size)]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_AE_TITLE = "DICOM_BRIDGE"
DEFAULT_DATA_DIR = "./dicom-bridge-data"


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def _ae_title(value: str) -> str:
    value = value.strip()
    if not 0 < len(value) <= 16 or "\\" in value or not value.isprintable():
        raise ValueError(f"{value!r} is not an AE title: 1 to 16 printable characters, no backslash")
    return value


AETitle = Annotated[str, BeforeValidator(lambda v: _ae_title(str(v)))]


class ListenTimeouts(Model):
    """Timeouts of the listener. None of them waits forever."""

    acse: Duration = Field(30.0, description="wait for A-ASSOCIATE-RQ and A-RELEASE")
    dimse: Duration = Field(60.0, description="wait for the next DIMSE message within an operation")
    network: Duration = Field(60.0, description="wait for bytes on an open connection")
    idle: Duration = Field(300.0, description="close an association that has been silent this long")


class Listen(Model):
    """Where the daemon accepts associations."""

    host: str = Field("127.0.0.1", description="address to bind; 0.0.0.0 for every interface")
    port: int = Field(11112, ge=1, le=65535, description="TCP port")
    max_associations: int = Field(
        32, ge=1,
        description="concurrent associations; more are refused (A-ASSOCIATE-RJ 2/3/2)",
    )
    max_pdu: ByteSize = Field(262144, ge=0, description="maximum PDU we receive (0 = unlimited)")
    timeouts: ListenTimeouts = Field(default_factory=ListenTimeouts)


class Accept(Model):
    """Who may associate, and what they may send. Absent lists accept everyone."""

    calling_ae: list[str] | None = Field(
        None,
        description="allowed calling AE titles (globs); others get A-ASSOCIATE-RJ 1/1/3",
    )
    hosts: list[Network] | None = Field(
        None,
        description="allowed peer networks (CIDR); others get A-ASSOCIATE-RJ 1/1/1",
    )
    check_called_ae: bool = Field(
        False,
        description="refuse associations not addressed to ae_title (A-ASSOCIATE-RJ 1/1/7)",
    )
    extra_sop_classes: list[str] = Field(default_factory=list, description="private storage SOP class UIDs to accept")
    any_sop_class: bool = Field(
        False,
        description="accept every proposed abstract syntax as storage (private SOP classes)",
    )

    @field_validator("extra_sop_classes")
    @classmethod
    def _uids(cls, value: list[str]) -> list[str]:
        bad = [uid for uid in value if not is_valid_uid(uid)]
        if bad:
            raise ValueError(f"not a UID: {', '.join(map(repr, bad))}")
        return value

    @field_validator("hosts", mode="before")
    @classmethod
    def _networks(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [ipaddress.ip_network(str(v), strict=False) for v in value]
        return value


class Spool(Model):
    """The spool: where received instances wait, durably, for their destinations."""

    min_free: ByteSize = Field(
        parse_size("1GiB"),
        description="refuse C-STORE (0xA700) when less is free on the spool's file system",
    )


class Retry(Model):
    """Backoff for instances that failed transiently, and for destinations that are down."""

    initial: Duration = Field(2.0, description="first delay")
    max: Duration = Field(600.0, description="longest delay")
    max_attempts: int = Field(20, ge=1, description="attempts charged to one row before it is dead")
    max_age: Duration = Field(7 * 86400.0, description="a row older than this is dead")


class RetryOverride(Model):
    initial: Duration | None = None
    max: Duration | None = None
    max_attempts: int | None = Field(None, ge=1)
    max_age: Duration | None = None


class QueueSettings(Model):
    """The delivery queue."""

    retention: Duration = Field(30 * 86400.0, description="how long done and cancelled rows are kept")


class Batch(Model):
    max_instances: int = Field(50, ge=1, description="instances per send")
    max_bytes: ByteSize = Field(parse_size("64MiB"), ge=1, description="bytes per send")
    linger: Duration = Field(0.0, description="after a quiet spell, wait this long for more before sending")


def _local_batch() -> Batch:
    # Local destinations are not waited for by anyone, and batching them keeps their
    # queue commits (each an fsync) from competing with intake's, image by image.
    return Batch(linger=0.25)


Duplicates = Literal["supersede", "keep-first", "keep-both"]


class DestinationBase(Model):
    workers: int = Field(1, ge=1, le=64, description="concurrent sends")
    duplicates: Duplicates = Field(
        "supersede",
        description="the same SOP Instance UID with new content: supersede, keep-first or keep-both",
    )
    priority: int = Field(0, description="higher is claimed first")
    batch: Batch = Field(default_factory=Batch)
    retry: RetryOverride = Field(default_factory=RetryOverride)
    idle_close: Duration = Field(60.0, description="close connections after this long without work")


class FolderDestination(DestinationBase):
    """Part-10 files under a path template of tags: ``/srv/{StudyInstanceUID}/{SeriesInstanceUID}``."""

    type: Literal["folder"]
    batch: Batch = Field(default_factory=_local_batch)
    path: str = Field(description="folder template; {Keyword} is replaced by the sanitised tag value")
    filename: str = Field("{SOPInstanceUID}.dcm", description="file name template")

    @field_validator("path", "filename")
    @classmethod
    def _keywords(cls, value: str) -> str:
        try:
            names = [name for _, name, spec, _ in string.Formatter().parse(value) if name is not None]
        except ValueError as exc:
            raise ValueError(f"bad template: {exc}") from None
        unknown = [n for n in names if not n or keyword_dict.get(n) is None]
        if unknown:
            hints = "".join(_hint(n, list(keyword_dict)) for n in unknown[:1])
            raise ValueError(f"unknown DICOM keyword {unknown[0]!r} in template{hints}")
        return value


class ArchiveDestination(DestinationBase):
    """The local archive: original Part-10 files plus an SQLite index (the `local` source)."""

    type: Literal["archive"]
    batch: Batch = Field(default_factory=_local_batch)
    path: str | None = Field(None, description="defaults to <data_dir>/archive")

    @field_validator("duplicates")
    @classmethod
    def _one_per_uid(cls, value: str) -> str:
        if value == "keep-both":
            raise ValueError("the archive keeps one instance per SOP Instance UID: use supersede or keep-first")
        return value


DestinationConfig = Annotated[FolderDestination | ArchiveDestination, Field(discriminator="type")]


class NodeTimeouts(Model):
    connect: Duration = 10.0
    acse: Duration = 30.0
    dimse: Duration = 300.0


class Node(Model):
    """A DIMSE peer. ae_title defaults to the node's key."""

    ae_title: AETitle | None = None
    host: str
    port: int = Field(ge=1, le=65535)
    charset: str = "ISO_IR 192"
    timeouts: NodeTimeouts = Field(default_factory=NodeTimeouts)


class When(Model):
    """Conditions of a rule; all must hold. Strings may be globs; a list means any of."""

    calling_ae: str | list[str] | None = None
    called_ae: str | list[str] | None = None
    tags: dict[str, Any] = Field(default_factory=dict)


class Rule(Model):
    name: str
    when: When = Field(default_factory=When)
    store: list[str] = Field(default_factory=list)
    continue_: bool = Field(False, alias="continue")
    priority: int | None = None


class Metrics(Model):
    host: str = "127.0.0.1"
    port: int | None = Field(None, ge=1, le=65535, description="serve Prometheus metrics here (absent: not served)")


class Config(Model):
    """The whole configuration file."""

    ae_title: AETitle = DEFAULT_AE_TITLE
    listen: Listen = Field(default_factory=Listen)
    accept: Accept = Field(default_factory=Accept)
    data_dir: Path = Path(DEFAULT_DATA_DIR)
    spool: Spool = Field(default_factory=Spool)
    queue: QueueSettings = Field(default_factory=QueueSettings)
    retry: Retry = Field(default_factory=Retry)
    unrouted: str = Field("reject", description="'reject' (0x0124) or the name of a destination")
    nodes: dict[str, Node] = Field(default_factory=dict)
    destinations: dict[str, DestinationConfig] = Field(default_factory=dict)
    rules: list[Rule] | str = Field(
        default_factory=list,
        description="a list of rules, or a YAML file or folder of them",
    )
    metrics: Metrics = Field(default_factory=Metrics)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    def retry_for(self, destination: str) -> Retry:
        override = self.destinations[destination].retry.model_dump(exclude_none=True)
        return self.retry.model_copy(update=override)


def embedded_default() -> dict[str, Any]:
    """The configuration used when no file is given: keep every instance in the local archive."""
    return {
        "destinations": {"archive": {"type": "archive"}},
        "rules": [{"name": "keep-everything", "store": ["archive"]}],
    }


# -- loading ---------------------------------------------------------------------------


def load_config(path: Path | None = None) -> Config:
    """Load and validate a configuration file, or the embedded default when ``path`` is None.

    Raises ``ConfigError`` listing every problem, each with its path.
    """
    if path is None:
        return validate(embedded_default(), base=Path.cwd(), source="embedded default")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError([f"cannot read: {exc.strerror}"], str(path)) from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError([f"{where}{getattr(exc, 'problem', exc)}"], str(path)) from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(["the file must be a mapping of settings"], str(path))
    return validate(raw, base=path.parent.resolve(), source=str(path))


def validate(raw: dict[str, Any], base: Path, source: str = "configuration") -> Config:
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        errors = [e for e in (_describe(err, raw) for err in exc.errors()) if e]
        raise ConfigError(list(dict.fromkeys(errors)), source) from None
    config.data_dir = _resolve(base, config.data_dir)
    for destination in config.destinations.values():
        if destination.path is not None:
            destination.path = str(_resolve(base, Path(destination.path)))
    if isinstance(config.rules, str):
        rules_path = _resolve(base, Path(config.rules))
        config.rules = load_rules(rules_path)
    errors = _cross_references(config)
    if errors:
        raise ConfigError(errors, source)
    return config


def load_rules(path: Path) -> list[Rule]:
    """Rules from a YAML file (a list, or a mapping with ``rules:``) or a folder of them, in name order."""
    files = sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml")) if path.is_dir() else [path]
    rules: list[Rule] = []
    errors: list[str] = []
    for file in files:
        try:
            raw = yaml.safe_load(file.read_text(encoding="utf-8")) or []
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError([f"{file}: {exc}"], "rules") from exc
        if isinstance(raw, dict):
            raw = raw.get("rules", [])
        for i, item in enumerate(raw):
            try:
                rules.append(Rule.model_validate(item))
            except ValidationError as exc:
                errors.extend(f"{file.name}: " + _describe(err, item, f"rules[{i}]") for err in exc.errors())
    if errors:
        raise ConfigError(errors, str(path))
    return rules


def _resolve(base: Path, path: Path) -> Path:
    path = path.expanduser()
    return path if path.is_absolute() else (base / path)


def _cross_references(config: Config) -> list[str]:
    errors = []
    names = list(config.destinations)
    if config.unrouted != "reject" and config.unrouted not in config.destinations:
        errors.append(f"unrouted: unknown destination {config.unrouted!r}{_hint(config.unrouted, names + ['reject'])}")
    assert isinstance(config.rules, list)
    for i, rule in enumerate(config.rules):
        for j, name in enumerate(rule.store):
            if name not in config.destinations:
                errors.append(f"rules[{i}].store[{j}]: unknown destination {name!r}{_hint(name, names)}")
    return errors


def _hint(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if not close:
        close = [c for c in choices if c.lower() == word.lower()]
    return f" (did you mean {close[0]!r}?)" if close else ""


def _describe(err: Any, raw: Any, prefix: str = "") -> str:
    """One pydantic error as ``path: message``, with a hint for unknown keys ("" if moot)."""
    path, model = _walk(err["loc"], raw)
    if not path and err["loc"]:
        return ""
    joiner = "." if prefix and path and not path.startswith("[") else ""
    where = prefix + joiner + path or "(top level)"
    if err["type"] == "extra_forbidden":
        key = str(err["loc"][-1])
        allowed = list(model.model_fields) if model else []
        aliases = [f.alias for f in model.model_fields.values() if f.alias] if model else []
        return f"{where}: unknown key{_hint(key, allowed + aliases)}"
    if err["type"] == "union_tag_invalid":
        return f"{where}.type: {err['ctx']['tag']!r} is not a known type (expected {err['ctx']['expected_tags']})"
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "missing":
        message = "required"
    return f"{where}: {message}"


def _walk(loc: tuple[Any, ...], raw: Any) -> tuple[str, type[BaseModel] | None]:
    """Turn a pydantic location into a config path, and find the model that holds its last key.

    Discriminated unions put the tag into the location (``destinations.x.folder.path``);
    it is dropped, since it is not a key the administrator wrote.
    """
    parts: list[str] = []
    annotation: Any = Config
    model: type[BaseModel] | None = None
    for item in loc:
        annotation = _unwrap(annotation, raw)
        if isinstance(raw, dict) and isinstance(item, str) and item not in raw and raw.get("type") == item:
            continue
        if isinstance(item, str) and not isinstance(raw, dict) and parts:
            # a union member's label, e.g. ``list[Rule]``: only the member of the input's kind speaks
            kinds: dict[type, str] = {list: "list", str: "str"}
            kind = kinds.get(type(raw))
            if kind and not item.startswith(kind):
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
    """Strip Annotated/Optional; pick the member of a model union that matches ``raw``."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            members = [a for a in typing.get_args(annotation) if a is not type(None)]
            models = [m for m in members if isinstance(m, type) and issubclass(m, BaseModel)]
            tag = raw.get("type") if isinstance(raw, dict) else None
            chosen = [m for m in models if typing.get_args(m.model_fields["type"].annotation) == (tag,)]
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
