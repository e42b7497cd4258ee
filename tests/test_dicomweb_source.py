"""The QIDO-RS source (bridge/sources/dicomweb.py, bridge/sources/qido.py): a C-FIND's
Query as QIDO-RS searches, against Orthanc with its DICOMweb plugin for what a server
answers, and against a small recording HTTP server (tests/fakestow.py) for what is sent
(limit and offset, fuzzymatching, includefield) and for the answers Orthanc cannot give.

What the C-FIND service sees of a source is checked the way it checks it: the records a
source gives that ``Query.matches`` keeps. A source may give more (a server may match
loosely), never fewer.
"""

from __future__ import annotations

import io
import json
import socket
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import numpy as np
import pydicom
import pytest
from corpus import write_ct
from fakestow import FakeStow, Request
from identifiers import query
from peers import Orthanc
from pydicom.data import get_charset_files
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from bridge.config import DicomwebSource as DicomwebConfig
from bridge.dataset.query import STUDY_ROOT_FIND, Query, parse
from bridge.errors import UpstreamMisconfigured, UpstreamUnavailable
from bridge.metrics import Metrics
from bridge.sources.dicomweb import DicomwebSource
from bridge.sources.qido import qido_searches


def source(url: str, name: str = "qido", metrics: Metrics | None = None, **settings: Any) -> DicomwebSource:
    return DicomwebSource(name, DicomwebConfig.model_validate({"type": "dicomweb", "url": url, **settings}),
                          metrics or Metrics(), Path(tempfile.gettempdir()))


def upstream_errors(metrics: Metrics, name: str, operation: str = "qido") -> float | None:
    return metrics.registry.get_sample_value("dicom_bridge_upstream_errors_total",
                                             {"source": name, "operation": operation})


def records(found: Iterator[Dataset | None]) -> list[Dataset]:
    """A source's records, without the Nones by which it says it is at work."""
    return [r for r in found if r is not None]


def matches(found: Iterator[Dataset | None], q: Query) -> list[Dataset]:
    """What the C-FIND service keeps of a source's records."""
    return [r for r in records(found) if q.matches(r)[0]]


def uids(records: list[Dataset], keyword: str = "StudyInstanceUID") -> list[str]:
    return [str(r[keyword].value) for r in records]


def params(request: Request) -> list[tuple[str, str]]:
    return parse_qsl(urlsplit(request.path).query, keep_blank_values=True)


# -- the searches a query becomes ------------------------------------------------------------


def search_of(q: Query) -> tuple[str, list[tuple[str, str]]]:
    (only,) = qido_searches(q)
    return only.path, parse_qsl(only.query_string(100, 0))


def test_each_kind_of_matching_key_as_query_parameters() -> None:
    path, sent = search_of(query(
        "STUDY", fuzzy=True, PatientID="12345", PatientName="SM?TH*", StudyDate="20240101-20241231",
        StudyTime="-1030", StudyInstanceUID=["1.2.3", "1.2.4"], AccessionNumber="", StudyDescription="",
        ReferencedStudySequence=[], **{"StationName": ""}))
    assert path == "/studies"
    assert sorted(sent) == sorted([
        ("StudyInstanceUID", "1.2.3,1.2.4"), ("StudyDate", "20240101-20241231"), ("StudyTime", "-1030"),
        ("PatientName", "SM*TH*"),  # a '?' may be a letter of several bytes: sent as '*'
        ("PatientID", "12345"), ("includefield", "AccessionNumber"),
        ("includefield", "StationName"), ("includefield", "StudyDescription"),
        ("includefield", "ReferencedStudySequence"), ("fuzzymatching", "true"), ("limit", "100"), ("offset", "0")])


def test_a_private_or_unknown_attribute_is_named_by_its_tag() -> None:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.add_new(0x00091001, "LO", "X")
    ds.add_new(0x00091002, "LO", "")
    (search,) = qido_searches(parse(ds, STUDY_ROOT_FIND))
    assert search.params == (("00091001", "X"), ("includefield", "00091002"))


@pytest.mark.parametrize(("level", "keys", "path", "fixed"), [
    ("SERIES", {"StudyInstanceUID": "1.2.3", "Modality": "CT"}, "/studies/1.2.3/series", ["StudyInstanceUID"]),
    ("SERIES", {"StudyInstanceUID": ["1.2.3", "1.2.4"]}, "/series", []),
    ("SERIES", {"StudyInstanceUID": ""}, "/series", []),
    ("IMAGE", {"StudyInstanceUID": "1.2.3", "SeriesInstanceUID": "1.2.3.4"}, "/studies/1.2.3/series/1.2.3.4/instances",
     ["StudyInstanceUID", "SeriesInstanceUID"]),
    ("IMAGE", {"StudyInstanceUID": "1.2.3"}, "/studies/1.2.3/instances", ["StudyInstanceUID"]),
    ("IMAGE", {"SeriesInstanceUID": "1.2.3.4"}, "/instances", []),
    ("STUDY", {"StudyInstanceUID": "1.2.3"}, "/studies", []),
    ("PATIENT", {"PatientID": "P1"}, "/studies", []),
])
def test_the_resource_of_each_level(level: str, keys: dict[str, Any], path: str, fixed: list[str]) -> None:
    (search,) = qido_searches(query(level, root="patient", **keys))
    assert search.path == path
    assert [keyword for keyword, _ in search.fixed] == fixed
    sent = {name for name, _ in search.params}
    assert not sent & set(fixed)  # what the path names is not asked again


def test_patient_root_asks_for_the_patient_id_and_patients_for_what_folding_needs() -> None:
    (series,) = qido_searches(query("SERIES", root="patient", StudyInstanceUID="1.2.3"))
    assert ("includefield", "PatientID") in series.params
    (patients,) = qido_searches(query("PATIENT", root="patient", PatientName="DOE*", NumberOfPatientRelatedStudies="",
                                      NumberOfPatientRelatedInstances=""))
    assert patients.params == (("PatientName", "DOE*"), ("includefield", "IssuerOfPatientID"),
                               ("includefield", "NumberOfStudyRelatedInstances"))


def test_values_a_server_might_not_decode_are_widened_never_narrowed() -> None:
    _, sent = search_of(query("STUDY", PatientName="Müller^Jürgen", StudyDescription="Head and Neck",
                              AccessionNumber="A+1", ReferringPhysicianName="Yamada^Tarou=山田^太郎"))
    assert dict(sent)["PatientName"] == "M*ller?J*rgen"
    assert dict(sent)["StudyDescription"] == "Head?and?Neck"
    assert dict(sent)["AccessionNumber"] == "A?1"
    assert dict(sent)["ReferringPhysicianName"] == "Yamada?Tarou*"
    # a '?' may stand for a letter of several bytes in UTF-8: Orthanc matches it to one byte
    _, sent = search_of(query("STUDY", PatientName="R?diger", StudyDescription="J?rg?n*"))
    assert (dict(sent)["PatientName"], dict(sent)["StudyDescription"]) == ("R*diger", "J*rg*n*")
    # Keys that cannot be sent without narrowing: asked for, and checked by the service.
    _, sent = search_of(query("STUDY", StudyDescription="a,b", PatientName="Διονυσιος", PatientID="*",
                              StudyDate="-", AcquisitionDateTime="20240101120000+0100"))
    assert sorted(sent) == sorted([
        ("includefield", "StudyDate"), ("includefield", "AcquisitionDateTime"), ("includefield", "StudyDescription"),
        ("includefield", "PatientName"), ("includefield", "PatientID"), ("limit", "100"), ("offset", "0")])


def test_lists_other_than_uids_are_one_search_per_value() -> None:
    searches = qido_searches(query("STUDY", ModalitiesInStudy=["CT", "MR"], PatientID=["P1", "P2"], StudyDate="2024"))
    assert sorted((dict(s.params)["ModalitiesInStudy"], dict(s.params)["PatientID"]) for s in searches) == [
        ("CT", "P1"), ("CT", "P2"), ("MR", "P1"), ("MR", "P2")]
    assert all(dict(s.params)["StudyDate"] == "2024" for s in searches)
    # Too many searches (16 x 10): the longest list is left to the service.
    searches = qido_searches(query("STUDY", PatientID=[f"P{i}" for i in range(16)], AccessionNumber=[
        f"A{i}" for i in range(10)]))
    assert len(searches) == 10 and all("PatientID" not in dict(s.params) for s in searches)
    assert ("includefield", "PatientID") in searches[0].params


def test_long_uid_lists_are_cut_into_several_searches() -> None:
    wanted = [f"1.2.3.{i}" for i in range(120)]
    searches = qido_searches(query("STUDY", StudyInstanceUID=wanted))
    sent = [dict(s.params)["StudyInstanceUID"].split(",") for s in searches]
    assert [len(chunk) for chunk in sent] == [50, 50, 20]
    assert [uid for chunk in sent for uid in chunk] == wanted
    assert all(len(s.query_string(1000, 0)) < 4096 for s in searches)


# -- against Orthanc ---------------------------------------------------------------------------

# (PatientID, PatientName, StudyDate, Modality of the first series, AccessionNumber); each
# study has that series and an SR series, two instances each.
STUDIES = [
    ("P1", "Smith^John", "20240105", "CT", "A0"),
    ("P1", "Smith^John", "20240210", "MR", "A1"),
    ("P2", "Doe^Jane", "20230101", "CT", "A2"),
    ("P3", "Müller^Jürgen", "20241231", "US", "A3"),
    ("P2", "Doe^Jane", "20240601", "CT", "A4"),
]
# pydicom's files of names in other character sets; each becomes a study of its own.
CHARSET_FILES = ["chrFren", "chrGerm", "chrGreek", "chrRuss", "chrArab", "chrHbrw", "chrX1", "chrX2", "chrH31",
                 "chrI2", "chrKoreanMulti"]


class Pacs:
    """An Orthanc holding ``STUDIES`` and the charset files, with what it holds."""

    def __init__(self, orthanc: Orthanc) -> None:
        self.orthanc = orthanc
        self.url = orthanc.dicomweb
        self.studies: dict[str, tuple[str, str, str, str, str]] = {}  # by StudyInstanceUID
        self.series: dict[str, list[str]] = {}  # SeriesInstanceUIDs by study
        self.names: dict[str, str] = {}  # decoded PatientName by PatientID, of the charset files

    def post(self, ds: Dataset) -> None:
        data = io.BytesIO()
        ds.save_as(data, enforce_file_format=True)
        request = urllib.request.Request(self.orthanc.url + "/instances", data=data.getvalue(), method="POST")
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 200


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pacs]:
    workdir = tmp_path_factory.mktemp("qido")
    # Orthanc answers QIDO-RS in its DefaultEncoding: Latin-1 would drop Greek, Cyrillic, CJK...
    orthanc = Orthanc(workdir / "orthanc", extra={"DefaultEncoding": "Utf8"}).start()
    try:
        pacs = Pacs(orthanc)
        pixels = np.zeros((4, 4), dtype=np.uint16)
        for n, (patient_id, name, date, modality, accession) in enumerate(STUDIES):
            study = generate_uid()
            pacs.studies[study] = STUDIES[n]
            for s, series_modality in enumerate((modality, "SR")):
                series = generate_uid()
                pacs.series.setdefault(study, []).append(series)
                for i in range(2):
                    ds = pydicom.dcmread(write_ct(workdir / "ct.dcm", study, series, i + 1, pixels))
                    ds.SpecificCharacterSet = "ISO_IR 192"
                    ds.PatientID, ds.PatientName, ds.StudyDate = patient_id, name, date
                    ds.Modality, ds.AccessionNumber, ds.SeriesNumber = series_modality, accession, s + 1
                    ds.StudyDescription = f"study {n}"
                    pacs.post(ds)
        for name in CHARSET_FILES:
            ds = pydicom.dcmread(get_charset_files(f"{name}.dcm")[0])
            ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.PatientID = f"CS-{name}"
            pacs.names[ds.PatientID] = str(ds.PatientName)
            pacs.post(ds)
        yield pacs
    finally:
        orthanc.stop()


def test_study_level_single_wildcard_range_and_uid_list(pacs: Pacs) -> None:
    qido = source(pacs.url)
    by_accession = {v[4]: k for k, v in pacs.studies.items()}
    for q, expected in [
        (query("STUDY", PatientID="P1"), {"A0", "A1"}),
        (query("STUDY", PatientName="smith*"), {"A0", "A1"}),  # person names match regardless of case
        (query("STUDY", PatientName="D?e^J*"), {"A2", "A4"}),
        (query("STUDY", PatientName="Müller^Jürgen"), {"A3"}),
        (query("STUDY", StudyDate="20240101-20241231", PatientID="P*"), {"A0", "A1", "A3", "A4"}),
        (query("STUDY", StudyDate="-20231231", PatientID="P?"), {"A2"}),
        (query("STUDY", StudyInstanceUID=[by_accession["A2"], by_accession["A3"], "1.2.3"]), {"A2", "A3"}),
        (query("STUDY", ModalitiesInStudy=["MR", "US"]), {"A1", "A3"}),
        # Orthanc matches it regardless of case, and the check of answers does not narrow that
        (query("STUDY", AccessionNumber="a1"), {"A1"}),
    ]:
        found = matches(qido.find(q), q)
        assert sorted(uids(found)) == sorted(by_accession[a] for a in expected), q


def test_return_keys_come_back_with_their_values(pacs: Pacs) -> None:
    q = query("STUDY", PatientID="P3", StudyDescription="", NumberOfStudyRelatedInstances="", ModalitiesInStudy="",
              PatientName="")
    (study,) = records(source(pacs.url).find(q))
    assert study.StudyDescription == "study 3"
    assert int(study.NumberOfStudyRelatedInstances) == 4
    assert sorted(study.ModalitiesInStudy) == ["SR", "US"]
    assert str(study.PatientName) == "Müller^Jürgen"
    # What the service must not pass on is not there: the upstream's RetrieveURL, AE title, charset.
    assert "RetrieveURL" not in study and "RetrieveAETitle" not in study and "SpecificCharacterSet" not in study


def test_series_and_instances_nested_and_not(pacs: Pacs) -> None:
    qido = source(pacs.url)
    study = next(k for k, v in pacs.studies.items() if v[4] == "A3")
    q = query("SERIES", root="patient", StudyInstanceUID=study, Modality="", SeriesNumber="")
    found = matches(qido.find(q), q)
    assert sorted(uids(found, "SeriesInstanceUID")) == sorted(pacs.series[study])
    assert {str(r.StudyInstanceUID) for r in found} == {study} and {r.PatientID for r in found} == {"P3"}
    assert sorted(r.Modality for r in found) == ["SR", "US"]

    q = query("SERIES", Modality="CT")
    found = matches(qido.find(q), q)
    expected = [pacs.series[k][0] for k, v in pacs.studies.items() if v[3] == "CT"]
    assert sorted(uids(found, "SeriesInstanceUID")) == sorted(expected)
    assert all(r.StudyInstanceUID in pacs.studies for r in found)

    series = pacs.series[study][1]
    q = query("IMAGE", StudyInstanceUID=study, SeriesInstanceUID=series, SOPInstanceUID="", InstanceNumber="")
    found = matches(qido.find(q), q)
    assert sorted(int(r.InstanceNumber) for r in found) == [1, 2]
    assert {(str(r.StudyInstanceUID), str(r.SeriesInstanceUID)) for r in found} == {(study, series)}
    assert len(set(uids(found, "SOPInstanceUID"))) == 2

    q = query("IMAGE", StudyInstanceUID=study, SOPInstanceUID="")
    assert len(matches(qido.find(q), q)) == 4


def test_a_study_that_does_not_exist_has_no_series(pacs: Pacs) -> None:
    q = query("SERIES", StudyInstanceUID="1.2.3.4.5.6")
    assert records(source(pacs.url).find(q)) == []


def test_patients_folded_from_their_studies(pacs: Pacs) -> None:
    q = query("PATIENT", root="patient", PatientID="P?", PatientName="", NumberOfPatientRelatedStudies="",
              NumberOfPatientRelatedSeries="", NumberOfPatientRelatedInstances="")
    found = {r.PatientID: r for r in matches(source(pacs.url, page_size=2).find(q), q)}
    assert sorted(found) == ["P1", "P2", "P3"]
    assert str(found["P1"].PatientName) == "Smith^John"
    assert [int(found["P1"][k].value) for k in ("NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries",
                                                "NumberOfPatientRelatedInstances")] == [2, 4, 8]
    assert int(found["P3"].NumberOfPatientRelatedStudies) == 1
    assert "StudyInstanceUID" not in found["P1"]  # a patient, not its first study

    q = query("PATIENT", root="patient", PatientName="DOE^JANE")
    (patient,) = matches(source(pacs.url).find(q), q)
    assert patient.PatientID == "P2"


def test_names_in_other_character_sets_come_back_decoded(pacs: Pacs) -> None:
    qido = source(pacs.url)
    q = query("STUDY", PatientID="CS-*", PatientName="")
    found = {r.PatientID: str(r.PatientName) for r in records(qido.find(q))}
    assert found == pacs.names
    for patient_id, name in pacs.names.items():
        q = query("STUDY", PatientName=name)
        assert [r.PatientID for r in matches(qido.find(q), q)] == [patient_id], name


def test_pages_until_the_server_has_no_more(pacs: Pacs) -> None:
    q = query("STUDY", PatientID="P*")
    found = records(source(pacs.url, page_size=2).find(q))
    assert sorted(uids(found)) == sorted(pacs.studies)
    q = query("IMAGE", PatientID="P1", SOPInstanceUID="")
    found = records(source(pacs.url, page_size=3).find(q))
    assert len(found) == len(set(uids(found, "SOPInstanceUID"))) == 8


def test_several_queries_at_once_on_one_source(pacs: Pacs) -> None:
    qido = source(pacs.url, page_size=2)
    q = query("STUDY", PatientID="P*", PatientName="")
    results: list[list[str]] = []
    errors: list[BaseException] = []

    def ask() -> None:
        try:
            for _ in range(5):
                results.append(sorted(uids(records(qido.find(q)))))
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    qido.close()
    assert not errors
    assert results == [sorted(pacs.studies)] * 20


def test_locate_names_every_instance_with_its_sop_class(pacs: Pacs) -> None:
    study = next(k for k, v in pacs.studies.items() if v[4] == "A0")
    refs = list(source(pacs.url, page_size=3).locate(query("STUDY", StudyInstanceUID=study)))
    assert len(refs) == len({r.sop_instance_uid for r in refs}) == 4
    assert {r.study_uid for r in refs} == {study}
    assert {r.series_uid for r in refs} == set(pacs.series[study])
    assert {r.sop_class_uid for r in refs} == {"1.2.840.10008.5.1.4.1.1.2"}
    refs = list(source(pacs.url).locate(query("PATIENT", root="patient", PatientID="P1")))
    assert len(refs) == 8


def test_orthanc_down_fails_at_once(tmp_path: Path) -> None:
    orthanc = Orthanc(tmp_path / "orthanc")  # configured, never started: nothing listens
    metrics = Metrics()
    qido = source(orthanc.dicomweb, metrics=metrics)
    assert upstream_errors(metrics, "qido") == 0  # there from the start, for alerts on increase()
    started = time.monotonic()
    with pytest.raises(UpstreamUnavailable, match=r"^source qido: .*(refused|Connection)"):
        records(qido.find(query("STUDY")))
    assert time.monotonic() - started < 2
    assert upstream_errors(metrics, "qido") == 1
    assert upstream_errors(metrics, "qido", "wado") == 0


# -- against a recording server --------------------------------------------------------------


def study(n: int) -> dict[str, Any]:
    return {"0020000D": {"vr": "UI", "Value": [f"1.2.3.{n}"]}, "00100010": {"vr": "PN", "Value": [{"Alphabetic":
            f"Name^{n}"}]}, "00081190": {"vr": "UR", "Value": [f"http://elsewhere/studies/1.2.3.{n}"]}}


def paged(records: list[dict[str, Any]], headers: dict[str, str] | None = None,
          cap: int | None = None) -> Callable[[Request], tuple[int, dict[str, str], Any]]:
    """A QIDO-RS server holding ``records``: each page by limit and offset, at most ``cap``
    results per page (with the PS3.18 Warning when it keeps some back)."""
    def answer(request: Request) -> tuple[int, dict[str, str], Any]:
        asked = dict(params(request))
        offset, limit = int(asked.get("offset", 0)), int(asked.get("limit", len(records)))
        size = min(limit, cap or limit)
        page = records[offset:offset + size]
        extra = dict(headers or {})
        if cap is not None and limit > cap and offset + size < len(records):
            extra["Warning"] = ('299 qido: "The number of results exceeded the maximum supported by the server. '
                                'Additional results can be requested."')
        return 200, extra, page
    return answer


def pages(fake: FakeStow) -> list[tuple[str, str]]:
    return [(dict(params(r))["limit"], dict(params(r))["offset"]) for r in fake.requests]


def test_limit_and_offset_until_a_short_page_and_the_parameters_sent() -> None:
    with FakeStow() as fake:
        fake.answer = paged([study(n) for n in range(5)])
        q = query("STUDY", fuzzy=True, PatientName="SMITH*", StudyDescription="", AccessionNumber="")
        found = records(source(fake.url, page_size=2).find(q))
        assert uids(found) == [f"1.2.3.{n}" for n in range(5)]
        assert pages(fake) == [("2", "0"), ("2", "2"), ("2", "4")]
        assert all(r.path.startswith("/dicom-web/studies?") for r in fake.requests)
        assert all(r.headers["accept"].startswith("application/dicom+json") for r in fake.requests)
        sent = params(fake.requests[0])
        assert ("fuzzymatching", "true") in sent and ("PatientName", "SMITH*") in sent
        assert [v for k, v in sent if k == "includefield"] == ["AccessionNumber", "StudyDescription"]
        assert "RetrieveURL" not in found[0]

        fake.requests.clear()
        fake.answer = paged([study(n) for n in range(4)])  # a last page that is full: one more, empty
        assert len(records(source(fake.url, page_size=2).find(q))) == 4
        assert pages(fake) == [("2", "0"), ("2", "2"), ("2", "4")]


def test_a_server_that_caps_its_pages_and_says_so_is_asked_for_the_rest(caplog: pytest.LogCaptureFixture) -> None:
    with FakeStow() as fake:
        fake.answer = paged([study(n) for n in range(7)], cap=3)
        found = records(source(fake.url, page_size=10).find(query("STUDY")))
        assert uids(found) == [f"1.2.3.{n}" for n in range(7)]
        assert pages(fake) == [("10", "0"), ("10", "3"), ("10", "6")]
    assert "kept results back" in caplog.text


def test_pages_that_shift_give_each_study_once() -> None:
    studies = [study(n) for n in range(5)]
    with FakeStow() as fake:
        def shifting(request: Request) -> tuple[int, dict[str, str], Any]:
            if dict(params(request))["offset"] == "2":
                studies.insert(0, study(99))  # a study arrives between two pages
            return paged(studies)(request)
        fake.answer = shifting
        found = uids(records(source(fake.url, page_size=2).find(query("STUDY"))))
    assert len(found) == len(set(found))
    assert set(found) >= {f"1.2.3.{n}" for n in range(5)}


def test_searches_of_a_list_give_each_study_once_and_each_search_all_its_pages() -> None:
    with FakeStow() as fake:
        by_modality = {"CT": [study(n) for n in range(4)], "MR": [study(n) for n in range(5)]}
        fake.answer = lambda r: paged(by_modality[dict(params(r))["ModalitiesInStudy"]])(r)
        found = uids(records(source(fake.url, page_size=2).find(query("STUDY", ModalitiesInStudy=["CT", "MR"]))))
    assert sorted(found) == [f"1.2.3.{n}" for n in range(5)]  # MR's first pages hold nothing new: asked on


def test_a_server_that_ignores_offset_is_not_asked_forever(caplog: pytest.LogCaptureFixture) -> None:
    with FakeStow() as fake:
        fake.answer = lambda r: (200, {}, [study(0), study(1)])
        found = records(source(fake.url, page_size=2).find(query("STUDY")))
        assert uids(found) == ["1.2.3.0", "1.2.3.1"]
        assert len(fake.requests) == 2
        fake.answer = lambda r: (200, {}, [study(n) for n in range(5)])  # ignores limit: all at once
        assert len(records(source(fake.url, page_size=2).find(query("STUDY")))) == 5
        assert len(fake.requests) == 3
    assert "ignore offset" in caplog.text


def test_closing_the_generator_asks_for_no_further_page() -> None:
    with FakeStow() as fake:
        fake.answer = paged([study(n) for n in range(6)])
        found = source(fake.url, page_size=2).find(query("STUDY"))
        assert [next(found), next(found)] and len(fake.requests) == 1  # the first page, all given
        found.close()
        assert len(fake.requests) == 1
        # ... whereas going on asks for the next one
        going = source(fake.url, page_size=2).find(query("STUDY"))
        for _ in range(3):
            next(going)
        assert pages(fake)[1:] == [("2", "0"), ("2", "2")]


def test_204_and_empty_answers_are_no_more_results() -> None:
    with FakeStow() as fake:
        fake.answer = lambda r: (204, {}, b"")
        assert records(source(fake.url).find(query("STUDY"))) == []
        fake.answer = lambda r: (200, {}, b"")
        assert records(source(fake.url).find(query("STUDY"))) == []
        fake.answer = lambda r: (404, {"Content-Type": "application/json"}, {"Message": "Unknown study"})
        assert records(source(fake.url).find(query("SERIES", StudyInstanceUID="1.2.3"))) == []


@pytest.mark.parametrize(("status", "body", "error", "needle"), [
    (500, b"database is down", UpstreamUnavailable, "HTTP 500"),
    (503, b"", UpstreamUnavailable, "HTTP 503"),
    (400, b"cannot match on ModalitiesInStudy", UpstreamMisconfigured, "refused the query: HTTP 400"),
    (404, b"no such resource", UpstreamMisconfigured, "DICOMweb base URL"),
    (403, b"", UpstreamMisconfigured, "HTTP 403"),
    (200, b"<html>login</html>", UpstreamMisconfigured, "did not answer JSON"),
    (200, b'{"not": "a list"}', UpstreamMisconfigured, "not a list"),
    (200, b'[{"0020000D": {"vr": "UI", "Value": 7}}]', UpstreamMisconfigured, "not DICOM JSON"),
])
def test_failures_name_the_source_and_what_the_server_said(status: int, body: bytes, error: type[Exception],
                                                           needle: str) -> None:
    metrics = Metrics()
    with FakeStow() as fake:
        fake.answer = lambda r: (status, {"Content-Type": "text/plain"}, body)
        with pytest.raises(error) as raised:
            records(source(fake.url, name="pacs", metrics=metrics).find(query("STUDY")))
    assert upstream_errors(metrics, "pacs") == 1
    message = str(raised.value)
    assert message.startswith("source pacs: ") and needle in message
    if status == 400:
        assert "cannot match on ModalitiesInStudy" in message  # the server's reason, for the log


def test_a_server_that_never_answers_fails_within_find_timeout() -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # connections are accepted by the kernel, and never answered
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/dicom-web"
        started = time.monotonic()
        with pytest.raises(UpstreamUnavailable, match="^source silent: .*(timed out|Timeout)"):
            records(source(url, name="silent", find_timeout="1s").find(query("STUDY")))
        assert 0.9 < time.monotonic() - started < 2.5


def test_an_answer_that_trickles_fails_within_find_timeout() -> None:
    """Each read gets a byte in time; the whole answer does not come within find_timeout."""
    stop = threading.Event()
    listening = socket.create_server(("127.0.0.1", 0))
    port = listening.getsockname()[1]

    def trickle() -> None:
        with listening:
            listening.settimeout(5)
            connection, _ = listening.accept()
            with connection:
                connection.recv(65536)
                connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/dicom+json\r\n"
                                   b"Content-Length: 100000\r\n\r\n[")
                deadline = time.monotonic() + 10
                while not stop.wait(0.1) and time.monotonic() < deadline:
                    try:
                        connection.sendall(b" ")
                    except OSError:
                        return

    server = threading.Thread(target=trickle, daemon=True)
    server.start()
    started = time.monotonic()
    try:
        with pytest.raises(UpstreamUnavailable, match="find_timeout"):
            records(source(f"http://127.0.0.1:{port}/dicom-web", find_timeout="1s").find(query("STUDY")))
        assert time.monotonic() - started < 2
    finally:
        stop.set()
        server.join(10)


def test_each_request_is_timed_by_source_and_operation() -> None:
    with FakeStow() as fake:
        fake.answer = paged([study(n) for n in range(3)])
        metrics = Metrics()
        list(DicomwebSource("qido", DicomwebConfig(type="dicomweb", url=fake.url, page_size=2), metrics,
                                Path(tempfile.gettempdir())).find(
            query("STUDY")))
        count = metrics.registry.get_sample_value(
            "dicom_bridge_upstream_request_seconds_count", {"source": "qido", "operation": "qido"})
        assert count == 2


def test_json_results_keep_their_values_as_text() -> None:
    item = {"00100010": {"vr": "PN", "Value": [{"Alphabetic": "Wang^XiaoDong", "Ideographic": "王^小東"}]},
            "00080005": {"vr": "CS", "Value": ["ISO_IR 100"]}, "00201208": {"vr": "IS", "Value": [12]},
            "0020000D": {"vr": "UI", "Value": ["1.2.3"]}, "7FE00010": {"vr": "OW", "BulkDataURI": "http://x/1"}}
    with FakeStow() as fake:
        fake.answer = lambda r: (200, {}, json.loads(json.dumps([item])))
        (found,) = records(source(fake.url).find(query("STUDY")))
    assert str(found.PatientName) == "Wang^XiaoDong=王^小東"
    assert int(found.NumberOfStudyRelatedInstances) == 12
    assert "SpecificCharacterSet" not in found and "PixelData" not in found
