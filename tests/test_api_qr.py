"""The JSON query and retrieve API (``POST /api/query``, ``POST /api/retrieve``; docs/api.md)
against real peers (issue 20).

One Orthanc (its DICOMweb plugin on) holds the generated studies of ``findcorpus`` (four
patients, eight studies of several modalities and dates) and two of pydicom's character
set files; one daemon, its HTTP server on, reaches it through a ``dimse`` source
(``pacs``: C-FIND, and C-GET to retrieve) and a ``dicomweb`` source (``web``: QIDO-RS and
WADO-RS). Its nodes: a DCMTK ``storescp`` (``viewer``, AE title APISCP), a port where
nothing listens (``gone``), and Orthanc. Three more sources: ``lossy`` and ``slow``,
small DICOMweb servers (``retrievepeers.FakeDicomweb``), one losing an instance of what
it holds, one answering slowly; ``down``, a ``dimse`` source on the node ``gone``.

Queries are compared with what DCMTK ``findscu`` gets from Orthanc directly: the same
matches, with the same values; retrievals with what ``storescp`` received.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date
from email.message import Message
from typing import Any

import pytest
from findcorpus import ORTHANC_FIND, FindCorpus, find_corpus
from findscu import findscu, text
from peers import Bridge, Orthanc, free_port, storescu, wait_for
from pydicom.uid import generate_uid
from retrievepeers import FakeDicomweb, MoveDestination, Study, ct_instances, orthanc_settings

TOKEN = "api-qr-test-token-0123456789abcdef"
STUDY_KEYS = ["PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
              "StudyTime", "AccessionNumber", "StudyID", "StudyDescription", "ModalitiesInStudy",
              "ReferringPhysicianName", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"]
SERIES_KEYS = ["StudyInstanceUID", "SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription",
               "SeriesDate", "SeriesTime", "NumberOfSeriesRelatedInstances"]


@dataclass
class Daemon:
    bridge: Bridge
    url: str

    def call(self, path: str, body: Any, token: str | None = TOKEN,
             headers: dict[str, str] | None = None) -> tuple[int, Message, dict[str, Any]]:
        """POST ``body`` as JSON: the status, the headers (names in any case) and the JSON answer."""
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json", **(headers or {})})
        if token is not None:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, response.headers, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers, json.loads(exc.read())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> FindCorpus:
    return find_corpus(tmp_path_factory.mktemp("api-corpus"), charset_names=["chrFren", "chrRuss"])


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory, corpus: FindCorpus) -> Iterator[Orthanc]:
    server = Orthanc(tmp_path_factory.mktemp("api-orthanc"), extra={**orthanc_settings({}), **ORTHANC_FIND}).start()
    try:
        result = storescu(server.dicom_port, corpus.files, called_ae=server.aet)
        assert result.statuses == [0] * len(corpus.files), result.output[-3000:]
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def viewer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MoveDestination]:
    scp = MoveDestination(tmp_path_factory.mktemp("api-viewer"), "APISCP")
    try:
        yield scp.start()
    finally:
        scp.stop()


@pytest.fixture(scope="module")
def lossy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FakeDicomweb, Study]]:
    """A DICOMweb server holding one series of 3 CT images, which loses the second."""
    study = ct_instances(tmp_path_factory.mktemp("api-lossy"), 3)
    server = FakeDicomweb(missing={study.instances[1].sop_instance_uid})
    server.hold(study)
    server.start()
    try:
        yield server, study
    finally:
        server.stop()


@pytest.fixture(scope="module")
def slow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FakeDicomweb, Study]]:
    """A DICOMweb server holding one CT image, which sends one instance every 0.5 s,
    whatever the number of requests."""
    study = ct_instances(tmp_path_factory.mktemp("api-slow"), 1)
    server = FakeDicomweb(delay=0.5)
    server.hold(study)
    server.start()
    try:
        yield server, study
    finally:
        server.stop()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, orthanc: Orthanc, viewer: MoveDestination,
           lossy: tuple[FakeDicomweb, Study], slow: tuple[FakeDicomweb, Study]) -> Iterator[Daemon]:
    folder = tmp_path_factory.mktemp("api-bridge")
    tokens = folder / "tokens"
    tokens.write_text(f"tests {TOKEN}\n")
    os.chmod(tokens, 0o600)
    http_port = free_port()
    config = {
        "ae_title": "APIBRIDGE",
        "http": {"host": "127.0.0.1", "port": http_port, "token_file": str(tokens)},
        "nodes": {
            "ORTHANC": {"ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port},
            "viewer": {"ae_title": viewer.aet, "host": "127.0.0.1", "port": viewer.port},
            "gone": {"ae_title": "GONESCP", "host": "127.0.0.1", "port": free_port()},
        },
        "sources": {
            "pacs": {"type": "dimse", "node": "ORTHANC", "retrieve": "c-get"},
            "web": {"type": "dicomweb", "url": orthanc.dicomweb},
            "lossy": {"type": "dicomweb", "url": lossy[0].url},
            "slow": {"type": "dicomweb", "url": slow[0].url},
            "down": {"type": "dimse", "node": "gone", "find_timeout": "5s"},
        },
    }
    bridge = Bridge(folder, config).start()
    url = f"http://127.0.0.1:{http_port}"

    def serving() -> bool:
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    try:
        wait_for(serving, 30, "the HTTP server to answer /healthz", interval=0.1)
        yield Daemon(bridge, url)
    finally:
        if bridge.proc is not None and bridge.proc.poll() is None:
            bridge.kill()


@pytest.fixture
def received(viewer: MoveDestination) -> MoveDestination:
    viewer.clear()
    return viewer


# -- comparing answers ---------------------------------------------------------------------


def as_text(value: Any) -> str | tuple[str, ...]:
    """A JSON value as ``findscu.text`` reads a response's: '' when null or empty, a list of
    several as its sorted tuple, a number as %g."""
    if value is None or value == [] or value == "":
        return ""
    if isinstance(value, list):
        values = sorted(str(v) for v in value)
        return tuple(values) if len(values) > 1 else values[0]
    if isinstance(value, int | float):
        return format(value, "g")
    return str(value)


def api_matches(answer: dict[str, Any], keys: list[str]) -> set[tuple[tuple[str, Any], ...]]:
    return {tuple((k, as_text(m.get(k))) for k in keys) for m in answer["matches"]}


def orthanc_matches(orthanc: Orthanc, level: str, matching: list[str], keys: list[str],
                    root: str = "study") -> set[tuple[tuple[str, Any], ...]]:
    asked = {k.partition("=")[0] for k in matching}
    result = findscu(orthanc.dicom_port, level, [*matching, *(k for k in keys if k not in asked)], root=root,
                     called_ae=orthanc.aet).check()
    return {tuple((k, text(ds, k)) for k in keys) for ds in result.responses}


def newest_first(matches: list[dict[str, Any]], date_key: str = "StudyDate", time_key: str = "StudyTime") -> bool:
    when = [(m.get(date_key) or "", m.get(time_key) or "") for m in matches]
    return when == sorted(when, reverse=True)


# -- queries -------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["pacs", "web"])
def test_a_query_answers_what_findscu_gets_from_orthanc_newest_first(daemon: Daemon, orthanc: Orthanc,
                                                                       corpus: FindCorpus, source: str) -> None:
    status, _, answer = daemon.call("/api/query", {"source": source, "patient_name": "A*"})
    assert status == 200, answer
    assert answer["level"] == "STUDY" and answer["truncated"] is False and answer["count"] == 4
    assert {m["StudyInstanceUID"] for m in answer["matches"]} == {corpus.studies[k].uid for k in ("s1", "s2", "s3",
                                                                                                   "s4")}
    assert api_matches(answer, STUDY_KEYS) == orthanc_matches(orthanc, "STUDY", ["PatientName=A*"], STUDY_KEYS)
    assert newest_first(answer["matches"]), [m["StudyDate"] for m in answer["matches"]]
    s3 = next(m for m in answer["matches"] if m["StudyInstanceUID"] == corpus.studies["s3"].uid)
    assert s3["ModalitiesInStudy"] in (["CT", "MR"], ["MR", "CT"]) and s3["NumberOfStudyRelatedInstances"] == 3
    assert s3["PatientID"] == "P002" and s3["PatientName"] == "ALLEN^BOB" and s3["StudyDate"] == "20201231"

    # modalities and a date range, in ISO form; then a non-ASCII name, as JSON text
    status, _, answer = daemon.call("/api/query", {"source": source, "modalities": ["MR", "us"],
                                                   "study_date": {"from": "2020-06-01", "to": "20211231"}})
    assert status == 200, answer
    assert [m["StudyInstanceUID"] for m in answer["matches"]] == [corpus.studies[k].uid for k in ("s4", "s3", "s2")]
    assert api_matches(answer, STUDY_KEYS) == orthanc_matches(
        orthanc, "STUDY", ["ModalitiesInStudy=MR\\US", "StudyDate=20200601-20211231"], STUDY_KEYS)
    status, _, answer = daemon.call("/api/query", {"source": source, "patient_id": "CS-chrRuss"})
    assert status == 200, answer
    assert [m["PatientName"] for m in answer["matches"]] == [corpus.studies["chrRuss"].patient_name]


@pytest.mark.parametrize("source", ["pacs", "web"])
def test_series_and_patients_answer_what_findscu_gets(daemon: Daemon, orthanc: Orthanc, corpus: FindCorpus,
                                                      source: str) -> None:
    s3 = corpus.studies["s3"]
    status, _, answer = daemon.call("/api/query", {"source": source, "level": "SERIES", "study_uid": s3.uid})
    assert status == 200, answer
    assert {m["SeriesInstanceUID"] for m in answer["matches"]} == {se.uid for se in s3.series}
    assert api_matches(answer, SERIES_KEYS) == orthanc_matches(orthanc, "SERIES", [f"StudyInstanceUID={s3.uid}"],
                                                               SERIES_KEYS)
    assert newest_first(answer["matches"], "SeriesDate", "SeriesTime")  # the MR series is 2 days younger
    s2 = corpus.studies["s2"]
    keys = ["SOPInstanceUID", "SOPClassUID", "InstanceNumber", "Rows", "Columns"]
    status, _, answer = daemon.call("/api/query", {"source": source, "level": "IMAGE", "study_uid": s2.uid,
                                                   "series_uid": [se.uid for se in s2.series]})
    assert status == 200, answer
    assert {m["SOPInstanceUID"] for m in answer["matches"]} == {i for se in s2.series for i in se.instances}
    assert api_matches(answer, keys) == orthanc_matches(
        orthanc, "IMAGE", [f"StudyInstanceUID={s2.uid}", "SeriesInstanceUID=" + "\\".join(se.uid for se in s2.series)],
        keys)
    keys = ["PatientID", "PatientName", "PatientBirthDate", "PatientSex"]
    status, _, answer = daemon.call("/api/query", {"source": source, "level": "patient", "patient_id": "P003"})
    assert status == 200, answer
    assert api_matches(answer, keys) == orthanc_matches(orthanc, "PATIENT", ["PatientID=P003"], keys, root="patient")
    assert len(answer["matches"]) == 1


def test_max_results_cuts_the_oldest_and_says_so(daemon: Daemon, corpus: FindCorpus) -> None:
    status, _, answer = daemon.call("/api/query", {"source": "pacs", "patient_id": "P004"})
    assert status == 200 and answer["count"] == 2 and not answer["truncated"]
    generated = {st.uid: st.date for key, st in corpus.studies.items() if key.startswith("s")}
    newest = sorted(generated, key=lambda uid: generated[uid], reverse=True)
    status, _, answer = daemon.call("/api/query", {"source": "web", "patient_name": "*", "max_results": 3,
                                                   "study_date": {"from": "20190101"}})
    assert status == 200, answer
    assert answer["truncated"] is True and answer["count"] == 3
    assert [m["StudyInstanceUID"] for m in answer["matches"]] == newest[:3]


def test_max_age_counts_years_back_from_today(daemon: Daemon, corpus: FindCorpus) -> None:
    today = date.today()
    years = today.year - 2021  # since this day of 2021: s5 (20211231) and later, perhaps s4 (20210101)
    since = (date(2021, 2, 28) if (today.month, today.day) == (2, 29) else today.replace(year=2021)).strftime("%Y%m%d")
    expected = {st.uid for key, st in corpus.studies.items() if key.startswith("s") and st.date >= since}
    status, _, answer = daemon.call("/api/query", {"source": "pacs", "max_age_years": years, "patient_name": "*"})
    assert status == 200, answer
    assert {m["StudyInstanceUID"] for m in answer["matches"]} == expected


def test_a_query_that_matches_nothing_answers_an_empty_list(daemon: Daemon) -> None:
    status, _, answer = daemon.call("/api/query", {"source": "web", "patient_id": "NOBODY"})
    assert (status, answer["count"], answer["matches"], answer["truncated"]) == (200, 0, [], False)


def test_a_source_that_cannot_be_reached_answers_502_with_the_correlation_id(daemon: Daemon) -> None:
    status, headers, answer = daemon.call("/api/query", {"source": "down", "patient_id": "P001"})
    assert status == 502, answer
    cid = answer["correlation_id"]
    assert headers["X-Correlation-ID"] == cid
    assert "source down could not be reached" in answer["message"] and cid in answer["message"]
    assert "Errno" not in answer["message"] and "refused" not in answer["message"].lower()
    wait_for(lambda: cid in daemon.bridge.log(), 10, "the correlation ID in the daemon's log")

    status, headers, answer = daemon.call("/api/retrieve", {"source": "down", "study_uid": generate_uid(),
                                                            "destination": "viewer"})
    assert status == 502, answer
    assert "source down could not be reached" in answer["message"]
    assert headers["X-Correlation-ID"] == answer["correlation_id"] in answer["message"]


# -- validation ----------------------------------------------------------------------------

INVALID = [
    ("/api/query", {"source": "pacs", "patient_id": "P00*"}, "patient_id", "no wildcards"),
    ("/api/query", {"source": "nowhere"}, "source",
     "no source 'nowhere' in the configuration (sources: local, down, lossy, pacs, slow, web)"),
    ("/api/query", {"source": "pacs", "max_age_years": 2, "study_date": {"to": "20000101"}}, "max_age_years",
     "none can be in study_date, which ends 20000101"),
    ("/api/query", {"source": "pacs", "study_date": {"from": "20220101", "to": "20210101"}}, "study_date",
     "from (20220101) is after to (20210101)"),
    ("/api/query", {"source": "pacs", "study_date": {"from": "2021-02-30"}}, "study_date.from", "not a date"),
    ("/api/query", {"source": "pacs", "study_uid": "1.2.x"}, "study_uid.0", "not a UID"),
    ("/api/query", {"source": "pacs", "modalities": ["CT", "C T"]}, "modalities.1", "not a modality code"),
    ("/api/query", {"source": "pacs", "series_uid": "1.2.3"}, "series_uid", "not at STUDY level"),
    ("/api/query", {"source": "pacs", "level": "SERIES"}, "study_uid", "a query at SERIES level needs it"),
    ("/api/query", {"source": "pacs", "max_results": 100000}, "max_results", "less than or equal to 1000"),
    ("/api/query", {"source": "pacs", "patient": "P001"}, "patient", "Extra inputs are not permitted"),
    ("/api/retrieve", {"source": "pacs", "study_uid": "1.2.3", "destination": "BAD\\AE"}, "destination",
     "not an AE title"),
    ("/api/retrieve", {"source": "pacs", "study_uid": "1.2.3", "destination": "A_VERY_LONG_AE_TITLE"},
     "destination", "not an AE title"),
    ("/api/retrieve", {"source": "pacs", "study_uid": "1.2.3", "destination": "ELSEWHERE"}, "destination",
     "no node 'ELSEWHERE' in the configuration (nodes: ORTHANC, gone (GONESCP), viewer (APISCP))"),
    ("/api/retrieve", {"source": "pacs", "patient_id": "P001", "destination": "viewer"}, "study_uid",
     "a retrieval at STUDY level needs it"),
    ("/api/retrieve", {"source": "nowhere", "study_uid": "1.2.3"}, "destination", "Field required"),
]


@pytest.mark.parametrize(("path", "body", "field", "says"), INVALID, ids=[f"{c[0][5:]}-{c[2]}" for c in INVALID])
def test_an_invalid_request_answers_400_naming_the_field(daemon: Daemon, path: str, body: dict[str, Any],
                                                         field: str, says: str) -> None:
    status, headers, answer = daemon.call(path, body)
    assert status == 400, answer
    assert any(e.startswith(f"{field}: ") and says in e for e in answer["errors"]), answer
    assert answer["message"] == "; ".join(answer["errors"])
    assert headers["X-Correlation-ID"] == answer["correlation_id"]


def test_the_api_needs_a_token(daemon: Daemon) -> None:
    status, _, _ = daemon.call("/api/query", {"source": "pacs"}, token=None)
    assert status == 401
    status, _, _ = daemon.call("/api/retrieve", {"source": "pacs"}, token="not-the-token-0123456789")
    assert status == 401


# -- retrievals ----------------------------------------------------------------------------


@pytest.mark.parametrize(("source", "study", "destination"), [("pacs", "s2", "APISCP"), ("web", "s3", "viewer")])
def test_a_study_is_retrieved_to_the_node(daemon: Daemon, corpus: FindCorpus, received: MoveDestination,
                                          source: str, study: str, destination: str) -> None:
    wanted = corpus.studies[study]
    instances = {uid for series in wanted.series for uid in series.instances}
    status, _, answer = daemon.call("/api/retrieve", {"source": source, "study_uid": wanted.uid,
                                                      "destination": destination})
    assert status == 200, answer
    assert answer == {"source": source, "destination": "viewer", "level": "STUDY", "located": len(instances),
                      "completed": len(instances), "warning": 0, "failed": 0, "failed_sop_instance_uids": []}
    assert set(received.received()) == instances
    assert all(len(paths) == 1 for paths in received.received().values())


def test_a_series_of_a_study_is_retrieved(daemon: Daemon, corpus: FindCorpus, received: MoveDestination) -> None:
    mr = corpus.studies["s3"].series[1]
    status, _, answer = daemon.call("/api/retrieve", {"source": "pacs", "level": "SERIES", "series_uid": [mr.uid],
                                                      "destination": "viewer"})
    assert status == 200 and answer["completed"] == len(mr.instances) == 1, answer
    assert set(received.received()) == set(mr.instances)


def test_an_instance_the_source_loses_answers_207_naming_it(daemon: Daemon, lossy: tuple[FakeDicomweb, Study],
                                                            received: MoveDestination) -> None:
    _, study = lossy
    lost = study.instances[1].sop_instance_uid
    status, headers, answer = daemon.call("/api/retrieve", {"source": "lossy", "study_uid": study.uid,
                                                            "destination": "viewer"})
    assert status == 207, answer
    assert (answer["located"], answer["completed"], answer["failed"]) == (3, 2, 1)
    assert answer["failed_sop_instance_uids"] == [lost]
    assert answer["correlation_id"] == headers["X-Correlation-ID"]
    assert set(received.received()) == {i.sop_instance_uid for i in study.instances} - {lost}


def test_a_node_that_does_not_listen_answers_502_with_the_correlation_id(daemon: Daemon,
                                                                          corpus: FindCorpus) -> None:
    s1 = corpus.studies["s1"]
    instances = {uid for series in s1.series for uid in series.instances}
    status, headers, answer = daemon.call("/api/retrieve", {"source": "pacs", "study_uid": s1.uid,
                                                            "destination": "GONESCP"},
                                          headers={"X-Correlation-ID": "test-gone-node-1"})
    assert status == 502, answer
    assert answer["correlation_id"] == headers["X-Correlation-ID"] == "test-gone-node-1"
    assert "the node gone (GONESCP) could not be reached" in answer["message"]
    assert (answer["located"], answer["completed"], answer["failed"]) == (3, 0, 3)
    assert set(answer["failed_sop_instance_uids"]) == instances
    log = wait_for(lambda: "test-gone-node-1" in daemon.bridge.log() and daemon.bridge.log(), 10,
                   "the correlation ID in the daemon's log")
    assert "API retrieve [test-gone-node-1]: source pacs to gone (GONESCP)" in log


def test_a_retrieval_that_matches_nothing_answers_404(daemon: Daemon, received: MoveDestination) -> None:
    status, headers, answer = daemon.call("/api/retrieve", {"source": "web", "study_uid": generate_uid(),
                                                            "destination": "viewer"})
    assert status == 404, answer
    assert "nothing matched in source web" in answer["message"]
    assert answer["correlation_id"] == headers["X-Correlation-ID"]
    assert received.files() == []


def test_retrievals_beyond_the_limit_answer_503(daemon: Daemon, slow: tuple[FakeDicomweb, Study],
                                                received: MoveDestination) -> None:
    """Four retrievals at once (each waits its turn for the slow server's one instance, 0.5 s);
    a fifth asked meanwhile is told to come back."""
    _, study = slow
    body = {"source": "slow", "study_uid": study.uid, "destination": "viewer"}
    with ThreadPoolExecutor(5) as pool:
        answers = list(pool.map(lambda _: daemon.call("/api/retrieve", body), range(5)))
    assert sorted(status for status, _, _ in answers) == [200, 200, 200, 200, 503], answers
    _, headers, answer = next(a for a in answers if a[0] == 503)
    assert "4 retrievals are being answered already" in answer["message"]
    assert headers["Retry-After"] == "5"
    assert set(received.received()) == {study.instances[0].sop_instance_uid}


def test_made_up_requests_get_no_500(daemon: Daemon, received: MoveDestination) -> None:
    """Requests made up from the OpenAPI document, valid and broken, through real sources
    (schemathesis' job, tests/openapi_fuzz.py): no 5xx but the documented 502 and 503,
    every error a JSON body with its correlation ID."""
    import openapi_fuzz as fuzz

    document = fuzz.get_json(daemon.url, "/openapi.json")
    hints = {"source": ["pacs", "web", "down"], "destination": ["viewer", "VIEWERSCP", "gone"],
             "level": ["STUDY", "SERIES", "IMAGE", "PATIENT"]}
    report = fuzz.fuzz(daemon.url, document, headers={"Authorization": f"Bearer {TOKEN}"},
                       prefix="/api", per_operation=60, hints=hints, strict=True, budget=60,
                       limits={"/api/queue": 0, "/api/queue/rows": 0, "/api/dead-letters": 0,
                               "/api/dead-letters/retry": 0, "/api/dead-letters/purge": 0, "/api/destinations": 0,
                               "/api/destinations/{name}/resume": 0, "/api/reload": 0})
    assert not report.problems, report.describe()
    assert report.sent >= 100, report.describe()
    statuses = {status for by_status in report.statuses.values() for status in by_status}
    assert 200 in statuses and 400 in statuses, report.describe()
    assert daemon.bridge.proc is not None and daemon.bridge.proc.poll() is None
    assert "Traceback" not in daemon.bridge.log()
