"""The queue as an administrator sees and repairs it, the same whether asked by
``dicom-bridge queue`` (another process) or by the daemon's admin API (docs/api.md):
rows as JSON, and purging rows with the spool files no remaining row needs."""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from bridge.forward.queue import CANCELLED, DEAD, DONE, PENDING, Queue, Row, RowFilter
from bridge.forward.spool import Spool

PURGED_BY_DEFAULT = (DONE, CANCELLED, DEAD)


def iso(timestamp: float | None) -> str | None:
    """A time of the queue (seconds since the epoch) in ISO 8601, UTC, to the second."""
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")


def row_json(row: Row, known: Collection[str], now: float) -> dict[str, Any]:
    """One queue row: whole UIDs, times in ISO 8601; ``in_config`` says whether its
    destination is in the configuration ``known`` names."""
    i = row.instance
    return {
        "id": row.id, "destination": row.destination, "in_config": row.destination in known, "state": row.state,
        "attempts": row.attempts, "priority": row.priority, "age_seconds": round(now - row.age_from, 3),
        "received_at": iso(row.received_at), "done_at": iso(row.done_at), "last_error": row.last_error,
        # a retried row is due from its retry on (its next attempt is 0: at once)
        "next_attempt_at": iso(max(row.next_attempt_at, row.age_from)) if row.state == PENDING else None,
        "study_uid": i.study_uid, "series_uid": i.series_uid, "sop_instance_uid": i.sop_instance_uid,
        "sop_class_uid": i.sop_class_uid, "patient_id": i.patient_id, "accession_number": i.accession_number,
        "calling_ae": i.calling_ae, "size": i.size,
    }


def listing(rows: list[Row], counts: dict[tuple[str, str], int], states: dict[str, dict[str, Any]],
            known: Collection[str]) -> dict[str, Any]:
    """Rows that a filter matched (``Queue.select``), with how many match in all, by
    destination and state (``Queue.count_matching``), and each destination's state as the
    queue holds it (``Queue.destination_states``)."""
    now = time.time()
    destinations: dict[str, Any] = {}
    for (name, state), n in sorted(counts.items()):
        entry = destinations.setdefault(name, {"in_config": name in known, "counts": {},
                                               "state": states.get(name, {}).get("state"),
                                               "reason": states.get(name, {}).get("reason")})
        entry["counts"][state] = n
    return {
        "matching": sum(counts.values()),
        "destinations": destinations,
        "rows": [row_json(r, known, now) for r in rows],
    }


@dataclass(frozen=True)
class Purged:
    rows: dict[tuple[str, str], int]  # rows deleted, by (destination, state)
    files: int  # spool files deleted


def purge(queue: Queue, spool: Spool, where: RowFilter) -> Purged:
    """Delete the rows ``where`` matches (``Queue.purge``: its states given, never rows in
    flight), then the spool files that no remaining row needs. A row naming a file outside
    ``spool`` (a moved ``data_dir``) never has it deleted."""
    purged, releasable = queue.purge(where)
    deleted = 0
    for path in releasable:
        if path.is_relative_to(spool.root) and path.exists():
            spool.discard(path)
            if not path.exists():
                deleted += 1
    return Purged(purged, deleted)
