"""One retrieval's sub-operations, whoever asked for it: a C-MOVE, a C-GET
(``bridge.qr.retrieve``) or the HTTP API (``bridge.api.qr``). ``Job`` locates the
instances a query names in its sources, in order, fetches each (``bridge.sources.retrieval``)
and hands it to a ``Sink`` (``bridge.qr.move``: the bridge's own association to a node;
``bridge.qr.get``: the requester's association), counting what completed, had a warning
or failed (PS3.4 C.4.2.1.5 and C.4.3.1.5: the counts a response carries).

What the outcome means to the asker (a DIMSE status, an HTTP status) is decided by the
asker: the job says what happened, in DIMSE terms, since its counts are theirs.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence

from bridge.dataset.query import Query
from bridge.metrics import Metrics
from bridge.model import Done, Duplicate, InstanceRef, Outcome, Retrieved, Source, Warning
from bridge.sources.retrieval import HEARTBEAT, Fetched, Retrieval

LOGGER = logging.getLogger(__name__)

SUCCESS = 0x0000
SUBOPERATIONS_FAILED = 0xB000  # some failed or had warnings
ALL_FAILED = 0xA702  # unable to perform sub-operations
MAX_SUBOPERATIONS = 0xFFFF  # the counts are US (PS3.7 9.3.4)


class Cancelled(Exception):
    """The asker cancelled the retrieval (a C-CANCEL)."""


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
    fetched instance (its outcome; ``SubOperationsImpossible`` when nothing more can be
    sent), ``close`` at the end."""

    def prepare(self, located: Sequence[InstanceRef], ready: Sequence[Fetched]) -> None: ...

    def send(self, fetched: Fetched) -> Outcome:
        raise NotImplementedError

    def close(self) -> None: ...


def _nothing(*_: object) -> None:
    return None


def _never() -> bool:
    return False


class Job:
    """The instances ``query`` names, from ``sources`` in order (``timeouts``: each one's
    ``retrieve_timeout``), sent to ``sink``. Call ``locate`` (it raises what the sources
    raised: ``UpstreamError`` when every one failed, ``TooMany`` beyond ``limit``), then
    ``run`` when it located anything, and ``close`` always (a ``finally``).

    ``pending`` is called with the counts after each sub-operation while some remain, and
    every ``heartbeat`` seconds while a source is still fetching with nothing to send;
    ``cancelled`` is asked before each step (true: ``run`` raises ``Cancelled``);
    ``alive`` is called as work goes on (a DIMSE service restarts its association's
    network timer with it). ``label`` names the retrieval in the log (the operation
    unless given).
    """

    def __init__(self, operation: str, query: Query, sources: Sequence[Source], timeouts: dict[str, float],
                 sink: Sink, heartbeat: float = HEARTBEAT, limit: int | None = MAX_SUBOPERATIONS,
                 pending: Callable[[Counts], None] = _nothing, cancelled: Callable[[], bool] = _never,
                 alive: Callable[[], None] = _nothing, label: str = "") -> None:
        self.operation = operation  # C-MOVE, C-GET, API: for the metrics
        self.label = label or operation  # how the log names this retrieval
        self.sink = sink
        self.retrieval = Retrieval(query, sources, timeouts, heartbeat=heartbeat, limit=limit)
        self.pending = pending
        self.cancelled = cancelled
        self.alive = alive
        self.counts = Counts()
        self.located: list[InstanceRef] = []
        # Why every instance not sent failed, when one reason applies to all of them (the
        # destination could not be reached, or went away).
        self.comment = ""
        self.sink_failed = False

    @property
    def sources(self) -> list[Source]:
        return self.retrieval.sources

    @property
    def located_by(self) -> str:
        """The source whose answer named the instances ("" before, or when none did)."""
        return self.retrieval.located_by

    def locate(self) -> list[InstanceRef]:
        self.located = self.retrieval.locate()
        self.counts.remaining = len(self.located)
        return self.located

    def close(self) -> None:
        self.retrieval.stop()
        self.sink.close()

    def run(self) -> int:
        """Fetch and send every instance located; the final status: ``SUCCESS`` when every
        sub-operation completed, ``ALL_FAILED`` when none completed (nor with a warning),
        else ``SUBOPERATIONS_FAILED``. Raises ``Cancelled``."""
        counts, refs = self.counts, self.located
        prepared = False
        accounted: set[str] = set()  # completed, warning or failed
        for item in self.retrieval:
            self.alive()
            if self.cancelled():
                if isinstance(item, Fetched):
                    item.done()
                raise Cancelled
            if item is None:
                self.pending(counts)  # still at work
                continue
            accounted.add(item.ref.sop_instance_uid)
            if isinstance(item, Retrieved):
                LOGGER.warning("%s: %s failed: %s", self.label, item.ref.sop_instance_uid, item.failure)
                counts.fail(item.ref.sop_instance_uid)
            else:
                try:
                    if not prepared:
                        self.sink.prepare(refs, [item])
                        prepared = True
                    outcome = self.sink.send(item)
                except SubOperationsImpossible as exc:
                    LOGGER.warning("%s: %s; the %d instances not sent fail", self.label, exc, counts.remaining)
                    self.comment, self.sink_failed = str(exc), True
                    self.retrieval.stop()
                    for ref in refs:
                        if ref.sop_instance_uid not in accounted or ref.sop_instance_uid == item.ref.sop_instance_uid:
                            counts.fail(ref.sop_instance_uid)
                    break
                finally:
                    item.done()
                self._tally(item, outcome)
            if counts.remaining > 0:
                self.pending(counts)
        if counts.failed == 0 and counts.warning == 0:
            return SUCCESS
        if counts.completed == 0 and counts.warning == 0:
            return ALL_FAILED
        return SUBOPERATIONS_FAILED

    def _tally(self, item: Fetched, outcome: Outcome) -> None:
        counts = self.counts
        if isinstance(outcome, Done | Duplicate):
            counts.remaining -= 1
            counts.completed += 1
        elif isinstance(outcome, Warning):
            counts.remaining -= 1
            counts.warning += 1
        else:
            LOGGER.warning("%s: sending %s failed: %s", self.label, item.ref.sop_instance_uid,
                           getattr(outcome, "reason", outcome))
            counts.fail(item.ref.sop_instance_uid)


def count(metrics: Metrics, operation: str, job: Job | None, status: int) -> None:
    """A retrieval in ``dicom_bridge_retrievals`` (by ``operation``, the source that
    located, ``status``) and its sub-operations in ``dicom_bridge_retrieve_suboperations``."""
    source = (job.located_by or job.sources[0].name) if job is not None and job.sources else "none"
    metrics.retrievals.labels(operation, source, f"0x{status:04X}").inc()
    if job is None:
        return
    counts = job.counts
    for outcome, n in (("completed", counts.completed), ("warning", counts.warning), ("failed", counts.failed)):
        if n:
            metrics.retrieve_suboperations.labels(operation, outcome).inc(n)
