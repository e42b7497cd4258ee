"""The Query/Retrieve MOVE and GET services (C-MOVE, C-GET, PS3.4 C.4.2, C.4.3): Patient
Root at PATIENT, STUDY, SERIES and IMAGE level, Study Root at STUDY, SERIES and IMAGE
level, answered from the sources the ``retrieve`` rules name, in order
(``bridge.sources.retrieval``).

Each request goes: the identifier read (``bridge.dataset.query``: the level's unique key
must have a value), for a C-MOVE the destination found among ``nodes``, the instances
located, a first pending response at once (remaining = the number located), then each
instance fetched and sent as a C-STORE sub-operation (``Move``: on an association of the
bridge's own to the destination; ``Get``: on the requester's association), a pending
response after each with the counts, and one more every ``HEARTBEAT`` seconds while a
source is still fetching. The final status: 0x0000 when every sub-operation completed,
0xB000 with the Failed SOP Instance UID List when some failed or had warnings, 0xA702
when all failed, 0xFE00 on C-CANCEL with the counts so far; 0xA701 when the instances
cannot be located, 0xA801 for an unknown Move Destination, 0xA900 for an identifier
without the unique key of its level. docs/conformance.md has the table.

pynetdicom's own service for these (a handler that yields data sets) cannot answer
before the first sub-operation or send from files:
``bridge.dimse.pynetdicom_overrides.retrieval`` hands the request here whole.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from io import BytesIO
from typing import Any, cast

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_GET, C_MOVE
from pynetdicom.dsutils import encode

from bridge.config import Config
from bridge.config.sources import RETRIEVE_TIMEOUT
from bridge.dataset.query import QueryError, parse, retrieval_problem
from bridge.dimse import pynetdicom_overrides
from bridge.dimse.listener import AssociationState
from bridge.errors import UpstreamError
from bridge.metrics import Metrics
from bridge.model import Done, Duplicate, InstanceRef, Outcome, Retrieved, SpooledInstance, Warning
from bridge.qr.find import TRANSFER_SYNTAXES
from bridge.routing.rules import Context
from bridge.sources import Sources
from bridge.sources.retrieval import HEARTBEAT, Fetched, Retrieval, TooMany

LOGGER = logging.getLogger(__name__)

PENDING = 0xFF00
CANCEL = 0xFE00
SUCCESS = 0x0000
SUBOPERATIONS_FAILED = 0xB000  # some failed or had warnings
ALL_FAILED = 0xA702  # unable to perform sub-operations
CANNOT_LOCATE = 0xA701  # unable to calculate number of matches
UNKNOWN_DESTINATION = 0xA801
IDENTIFIER_INVALID = 0xA900
CANNOT_PROCESS = 0xC000
MAX_SUBOPERATIONS = 0xFFFF  # the counts are US (PS3.7 9.3.4)


class Refused(Exception):
    """The request ends before any sub-operation, with ``status`` and ``comment``."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment


class Cancelled(Exception):
    pass


class SubOperationsImpossible(Exception):
    """No more sub-operation can be made (the destination is gone): the rest fail."""


@dataclasses.dataclass
class Counts:
    remaining: int = 0
    completed: int = 0
    failed: int = 0
    warning: int = 0
    failed_uids: list[str] = dataclasses.field(default_factory=list)

    def fail(self, uid: str) -> None:
        self.remaining -= 1
        self.failed += 1
        self.failed_uids.append(uid)


class Sink:
    """Where sub-operations go: ``prepare`` once the instances are located, ``send`` one
    fetched instance (its outcome), ``close`` at the end."""

    def prepare(self, located: Sequence[InstanceRef], ready: Sequence[Fetched]) -> None: ...

    def send(self, fetched: Fetched) -> Outcome:
        raise NotImplementedError

    def close(self) -> None: ...


class Responder:
    """Sends the responses of one C-MOVE or C-GET request on its association."""

    def __init__(self, event: evt.Event) -> None:
        self.event = event
        self.request = cast(C_MOVE | C_GET, event.request)
        self.context_id = int(event.context.context_id)
        self.syntax = event.context.transfer_syntax

    def send(self, status: int, counts: Counts | None = None, comment: str = "", final: bool = True) -> None:
        rsp = C_MOVE() if isinstance(self.request, C_MOVE) else C_GET()
        rsp.MessageIDBeingRespondedTo = self.request.MessageID
        rsp.AffectedSOPClassUID = self.request.AffectedSOPClassUID
        rsp.Status = status
        if counts is not None:
            if not final or status == CANCEL:
                rsp.NumberOfRemainingSuboperations = max(0, counts.remaining)
            rsp.NumberOfCompletedSuboperations = counts.completed
            rsp.NumberOfFailedSuboperations = counts.failed
            rsp.NumberOfWarningSuboperations = counts.warning
            if final and status != SUCCESS and counts.failed_uids:
                ds = Dataset()
                ds.FailedSOPInstanceUIDList = counts.failed_uids
                ts = self.syntax
                encoded = encode(ds, ts.is_implicit_VR, ts.is_little_endian, ts.is_deflated)
                rsp.Identifier = BytesIO(cast(bytes, encoded))
        if comment:
            # LO, in the command set's default repertoire: ASCII, 64 characters at most
            rsp.ErrorComment = comment.encode("ascii", "replace").decode()[:64]  # type: ignore[assignment]
        if self.event.assoc.is_established:
            self.event.assoc.dimse.send_msg(rsp, self.context_id)


class Retrieve:
    """What C-MOVE and C-GET share; ``Move`` and ``Get`` say where sub-operations go."""

    event: evt.InterventionEvent
    operation: str  # C-MOVE, C-GET
    roots: dict[str, str]
    answers_whole = True  # sends every response itself (pynetdicom_overrides.retrieval)

    def __init__(self, sources: Sources, metrics: Metrics, heartbeat: float = HEARTBEAT) -> None:
        self.sources = sources
        self.metrics = metrics
        self.heartbeat = heartbeat

    def add_contexts(self, ae: AE, config: Config) -> None:
        for uid in self.roots:
            ae.add_supported_context(uid, TRANSFER_SYNTAXES)

    def serves(self, primitive: Any) -> bool:
        kind = C_MOVE if self.operation == "C-MOVE" else C_GET
        return isinstance(primitive, kind) and primitive.MessageIDBeingRespondedTo is None \
            and primitive.AffectedSOPClassUID in self.roots

    def sink(self, event: evt.Event, association: AssociationState) -> Sink:
        raise NotImplementedError

    def describe(self, event: evt.Event) -> str:
        """How the log line names where the instances went."""
        return ""

    def handle(self, event: evt.Event, association: AssociationState) -> None:
        started = time.monotonic()
        responder = Responder(event)
        counts = Counts()
        status, level, names, located, comment = SUCCESS, "?", [], 0, ""
        retrieval: Retrieval | None = None
        sink: Sink | None = None
        try:
            query = self._query(event)
            level = query.level
            if problem := retrieval_problem(query):
                raise Refused(IDENTIFIER_INVALID, problem)
            config = association.config
            ctx = Context(calling_ae=association.calling_ae, called_ae=association.called_ae, peer=association.peer)
            names = list(association.rules.route("retrieve", ctx, query.identifier).destinations)
            if not names:
                raise Refused(CANNOT_PROCESS, "no retrieve rule matches this request")
            sink = self.sink(event, association)
            retrieval = Retrieval(query, [self.sources.get(name, config) for name in names],
                                  {name: _retrieve_timeout(config, name) for name in names},
                                  heartbeat=self.heartbeat, limit=MAX_SUBOPERATIONS)
            try:
                refs = retrieval.locate()
            except UpstreamError as exc:
                raise Refused(CANNOT_LOCATE, f"cannot locate: {exc}") from exc
            except TooMany as exc:
                raise Refused(CANNOT_LOCATE, f"{exc}: retrieve by series") from exc
            located = len(refs)
            counts.remaining = located
            if located:
                responder.send(PENDING, counts, final=False)  # the first response at once
                status, comment = self._run(event, retrieval, sink, refs, counts, responder)
            else:
                status = SUCCESS
            responder.send(status, counts, comment)
        except Refused as exc:
            status, comment = exc.status, exc.comment
            LOGGER.warning("%s from %s refused: %s (0x%04X)", self.operation, association.calling_ae, exc.comment,
                           exc.status)
            responder.send(exc.status, counts if counts.remaining else None, exc.comment)
        except Cancelled:
            status = CANCEL
            responder.send(CANCEL, counts)
        except Exception as exc:  # a bug: the request is answered all the same, with why
            status = CANNOT_PROCESS
            LOGGER.exception("%s from %s failed", self.operation, association.calling_ae)
            responder.send(CANNOT_PROCESS, counts if counts.remaining else None, f"cannot retrieve: {exc}")
        finally:
            if retrieval is not None:
                retrieval.stop()
            if sink is not None:
                sink.close()
            pynetdicom_overrides.still_busy(event.assoc)
            self._count(retrieval, status, counts)
            LOGGER.info("%s from %s (%s)%s: %s level, %s: %d located, %d completed, %d warning, %d failed, "
                        "0x%04X in %.2fs%s", self.operation, association.calling_ae, association.label,
                        self.describe(event), level, ", ".join(names) or "no source", located, counts.completed,
                        counts.warning, counts.failed, status, time.monotonic() - started,
                        f" ({comment})" if comment else "")

    def _query(self, event: evt.Event) -> Any:
        request = cast(C_MOVE | C_GET, event.request)
        try:
            query = parse(event.identifier, str(request.AffectedSOPClassUID))
        except QueryError as exc:
            raise Refused(IDENTIFIER_INVALID if exc.status == 0xA900 else CANNOT_PROCESS, exc.comment) from exc
        except Exception as exc:  # an identifier pydicom cannot decode
            raise Refused(CANNOT_PROCESS, f"cannot decode identifier: {exc}") from exc
        return query

    def _run(self, event: evt.Event, retrieval: Retrieval, sink: Sink, refs: Sequence[InstanceRef],
             counts: Counts, responder: Responder) -> tuple[int, str]:
        """Fetch and send every instance located; the final status, and a comment for it."""
        prepared, comment = False, ""
        accounted: set[str] = set()  # completed, warning or failed
        for item in retrieval:
            pynetdicom_overrides.still_busy(event.assoc)
            if event.is_cancelled:
                if isinstance(item, Fetched):
                    item.done()
                raise Cancelled
            if item is None:
                responder.send(PENDING, counts, final=False)  # still at work
                continue
            accounted.add(item.ref.sop_instance_uid)
            if isinstance(item, Retrieved):
                LOGGER.warning("%s: %s failed: %s", self.operation, item.ref.sop_instance_uid, item.failure)
                counts.fail(item.ref.sop_instance_uid)
            else:
                try:
                    if not prepared:
                        sink.prepare(refs, [item])
                        prepared = True
                    outcome = sink.send(item)
                except SubOperationsImpossible as exc:
                    LOGGER.warning("%s: %s; the %d instances not sent fail", self.operation, exc, counts.remaining)
                    comment = str(exc)
                    retrieval.stop()
                    for ref in refs:
                        if ref.sop_instance_uid not in accounted or ref.sop_instance_uid == item.ref.sop_instance_uid:
                            counts.fail(ref.sop_instance_uid)
                    break
                finally:
                    item.done()
                self._tally(item, outcome, counts)
            if counts.remaining > 0:
                responder.send(PENDING, counts, final=False)
        if counts.failed == 0 and counts.warning == 0:
            return SUCCESS, ""
        if counts.completed == 0 and counts.warning == 0:
            return ALL_FAILED, comment
        return SUBOPERATIONS_FAILED, comment

    def _tally(self, item: Fetched, outcome: Outcome, counts: Counts) -> None:
        if isinstance(outcome, Done | Duplicate):
            counts.remaining -= 1
            counts.completed += 1
        elif isinstance(outcome, Warning):
            counts.remaining -= 1
            counts.warning += 1
        else:
            LOGGER.warning("%s: sending %s failed: %s", self.operation, item.ref.sop_instance_uid,
                           getattr(outcome, "reason", outcome))
            counts.fail(item.ref.sop_instance_uid)

    def _count(self, retrieval: Retrieval | None, status: int, counts: Counts) -> None:
        source = (retrieval.located_by or retrieval.sources[0].name) if retrieval and retrieval.sources else "none"
        self.metrics.retrievals.labels(self.operation, source, f"0x{status:04X}").inc()
        self.metrics.dimse_requests.labels(self.operation, f"0x{status:04X}").inc()
        for outcome, n in (("completed", counts.completed), ("warning", counts.warning), ("failed", counts.failed)):
            if n:
                self.metrics.retrieve_suboperations.labels(self.operation, outcome).inc(n)


def retrieved_instance(fetched: Fetched, calling_ae: str, called_ae: str) -> SpooledInstance:
    """A fetched file in the shape a destination sends (``SpooledInstance``)."""
    ref = fetched.ref
    return SpooledInstance(
        spool_path=fetched.path, size=fetched.path.stat().st_size, sha256="", sop_class_uid=fetched.sop_class_uid,
        sop_instance_uid=ref.sop_instance_uid, study_uid=ref.study_uid, series_uid=ref.series_uid,
        transfer_syntax=fetched.transfer_syntax, calling_ae=calling_ae, called_ae=called_ae,
        peer=f"retrieve:{fetched.source}", received_at=datetime.now(UTC),
    )


def _retrieve_timeout(config: Config, name: str) -> float:
    settings = config.sources.get(name)
    return settings.retrieve_timeout if settings is not None else RETRIEVE_TIMEOUT  # local: no settings of its own
