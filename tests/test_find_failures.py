"""C-FIND when a source fails, is slow, or the requester cancels (issue 16).

Peers: a live Orthanc with a few studies; an Orthanc started and then stopped (its
ports refuse connections: "Orthanc down"); a pynetdicom C-FIND SCP in this process whose
answers come slowly (``SlowPacs``); and tests/fakeqido.py, a QIDO-RS server that records
the parameters it is sent and can answer slowly or with errors. One bridge, with
``listen.timeouts.network: 2s``, asks them, the source chosen by the requester's AE title.
"""

from __future__ import annotations

import signal
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from fakeqido import FakeQido, Request, study
from findcorpus import ORTHANC_FIND, tiny_studies
from findscu import CANCEL, findscu, matches, text, unique_values
from peers import Bridge, Orthanc, free_port, storescu, wait_for
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt

NETWORK_TIMEOUT = 2.0
BRIDGE_AE = "FINDBRIDGE"
MAX_RESULTS = 25
STUDY_KEYS = ["PatientID", "PatientName", "StudyDate", "StudyInstanceUID"]


class SlowPacs:
    """A remote PACS whose C-FIND answers ``count`` matches, one every ``interval``
    seconds, after ``first`` seconds, then success or the status ``final`` holds; the
    query's PatientID picks the behaviour (see ``modes``). It notes what it sent and how
    each C-FIND ended."""

    def __init__(self) -> None:
        self.port = free_port()
        self.modes: dict[str, tuple[float, int, float]] = {}  # PatientID: (first, count, interval)
        self.final: dict[str, tuple[int, str]] = {}  # PatientID: the final status and its comment (else success)
        self.sent: dict[str, int] = {}
        self.ended: dict[str, str] = {}  # PatientID: "done", "cancelled", "aborted", "closed"
        self._lock = threading.Lock()
        self.ae = AE(ae_title="SLOWPACS")
        for uid in ("1.2.840.10008.5.1.4.1.2.2.1", "1.2.840.10008.5.1.4.1.2.1.1"):  # Study, Patient Root FIND
            self.ae.add_supported_context(uid)

    def start(self) -> SlowPacs:
        self.ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_FIND, self._find)])
        return self

    def stop(self) -> None:
        self.ae.shutdown()

    def _wait(self, event: Any, seconds: float) -> str | None:
        """Sleep ``seconds`` unless the C-FIND is cancelled or the association gone first.
        While this handler runs, pynetdicom's association thread notes no A-ABORT
        (``is_established`` stays true): its DUL's state machine leaves Sta6 (data
        transfer) at once."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if event.is_cancelled:
                return "cancelled"
            if event.assoc.dul.state_machine.current_state != "Sta6":
                return "aborted"
            time.sleep(0.02)
        return None

    def _find(self, event: Any) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        query = event.identifier
        key = str(query.get("PatientID", ""))
        first, count, interval = self.modes.get(key, (0.0, 0, 0.0))
        with self._lock:
            self.sent[key] = 0
        ended = "closed"
        try:
            for n in range(count):
                stopped = self._wait(event, first if n == 0 else interval)
                if stopped:
                    ended = stopped
                    if stopped == "cancelled":
                        yield CANCEL, None
                    return
                ds = Dataset()
                ds.QueryRetrieveLevel = "STUDY"
                ds.RetrieveAETitle = "SLOWPACS"
                ds.PatientID = key
                ds.PatientName = f"SLOW^{n:03d}"
                ds.StudyDate = "20240101"
                ds.StudyInstanceUID = f"1.2.826.0.1.3680043.8.498.1{n:03d}"
                with self._lock:
                    self.sent[key] += 1
                yield 0xFF00, ds
            ended = "done"
            if key in self.final:
                status = Dataset()
                status.Status, status.ErrorComment = self.final[key]
                yield status, None
            else:
                yield 0x0000, None
        finally:
            with self._lock:
                self.ended[key] = ended


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory):
    """An Orthanc holding four studies."""
    folder = tmp_path_factory.mktemp("find-live")
    server = Orthanc(folder / "orthanc", extra=ORTHANC_FIND).start()
    try:
        files = tiny_studies(folder / "files", 4, patient_id="LIVE", name="LIVE^PATIENT")
        assert storescu(server.dicom_port, files, called_ae=server.aet).statuses == [0] * 4
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def down(tmp_path_factory: pytest.TempPathFactory) -> Orthanc:
    """An Orthanc that was up, and is stopped: connections to its ports are refused."""
    server = Orthanc(tmp_path_factory.mktemp("find-down"), extra=ORTHANC_FIND).start()
    server.stop()
    return server


@pytest.fixture(scope="module")
def slow() -> Iterator[SlowPacs]:
    pacs = SlowPacs().start()
    yield pacs
    pacs.stop()


@pytest.fixture(scope="module")
def qido() -> Iterator[FakeQido]:
    server = FakeQido().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def bridge(tmp_path_factory: pytest.TempPathFactory, live: Orthanc, down: Orthanc, slow: SlowPacs, qido: FakeQido):
    config = {
        "ae_title": BRIDGE_AE,
        "listen": {"timeouts": {"network": f"{NETWORK_TIMEOUT:g}s"}},
        "http": {"host": "127.0.0.1", "port": free_port()},
        "find": {"max_results": MAX_RESULTS},
        "nodes": {
            "DOWN": {"ae_title": down.aet, "host": "127.0.0.1", "port": down.dicom_port},
            "SLOW": {"ae_title": "SLOWPACS", "host": "127.0.0.1", "port": slow.port},
        },
        "destinations": {"archive": {"type": "archive"}},
        "sources": {
            "web": {"type": "dicomweb", "url": live.dicomweb},
            "downweb": {"type": "dicomweb", "url": down.dicomweb},
            "downpacs": {"type": "dimse", "node": "DOWN"},
            "slow": {"type": "dimse", "node": "SLOW"},
            "hung": {"type": "dimse", "node": "SLOW", "find_timeout": "2s"},
            "fake": {"type": "dicomweb", "url": qido.url, "page_size": 3},
        },
        "rules": [
            {"name": "keep", "store": ["archive"]},
            {"name": "web", "when": {"calling_ae": "WEBQ"}, "find": ["web"]},
            {"name": "downweb", "when": {"calling_ae": "DOWNWEB"}, "find": ["downweb"]},
            {"name": "downpacs", "when": {"calling_ae": "DOWNPACS"}, "find": ["downpacs"]},
            {"name": "two", "when": {"calling_ae": "TWO"}, "find": ["web", "downweb"]},
            {"name": "two-reversed", "when": {"calling_ae": "TWOREV"}, "find": ["downpacs", "web"]},
            {"name": "slow", "when": {"calling_ae": "SLOWQ"}, "find": ["slow"]},
            {"name": "hung", "when": {"calling_ae": "HUNGQ"}, "find": ["hung"]},
            {"name": "fake", "when": {"calling_ae": "FAKEQ"}, "find": ["fake"]},
            {"name": "fuzzy", "when": {"calling_ae": "FUZZYQ"}, "find": ["fake"], "fuzzy_matching": True},
            {"name": "fake-first", "when": {"calling_ae": "FAKEFIRST"}, "find": ["fake", "slow"]},
            {"name": "slow-first", "when": {"calling_ae": "SLOWFIRST"}, "find": ["slow", "fake"]},
        ],
    }
    daemon = Bridge(tmp_path_factory.mktemp("find-failures-bridge"), config).start()
    yield daemon
    if daemon.proc is not None and daemon.proc.poll() is None:
        daemon.kill()


def test_source_down_fails_quickly_with_a_comment(bridge: Bridge) -> None:
    """Orthanc stopped, asked by QIDO-RS and by C-FIND: 0xA700 (unreachable) with an
    ErrorComment, in a few seconds, never an empty success."""
    for requester in ("DOWNWEB", "DOWNPACS"):
        result = findscu(bridge.port, "STUDY", STUDY_KEYS, calling_ae=requester).check(0xA700)
        assert result.responses == []
        assert result.error_comment, result.summary()
        assert result.seconds < 5, f"{requester}: {result.seconds:.1f}s"


def test_two_sources_one_down(bridge: Bridge, live: Orthanc) -> None:
    """The answers of the source that is up, success, and a warning naming the one down,
    whichever comes first in the rule."""
    reference = findscu(live.dicom_port, "STUDY", STUDY_KEYS, called_ae=live.aet).check()
    assert len(reference.responses) == 4
    for requester, failed in (("TWO", "downweb"), ("TWOREV", "downpacs")):
        result = findscu(bridge.port, "STUDY", STUDY_KEYS, calling_ae=requester).check()
        assert matches(result, "STUDY", STUDY_KEYS) == matches(reference, "STUDY", STUDY_KEYS)
        warned = [line for line in bridge.log().splitlines() if "WARNING" in line and failed in line]
        assert warned, f"no warning names source {failed}"


def test_source_without_an_answer_fails_within_its_find_timeout(bridge: Bridge, slow: SlowPacs) -> None:
    """A PACS that accepts the C-FIND and says nothing: 0xA700 after the source's
    ``find_timeout`` (2 s), with a comment; the upstream C-FIND does not go on."""
    slow.modes["HANG"] = (30.0, 1, 0.0)
    result = findscu(bridge.port, "STUDY", ["PatientID=HANG", "StudyInstanceUID"], calling_ae="HUNGQ").check(0xA700)
    assert result.error_comment
    assert 2.0 <= result.seconds < 2.0 + 5, f"{result.seconds:.1f}s"
    wait_for(lambda: slow.ended.get("HANG") in ("cancelled", "aborted"), 10, "the upstream C-FIND to be given up")


def test_pacs_failure_after_some_matches(bridge: Bridge, slow: SlowPacs) -> None:
    """A PACS that answers two matches, then 0xA700 or 0xC001 with a comment: the two, then
    the failure (never a partial answer taken for a whole one): 0xA700 for the PACS out of
    resources, 0xC001 for its refusal, the comment naming the source."""
    for key, status in (("FULL", 0xA700), ("REFUSED", 0xC001)):
        slow.modes[key] = (0.0, 2, 0.0)
        slow.final[key] = (status, "the PACS says no")
        result = findscu(bridge.port, "STUDY", [f"PatientID={key}", "StudyInstanceUID"], calling_ae="SLOWQ")
        result.check(status)
        assert len(result.responses) == 2
        assert result.error_comment and "slow" in result.error_comment, result.error_comment


def test_two_sources_merged_first_in_rule_order_wins(bridge: Bridge, slow: SlowPacs, qido: FakeQido) -> None:
    """The same study from two sources is answered once, with the values of the source
    named first in the rule; a study only one of them has is answered too."""
    shared = [f"1.2.826.0.1.3680043.8.498.1{n:03d}" for n in range(3)]  # what SlowPacs answers
    only_web = generate_uid()
    slow.modes["MERGE"] = (0.0, 3, 0.0)
    qido.reset(answer=lambda request: (200, [study(uid, "MERGE", f"FAKE^{n:03d}") for n, uid in enumerate(shared)]
                                       + [study(only_web, "MERGE", "FAKE^ONLY")]))
    keys = ["PatientID=MERGE", "PatientName", "StudyInstanceUID"]
    for requester, prefix in (("FAKEFIRST", "FAKE"), ("SLOWFIRST", "SLOW")):
        result = findscu(bridge.port, "STUDY", keys, calling_ae=requester).check()
        assert sorted(unique_values(result, "STUDY")) == sorted([*shared, only_web])
        names = {text(ds, "StudyInstanceUID"): text(ds, "PatientName") for ds in result.responses}
        assert {names[uid] for uid in shared} == {f"{prefix}^{n:03d}" for n in range(3)}, requester
        assert names[only_web] == "FAKE^ONLY"


def test_failing_qido_answers_a_failure_status(bridge: Bridge, qido: FakeQido) -> None:
    """A QIDO-RS server that answers 400: 0xC001 (it refused us) with a comment."""
    qido.reset(answer=lambda request: (400, {"error": "bad request"}))
    result = findscu(bridge.port, "STUDY", ["PatientID=ERR", "StudyInstanceUID"], calling_ae="FAKEQ").check(0xC001)
    assert result.error_comment
    assert result.seconds < 5


def test_slow_source_longer_than_the_network_timeout(bridge: Bridge, slow: SlowPacs) -> None:
    """A PACS answering a match every 0.7 s for about 4 s, more than the listener's
    network timeout (2 s): the whole answer arrives, the association is not aborted."""
    slow.modes["SLOW"] = (0.7, 6, 0.7)
    result = findscu(bridge.port, "STUDY", ["PatientID=SLOW", "PatientName", "StudyInstanceUID"],
                     calling_ae="SLOWQ", timeout=60).check()
    assert len(result.responses) == 6
    assert result.seconds > 2 * NETWORK_TIMEOUT
    assert "Abort" not in result.output, result.summary()
    assert slow.ended["SLOW"] == "done"


def test_slow_first_answer_longer_than_the_network_timeout(bridge: Bridge, slow: SlowPacs) -> None:
    """A PACS whose first match comes after 3 s: longer than the listener's network
    timeout (2 s), well within the source's ``find_timeout`` (20 s): the answer arrives."""
    slow.modes["LATE"] = (3.0, 2, 0.1)
    result = findscu(bridge.port, "STUDY", ["PatientID=LATE", "StudyInstanceUID"], calling_ae="SLOWQ",
                     timeout=60).check()
    assert len(result.responses) == 2
    assert slow.ended["LATE"] == "done"


def test_cancel_stops_the_upstream_c_find(bridge: Bridge, slow: SlowPacs) -> None:
    """findscu --cancel 2: the bridge answers 0xFE00 promptly, and the PACS's C-FIND,
    which had 20 matches to send, one every 0.3 s, is cancelled or its association
    aborted: it sends no more."""
    slow.modes["CANCEL"] = (0.3, 20, 0.3)
    result = findscu(bridge.port, "STUDY", ["PatientID=CANCEL", "StudyInstanceUID"], calling_ae="SLOWQ",
                     extra=["--cancel", "2"]).check(CANCEL)
    assert 2 <= len(result.responses) <= 4
    assert result.seconds < 0.3 * 20 / 2, f"{result.seconds:.1f}s"
    wait_for(lambda: slow.ended.get("CANCEL") in ("cancelled", "aborted"), 5, "the upstream C-FIND to stop")
    assert slow.sent["CANCEL"] <= len(result.responses) + 2


def test_cancel_stops_the_qido_pages(bridge: Bridge, qido: FakeQido) -> None:
    """findscu --cancel 4 on a QIDO-RS source giving 30 matches in pages of 3, each page
    after 0.3 s: 0xFE00, and no page is asked for after the cancel but the one (at most)
    already asked for."""
    qido.reset([study(generate_uid(), "PAGES", f"PAGE^{n:02d}") for n in range(30)], delay=0.3)
    result = findscu(bridge.port, "STUDY", ["PatientID=PAGES", "PatientName", "StudyInstanceUID"],
                     calling_ae="FAKEQ", extra=["--cancel", "4"]).check(CANCEL)
    assert result.seconds < 3, f"{result.seconds:.1f}s"
    asked = len(qido.seen())
    # Nothing can show that a request will not come but time: watch for longer than
    # three pages would take.
    time.sleep(1.0)
    assert len(qido.seen()) <= asked + 1 and len(qido.seen()) < 10, [r.params for r in qido.seen()]


def test_more_matches_than_a_page_each_once(bridge: Bridge, qido: FakeQido) -> None:
    """Pages of 3 from a server holding 10 matches: all 10, each once; the server is asked
    with limit and offset until it has no more."""
    uids = [generate_uid() for _ in range(10)]
    qido.reset([study(uid, "PAGES", f"PAGE^{n:02d}") for n, uid in enumerate(uids)])
    result = findscu(bridge.port, "STUDY", ["PatientID=PAGES", "PatientName", "StudyInstanceUID"],
                     calling_ae="FAKEQ").check()
    assert sorted(unique_values(result, "STUDY")) == sorted(uids)
    offsets = sorted(int(r.params.get("offset", ["0"])[0]) for r in qido.seen())
    assert offsets[:4] == [0, 3, 6, 9]
    assert all(r.params.get("limit") == ["3"] for r in qido.seen())


def test_capped_with_a_warning_and_a_metric(bridge: Bridge, qido: FakeQido) -> None:
    """30 matches, ``find.max_results: 25``: the first 25 and success, a warning in the log,
    ``dicom_bridge_find_capped`` counted; the pages past the cap are not asked for."""
    before = metric(bridge, 'dicom_bridge_find_capped_total{source="fake"}')
    qido.reset([study(generate_uid(), "MANY", f"MANY^{n:02d}") for n in range(30)])
    result = findscu(bridge.port, "STUDY", ["PatientID=MANY", "StudyInstanceUID"], calling_ae="FAKEQ").check()
    assert len(result.responses) == MAX_RESULTS
    assert [line for line in bridge.log().splitlines() if "WARNING" in line and "max_results" in line]
    assert metric(bridge, 'dicom_bridge_find_capped_total{source="fake"}') == before + 1
    assert max(int(r.params.get("offset", ["0"])[0]) for r in qido.seen()) <= 27


def test_metrics_by_source_and_status(bridge: Bridge) -> None:
    """Finds counted by source and the status each source ended with; each upstream
    request timed by source and operation, and each that failed counted."""
    before = metric(bridge, 'dicom_bridge_finds_total{source="downweb",status="0xA700"}')
    failed = metric(bridge, 'dicom_bridge_upstream_errors_total{operation="qido",source="downweb"}')
    web_failed = metric(bridge, 'dicom_bridge_upstream_errors_total{operation="qido",source="web"}')
    answered = metric(bridge, 'dicom_bridge_finds_total{source="web",status="0x0000"}')
    timed = metric(bridge, 'dicom_bridge_upstream_request_seconds_count{operation="qido",source="web"}')
    findscu(bridge.port, "STUDY", STUDY_KEYS, calling_ae="TWO").check()
    assert metric(bridge, 'dicom_bridge_finds_total{source="downweb",status="0xA700"}') == before + 1
    assert metric(bridge, 'dicom_bridge_finds_total{source="web",status="0x0000"}') == answered + 1
    assert metric(bridge, 'dicom_bridge_upstream_request_seconds_count{operation="qido",source="web"}') > timed
    assert metric(bridge, 'dicom_bridge_upstream_errors_total{operation="qido",source="downweb"}') == failed + 1
    assert metric(bridge, 'dicom_bridge_upstream_errors_total{operation="qido",source="web"}') == web_failed


def metric(bridge: Bridge, name: str) -> float:
    """A sample of the daemon's /metrics, named with its labels as exposed (0 if absent)."""
    port = bridge.config["http"]["port"]
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.rsplit(" ", 1)[0] == name)


def _params(requests: list[Request]) -> dict[str, list[str]]:
    assert requests, "the QIDO-RS server was not asked"
    return requests[0].params


def test_fuzzy_matching_asked_when_the_rule_says_so(bridge: Bridge, qido: FakeQido) -> None:
    """``fuzzy_matching: true`` on the rule: ``fuzzymatching=true`` in the QIDO-RS request;
    without it, no fuzzy matching is asked for. The matching keys and return keys are
    sent as QIDO-RS parameters."""
    qido.reset()
    keys = ["PatientName=SMITH*", "StudyDate=20200101-20211231", "PatientID", "StudyInstanceUID"]
    findscu(bridge.port, "STUDY", keys, calling_ae="FUZZYQ").check()
    params = _params(qido.seen())
    assert params.get("fuzzymatching") == ["true"]
    assert _one(params, "PatientName", "00100010") == "SMITH*"
    assert _one(params, "StudyDate", "00080020") == "20200101-20211231"
    fields = {f for value in params.get("includefield", []) for f in value.split(",")}
    assert fields & {"PatientID", "00100020"}, params

    qido.reset()
    findscu(bridge.port, "STUDY", keys, calling_ae="FAKEQ").check()
    assert _params(qido.seen()).get("fuzzymatching", ["false"]) == ["false"]


def _one(params: dict[str, list[str]], keyword: str, tag: str) -> str:
    values = params.get(keyword) or params.get(tag) or params.get(tag.lower())
    assert values and len(values) == 1, params
    return values[0]


def test_answers_checked_and_shaped(bridge: Bridge, qido: FakeQido) -> None:
    """A QIDO-RS server that ignores a key and sends more than asked for: the bridge drops
    the records that contradict the query, and answers only the keys asked for, with its
    own AE title and no Retrieve URL."""
    records = [study(generate_uid(), "KEEP", "KEEP^ME"), study(generate_uid(), "OTHER", "OTHER^ONE")]
    qido.reset(answer=lambda request: (200, records))  # whatever was asked
    result = findscu(bridge.port, "STUDY", ["PatientID=KEEP", "StudyInstanceUID"], calling_ae="FAKEQ").check()
    assert [str(ds.PatientID) for ds in result.responses] == ["KEEP"]
    ds = result.responses[0]
    assert {e.keyword for e in ds} <= {"PatientID", "StudyInstanceUID", "QueryRetrieveLevel", "RetrieveAETitle",
                                       "SpecificCharacterSet"}
    assert ds.RetrieveAETitle == BRIDGE_AE


def test_requests_the_bridge_cannot_answer(bridge: Bridge) -> None:
    """A level Study Root has not, an unknown or empty level: 0xA900; a requester no find
    rule matches: 0xC000; each with a comment."""
    for root, level, requester, status in (("study", "PATIENT", "WEBQ", 0xA900), ("patient", "SOME", "WEBQ", 0xA900),
                                           ("study", "", "WEBQ", 0xA900), ("study", "STUDY", "NOBODY", 0xC000)):
        result = findscu(bridge.port, level, ["PatientID", "StudyInstanceUID"], root=root, calling_ae=requester)
        result.check(status)
        assert result.error_comment and result.responses == [], (level, requester)


def test_log_line_per_c_find(bridge: Bridge) -> None:
    """One INFO line per C-FIND, without patient data."""
    findscu(bridge.port, "STUDY", ["PatientName=LIVE^PATIENT", "StudyInstanceUID"], calling_ae="WEBQ").check()
    lines = [line for line in bridge.log().splitlines() if "C-FIND from WEBQ" in line and "INFO" in line]
    assert lines and "4 matches" in lines[-1] and "STUDY" in lines[-1]
    assert not any("LIVE^PATIENT" in line for line in bridge.log().splitlines() if " INFO " in line)



def test_reload_points_a_source_elsewhere(bridge_factory: Any, live: Orthanc, down: Orthanc) -> None:
    """SIGHUP after the source's url changed: the next C-FIND asks the new server."""
    config = {"sources": {"web": {"type": "dicomweb", "url": down.dicomweb}},
              "destinations": {"archive": {"type": "archive"}},
              "rules": [{"name": "find", "find": ["web"]}]}
    daemon = bridge_factory(config)
    findscu(daemon.port, "STUDY", STUDY_KEYS).check(0xA700)
    daemon.config["sources"]["web"]["url"] = live.dicomweb
    daemon.write_config()
    daemon.signal(signal.SIGHUP)

    def answered() -> bool:
        result = findscu(daemon.port, "STUDY", STUDY_KEYS)
        return result.final == 0x0000 and len(result.responses) == 4

    wait_for(answered, 15, "C-FIND answered by the new url", interval=0.2)
