"""``Config``, the whole configuration file, and the daemon's own sections of it: the
listener, who may associate, the spool, the queue, the retry policy, metrics. The named
sections (``nodes``, ``destinations``, ``sources``, ``rules``, ``watch``) have a module each."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PrivateAttr, field_validator

from bridge.config.destinations import DestinationConfig
from bridge.config.nodes import Node
from bridge.config.rules import Rule
from bridge.config.sources import SourceConfig
from bridge.config.units import parse_size
from bridge.config.values import AEPattern, AETitle, ByteSize, Duration, Model, Network
from bridge.config.watch import Watch
from bridge.dataset.uids import is_valid_uid

DEFAULT_AE_TITLE = "DICOM_BRIDGE"
DEFAULT_DATA_DIR = "./dicom-bridge-data"


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


class QueueSettings(Model):
    """The delivery queue."""

    retention: Duration = Field(30 * 86400.0, description="how long done and cancelled rows are kept")
    busy_timeout: Duration = Field(30.0, gt=0, description="how long a queue write waits for the lock another "
                                   "connection holds (read at start)")


class FindSettings(Model):
    """C-FIND, whatever the sources."""

    max_results: int = Field(100_000, ge=1, le=10_000_000, description="the most matches one C-FIND answers; "
                             "past it the C-FIND ends with the matches so far, a warning in the log and the "
                             "dicom_bridge_find_capped metric")


class Metrics(Model):
    """Deprecated: read as ``http`` (docs/configuration.md, "http")."""

    host: str = "127.0.0.1"
    port: int | None = Field(None, ge=1, le=65535, description="deprecated: read as http.port")


class HttpTls(Model):
    """HTTPS for the daemon's HTTP server."""

    cert_file: Path = Field(description="the server's certificate chain (PEM)")
    key_file: Path = Field(description="its private key (PEM, unencrypted)")
    client_ca_file: Path | None = Field(
        None, description="when set, clients must present a certificate signed by these CAs (PEM)")


class Http(Model):
    """The daemon's HTTP server: metrics, health, the admin and query/retrieve API, static trees."""

    host: str = Field("127.0.0.1", description="address to bind; 0.0.0.0 for every interface")
    port: int | None = Field(None, ge=0, le=65535,
                             description="TCP port (absent: no HTTP server; 0: any free port, logged)")
    tls: HttpTls | None = Field(None, description="serve HTTPS (absent: plain HTTP)")
    token_file: Path | None = Field(
        None, description="a file of bearer tokens for /api (absent: the API under /api is off)")
    request_timeout: Duration = Field(
        10.0, gt=0, description="a request's head must arrive within this, and its body never pause longer")


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
    sources: dict[str, SourceConfig] = Field(
        default_factory=dict, description="where C-FIND, C-MOVE and C-GET are answered from, besides 'local'",
    )
    find: FindSettings = Field(default_factory=FindSettings)
    rules: list[Rule] | str = Field(
        default_factory=list,
        description="a list of rules, or a YAML file or folder of them",
    )
    http: Http = Field(default_factory=Http)
    metrics: Metrics = Field(default_factory=Metrics, description="deprecated: read as http")
    watch: list[Watch] = Field(default_factory=list, description="folders whose files are taken as C-STOREs")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = Field(
        "text", description="'text' (one line per event, for people) or 'json' (JSON lines, for log collectors)",
    )

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
