"""``type: dicomweb``: C-FIND answered by QIDO-RS (PS3.18 10.6) from ``{url}``, and
C-MOVE and C-GET by WADO-RS (PS3.18 10.4).

A query becomes one or more QIDO-RS searches (``bridge.sources.qido``), each asked page
after page (``limit`` = ``page_size``, ``offset`` = the results so far) until a page
comes back shorter than ``limit``, or empty, or 204; each page's results are given to
the caller before the next page is asked for, and a result whose unique key an earlier
page (or search) gave is skipped: a server's pages shift when studies arrive meanwhile.
A server that answers a full page with nothing new (it ignores ``offset``) is not asked
again. A server that keeps results back says so with an HTTP ``Warning`` (PS3.18 8.3.4.4:
``299 ...: The number of results exceeded the maximum supported by the server``): that
is logged, and the next page is asked for even after a short page. Nothing is dropped
silently.

Every QIDO-RS request waits at most ``find_timeout`` for the connection, for each read, and for
its whole answer. What goes wrong becomes the upstream errors, naming the source (each
counted in ``dicom_bridge_upstream_errors{operation="qido"}``):

| what happens | raised |
| --- | --- |
| connection refused, timeouts, 408, 429, 5xx, an answer that breaks off | ``UpstreamUnavailable`` |
| 401, 403, a redirect, TLS verification (``bridge.web.client``) | ``UpstreamMisconfigured`` |
| 400 (the server refuses the query, e.g. a key it cannot match), other 4xx | ``UpstreamMisconfigured`` |
| 404 on ``/studies/{uid}/...`` | no such study: no results |
| 404 on ``/studies``, ``/series``, ``/instances`` | ``UpstreamMisconfigured``: not the DICOMweb base URL |
| an answer that is not DICOM JSON | ``UpstreamMisconfigured`` |

**Retrieval.** The references are grouped by series. A series of which more than one
instance is asked for is fetched with one request, ``{url}/studies/{s}/series/{se}``;
what its answer left out, and every instance asked for alone, with one request each,
``.../instances/{sop}``. Each asks for the instances as stored (``Accept:
multipart/related; type="application/dicom"; transfer-syntax=*``); each part is written
to a temporary file as it arrives and checked when complete (``bridge.sources.wado``),
then handed on at once, before the next part is read: a part that is not a usable
Part-10 instance, or one not asked for (the rest of a series), is removed. Every wait
for the answer and for its next bytes is bounded by ``retrieve_timeout``;
``dicom_bridge_upstream_request_seconds{operation="wado"}`` times each request until its
answer begins, and ``dicom_bridge_upstream_errors{operation="wado"}`` counts each request
that raised, answered an error status, or answered what cannot be read (not multipart,
a part refused). What goes wrong:

| what happens | result |
| --- | --- |
| 404, other 4xx, a 2xx not multipart (or without a boundary) | its instances fail, with the HTTP status |
| an instance missing from the answer, a part that is not DICOM | that instance fails |
| connection refused, a timeout, 408, 429, 5xx, an answer cut off | ``UpstreamUnavailable`` |
| 401, 403, a redirect, TLS verification | ``UpstreamMisconfigured`` |

A series' instances fail only after each was asked for alone. ``UpstreamUnavailable``
comes after what arrived before it: the rest is tried from the rule's next source.

Several C-FINDs and retrievals may use one source at once: each request borrows an
``HttpClient`` (one keep-alive connection, its own credentials) from a small pool. A
QIDO-RS page gives it back before its results are handed on, so a caller that stops
holds nothing; a WADO-RS answer holds it while its parts are handed on, and closes the
answer and gives it back when its caller stops.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Generator, Iterator, Sequence
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from bridge.config import DicomwebSource as DicomwebConfig
from bridge.dataset.query import Query
from bridge.errors import UpstreamError, UpstreamMisconfigured, UpstreamUnavailable
from bridge.metrics import Metrics
from bridge.model import InstanceRef, Retrieved
from bridge.sources import qido, wado
from bridge.sources.refs import by_series
from bridge.web.client import ClientPool, HttpClient, HttpResponse
from bridge.web.multipart import MultipartError

LOGGER = logging.getLogger(__name__)

ACCEPT = "application/dicom+json, application/json;q=0.9"
MAX_PAGE_BYTES = 256 << 20  # a page larger than this says page_size is too large
MAX_IDLE_CLIENTS = 8  # connections kept open between queries
ERROR_BODY_BYTES = 4096  # of an error answer, read for its summary
LOCATE_FIELDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID")
# A Warning (RFC 9111 5.5) by which a server says it kept results back (PS3.18 8.3.4.4).
_MORE = ("exceed", "additional result", "more result", "truncat")


@dataclasses.dataclass
class _Page:
    results: list[Any]
    more: bool  # the server says it kept results back, whatever the page's length


class DicomwebSource:
    """QIDO-RS against ``settings.url``, with the HTTP client of the DICOMweb destinations."""

    def __init__(self, name: str, settings: DicomwebConfig, metrics: Metrics, temp_dir: Path) -> None:
        self.name = name
        self.temp_dir = temp_dir  # where retrieved instances are written (bridge.sources.temp_dir)
        self.settings = settings
        self.metrics = metrics
        self._clients = ClientPool(settings, max_idle=MAX_IDLE_CLIENTS)
        metrics.add_source(name, ("qido", "wado"))
        self._lock = threading.Lock()  # guards _warnings
        self._warnings: set[str] = set()  # Warning texts logged already

    # -- the Source protocol ----------------------------------------------------------------

    def find(self, query: Query) -> Iterator[Dataset | None]:
        """The matches of ``query`` (a superset: the service checks each again), as they
        come. At PATIENT level, the studies folded into patients. ``None`` says that an
        answer came that gave no match yet (a page of studies of patients already given,
        or counted until the end): the source is at work, not stuck."""
        patients = qido.Patients(query) if query.level == "PATIENT" else None
        seen: set[str] = set()  # unique keys given, across pages and searches
        for search in qido.qido_searches(query):
            for item in self._results(search, qido.UNIQUE_TAG[query.level], seen):
                if item is None:
                    yield None
                    continue
                ds = self._record(item, search)
                if patients is None:
                    yield ds
                elif (patient := patients.add(ds)) is not None:
                    yield patient
                else:
                    yield None
        if patients is not None:
            yield from patients.rest()

    def locate(self, query: Query) -> Iterator[InstanceRef]:
        """The instances ``query`` names, at whatever level it is: an IMAGE-level search
        with its matching keys, each instance checked against them again."""
        image = dataclasses.replace(query, level="IMAGE", keys=query.matching)
        seen: set[str] = set()
        for search in qido.qido_searches(image, include=LOCATE_FIELDS):
            for item in self._results(search, qido.SOP_INSTANCE_UID, seen):
                if item is None:
                    continue
                ds = self._record(item, search)
                if not query.matches(ds)[0]:
                    continue
                ref = InstanceRef(study_uid=str(ds.get("StudyInstanceUID", "") or ""),
                                  series_uid=str(ds.get("SeriesInstanceUID", "") or ""),
                                  sop_instance_uid=str(ds.get("SOPInstanceUID", "") or ""),
                                  sop_class_uid=str(ds.get("SOPClassUID", "") or ""))
                if not all(dataclasses.astuple(ref)):
                    self._failed("qido")
                    raise UpstreamMisconfigured(f"source {self.name}: {search.path} answered an instance without "
                                                "its Study, Series or SOP Instance UID or SOP Class UID")
                yield ref

    def retrieve(self, refs: Sequence[InstanceRef]) -> Iterator[Retrieved | None]:
        """Each of ``refs`` fetched with WADO-RS, as it arrives (the module's docstring):
        a file in ``temp_dir`` that the caller sends and removes, or the reason there is
        none. ``None`` while a part is still arriving (at work). Raises as the upstream
        fails as a whole, after what arrived before; closed early, it closes its answer
        and removes the file it was writing."""
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        groups, again = by_series(refs)
        for ref in again:
            yield Retrieved(ref, failure=f"source {self.name}: the instance was asked for twice")
        for (study, series), wanted in groups.items():
            if len(wanted) > 1:
                yield from self._wado(wado.series_path(study, series), f"series {series}", wanted)
            for ref in list(wanted.values()):  # one instance, or what the series' answer left out
                failure = yield from self._wado(wado.instance_path(ref), f"instance {ref.sop_instance_uid}",
                                                {ref.sop_instance_uid: ref})
                if failure:
                    yield Retrieved(ref, failure=failure)

    def close(self) -> None:
        """Close the idle connections; a request still running closes its own when done."""
        self._clients.close()

    # -- pages ------------------------------------------------------------------------------

    def _results(self, search: qido.QidoSearch, unique_tag: str, seen: set[str]) -> Iterator[Any | None]:
        """Every result of ``search`` (as DICOM JSON) whose unique key is not in ``seen``
        yet (given by an earlier page, or search), page after page; ``seen`` gets the
        keys given. After a page that gave nothing new, ``None``: still at work."""
        limit, offset = self.settings.page_size, 0
        own: set[str] = set()  # this search's keys: a page of nothing new ends it
        while True:
            page = self._page(search, limit, offset)
            new, given = 0, 0
            for item in page.results:
                uid = qido.first_value(item, unique_tag) if isinstance(item, dict) else None
                if uid is None:
                    new, given = new + 1, given + 1
                    yield item
                    continue
                if uid not in own:
                    own.add(uid)
                    new += 1
                if uid not in seen:
                    seen.add(uid)
                    given += 1
                    yield item
            if not given:
                yield None
            count = len(page.results)
            if count == 0 or count > limit or (count < limit and not page.more):
                return  # the last page (or a server that ignores limit: everything at once)
            if new == 0:
                LOGGER.warning("%s: a full page of results already given: the server seems to ignore "
                               "offset; not asking for more", self.name)
                return
            offset += count

    def _page(self, search: qido.QidoSearch, limit: int, offset: int) -> _Page:
        """One page of ``search``; a page that fails is counted, and raises."""
        try:
            return self._ask(search, limit, offset)
        except UpstreamError:
            self._failed("qido")
            raise

    def _ask(self, search: qido.QidoSearch, limit: int, offset: int) -> _Page:
        url = self.settings.url + search.path
        timeout = self.settings.find_timeout
        started = time.monotonic()
        try:
            with self._clients.borrow() as client, client.request(
                    "GET", url, params=search.query_string(limit, offset), headers={"Accept": ACCEPT},
                    read_timeout=timeout, connect_timeout=timeout) as response:
                content = b""
                if response.status != 204:
                    content = self._read(response.iter_available(), started, timeout)
                warning = response.headers.get("Warning", "")
                status, summary = response.status, response.summary(content)
                if not 200 <= status < 300:
                    response.raise_for_upstream(summary)
        except UpstreamError as exc:
            raise self._named(exc, url) from None
        finally:
            elapsed = time.monotonic() - started
            self.metrics.upstream_latency.labels(self.name, "qido").observe(elapsed)
        LOGGER.debug("%s: QIDO-RS %s offset %d: HTTP %d, %d bytes in %.3f s", self.name, search.path, offset,
                     status, len(content), elapsed)
        more = any(marker in warning.lower() for marker in _MORE)
        if warning:
            self._warned(search.path, warning[:300], more)
        if status == 404 and search.fixed:
            return _Page([], False)  # no such study (or series)
        if status == 404:
            raise UpstreamMisconfigured(f"source {self.name}: {summary}: is url the DICOMweb base URL? "
                                        f"({self.settings.url})")
        if not 200 <= status < 300:
            what = "the server refused the query" if status == 400 else "unexpected answer"
            raise UpstreamMisconfigured(f"source {self.name}: {what}: {summary} ({self.settings.url})")
        if status == 204 or not content.strip():
            return _Page([], False)
        try:
            results = json.loads(content)
        except ValueError:
            raise UpstreamMisconfigured(f"source {self.name}: {search.path} did not answer JSON: "
                                        f"{response.headers.get('Content-Type', 'no Content-Type')}") from None
        if not isinstance(results, list):
            raise UpstreamMisconfigured(f"source {self.name}: {search.path} answered a JSON "
                                        f"{type(results).__name__}, not a list of results")
        return _Page(results, more)

    def _read(self, chunks: Iterator[bytes], started: float, timeout: float) -> bytes:
        """The body, within ``timeout`` of ``started`` altogether (each read has its own
        timeout too: a server sending a byte at a time would pass that one)."""
        pieces, total = [], 0
        for piece in chunks:
            pieces.append(piece)
            total += len(piece)
            if time.monotonic() - started > timeout:
                raise UpstreamUnavailable(f"no complete answer within {timeout:g} s (find_timeout)")
            if total > MAX_PAGE_BYTES:
                raise UpstreamMisconfigured(f"a page of more than {MAX_PAGE_BYTES >> 20} MiB: lower page_size")
        return b"".join(pieces)

    def _warned(self, path: str, warning: str, more: bool) -> None:
        """Log a server's Warning: always when it kept results back, else once per text
        (a server that ignores ``fuzzymatching`` says so every time)."""
        with self._lock:
            new = warning not in self._warnings
            if new and len(self._warnings) < 100:
                self._warnings.add(warning)
        if more:
            LOGGER.warning("%s: %s kept results back, asking for the next page: %s", self.name, path, warning)
        else:
            LOGGER.log(logging.WARNING if new else logging.DEBUG, "%s: %s answered with a warning: %s",
                       self.name, path, warning)

    def _record(self, item: Any, search: qido.QidoSearch) -> Dataset:
        try:
            return qido.record(item, search.fixed)
        except ValueError as exc:
            self._failed("qido")
            raise UpstreamMisconfigured(f"source {self.name}: {search.path}: {exc}") from None

    def _failed(self, operation: str) -> None:
        self.metrics.upstream_errors.labels(self.name, operation).inc()

    def _named(self, exc: UpstreamError, url: str) -> UpstreamError:
        """``exc`` told as this source's: its name first (the C-FIND's ErrorComment has 64
        characters), the base URL last."""
        reason = exc.reason.removeprefix(f"{url}: ")
        if reason.startswith(f"source {self.name}:"):
            return exc
        text = f"source {self.name}: {reason} ({self.settings.url})"
        if isinstance(exc, UpstreamUnavailable):
            return UpstreamUnavailable(text, exc.retry_after)
        return UpstreamMisconfigured(text)

    # -- WADO-RS ----------------------------------------------------------------------------

    def _wado(self, path: str, what: str, wanted: dict[str, InstanceRef]) -> Generator[Retrieved | None, None, str]:
        """GET ``path`` (``what`` it is, for reasons), yielding each part that is one of
        ``wanted`` (by SOP Instance UID, taken out of ``wanted``) as soon as it is complete;
        other parts are removed. Returns why the rest of ``wanted`` is not there (empty
        when nothing is left); raises for the upstream as a whole. A request that raised,
        answered an error status, or answered what cannot be read is counted."""
        url = self.settings.url + path
        try:
            with self._clients.borrow() as client, self._get(client, url) as response:
                if not 200 <= response.status < 300 or response.status == 204:
                    summary = response.summary(response.read(ERROR_BODY_BYTES))
                    response.raise_for_upstream(summary)
                    LOGGER.debug("%s: WADO-RS %s: %s", self.name, what, summary)
                    self._failed("wado")
                    return f"source {self.name}: WADO-RS {what}: {summary}"
                return (yield from self._parts(response, what, wanted))
        except UpstreamError as exc:
            self._failed("wado")
            raise self._named(exc, url) from None

    def _get(self, client: HttpClient, url: str) -> HttpResponse:
        """The answer to a WADO-RS request, its body unread; timed until it begins."""
        timeout = self.settings.retrieve_timeout
        started = time.monotonic()
        try:
            return client.request("GET", url, headers={"Accept": wado.ACCEPT}, read_timeout=timeout,
                                  connect_timeout=timeout)
        finally:
            self.metrics.upstream_latency.labels(self.name, "wado").observe(time.monotonic() - started)

    def _parts(self, response: HttpResponse, what: str,
               wanted: dict[str, InstanceRef]) -> Generator[Retrieved | None, None, str]:
        """``_wado``'s reading of a 2xx answer, part by part."""
        problems: list[str] = []
        single = len(wanted) == 1
        parts = wado.parts(response.iter_available(wado.CHUNK), response.headers.get("Content-Type", ""),
                           self.temp_dir, f"retrieved-{self.name}-")
        try:
            for part in parts:
                if part is None:
                    yield None
                elif part.path is None:
                    LOGGER.warning("%s: WADO-RS %s: a part refused: %s", self.name, what, part.problem)
                    problems.append(part.problem)
                elif (ref := wanted.pop(part.sop_instance_uid, None)) is not None:
                    yield Retrieved(ref, path=part.path)
                else:  # another instance of the series, or one given already
                    part.path.unlink(missing_ok=True)
                    if single:
                        problems.append(f"the answer holds instance {part.sop_instance_uid} instead")
        except MultipartError as exc:
            LOGGER.warning("%s: WADO-RS %s: %s: %s", self.name, what, response.summary(), exc)
            self._failed("wado")
            return f"source {self.name}: WADO-RS {what}: {response.summary()}: {exc}"
        finally:
            parts.close()  # now, not when collected: it removes the part it was writing
        if problems:
            self._failed("wado")
        if not wanted:
            return ""
        reason = f"source {self.name}: not in the WADO-RS response of {what}"
        return reason + (f" (a part refused: {problems[0]})" if problems else "")
