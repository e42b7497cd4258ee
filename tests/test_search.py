"""One query asked of several sources at once (bridge.sources.search): answers in rule
order, the first source winning a conflict, a failing source reported beside the
answers of the others, the cap, a cancel, and a source at work that is not taken for
stuck. The sources are QIDO-RS ones, against small recording HTTP servers."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
from fakestow import FakeStow, Request
from identifiers import query

from bridge.config import DicomwebSource as DicomwebConfig
from bridge.dataset.query import Query
from bridge.errors import UpstreamUnavailable
from bridge.metrics import Metrics
from bridge.sources.dicomweb import DicomwebSource
from bridge.sources.search import Cancelled, Search


def source(url: str, name: str, **settings: Any) -> DicomwebSource:
    return DicomwebSource(name, DicomwebConfig.model_validate({"type": "dicomweb", "url": url, **settings}), Metrics(),
                          Path(tempfile.gettempdir()))


def study(n: int, description: str = "", patient: str = "") -> dict[str, Any]:
    item = {"0020000D": {"vr": "UI", "Value": [f"1.2.3.{n}"]}}
    if description:
        item["00081030"] = {"vr": "LO", "Value": [description]}
    if patient:
        item["00100020"] = {"vr": "LO", "Value": [patient]}
    return item


def serving(records: list[dict[str, Any]], delay: float = 0.0):
    """A QIDO-RS server holding ``records``, each page answered after ``delay`` seconds."""
    def answer(request: Request) -> tuple[int, dict[str, str], Any]:
        asked = dict(parse_qsl(urlsplit(request.path).query))
        offset, limit = int(asked.get("offset", 0)), int(asked.get("limit", len(records)))
        time.sleep(delay)
        return 200, {"Content-Type": "application/dicom+json"}, records[offset:offset + limit]
    return answer


def search(q: Query, *sources: DicomwebSource, max_results: int = 1000, timeout: float = 5.0,
           cancelled: Any = lambda: False) -> Search:
    return Search(q, sources, {s.name: timeout for s in sources}, max_results, cancelled=cancelled)


def test_answers_in_rule_order_the_first_source_winning_a_conflict() -> None:
    with FakeStow() as first, FakeStow() as second:
        first.answer = serving([study(1, "from first"), study(2, "from first")], delay=0.3)
        second.answer = serving([study(2, "from second"), study(3, "from second")])
        found = list(search(query("STUDY", StudyDescription=""), source(first.url, "a"), source(second.url, "b")))
    assert [(str(m.record.StudyInstanceUID), m.record.StudyDescription, m.source) for m in found] == [
        ("1.2.3.1", "from first", "a"), ("1.2.3.2", "from first", "a"), ("1.2.3.3", "from second", "b")]


def test_a_failing_source_is_reported_beside_the_answers_of_the_other() -> None:
    with FakeStow() as up:
        up.answer = serving([study(1), study(2)])
        down = source("http://127.0.0.1:9/dicom-web", "down")  # nothing listens on the discard port
        asked = search(query("STUDY"), down, source(up.url, "up"))
        found = list(asked)
    assert [m.source for m in found] == ["up", "up"]
    assert [f.source for f in asked.failures] == ["down"]
    assert isinstance(asked.failures[0].error, UpstreamUnavailable)


def test_records_the_query_does_not_match_are_dropped_and_unchecked_ones_flagged() -> None:
    with FakeStow() as server:
        # a server that ignored StudyDescription: one wrong match, one without the key
        server.answer = serving([study(1, "CHEST CT"), study(2, "HEAD CT"), study(3)])
        asked = search(query("STUDY", StudyDescription="CHEST*"), source(server.url, "web"))
        found = [(str(m.record.StudyInstanceUID), m.verified) for m in asked]
    assert found == [("1.2.3.1", True), ("1.2.3.3", False)]
    assert asked.dropped == 1


def test_the_cap_ends_the_answer_and_says_so() -> None:
    with FakeStow() as server:
        server.answer = serving([study(n) for n in range(10)])
        asked = search(query("STUDY"), source(server.url, "web", page_size=3), max_results=4)
        found = list(asked)
    assert len(found) == 4
    assert asked.capped
    with FakeStow() as server:
        server.answer = serving([study(n) for n in range(4)])
        asked = search(query("STUDY"), source(server.url, "web", page_size=3), max_results=4)
        assert len(list(asked)) == 4
        assert not asked.capped  # exactly as many as allowed is no cap


def test_a_cancel_ends_the_wait_for_a_slow_source_at_once() -> None:
    with FakeStow() as server:
        server.answer = serving([study(1)], delay=3.0)
        started = time.monotonic()
        asked = search(query("STUDY"), source(server.url, "slow"), cancelled=lambda: time.monotonic() > started + 0.3)
        with pytest.raises(Cancelled):
            list(asked)
        assert time.monotonic() - started < 1.5


def test_a_source_at_work_past_its_find_timeout_is_not_taken_for_stuck() -> None:
    """Patients counted from studies: no record until every page is read, each page well
    within find_timeout, all of them past it (and past the search's grace)."""
    studies = [study(n, patient="P1") for n in range(8)]
    with FakeStow() as server:
        server.answer = serving(studies, delay=0.45)
        q = query("PATIENT", root="patient", PatientID="", NumberOfPatientRelatedStudies="")
        asked = search(q, source(server.url, "web", page_size=1, find_timeout="1s"), timeout=1.0)
        found = list(asked)
    assert not asked.failures
    assert [(m.record.PatientID, int(m.record.NumberOfPatientRelatedStudies)) for m in found] == [("P1", 8)]


def test_a_source_that_gives_nothing_for_its_find_timeout_fails_the_search() -> None:
    with FakeStow() as server:
        server.answer = serving([study(1)], delay=4.0)
        started = time.monotonic()
        # the source's own requests would wait 10 s: the search gives up after its timeout + grace
        asked = search(query("STUDY"), source(server.url, "stuck", find_timeout="10s"), timeout=1.0)
        assert list(asked) == []
        assert time.monotonic() - started < 5.0
    assert [str(f.error) for f in asked.failures] == ["source stuck: no answer within 1s"]
