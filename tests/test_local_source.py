"""The ``local`` source: the archive's index answers C-FIND at every level, and locates
the instances a query names.

Files are archived the way the daemon archives them: each header read by intake's
reader into a ``SpooledInstance`` (as ``bridge.forward.ingest`` builds it), and sent to
the ``archive`` destination, which files it and indexes it. One test goes through the
daemon itself (``storescu``). Queries are identifiers read by ``bridge.dataset.query``,
as the C-FIND service reads them; every record the source answers is also checked
against the query as the service checks it.
"""

from __future__ import annotations

import sqlite3
import threading
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from corpus import with_uid, write_ct
from peers import storescu, wait_for
from pydicom import config
from pydicom.data import get_charset_files
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pydicom.valuerep import PersonName
from pynetdicom.dsutils import decode, encode

from bridge.archive.index import ArchiveIndex
from bridge.config import ArchiveDestination as ArchiveConfig
from bridge.dataset import dicomfile
from bridge.dataset.query import PATIENT_ROOT_FIND, STUDY_ROOT_FIND, Query, parse
from bridge.destinations.archive import ArchiveDestination
from bridge.errors import UpstreamUnavailable
from bridge.forward.spool import sha256_file
from bridge.metrics import Metrics
from bridge.model import Done, InstanceRef, SpooledInstance
from bridge.sources.local import LocalSource

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"


# -- archiving, as the daemon does ----------------------------------------------------------

def spooled(path: Path) -> SpooledInstance:
    """``path`` as intake makes it a SpooledInstance: its header read by intake's reader,
    the UIDs checked, the index keywords read from the same header."""
    header = dicomfile.read_header(path)
    sop_class, sop_instance, study, series = dicomfile.required_uids(header)
    attributes = dicomfile.attributes(header)
    return SpooledInstance(
        spool_path=path, size=path.stat().st_size, sha256=sha256_file(path), sop_class_uid=sop_class,
        sop_instance_uid=sop_instance, study_uid=study, series_uid=series,
        transfer_syntax=str(header.file_meta.TransferSyntaxUID), calling_ae="MODALITY", called_ae="BRIDGE",
        peer="127.0.0.1", received_at=datetime.now(UTC), patient_id=attributes.get("PatientID", ""),
        accession_number=attributes.get("AccessionNumber", ""), attributes=attributes,
    )


class Archive:
    """An ``archive`` destination in a test's folder, and instances written for it."""

    def __init__(self, work: Path, root: Path | None = None) -> None:
        root = root or work / "archive"
        self.incoming = work / "incoming"
        self.incoming.mkdir(parents=True, exist_ok=True)
        self.destination = ArchiveDestination("archive", ArchiveConfig(type="archive"), root)
        self.destination.open()
        self.index_path = root / "index.sqlite"
        self._base = write_ct(self.incoming / "base.dcm", generate_uid(), generate_uid(), 1,
                              np.zeros((4, 4), dtype=np.uint16))

    def file(self, source: Path | None = None, **values: str) -> Path:
        """A copy of ``source`` (a small CT) with fresh UIDs unless given, and ``values``."""
        values.setdefault("SOPInstanceUID", generate_uid())
        values.setdefault("StudyInstanceUID", generate_uid())
        values.setdefault("SeriesInstanceUID", generate_uid())
        return with_uid(source or self._base, self.incoming / f"{generate_uid()}.dcm", **values)

    def store(self, *files: Path) -> None:
        assert self.destination.send([spooled(f) for f in files]) == [Done()] * len(files)

    def close(self) -> None:
        self.destination.close()


@pytest.fixture
def archive(tmp_path: Path):
    a = Archive(tmp_path)
    yield a
    a.close()


@pytest.fixture
def source(archive: Archive) -> LocalSource:
    return LocalSource(archive.index_path, Metrics())


def query(level: str, root: str = "study", **keys: object) -> Query:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():  # ranges and wildcards are not values pydicom would validate
        ds.add(DataElement(keyword, dictionary_VR(keyword), value, validation_mode=config.IGNORE))
    return parse(ds, PATIENT_ROOT_FIND if root == "patient" else STUDY_ROOT_FIND)


def find(source: LocalSource, q: Query) -> list[Dataset]:
    """What the source answers, each record checked as the C-FIND service checks it: it
    matches, and it carries every matching key the index holds."""
    records = list(source.find(q))
    for record in records:
        assert q.matches(record) == (True, True), record
    return records


def uids(records: list[Dataset], keyword: str) -> set[str]:
    return {str(r[keyword].value) for r in records}


def values(record: Dataset, keyword: str) -> list[str]:
    """A multi-valued attribute's values (pydicom gives a single one as itself)."""
    value = record[keyword].value
    return [] if value is None else [str(value)] if isinstance(value, str) else [str(v) for v in value]


# -- levels ---------------------------------------------------------------------------------

def test_every_level_answers_its_records_with_the_unique_keys_above(archive: Archive, source: LocalSource) -> None:
    study, series = generate_uid(), generate_uid()
    files = [archive.file(PatientID="P1", PatientName="Doe^Jane", PatientBirthDate="19700101", PatientSex="F",
                          StudyInstanceUID=study, SeriesInstanceUID=series, StudyDate="20240105",
                          StudyTime="101500", AccessionNumber="A1", StudyDescription="CHEST", Modality="CT",
                          SeriesNumber="3", SeriesDate="20240105", SeriesTime="102000", InstanceNumber=str(n))
             for n in (1, 2)]
    archive.store(*files)

    [patient] = find(source, query("PATIENT", "patient", PatientID="", PatientName="", PatientBirthDate="",
                                   PatientSex=""))
    assert (patient.PatientID, patient.PatientName, patient.PatientBirthDate, patient.PatientSex) == \
        ("P1", "Doe^Jane", "19700101", "F")
    assert isinstance(patient.PatientName, PersonName)

    [record] = find(source, query("STUDY", StudyInstanceUID="", StudyDate="", StudyTime="", AccessionNumber="",
                                  StudyDescription=""))
    assert (record.StudyInstanceUID, record.StudyDate, record.StudyTime, record.AccessionNumber,
            record.StudyDescription, record.PatientID) == (study, "20240105", "101500", "A1", "CHEST", "P1")

    [record] = find(source, query("SERIES", StudyInstanceUID=study, SeriesInstanceUID="", Modality="",
                                  SeriesNumber="", SeriesDate="", SeriesTime=""))
    assert (record.SeriesInstanceUID, record.StudyInstanceUID, record.PatientID, record.Modality,
            record.SeriesNumber, record.SeriesDate, record.SeriesTime) == (series, study, "P1", "CT", 3,
                                                                           "20240105", "102000")

    images = find(source, query("IMAGE", StudyInstanceUID=study, SeriesInstanceUID=series, SOPInstanceUID="",
                                SOPClassUID="", InstanceNumber=""))
    assert {(r.SOPInstanceUID, r.SOPClassUID, r.InstanceNumber, r.SeriesInstanceUID, r.StudyInstanceUID)
            for r in images} == {(spooled(f).sop_instance_uid, CT, n, series, study) for n, f in enumerate(files, 1)}


def test_an_attribute_the_instances_did_not_have_is_an_empty_element(archive: Archive, source: LocalSource) -> None:
    archive.store(archive.file(PatientID="P1"))
    [record] = find(source, query("STUDY", StudyDescription="", ReferringPhysicianName=""))
    assert "StudyDescription" in record and record.StudyDescription in ("", None)
    # "*" matches an empty value: answered, and verified (0xFF00)
    assert len(find(source, query("STUDY", StudyDescription="*"))) == 1


def test_both_roots_answer_a_study_query_alike(archive: Archive, source: LocalSource) -> None:
    archive.store(archive.file(PatientID="P1", StudyDate="20240101"),
                  archive.file(PatientID="P2", StudyDate="20240101"))
    keys = {"PatientID": "P1", "StudyInstanceUID": "", "PatientName": ""}
    patient_root = find(source, query("STUDY", "patient", **keys))
    study_root = find(source, query("STUDY", "study", **keys))
    assert uids(patient_root, "StudyInstanceUID") == uids(study_root, "StudyInstanceUID")
    assert len(patient_root) == 1 and patient_root[0].PatientID == "P1"


def test_a_series_query_without_the_study_uid_is_answered_across_studies(archive: Archive,
                                                                          source: LocalSource) -> None:
    """Relational: upper-level keys constrain where given (a StudyDate range at SERIES
    level), and are not required."""
    archive.store(archive.file(StudyDate="20240101", Modality="CT"), archive.file(StudyDate="20240301", Modality="CT"),
                  archive.file(StudyDate="20240301", Modality="MR"))
    assert len(find(source, query("SERIES", Modality="CT"))) == 2
    assert len(find(source, query("SERIES", Modality="CT", StudyDate="20240201-"))) == 1
    assert len(find(source, query("IMAGE", StudyDate="20240301"))) == 2
    # not a key of the PATIENT level: not matched, the record answered as unverified (0xFF01)
    q = query("PATIENT", "patient", StudyDate="19990101")
    [record] = source.find(q)
    assert q.matches(record) == (True, False)


def test_patients_with_one_id_from_two_issuers_are_two_patients(archive: Archive, source: LocalSource) -> None:
    archive.store(archive.file(PatientID="7", IssuerOfPatientID="HOSP-A"),
                  archive.file(PatientID="7", IssuerOfPatientID="HOSP-B"))
    records = find(source, query("PATIENT", "patient", PatientID="7", IssuerOfPatientID=""))
    assert sorted(r.IssuerOfPatientID for r in records) == ["HOSP-A", "HOSP-B"]


# -- matching -------------------------------------------------------------------------------

@pytest.fixture
def varied(archive: Archive) -> Archive:
    people = [
        ("P1", "SMITH^JOHN", "20240105", "083000", "CT", "ACC-1"),
        ("P2", "Smith^Anna", "20240131", "235959", "MR", "acc-2"),
        ("P3", "Smyth^Bob", "20240201", "101530.5", "CT", "ACC-3"),
        ("P4", "Jones^Ann", "20231231", "103000", "US", "ACC-4"),
    ]
    archive.store(*(archive.file(PatientID=pid, PatientName=name, StudyDate=date, StudyTime=time, Modality=modality,
                                 AccessionNumber=accession)
                    for pid, name, date, time, modality, accession in people))
    return archive


@pytest.mark.parametrize(("keys", "expected"), [
    ({"PatientName": "smith^john"}, {"P1"}),  # PN: regardless of case
    ({"PatientName": "SMITH*"}, {"P1", "P2"}),
    ({"PatientName": "sm?th*"}, {"P1", "P2", "P3"}),
    ({"PatientName": "*ann*"}, {"P2", "P4"}),
    ({"PatientName": "*"}, {"P1", "P2", "P3", "P4"}),
    ({"AccessionNumber": "ACC-*"}, {"P1", "P3", "P4"}),  # other VRs: case-sensitive
    ({"AccessionNumber": "acc-2"}, {"P2"}),
    ({"StudyDate": "20240101-20240131"}, {"P1", "P2"}),
    ({"StudyDate": "20240131-"}, {"P2", "P3"}),
    ({"StudyDate": "-20231231"}, {"P4"}),
    ({"StudyTime": "1000-1030"}, {"P3", "P4"}),  # the upper bound a prefix: 10:30:00 is in
    ({"StudyTime": "-0830"}, {"P1"}),
    ({"StudyDate": "20240105\\20231231"}, {"P1", "P4"}),
    ({"PatientID": "P1\\P3\\P9"}, {"P1", "P3"}),
    ({"PatientName": "JONES*\\smith^anna"}, {"P2", "P4"}),
    ({"ModalitiesInStudy": "MR\\US"}, {"P2", "P4"}),
    ({"ModalitiesInStudy": "C?"}, {"P1", "P3"}),
    ({"ModalitiesInStudy": "CT", "StudyDate": "20240201"}, {"P3"}),
    ({"PatientID": "P1", "StudyDate": "20230101-20231231"}, set()),
])
def test_matching_kinds(varied: Archive, source: LocalSource, keys: dict[str, str], expected: set[str]) -> None:
    records = find(source, query("STUDY", **{"PatientID": "", "ModalitiesInStudy": "", **keys}))
    assert {r.PatientID for r in records} == expected


def test_the_index_matches_what_the_query_check_matches(varied: Archive, source: LocalSource) -> None:
    """Whatever the kind, SQL lets through exactly what the service's own check keeps."""
    everything = find(source, query("STUDY", PatientID="", PatientName="", StudyDate="", StudyTime="",
                                    AccessionNumber="", ModalitiesInStudy=""))
    for keys in ({"PatientName": "*a*"}, {"PatientName": "?MITH*"}, {"StudyTime": "08-10"},
                 {"AccessionNumber": "*-?"}, {"StudyDate": "2024-"}, {"PatientID": "P?"}):
        q = query("STUDY", **{"PatientID": "", "PatientName": "", "StudyDate": "", "StudyTime": "",
                              "AccessionNumber": "", "ModalitiesInStudy": "", **keys})
        expected = {r.PatientID for r in everything if q.matches(r)[0]}
        assert {r.PatientID for r in find(source, q)} == expected, keys


def test_sql_special_characters_in_values_are_literal(archive: Archive, source: LocalSource) -> None:
    archive.store(*(archive.file(PatientID=pid, PatientName=name) for pid, name in [
        ("100%", "O'Brien^Pat"), ("1000", "OXBrien^Pat"), ("A_1", "Box[1]^X"), ("AB1", "Box1^X"),
        ("x'; DROP TABLE patients; --", "Drop^Table"),
    ]))

    def ids(**keys: str) -> set[str]:
        return {r.PatientID for r in find(source, query("PATIENT", "patient", PatientID=keys.pop("PatientID", ""),
                                                        **keys))}

    assert ids(PatientID="100%") == {"100%"}
    assert ids(PatientID="10*") == {"100%", "1000"}
    assert ids(PatientID="A_1") == {"A_1"}
    assert ids(PatientID="A_*") == {"A_1"}
    assert ids(PatientName="o'brien^pat") == {"100%"}
    assert ids(PatientName="O'B*") == {"100%"}
    assert ids(PatientName="Box[1]*") == {"A_1"}
    assert ids(PatientID="x'; DROP TABLE patients; --") == {"x'; DROP TABLE patients; --"}
    assert len(ids()) == 5


@pytest.mark.parametrize(("name", "asked"), [
    ("chrFren.dcm", str.lower),  # ISO_IR 100
    ("chrGerm.dcm", lambda name: name.lower()[:4] + "*"),
    ("chrGreek.dcm", str.upper),  # ISO_IR 126
    ("chrRuss.dcm", str.lower),  # ISO_IR 144
    ("chrX1.dcm", str),  # ISO_IR 192
    ("chrX2.dcm", lambda name: "*" + name.split("=")[1]),  # GB18030
    ("chrH31.dcm", str.lower),  # ISO 2022 IR 87
])
def test_names_in_other_character_sets_are_matched_and_answered_decoded(archive: Archive, source: LocalSource,
                                                                         name: str, asked) -> None:
    [path] = get_charset_files(name)
    original = pydicom.dcmread(path)
    archive.store(archive.file(Path(path)), archive.file(PatientID="OTHER", PatientName="Other^Name"))
    # the identifier encoded in the file's own character set, as a requester sends it
    identifier = Dataset()
    identifier.SpecificCharacterSet = original.SpecificCharacterSet
    identifier.QueryRetrieveLevel = "PATIENT"
    identifier.PatientName = asked(str(original.PatientName))
    identifier.PatientID = ""
    encoded = encode(identifier, False, True)
    assert encoded is not None
    q = parse(decode(BytesIO(encoded), False, True), PATIENT_ROOT_FIND)
    [record] = find(source, q)
    assert str(record.PatientName) == str(original.PatientName)
    assert record.PatientID == original.PatientID


# -- computed attributes --------------------------------------------------------------------

COUNTS = dict(NumberOfPatientRelatedStudies="", NumberOfPatientRelatedSeries="",
              NumberOfPatientRelatedInstances="")


def test_counts_and_modalities_follow_a_series_added_later(archive: Archive, source: LocalSource) -> None:
    study = generate_uid()
    ct = generate_uid()
    archive.store(*(archive.file(PatientID="P1", StudyInstanceUID=study, SeriesInstanceUID=ct, Modality="CT")
                    for _ in range(3)))
    study_keys = dict(StudyInstanceUID=study, ModalitiesInStudy="", SOPClassesInStudy="",
                      NumberOfStudyRelatedSeries="", NumberOfStudyRelatedInstances="")
    [record] = find(source, query("STUDY", **study_keys))
    assert values(record, "ModalitiesInStudy") == ["CT"]
    assert (record.NumberOfStudyRelatedSeries, record.NumberOfStudyRelatedInstances) == (1, 3)
    assert find(source, query("STUDY", ModalitiesInStudy="MR")) == []

    mr = generate_uid()
    archive.store(*(archive.file(PatientID="P1", StudyInstanceUID=study, SeriesInstanceUID=mr, Modality="MR",
                                 SOPClassUID=MR) for _ in range(2)))
    archive.store(archive.file(PatientID="P1", Modality="MR"))  # the patient's second study

    [record] = find(source, query("STUDY", **study_keys))
    assert values(record, "ModalitiesInStudy") == ["CT", "MR"]
    assert values(record, "SOPClassesInStudy") == sorted([CT, MR])
    assert (record.NumberOfStudyRelatedSeries, record.NumberOfStudyRelatedInstances) == (2, 5)
    assert uids(find(source, query("STUDY", ModalitiesInStudy="MR")), "StudyInstanceUID") >= {study}
    series = find(source, query("SERIES", StudyInstanceUID=study, SeriesInstanceUID="",
                                NumberOfSeriesRelatedInstances=""))
    assert {(r.SeriesInstanceUID, r.NumberOfSeriesRelatedInstances) for r in series} == {(ct, 3), (mr, 2)}
    [patient] = find(source, query("PATIENT", "patient", PatientID="P1", **COUNTS))
    assert (patient.NumberOfPatientRelatedStudies, patient.NumberOfPatientRelatedSeries,
            patient.NumberOfPatientRelatedInstances) == (2, 3, 6)


def test_a_superseded_instance_is_counted_once(archive: Archive, source: LocalSource) -> None:
    study, series, other = generate_uid(), generate_uid(), generate_uid()
    first = archive.file(PatientID="P1", StudyInstanceUID=study, SeriesInstanceUID=series, Modality="CT")
    sop = spooled(first).sop_instance_uid
    archive.store(first, archive.file(PatientID="P1", StudyInstanceUID=study, SeriesInstanceUID=series))
    archive.store(archive.file(first, SOPInstanceUID=sop, StudyInstanceUID=study, SeriesInstanceUID=series))  # again
    [record] = find(source, query("STUDY", StudyInstanceUID=study, NumberOfStudyRelatedInstances=""))
    assert record.NumberOfStudyRelatedInstances == 2

    # A corrected version files it in another series, of another patient: the series it
    # leaves keeps one instance; a series, study or patient left empty is not answered.
    lone = archive.file(PatientID="P2")
    archive.store(lone)
    archive.store(archive.file(lone, SOPInstanceUID=spooled(lone).sop_instance_uid, PatientID="P1",
                               StudyInstanceUID=study, SeriesInstanceUID=other, Modality="MR"))
    archive.store(archive.file(first, SOPInstanceUID=sop, PatientID="P1", StudyInstanceUID=study,
                               SeriesInstanceUID=other, Modality="MR"))
    series_records = find(source, query("SERIES", StudyInstanceUID=study, NumberOfSeriesRelatedInstances=""))
    assert {(str(r.SeriesInstanceUID), r.NumberOfSeriesRelatedInstances) for r in series_records} == \
        {(series, 1), (other, 2)}
    [record] = find(source, query("STUDY", StudyInstanceUID=study, NumberOfStudyRelatedInstances="",
                                  ModalitiesInStudy=""))
    assert record.NumberOfStudyRelatedInstances == 3 and values(record, "ModalitiesInStudy") == ["CT", "MR"]
    assert {r.PatientID for r in find(source, query("PATIENT", "patient", PatientID=""))} == {"P1"}
    [patient] = find(source, query("PATIENT", "patient", PatientID="P1", **COUNTS))
    assert patient.NumberOfPatientRelatedInstances == 3


# -- locate ---------------------------------------------------------------------------------

def test_locate_names_every_instance_below_the_records_matched(archive: Archive, source: LocalSource) -> None:
    study, a, b = generate_uid(), generate_uid(), generate_uid()
    files = [archive.file(PatientID="P1", StudyInstanceUID=study, SeriesInstanceUID=a) for _ in range(2)]
    files += [archive.file(PatientID="P1", StudyInstanceUID=study, SeriesInstanceUID=b, SOPClassUID=MR)]
    files += [archive.file(PatientID="P2")]
    archive.store(*files)
    refs = [InstanceRef(s.study_uid, s.series_uid, s.sop_instance_uid, s.sop_class_uid)
            for s in map(spooled, files)]

    assert set(source.locate(query("PATIENT", "patient", PatientID="P1"))) == set(refs[:3])
    located = list(source.locate(query("STUDY", StudyInstanceUID=study)))
    assert set(located) == set(refs[:3]) and len(located) == 3
    assert [r.series_uid for r in located] == sorted(r.series_uid for r in located)  # by study, then series
    assert set(source.locate(query("SERIES", StudyInstanceUID=study, SeriesInstanceUID=f"{a}\\{b}"))) == \
        set(refs[:3])
    assert list(source.locate(query("SERIES", SeriesInstanceUID=b))) == [refs[2]]
    assert list(source.locate(query("IMAGE", SOPInstanceUID=refs[1].sop_instance_uid))) == [refs[1]]
    assert list(source.locate(query("IMAGE", SOPInstanceUID="1.2.3.4"))) == []


# -- retrieve -------------------------------------------------------------------------------

def test_retrieve_gives_the_archives_own_files(archive: Archive, source: LocalSource, tmp_path: Path) -> None:
    files = [archive.file(PatientID="P1") for _ in range(3)]
    archive.store(*files)
    refs = list(source.locate(query("PATIENT", "patient", PatientID="P1")))
    assert len(refs) == 3

    retrieved = list(source.retrieve(refs))
    assert [r.ref for r in retrieved] == refs
    for item in retrieved:
        assert item.failure == "" and item.temporary is False
        assert item.path is not None and item.path.is_relative_to(tmp_path / "archive")
        assert dicomfile.read_header(item.path).SOPInstanceUID == item.ref.sop_instance_uid
    assert all(item.path is not None and item.path.is_file() for item in retrieved)  # only read
    assert list(source.retrieve([])) == []


def test_retrieve_fails_an_instance_removed_from_the_index_since_it_was_located(archive: Archive,
                                                                                source: LocalSource) -> None:
    archive.store(*(archive.file(PatientID="P1") for _ in range(2)))
    kept, removed = list(source.locate(query("PATIENT", "patient", PatientID="P1")))
    db = sqlite3.connect(archive.index_path)
    try:
        with db:
            db.execute("DELETE FROM instances WHERE sop_instance_uid = ?", (removed.sop_instance_uid,))
    finally:
        db.close()

    first, second = source.retrieve([kept, removed])
    assert first.ref == kept and first.path is not None and first.failure == ""
    assert second.ref == removed and second.path is None
    assert "not in the archive" in second.failure


def test_retrieve_fails_an_instance_whose_file_is_gone_naming_it(archive: Archive, source: LocalSource) -> None:
    archive.store(*(archive.file(PatientID="P1") for _ in range(2)))
    refs = list(source.locate(query("PATIENT", "patient", PatientID="P1")))
    gone = next(iter(source.retrieve(refs[1:])))
    assert gone.path is not None
    gone.path.unlink()

    first, second = source.retrieve(refs)
    assert first.path is not None and first.failure == ""
    assert second.ref == refs[1] and second.path is None
    assert str(gone.path) in second.failure and "missing" in second.failure


def test_retrieve_without_an_index_fails_every_instance(tmp_path: Path) -> None:
    source = LocalSource(tmp_path / "archive" / "index.sqlite", Metrics())
    refs = [InstanceRef(generate_uid(), generate_uid(), generate_uid(), CT) for _ in range(2)]
    retrieved = list(source.retrieve(refs))
    assert [r.ref for r in retrieved] == refs
    assert all(r.path is None and r.failure for r in retrieved)
    assert not (tmp_path / "archive").exists()


def test_a_large_answer_comes_page_after_page(tmp_path: Path) -> None:
    """More records than one page (500): every one, once, in the level's order."""
    index_path = tmp_path / "index.sqlite"
    _fill(index_path, 1234)
    source = LocalSource(index_path, Metrics())
    records = list(source.find(query("STUDY", StudyInstanceUID="")))
    assert len({r.StudyInstanceUID for r in records}) == 1234
    assert [r.StudyInstanceUID for r in records] == sorted(r.StudyInstanceUID for r in records)
    assert len(list(source.locate(query("PATIENT", "patient", PatientID="*")))) == 1234


def _fill(index_path: Path, count: int) -> None:
    """``count`` one-instance studies indexed straight into the index (no files)."""
    index = ArchiveIndex(index_path)
    try:
        instances = []
        for n in range(count):
            attrs = {"PatientID": f"P{n % 50}", "PatientName": f"Name{n % 50}^X", "StudyDate": "20240101"}
            instances.append((SpooledInstance(
                spool_path=Path("x"), size=1, sha256="", sop_class_uid=CT, sop_instance_uid=generate_uid(),
                study_uid=generate_uid(), series_uid=generate_uid(), transfer_syntax="1.2.840.10008.1.2.1",
                calling_ae="A", called_ae="B", peer="p", received_at=datetime.now(UTC), attributes=attrs),
                Path(f"/archive/{n}.dcm")))
        index.add(instances)
    finally:
        index.close()


# -- the index and its versions -------------------------------------------------------------

# What version 1 of bridge/archive/index.py created (user_version 0), and how it added
# an instance.
V1_SCHEMA = """
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


def _v1_add(db: sqlite3.Connection, patient: tuple, study: tuple, series: tuple, instance: tuple) -> None:
    db.execute("INSERT OR REPLACE INTO patients VALUES (?, ?, ?, ?, ?, ?)", patient)
    db.execute("INSERT OR REPLACE INTO studies VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", study)
    db.execute("INSERT OR REPLACE INTO series VALUES (?, ?, ?, ?, ?, ?)", series)
    db.execute("INSERT OR REPLACE INTO instances VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", instance)


@pytest.mark.parametrize("first", ["local", "archive"])
def test_an_index_of_version_1_is_upgraded_and_answers_what_it_has(tmp_path: Path, first: str) -> None:
    """Opened first by the source (before the archive delivers again) or by the archive:
    the new columns empty for what was archived before, PN matching by case at once."""
    root = tmp_path / "archive"
    root.mkdir()
    index_path = root / "index.sqlite"
    db = sqlite3.connect(index_path)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(V1_SCHEMA)
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    _v1_add(db, ("OLD\\", "OLD", "", "Müller^Hans", "19600101", "M"),
            (study, "OLD\\", "20200101", "120000", "ACC", "1", "OLD STUDY", "", 0.0),
            (series, study, "CT", "1", "", ""),
            (sop, series, CT, "1", "1.2.840.10008.1.2.1", f"/a/{sop}.dcm", 10, "", 0.0))
    # version 1 left a series behind when its only instance was filed elsewhere
    _v1_add(db, ("GONE\\", "GONE", "", "Gone^Away", "", ""), ("9.9", "GONE\\", "", "", "", "", "", "", 0.0),
            ("9.9.1", "9.9", "MR", "", "", ""), ("9.9.1.1", "9.9.1", MR, "", "", "", 1, "", 0.0))
    db.execute("UPDATE instances SET series_uid = ? WHERE sop_instance_uid = '9.9.1.1'", (series,))
    db.commit()
    db.close()

    if first == "archive":
        archive = ArchiveDestination("archive", ArchiveConfig(type="archive"), root)
        archive.open()
        archive.close()
    source = LocalSource(index_path, Metrics())
    [record] = find(source, query("STUDY", PatientName="MÜLLER^HANS", StudyInstanceUID="", StudyDate="20200101",
                                  NumberOfStudyRelatedInstances=""))
    assert (record.StudyInstanceUID, record.PatientID, str(record.PatientName)) == (study, "OLD", "Müller^Hans")
    assert record.NumberOfStudyRelatedInstances == 2
    [old] = find(source, query("SERIES", SeriesInstanceUID="", SeriesDate=""))
    assert old.SeriesInstanceUID == series and old.SeriesDate in ("", None)
    assert find(source, query("SERIES", SeriesDate="20200101")) == []  # not known for what was archived before
    assert {r.PatientID for r in find(source, query("PATIENT", "patient", PatientID=""))} == {"OLD"}

    # the archive goes on adding to the upgraded index, and what it adds has the new keys
    archive = Archive(tmp_path, root)
    archive.store(archive.file(PatientID="NEW", SeriesDate="20250101", StudyInstanceUID=study))
    archive.close()
    assert {r.PatientID for r in find(source, query("SERIES", SeriesDate="2025-"))} == {"NEW"}
    db = sqlite3.connect(index_path)
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 2
    finally:
        db.close()


def test_no_index_yet_answers_no_matches(tmp_path: Path) -> None:
    source = LocalSource(tmp_path / "archive" / "index.sqlite", Metrics())
    assert list(source.find(query("STUDY", PatientID=""))) == []
    assert list(source.locate(query("STUDY", StudyInstanceUID="1.2.3"))) == []
    assert not (tmp_path / "archive").exists()


def test_an_index_that_cannot_be_read_is_unavailable(tmp_path: Path) -> None:
    index_path = tmp_path / "index.sqlite"
    index_path.write_bytes(b"this is not a database, " * 100)
    metrics = Metrics()
    source = LocalSource(index_path, metrics)
    with pytest.raises(UpstreamUnavailable, match="source local: .*not a database"):
        list(source.find(query("STUDY", PatientID="")))
    with pytest.raises(UpstreamUnavailable, match="source local"):
        list(source.locate(query("STUDY", StudyInstanceUID="1.2.3")))
    assert metrics.registry.get_sample_value("dicom_bridge_upstream_errors_total",
                                             {"source": "local", "operation": "index"}) == 2


def test_a_page_that_takes_longer_than_find_timeout_is_unavailable(tmp_path: Path) -> None:
    index_path = tmp_path / "index.sqlite"
    _fill(index_path, 2000)
    source = LocalSource(index_path, Metrics(), find_timeout=1e-6)
    with pytest.raises(UpstreamUnavailable, match="source local: no answer .* within"):
        list(source.find(query("STUDY", StudyInstanceUID="", **COUNTS)))


# -- concurrency, early close, metrics ------------------------------------------------------

def test_a_query_closed_early_or_left_waiting_keeps_no_store_waiting(archive: Archive) -> None:
    metrics = Metrics()
    source = LocalSource(archive.index_path, metrics)
    archive.store(*(archive.file(PatientID="P1") for _ in range(3)))
    _fill(archive.index_path, 1100)  # three pages
    waiting = source.find(query("STUDY", StudyInstanceUID=""))
    next(waiting)  # a requester that takes its time, in the middle of the first page
    closed = source.find(query("STUDY", StudyInstanceUID=""))
    next(closed)
    closed.close()  # C-CANCEL

    index = ArchiveIndex(archive.index_path, timeout=1.0)  # a writer that would wait at most 1 s
    try:
        late = archive.file(PatientID="LATE")
        index.add([(spooled(late), late)])
    finally:
        index.close()
    assert len(find(LocalSource(archive.index_path, Metrics()), query("STUDY", PatientID="LATE"))) == 1
    # the rest of it, as the index was when the query began
    assert 1 + sum(1 for _ in waiting) == 3 + 1100
    pages = metrics.registry.get_sample_value("dicom_bridge_upstream_request_seconds_count",
                                              {"source": "local", "operation": "index"})
    assert pages is not None and pages >= 4  # one per page read


def test_queries_from_several_threads_at_once(varied: Archive, source: LocalSource) -> None:
    results: dict[int, set[str]] = {}
    errors: list[BaseException] = []

    def ask(n: int) -> None:
        try:
            for _ in range(20):
                results[n] = {r.PatientID for r in source.find(query("STUDY", PatientName="SM*", PatientID=""))}
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and results == {n: {"P1", "P2", "P3"} for n in range(4)}


# -- through the daemon ---------------------------------------------------------------------

def test_files_stored_by_storescu_are_found(tmp_path: Path, bridge_factory) -> None:
    """The embedded default: every instance kept in the archive, whose index answers."""
    bridge = bridge_factory({})
    study, series = generate_uid(), generate_uid()
    archive = Archive(tmp_path)  # only to write the files
    archive.close()
    files = [archive.file(PatientID="P1", PatientName="Doe^John", StudyInstanceUID=study, SeriesInstanceUID=series,
                          SeriesDate="20240101", Modality="CT") for _ in range(3)]
    assert storescu(bridge.port, files).statuses == [0] * 3
    source = LocalSource(bridge.data_dir / "archive" / "index.sqlite", Metrics())
    q = query("SERIES", StudyInstanceUID=study, SeriesDate="20240101", NumberOfSeriesRelatedInstances="")
    wait_for(lambda: [r.NumberOfSeriesRelatedInstances for r in source.find(q)] == [3], 30,
             "the archive to index the three instances")
    [record] = find(source, query("STUDY", PatientName="doe^john", ModalitiesInStudy="CT"))
    assert record.StudyInstanceUID == study
    assert bridge.stop() == 0
