"""The queue's contract, through its public interface, on a real SQLite file."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from peers import wait_for

from bridge.config import Retry
from bridge.forward.queue import Queue, Route
from bridge.model import Done, Duplicate, Permanent, SpooledInstance, Transient

RETRY = Retry(initial=60, max=600, max_attempts=3, max_age=3600)


def instance(uid: str, content: str = "a", size: int = 100, received: float | None = None) -> SpooledInstance:
    return SpooledInstance(
        spool_path=Path(f"/spool/{uid}-{content}.dcm"), size=size, sha256=content * 64,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2", sop_instance_uid=uid, study_uid="1.2.3",
        series_uid="1.2.3.4", transfer_syntax="1.2.840.10008.1.2.1", calling_ae="CT1", called_ae="BRIDGE",
        peer="127.0.0.1", received_at=datetime.fromtimestamp(received or time.time(), UTC),
        patient_id="PID", accession_number="ACC",
    )


@pytest.fixture
def queue(tmp_path):
    q = Queue(tmp_path / "queue.sqlite")
    yield q
    q.close()


def states(queue: Queue) -> dict[str, str]:
    return {r.instance.sop_instance_uid + "/" + r.instance.sha256[0]: r.state for r in queue.rows()}


def test_claims_in_priority_then_arrival_order(queue):
    for n in range(5):
        queue.enqueue(instance(f"1.{n}"), [Route("d")])
    queue.enqueue(instance("9.9"), [Route("d", priority=10)])
    claimed = queue.claim("d", 3, 10**9)
    assert [r.instance.sop_instance_uid for r in claimed] == ["9.9", "1.0", "1.1"]
    assert [r.instance.sop_instance_uid for r in queue.claim("d", 10, 10**9)] == ["1.2", "1.3", "1.4"]
    assert queue.claim("d", 10, 10**9) == []


def test_a_batch_closes_at_max_bytes_but_takes_at_least_one(queue):
    for n in range(3):
        queue.enqueue(instance(f"1.{n}", size=1000), [Route("d")])
    assert len(queue.claim("d", 10, 1500)) == 1
    assert len(queue.claim("d", 10, 10)) == 1  # larger than max_bytes, still goes


def test_a_partial_batch_waits_for_partial_after_but_a_full_one_goes(queue):
    now = time.time()
    queue.enqueue(instance("1.0", received=now), [Route("d")])
    waiting = queue.claim("d", 3, 10**9, partial_after=60)
    assert waiting == [] and waiting.waiting == 1  # one of three, just arrived
    assert 59 < waiting.due_in <= 60  # and due in a minute
    for n in (1, 2):
        queue.enqueue(instance(f"1.{n}", received=now), [Route("d")])
    assert len(queue.claim("d", 3, 10**9, partial_after=60)) == 3  # full: goes at once
    queue.enqueue(instance("2.0"), [Route("d")])
    assert queue.claim("d", 3, 10**9, partial_after=0.3) == []
    claimed = wait_for(lambda: queue.claim("d", 3, 10**9, partial_after=0.3), 5, "the partial batch to be due")
    assert [r.instance.sop_instance_uid for r in claimed] == ["2.0"]  # waited long enough


def test_transient_retries_with_backoff_then_dies(queue):
    retry = Retry(initial=0.2, max=0.3, max_attempts=3, max_age=3600)
    queue.enqueue(instance("1.1"), [Route("d")])
    for attempt in range(1, 3):
        rows = wait_for(lambda: queue.claim("d", 1, 10**9), 5, "the row to be due")
        queue.record(rows, [Transient("busy")], retry)
        row = queue.rows()[0]
        assert (row.state, row.attempts, row.last_error) == ("pending", attempt, "busy")
        assert row.next_attempt_at > time.time() + 0.1  # backed off, with jitter
        assert queue.claim("d", 1, 10**9) == []  # not due yet
    rows = wait_for(lambda: queue.claim("d", 1, 10**9), 5, "the row to be due")
    queue.record(rows, [Transient("busy")], retry)
    row = queue.rows()[0]
    assert row.state == "dead"
    assert "after 3 attempts" in row.last_error


def test_permanent_is_dead_at_once_and_keeps_its_file(queue):
    queue.enqueue(instance("1.1"), [Route("a"), Route("b")])
    rows_a = queue.claim("a", 1, 10**9)
    assert queue.record(rows_a, [Permanent("bad pixel data")], RETRY) == []
    rows_b = queue.claim("b", 1, 10**9)
    assert queue.record(rows_b, [Done()], RETRY) == []  # the dead row still needs the file
    assert queue.retry_dead() == 1
    rows_a = queue.claim("a", 1, 10**9)
    assert rows_a[0].attempts == 0
    released = queue.record(rows_a, [Duplicate()], RETRY)
    assert released == [Path("/spool/1.1-a.dcm")]


def test_release_charges_nothing(queue):
    queue.enqueue(instance("1.1"), [Route("d")])
    rows = queue.claim("d", 1, 10**9)
    queue.release(rows, time.time() + 100, "connection refused")
    row = queue.rows()[0]
    assert (row.state, row.attempts, row.last_error) == ("pending", 0, "connection refused")
    assert queue.claim("d", 1, 10**9) == []


def test_recover_puts_in_flight_rows_back(tmp_path):
    q = Queue(tmp_path / "q.sqlite")
    q.enqueue(instance("1.1"), [Route("d")])
    assert len(q.claim("d", 1, 10**9)) == 1
    q.close()
    q = Queue(tmp_path / "q.sqlite")
    assert q.recover() == 1
    assert len(q.claim("d", 1, 10**9)) == 1
    q.close()


def test_supersede_cancels_older_pending_content(queue):
    queue.enqueue(instance("1.1", "a"), [Route("d")])
    result = queue.enqueue(instance("1.1", "b"), [Route("d")])
    assert result.row_ids and not result.skipped
    assert states(queue) == {"1.1/a": "cancelled", "1.1/b": "pending"}


def test_the_same_content_again_is_a_harmless_resend(queue):
    queue.enqueue(instance("1.1", "a"), [Route("d")])
    result = queue.enqueue(instance("1.1", "a"), [Route("d")])
    assert result.row_ids == [] and "same content" in result.skipped["d"]
    rows = queue.claim("d", 1, 10**9)
    queue.record(rows, [Done()], RETRY)
    assert queue.enqueue(instance("1.1", "a"), [Route("d")]).row_ids == []


def test_keep_first_and_keep_both(queue):
    routes = [Route("first", duplicates="keep-first"), Route("both", duplicates="keep-both")]
    queue.enqueue(instance("1.1", "a"), routes)
    result = queue.enqueue(instance("1.1", "b"), [Route("first", duplicates="keep-first"),
                                                   Route("both", duplicates="keep-both")])
    assert "keep-first" in result.skipped["first"]
    assert len(result.row_ids) == 1
    assert [r.state for r in queue.rows(destination="both")] == ["pending", "pending"]


def test_a_uid_never_overtakes_its_earlier_row(queue):
    queue.enqueue(instance("1.1", "a"), [Route("d", duplicates="keep-both")])
    queue.enqueue(instance("1.1", "b"), [Route("d", duplicates="keep-both")])
    first = queue.claim("d", 10, 10**9)
    assert [r.instance.sha256[0] for r in first] == ["a"]
    assert queue.claim("d", 10, 10**9) == []  # b waits for a
    queue.record(first, [Done()], RETRY)
    assert [r.instance.sha256[0] for r in queue.claim("d", 10, 10**9)] == ["b"]


def test_rows_expire_by_max_age(queue):
    queue.enqueue(instance("1.1", received=time.time() - 7200), [Route("d")])
    queue.enqueue(instance("1.2"), [Route("d")])
    assert queue.expire({"d": RETRY}) == 1
    assert {r.instance.sop_instance_uid: r.state for r in queue.rows()} == {"1.1": "dead", "1.2": "pending"}
    assert "expired" in queue.rows(state="dead")[0].last_error


def test_filters_answer_did_study_x_arrive(queue):
    queue.enqueue(instance("1.1"), [Route("cloud"), Route("pacs")])
    assert len(queue.rows(study_uid="1.2.3")) == 2
    assert len(queue.rows(destination="cloud", accession_number="ACC")) == 1
    assert queue.rows(patient_id="nobody") == []
    assert queue.counts() == {("cloud", "pending"): 1, ("pacs", "pending"): 1}


def test_rows_carry_the_attributes_read_at_intake(queue):
    from dataclasses import replace

    attrs = {"PatientName": "Äneas^Rüdiger", "Modality": "CT", "StudyDate": "20261122"}
    queue.enqueue(replace(instance("1.1"), attributes=attrs), [Route("archive")])
    (row,) = queue.claim("archive", 10, 1 << 30)
    assert row.instance.attributes == attrs


def test_a_queue_of_schema_version_1_gains_the_attributes_column(tmp_path):
    import sqlite3

    path = tmp_path / "queue.sqlite"
    q = Queue(path)
    q.enqueue(instance("1.1"), [Route("archive")])
    q.close()
    db = sqlite3.connect(path)  # what version 1 wrote: no attributes column
    db.execute("ALTER TABLE queue DROP COLUMN attributes")
    db.commit()
    db.close()
    q = Queue(path)
    try:
        q.enqueue(instance("1.2"), [Route("archive")])
        assert [r.instance.attributes for r in q.claim("archive", 10, 1 << 30)] == [{}, {}]
    finally:
        q.close()


def test_a_dead_row_keeps_the_status_that_failed_it_also_in_a_queue_of_schema_version_3(tmp_path):
    import sqlite3

    path = tmp_path / "queue.sqlite"
    Queue(path).close()
    db = sqlite3.connect(path)  # what version 3 wrote: no failure_status column
    db.execute("ALTER TABLE queue DROP COLUMN failure_status")
    db.commit()
    db.close()
    q = Queue(path)
    try:
        q.enqueue(instance("1.1"), [Route("a"), Route("b"), Route("c")])
        for name, outcome in (("a", Permanent("0xA900 refused", 0xA900)), ("b", Permanent("modify: no")),
                              ("c", Transient("0xA700 busy", status=0xA700))):
            q.record(q.claim(name, 1, 10**9), [outcome], Retry(initial=60, max=600, max_attempts=1, max_age=3600))
        found = q.delivery_states("1.1", "a" * 64, ["a", "b", "c"])
        assert found == {"a": ("dead", "0xA900 refused", 0xA900), "b": ("dead", "modify: no", None),
                          "c": ("dead", "0xA700 busy (after 1 attempts)", 0xA700)}
    finally:
        q.close()
