"""The JSON query and retrieve API under ``/api`` (bearer token; docs/api.md, "Query and
retrieve API").

- ``POST /api/query``: the matches of a configured source, newest first, as JSON with
  DICOM keywords. The body is read into the ``Query`` a C-FIND would be
  (``bridge.api.qr_body``) and asked of the source by ``bridge.sources.search.Search``,
  within the source's ``find_timeout``, as the C-FIND service asks it.
- ``POST /api/retrieve``: the instances a body names, from a configured source to a node
  of ``nodes``, as a C-MOVE from that source to that node would go
  (``bridge.qr.suboperations.Job``, ``bridge.qr.move.node_sink``); the answer counts
  what completed, had a warning or failed.

Only configured sources and nodes can be named: the API is no open relay. Each request
runs in the server's thread pool, at most ``MAX_QUERIES`` queries and
``MAX_RETRIEVALS`` retrievals at once (more: 503), so that long ones never starve the
health checks. What failed upstream is answered with a message of ours and the
correlation ID; the reason (which may quote a peer or the system) is in the log under it.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydicom.datadict import dictionary_VM
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from bridge.api import qr_body
from bridge.api.deps import caller, runtime
from bridge.api.errors import ApiError, correlation_id
from bridge.api.qr_body import QueryAnswer, QueryBody, RetrieveAnswer, RetrieveBody
from bridge.api.runtime import Runtime
from bridge.config import LOCAL, Config, Node
from bridge.dataset.query import Query
from bridge.errors import UpstreamError, UpstreamUnavailable
from bridge.qr import suboperations
from bridge.qr.find import failure, find_timeout
from bridge.qr.move import destination_node, node_sink
from bridge.qr.retrieve import retrieve_timeout
from bridge.qr.suboperations import ALL_FAILED, MAX_SUBOPERATIONS, SUCCESS, Job
from bridge.sources import archive_root
from bridge.sources.retrieval import TooMany
from bridge.sources.search import Search

LOGGER = logging.getLogger(__name__)

router = APIRouter(prefix="/api", tags=["query and retrieve"], dependencies=[Depends(caller)])

MAX_QUERIES = 8  # queries served at once
MAX_RETRIEVALS = 4  # retrievals served at once
BUSY_RETRY = 5  # seconds a 503 asks the client to wait
OPERATION = "API"  # the operation label of its retrievals in the metrics

# Not answered as keys of a match: they describe the request, not the record.
_NOT_KEYS = frozenset({"QueryRetrieveLevel", "RetrieveAETitle", "SpecificCharacterSet"})
# What "newest first" reads at each level (PATIENT: the source's order).
_WHEN = {"STUDY": ("StudyDate", "StudyTime"), "SERIES": ("SeriesDate", "SeriesTime"),
         "IMAGE": ("ContentDate", "ContentTime")}


@router.post("/query", summary="Query a source: its matches, newest first",
             responses={400: {"description": "a field is not valid; the message names it"},
                        502: {"description": "the source could not be reached, or refused the query"},
                        503: {"description": f"{MAX_QUERIES} queries are being answered already"}})
def query(body: QueryBody, request: Request) -> QueryAnswer:
    rt = runtime(request)
    config = rt.config
    cid = correlation_id(request)
    today = date.today()
    invalid = qr_body.problems(body, retrieve=False, today=today)
    name_problem = _source_problem(config, body.source, query=True)
    _refuse([*invalid, *name_problem])
    started = time.monotonic()
    with _slot(request, "queries", MAX_QUERIES):
        source = rt.sources.get(body.source, config)
        wanted = qr_body.query(body, today)
        search = Search(wanted, [source], {source.name: find_timeout(config, body.source)}, config.find.max_results)
        seen = 0

        def counted() -> Iterator[Any]:
            nonlocal seen
            for match in search:
                seen += 1
                yield match

        try:
            newest = heapq.nlargest(body.max_results, counted(), key=lambda m: _when(m.record, body.level))
        finally:
            search.stop()
    status = failure(search.failures[0].error) if search.failures else 0x0000
    rt.metrics.finds.labels(body.source, f"0x{status:04X}").inc()
    truncated = seen > body.max_results or search.capped
    LOGGER.info("API query [%s]: source %s, %s level: %d matches%s, 0x%04X in %.2fs", cid, body.source, body.level,
                len(newest), " (more not answered)" if truncated else "", status, time.monotonic() - started)
    if search.failures:
        raise _upstream(search.failures[0].error, f"source {body.source}", "the query", cid)
    matches = [_json(wanted.shape(m.record, config.ae_title)) for m in newest]
    return QueryAnswer(source=body.source, level=body.level, count=len(matches), truncated=truncated,
                       matches=matches)


@router.post("/retrieve", summary="Retrieve from a source to a node, as a C-MOVE would",
             responses={200: {"description": "every instance was stored by the node", "model": RetrieveAnswer},
                        207: {"description": "some instances failed, or were stored with a warning",
                              "model": RetrieveAnswer},
                        400: {"description": "a field is not valid, or names no source or node; the message says"},
                        404: {"description": "nothing matched"},
                        502: {"description": "the source or the node could not be reached, or refused; with the "
                                             "counts when instances were located", "model": RetrieveAnswer},
                        503: {"description": f"{MAX_RETRIEVALS} retrievals are running already"}})
def retrieve(body: RetrieveBody, request: Request) -> JSONResponse:
    rt = runtime(request)
    config = rt.config
    cid = correlation_id(request)
    today = date.today()
    found = destination_node(config.nodes, body.destination)
    invalid = [*qr_body.problems(body, retrieve=True, today=today), *_source_problem(config, body.source, query=False)]
    if found is None:
        nodes = ", ".join(_node_names(config)) or "none"
        invalid.append(("destination", f"no node {body.destination!r} in the configuration (nodes: {nodes})"))
    _refuse(invalid)
    assert found is not None
    key, node = found
    with _slot(request, "retrievals", MAX_RETRIEVALS):
        return _retrieve(rt, config, body, key, node, qr_body.query(body, today, return_keys=False), cid)


def _retrieve(rt: Runtime, config: Config, body: RetrieveBody, key: str, node: Node, wanted: Query,
              cid: str) -> JSONResponse:
    """The retrieval, with ``config`` (the one the request was checked against: a reload
    may replace the daemon's meanwhile)."""
    started = time.monotonic()
    ae_title = node.ae_title or key
    source = rt.sources.get(body.source, config)
    job = Job(OPERATION, wanted, [source], {source.name: retrieve_timeout(config, body.source)},
              node_sink(config, key, node, OPERATION), limit=MAX_SUBOPERATIONS, label=f"API retrieve [{cid}]")
    status = 0xC000  # unless it ends otherwise: a bug answered as 500
    note = ""
    try:
        try:
            located = job.locate()
        except TooMany as exc:
            status = 0xA701
            raise _invalid([("level", f"more than {exc.limit} instances match: retrieve by series")]) from exc
        except UpstreamError as exc:
            status = 0xA701
            raise _upstream(exc, f"source {body.source}", "locating the instances", cid) from exc
        if not located:
            status, note = SUCCESS, " (nothing matched)"
            raise ApiError(404, f"nothing matched in source {body.source}")
        status = job.run()
        note = f" ({job.comment})" if job.comment else ""
    finally:
        job.close()
        suboperations.count(rt.metrics, OPERATION, job, status)
        counts = job.counts
        LOGGER.info("API retrieve [%s]: source %s to %s (%s), %s level: %d located, %d completed, %d warning, "
                    "%d failed, 0x%04X in %.2fs%s", cid, body.source, key, ae_title, body.level, len(job.located),
                    counts.completed, counts.warning, counts.failed, status, time.monotonic() - started, note)
    answer = {"source": body.source, "destination": key, "level": body.level, "located": len(job.located),
              "completed": counts.completed, "warning": counts.warning, "failed": counts.failed,
              "failed_sop_instance_uids": counts.failed_uids}
    if status == SUCCESS:
        return JSONResponse(answer, status_code=200)
    log_note = f"the daemon's log names each failed instance with its reason under {cid}"
    if status == ALL_FAILED:
        if job.sink_failed:
            message = f"the node {key} ({ae_title}) could not be reached, or stopped answering: {log_note}"
        else:
            message = f"no instance was stored: each failed in source {body.source} or at the node {key}: {log_note}"
        raise ApiError(502, message, answer)
    if job.sink_failed:
        message = f"the node {key} ({ae_title}) stopped answering after {counts.completed + counts.warning} " \
                  f"instances: {log_note}"
    else:
        message = f"{counts.failed} of {len(job.located)} instances failed, {counts.warning} had a warning: {log_note}"
    return JSONResponse({**answer, "message": message, "correlation_id": cid}, status_code=207)


# -- what may be named -----------------------------------------------------------------------


def _source_names(config: Config) -> list[str]:
    return ([LOCAL] if archive_root(config) is not None else []) + list(config.sources)


def _node_names(config: Config) -> list[str]:
    return [key if (node.ae_title or key) == key else f"{key} ({node.ae_title})" for key, node in config.nodes.items()]


def _source_problem(config: Config, name: str, query: bool) -> list[tuple[str, str]]:
    names = _source_names(config)
    if name not in names:
        return [("source", f"no source {name!r} in the configuration (sources: {', '.join(names) or 'none'})")]
    settings = config.sources.get(name)
    if query and settings is not None and settings.type == "rad69":
        return [("source", f"{name!r} is a rad69 source: it retrieves, and cannot be queried")]
    return []


# -- answers ---------------------------------------------------------------------------------


def _invalid(problems: list[tuple[str, str]]) -> RequestValidationError:
    """Problems found beyond the body's own validation, answered as it answers (400, each
    named by its field: ``bridge.api.errors``)."""
    return RequestValidationError([{"loc": ("body", name), "msg": message, "type": "value_error"}
                                   for name, message in problems])


def _refuse(problems: list[tuple[str, str]]) -> None:
    if problems:
        raise _invalid(problems)


def _upstream(exc: Exception, who: str, what: str, cid: str) -> Exception:
    """The answer to a source's failure: 502 for an upstream error (the reason logged
    under ``cid``, never answered: it may quote the peer or the system); any other
    failure is unexpected (500, the traceback logged)."""
    if not isinstance(exc, UpstreamError):
        return exc
    LOGGER.warning("API [%s]: %s: %s failed: %s", cid, who, what, exc)
    if isinstance(exc, UpstreamUnavailable):
        message = f"{who} could not be reached, or gave no answer in time"
    else:
        message = f"{who} refused {what}, or answered with an error"
    return ApiError(502, f"{message}: the daemon's log has the reason under {cid}")


@contextmanager
def _slot(request: Request, what: str, limit: int) -> Iterator[None]:
    slots = _slots(request, what, limit)
    if not slots.acquire(blocking=False):
        raise ApiError(503, f"{limit} {what} are being answered already: try again later",
                       headers={"Retry-After": str(BUSY_RETRY)})
    try:
        yield
    finally:
        slots.release()


_SLOTS_LOCK = threading.Lock()


def _slots(request: Request, what: str, limit: int) -> threading.BoundedSemaphore:
    """The app's semaphore for ``what``, made at its first use (the app is built
    elsewhere, ``bridge.api.app``, and knows nothing of it)."""
    state = request.app.state
    with _SLOTS_LOCK:
        slots: dict[str, threading.BoundedSemaphore] | None = getattr(state, "qr_slots", None)
        if slots is None:
            slots = state.qr_slots = {}
        if what not in slots:
            slots[what] = threading.BoundedSemaphore(limit)
        return slots[what]


def _when(record: Dataset, level: str) -> tuple[str, str]:
    """How recent a match is, as text that sorts: its level's date and time, digits only
    (a missing one sorts oldest)."""
    keywords = _WHEN.get(level)
    if keywords is None:
        return ("", "")
    day, clock = (str(record.get(k, "") or "") for k in keywords)
    digits = "".join(c for c in clock.split(".")[0] if c.isdigit())
    return ("".join(c for c in day if c.isdigit())[:8], digits.ljust(6, "0") if digits else "")


def _json(ds: Dataset) -> dict[str, Any]:
    """A match as JSON: each attribute by its DICOM keyword; a value as text (PN as
    its DICOM string), IS as a number, DS as a number; an attribute that may hold several
    values (ModalitiesInStudy) as a list; empty as null (or [])."""
    out: dict[str, Any] = {}
    for element in ds:
        keyword = element.keyword
        if not keyword or keyword in _NOT_KEYS or element.VR == "SQ":
            continue
        out[keyword] = _value(element)
    return out


def _value(element: DataElement) -> Any:
    raw = element.value
    values = list(raw) if isinstance(raw, MultiValue | list | tuple) else ([] if raw in (None, "", b"") else [raw])
    converted = [_scalar(v, element.VR) for v in values]
    try:
        multiple = dictionary_VM(element.tag) != "1"
    except KeyError:
        multiple = False
    if multiple or len(converted) > 1:
        return converted
    return converted[0] if converted else None


def _scalar(value: Any, vr: str) -> Any:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if vr == "IS":
        try:
            return int(str(value).strip())
        except ValueError:
            return str(value).strip()
    if vr == "DS":
        try:
            return float(str(value).strip())
        except ValueError:
            return str(value).strip()
    if isinstance(value, int | float):
        return value
    return str(value).strip()


