"""The local archive's index: patient, study, series and instance keys in SQLite.

The files themselves live under ``<archive>/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm``
(original Part-10 files). The index is what the ``local`` source answers C-FIND and
C-MOVE from. Text values are stored decoded (pydicom applies Specific Character Set).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from bridge.dicomfile import text

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
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def add(self, entries: Sequence[tuple[Dataset, Path, int, str]]) -> None:
        """Index (header, file path, size, sha256) tuples in one transaction; newer replaces older."""
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for ds, path, size, sha256 in entries:
                    self._add(ds, path, size, sha256, now)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _add(self, ds: Dataset, path: Path, size: int, sha256: str, now: float) -> None:
        patient_id, issuer = text(ds, "PatientID"), text(ds, "IssuerOfPatientID")
        patient_key = f"{patient_id}\\{issuer}"
        self._db.execute(
            "INSERT OR REPLACE INTO patients VALUES (?, ?, ?, ?, ?, ?)",
            (patient_key, patient_id, issuer, text(ds, "PatientName"), text(ds, "PatientBirthDate"),
             text(ds, "PatientSex")),
        )
        self._db.execute(
            "INSERT OR REPLACE INTO studies VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (text(ds, "StudyInstanceUID"), patient_key, text(ds, "StudyDate"), text(ds, "StudyTime"),
             text(ds, "AccessionNumber"), text(ds, "StudyID"), text(ds, "StudyDescription"),
             text(ds, "ReferringPhysicianName"), now),
        )
        self._db.execute(
            "INSERT OR REPLACE INTO series VALUES (?, ?, ?, ?, ?, ?)",
            (text(ds, "SeriesInstanceUID"), text(ds, "StudyInstanceUID"), text(ds, "Modality"),
             text(ds, "SeriesNumber"), text(ds, "SeriesDescription"), text(ds, "BodyPartExamined")),
        )
        self._db.execute(
            "INSERT OR REPLACE INTO instances VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (text(ds, "SOPInstanceUID"), text(ds, "SeriesInstanceUID"), text(ds, "SOPClassUID"),
             text(ds, "InstanceNumber"), str(ds.file_meta.TransferSyntaxUID), str(path), size, sha256, now),
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
