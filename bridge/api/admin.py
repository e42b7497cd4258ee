"""The admin API under ``/api`` (bearer token): the queue, dead letters, destinations,
reload (docs/api.md, "Admin API").

What ``dicom-bridge queue`` does from another process, done in the daemon's: on its own
queue (thread-safe), its own spool, its delivery runners (a retried row is claimed at
once, a resumed destination tries at once), and its reload (the main loop's, as SIGHUP).
The rows and the purge are ``bridge.forward.admin``'s, the command's too. Changes are
logged with the token's name that asked for them."""

from __future__ import annotations

import logging
import time
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Path, Query

from bridge.api import admin_models as models
from bridge.api.deps import Caller, RuntimeDep, caller
from bridge.api.errors import ApiError, error_answers
from bridge.api.runtime import Runtime
from bridge.forward import admin
from bridge.forward.delivery import Delivery, DestinationRunner
from bridge.forward.queue import DEAD, STATES, Queue, RowFilter

LOGGER = logging.getLogger("bridge.api")

QUEUE_CLOSED = "the queue is not open: the daemon is starting or stopping"

router = APIRouter(
    prefix="/api", tags=["admin"], dependencies=[Depends(caller)],
    responses=error_answers({
        400: "the request is not valid: the message names the field",
        401: "no valid bearer token of http.token_file",
        403: "the API is off: no http.token_file",
        413: "the body is larger than 1 MiB",
        503: "the queue database cannot be used now, or the daemon is starting or stopping",
    }),
)


def _queue(runtime: Runtime) -> Queue:
    if runtime.queue is None:
        raise ApiError(503, QUEUE_CLOSED)
    return runtime.queue


def _delivery(runtime: Runtime) -> Delivery:
    if runtime.delivery is None:
        raise ApiError(503, QUEUE_CLOSED)
    return runtime.delivery


def _listing(runtime: Runtime, query: models.DeadLetterQuery, states: tuple[str, ...]) -> dict[str, Any]:
    queue = _queue(runtime)
    where = query.where(states)
    rows = queue.select(where, query.limit)
    counts = queue.count_matching(where)
    return admin.listing(rows, counts, queue.destination_states(), set(runtime.config.destinations))


# -- the queue -------------------------------------------------------------------------------


@router.get("/queue", summary="The queue per destination: rows by state, the destination's state, oldest row")
def queue_summary(runtime: RuntimeDep) -> models.QueueSummary:
    queue, delivery = _queue(runtime), _delivery(runtime)
    counts = queue.counts()
    oldest = queue.oldest_pending()
    known = set(runtime.config.destinations)
    now = time.time()
    destinations: dict[str, models.DestinationSummary] = {}
    for name in sorted(known | {d for d, _ in counts}):
        runner = delivery.runners.get(name)
        if name not in known:  # its rows stay, never dropped, until it is back or they are purged
            state, reason, until = "removed", "not in the configuration", 0.0
        elif runner is not None:
            state, reason, until = runner.status()
        else:  # a reload is adding it just now
            state, reason, until = "up", "", 0.0
        destinations[name] = models.DestinationSummary(
            in_config=name in known, state=state,
            reason=reason or None, until=admin.iso(until) if until else None,
            counts={s: counts.get((name, s), 0) for s in STATES},
            oldest_undelivered_seconds=round(now - oldest[name], 3) if name in oldest else None,
        )
    totals = {s: sum(n for (_, state), n in counts.items() if state == s) for s in STATES}
    return models.QueueSummary(destinations=destinations,
                               totals=models.Totals(counts=totals, rows=sum(totals.values())))


@router.get("/queue/rows", summary="Queue rows, oldest first, as `dicom-bridge queue list --json` shows them")
def queue_rows(runtime: RuntimeDep, query: Annotated[models.RowQuery, Query()]) -> models.Rows:
    return models.Rows.model_validate(_listing(runtime, query, (query.state,) if query.state else ()))


# -- dead letters ----------------------------------------------------------------------------


@router.get("/dead-letters", summary="Dead rows, oldest first: rows given up on, waiting for an administrator")
def dead_letters(runtime: RuntimeDep, query: Annotated[models.DeadLetterQuery, Query()]) -> models.Rows:
    return models.Rows.model_validate(_listing(runtime, query, (DEAD,)))


def _selected(selection: models.Selection, states: tuple[str, ...]) -> RowFilter:
    where = selection.where(states, selection.ids)
    if not (where.narrows() or selection.all):
        raise ApiError(400, 'say which rows (destination, study, accession, patient, older_than, ids), '
                            'or "all": true for every one')
    return where


@router.post("/dead-letters/retry", summary="Dead rows back to pending; their destinations try them at once")
def retry(runtime: RuntimeDep, who: Caller, selection: models.Selection) -> models.Retried:
    where = _selected(selection, ())
    queue, delivery = _queue(runtime), _delivery(runtime)
    retried = queue.retry(where)
    for name in retried:
        if runner := delivery.runners.get(name):
            runner.wake()
    total = sum(retried.values())
    if total:
        LOGGER.info("%d dead row(s) retried by %s: %s", total, who,
                    ", ".join(f"{d} {n}" for d, n in sorted(retried.items())))
    return models.Retried(retried=retried, total=total)


@router.post("/dead-letters/purge", summary="Delete dead rows, and the spool files no remaining row needs")
def purge(runtime: RuntimeDep, who: Caller, selection: models.Selection) -> models.Purged:
    where = _selected(selection, (DEAD,))
    purged = admin.purge(_queue(runtime), runtime.spool, where)
    by_destination = {d: n for (d, _), n in sorted(purged.rows.items())}
    total = sum(by_destination.values())
    if total:
        LOGGER.info("%d dead row(s) purged by %s (%d spool file(s) deleted): %s", total, who, purged.files,
                    ", ".join(f"{d} {n}" for d, n in by_destination.items()))
    return models.Purged(purged=by_destination, total=total, spool_files_deleted=purged.files)


# -- destinations ----------------------------------------------------------------------------


def _destination(runner: DestinationRunner) -> models.Destination:
    state, reason, until = runner.status()
    return models.Destination(type=str(getattr(runner.settings, "type", "?")), state=state,
                              reason=reason or None, until=admin.iso(until) if until else None,
                              workers=runner.settings.workers)


@router.get("/destinations", summary="Each destination's delivery state: up, backing off (until when), suspended")
def destinations(runtime: RuntimeDep) -> models.Destinations:
    runners = _delivery(runtime).runners
    return models.Destinations(destinations={name: _destination(runners[name]) for name in sorted(runners)})


@router.post("/destinations/{name}/resume", summary="A suspended or backing-off destination back up: it tries now",
             responses=error_answers({404: "no such destination in the configuration"}))
def resume(runtime: RuntimeDep, who: Caller,
           name: Annotated[str, Path(max_length=256, description="the destination's name")]) -> models.Resumed:
    runner = _delivery(runtime).runners.get(name)
    if runner is None:
        known = ", ".join(sorted(runtime.config.destinations)) or "none"
        raise ApiError(404, f"no destination {name!r} in the configuration (destinations: {known})")
    was = runner.status()[0]
    _queue(runtime).due_now(name)  # rows given back during a back-off would wait for its end
    LOGGER.info("destination %s: resume asked by %s through the API (was %s)", name, who, was)
    runner.resume()
    return models.Resumed(destination=name, was=was, state=runner.status()[0])


# -- reload ----------------------------------------------------------------------------------


@router.post("/reload", summary="Reload the configuration file, as SIGHUP does, and say how it went",
             responses=error_answers({
                 409: "the new configuration was refused (the message says why); the running one serves on",
                 504: "the reload has not ended in time; it goes on, and the log says how it ends",
             }))
def reload(runtime: RuntimeDep, who: Caller,
           request: Annotated[models.ReloadRequest | None, Body()] = None) -> models.Reloaded:
    timeout = (request or models.ReloadRequest()).timeout
    LOGGER.info("reload asked by %s through the API", who)
    try:
        refused = runtime.reload_and_wait(timeout)
    except TimeoutError:
        raise ApiError(504, f"the reload has not ended within {timeout:g}s; it goes on, and the daemon's log "
                            "says how it ends") from None
    if refused is not None:
        raise ApiError(409, refused)
    return models.Reloaded(reloaded=True)

