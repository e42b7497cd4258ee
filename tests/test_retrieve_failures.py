"""C-MOVE when things go wrong, and at scale (issue 17).

The sources of one bridge, chosen by the requester's AE title:

  FAKEMOVE  ``fake``: a small DICOMweb server (``retrievepeers.FakeDicomweb``) whose
            QIDO-RS lists every instance of a study and whose WADO-RS can be told to
            lose some of them, or to answer slowly: a deterministic upstream that finds
            what it cannot deliver;
  FALLBACK  ``retrieve: [fake, web]``: what ``fake`` cannot deliver comes from ``web``;
  WEBMOVE   ``web``: Orthanc's DICOMweb, which also holds a study of 1,000 instances;
  DOWNMOVE  ``down``: a DICOMweb URL on a port nobody listens on.

The move destination is a ``storescp +xa`` (``retrievepeers.MoveDestination``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from movescu import (
    CANCEL,
    MOVE_DESTINATION_UNKNOWN,
    OUT_OF_RESOURCES_MATCHES,
    OUT_OF_RESOURCES_SUBOPERATIONS,
    SUCCESS,
    WARNING,
    movescu,
)
from peers import Bridge, Orthanc, free_port, run_dcmtk, wait_for
from retrievepeers import FakeDicomweb, MoveDestination, Study, assert_arrived, ct_instances, upload, vm_hwm

BRIDGE_AE = "RETRIEVEBRIDGE"
BIG = 1000  # instances of the study moved with the bridge's memory watched
RSS_CEILING = 400 * 1024 * 1024


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("retrieve-failures")


@pytest.fixture(scope="module")
def study(workdir: Path) -> Study:
    """Twelve small CT images: in the fake server and in Orthanc."""
    return ct_instances(workdir / "study", 12)


@pytest.fixture(scope="module")
def big(workdir: Path) -> Study:
    return ct_instances(workdir / "big", BIG)


@pytest.fixture(scope="module")
def fake(study: Study) -> Iterator[FakeDicomweb]:
    server = FakeDicomweb()
    server.hold(study)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def fake_reset(fake: FakeDicomweb) -> None:
    fake.reset()


@pytest.fixture(scope="module")
def orthanc(workdir: Path, study: Study, big: Study) -> Iterator[Orthanc]:
    server = Orthanc(workdir / "orthanc").start()
    try:
        upload(server, study.files)
        # one association for the 1,000 (the REST API takes a request per file)
        result = run_dcmtk("storescu", "-aec", server.aet, "+sd", "+r", "127.0.0.1", str(server.dicom_port),
                           str(big.instances[0].path.parent), timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        wait_for(lambda: server.count() == len(study.instances) + BIG, 60, "Orthanc to hold every instance")
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def bridge(workdir: Path, fake: FakeDicomweb, orthanc: Orthanc, move_destination: MoveDestination) -> Iterator[Bridge]:
    config: dict[str, Any] = {
        "ae_title": BRIDGE_AE,
        "nodes": {"STORESCP": {"ae_title": move_destination.aet, "host": "127.0.0.1", "port": move_destination.port}},
        "destinations": {"archive": {"type": "archive"}},
        "sources": {
            "fake": {"type": "dicomweb", "url": fake.url},
            "web": {"type": "dicomweb", "url": orthanc.dicomweb},
            "down": {"type": "dicomweb", "url": f"http://127.0.0.1:{free_port()}/dicom-web"},
        },
        "rules": [
            {"name": "keep", "when": {"calling_ae": "STORESCU"}, "store": ["archive"]},
            {"name": "fake", "when": {"calling_ae": "FAKEMOVE"}, "retrieve": ["fake"]},
            {"name": "fallback", "when": {"calling_ae": "FALLBACK"}, "retrieve": ["fake", "web"]},
            {"name": "web", "when": {"calling_ae": "WEBMOVE"}, "retrieve": ["web"]},
            {"name": "down", "when": {"calling_ae": "DOWNMOVE"}, "retrieve": ["down"]},
        ],
    }
    daemon = Bridge(workdir / "bridge", config)
    try:
        yield daemon.start()
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.kill()


def study_keys(study: Study) -> list[str]:
    return [f"StudyInstanceUID={study.uid}"]


def test_unknown_move_destination(bridge: Bridge, study: Study, destination: MoveDestination) -> None:
    """A Move Destination that is no node's AE title (nor key): 0xA801, nothing sent."""
    result = movescu(bridge.port, "STUDY", study_keys(study), "NOSUCHSCP", calling_ae="FAKEMOVE")
    result.check(MOVE_DESTINATION_UNKNOWN)
    assert destination.files() == []


def test_one_instance_the_source_cannot_deliver(bridge: Bridge, study: Study, fake: FakeDicomweb,
                                                destination: MoveDestination) -> None:
    """QIDO-RS finds it, WADO-RS does not give it: the others arrive, and the final
    status is 0xB000 with that instance, alone, in the Failed SOP Instance UID List."""
    lost = study.instances[4]
    fake.reset(missing=[lost.sop_instance_uid])
    result = movescu(bridge.port, "STUDY", study_keys(study), "STORESCP", calling_ae="FAKEMOVE")
    result.check(WARNING, completed=len(study.instances) - 1)
    assert result.count("failed") == 1, result.summary()
    assert result.failed_uids == [lost.sop_instance_uid]
    assert_arrived(destination.received(), [i for i in study.instances if i is not lost])


def test_every_instance_missing_upstream(bridge: Bridge, study: Study, fake: FakeDicomweb,
                                         destination: MoveDestination) -> None:
    """No sub-operation succeeds: 0xA702, every instance in the Failed SOP Instance UID List."""
    fake.reset(missing=[i.sop_instance_uid for i in study.instances])
    result = movescu(bridge.port, "STUDY", study_keys(study), "STORESCP", calling_ae="FAKEMOVE")
    result.check(OUT_OF_RESOURCES_SUBOPERATIONS)
    assert result.count("completed") in (0, None), result.summary()
    assert result.count("failed") == len(study.instances), result.summary()
    assert sorted(result.failed_uids) == sorted(i.sop_instance_uid for i in study.instances)
    assert destination.files() == []


def test_source_unreachable(bridge: Bridge, study: Study, destination: MoveDestination) -> None:
    """The source's URL is a closed port: the instances cannot even be counted, 0xA701
    with an Error Comment, at once (not after a requester's timeout)."""
    result = movescu(bridge.port, "STUDY", study_keys(study), "STORESCP", calling_ae="DOWNMOVE")
    result.check(OUT_OF_RESOURCES_MATCHES)
    assert result.error_comment, result.summary()
    assert result.seconds < 10
    assert destination.files() == []


def test_cancel_in_the_middle(bridge: Bridge, study: Study, fake: FakeDicomweb,
                              destination: MoveDestination) -> None:
    """movescu --cancel 2: C-CANCEL after two responses, while WADO-RS gives an instance
    every 0.3 s: the move ends 0xFE00 long before the twelve would have come, what
    arrived is whole, and the bridge goes on answering."""
    fake.reset(delay=0.3)
    result = movescu(bridge.port, "STUDY", study_keys(study), "STORESCP", calling_ae="FAKEMOVE",
                     extra=["--cancel", "2"])
    result.check(CANCEL)
    arrived = destination.received()
    assert len(arrived) < len(study.instances)
    assert result.seconds < 0.3 * len(study.instances)
    assert_arrived(arrived, [i for i in study.instances if i.sop_instance_uid in arrived])
    fake.reset()
    destination.clear()
    result = movescu(bridge.port, "STUDY", study_keys(study), "STORESCP", calling_ae="FAKEMOVE")
    result.check(SUCCESS, completed=len(study.instances))


def test_next_source_delivers_what_the_first_cannot(bridge: Bridge, study: Study, fake: FakeDicomweb,
                                                    destination: MoveDestination) -> None:
    """``retrieve: [fake, web]``: the instance ``fake`` loses comes from Orthanc; the
    move succeeds whole, each instance once."""
    lost = study.instances[7]
    fake.reset(missing=[lost.sop_instance_uid])
    result = movescu(bridge.port, "STUDY", study_keys(study), "STORESCP", calling_ae="FALLBACK")
    result.check(SUCCESS, completed=len(study.instances))
    assert result.count("failed") in (0, None) and not result.failed_uids
    assert_arrived(destination.received(), study.instances)
    assert fake.wado_requests(), "the first source was not asked"


def test_a_thousand_instances_in_bounded_memory(bridge: Bridge, big: Study, destination: MoveDestination) -> None:
    """1,000 instances of one series through WADO-RS: all arrive, and the bridge's peak
    resident memory (VmHWM, since it started) stays under 400 MB."""
    assert bridge.proc is not None
    result = movescu(bridge.port, "SERIES", [f"StudyInstanceUID={big.uid}",
                                             f"SeriesInstanceUID={big.instances[0].series_uid}"],
                     "STORESCP", calling_ae="WEBMOVE", timeout=300)
    result.check(SUCCESS, completed=BIG)
    assert len(destination.received()) == BIG
    peak = vm_hwm(bridge.proc.pid)
    assert peak < RSS_CEILING, f"peak RSS {peak >> 20} MB"


def test_a_slow_source_keeps_the_requester_informed(workdir: Path, study: Study, fake: FakeDicomweb,
                                                    destination: MoveDestination) -> None:
    """WADO-RS gives an instance every 6 s; the requester gives up after 8 s without a
    response (movescu --dimse-timeout 8), and the bridge's listener takes 3 s without a
    PDU for a dead association (listen.timeouts.network): the first pending response
    goes before anything is fetched, one more every few seconds while the source is at
    work, and the 12 s move ends whole, cut by neither."""
    config: dict[str, Any] = {
        "ae_title": BRIDGE_AE,
        "listen": {"timeouts": {"network": "3s"}},
        "nodes": {"STORESCP": {"ae_title": destination.aet, "host": "127.0.0.1", "port": destination.port}},
        "destinations": {"archive": {"type": "archive"}},
        "sources": {"fake": {"type": "dicomweb", "url": fake.url}},
        "rules": [{"name": "fake", "retrieve": ["fake"]}],
    }
    slow = Bridge(workdir / "slow-bridge", config).start()
    try:
        fake.reset(delay=6.0)
        two = study.instances[:2]
        keys = [f"StudyInstanceUID={study.uid}", "SOPInstanceUID=" + "\\".join(i.sop_instance_uid for i in two)]
        result = movescu(slow.port, "IMAGE", keys, "STORESCP", calling_ae="SLOWMOVE", extra=["-td", "8"])
        result.check(SUCCESS, completed=2)
        assert result.seconds >= 10, "the source was not slow: the test proves nothing"
        assert_arrived(destination.received(), two)
    finally:
        slow.stop()
