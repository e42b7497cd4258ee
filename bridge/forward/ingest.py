"""Ingest: from a complete Part-10 file on the spool's file system to an instance that is
durable in the spool with its queue rows committed. C-STORE intake and watched folders
both come through here, so both give the same guarantees.

The steps, in order: parse the header (never Pixel Data) and validate the required
UIDs; ask the rules for destinations (``unrouted`` when none); check the free-space
floor; fsync the file, rename it into the spool and fsync the folder; insert the queue
rows in one transaction. Any failure raises an ``InboundError`` saying what it is (the
caller decides what it means: a C-STORE's status, a watched file failed or retried)
and leaves nothing in the spool. The file's fsync runs in the calling thread: for a
received instance the disk has been writing the file since the message was complete
(``HashingTempFile.seal``), so it waits for what is left (in a thread beside the
header's parsing, it cost a wake-up each way for no shorter wait). The folder's fsync
runs in a thread beside the queue's commit: the two waits overlap.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Mapping
from concurrent import futures
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from pydicom.dataset import Dataset

from bridge.config import Config
from bridge.dataset import dicomfile
from bridge.errors import OutOfResources, Unrouted
from bridge.forward.queue import Queue, Route
from bridge.forward.spool import HashingTempFile, Spool, fsync_dir, sha256_file
from bridge.metrics import Metrics
from bridge.model import SpooledInstance
from bridge.routing.rules import Context, Decision, RuleSet

LOGGER = logging.getLogger(__name__)


@dataclass
class Stored:
    """What ``Ingest.store`` made durable: the instance's UID, hash, the rules' decision
    and how many rows it got (none: every destination already had the same content)."""

    sop_instance_uid: str
    sha256: str = ""
    decision: Decision = field(default_factory=Decision)
    rows: int = 0


def examine(path: Path, ctx: Context, rules: RuleSet, check: Callable[[Dataset, str, str], None] | None = None,
            explain: bool = False) -> tuple[Dataset, tuple[str, str, str, str], Decision]:
    """What intake reads and decides of a file before anything is written: its header,
    its required UIDs (SOP Class, SOP Instance, Study, Series) and the rules' decision.
    Raises the ``InboundError`` that refuses it (``check`` may raise its own).
    ``dicom-bridge route`` asks the same (``explain``: every rule's verdict), so it says
    what the listener would."""
    header = dicomfile.read_header(path)
    uids = dicomfile.required_uids(header)
    if check is not None:
        check(header, uids[0], uids[1])
    try:
        decision = rules.store(ctx, header, explain)
    except Exception as exc:  # a value pydicom cannot convert, asked for by a rule
        raise dicomfile.unparseable("cannot read a routed tag", exc) from exc
    return header, uids, decision


@dataclass(frozen=True)
class IngestSettings:
    """What ``Ingest.store`` reads of the configuration: where an instance no rule routes
    goes (``unrouted``: a destination, or ``reject``), the spool's free-space floor, and
    each destination's ``duplicates`` policy."""

    unrouted: str
    min_free: int
    duplicates: Mapping[str, str]

    @classmethod
    def of(cls, config: Config) -> IngestSettings:
        return cls(config.unrouted, config.spool.min_free,
                   {name: destination.duplicates for name, destination in config.destinations.items()})


class Ingest:
    """The durable path shared by C-STORE intake and watched folders."""

    def __init__(self, spool: Spool, queue: Queue, metrics: Metrics,
                 on_queued: Callable[[list[str]], None] | None = None) -> None:
        self.spool = spool
        self.queue = queue
        self.metrics = metrics
        self.on_queued = on_queued or (lambda names: None)
        self._fsync = futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="fsync")

    def close(self) -> None:
        self._fsync.shutdown(wait=True)

    def _out_of_resources(self, exc: BaseException) -> str:
        """``out_of_resources(exc)``; when the disk is full, the spool's kept blocks
        (``spool/free``) are given back first, for the next instances."""
        comment = out_of_resources(exc)
        if comment in (SPOOL_FULL, QUEUE_FULL):
            self.spool.give_back()
        return comment

    def store(self, path: Path, ctx: Context, settings: IngestSettings, rules: RuleSet, what: str = "C-STORE",
              check: Callable[[Dataset, str, str], None] | None = None,
              refusal_level: int = logging.WARNING) -> Stored:
        """Make ``path`` (a complete Part-10 file in the spool's ``incoming/``) durable and
        queued, or raise the ``InboundError`` that refuses it. ``check(header, sop_class,
        sop_instance)`` may refuse it too, once the UIDs are valid (C-STORE: do they match
        the command?). What the file holds wrong is the caller's to log (it knows what
        that means to it); the rest is logged here, with ``what`` naming the operation:
        ``OutOfResources`` at ERROR, ``Unrouted`` at ``refusal_level``. The caller removes
        ``path`` afterwards if it is still there."""
        failed = HashingTempFile.write_error(path)
        if failed is not None:  # the file is incomplete: say why, not what is missing from it
            LOGGER.error("refused %s: cannot write to the spool: %s", what, failed.strerror or failed)
            raise OutOfResources(self._out_of_resources(failed))
        header, (sop_class, sop_instance, study, series), decision = examine(path, ctx, rules, check)

        destinations = decision.destinations
        if not destinations:
            if settings.unrouted == "reject":
                LOGGER.log(refusal_level, "refused %s of %s: no rule routes it (unrouted: reject)", what,
                           sop_instance)
                raise Unrouted("no rule routes this instance")
            destinations = {settings.unrouted: rules.priorities.get(settings.unrouted, 0)}

        attributes = dicomfile.attributes(header)
        size = path.stat().st_size
        free = self.spool.free_bytes()
        if free - size < settings.min_free:
            LOGGER.error("refused %s: spool has %d bytes free, below spool.min_free", what, free)
            self.spool.give_back()
            raise OutOfResources("out of resources: spool below its free-space floor")

        sha256 = HashingTempFile.hash_of(path) or sha256_file(path)
        try:
            spooled = self.spool.take(path, sync_folder=False)
        except OSError as exc:
            LOGGER.error("refused %s: cannot persist to the spool: %s", what, exc.strerror)
            raise OutOfResources(self._out_of_resources(exc)) from exc
        instance = SpooledInstance(
            spool_path=spooled, size=size, sha256=sha256, sop_class_uid=sop_class,
            sop_instance_uid=sop_instance, study_uid=study, series_uid=series,
            transfer_syntax=str(header.file_meta.TransferSyntaxUID), calling_ae=ctx.calling_ae,
            called_ae=ctx.called_ae, peer=ctx.peer, received_at=datetime.now(UTC),
            patient_id=attributes.get("PatientID", ""),
            accession_number=attributes.get("AccessionNumber", ""),
            attributes=attributes,
        )
        routes = [
            Route(name, prio, settings.duplicates[name], decision.modify.get(name))
            for name, prio in destinations.items()
        ]
        # The folder's fsync and the queue's commit are both waited for before the
        # answer; side by side, their waits overlap.
        folder_synced = self._fsync.submit(fsync_dir, spooled.parent)
        try:
            enqueued = self.queue.enqueue(instance, routes)
        except Exception as exc:
            futures.wait([folder_synced])
            self.spool.discard(spooled)
            LOGGER.error("refused %s: queue error: %s", what, exc)
            self.metrics.queue_errors.labels("intake").inc()
            raise OutOfResources(self._out_of_resources(exc)) from exc
        try:
            folder_synced.result()
        except OSError as exc:
            self.queue.cancel(enqueued.row_ids, "the spool folder could not be synced")
            self.spool.discard(spooled)
            LOGGER.error("refused %s: cannot persist to the spool: %s", what, exc.strerror)
            raise OutOfResources(self._out_of_resources(exc)) from exc
        if not enqueued.row_ids:  # a resend of what is queued or delivered
            self.spool.recycle(spooled)
        for superseded in enqueued.released:  # older content that no row needs any more
            self.spool.recycle(superseded)
        for name, why in enqueued.skipped.items():
            LOGGER.info("%s not queued for %s: %s", sop_instance, name, why)
        label = self.metrics.calling_ae(ctx.calling_ae)
        self.metrics.received_instances.labels(label).inc()
        self.metrics.received_bytes.labels(label).inc(size)
        LOGGER.debug("stored %s (%d bytes) for %s", sop_instance, size, ", ".join(destinations))
        self.on_queued(list(destinations))
        return Stored(sop_instance, sha256, decision, len(enqueued.row_ids))


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
SPOOL_FULL = "out of resources: out of space on the spool"
QUEUE_FULL = "out of resources: out of space for the queue database"


def out_of_resources(exc: BaseException) -> str:
    """The reason of the ``OutOfResources`` for a failed write to the spool (an ``OSError``)
    or to the queue (an ``sqlite3.Error``; SQLite's own, or the failed rollback after it)."""
    chain: BaseException | None = exc
    for _ in range(4):
        if chain is None:
            break
        if isinstance(chain, OSError):
            if chain.errno in _NO_SPACE:
                return SPOOL_FULL
            return f"out of resources: cannot write to the spool: {chain.strerror or chain}"
        if getattr(chain, "sqlite_errorname", "") == "SQLITE_FULL":
            return QUEUE_FULL
        chain = chain.__context__
    return "out of resources: queue error"
