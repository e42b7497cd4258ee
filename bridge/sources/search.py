"""One query asked of the sources a rule names, their answers merged (``Search``).

Each source is asked at once, in a thread of its own, so that while the requester is
sent one source's matches (or one QIDO-RS page's) the next ones are already being
fetched. Answers are given in rule order: every match of the first source, then those
of the second that the first did not give (the same unique key of the level), and so
on; the first source in rule order wins a conflict. Every record is checked against the
query again (``Query.matches``): a source that ignored a key it could not match (a
QIDO-RS server may) has its wrong matches dropped, and a record missing a matching key
is answered as unverified (0xFF01).

A source that fails (raises, or gives nothing for its ``find_timeout``) is reported in
``failures``; the search goes on with the others. Stopping (``stop``: a C-CANCEL, a
requester gone) tells every source's thread to ask for nothing more: each closes its
source's generator after the answer it is waiting for, which its own timeouts bound.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset

from bridge.dataset.query import Query
from bridge.errors import UpstreamUnavailable
from bridge.model import Source

LOGGER = logging.getLogger(__name__)

POLL = 0.1  # seconds between looks at ``cancelled`` while a source is waited for
GRACE = 2.0  # beyond a source's own find_timeout, before the search gives up on its thread
# Records fetched ahead per source, beyond those being sent: a later source in rule
# order waits for the earlier ones with this many of its records in memory, at most.
PREFETCH = 1000

_END = object()  # the source has no more
_CAPPED = object()  # the source has more than max_results


@dataclass(frozen=True)
class Match:
    record: Dataset
    source: str
    verified: bool  # every matching key was checked on the record


@dataclass(frozen=True)
class Failure:
    source: str
    error: Exception


class Cancelled(Exception):
    """The requester cancelled the search."""


class Search:
    """``query`` asked of ``sources`` (in rule order); iterate it for the merged matches.

    ``timeouts`` holds each source's ``find_timeout``; ``max_results`` bounds the matches
    given (``capped`` tells whether it was reached); ``cancelled`` is asked every
    ``POLL`` seconds while a source is waited for, and raises ``Cancelled`` when true.
    """

    def __init__(self, query: Query, sources: Sequence[Source], timeouts: dict[str, float], max_results: int,
                 cancelled: Callable[[], bool] = lambda: False) -> None:
        self.query = query
        self.sources = list(sources)
        self.timeouts = timeouts
        self.max_results = max_results
        self.cancelled = cancelled
        self.failures: list[Failure] = []
        self.dropped = 0  # records a source gave that the query does not match
        self.capped = False
        self._stop = threading.Event()
        self._queues: list[queue.Queue[object]] = []
        self._progress: list[float] = []

    def stop(self) -> None:
        """Ask every source for nothing more (idempotent)."""
        self._stop.set()

    def __iter__(self) -> Iterator[Match]:
        now = time.monotonic()
        for i, source in enumerate(self.sources):
            self._queues.append(queue.Queue(PREFETCH))
            self._progress.append(now)
            threading.Thread(target=self._pump, args=(i, source), name=f"find-{source.name}", daemon=True).start()
        seen: set[str] = set()
        given = 0
        try:
            for i, source in enumerate(self.sources):
                for record in self._records(i, source):
                    uid = self._uid(record)
                    if uid is not None:
                        if uid in seen:
                            continue
                        seen.add(uid)
                    matches, verified = self.query.matches(record)
                    if not matches:
                        self.dropped += 1
                        continue
                    if given >= self.max_results:
                        self.capped = True
                        return
                    given += 1
                    yield Match(record, source.name, verified)
        finally:
            self.stop()

    def _records(self, i: int, source: Source) -> Iterator[Dataset]:
        """The records source ``i`` gives, as its thread queues them; a failure is noted."""
        timeout = self.timeouts[source.name] + GRACE
        q = self._queues[i]
        while True:
            if self.cancelled():
                self.stop()
                raise Cancelled
            try:
                item = q.get(timeout=POLL)
            except queue.Empty:
                if time.monotonic() - self._progress[i] > timeout:
                    self.failures.append(Failure(source.name, UpstreamUnavailable(
                        f"source {source.name}: no answer within {timeout - GRACE:g}s")))
                    return
                continue
            if item is _END:
                return
            if item is _CAPPED:
                self.capped = True
                return
            if isinstance(item, Failure):
                self.failures.append(item)
                return
            yield item  # type: ignore[misc]

    def _pump(self, i: int, source: Source) -> None:
        """Source ``i``'s thread: its records onto its queue, then the end or its failure.
        Never raises: whatever the source raises is the source's failure."""
        records = None
        try:
            records = source.find(self.query)
            count = 0
            for record in records:
                self._progress[i] = time.monotonic()
                if record is None:  # an answer with no match yet: at work, not stuck
                    if self._stop.is_set():
                        return
                    continue
                if count >= self.max_results:
                    self._put(i, _CAPPED)
                    return
                if not self._put(i, record):
                    return
                count += 1
            self._put(i, _END)
        except Exception as exc:  # any failure of a source is that source's answer
            if not isinstance(exc, UpstreamUnavailable):
                LOGGER.debug("source %s failed", source.name, exc_info=True)
            self._put(i, Failure(source.name, exc))
        finally:
            self._progress[i] = time.monotonic()
            if records is not None and hasattr(records, "close"):
                try:
                    records.close()
                except Exception:  # closing a generator that failed: nothing more to do
                    LOGGER.debug("closing source %s failed", source.name, exc_info=True)

    def _put(self, i: int, item: object) -> bool:
        """Queue ``item`` for source ``i``, waiting for room; False once the search stopped."""
        q = self._queues[i]
        while not self._stop.is_set():
            try:
                q.put(item, timeout=POLL)
                return True
            except queue.Full:
                continue
        return False

    def _uid(self, record: Dataset) -> str | None:
        """The record's identity at the query's level, for merging; None when it has none."""
        if self.query.level == "PATIENT":
            patient_id = record.get("PatientID")
            if patient_id is None:
                return None
            return f"{patient_id}\\{record.get('IssuerOfPatientID', '') or ''}"
        value = record.get(self.query.unique_key)
        return str(value) if value else None
