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

Locating, fetching, sending and counting are ``bridge.qr.suboperations.Job``'s, which
the HTTP API drives too; this module turns what it did into DIMSE responses. pynetdicom's
own service for these (a handler that yields data sets) cannot answer before the first
sub-operation or send from files: ``bridge.dimse.pynetdicom_overrides.retrieval`` hands
the request here whole.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from io import BytesIO
from typing import Any, cast

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_GET, C_MOVE
from pynetdicom.dsutils import encode

from bridge.config import Config
from bridge.config.sources import RETRIEVE_TIMEOUT
from bridge.dataset.query import Query, QueryError, parse, retrieval_problem
from bridge.dimse import pynetdicom_overrides
from bridge.dimse.listener import AssociationState
from bridge.errors import UpstreamError
from bridge.metrics import Metrics
from bridge.model import SpooledInstance
from bridge.qr import suboperations
from bridge.qr.find import TRANSFER_SYNTAXES
from bridge.qr.suboperations import MAX_SUBOPERATIONS, SUCCESS, Cancelled, Counts, Job, Sink
from bridge.routing.rules import Context
from bridge.sources import Sources
from bridge.sources.retrieval import HEARTBEAT, Fetched, TooMany

LOGGER = logging.getLogger(__name__)

PENDING = 0xFF00
CANCEL = 0xFE00
CANNOT_LOCATE = 0xA701  # unable to calculate number of matches
UNKNOWN_DESTINATION = 0xA801
IDENTIFIER_INVALID = 0xA900
CANNOT_PROCESS = 0xC000

class Refused(Exception):
    """The request ends before any sub-operation, with ``status`` and ``comment``."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment


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
        status, level, names, located, comment = SUCCESS, "?", [], 0, ""
        job: Job | None = None
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
            job = Job(self.operation, query, [self.sources.get(name, config) for name in names],
                      {name: retrieve_timeout(config, name) for name in names}, sink, heartbeat=self.heartbeat,
                      limit=MAX_SUBOPERATIONS, pending=lambda counts: responder.send(PENDING, counts, final=False),
                      cancelled=lambda: bool(event.is_cancelled),
                      alive=lambda: pynetdicom_overrides.still_busy(event.assoc))
            try:
                located = len(job.locate())
            except UpstreamError as exc:
                raise Refused(CANNOT_LOCATE, f"cannot locate: {exc}") from exc
            except TooMany as exc:
                raise Refused(CANNOT_LOCATE, f"{exc}: retrieve by series") from exc
            if located:
                responder.send(PENDING, job.counts, final=False)  # the first response at once
                status = job.run()
                comment = job.comment
            responder.send(status, job.counts, comment)
        except Refused as exc:
            status, comment = exc.status, exc.comment
            LOGGER.warning("%s from %s refused: %s (0x%04X)", self.operation, association.calling_ae, exc.comment,
                           exc.status)
            responder.send(exc.status, _started(job), exc.comment)
        except Cancelled:
            status = CANCEL
            responder.send(CANCEL, job.counts if job is not None else Counts())
        except Exception as exc:  # a bug: the request is answered all the same, with why
            status = CANNOT_PROCESS
            LOGGER.exception("%s from %s failed", self.operation, association.calling_ae)
            responder.send(CANNOT_PROCESS, _started(job), f"cannot retrieve: {exc}")
        finally:
            if job is not None:
                job.close()
            elif sink is not None:
                sink.close()
            pynetdicom_overrides.still_busy(event.assoc)
            suboperations.count(self.metrics, self.operation, job, status)
            self.metrics.dimse_requests.labels(self.operation, f"0x{status:04X}").inc()
            counts = job.counts if job is not None else Counts()
            LOGGER.info("%s from %s (%s)%s: %s level, %s: %d located, %d completed, %d warning, %d failed, "
                        "0x%04X in %.2fs%s", self.operation, association.calling_ae, association.label,
                        self.describe(event), level, ", ".join(names) or "no source", located, counts.completed,
                        counts.warning, counts.failed, status, time.monotonic() - started,
                        f" ({comment})" if comment else "")

    def _query(self, event: evt.Event) -> Query:
        request = cast(C_MOVE | C_GET, event.request)
        try:
            query = parse(event.identifier, str(request.AffectedSOPClassUID))
        except QueryError as exc:
            raise Refused(IDENTIFIER_INVALID if exc.status == 0xA900 else CANNOT_PROCESS, exc.comment) from exc
        except Exception as exc:  # an identifier pydicom cannot decode
            raise Refused(CANNOT_PROCESS, f"cannot decode identifier: {exc}") from exc
        return query


def _started(job: Job | None) -> Counts | None:
    """The counts a failure answers with: those of a job that located something, else none."""
    return job.counts if job is not None and job.counts.remaining else None


def retrieved_instance(fetched: Fetched, calling_ae: str, called_ae: str) -> SpooledInstance:
    """A fetched file in the shape a destination sends (``SpooledInstance``)."""
    ref = fetched.ref
    return SpooledInstance(
        spool_path=fetched.path, size=fetched.path.stat().st_size, sha256="", sop_class_uid=fetched.sop_class_uid,
        sop_instance_uid=ref.sop_instance_uid, study_uid=ref.study_uid, series_uid=ref.series_uid,
        transfer_syntax=fetched.transfer_syntax, calling_ae=calling_ae, called_ae=called_ae,
        peer=f"retrieve:{fetched.source}", received_at=datetime.now(UTC),
    )


def retrieve_timeout(config: Config, name: str) -> float:
    """The ``retrieve_timeout`` of the source ``name`` (``local``: the default)."""
    settings = config.sources.get(name)
    return settings.retrieve_timeout if settings is not None else RETRIEVE_TIMEOUT  # local: no settings of its own
