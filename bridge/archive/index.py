"""The local archive's index: patient, study, series and instance keys in SQLite.

The files themselves live under ``<archive>/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm``
(original Part-10 files). The index is what the ``local`` source answers C-FIND and
C-MOVE from. Text values are stored decoded (Specific Character Set applied), as intake
read them into ``SpooledInstance.attributes``.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bridge.model import SpooledInstance

_SCHEMA = """
CREATE TABLE IF NOT EXISTS patients (
    patient_key   TEXT PRIMARY KEY,      -- PatientID + '\\' + IssuerOfPatientID
    patient_id    TEXT NOT NULL,
    issuer        TEXT NOT NULL,
    patient_name  TEXT NOT NULL,
    birth_date    TEXT NOT NULL,
    sex           TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS studies (
    study_uid     TEXT PRIMARY KEY,
    patient_key   TEXT NOT NULL,
    study_date    TEXT NOT NULL,
    study_time    TEXT NOT NULL,
    accession     TEXT NOT NULL,
    study_id      TEXT NOT NULL,
    description   TEXT NOT NULL,
    referring     TEXT NOT NULL,
    updated_at    REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS studies_patient ON studies (patient_key);
CREATE INDEX IF NOT EXISTS studies_accession ON studies (accession);
CREATE TABLE IF NOT EXISTS series (
    series_uid    TEXT PRIMARY KEY,
    study_uid     TEXT NOT NULL,
    modality      TEXT NOT NULL,
    series_number TEXT NOT NULL,
    description   TEXT NOT NULL,
    body_part     TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS series_study ON series (study_uid);
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    series_uid       TEXT NOT NULL,
    sop_class_uid    TEXT NOT NULL,
    instance_number  TEXT NOT NULL,
    transfer_syntax  TEXT NOT NULL,
    path             TEXT NOT NULL,
    size             INTEGER NOT NULL,
    sha256           TEXT NOT NULL,
    stored_at        REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_series ON instances (series_uid);
"""


class ArchiveIndex:
    def __init__(self, path: Path) -> None:
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except BaseException:
            self._db.close()  # e.g. a full disk: the destination opens it again later
            raise

    def close(self) -> None:
        with self._lock:
            self._db.close()

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
        self._db.execute(
            "INSERT OR REPLACE INTO patients VALUES (?, ?, ?, ?, ?, ?)",
            (patient_key, patient_id, issuer, a.get("PatientName", ""), a.get("PatientBirthDate", ""),
             a.get("PatientSex", "")),
        )
        self._db.execute(
            "INSERT OR REPLACE INTO studies VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (i.study_uid, patient_key, a.get("StudyDate", ""), a.get("StudyTime", ""),
             a.get("AccessionNumber", ""), a.get("StudyID", ""), a.get("StudyDescription", ""),
             a.get("ReferringPhysicianName", ""), now),
        )
        self._db.execute(
            "INSERT OR REPLACE INTO series VALUES (?, ?, ?, ?, ?, ?)",
            (i.series_uid, i.study_uid, a.get("Modality", ""), a.get("SeriesNumber", ""),
             a.get("SeriesDescription", ""), a.get("BodyPartExamined", "")),
        )
        self._db.execute(
            "INSERT OR REPLACE INTO instances VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (i.sop_instance_uid, i.series_uid, i.sop_class_uid, a.get("InstanceNumber", ""),
             i.transfer_syntax, str(path), i.size, i.sha256, now),
        )

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
