"""Delivery workers (bridge.forward.delivery): when a batch that is not full may leave."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest
from peers import wait_for

from bridge.config import DataDir, FolderDestination, Retry
from bridge.forward import delivery
from bridge.forward.delivery import DestinationRunner
from bridge.forward.queue import Queue, Route
from bridge.forward.spool import Spool
from bridge.metrics import Metrics
from bridge.model import Done, Outcome, SpooledInstance


class HeldDestination:
    """Records each batch; the first one is held until ``release`` is set."""

    name = "held"

    def __init__(self, sent: list[list[str]], release: threading.Event) -> None:
        self.sent, self.release = sent, release

    def open(self) -> None:
        pass

    def send(self, batch: Sequence[SpooledInstance]) -> Sequence[Outcome]:
        self.sent.append([i.sop_instance_uid for i in batch])
        if len(self.sent) == 1:
            self.release.wait(30)
        return [Done() for _ in batch]

    def close(self) -> None:
        pass


def instance(spool: Spool, uid: str) -> SpooledInstance:
    temp = spool.new_temp()
    temp.write(uid.encode())
    temp.close()
    path = spool.take(Path(temp.name))
    return SpooledInstance(spool_path=path, size=len(uid), sha256=uid, sop_class_uid="1.2.3", sop_instance_uid=uid,
                           study_uid="1.2", series_uid="1.2.1", transfer_syntax="1.2.840.10008.1.2.1",
                           calling_ae="CT", called_ae="BRIDGE", peer="127.0.0.1", received_at=datetime.now(UTC))


@pytest.fixture
def runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # Rows behind a batch in flight would otherwise be shared after SHARE_AFTER: make
    # that too long to matter, so only flush() can let them go.
    monkeypatch.setattr(delivery, "SHARE_AFTER", 60.0)
    spool = Spool(DataDir(tmp_path))
    spool.open()
    queue = Queue(tmp_path / "queue.sqlite")
    claims: list[int] = []  # the rows each claim took
    claim = queue.claim

    def counted_claim(*args, **kwargs):
        taken = claim(*args, **kwargs)
        claims.append(len(taken))
        return taken

    monkeypatch.setattr(queue, "claim", counted_claim)
    sent: list[list[str]] = []
    release = threading.Event()
    settings = FolderDestination.model_validate({"type": "folder", "path": str(tmp_path / "out"), "workers": 2,
                                                 "batch": {"linger": "0s"}})
    runner = DestinationRunner("held", lambda: HeldDestination(sent, release), settings, Retry(), queue, spool,
                               Metrics())
    runner.start()

    def enqueue(*uids: str) -> None:
        for uid in uids:
            queue.enqueue(instance(spool, uid), [Route("held")])
        runner.queued()

    yield runner, enqueue, sent, release, claims
    release.set()
    runner.request_stop()
    runner.stop(time.monotonic() + 10)
    queue.close()


def test_when_an_association_ends_what_it_left_goes_beside_the_batch_in_flight(runner) -> None:
    """Otherwise it would wait for that batch (or SHARE_AFTER), to make a larger batch of
    what arrives meanwhile; after an association ends, nothing more of it is coming."""
    runner, enqueue, sent, release, _ = runner
    enqueue("1.1")
    wait_for(lambda: sent == [["1.1"]], 10, "the first batch to be in flight")
    enqueue("1.2", "1.3")
    runner.flush()
    wait_for(lambda: sent == [["1.1"], ["1.2", "1.3"]], 10, "the rest sent while the first is still held")
    assert not release.is_set()


def test_rows_behind_a_batch_in_flight_wait_together_without_a_claim_each(runner, monkeypatch) -> None:
    """Behind a batch in flight, rows wait SHARE_AFTER to make one batch: meanwhile each
    new row wakes no worker to look again (a claim query per received instance, under
    the lock intake's commits take), unless the rows would fill a batch."""
    runner, enqueue, sent, release, claims = runner
    monkeypatch.setattr(delivery, "SHARE_AFTER", 1.0)
    enqueue("1.0")
    wait_for(lambda: sent == [["1.0"]], 10, "the first batch to be in flight")
    started, looked = time.monotonic(), len(claims)
    for n in range(1, 9):
        enqueue(f"1.{n}")
    wait_for(lambda: len(sent) == 2, 10, "the rows behind it to go")
    assert time.monotonic() - started >= 0.9  # they waited to be shared
    assert sent[1] == [f"1.{n}" for n in range(1, 9)]
    # before the eight went, one claim found them waiting (not one claim for each)
    assert claims[looked:].index(8) <= 1
    assert not release.is_set()


def test_a_row_queued_while_the_worker_claims_is_not_left_for_the_poll(tmp_path: Path, monkeypatch) -> None:
    """The wake-up for a row that arrives while the worker is still claiming (it found
    nothing and is not waiting yet) is not lost: the row would wait for POLL."""
    monkeypatch.setattr(delivery, "POLL", 30.0)
    spool = Spool(DataDir(tmp_path))
    spool.open()
    queue = Queue(tmp_path / "queue.sqlite")
    sent: list[list[str]] = []
    release = threading.Event()
    release.set()
    settings = FolderDestination.model_validate({"type": "folder", "path": str(tmp_path / "out"),
                                                 "batch": {"linger": "0s"}})
    runner = DestinationRunner("held", lambda: HeldDestination(sent, release), settings, Retry(), queue, spool,
                               Metrics())
    claim = queue.claim

    def racing_claim(*args, **kwargs):
        taken = claim(*args, **kwargs)
        if not taken and not sent:  # a row arrives after the query, before the worker waits
            queue.enqueue(instance(spool, "1.1"), [Route("held")])
            runner.queued()
        return taken

    monkeypatch.setattr(queue, "claim", racing_claim)
    runner.start()
    try:
        wait_for(lambda: sent == [["1.1"]], 5, "the row sent at once, not after POLL")
    finally:
        runner.request_stop()
        runner.stop(time.monotonic() + 10)
        queue.close()


class WorkerKilled(BaseException):
    """Stands for what no worker survives (its loop catches every Exception)."""


class KillingDestination(HeldDestination):
    """Ends the worker thread in the middle of its first batch."""

    def send(self, batch: Sequence[SpooledInstance]) -> Sequence[Outcome]:
        self.sent.append([i.sop_instance_uid for i in batch])
        if len(self.sent) == 1:
            raise WorkerKilled("the worker's end")
        return [Done() for _ in batch]


def test_a_worker_that_ends_is_restarted_and_its_batch_delivered(tmp_path: Path) -> None:
    """A delivery worker that ends anyway gives its claimed rows back; ``supervise`` (the
    daemon's housekeeping) starts another, which delivers them; the restart is counted and
    shown in the destination's state."""
    spool = Spool(DataDir(tmp_path))
    spool.open()
    queue = Queue(tmp_path / "queue.sqlite")
    sent: list[list[str]] = []
    metrics = Metrics()
    settings = FolderDestination.model_validate({"type": "folder", "path": str(tmp_path / "out"),
                                                 "batch": {"linger": "0s"}})
    runner = DestinationRunner("held", lambda: KillingDestination(sent, threading.Event()), settings, Retry(),
                               queue, spool, metrics)
    runner.start()
    try:
        queue.enqueue(instance(spool, "1.1"), [Route("held")])
        runner.queued()
        wait_for(lambda: sent and not runner.busy, 10, "the worker to end in its first batch")
        assert runner.supervise() == 1
        wait_for(lambda: [r.state for r in queue.rows()] == ["done"], 10, "the batch delivered by a new worker")
        assert sent == [["1.1"], ["1.1"]]
        assert metrics.registry.get_sample_value("dicom_bridge_worker_restarts_total", {"destination": "held"}) == 1
        assert "restarted" in queue.destination_states()["held"]["reason"]
        assert runner.supervise() == 0
    finally:
        runner.request_stop()
        runner.stop(time.monotonic() + 10)
        queue.close()


def test_an_outcome_the_locked_queue_refused_is_recorded_once_it_answers(tmp_path: Path) -> None:
    """A batch is sent while another connection holds the queue's write lock past the busy
    timeout: its outcome cannot be recorded. The worker keeps it (the row stays in flight,
    not sent again) and records it once the lock is gone."""
    spool = Spool(DataDir(tmp_path))
    spool.open()
    queue = Queue(tmp_path / "queue.sqlite", busy_timeout=0.1)
    sent: list[list[str]] = []
    release = threading.Event()
    metrics = Metrics()
    settings = FolderDestination.model_validate({"type": "folder", "path": str(tmp_path / "out"),
                                                 "batch": {"linger": "0s"}})
    runner = DestinationRunner("held", lambda: HeldDestination(sent, release), settings, Retry(), queue, spool,
                               metrics)
    runner.start()
    locker = sqlite3.connect(tmp_path / "queue.sqlite", isolation_level=None)
    try:
        queue.enqueue(instance(spool, "1.1"), [Route("held")])
        runner.queued()
        wait_for(lambda: sent == [["1.1"]], 10, "the batch to be in flight")
        locker.execute("BEGIN IMMEDIATE")
        release.set()  # sent: its outcome meets the lock
        errors = {"worker": "deliver-held"}
        wait_for(lambda: (metrics.registry.get_sample_value("dicom_bridge_queue_errors_total", errors) or 0) >= 3,
                 10, "the worker to meet the lock, and go on meeting it")
        assert [r.state for r in queue.rows()] == ["in_flight"]
        locker.execute("ROLLBACK")
        wait_for(lambda: [r.state for r in queue.rows()] == ["done"], 10, "the outcome recorded")
        assert sent == [["1.1"]]  # sent once
        assert runner.busy
    finally:
        locker.close()
        release.set()
        runner.request_stop()
        runner.stop(time.monotonic() + 10)
        queue.close()
