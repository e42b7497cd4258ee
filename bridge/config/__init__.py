"""The configuration file: typed models, the embedded default, and error reporting.

Every setting is declared once here (type, default, help); docs/configuration.md is
checked against these models by a test. Loading validates the whole file and reports
every error at once, each with its path and, for unknown keys, a "did you mean" hint.
Relative paths in a file are resolved against the file's folder.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import string
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)
from pydicom.datadict import keyword_dict

from bridge.dataset.uids import is_valid_uid
from bridge.errors import ConfigError
from bridge.routing import modify, tagpath
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


def _ae_pattern(value: str) -> str:
    """An AE title glob must be able to match an AE title: at most 16 characters
    (PS3.5 6.2), counting what the glob itself fixes (``*`` none, ``?`` and ``[...]`` one)."""
    fixed = len(re.sub(r"\[[^]]+\]|\?", "?", value).replace("*", ""))
    if fixed > 16:
        raise ValueError(f"{value!r} can never match: AE titles have at most 16 characters, this needs {fixed}")
    return value


AEPattern = Annotated[str, AfterValidator(_ae_pattern)]


class ListenTimeouts(Model):
    """Timeouts of the listener. None of them waits forever."""

    association_request: Duration = Field(
        5.0, gt=0, description="a new connection's deadline for its A-ASSOCIATE-RQ (ARTIM); then it is closed",
    )
    acse: Duration = Field(30.0, description="wait for A-RELEASE, and for the peer to close after an abort")
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
    max_pending_connections: int = Field(
        64, ge=1,
        description="connections that have not yet sent their A-ASSOCIATE-RQ; more are closed at once",
    )
    max_pdu: ByteSize = Field(262144, ge=0, description="maximum PDU we receive (0 = unlimited)")
    timeouts: ListenTimeouts = Field(default_factory=ListenTimeouts)


class Accept(Model):
    """Who may associate, and what they may send. Absent lists accept everyone."""

    calling_ae: list[AEPattern] | None = Field(
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
    busy_timeout: Duration = Field(30.0, gt=0, description="how long a queue write waits for the lock another "
                                   "connection holds (read at start)")


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
    probe_every: Duration = Field(5.0, ge=0, description="while backing off, ask the destination this often "
                                  "whether it answers again (C-ECHO, HTTP OPTIONS, a file written); 0: never")


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


class DimseDestination(DestinationBase):
    """C-STORE to a DIMSE peer named in ``nodes``."""

    type: Literal["dimse"]
    node: str = Field(description="the name of a node in `nodes`")


def _env_reference(value: str) -> str:
    # The message never repeats the value: it may be a secret pasted inline by mistake.
    if not re.fullmatch(r"env:[A-Za-z_][A-Za-z0-9_]*", value):
        raise ValueError("secrets are never written inline: give env:NAME (an environment variable) "
                         "or use the matching *_file setting")
    return value


EnvSecret = Annotated[str, AfterValidator(_env_reference)]


def _one_secret(model: BaseModel, name: str) -> None:
    if (getattr(model, f"{name}_file") is None) == (getattr(model, name) is None):
        raise ValueError(f"give exactly one of {name}_file and {name} (env:NAME)")


class NoAuth(Model):
    type: Literal["none"] = Field("none", description="none, basic, bearer or oauth2")


class BasicAuth(Model):
    type: Literal["basic"]
    username: str = Field(description="the user name")
    password_file: Path | None = Field(None, description="a file holding the password")
    password: EnvSecret | None = Field(None, description="env:NAME: the password from an environment variable")

    @model_validator(mode="after")
    def _secret(self) -> BasicAuth:
        _one_secret(self, "password")
        return self


class BearerAuth(Model):
    type: Literal["bearer"]
    token_file: Path | None = Field(None, description="a file holding the token; read again when it changes")
    token: EnvSecret | None = Field(None, description="env:NAME: the token from an environment variable")

    @model_validator(mode="after")
    def _secret(self) -> BearerAuth:
        _one_secret(self, "token")
        return self


class OAuth2Auth(Model):
    """OAuth 2.0 client credentials grant (RFC 6749 section 4.4)."""

    type: Literal["oauth2"]
    token_url: str = Field(description="the token endpoint")
    client_id: str
    client_secret_file: Path | None = Field(None, description="a file holding the client secret")
    client_secret: EnvSecret | None = Field(
        None, description="env:NAME: the client secret from an environment variable",
    )
    scope: str | None = Field(None, description="space-separated scopes to ask for")
    client_auth: Literal["basic", "post"] = Field(
        "basic", description="how the client authenticates: HTTP basic (RFC 6749 2.3.1) or form fields",
    )

    @model_validator(mode="after")
    def _secret(self) -> OAuth2Auth:
        _one_secret(self, "client_secret")
        return self

    @field_validator("token_url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _http_url(value)


HttpAuth = Annotated[NoAuth | BasicAuth | BearerAuth | OAuth2Auth, Field(discriminator="type")]


def _http_url(value: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("expected an http:// or https:// URL")
    if parts.username is not None or parts.password is not None:
        raise ValueError("credentials do not belong in the URL: use auth")
    if parts.query or parts.fragment:
        raise ValueError("expected a base URL without query or fragment")
    return value.rstrip("/")


class HttpTimeouts(Model):
    connect: Duration = Field(10.0, gt=0, description="TCP (and TLS) connect; also each write of a request body")
    read: Duration = Field(300.0, gt=0, description="the wait for the server's answer, and between its bytes")


class Tls(Model):
    verify: bool = Field(True, description="verify the server's certificate and host name")
    ca_bundle: Path | None = Field(None, description="PEM file of CA certificates to trust instead of the system's")
    client_cert: Path | None = Field(None, description="PEM client certificate (may hold the key too)")
    client_key: Path | None = Field(None, description="PEM private key of client_cert, unencrypted")

    @model_validator(mode="after")
    def _key_needs_cert(self) -> Tls:
        if self.client_key is not None and self.client_cert is None:
            raise ValueError("client_key needs client_cert")
        return self


class HttpPeer(Model):
    """An HTTP server we talk to: where, as whom, how long to wait, how to trust it."""

    url: str = Field(description="the DICOMweb base URL (without /studies)")
    auth: HttpAuth = Field(default_factory=NoAuth)
    timeouts: HttpTimeouts = Field(default_factory=HttpTimeouts)
    tls: Tls = Field(default_factory=Tls)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _http_url(value)

    def resolve_paths(self, base: Path) -> None:
        """Relative secret, CA and certificate files are relative to the config file's folder."""
        for holder, names in ((self.auth, ("password_file", "token_file", "client_secret_file")),
                              (self.tls, ("ca_bundle", "client_cert", "client_key"))):
            for name in names:
                if getattr(holder, name, None) is not None:
                    setattr(holder, name, _resolve(base, getattr(holder, name)))


class DicomwebDestination(DestinationBase, HttpPeer):
    """STOW-RS to ``{url}/studies``, many instances per request."""

    type: Literal["dicomweb"]


DestinationConfig = Annotated[
    FolderDestination | ArchiveDestination | DimseDestination | DicomwebDestination, Field(discriminator="type"),
]


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


def _scalar(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError("expected a single value (text or a number)")
    return value


Scalar = Annotated[str | int | float, BeforeValidator(_scalar)]


def _kind(value: Any) -> str | None:
    if isinstance(value, dict):
        return "mapping"
    if isinstance(value, list):
        return "list"
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        return "value"
    return None


def _by_kind(expected: str) -> Discriminator:
    """A union validated against the member of the input's kind only (a value, a list, a
    mapping), so that an error names what was wrong with that member, not every member."""
    return Discriminator(_kind, custom_error_type="wrong_kind", custom_error_message=f"expected {expected}")


def _one_or_list(item: Any, expected: str) -> Any:
    return Annotated[
        Annotated[item, Tag("value")] | Annotated[list[item], Tag("list")],  # type: ignore[valid-type]
        _by_kind(expected),
    ]


def _tag_path(value: str) -> str:
    tagpath.parse(value)
    return value


def _top_level_tag(value: str) -> str:
    modify.check_modifiable(tagpath.top_level(value))
    return value


def _creatable_tag(value: str) -> str:
    """A tag ``set`` or ``copy`` may create: it needs a VR from the dictionary."""
    modify.settable_vr(tagpath.top_level(value))
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
    _by_kind("a value or a mapping of operators"),
]
TagCondition = Annotated[
    Annotated[Scalar, Tag("value")] | Annotated[TagMatch, Tag("mapping")]
    | Annotated[list[_OneCondition], Tag("list")],
    _by_kind("a value, a list of values, or a mapping of operators (equals, regex, not, present, gt, ge, lt, le)"),
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

    calling_ae: _one_or_list(AEPattern, "an AE title or a list of them") | None = Field(  # type: ignore[valid-type]
        None, description="the peer's AE title (globs)",
    )
    called_ae: _one_or_list(AEPattern, "an AE title or a list of them") | None = Field(  # type: ignore[valid-type]
        None, description="the AE title the peer called (globs)",
    )
    peer: list[Network] | None = Field(None, description="the peer's address (CIDR networks or addresses)")
    time: _one_or_list(TimeRange, "a time range or a list of them") | None = Field(  # type: ignore[valid-type]
        None, description="local time of day, e.g. 07:00-19:00 (a range may wrap past midnight)",
    )
    weekday: _one_or_list(Weekday, "a weekday or a list of them") | None = Field(  # type: ignore[valid-type]
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
    set: dict[CreatableTag, _one_or_list(Scalar, "a value or a list of values") | None] = Field(  # type: ignore[valid-type]
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
                modify.element(tagpath.top_level(name), new)
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


class WatchZip(Model):
    """Zip archives dropped into a watched folder: their members are taken as files."""

    enabled: bool = Field(False, description="take *.zip files apart (off: a zip is not DICOM and fails)")
    max_expanded: ByteSize = Field(parse_size("4GiB"), ge=1, description="most bytes one zip may expand to")
    max_ratio: float = Field(200.0, ge=1, description="most a zip may expand, as a multiple of its own size")


class Watch(Model):
    """A folder whose new DICOM files enter the rules and the queue as a C-STORE would."""

    path: Path = Field(description="the folder watched")
    name: str | None = Field(None, description="the label in logs and metrics (default: the path)")
    recursive: bool = Field(True, description="watch subfolders too")
    include: list[str] = Field(default_factory=lambda: ["*"], description="globs a file's name or relative "
                               "path must match")
    exclude: list[str] = Field(default_factory=list, description="globs that leave a file alone")
    calling_ae: AETitle = Field("WATCH", description="the calling AE title rules see for these files")
    called_ae: AETitle | None = Field(None, description="the called AE title rules see (default: ae_title)")
    peer: str | None = Field(None, description="the peer rules see (default: watch:<path>)")
    after: Literal["delete", "move"] = Field("delete", description="what happens to a file once it is queued")
    move_to: Path | None = Field(None, description="with after: move, where files go (relative path kept)")
    failed: Path = Field(description="where files that cannot be taken go, each with a .reason file")
    observer: Literal["inotify", "polling"] = Field(
        "inotify", description="inotify, or polling for network shares written by other machines",
    )
    poll_interval: Duration = Field(2.0, gt=0, description="with observer: polling, how often to look")
    settle: Duration = Field(2.0, ge=0, description="a file must be unchanged this long before it is taken")
    rescan: Duration = Field(60.0, gt=0, description="look at the whole folder this often, for missed events")
    incomplete_timeout: Duration = Field(
        300.0, ge=0, description="a file that parses as truncated is retried until unchanged this long",
    )
    zip: WatchZip = Field(default_factory=WatchZip)

    @model_validator(mode="after")
    def _after(self) -> Watch:
        if self.after == "move" and self.move_to is None:
            raise ValueError("after: move needs move_to")
        if self.after == "delete" and self.move_to is not None:
            raise ValueError("move_to is only used with after: move")
        return self

    @property
    def label(self) -> str:
        return self.name or str(self.path)


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
    watch: list[Watch] = Field(default_factory=list, description="folders whose files are taken as C-STOREs")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    _notes: list[str] = PrivateAttr(default_factory=list)

    @property
    def notes(self) -> list[str]:
        """What loading filled in that the file did not say (shown by ``check`` and at start)."""
        return self._notes

    def store_warning(self) -> str | None:
        """Why every C-STORE (and every watched file) will be refused, if it will."""
        assert isinstance(self.rules, list)
        if self.unrouted != "reject" or any(rule.store for rule in self.rules):
            return None
        return ("rules: no rule has store: every C-STORE will be refused (0x0124) and every watched file will "
                "fail; add a rule with store, or set unrouted to a destination")

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
    """Validate a whole configuration; ``ConfigError`` lists every problem at once: the
    models' errors, those of a rules file, and names that refer to nothing."""
    errors: list[str] = []
    config: Config | None = None
    defaulted = raw.get("destinations") in (None, {}) and raw.get("rules") in (None, [])
    if defaulted:  # nowhere to send anything: do what running without a file does
        raw = {**raw, **embedded_default()}
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        errors += [e for e in (_describe(err, raw) for err in exc.errors()) if e]
    raw_rules: list[tuple[str, Any]] = []
    rules: list[Rule] | None = None
    if isinstance(raw.get("rules"), str):
        rules_path = _resolve(base, Path(raw["rules"]))
        try:
            raw_rules = _read_rules(rules_path)
            rules = _validate_rules(raw_rules)
        except ConfigError as exc:
            errors += exc.errors
    elif isinstance(raw.get("rules"), list):
        raw_rules = [(f"rules[{i}]", item) for i, item in enumerate(raw["rules"])]
    errors += _cross_references(raw, raw_rules)
    # Folders that feed each other are reported with everything else, even when another
    # section has errors: the watch entries are checked on their own then.
    watches = list(enumerate(config.watch)) if config is not None else _valid_watches(raw.get("watch"))
    for _, watch in watches:  # normalised: compared with each other, and shown in logs and rows
        watch.path = Path(os.path.normpath(_resolve(base, watch.path)))
        watch.failed = Path(os.path.normpath(_resolve(base, watch.failed)))
        watch.move_to = Path(os.path.normpath(_resolve(base, watch.move_to))) if watch.move_to else None
    errors += _watch_overlaps(watches)
    if errors or config is None:
        raise ConfigError(list(dict.fromkeys(errors)), source)
    if rules is not None:
        config.rules = rules
    if defaulted:
        config.notes.append("no destinations and no rules: every instance is kept in the local archive, "
                            "as with the embedded default (destination 'archive', rule 'keep-everything')")
    config.data_dir = _resolve(base, config.data_dir)
    for destination in config.destinations.values():
        if isinstance(destination, FolderDestination | ArchiveDestination) and destination.path is not None:
            destination.path = str(_resolve(base, Path(destination.path)))
        if isinstance(destination, HttpPeer):
            destination.resolve_paths(base)
    return config


def _valid_watches(raw: Any) -> list[tuple[int, Watch]]:
    """The entries of a ``watch`` list that are valid on their own, with their index in
    the file (the whole model's validation reports why the others are not)."""
    if not isinstance(raw, list):
        return []
    watches = []
    for i, entry in enumerate(raw):
        try:
            watches.append((i, Watch.model_validate(entry)))
        except ValidationError:
            pass
    return watches


def _watch_overlaps(watches: list[tuple[int, Watch]]) -> list[str]:
    """Folders that would feed each other: a watched folder inside another recursive one,
    a failed or move_to folder that is watched itself; and labels used twice."""
    def watched_by(path: Path, other: Watch) -> bool:
        return path == other.path or (other.recursive and path.is_relative_to(other.path))

    errors = []
    seen: dict[str, int] = {}
    for i, watch in watches:
        if watch.label in seen:
            errors.append(f"watch[{i}]: {watch.label!r} is already watch[{seen[watch.label]}]"
                          " (give one of them another name)")
        seen.setdefault(watch.label, i)
        for j, other in watches:
            if i != j and watched_by(watch.path, other):
                errors.append(f"watch[{i}].path: {watch.path} is also watched by watch[{j}]")
            for key in ("failed", "move_to"):
                target = getattr(watch, key)
                if target is not None and watched_by(target, other):
                    errors.append(f"watch[{i}].{key}: {target} is inside the watched folder {other.path}")
    return errors


def load_rules(path: Path) -> list[Rule]:
    """Rules from a YAML file (a list, or a mapping with ``rules:``) or a folder of them, in name order."""
    return _validate_rules(_read_rules(path))


def _read_rules(path: Path) -> list[tuple[str, Any]]:
    """The raw rules of a file or folder, each with the path an error about it names."""
    if not path.exists():
        raise ConfigError([f"rules: {path} does not exist"], str(path))
    files = sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml")) if path.is_dir() else [path]
    found: list[tuple[str, Any]] = []
    for file in files:
        try:
            raw = yaml.safe_load(file.read_text(encoding="utf-8")) or []
        except OSError as exc:
            raise ConfigError([f"{file}: cannot read: {exc.strerror}"], "rules") from exc
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
            raise ConfigError([f"{file}: {where}{getattr(exc, 'problem', exc)}"], "rules") from exc
        if isinstance(raw, dict):
            raw = raw.get("rules", [])
        if not isinstance(raw, list):
            raise ConfigError([f"{file}: expected a list of rules, or a mapping with rules:"], "rules")
        found += [(f"{file.name}: rules[{i}]", item) for i, item in enumerate(raw)]
    return found


def _validate_rules(raw_rules: list[tuple[str, Any]]) -> list[Rule]:
    rules: list[Rule] = []
    errors: list[str] = []
    for where, item in raw_rules:
        try:
            rules.append(Rule.model_validate(item))
        except ValidationError as exc:
            file, _, prefix = where.rpartition(": ")
            lead = f"{file}: " if file else ""
            errors += [lead + e for e in (_describe(err, item, prefix, Rule) for err in exc.errors()) if e]
    if errors:
        raise ConfigError(errors, "rules")
    return rules


def _resolve(base: Path, path: Path) -> Path:
    path = path.expanduser()
    return path if path.is_absolute() else (base / path)


SOURCES_BUILT_IN = ["local"]


def _cross_references(raw: dict[str, Any], raw_rules: list[tuple[str, Any]]) -> list[str]:
    """Names that refer to nothing, read from the raw file so that they are reported
    together with every other error."""
    errors = []
    destinations: dict[str, Any] = raw["destinations"] if isinstance(raw.get("destinations"), dict) else {}
    nodes: dict[str, Any] = raw["nodes"] if isinstance(raw.get("nodes"), dict) else {}
    names = [str(n) for n in destinations]
    sources = SOURCES_BUILT_IN
    unrouted = raw.get("unrouted", "reject")
    if isinstance(unrouted, str) and unrouted != "reject" and unrouted not in destinations:
        errors.append(f"unrouted: unknown destination {unrouted!r}{_hint(unrouted, names + ['reject'])}")
    for name, destination in destinations.items():
        node = destination.get("node") if isinstance(destination, dict) else None
        if isinstance(node, str) and node not in nodes:
            errors.append(f"destinations.{name}.node: unknown node {node!r}{_hint(node, [str(n) for n in nodes])}")
    for where, rule in raw_rules:
        if not isinstance(rule, dict):
            continue
        for verb, known, what in (("store", names, "destination"), ("find", sources, "source"),
                                  ("retrieve", sources, "source")):
            targets = rule.get(verb)
            for j, target in enumerate(targets if isinstance(targets, list) else []):
                if isinstance(target, str) and target not in known:
                    errors.append(f"{where}.{verb}[{j}]: unknown {what} {target!r}{_hint(target, known)}")
        modify = rule.get("modify")
        store: list[Any] = rule["store"] if isinstance(rule.get("store"), list) else []
        for name in modify if isinstance(modify, dict) else {}:
            if name not in destinations:
                errors.append(f"{where}.modify.{name}: unknown destination {name!r}{_hint(str(name), names)}")
            elif name not in store:
                errors.append(f"{where}.modify.{name}: {name!r} is not in this rule's store list")
    return errors


def _hint(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if not close:
        close = [c for c in choices if c.lower() == word.lower()]
    return f" (did you mean {close[0]!r}?)" if close else ""


def _describe(err: Any, raw: Any, prefix: str = "", root: type[BaseModel] | None = None) -> str:
    """One pydantic error as ``path: message``, with a hint for unknown keys ("" if moot)."""
    path, model = _walk(err["loc"], raw, root or Config)
    if not path and err["loc"]:
        return ""
    joiner = "." if prefix and path and not path.startswith("[") else ""
    where = prefix + joiner + path or "(top level)"
    if err["type"] == "extra_forbidden":
        key = str(err["loc"][-1])
        allowed = list(model.model_fields) if model else []
        aliases = [f.alias for f in model.model_fields.values() if f.alias] if model else []
        hint = _hint(key, allowed + aliases)
        if not hint and model:  # nothing close: say what may go there
            keys = [f.alias or name for name, f in model.model_fields.items()]
            hint = f" (expected one of: {', '.join(keys)})"
        return f"{where}: unknown key{hint}"
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
            annotation = _unwrap(members.get(str(_kind(raw)), annotation), raw)
        if item == "[key]":  # the error is in a mapping's key, which is already in the path
            continue
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
    """Strip Annotated/Optional; pick the member of a model union that matches ``raw``.
    A kind-discriminated union (``_by_kind``) is returned as it is: its tag is in the path."""
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
    """The members of a union discriminated by ``_by_kind``, by tag; None for anything else."""
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
