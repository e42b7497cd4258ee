"""The delivery queue: one SQLite database (WAL), owned by the daemon's process.

A row is one instance bound for one destination. States: ``pending`` -> ``in_flight``
-> ``done`` | ``dead`` | back to ``pending`` (retry); ``cancelled`` when superseded.
Rows are claimed in priority order, then arrival order, and never overtake an
earlier row of the same SOP Instance UID for the same destination.
"""

from __future__ import annotations

import json
import random
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bridge.config import Modification, Retry
from bridge.model import Done, Duplicate, Outcome, Permanent, SpooledInstance, Transient, Warning

SCHEMA_VERSION = 4

_SCHEMA = """
CREATE TABLE IF NOT EXISTS queue (
    id               INTEGER PRIMARY KEY,
    spool_path       TEXT NOT NULL,
    destination      TEXT NOT NULL,
    state            TEXT NOT NULL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  REAL NOT NULL,
    last_error       TEXT,
    failure_status   INTEGER,                    -- a dead row's: the destination's status that failed it, if any
    priority         INTEGER NOT NULL DEFAULT 0,
    content_hash     TEXT NOT NULL,
    size             INTEGER NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    series_uid       TEXT NOT NULL,
    study_uid        TEXT NOT NULL,
    sop_class_uid    TEXT NOT NULL,
    transfer_syntax  TEXT NOT NULL,
    patient_id       TEXT NOT NULL DEFAULT '',
    accession_number TEXT NOT NULL DEFAULT '',
    calling_ae       TEXT NOT NULL DEFAULT '',
    called_ae        TEXT NOT NULL DEFAULT '',
    peer             TEXT NOT NULL DEFAULT '',
    attributes       TEXT NOT NULL DEFAULT '{}', -- JSON: SpooledInstance.attributes
    modify           TEXT,                       -- JSON: the rules' Modification for this destination
    received_at      REAL NOT NULL,
    retried_at       REAL,
    done_at          REAL
);
CREATE INDEX IF NOT EXISTS queue_claim ON queue (destination, state, priority DESC, id);
CREATE INDEX IF NOT EXISTS queue_uid ON queue (destination, sop_instance_uid, state);
CREATE INDEX IF NOT EXISTS queue_spool ON queue (spool_path);
CREATE INDEX IF NOT EXISTS queue_study ON queue (study_uid);
CREATE INDEX IF NOT EXISTS queue_accession ON queue (accession_number);
CREATE INDEX IF NOT EXISTS queue_patient ON queue (patient_id);
CREATE TABLE IF NOT EXISTS destination_state (
    name    TEXT PRIMARY KEY,
    state   TEXT NOT NULL,
    reason  TEXT,
    until   REAL,
    since   REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

PENDING, IN_FLIGHT, DONE, DEAD, CANCELLED = "pending", "in_flight", "done", "dead", "cancelled"
STATES = (PENDING, IN_FLIGHT, DONE, DEAD, CANCELLED)


@dataclass(frozen=True)
class Route:
    """One destination an instance is queued for, with that destination's policy."""

    destination: str
    priority: int = 0
    duplicates: str = "supersede"
    modify: Modification | None = None  # what the rules change in this destination's copy


@dataclass(frozen=True)
class Row:
    id: int
    destination: str
    state: str
    attempts: int
    next_attempt_at: float
    last_error: str | None
    priority: int
    received_at: float
    age_from: float  # received_at, or when an administrator last retried the row
    done_at: float | None
    instance: SpooledInstance


class Batch(list[Row]):
    """Rows ``Queue.claim`` took; when it took none because a batch that is not full is
    not yet due, ``waiting`` says how many rows wait and ``due_in`` in how many seconds
    they are due (both 0 otherwise)."""

    waiting: int = 0
    due_in: float = 0.0


@dataclass
class Enqueued:
    """What ``enqueue`` did: rows created, destinations skipped with the reason, and the
    spool files of superseded rows that no row needs any more (the caller recycles them
    once its own instance is durable)."""

    row_ids: list[int]
    skipped: dict[str, str]
    released: list[Path] = field(default_factory=list)


def backoff(attempts: int, retry: Retry) -> float:
    """Delay before attempt ``attempts + 1``: exponential from ``initial``, capped, with +-20% jitter."""
    delay = min(retry.max, retry.initial * (2 ** max(0, attempts - 1)))
    return delay * random.uniform(0.8, 1.2)


BUSY_TIMEOUT = 30.0  # seconds a statement waits for another connection's write lock


class Queue:
    def __init__(self, path: Path, busy_timeout: float = BUSY_TIMEOUT) -> None:
        """``busy_timeout``: how long a statement waits for the write lock another
        connection holds (``dicom-bridge queue``, a backup tool) before it fails with
        "database is locked": intake then answers 0xA700, a worker tries again later."""
        self.path = path
        self._busy_timeout = busy_timeout
        self._lock = threading.RLock()
        # Outcomes recorded so far, for those who wait for a delivery (``ack: delivered``).
        self._recorded = threading.Condition()
        self._generation = 0
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None,
                                   timeout=busy_timeout)
        self._db.row_factory = sqlite3.Row
        # WAL with synchronous=FULL: a commit is on disk when it returns, which is what
        # lets intake answer 0x0000 right after it.
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        columns = {r["name"] for r in self._db.execute("PRAGMA table_info(queue)")}
        if "attributes" not in columns:  # a queue written by schema version 1
            self._db.execute("ALTER TABLE queue ADD COLUMN attributes TEXT NOT NULL DEFAULT '{}'")
        if "modify" not in columns:  # versions 1 and 2
            self._db.execute("ALTER TABLE queue ADD COLUMN modify TEXT")
        if "failure_status" not in columns:  # versions 1 to 3
            self._db.execute("ALTER TABLE queue ADD COLUMN failure_status INTEGER")
        self._db.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
        )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- intake ------------------------------------------------------------------------

    def enqueue(self, instance: SpooledInstance, routes: Sequence[Route]) -> Enqueued:
        """Queue ``instance`` for each route in one transaction, applying its duplicates policy.

        The same SOP Instance UID with the same content as a pending, in-flight or done
        row is a harmless resend: no new row. New content: ``supersede`` cancels older
        pending rows and queues the new one; ``keep-first`` keeps what is there;
        ``keep-both`` queues it beside the old.
        """
        now = time.time()
        created: list[int] = []
        skipped: dict[str, str] = {}
        superseded: list[Path] = []
        with self._intake_lock(), self._transaction():
            for route in routes:
                existing = self._db.execute(
                    "SELECT id, state, content_hash FROM queue WHERE destination = ? AND sop_instance_uid = ?"
                    " AND state IN ('pending', 'in_flight', 'done') ORDER BY id",
                    (route.destination, instance.sop_instance_uid),
                ).fetchall()
                if any(r["content_hash"] == instance.sha256 for r in existing):
                    skipped[route.destination] = "same content already queued or delivered"
                    continue
                if existing and route.duplicates == "keep-first":
                    skipped[route.destination] = "different content for a known SOP Instance UID (keep-first)"
                    continue
                if existing and route.duplicates == "supersede":
                    superseded += [Path(r["spool_path"]) for r in self._db.execute(
                        "UPDATE queue SET state = 'cancelled', done_at = ?, last_error = 'superseded by newer content'"
                        " WHERE destination = ? AND sop_instance_uid = ? AND state = 'pending' RETURNING spool_path",
                        (now, route.destination, instance.sop_instance_uid),
                    )]
                created.append(self._insert(instance, route, now))
            released = self._releasable(superseded) if superseded else []
        return Enqueued(created, skipped, released)

    @contextmanager
    def _intake_lock(self) -> Iterator[None]:
        """The queue's lock, waited for no longer than the busy timeout: while SQLite's
        lock is held elsewhere, delivery workers wait for it in turn under this one, and
        intake must still answer (0xA700) within about twice the busy timeout."""
        if not self._lock.acquire(timeout=self._busy_timeout):
            raise sqlite3.OperationalError("database is locked (the queue's other users waited for it)")
        try:
            yield
        finally:
            self._lock.release()

    def _insert(self, i: SpooledInstance, route: Route, now: float) -> int:
        cursor = self._db.execute(
            "INSERT INTO queue (spool_path, destination, state, next_attempt_at, priority, content_hash, size,"
            " sop_instance_uid, series_uid, study_uid, sop_class_uid, transfer_syntax, patient_id,"
            " accession_number, calling_ae, called_ae, peer, attributes, modify, received_at)"
            " VALUES (?, ?, 'pending', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                str(i.spool_path), route.destination, now, route.priority, i.sha256, i.size,
                i.sop_instance_uid, i.series_uid, i.study_uid, i.sop_class_uid, i.transfer_syntax,
                i.patient_id, i.accession_number, i.calling_ae, i.called_ae, i.peer,
                _ATTRIBUTES_JSON.encode(i.attributes),
                route.modify.model_dump_json(by_alias=True) if route.modify else None, i.received_at.timestamp(),
            ),
        )
        return int(cursor.lastrowid or 0)

    # -- delivery ----------------------------------------------------------------------

    def recover(self) -> int:
        """Put rows left in flight by a previous run back to pending; returns how many."""
        with self._lock:
            return self._db.execute("UPDATE queue SET state = 'pending' WHERE state = 'in_flight'").rowcount

    def claim(self, destination: str, max_instances: int, max_bytes: int, partial_after: float = 0.0) -> Batch:
        """Take the next due rows of ``destination`` (at least one, however large).

        ``partial_after``: take a batch that is not full (fewer than ``max_instances``,
        and no more than ``max_bytes`` waiting) only once its first row has been due for
        that many seconds; take nothing before (the empty ``Batch`` says how long)."""
        now = time.time()
        # Not durable: a claim lost in a crash leaves its rows pending, which is what
        # ``recover`` makes of rows left in flight anyway; so no fsync per batch here
        # (each one was a journal commit that intake's fsyncs queued behind).
        with self._lock, self._transaction(durable=False):
            candidates = self._db.execute(
                "SELECT * FROM queue AS q WHERE destination = ? AND state = 'pending' AND next_attempt_at <= ?"
                " AND NOT EXISTS (SELECT 1 FROM queue AS e WHERE e.destination = q.destination"
                "   AND e.sop_instance_uid = q.sop_instance_uid AND e.id < q.id"
                "   AND e.state IN ('pending', 'in_flight'))"
                " ORDER BY priority DESC, id LIMIT ?",
                (destination, now, max_instances),
            ).fetchall()
            rows: list[sqlite3.Row] = []
            total = 0
            full = len(candidates) >= max_instances
            for r in candidates:
                if rows and total + r["size"] > max_bytes:
                    full = True
                    break
                rows.append(r)
                total += r["size"]
            if not full and rows and partial_after > 0 and now - rows[0]["next_attempt_at"] < partial_after:
                batch = Batch()
                batch.waiting, batch.due_in = len(rows), partial_after - (now - rows[0]["next_attempt_at"])
                return batch
            self._db.executemany("UPDATE queue SET state = 'in_flight' WHERE id = ?", [(r["id"],) for r in rows])
        return Batch(_row(r) for r in rows)

    def record(self, rows: Sequence[Row], outcomes: Sequence[Outcome], retry: Retry) -> list[Path]:
        """Record one outcome per claimed row; returns spool files no row needs any more."""
        now = time.time()
        with self._lock, self._transaction():
            for row, outcome in zip(rows, outcomes, strict=True):
                if isinstance(outcome, Done | Duplicate | Warning):
                    note = None if isinstance(outcome, Done) else outcome.reason
                    self._db.execute(
                        "UPDATE queue SET state = 'done', done_at = ?, attempts = attempts + 1, last_error = ?"
                        " WHERE id = ?",
                        (now, note, row.id),
                    )
                elif isinstance(outcome, Transient):
                    attempts = row.attempts + 1
                    if attempts >= retry.max_attempts:
                        self._dead(row.id, attempts, f"{outcome.reason} (after {attempts} attempts)", outcome.status,
                                   now)
                    elif now - row.age_from > retry.max_age:
                        self._dead(row.id, attempts, f"{outcome.reason} (expired: older than max_age)",
                                   outcome.status, now)
                    else:
                        delay = max(backoff(attempts, retry), outcome.retry_after or 0)
                        self._db.execute(
                            "UPDATE queue SET state = 'pending', attempts = ?, next_attempt_at = ?, last_error = ?"
                            " WHERE id = ?",
                            (attempts, now + delay, outcome.reason, row.id),
                        )
                elif isinstance(outcome, Permanent):
                    self._dead(row.id, row.attempts + 1, outcome.reason, outcome.status, now)
                else:
                    raise TypeError(f"not an Outcome: {outcome!r}")
            releasable = self._releasable([r.instance.spool_path for r in rows])
        with self._recorded:
            self._generation += 1
            self._recorded.notify_all()
        return releasable

    # -- waiting for a delivery (ack: delivered) -------------------------------------------

    def generation(self) -> int:
        """A counter that grows whenever outcomes are recorded."""
        with self._recorded:
            return self._generation

    def wait_recorded(self, since: int, timeout: float) -> None:
        """Block until outcomes are recorded after ``generation() == since``, or ``timeout``."""
        with self._recorded:
            self._recorded.wait_for(lambda: self._generation != since, max(0.0, timeout))

    def delivery_states(self, sop_instance_uid: str, content_hash: str,
                        destinations: Iterable[str]) -> dict[str, tuple[str, str | None, int | None]]:
        """Per destination, the state, last error and (dead) failure status of the newest row
        holding this content."""
        names = list(destinations)
        marks = ", ".join("?" * len(names))
        with self._lock:
            found = self._db.execute(
                "SELECT destination, state, last_error, failure_status FROM queue"
                " WHERE sop_instance_uid = ? AND content_hash = ?"
                f" AND destination IN ({marks}) ORDER BY id",
                (sop_instance_uid, content_hash, *names),
            ).fetchall()
        return {r["destination"]: (r["state"], r["last_error"], r["failure_status"]) for r in found}

    def _dead(self, row_id: int, attempts: int, reason: str, status: int | None, now: float) -> None:
        self._db.execute(
            "UPDATE queue SET state = 'dead', attempts = ?, last_error = ?, failure_status = ?, done_at = ?"
            " WHERE id = ?",
            (attempts, reason, status, now, row_id),
        )

    def cancel(self, row_ids: Sequence[int], reason: str) -> None:
        """Cancel rows just created, whose instance was not acknowledged after all."""
        with self._lock, self._transaction():
            self._db.executemany(
                "UPDATE queue SET state = 'cancelled', done_at = ?, last_error = ? WHERE id = ?",
                [(time.time(), reason, row_id) for row_id in row_ids],
            )

    def dead_without_file(self, spool_paths: Sequence[str], reason: str) -> int:
        """Pending rows of these (missing) spool files are dead, with ``reason``; returns
        how many. A dead row does not hold back a resend of the same content."""
        with self._lock, self._transaction():
            return sum(
                self._db.execute(
                    "UPDATE queue SET state = 'dead', done_at = ?, last_error = ?, failure_status = NULL"
                    " WHERE spool_path = ?"
                    " AND state = 'pending'", (time.time(), reason, path),
                ).rowcount
                for path in spool_paths
            )

    def release(self, rows: Sequence[Row], not_before: float, reason: str) -> None:
        """Give claimed rows back without charging them (the destination was unavailable)."""
        with self._lock, self._transaction():
            self._db.executemany(
                "UPDATE queue SET state = 'pending', next_attempt_at = ?, last_error = ? WHERE id = ?"
                " AND state = 'in_flight'",  # never a row already recorded (Delivery settles twice rather than never)
                [(not_before, reason, r.id) for r in rows],
            )

    def expire(self, retry_for: dict[str, Retry]) -> int:
        """Dead-letter pending rows older than their destination's ``max_age``."""
        now = time.time()
        count = 0
        with self._lock, self._transaction():
            for destination, retry in retry_for.items():
                count += self._db.execute(
                    "UPDATE queue SET state = 'dead', done_at = ?, failure_status = NULL,"
                    " last_error = 'expired: older than max_age' || coalesce(' (last error: ' || last_error || ')', '')"
                    " WHERE destination = ? AND state = 'pending' AND coalesce(retried_at, received_at) < ?",
                    (now, destination, now - retry.max_age),
                ).rowcount
        return count

    def purge_done(self, retention: float) -> list[Path]:
        """Delete done and cancelled rows older than ``retention``; returns releasable spool files."""
        cutoff = time.time() - retention
        with self._lock, self._transaction():
            paths = [
                Path(r[0])
                for r in self._db.execute(
                    "SELECT DISTINCT spool_path FROM queue WHERE state IN ('done', 'cancelled') AND done_at < ?",
                    (cutoff,),
                )
            ]
            self._db.execute("DELETE FROM queue WHERE state IN ('done', 'cancelled') AND done_at < ?", (cutoff,))
            return self._releasable(paths)

    def _releasable(self, paths: Iterable[Path]) -> list[Path]:
        """Of ``paths``, those that no pending, in-flight or dead row refers to."""
        free = []
        for path in set(paths):
            busy = self._db.execute(
                "SELECT 1 FROM queue WHERE spool_path = ? AND state IN ('pending', 'in_flight', 'dead') LIMIT 1",
                (str(path),),
            ).fetchone()
            if not busy:
                free.append(path)
        return free

    def needed_spool_paths(self) -> set[str]:
        with self._lock:
            return {
                r[0]
                for r in self._db.execute(
                    "SELECT DISTINCT spool_path FROM queue WHERE state IN ('pending', 'in_flight', 'dead')"
                )
            }

    # -- administration (CLI) ------------------------------------------------------------

    def retry_dead(self, ids: Sequence[int] | None = None, destination: str | None = None) -> int:
        """Dead rows back to pending with a clean slate; returns how many."""
        clauses: list[str] = ["state = 'dead'"]
        params: list[Any] = []
        if ids is not None:
            clauses.append(f"id IN ({','.join('?' * len(ids))})")
            params.extend(ids)
        if destination:
            clauses.append("destination = ?")
            params.append(destination)
        with self._lock:
            # retried_at restarts the max_age clock; arrival order (the id) is kept
            return self._db.execute(
                "UPDATE queue SET state = 'pending', attempts = 0, next_attempt_at = 0, done_at = NULL,"
                f" retried_at = ? WHERE {' AND '.join(clauses)}",
                [time.time(), *params],
            ).rowcount

    def rows(self, destination: str | None = None, state: str | None = None, limit: int = 1000,
             **filters: str) -> list[Row]:
        clauses: list[str] = ["1 = 1"]
        params: list[Any] = []
        if destination:
            clauses.append("destination = ?")
            params.append(destination)
        if state:
            clauses.append("state = ?")
            params.append(state)
        for column, value in filters.items():
            if column not in ("study_uid", "accession_number", "patient_id", "sop_instance_uid"):
                raise ValueError(f"cannot filter on {column}")
            clauses.append(f"{column} = ?")
            params.append(value)
        with self._lock:
            found = self._db.execute(
                f"SELECT * FROM queue WHERE {' AND '.join(clauses)} ORDER BY id LIMIT ?", [*params, limit]
            ).fetchall()
        return [_row(r) for r in found]

    def counts(self) -> dict[tuple[str, str], int]:
        """Rows by (destination, state)."""
        with self._lock:
            return {
                (r[0], r[1]): r[2]
                for r in self._db.execute("SELECT destination, state, count(*) FROM queue GROUP BY 1, 2")
            }

    def oldest_pending(self) -> dict[str, float]:
        """Arrival time of the oldest pending or in-flight row, by destination."""
        with self._lock:
            return {
                r[0]: r[1]
                for r in self._db.execute(
                    "SELECT destination, min(received_at) FROM queue WHERE state IN ('pending', 'in_flight')"
                    " GROUP BY 1"
                )
            }

    def set_destination_state(self, name: str, state: str, reason: str | None, until: float | None) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO destination_state (name, state, reason, until, since) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET state = excluded.state, reason = excluded.reason,"
                " until = excluded.until, since = CASE WHEN destination_state.state = excluded.state"
                " THEN destination_state.since ELSE excluded.since END",
                (name, state, reason, until, time.time()),
            )

    def destination_states(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {r["name"]: dict(r) for r in self._db.execute("SELECT * FROM destination_state")}

    # -- helpers -----------------------------------------------------------------------

    def _transaction(self, durable: bool = True) -> _Transaction:
        return _Transaction(self._db, durable)

    # -- administration from another process: `dicom-bridge queue` (docs/operations.md) --

    def select(self, where: RowFilter, limit: int) -> list[Row]:
        """The rows ``where`` matches, in arrival order, at most ``limit``."""
        sql, params = where.sql(time.time())
        with self._lock:
            found = self._db.execute(
                f"SELECT * FROM queue WHERE {sql} ORDER BY id LIMIT ?", [*params, limit]
            ).fetchall()
        return [_row(r) for r in found]

    def by_id(self, ids: Sequence[int]) -> list[Row]:
        """The rows of these ids that exist, in arrival order."""
        with self._lock:
            found = self._db.execute(
                f"SELECT * FROM queue WHERE id IN ({','.join('?' * len(ids))}) ORDER BY id", list(ids)
            ).fetchall()
        return [_row(r) for r in found]

    def count_matching(self, where: RowFilter) -> dict[tuple[str, str], int]:
        """The rows ``where`` matches, by (destination, state), however many ``select`` shows."""
        sql, params = where.sql(time.time())
        with self._lock:
            return {
                (r[0], r[1]): r[2]
                for r in self._db.execute(f"SELECT destination, state, count(*) FROM queue WHERE {sql} GROUP BY 1, 2",
                                          params)
            }

    def retry(self, where: RowFilter) -> dict[str, int]:
        """Dead rows that ``where`` matches back to pending with a clean slate, as ``retry_dead``
        does; in the same commit, a ``wake`` request for each of their destinations, so a
        running daemon looks at them at once. Returns how many, by destination."""
        now = time.time()
        sql, params = where.sql(now)
        with self._lock, self._transaction():
            retried = {
                r[0]: r[1]
                for r in self._db.execute(
                    f"SELECT destination, count(*) FROM queue WHERE state = 'dead' AND {sql} GROUP BY 1", params
                )
            }
            self._db.execute(
                "UPDATE queue SET state = 'pending', attempts = 0, next_attempt_at = 0, done_at = NULL,"
                f" retried_at = ? WHERE state = 'dead' AND {sql}",
                [now, *params],
            )
            for destination in retried:
                self._request(WAKE, destination, now)
        return retried

    def purge(self, where: RowFilter) -> tuple[dict[tuple[str, str], int], list[Path]]:
        """Delete the rows ``where`` matches; returns how many by (destination, state), and
        the spool files that no remaining row needs (a file may serve several destinations).

        ``where.states`` must be given and cannot include ``in_flight``: those rows belong
        to a worker that is sending them now.
        """
        if not where.states or IN_FLIGHT in where.states:
            raise ValueError("purge needs explicit states, and never takes rows in flight")
        sql, params = where.sql(time.time())
        with self._lock, self._transaction():
            purged = {
                (r[0], r[1]): r[2]
                for r in self._db.execute(f"SELECT destination, state, count(*) FROM queue WHERE {sql} GROUP BY 1, 2",
                                          params)
            }
            paths = [Path(r[0]) for r in self._db.execute(f"SELECT DISTINCT spool_path FROM queue WHERE {sql}", params)]
            self._db.execute(f"DELETE FROM queue WHERE {sql}", params)
            return purged, self._releasable(paths)

    def request(self, action: str, destination: str) -> None:
        """Ask the daemon to ``resume`` or ``wake`` a destination: a row in ``meta`` that
        the running daemon takes within a second (``take_requests``). One pending request
        per action and destination; asking again only refreshes it."""
        with self._lock:
            self._request(action, destination, time.time())

    def _request(self, action: str, destination: str, now: float) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (f"{_REQUEST}{action}.{destination}", repr(now))
        )

    def take_requests(self) -> list[tuple[str, str]]:
        """The requests made since the last call, as (action, destination), oldest first.

        Each is taken once: a request made again while this runs is kept for next time.
        The daemon calls this every second, so the common case (none) is one small read.
        """
        with self._lock:
            found = self._db.execute(
                "SELECT key, value FROM meta WHERE substr(key, 1, ?) = ? ORDER BY CAST(value AS REAL)",
                (len(_REQUEST), _REQUEST),
            ).fetchall()
            if not found:
                return []
            taken = []
            with self._transaction():
                for key, value in found:
                    if self._db.execute("DELETE FROM meta WHERE key = ? AND value = ?", (key, value)).rowcount:
                        action, _, destination = key[len(_REQUEST):].partition(".")
                        taken.append((action, destination))
            return taken

    def note_daemon(self, pid: int | None) -> None:
        """Record the process id of the daemon that owns this queue now (None: it stopped),
        so that ``dicom-bridge queue`` can tell whether a daemon will act on its requests."""
        with self._lock:
            if pid is None:
                self._db.execute("DELETE FROM meta WHERE key = 'daemon_pid'")
            else:
                self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('daemon_pid', ?)", (str(pid),))

    def daemon_pid(self) -> int | None:
        """The pid ``note_daemon`` recorded: a daemon killed with SIGKILL leaves its pid behind."""
        with self._lock:
            found = self._db.execute("SELECT value FROM meta WHERE key = 'daemon_pid'").fetchone()
        return int(found[0]) if found else None

    def due_now(self, destination: str) -> int:
        """Make every pending row of ``destination`` due now; returns how many waited.

        For a resumed or reconfigured destination: rows given back during a back-off wait
        for its end, and rows with a retry delay of their own would wait too, though the
        administrator has just said "try again now".
        """
        now = time.time()
        with self._lock:
            return self._db.execute(
                "UPDATE queue SET next_attempt_at = ? WHERE destination = ? AND state = 'pending'"
                " AND next_attempt_at > ?",
                (now, destination, now),
            ).rowcount


class _Transaction:
    """One write transaction. ``durable=False``: its commit does not wait for the disk
    (no fsync of the WAL); the next durable commit carries it to disk with its own, and
    a crash before that loses only this transaction."""

    def __init__(self, db: sqlite3.Connection, durable: bool = True) -> None:
        self._db = db
        self._durable = durable

    def __enter__(self) -> None:
        if not self._durable:
            self._db.execute("PRAGMA synchronous=OFF")
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except BaseException:
            # "database is locked", an I/O error: no __exit__ follows, so the connection
            # must be made durable again here, or every later commit (intake's, which
            # must reach the disk before its C-STORE response) would skip its fsync.
            self._durable_again()
            raise

    def __exit__(self, exc_type: object, *_: object) -> None:
        try:
            if exc_type:
                if self._db.in_transaction:  # SQLite rolls back by itself after some errors
                    self._db.execute("ROLLBACK")
            else:
                try:
                    self._db.execute("COMMIT")
                except BaseException:
                    # SQLITE_FULL, an I/O error: a transaction left open would make every
                    # later BEGIN fail ("cannot start a transaction within a transaction").
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    raise
        finally:
            self._durable_again()

    def _durable_again(self) -> None:
        if not self._durable:
            self._db.execute("PRAGMA synchronous=FULL")


# json.dumps with any non-default option builds a new encoder per call.
_ATTRIBUTES_JSON = json.JSONEncoder(ensure_ascii=False)


def _row(r: sqlite3.Row) -> Row:
    instance = SpooledInstance(
        spool_path=Path(r["spool_path"]),
        size=r["size"],
        sha256=r["content_hash"],
        sop_class_uid=r["sop_class_uid"],
        sop_instance_uid=r["sop_instance_uid"],
        study_uid=r["study_uid"],
        series_uid=r["series_uid"],
        transfer_syntax=r["transfer_syntax"],
        calling_ae=r["calling_ae"],
        called_ae=r["called_ae"],
        peer=r["peer"],
        received_at=datetime.fromtimestamp(r["received_at"], UTC),
        patient_id=r["patient_id"],
        accession_number=r["accession_number"],
        attributes=json.loads(r["attributes"] or "{}"),
        modify=Modification.model_validate_json(r["modify"]) if r["modify"] else None,
    )
    return Row(
        id=r["id"], destination=r["destination"], state=r["state"], attempts=r["attempts"],
        next_attempt_at=r["next_attempt_at"], last_error=r["last_error"], priority=r["priority"],
        received_at=r["received_at"], age_from=r["retried_at"] or r["received_at"], done_at=r["done_at"],
        instance=instance,
    )


# Requests to the running daemon (``Queue.request``) are ``meta`` rows keyed
# ``request.<action>.<destination>``; the value is when it was asked.
_REQUEST = "request."
RESUME, WAKE = "resume", "wake"


@dataclass(frozen=True)
class RowFilter:
    """Which rows an administrator means (``dicom-bridge queue``): every given field must match."""

    destination: str | None = None
    states: tuple[str, ...] = ()
    study_uid: str | None = None
    accession_number: str | None = None
    patient_id: str | None = None
    older_than: float | None = None  # seconds since arrival, or since the row was last retried
    ids: tuple[int, ...] | None = None  # these rows only

    def narrows(self) -> bool:
        """Whether anything but the state narrows the rows down (a guard against "all of them")."""
        fields = (self.destination, self.study_uid, self.accession_number, self.patient_id, self.older_than,
                  self.ids)
        return any(value is not None for value in fields)

    def sql(self, now: float) -> tuple[str, list[Any]]:
        """A WHERE clause and its parameters; ``older_than`` counts back from ``now``."""
        clauses: list[str] = ["1 = 1"]
        params: list[Any] = []
        for column in ("destination", "study_uid", "accession_number", "patient_id"):
            value = getattr(self, column)
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        if self.states:
            clauses.append(f"state IN ({','.join('?' * len(self.states))})")
            params.extend(self.states)
        if self.older_than is not None:
            clauses.append("coalesce(retried_at, received_at) < ?")
            params.append(now - self.older_than)
        if self.ids is not None:
            # one parameter however many ids: SQLite limits the parameters of a statement
            clauses.append("id IN (SELECT value FROM json_each(?))")
            params.append(json.dumps(list(self.ids)))
        return " AND ".join(clauses), params
