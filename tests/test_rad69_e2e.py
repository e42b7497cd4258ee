"""C-MOVE, C-GET and ``rad69 fetch`` through a ``rad69`` source, end to end (issue 19).

The fake Imaging Document Source (``fakeids``) holds a study of mixed SOP classes and
transfer syntaxes (``retrievepeers.mixed_study``) and a series of 300 small CT images.
One bridge has three ``rad69`` sources on it, chosen by the requester's AE title:

  R69WEB    ``ids-web``: located through Orthanc's DICOMweb, which holds the mixed study;
  R69LOCAL  ``ids-local``: located through ``local``, the bridge's archive, which holds
            the mixed study and the 300 (``storescu`` from STORESCU, a store rule);
  R69BIG    ``ids-big``: as ``ids-local``, in batches of 50, for the 300.

``ids-web`` and ``ids-local`` ask in batches of at most 3 documents, 2 requests in
flight, and offer explicit VR little endian first and then every syntax of the study, so
the fake sends each file as it holds it and each arrives at a ``storescp +xa`` with its
data set byte for byte the study's file (``retrievepeers.assert_arrived``). DCMTK
``getscu`` proposes uncompressed syntaxes only (compressed instances arrive decompressed)
and does not read a final failure response's data set, so C-GET in every syntax and its
Failed SOP Instance UID List are checked with pynetdicom as the requester.
"""

from __future__ import annotations

import math
import multiprocessing
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import forkserver
import pytest
import yaml
from corpus import data_set_bytes, needs_codecs
from fakeids import FakeImagingDocumentSource
from movescu import OUT_OF_RESOURCES_SUBOPERATIONS, SUCCESS, WARNING, RetrieveResult, getscu, movescu
from peers import Bridge, Orthanc, storescu, wait_for
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet
from retrievepeers import (
    Instance,
    MoveDestination,
    Study,
    assert_arrived,
    ct_instances,
    mixed_study,
    received,
    store_each_in_its_syntax,
    upload,
    vm_hwm,
)

BRIDGE_AE = "R69BRIDGE"
REPOSITORY = "1.3.6.1.4.1.21367.13.80.110"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
BATCH = 3
BIG = 300
RSS_CEILING = 400 * 1024 * 1024
QUICK = 20.0  # seconds: a failure answer ends the retrieval well within this, never a hang
SOURCES = {"web": "R69WEB", "local": "R69LOCAL"}  # how a test names a source -> the calling AE that picks it


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("rad69-e2e")


@pytest.fixture(scope="module")
def study(workdir: Path) -> Study:
    return mixed_study(workdir / "mixed")


@pytest.fixture(scope="module")
def big(workdir: Path) -> Study:
    return ct_instances(workdir / "big", BIG)


@pytest.fixture(scope="module")
def syntaxes(study: Study) -> list[str]:
    """Explicit VR little endian, then every syntax of the study: each file goes as stored."""
    return list(dict.fromkeys([EXPLICIT_LE, *sorted(i.transfer_syntax for i in study.instances)]))


@pytest.fixture(scope="module")
def fake(study: Study, big: Study) -> Iterator[FakeImagingDocumentSource]:
    server = FakeImagingDocumentSource(repository_unique_id=REPOSITORY).start()
    server.hold(study.files).hold(big.files)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def fake_reset(fake: FakeImagingDocumentSource) -> None:
    fake.reset()


@pytest.fixture(scope="module")
def orthanc(workdir: Path, study: Study) -> Iterator[Orthanc]:
    server = Orthanc(workdir / "orthanc").start()
    try:
        upload(server, study.files)
        yield server
    finally:
        server.stop()


def rad69(fake: FakeImagingDocumentSource, locate: str, syntaxes: list[str], **more: Any) -> dict[str, Any]:
    return {"type": "rad69", "url": fake.url, "repository_unique_id": REPOSITORY, "locate": locate,
            "transfer_syntaxes": syntaxes, "batch_size": BATCH, "parallel": 2, "retrieve_timeout": "10s", **more}


@pytest.fixture(scope="module")
def bridge(workdir: Path, fake: FakeImagingDocumentSource, orthanc: Orthanc, move_destination: MoveDestination,
           study: Study, big: Study, syntaxes: list[str]) -> Iterator[Bridge]:
    config: dict[str, Any] = {
        "ae_title": BRIDGE_AE,
        "nodes": {"STORESCP": {"ae_title": move_destination.aet, "host": "127.0.0.1", "port": move_destination.port}},
        "destinations": {"archive": {"type": "archive"}},
        "sources": {
            "orthanc": {"type": "dicomweb", "url": orthanc.dicomweb},
            "ids-web": rad69(fake, "orthanc", syntaxes),
            "ids-local": rad69(fake, "local", syntaxes),
            "ids-big": rad69(fake, "local", syntaxes, batch_size=50, parallel=4),
        },
        "rules": [
            {"name": "keep", "when": {"calling_ae": "STORESCU"}, "store": ["archive"]},
            {"name": "web", "when": {"calling_ae": "R69WEB"}, "retrieve": ["ids-web"]},
            {"name": "local", "when": {"calling_ae": "R69LOCAL"}, "retrieve": ["ids-local"]},
            {"name": "big", "when": {"calling_ae": "R69BIG"}, "retrieve": ["ids-big"]},
        ],
    }
    daemon = Bridge(workdir / "bridge", config)
    try:
        daemon.start()
        store_each_in_its_syntax(daemon.port, study.files)
        result = storescu(daemon.port, big.files)
        assert result.statuses == [0] * BIG, result.output[-3000:]
        total = len(study.instances) + BIG
        wait_for(lambda: daemon.queue_states() == {"done": total}, 60, "the archive to hold both studies")
        yield daemon
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.kill()


def move(bridge: Bridge, study: Study, source: str = "web", root: str = "study") -> RetrieveResult:
    keys = [f"StudyInstanceUID={study.uid}"]
    if root == "patient":
        keys = [f"PatientID={study.patient_id}", *keys]
    return movescu(bridge.port, "STUDY", keys, "STORESCP", root=root, calling_ae=SOURCES[source], timeout=60)


def uids(instances: list[Instance]) -> list[str]:
    return sorted(i.sop_instance_uid for i in instances)


def assert_complete(result: RetrieveResult, count: int) -> None:
    result.check(SUCCESS, completed=count)
    assert result.count("failed") in (0, None) and result.count("warning") in (0, None), result.summary()
    assert not result.failed_uids


# -- every instance, unchanged ----------------------------------------------------------------------


@pytest.mark.parametrize("root", ["study", "patient"])
@pytest.mark.parametrize("source", list(SOURCES))
def test_move_delivers_every_instance_unchanged(source: str, root: str, bridge: Bridge, study: Study,
                                                destination: MoveDestination) -> None:
    assert any(i.compressed for i in study.instances) and len({i.sop_class_uid for i in study.instances}) > 3
    result = move(bridge, study, source, root)
    assert_complete(result, len(study.instances))
    assert_arrived(destination.received(), study.instances)


@needs_codecs
@pytest.mark.parametrize("source", list(SOURCES))
def test_getscu_receives_every_instance(source: str, bridge: Bridge, study: Study, tmp_path: Path) -> None:
    """getscu proposes the uncompressed syntaxes only: the uncompressed instances arrive
    byte for byte, the compressed ones decompressed with the same pixels."""
    result = getscu(bridge.port, "STUDY", [f"StudyInstanceUID={study.uid}"], tmp_path / "got",
                    calling_ae=SOURCES[source], timeout=60)
    assert_complete(result, len(study.instances))
    assert_arrived(received(result.files), study.instances, convert=True)


def test_requests_grouped_per_series_in_batches(bridge: Bridge, study: Study,
                                                fake: FakeImagingDocumentSource) -> None:
    """One request per batch of at most 3 documents of one series, every document asked
    once, explicit VR little endian offered, a fresh MessageID each."""
    assert_complete(move(bridge, study), len(study.instances))
    requests = fake.requests()
    assert all(r.rejected is None for r in requests), [r.rejected for r in requests]
    asked = sorted(d.document for r in requests for d in r.documents)
    assert asked == uids(study.instances)
    per_series: dict[str, list[int]] = {}
    for r in requests:
        assert list(r.studies) == [study.uid] and len(r.studies[study.uid]) == 1, r.studies
        (series,) = r.studies[study.uid]
        per_series.setdefault(series, []).append(len(r.documents))
        assert EXPLICIT_LE in r.transfer_syntaxes
        assert all(d.repository == REPOSITORY for d in r.documents)
    for i in study.instances:
        assert i.series_uid in per_series
    for series, sizes in per_series.items():
        count = sum(1 for i in study.instances if i.series_uid == series)
        assert sorted(sizes, reverse=True) == [min(BATCH, count - BATCH * n) for n in range(math.ceil(count / BATCH))]
    assert len(requests) == sum(math.ceil(len(study.in_series(name)) / BATCH)
                                for name in {i.series for i in study.instances})
    ids = [r.message_id for r in requests]
    assert len(set(ids)) == len(ids) and all(ids)


# -- partial answers and failures -------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["partial", "partial-oasis"])
@pytest.mark.parametrize("source", list(SOURCES))
def test_partial_success_fails_exactly_the_missing(mode: str, source: str, bridge: Bridge, study: Study,
                                                   fake: FakeImagingDocumentSource,
                                                   destination: MoveDestination) -> None:
    """An MR and an SC document missing, each in a batch with others (MR: 3 and 2, SC:
    2): PartialSuccess; the rest arrive, 0xB000 names those two."""
    lost = [study.in_series("MR")[1], study.in_series("SC")[0]]
    fake.reset(mode, missing=[i.sop_instance_uid for i in lost])
    result = move(bridge, study, source)
    result.check(WARNING, completed=len(study.instances) - len(lost))
    assert result.count("failed") == len(lost), result.summary()
    assert sorted(result.failed_uids) == uids(lost)
    assert_arrived(destination.received(), [i for i in study.instances if i not in lost])


@pytest.mark.parametrize("how", ["none", "all-missing", "unknown-repository", "fault", "bad-gateway"])
def test_nothing_comes_every_instance_fails(how: str, bridge: Bridge, study: Study,
                                            fake: FakeImagingDocumentSource, destination: MoveDestination) -> None:
    if how == "all-missing":
        fake.reset("partial", missing=[i.sop_instance_uid for i in study.instances])
    else:
        fake.reset(how)
    result = move(bridge, study)
    result.check(OUT_OF_RESOURCES_SUBOPERATIONS)
    assert result.seconds < QUICK
    assert result.count("completed") in (0, None), result.summary()
    assert result.count("failed") == len(study.instances), result.summary()
    assert sorted(result.failed_uids) == uids(study.instances)
    assert destination.files() == []
    assert fake.requests(), "the fake was not asked"


def test_a_dropped_connection_fails_what_did_not_come(bridge: Bridge, study: Study,
                                                      fake: FakeImagingDocumentSource,
                                                      destination: MoveDestination) -> None:
    """Each answer is cut half-way through its second document (its only one, for a
    batch of one): the first document of each batch of several arrives whole, the rest
    fail with 0xB000, at once."""
    fake.reset("drop")
    result = move(bridge, study)
    assert result.seconds < QUICK
    came = {r.documents[0].document for r in fake.requests() if len(r.documents) > 1}
    assert came, "no batch of several documents: the test proves nothing"
    result.check(WARNING, completed=len(came))
    assert sorted(result.failed_uids) == sorted(set(uids(study.instances)) - came)
    assert_arrived(destination.received(), [i for i in study.instances if i.sop_instance_uid in came])


@dataclass
class GetResult:
    statuses: list[int]
    failed_uids: list[str]  # the final response's Failed SOP Instance UID List
    data_sets: dict[str, bytes]  # SOP Instance UID -> the data set as it came off the wire
    seconds: float


def pynetdicom_get(port: int, study: Study, calling_ae: str) -> GetResult:
    """A Study Root C-GET of ``study`` from pynetdicom: DCMTK's getscu does not read the
    data set of a final failure response, so the Failed SOP Instance UID List is read
    here. One presentation context per SOP class and transfer syntax of the study, so
    each instance can come as it is stored."""
    data_sets: dict[str, bytes] = {}

    def on_store(event: evt.Event) -> int:
        data_sets[str(event.dataset.SOPInstanceUID)] = event.request.DataSet.getvalue()
        return 0x0000

    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    pairs = sorted({(i.sop_class_uid, i.transfer_syntax) for i in study.instances})
    for sop_class, syntax in pairs:
        ae.add_requested_context(sop_class, [syntax])
    roles = [build_role(sop_class, scp_role=True) for sop_class in sorted({c for c, _ in pairs})]
    started = time.monotonic()
    assoc = ae.associate("127.0.0.1", port, ae_title=BRIDGE_AE, ext_neg=roles,
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study.uid
    try:
        answers = list(assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet))
    finally:
        assoc.release()
    statuses = [int(status.Status) for status, _ in answers if "Status" in status]
    final = answers[-1][1]
    failed = final.get("FailedSOPInstanceUIDList", []) if final is not None else []
    failed = [str(failed)] if isinstance(failed, str) else [str(u) for u in failed]
    return GetResult(statuses, failed, data_sets, time.monotonic() - started)


@pytest.mark.parametrize("mode", ["ok", "partial", "fault"])
def test_c_get_in_every_syntax_and_its_failures(mode: str, bridge: Bridge, study: Study,
                                                fake: FakeImagingDocumentSource) -> None:
    """C-GET through ``ids-local`` with a context for each syntax of the study: every
    instance arrives, its data set byte for byte; a partial answer gives the others so
    and 0xB000 naming the missing one; a SOAP Fault 0xA702 naming every instance, quickly."""
    lost = study.in_series("MR")[1]
    fake.reset(mode, missing=[lost.sop_instance_uid] if mode == "partial" else [])
    # In a fresh process: earlier tests of this session may have left pynetdicom's process
    # globals changed (the bridge's overrides installed in-process), which would make
    # this client, not the bridge, refuse the C-STOREs it is sent.
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        result = pool.submit(pynetdicom_get, bridge.port, study, "R69LOCAL").result(timeout=120)
    assert result.seconds < QUICK
    if mode == "ok":
        assert result.statuses[-1] == SUCCESS and not result.failed_uids, result.statuses
        expected = study.instances
    elif mode == "partial":
        assert result.statuses[-1] == WARNING, result.statuses
        assert result.failed_uids == [lost.sop_instance_uid]
        expected = [i for i in study.instances if i is not lost]
    else:
        assert result.statuses[-1] == OUT_OF_RESOURCES_SUBOPERATIONS, result.statuses
        assert sorted(result.failed_uids) == uids(study.instances)
        expected = []
    assert set(result.statuses[:-1]) <= {0xFF00}, result.statuses
    assert sorted(result.data_sets) == uids(expected)
    for instance in expected:
        assert result.data_sets[instance.sop_instance_uid] == data_set_bytes(instance.path), instance.path.name


# -- several hundred instances ----------------------------------------------------------------------


def test_several_hundred_instances_in_bounded_memory(bridge: Bridge, big: Study, fake: FakeImagingDocumentSource,
                                                     destination: MoveDestination) -> None:
    assert bridge.proc is not None
    result = movescu(bridge.port, "SERIES", [f"StudyInstanceUID={big.uid}",
                                             f"SeriesInstanceUID={big.instances[0].series_uid}"],
                     "STORESCP", calling_ae="R69BIG", timeout=120)
    assert_complete(result, BIG)
    assert_arrived(destination.received(), big.instances)
    assert len(fake.requests()) == BIG // 50
    peak = vm_hwm(bridge.proc.pid)
    assert peak < RSS_CEILING, f"peak RSS {peak >> 20} MB"


# -- dicom-bridge rad69 fetch -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def fetch_config(workdir: Path, fake: FakeImagingDocumentSource, orthanc: Orthanc, syntaxes: list[str]) -> Path:
    settings = {
        "data_dir": str(workdir / "fetch-data"),
        "destinations": {"out": {"type": "folder", "path": str(workdir / "fetch-routed")}},
        "sources": {"orthanc": {"type": "dicomweb", "url": orthanc.dicomweb},
                    "ids": rad69(fake, "orthanc", syntaxes)},
    }
    path = workdir / "fetch.yaml"
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return path


def fetch(config: Path, study: Study, out: Path) -> subprocess.CompletedProcess[str]:
    return forkserver.run(["rad69", "fetch", "--config", str(config), "--study", study.uid, "-o", str(out)],
                          timeout=60)


def test_fetch_writes_every_file_as_the_source_holds_it(fetch_config: Path, study: Study, tmp_path: Path) -> None:
    result = fetch(fetch_config, study, tmp_path / "out")
    assert result.returncode == 0, result.stdout + result.stderr
    got = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    assert got == {f"{i.sop_instance_uid}.dcm": i.path.read_bytes() for i in study.instances}
    assert f"{len(study.instances)} retrieved, 0 failed of {len(study.instances)} located" in result.stdout


def test_fetch_with_a_partial_answer_names_the_missing_and_exits_1(fetch_config: Path, study: Study,
                                                                   fake: FakeImagingDocumentSource,
                                                                   tmp_path: Path) -> None:
    lost = study.in_series("MR")[1]
    fake.reset("partial", missing=[lost.sop_instance_uid])
    result = fetch(fetch_config, study, tmp_path / "out")
    assert result.returncode == 1, result.stdout + result.stderr
    failed = [line for line in result.stderr.splitlines() if ": failed: " in line]
    assert len(failed) == 1, result.stderr
    assert failed[0].startswith(f"{lost.sop_instance_uid}: failed: ")
    assert "XDSMissingDocument" in failed[0] and "PartialSuccess" in failed[0], failed[0]
    got = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    assert got == {f"{i.sop_instance_uid}.dcm": i.path.read_bytes() for i in study.instances if i is not lost}
    assert f"{len(study.instances) - 1} retrieved, 1 failed of {len(study.instances)} located" in result.stdout
