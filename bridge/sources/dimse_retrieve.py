"""``retrieve`` of a ``dimse`` source: instances fetched from its node by C-GET on the
bridge's own association, or by C-MOVE to the bridge's listener (PS3.4 C.4.2, C.4.3).

Requests. The references are grouped by study and series, and each series asked for in
IMAGE-level Study Root requests naming its instances as a list of SOP Instance UIDs
(PS3.4 C.4.2.2.1: a list of UIDs is a valid key), at most ``UIDS_PER_REQUEST`` each, one
after the other on one association (Message IDs 1, 2, ... for C-GET; the inbox's for C-MOVE).
An instance the node sends that was not asked for, or twice, is answered 0x0000 and
discarded.

Threads. A worker thread opens the association and sends the requests, reading their
responses (pynetdicom serves a C-GET's C-STORE sub-operations in the thread that reads
them); the files arrive on that thread (C-GET) or on the listener's (C-MOVE, through
``bridge.dimse.inbox``), are renamed into the source's temporary folder before the
C-STORE is answered, and reach the generator through a bounded channel, which yields each
as soon as it is there, and ``None`` every ``HEARTBEAT`` seconds while it waits.

Waits. Each wait is bounded by ``retrieve_timeout``: the connect and the
A-ASSOCIATE-AC, and then the next PDU on the association (its network timer), or for a
C-MOVE the next response or instance, whichever comes first. No single message is
timed: a large instance may take longer than that while its PDUs keep coming.

How a request ends, for the references it named that did not arrive:

| the node's final response | what happens |
| --- | --- |
| 0x0000, 0xB000 (sub-operations failed), 0xCxxx, 0xFE00, other | a failure each, naming the status (and the list) |
| 0xA7xx out of resources | ``UpstreamUnavailable`` |
| 0xA801 move destination unknown, 0x0122, 0x0124, 0xA9xx | ``UpstreamMisconfigured`` |
| none within the wait, an A-ABORT, a closed connection | ``UpstreamUnavailable`` |

A raise comes after every instance that arrived was yielded. Each request is timed in
``dicom_bridge_upstream_request_seconds{operation="c-get"}`` (or ``c-move``); a retrieval
that raises, and each request that ends with a failure status (neither success nor a
warning) with instances missing, counts in ``dicom_bridge_upstream_errors``. A C-MOVE's final response
may come before its last C-STOREs are answered (they travel on another association):
the worker waits up to ``MOVE_GRACE`` seconds more for the instances the node counts as
sent (completed and warning sub-operations; all it was asked for, if it does not say).
Closed early (``close()``: a C-CANCEL upstream of the bridge), the generator sends the
node a C-CANCEL and aborts the association, and removes the files it had not yet handed
over; files arriving afterwards are refused (0xA700) and removed.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Protocol, cast

from pydicom.dataset import Dataset
from pydicom.uid import JPEG2000 as JPEG2000Lossy
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import build_role, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
from pynetdicom.status import code_to_category

from bridge.config import DimseSource as DimseConfig
from bridge.dimse import scu
from bridge.dimse.inbox import INBOX, Awaited, Status, keep
from bridge.errors import UpstreamError, UpstreamMisconfigured, UpstreamUnavailable
from bridge.metrics import Metrics
from bridge.model import InstanceRef, Retrieved
from bridge.sources.refs import batches, by_series


class Upstream(Protocol):
    """What a retrieval uses of its source (``bridge.sources.dimse.DimseSource``)."""

    name: str
    settings: DimseConfig
    metrics: Metrics
    temp_dir: Path
    calling_ae: str
    retrieve_peer: scu.Peer

LOGGER = logging.getLogger(__name__)

UIDS_PER_REQUEST = 500  # SOP Instance UIDs in one identifier: ~32 KB, within a UI value's 64 KiB
HEARTBEAT = 1.0  # seconds between the generator's ``None`` while it waits
MOVE_GRACE = 2.0  # seconds a C-MOVE waits after its final response for C-STOREs still in flight
CHANNEL_SIZE = 16  # files renamed and waiting for the generator: more holds the node's C-STORE
QUERY_SYNTAXES: list[str | UID] = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
# The syntaxes proposed for each storage SOP class of a C-GET, each in a context of its
# own: the node picks the one it holds the instance in and sends it as it is. The most
# common first: when many SOP classes leave room for fewer, the list is cut at the end.
STORAGE_SYNTAXES = [
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit, JPEGLosslessSV1, JPEG2000Lossless,
    JPEG2000Lossy, RLELossless, JPEGLSLossless, JPEGLSNearLossless, JPEGExtended12Bit, JPEGLossless,
    DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
]
GET_MODELS = [StudyRootQueryRetrieveInformationModelGet, PatientRootQueryRetrieveInformationModelGet]

_NAMES = {
    0x0122: "SOP class not supported",
    0x0124: "not authorised",
    0xA801: "move destination unknown",
    0xB000: "sub-operations failed",
    0xFE00: "cancelled",
}


def identifier(batch: Sequence[InstanceRef]) -> Dataset:
    """The IMAGE-level Study Root identifier naming ``batch`` (one series)."""
    ds = Dataset()
    ds.QueryRetrieveLevel = "IMAGE"
    ds.StudyInstanceUID = batch[0].study_uid
    if batch[0].series_uid:
        ds.SeriesInstanceUID = batch[0].series_uid
    uids = [ref.sop_instance_uid for ref in batch]
    ds.SOPInstanceUID = uids if len(uids) > 1 else uids[0]
    return ds


def storage_contexts(sop_classes: Sequence[str], room: int) -> list[PresentationContext]:
    """One context per SOP class and syntax, syntaxes cut from the end to fit ``room``."""
    if not sop_classes:
        return []
    per_class = max(1, min(len(STORAGE_SYNTAXES), room // len(sop_classes)))
    return [build_context(sop_class, [syntax]) for syntax in STORAGE_SYNTAXES[:per_class]
            for sop_class in sop_classes][:room]


class _Channel:
    """A bounded hand-off from the threads that receive to the generator; once closed it
    takes nothing more."""

    def __init__(self, size: int) -> None:
        self.cond = threading.Condition()
        self.items: deque[tuple[Any, ...]] = deque()
        self.size = size
        self.closed = False

    def put(self, item: tuple[Any, ...], timeout: float | None = None, force: bool = False) -> bool:
        with self.cond:
            if not force and not self.cond.wait_for(lambda: self.closed or len(self.items) < self.size, timeout):
                return False
            if self.closed:
                return False
            self.items.append(item)
            self.cond.notify_all()
            return True

    def get(self, timeout: float) -> tuple[Any, ...] | None:
        with self.cond:
            if not self.cond.wait_for(lambda: self.items, timeout):
                return None
            item = self.items.popleft()
            self.cond.notify_all()
            return item

    def close(self) -> list[tuple[Any, ...]]:
        """Close; what was still waiting."""
        with self.cond:
            self.closed = True
            left = list(self.items)
            self.items.clear()
            self.cond.notify_all()
            return left


class Retrieval:
    """One ``retrieve`` of ``source``: ``run()`` is the generator the source returns."""

    def __init__(self, source: Upstream, refs: Sequence[InstanceRef]) -> None:
        self.source = source
        self.name = source.name
        self.how = source.settings.retrieve
        self.timeout = source.settings.retrieve_timeout
        self.refs = {ref.sop_instance_uid: ref for ref in refs}  # a reference named twice is fetched once
        self.channel = _Channel(CHANNEL_SIZE)
        self.received: set[str] = set()  # handed to the channel (under channel.cond)
        self.prefix = f"retrieved-{self.name}-"
        self.assoc: Association | None = None
        self.message_id = 0  # the request in progress
        self.awaited: Awaited | None = None
        self.last_event = time.monotonic()

    # -- the generator ---------------------------------------------------------------------

    def run(self) -> Generator[Retrieved | None, None, None]:
        if not self.refs:
            return
        worker = threading.Thread(target=self._work, name=f"retrieve-{self.name}", daemon=True)
        done = False
        try:
            worker.start()
            while not done:
                item = self.channel.get(HEARTBEAT)
                if item is None:
                    if self._stalled():
                        raise UpstreamUnavailable(f"source {self.name}: no answer within {self.timeout:g}s "
                                                  f"({self.source.retrieve_peer})")
                    yield None
                    continue
                self.last_event = time.monotonic()
                kind = item[0]
                if kind == "file":
                    yield Retrieved(self.refs[item[1]], path=item[2])
                elif kind == "ended":
                    yield from self._ended(item[1], item[2], item[3])
                elif kind == "error":
                    raise item[1]
                elif kind == "done":
                    done = True
        except UpstreamError:
            self._failed()
            raise
        finally:
            self._stop(worker, cancel=not done)

    def _failed(self) -> None:
        self.source.metrics.upstream_errors.labels(self.name, self.how).inc()

    def _stalled(self) -> bool:
        """Nothing for ``retrieve_timeout``: no event, and no PDU on the association."""
        if time.monotonic() - self.last_event < self.timeout:
            return False
        assoc = self.assoc
        return assoc is None or assoc.dul.idle_timer_expired()

    def _ended(self, batch: list[InstanceRef], status: Dataset, found: Dataset | None
               ) -> Generator[Retrieved, None, None]:
        """A request's final response: a failure for each reference of ``batch`` that did not
        arrive, or the whole source's failure (module docstring)."""
        missing = self._missing(batch)
        if not missing:
            return
        code = int(status.Status)
        comment = str(status.get("ErrorComment", "") or "").strip()
        what = f"0x{code:04X}" + (f" ({_NAMES[code]})" if code in _NAMES else "") + (f": {comment}" if comment else "")
        operation = self.how.upper()
        reason = f"source {self.name}: the {operation} ended with {what} ({self.source.retrieve_peer})"
        if code & 0xFF00 == 0xA700:
            raise UpstreamUnavailable(reason)
        if code in (0x0122, 0x0124, 0xA801) or code & 0xFF00 == 0xA900:
            raise UpstreamMisconfigured(reason)
        if code_to_category(code) not in ("Success", "Warning"):
            self._failed()
        failed = _failed_list(found)
        for ref in missing:
            listed = " (listed as failed)" if ref.sop_instance_uid in failed else ""
            yield Retrieved(ref, failure=f"source {self.name}: {ref.sop_instance_uid} not received{listed}: the "
                                         f"{operation} ended with {what}")

    def _stop(self, worker: threading.Thread, cancel: bool) -> None:
        """The end, however it came: a C-CANCEL and an abort if the node is still at work,
        the worker joined, files not handed over removed, the inbox told."""
        left = self.channel.close()
        assoc = self.assoc
        if cancel and assoc is not None and assoc.is_established:
            if worker.is_alive() and self.message_id:
                model = StudyRootQueryRetrieveInformationModelGet if self.how == "c-get" \
                    else StudyRootQueryRetrieveInformationModelMove
                try:
                    assoc.send_c_cancel(self.message_id, query_model=model)
                except Exception:  # the connection may be gone already: the abort is what matters
                    LOGGER.debug("source %s: sending C-CANCEL failed", self.name, exc_info=True)
            try:
                assoc.abort()
            except Exception:
                LOGGER.debug("source %s: aborting the association failed", self.name, exc_info=True)
        if worker.ident is not None:
            worker.join(10.0)
        for item in left + self.channel.close():
            if item[0] == "file":
                item[2].unlink(missing_ok=True)
        if self.awaited is not None:
            INBOX.forget(self.awaited)

    # -- receiving ------------------------------------------------------------------------

    def _take(self, sop_instance: str, path: Path | None, write: Callable[[], Path] | None = None) -> Status:
        """A received instance: renamed (``path``) or written (``write()``) into the temporary
        folder and handed to the generator. Returns the C-STORE's status."""
        with self.channel.cond:
            wanted = sop_instance in self.refs and sop_instance not in self.received and not self.channel.closed
        if not wanted:
            if self.channel.closed:
                return 0xA700, "the retrieval has ended"
            LOGGER.info("source %s: %s was not asked for (or came twice): discarded", self.name, sop_instance)
            return 0x0000, ""
        try:
            kept = keep(path, self.source.temp_dir, self.prefix) if path is not None else write()  # type: ignore[misc]
        except OSError as exc:
            LOGGER.error("source %s: cannot keep the retrieved %s: %s", self.name, sop_instance, exc)
            return 0xA700, f"cannot write the instance: {exc.strerror or exc}"[:64]
        with self.channel.cond:
            taken = self.channel.put(("file", sop_instance, kept), timeout=self.timeout)
            if taken:
                self.received.add(sop_instance)
        if not taken:
            kept.unlink(missing_ok=True)
            return 0xA700, "the retrieval has ended or does not take instances"
        return 0x0000, ""

    def _on_c_store(self, event: evt.Event) -> Any:
        """EVT_C_STORE of a C-GET's sub-operation, on the bridge's association."""
        request = cast(C_STORE, event.request)
        sop_instance = str(request.AffectedSOPInstanceUID or "")
        path: Path | None = None
        try:
            path = event.dataset_path  # pynetdicom's chunked receive: a complete Part-10 file
        except AttributeError:
            path = None
        try:
            if path is not None:
                status, comment = self._take(sop_instance, path)
            else:
                status, comment = self._take(sop_instance, None, lambda: self._write(event))
        finally:
            if path is not None:
                path.unlink(missing_ok=True)  # taken (renamed away), or not wanted
        if not comment:
            return status
        rsp = Dataset()
        rsp.Status = status
        rsp.ErrorComment = comment
        return rsp

    def _write(self, event: evt.Event) -> Path:
        """The data set pynetdicom holds in memory, as a Part-10 file in the temporary folder
        (its File Meta Information with the context's transfer syntax)."""
        import tempfile

        fd, name = tempfile.mkstemp(prefix=self.prefix, suffix=".dcm", dir=self.source.temp_dir)
        try:
            with open(fd, "wb") as f:
                f.write(event.encoded_dataset(include_meta=True))
        except BaseException:
            Path(name).unlink(missing_ok=True)
            raise
        return Path(name)

    def _deliver(self, sop_instance: str, path: Path) -> Status:
        """A C-MOVE sub-operation taken by the inbox, on the listener's thread."""
        self.last_event = time.monotonic()
        return self._take(sop_instance, path)

    # -- the worker -----------------------------------------------------------------------

    def _work(self) -> None:
        try:
            if self.how == "c-get":
                self._c_get()
            else:
                self._c_move()
        except UpstreamError as exc:
            self.channel.put(("error", exc), force=True)
        except Exception as exc:
            LOGGER.exception("source %s: the retrieval failed", self.name)
            self.channel.put(("error", UpstreamError(f"source {self.name}: {exc}")), force=True)
        else:
            self.channel.put(("done",), force=True)

    def _associate(self, contexts: list[PresentationContext], **options: Any) -> Association:
        try:
            assoc = self.source.retrieve_peer.associate(contexts, **options)
        except UpstreamError as exc:  # the same kind, naming the source
            raise type(exc)(f"source {self.name}: {exc.reason}") from None
        # Each wait is the association's network timer (the next PDU), watched by the
        # generator (_stalled): no single message is timed.
        assoc.dimse_timeout = None
        self.assoc = assoc
        return assoc

    def _c_get(self) -> None:
        sop_classes = sorted({ref.sop_class_uid for ref in self.refs.values() if ref.sop_class_uid})
        room = scu.MAX_CONTEXTS - len(GET_MODELS)
        contexts = [build_context(model, QUERY_SYNTAXES) for model in GET_MODELS]
        contexts += storage_contexts(sop_classes[:room], room)
        if len(sop_classes) > room:
            LOGGER.warning("source %s: %d SOP classes to C-GET, room for %d: the others cannot be received",
                           self.name, len(sop_classes), room)
        assoc = self._associate(contexts, ext_neg=[build_role(uid, scp_role=True) for uid in sop_classes[:room]],
                                evt_handlers=[(evt.EVT_C_STORE, self._on_c_store)])
        message_ids = itertools.count(1)

        def get(batch: list[InstanceRef]) -> tuple[Dataset, Dataset | None] | None:
            self.message_id = next(message_ids)
            return self._request(batch, partial(assoc.send_c_get, identifier(batch),
                                                StudyRootQueryRetrieveInformationModelGet, msg_id=self.message_id))

        self._each_batch(get)
        scu.release(assoc)

    def _c_move(self) -> None:
        source = self.source
        destination = source.settings.move_destination_ae or source.calling_ae
        assoc = self._associate([build_context(StudyRootQueryRetrieveInformationModelMove, QUERY_SYNTAXES)])

        def move(batch: list[InstanceRef]) -> tuple[Dataset, Dataset | None] | None:
            awaited = INBOX.expect(destination, source.retrieve_peer.called_ae, source.calling_ae,
                                   frozenset(ref.sop_instance_uid for ref in batch), self._deliver)
            self.awaited, self.message_id = awaited, awaited.message_id
            try:
                return self._request(batch, partial(assoc.send_c_move, identifier(batch), destination,
                                                    StudyRootQueryRetrieveInformationModelMove,
                                                    msg_id=awaited.message_id))
            finally:
                INBOX.forget(awaited)
                self.awaited = None

        self._each_batch(move)
        scu.release(assoc)

    def _each_batch(self, send: Callable[[list[InstanceRef]], tuple[Dataset, Dataset | None] | None]) -> None:
        """Each batch's request, its end posted (``ended``). A node may refuse a list of UIDs
        as a whole when one of them is unknown (Orthanc answers 0xC000): after a failure
        (0xCxxx) of a request naming several, those that did not arrive are asked for one
        by one."""
        for batch in batches(by_series(self.refs.values())[0], UIDS_PER_REQUEST):
            if self.channel.closed:
                return
            final = send(batch)
            if final is None:
                return
            missing = self._missing(batch)
            if len(batch) > 1 and missing and int(final[0].Status) & 0xF000 == 0xC000:
                for ref in missing:
                    if self.channel.closed:
                        return
                    final = send([ref])
                    if final is None:
                        return
                    self.channel.put(("ended", [ref], *final))
            else:
                self.channel.put(("ended", batch, *final))

    def _missing(self, batch: list[InstanceRef]) -> list[InstanceRef]:
        with self.channel.cond:
            return [ref for ref in batch if ref.sop_instance_uid not in self.received]

    def _request(self, batch: list[InstanceRef], send: Callable[[], Any]) -> tuple[Dataset, Dataset | None] | None:
        """Send one request and read its responses; its final response, once the instances
        it names arrived (for a C-MOVE, at most ``MOVE_GRACE`` after it), or None when the
        retrieval was closed meanwhile."""
        started = time.monotonic()
        operation = self.how
        try:
            final: tuple[Dataset, Dataset | None] | None = None
            for status, found in send():
                code = status.get("Status")
                if code is None:  # pynetdicom: the association is gone, or a wrong message
                    if self.channel.closed:
                        return None
                    raise UpstreamUnavailable(f"source {self.name}: association aborted, connection closed, or a "
                                              f"wrong response ({self.source.retrieve_peer})")
                self.last_event = time.monotonic()
                if code_to_category(code) != "Pending":
                    final = (status, found)
            if final is None:
                raise UpstreamUnavailable(f"source {self.name}: the {operation.upper()} ended without a final "
                                          f"response ({self.source.retrieve_peer})")
        finally:
            self.source.metrics.upstream_latency.labels(self.name, operation).observe(time.monotonic() - started)
        if operation == "c-move":
            # The sub-operations the node counts as done (PS3.4 C.4.2.1.5: completed and
            # warning) whose instances have not yet arrived are awaited, at most MOVE_GRACE.
            uids = {ref.sop_instance_uid for ref in batch}
            status = final[0]
            counted = [status.get(k) for k in ("NumberOfCompletedSuboperations", "NumberOfWarningSuboperations")]
            done = len(uids) if None in counted else min(len(uids), sum(int(c) for c in counted))
            with self.channel.cond:
                self.channel.cond.wait_for(lambda: len(uids & self.received) >= done or self.channel.closed,
                                           MOVE_GRACE)
        return final


def _failed_list(found: Dataset | None) -> set[str]:
    """The Failed SOP Instance UID List of a final response's identifier (PS3.4 C.4.2.1.4)."""
    try:
        value = found.get("FailedSOPInstanceUIDList") if found is not None else None
    except Exception:  # an identifier pydicom cannot read: no list
        return set()
    if not value:
        return set()
    return {str(v) for v in ([value] if isinstance(value, str) else value)}
