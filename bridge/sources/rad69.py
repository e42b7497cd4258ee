"""``type: rad69``: C-MOVE and C-GET answered by IHE XDS-I.b RAD-69 (Retrieve Imaging
Document Set) from an Imaging Document Source at ``{url}``; the bridge is the Imaging
Document Consumer. RAD-69 cannot query: ``find`` refuses, and ``locate`` is the
``locate:`` source's (dicomweb, dimse or local).

**Requests.** The references are grouped by study and series; each series is asked for
in requests of at most ``batch_size`` documents (``bridge.sources.rad69_wire``: one
``RetrieveImagingDocumentSetRequest`` per HTTP POST, ``repository_unique_id`` and
``home_community_id`` in every DocumentRequest, ``transfer_syntaxes`` offered in order),
``parallel`` of them in flight at once, each on its own connection from the shared pool.

**Answers** are read as they arrive (``bridge.sources.rad69_answer``): each document to
a temporary file in ``temp_dir``, checked when complete (a Part-10 file whose SOP
Instance UID is the DocumentUniqueId asked for, in a transfer syntax that was offered),
and handed on at once. What goes wrong, per request:

| what happens | result |
| --- | --- |
| a document not in the answer | fails with its RegistryError, classified (below) |
| a file not the instance asked for, or in a syntax not offered | that document fails |
| a SOAP Fault (HTTP 400, 500) | the request's documents fail with its Reason |
| a status without SOAP, an answer neither SOAP nor multipart | the request's documents fail, with a summary |
| the connection dropped, no bytes for ``retrieve_timeout`` | the partial file removed; the rest fails |
| 401, 403, a redirect, TLS verification | the request's documents fail (``bridge.web.client``) |

A RegistryError names its document by ``location``; one without a location (or naming
none asked for) stands for every document not returned. Its code is classified: missing
document, configuration, transfer syntax not available, or error
(``rad69_wire.RegistryError.kind``).

Each request is timed until its answer begins
(``dicom_bridge_upstream_request_seconds{operation="rad69"}``), and counted in
``dicom_bridge_upstream_errors{operation="rad69"}`` when it fails as a whole: it raised,
or its answer is an error status, a SOAP Fault, unreadable, broken off, or a
RegistryResponse of status Failure. Documents missing from a partial success are not
counted: the source answered.

Failed documents are tried from the rule's next source by the retrieval. When every
request failed as a whole and no document came, the first request's ``UpstreamError`` is
raised instead (the source failed, not its documents). Closed early, the source stops
its requests (their answers closed) and removes every file not handed over.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset

from bridge.config import Rad69Source as Rad69Config
from bridge.dataset.dicomfile import read_header
from bridge.dataset.query import Query
from bridge.errors import UpstreamError, UpstreamMisconfigured, UpstreamUnavailable
from bridge.metrics import Metrics
from bridge.model import InstanceRef, Retrieved, Source
from bridge.sources import rad69_wire
from bridge.sources.rad69_answer import Answer, AnswerError, AnswerReader, Document
from bridge.sources.refs import batches as by_size
from bridge.sources.refs import by_series
from bridge.web.client import ClientPool, HttpResponse

LOGGER = logging.getLogger(__name__)

CHUNK = 256 * 1024  # the most bytes one read of an answer gives
HEARTBEAT = 2.0  # seconds between the Nones ``retrieve`` yields while bytes arrive but no document completes
ERROR_BODY_BYTES = 4096  # of an answer that is not SOAP, read for its summary
ACCEPT = "multipart/related, application/soap+xml"


@dataclass
class _Run:
    """One ``retrieve``: the batches left, what the workers hand over, and the stop signal."""

    todo: queue.Queue[list[InstanceRef]]
    out: queue.Queue[object]
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    responses: set[HttpResponse] = field(default_factory=set)
    progress: float = field(default_factory=time.monotonic)  # when bytes last came
    delivered: int = 0
    whole: list[UpstreamError] = field(default_factory=list)  # requests that failed as a whole
    requests: int = 0

    def put(self, item: object) -> bool:
        """Hand ``item`` over, waiting for room; False once stopped (``item`` not taken)."""
        while not self.stop.is_set():
            try:
                self.out.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False


class Rad69Source:
    """RAD-69 against ``settings.url``; ``locator`` locates (the ``locate:`` source)."""

    def __init__(self, name: str, settings: Rad69Config, locator: Source, metrics: Metrics,
                 temp_dir: Path) -> None:
        self.name = name
        self.settings = settings
        self.locator = locator
        self.metrics = metrics
        self.temp_dir = temp_dir  # where retrieved instances are written (bridge.sources.temp_dir)
        self._pool = ClientPool(settings)
        metrics.add_source(name, ("rad69",))

    # -- the Source protocol ----------------------------------------------------------

    def find(self, query: Query) -> Iterator[Dataset | None]:
        """Refused: RAD-69 has no query (``check`` refuses a find rule naming this source)."""
        raise UpstreamMisconfigured(f"source {self.name}: RAD-69 cannot query; name a locate source in find rules")
        yield None  # a generator, like every source's find

    def locate(self, query: Query) -> Iterator[InstanceRef]:
        """The ``locate:`` source's answer."""
        yield from self.locator.locate(query)

    def retrieve(self, refs: Sequence[InstanceRef]) -> Iterator[Retrieved | None]:
        """Each of ``refs`` fetched with RAD-69 (the module's docstring), as it completes:
        a checked file in ``temp_dir`` that the caller sends and removes, or the reason
        there is none. ``None`` every ``HEARTBEAT`` seconds while bytes arrive and no
        document completes."""
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        saml = self._assertion()
        series, again = by_series(refs)
        for ref in again:
            yield Retrieved(ref, failure=f"source {self.name}: the instance was asked for twice")
        batches = by_size(series, self.settings.batch_size)
        if not batches:
            return
        run = _Run(queue.Queue(), queue.Queue(maxsize=2 * self.settings.parallel))
        for batch in batches:
            run.todo.put(batch)
        workers = [threading.Thread(target=self._worker, args=(run, saml), daemon=True,
                                    name=f"{threading.current_thread().name}-rad69-{i}")
                   for i in range(min(self.settings.parallel, len(batches)))]
        for worker in workers:
            worker.start()
        try:
            finished = 0
            while finished < len(workers):
                try:
                    item = run.out.get(timeout=HEARTBEAT)
                except queue.Empty:
                    if time.monotonic() - run.progress < HEARTBEAT:
                        yield None  # at work: bytes are arriving
                    continue
                if item is _DONE:
                    finished += 1
                    continue
                assert isinstance(item, Retrieved)
                yield item
            if run.whole and len(run.whole) == run.requests and not run.delivered:
                raise run.whole[0]
        finally:
            run.stop.set()
            with run.lock:
                responses = list(run.responses)
            for response in responses:  # a worker blocked in a read wakes up with an error
                try:
                    response.close()
                except Exception:  # noqa: BLE001 - closing from another thread may complain; it is closed
                    pass
            for worker in workers:
                worker.join(timeout=0.5)
            _drain(run)

    def close(self) -> None:
        """Close the idle connections, and the locate source."""
        self._pool.close()
        self.locator.close()

    # -- requests ---------------------------------------------------------------------

    def _assertion(self) -> str | None:
        path = self.settings.saml_assertion_file
        if path is None:
            return None
        try:
            return rad69_wire.check_assertion(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise UpstreamMisconfigured(f"source {self.name}: saml_assertion_file {path}: {exc}") from None

    def _worker(self, run: _Run, saml: str | None) -> None:
        try:
            while not run.stop.is_set():
                try:
                    batch = run.todo.get_nowait()
                except queue.Empty:
                    return
                with run.lock:
                    run.requests += 1
                pending = {ref.sop_instance_uid: ref for ref in batch}
                try:
                    reasons = self._request(batch, pending, run, saml)
                except UpstreamError as exc:
                    if not run.stop.is_set():  # else its answer was closed under it: not the source's failure
                        self._failed()
                    with run.lock:
                        run.whole.append(exc)
                    reasons = {}, f"source {self.name}: {exc.reason}"
                except Exception as exc:  # a bug must not leave the retrieval waiting: the batch fails
                    if run.stop.is_set():
                        return  # its answer closed under it: nobody waits for the batch
                    LOGGER.exception("%s: a RAD-69 request failed", self.name)
                    reasons = {}, f"source {self.name}: {type(exc).__name__}: {exc}"
                by_uid, default = reasons
                for uid, ref in pending.items():
                    if not run.put(Retrieved(ref, failure=by_uid.get(uid, default))):
                        return
        finally:
            run.put(_DONE)

    def _request(self, batch: list[InstanceRef], pending: dict[str, InstanceRef], run: _Run,
                 saml: str | None) -> tuple[dict[str, str], str]:
        """POST one request for ``batch``; hand over each document as it completes (taken
        out of ``pending``). Returns the reasons for what is left in ``pending``: by SOP
        Instance UID, and the reason for the others."""
        settings = self.settings
        documents = [rad69_wire.DocumentRequest(r.study_uid, r.series_uid, r.sop_instance_uid) for r in batch]
        request = rad69_wire.request(settings.url, documents, settings.repository_unique_id,
                                     settings.transfer_syntaxes, settings.packaging, settings.home_community_id,
                                     saml)
        timeout = settings.retrieve_timeout
        what = f"series {batch[0].series_uid} ({len(batch)} documents)"
        with self._pool.borrow() as client:
            started = time.monotonic()
            try:
                response = client.request("POST", settings.url, body=request.body, read_timeout=timeout,
                                          connect_timeout=timeout,
                                          headers={"Content-Type": request.content_type, "Accept": ACCEPT})
            finally:
                self.metrics.upstream_latency.labels(self.name, "rad69").observe(time.monotonic() - started)
            with run.lock:
                run.responses.add(response)
            try:
                with response:
                    return self._answer(response, what, pending, run)
            finally:
                with run.lock:
                    run.responses.discard(response)

    def _answer(self, response: HttpResponse, what: str, pending: dict[str, InstanceRef],
                run: _Run) -> tuple[dict[str, str], str]:
        content_type = response.headers.get("Content-Type", "")
        try:
            reader = AnswerReader(content_type, self.temp_dir, f"retrieved-{self.name}-")
        except AnswerError as exc:
            summary = response.summary(response.read(ERROR_BODY_BYTES))
            response.raise_for_upstream(summary)  # 5xx, 401, 403, a redirect: the source's trouble
            return self._failure(f"source {self.name}: RAD-69 {what}: {summary}: {exc}")
        try:
            for chunk in response.iter_available(CHUNK):
                run.progress = time.monotonic()
                if run.stop.is_set():
                    return {}, "stopped"
                for document in reader.feed(chunk):
                    self._deliver(document, pending, run)
            answer = reader.finish()
        except AnswerError as exc:
            LOGGER.warning("%s: RAD-69 %s: %s: %s", self.name, what, response.summary(), exc)
            if not 200 <= response.status < 300:
                response.raise_for_upstream()
            return self._failure(f"source {self.name}: RAD-69 {what}: {response.summary()}: {exc}")
        except UpstreamUnavailable as exc:  # the connection dropped, or no bytes for retrieve_timeout
            if run.stop.is_set():
                return {}, "stopped"  # its answer closed under it: nobody waits for the batch
            LOGGER.warning("%s: RAD-69 %s broke off: %s", self.name, what, exc)
            return self._failure(f"source {self.name}: RAD-69 {what} broke off: {exc.reason}")
        finally:
            reader.discard()
        return self._reasons(answer, response, what, pending)

    def _reasons(self, answer: Answer, response: HttpResponse, what: str,
                 pending: dict[str, InstanceRef]) -> tuple[dict[str, str], str]:
        """Why each document left in ``pending`` did not come, from ``answer``."""
        for problem in answer.problems:
            LOGGER.warning("%s: RAD-69 %s: %s", self.name, what, problem)
        if answer.fault:
            return self._failure(f"source {self.name}: RAD-69 SOAP Fault (HTTP {response.status}): {answer.fault}")
        if not 200 <= response.status < 300:
            response.raise_for_upstream()
            return self._failure(f"source {self.name}: RAD-69 {what}: {response.summary()}")
        status = rad69_wire.status_kind(answer.status)
        if status == "Failure":
            self._failed()
        for error in answer.errors:
            log = LOGGER.info if error.warning else LOGGER.warning
            log("%s: RAD-69 %s: %s %s at %s", self.name, what, error.severity.rpartition(":")[2] or "error",
                error.describe(), error.location or "(no location)")
        by_uid: dict[str, str] = {}
        general = ""
        for error in answer.errors:
            reason = f"source {self.name}: RAD-69 {status}: {error.describe()}"
            if error.location in pending:
                by_uid.setdefault(error.location, reason)
            elif not general:
                general = reason
        for uid in answer.absent:
            by_uid.setdefault(uid, f"source {self.name}: RAD-69 {status}: its DocumentResponse came without "
                                   "its document")
        return by_uid, general or f"source {self.name}: RAD-69 {status}: not in the answer"

    def _failure(self, reason: str) -> tuple[dict[str, str], str]:
        """A request that failed as a whole (counted): each of its documents fails with ``reason``."""
        self._failed()
        return {}, reason

    def _failed(self) -> None:
        self.metrics.upstream_errors.labels(self.name, "rad69").inc()

    def _deliver(self, document: Document, pending: dict[str, InstanceRef], run: _Run) -> None:
        """Hand over ``document`` when it is one of ``pending`` and its file is what was asked for."""
        ref = pending.pop(document.document_unique_id, None)
        if ref is None:
            LOGGER.warning("%s: RAD-69 answered document %s, not asked for (or twice)", self.name,
                           document.document_unique_id)
            document.path.unlink(missing_ok=True)
            return
        problem = self._check(document.path, ref)
        item = Retrieved(ref, failure=problem) if problem else Retrieved(ref, path=document.path)
        if problem:
            document.path.unlink(missing_ok=True)
        if not run.put(item):
            document.path.unlink(missing_ok=True)
        elif not problem:
            with run.lock:
                run.delivered += 1

    def _check(self, path: Path, ref: InstanceRef) -> str:
        """Why the file at ``path`` is not ``ref`` in an offered syntax; empty when it is."""
        try:
            header = read_header(path)
        except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds on garbage
            return f"source {self.name}: the document is not a readable DICOM file: {exc}"
        sop = str(header.get("SOPInstanceUID", "") or "")
        syntax = str(header.file_meta.get("TransferSyntaxUID", "") or "") if header.file_meta else ""
        if sop != ref.sop_instance_uid:
            return f"source {self.name}: the document holds SOP Instance UID {sop or '(none)'} instead"
        if syntax not in self.settings.transfer_syntaxes:
            return f"source {self.name}: the document is in transfer syntax {syntax or '(none)'}, which was not offered"
        return ""


_DONE = object()


def _drain(run: _Run) -> None:
    """Remove the files handed over to nobody."""
    while True:
        try:
            item = run.out.get_nowait()
        except queue.Empty:
            return
        if isinstance(item, Retrieved) and item.path is not None:
            item.path.unlink(missing_ok=True)
