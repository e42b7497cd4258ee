"""The shared contract: what intake hands the queue and destinations (``SpooledInstance``),
what a destination answers (``Outcome``), and what a source answers queries and
retrievals with (``Source``). See docs/architecture.md."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from bridge.config import Modification

if TYPE_CHECKING:
    from pydicom import Dataset

    from bridge.dataset.query import Query


@dataclass(frozen=True)
class SpooledInstance:
    """A complete, durable Part-10 file in the spool, and what routing needs to know of it."""

    spool_path: Path
    size: int
    sha256: str
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax: str
    calling_ae: str
    called_ae: str
    peer: str  # address of the sender, or "watch:<folder>"
    received_at: datetime
    patient_id: str = ""
    accession_number: str = ""
    # dicomfile.INDEX_KEYWORDS as text, read by intake from the header it parsed (empty
    # values left out): the archive indexes from them without parsing the file again.
    attributes: Mapping[str, str] = field(default_factory=dict)
    # What the rules change in the copy a destination receives (a queue row is one
    # instance for one destination); the spooled original is never changed.
    modify: Modification | None = None


@dataclass(frozen=True)
class Done:
    """The destination holds the instance."""


@dataclass(frozen=True)
class Duplicate:
    """The destination already held this instance; counts as delivered."""

    reason: str = "already present"


@dataclass(frozen=True)
class Warning:  # noqa: A001 - the DIMSE name for a success with a caveat
    """Delivered, with a caveat worth logging (e.g. DIMSE 0xB000 coercion)."""

    reason: str


@dataclass(frozen=True)
class Transient:
    """This instance failed in a way that may pass: retry it with backoff, charging it."""

    reason: str
    retry_after: float | None = None
    status: int | None = None  # the destination's DIMSE status (or STOW FailureReason), when it gave one


@dataclass(frozen=True)
class Permanent:
    """This instance can never be delivered here as it is: dead-letter it with the reason."""

    reason: str
    status: int | None = None  # the destination's DIMSE status (or STOW FailureReason), when it gave one


Outcome = Done | Duplicate | Warning | Transient | Permanent


@runtime_checkable
class Destination(Protocol):
    """Where stored instances go. ``send`` returns one outcome per instance, in order.

    Destination-level conditions are raised, not returned: ``UpstreamUnavailable``
    (back off, charge nothing) and ``UpstreamMisconfigured`` (suspend).
    """

    name: str

    def open(self) -> None: ...

    def send(self, batch: Sequence[SpooledInstance]) -> Sequence[Outcome]: ...

    def close(self) -> None: ...


@runtime_checkable
class Probing(Protocol):
    """A destination that can tell, cheaply and storing nothing, whether it answers again
    (optional). While a destination backs off, its runner probes it every few seconds
    and ends the back-off as soon as it answers; a destination without ``probe`` waits
    for the back-off to end."""

    def probe(self) -> bool:
        """True when the destination answers now (any answer a delivery could act on),
        False while it is still unreachable. Never raises for an unreachable destination."""
        ...


@dataclass(frozen=True)
class InstanceRef:
    """One instance a source holds, as ``locate`` finds it: what a C-MOVE or C-GET needs
    to fetch it and to offer it to the move destination (its SOP class)."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str


@dataclass(frozen=True)
class Retrieved:
    """What ``retrieve`` gives back for one reference: a complete Part-10 file, or the
    reason there is none. A ``temporary`` file is on the spool's file system, in the
    folder a restart empties, and is the caller's: it sends it, then removes it. A file
    that is not temporary (the archive's own) is only read."""

    ref: InstanceRef
    path: Path | None = None
    failure: str = ""
    temporary: bool = True


@runtime_checkable
class Source(Protocol):
    """Where queries and retrievals are answered from (``bridge/sources/``).

    ``find`` yields one record per match at ``query.level`` (PATIENT, STUDY, SERIES,
    IMAGE), values as decoded text, as soon as it has each: the C-FIND service cuts each
    to what was asked for and checks it against the query again. It may yield ``None``
    after an upstream answer that gave no record yet, to say it is at work: a source
    that yields nothing for its ``find_timeout`` is taken to be stuck. ``locate`` yields the
    instances a query names (IMAGE level, with SOP Class UIDs); ``retrieve`` fetches
    them, one ``Retrieved`` per reference, in any order, each as soon as it has it; it
    may yield ``None`` while it waits for its upstream, to say it is at work (the
    service then keeps the requester informed). Each wait of ``retrieve`` is bounded by
    the source's ``retrieve_timeout``; a reference it cannot deliver is a ``Retrieved``
    with the reason, and an upstream that fails as a whole raises as ``find`` does (the
    references not yet delivered are then tried from the rule's next source). Closed
    early, it removes the temporary files it has not handed over.

    Each is a generator that its caller may stop early (``close()``, as a C-CANCEL
    does): it then asks its upstream for nothing more and frees what it holds. Each
    upstream answer is awaited at most the source's ``find_timeout``. A source that
    cannot answer raises ``UpstreamUnavailable`` (unreachable, no answer in time) or
    ``UpstreamMisconfigured`` (it refuses us), never an empty result. Several C-FINDs
    may use one source at once, from different threads.
    """

    name: str

    def find(self, query: Query) -> Iterator[Dataset | None]: ...

    def locate(self, query: Query) -> Iterator[InstanceRef]: ...

    def retrieve(self, refs: Sequence[InstanceRef]) -> Iterator[Retrieved | None]: ...

    def close(self) -> None: ...
