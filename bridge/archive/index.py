"""The local archive's index: patient, study, series and instance keys in SQLite.

The files themselves live under ``<archive>/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm``
(original Part-10 files). The index is what the ``local`` source answers C-FIND and
C-MOVE from. Text values are stored decoded (Specific Character Set applied), as intake
read them into ``SpooledInstance.attributes``; an attribute an instance did not have is
stored empty.

The schema has a version (``PRAGMA user_version``). An index written by an older version
is brought to the current one in place when it is first opened, by the archive or by
the ``local`` source, whichever comes first: the columns added since are added, empty for
the instances archived before (their headers are not read again), and the indexes
created. Queries then answer what the index has.

Queries (``find``, ``locate``) are read a page at a time from one statement, in the
order of the level's unique key. A store is never kept waiting by a query, however slowly
its requester takes the pages: the index is in WAL mode, where a reader's snapshot does
not block the writer. The ``local`` source reads through a read-only connection of its
own for each query, so queries do not wait for each other either.
"""

from __future__ import annotations

import functools
import sqlite3
import threading
import time
from collections.abc import Collection, Generator, Iterable, Sequence
from pathlib import Path
from typing import Any

from bridge.archive.matching import COLUMNS, COMPUTED, FROM, IDENTIFYING, ORDER, Matching, above, fold, where
from bridge.model import SpooledInstance

SCHEMA_VERSION = 2
PAGE = 500  # records per query page

# Version 1 as the first archive wrote it (user_version 0). An index of any version
# becomes the current one by the same steps: these tables, the columns added since, the
# indexes.
_TABLES = (
    """CREATE TABLE IF NOT EXISTS patients (
    patient_key   TEXT PRIMARY KEY,      -- PatientID + '\\' + IssuerOfPatientID
    patient_id    TEXT NOT NULL,
    issuer        TEXT NOT NULL,
    patient_name  TEXT NOT NULL,
    birth_date    TEXT NOT NULL,
    sex           TEXT NOT NULL
)""",
    """CREATE TABLE IF NOT EXISTS studies (
    study_uid     TEXT PRIMARY KEY,
    patient_key   TEXT NOT NULL,
    study_date    TEXT NOT NULL,
    study_time    TEXT NOT NULL,
    accession     TEXT NOT NULL,
    study_id      TEXT NOT NULL,
    description   TEXT NOT NULL,
    referring     TEXT NOT NULL,
    updated_at    REAL NOT NULL
)""",
    """CREATE TABLE IF NOT EXISTS series (
    series_uid    TEXT PRIMARY KEY,
    study_uid     TEXT NOT NULL,
    modality      TEXT NOT NULL,
    series_number TEXT NOT NULL,
    description   TEXT NOT NULL,
    body_part     TEXT NOT NULL
)""",
    """CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    series_uid       TEXT NOT NULL,
    sop_class_uid    TEXT NOT NULL,
    instance_number  TEXT NOT NULL,
    transfer_syntax  TEXT NOT NULL,
    path             TEXT NOT NULL,
    size             INTEGER NOT NULL,
    sha256           TEXT NOT NULL,
    stored_at        REAL NOT NULL
)""",
)
# Text columns added since version 1 (each NOT NULL DEFAULT ''), by table.
_ADDED = {
    "patients": ("name_fold",),  # PatientName case-folded, for PN matching by an index
    "series": ("series_date", "series_time", "performed_date", "performed_time"),  # version 2
}
_INDEXES = (
    "CREATE INDEX IF NOT EXISTS studies_patient ON studies (patient_key)",
    "CREATE INDEX IF NOT EXISTS studies_accession ON studies (accession)",
    "CREATE INDEX IF NOT EXISTS series_study ON series (study_uid)",
    "CREATE INDEX IF NOT EXISTS instances_series ON instances (series_uid)",
    # version 2: what queries match most
    "CREATE INDEX IF NOT EXISTS patients_id ON patients (patient_id)",
    "CREATE INDEX IF NOT EXISTS patients_name ON patients (name_fold)",
    "CREATE INDEX IF NOT EXISTS studies_date ON studies (study_date)",
    "CREATE INDEX IF NOT EXISTS series_modality ON series (modality)",
)


def _upsert(table: str, columns: tuple[str, ...]) -> str:
    """Insert a row, or update the one of the same key (the first column) where a value
    differs: the instances of one series carry the same patient, study and series values,
    and rewriting those rows (and their indexes) for each of them would be most of what
    indexing an instance costs. ``updated_at`` changes only with the rest."""
    key, values = columns[0], columns[1:]
    compared = [c for c in values if c != "updated_at"]
    return (f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
            f" ON CONFLICT ({key}) DO UPDATE SET {', '.join(f'{c} = excluded.{c}' for c in values)}"
            f" WHERE ({', '.join(f'{table}.{c}' for c in compared)}) IS NOT"
            f" ({', '.join(f'excluded.{c}' for c in compared)})")


_UPSERT_PATIENT = _upsert("patients", ("patient_key", "patient_id", "issuer", "patient_name", "birth_date", "sex",
                                       "name_fold"))
_UPSERT_STUDY = _upsert("studies", ("study_uid", "patient_key", "study_date", "study_time", "accession", "study_id",
                                    "description", "referring", "updated_at"))
_UPSERT_SERIES = _upsert("series", ("series_uid", "study_uid", "modality", "series_number", "description",
                                    "body_part", "series_date", "series_time", "performed_date", "performed_time"))


class IndexTimeout(Exception):
    """A query page took longer than the index's ``timeout``."""


class ArchiveIndex:
    """The index at ``path``: read-write for the archive destination (created, or brought
    to the current version, on opening), or ``readonly`` for queries. ``timeout`` bounds
    each wait: for a lock another connection holds, and for each query page."""

    def __init__(self, path: Path, readonly: bool = False, timeout: float = 30.0) -> None:
        self.path = path
        self.timeout = timeout
        self._lock = threading.Lock()
        if readonly:
            self._db = self._connect(readonly=True)
            try:
                older = self._db.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION
            except BaseException:
                self._db.close()
                raise
            if older:  # the archive has not opened it since an upgrade: bring it up to date now
                self._db.close()
                ArchiveIndex(path, timeout=timeout).close()
                self._db = self._connect(readonly=True)
            return
        self._db = self._connect(readonly=False)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._upgrade()
        except BaseException:
            self._db.close()  # e.g. a full disk: the destination opens it again later
            raise

    def _connect(self, readonly: bool) -> sqlite3.Connection:
        if readonly:
            db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False,
                                 isolation_level=None, timeout=self.timeout)
        else:
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=self.timeout)
        db.row_factory = sqlite3.Row
        db.create_function("dicom_fold", 1, fold, deterministic=True)
        return db

    def _upgrade(self) -> None:
        """Create the schema, or bring an older one to ``SCHEMA_VERSION``, in one transaction
        (two processes opening it at once: the second finds it done)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version < SCHEMA_VERSION:
                for statement in _TABLES:
                    self._db.execute(statement)
                for table, columns in _ADDED.items():
                    present = {r["name"] for r in self._db.execute(f"PRAGMA table_info({table})")}
                    for column in columns:
                        if column not in present:
                            self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} TEXT NOT NULL DEFAULT ''")
                self._db.execute("UPDATE patients SET name_fold = dicom_fold(patient_name) WHERE name_fold = ''")
                # Version 1 left a series (study, patient) behind when every instance of it
                # was superseded by one filed elsewhere: it would be answered, with no instances.
                self._db.execute("DELETE FROM series WHERE NOT EXISTS"
                                 " (SELECT 1 FROM instances i WHERE i.series_uid = series.series_uid)")
                self._db.execute("DELETE FROM studies WHERE NOT EXISTS"
                                 " (SELECT 1 FROM series s WHERE s.study_uid = studies.study_uid)")
                self._db.execute("DELETE FROM patients WHERE NOT EXISTS"
                                 " (SELECT 1 FROM studies s WHERE s.patient_key = patients.patient_key)")
                for statement in _INDEXES:
                    self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- the archive ---------------------------------------------------------------------

    def add(self, entries: Sequence[tuple[SpooledInstance, Path]]) -> None:
        """Index (instance, archived file) pairs in one transaction; newer replaces older."""
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for instance, path in entries:
                    self._add(instance, path, now)
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # SQLite may have rolled it back itself (a full disk)
                    self._db.execute("ROLLBACK")
                raise

    def _add(self, i: SpooledInstance, path: Path, now: float) -> None:
        a = i.attributes
        patient_id, issuer = a.get("PatientID", ""), a.get("IssuerOfPatientID", "")
        patient_key = f"{patient_id}\\{issuer}"
        # Where the instance, its series and its study were filed until now: a new version
        # of an instance may move it to another series (study, patient).
        moved_from = self._db.execute(
            "SELECT (SELECT series_uid FROM instances WHERE sop_instance_uid = ?),"
            " (SELECT study_uid FROM series WHERE series_uid = ?),"
            " (SELECT patient_key FROM studies WHERE study_uid = ?)",
            (i.sop_instance_uid, i.series_uid, i.study_uid),
        ).fetchone()
        name = a.get("PatientName", "")
        self._db.execute(_UPSERT_PATIENT, (
            patient_key, patient_id, issuer, name, a.get("PatientBirthDate", ""), a.get("PatientSex", ""), fold(name)))
        self._db.execute(_UPSERT_STUDY, (
            i.study_uid, patient_key, a.get("StudyDate", ""), a.get("StudyTime", ""), a.get("AccessionNumber", ""),
            a.get("StudyID", ""), a.get("StudyDescription", ""), a.get("ReferringPhysicianName", ""), now))
        self._db.execute(_UPSERT_SERIES, (
            i.series_uid, i.study_uid, a.get("Modality", ""), a.get("SeriesNumber", ""),
            a.get("SeriesDescription", ""), a.get("BodyPartExamined", ""), a.get("SeriesDate", ""),
            a.get("SeriesTime", ""), a.get("PerformedProcedureStepStartDate", ""),
            a.get("PerformedProcedureStepStartTime", "")))
        self._db.execute(
            "INSERT OR REPLACE INTO instances (sop_instance_uid, series_uid, sop_class_uid, instance_number,"
            " transfer_syntax, path, size, sha256, stored_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (i.sop_instance_uid, i.series_uid, i.sop_class_uid, a.get("InstanceNumber", ""),
             i.transfer_syntax, str(path), i.size, i.sha256, now),
        )
        old_series, old_study, old_patient = moved_from
        if old_series not in (None, i.series_uid):
            self._prune(series_uid=old_series)
        if old_study not in (None, i.study_uid):
            self._prune(study_uid=old_study)
        if old_patient not in (None, patient_key):
            self._prune(patient_key=old_patient)

    def _prune(self, series_uid: str | None = None, study_uid: str | None = None,
               patient_key: str | None = None) -> None:
        """Remove what an instance moved away from left empty: a series without instances,
        then its study if that has no series left, then its patient if no studies."""
        if series_uid is not None:
            row = self._db.execute(
                "SELECT study_uid FROM series WHERE series_uid = ?"
                " AND NOT EXISTS (SELECT 1 FROM instances WHERE series_uid = ?)", (series_uid, series_uid)).fetchone()
            if row is not None:
                self._db.execute("DELETE FROM series WHERE series_uid = ?", (series_uid,))
                self._prune(study_uid=row[0])
        if study_uid is not None:
            row = self._db.execute(
                "SELECT patient_key FROM studies WHERE study_uid = ?"
                " AND NOT EXISTS (SELECT 1 FROM series WHERE study_uid = ?)", (study_uid, study_uid)).fetchone()
            if row is not None:
                self._db.execute("DELETE FROM studies WHERE study_uid = ?", (study_uid,))
                self._prune(patient_key=row[0])
        if patient_key is not None:
            self._db.execute("DELETE FROM patients WHERE patient_key = ?"
                             " AND NOT EXISTS (SELECT 1 FROM studies WHERE patient_key = ?)",
                             (patient_key, patient_key))

    def instance(self, sop_instance_uid: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,)
            ).fetchone()
        return dict(row) if row else None

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {
                table: self._db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                for table in ("patients", "studies", "series", "instances")
            }

    # -- queries -------------------------------------------------------------------------

    def find(self, level: str, keys: Iterable[Matching], names: Collection[str] | None = None,
             page: int = PAGE) -> Generator[list[dict[str, str | int | None]], None, None]:
        """The records at ``level`` (PATIENT, STUDY, SERIES, IMAGE) that ``keys`` match, a
        page at a time, in the order of the level's unique key. A record holds, by keyword,
        the attributes of ``names`` (every one, when None) that the index keeps or computes
        at its level and the levels above it, and the unique keys of those levels (with
        IssuerOfPatientID): empty text where the instances had none, None for
        ModalitiesInStudy of a study without a modality. Keys the index cannot match are
        not matched (``matching.where``).

        Raises ``sqlite3.Error`` when the index cannot be read, ``IndexTimeout`` when a
        page takes longer than ``timeout``."""
        def wanted(keyword: str, of: str) -> bool:
            return above(of, level) and (names is None or keyword in names or keyword in IDENTIFYING)

        columns = [f'{c.expr} AS "{keyword}"' for keyword, c in COLUMNS.items() if wanted(keyword, c.level)]
        columns += [f'({sql}) AS "{keyword}"' for keyword, (of, sql) in COMPUTED.items() if wanted(keyword, of)]
        clauses, params = where(level, keys)
        sql = (f"SELECT {', '.join(columns)} FROM {FROM[level]} WHERE {' AND '.join(clauses) or 'true'}"
               f" ORDER BY {ORDER[level]}")
        for rows in self._pages(sql, params, page):
            yield [dict(r) for r in rows]

    def locate(self, level: str, keys: Iterable[Matching],
               page: int = PAGE) -> Generator[list[tuple[str, str, str, str]], None, None]:
        """(Study, Series, SOP Instance, SOP Class UID) of every instance of the records at
        ``level`` that ``keys`` match (keys of that level and above), a page at a time,
        by study, series and SOP Instance UID. Raises as ``find``."""
        clauses, params = where(level, keys)
        sql = (f"SELECT st.study_uid, se.series_uid, i.sop_instance_uid, i.sop_class_uid FROM {FROM['IMAGE']}"
               f" WHERE {' AND '.join(clauses) or 'true'} ORDER BY st.study_uid, se.series_uid, i.sop_instance_uid")
        for rows in self._pages(sql, params, page):
            yield [(r[0], r[1], r[2], r[3]) for r in rows]

    def _pages(self, sql: str, params: Sequence[object], page: int) -> Generator[list[sqlite3.Row], None, None]:
        """The statement's rows, ``page`` at a time, holding the connection only while a page
        is read: a caller that takes its time between pages keeps nothing waiting (in WAL
        mode the statement's snapshot does not block the writer). Each page is given up
        after ``timeout``: SQLite calls the progress handler every few thousand steps, and
        a true answer interrupts the statement (the first page sorts every match)."""
        cursor: sqlite3.Cursor | None = None
        try:
            while True:
                deadline = time.monotonic() + self.timeout
                with self._lock:
                    self._db.set_progress_handler(functools.partial(_past, deadline), 10_000)
                    try:
                        if cursor is None:
                            cursor = self._db.execute(sql, params)
                        rows = cursor.fetchmany(page)
                    except sqlite3.OperationalError as exc:
                        if time.monotonic() > deadline:
                            raise IndexTimeout(f"no answer from the archive index within {self.timeout:g}s") from exc
                        raise
                    finally:
                        self._db.set_progress_handler(None, 0)
                if rows:
                    yield rows
                if len(rows) < page:
                    return
        finally:
            if cursor is not None:
                with self._lock:
                    cursor.close()


def _past(deadline: float) -> bool:
    return time.monotonic() > deadline
