"""``retrieve`` of the ``dimse`` source (bridge/sources/dimse_retrieve.py): instances
fetched from a real Orthanc by C-GET, and by C-MOVE to the bridge's own listener.

The bridge runs in this process (``bridge.daemon.Daemon``: its listener, store service
and queue, with pynetdicom's overrides installed as the daemon installs them, and every
pynetdicom and pydicom global they change restored at the end of the module), so the
C-MOVE's sub-operations reach the source's retrieval through the listener, and what
reaches the queue is read through ``Queue.counts()``. Orthanc holds one study of two
series: one of pydicom's files in many SOP classes and transfer syntaxes (compressed
ones too), uploaded through its REST API so that it keeps them as they are; one of
generated CT images.
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from corpus import TEST_FILES, ct_series, data_set_bytes
from peers import Orthanc, free_port, run_dcmtk, wait_for
from pydicom.uid import generate_uid

from bridge.cli import report
from bridge.config import Config
from bridge.config.load import validate
from bridge.daemon import Daemon
from bridge.errors import UpstreamUnavailable
from bridge.metrics import Metrics
from bridge.model import InstanceRef, Retrieved
from bridge.sources import build, temp_dir

BRIDGE_AE = "BRIDGE"
MOVE_AE = "BRIDGE-MV"  # the move destination of the source "elsewhere"
# pydicom's files in one series: several SOP classes, and syntaxes Orthanc keeps as they come.
MIXED = ["CT_small.dcm", "MR_small_implicit.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm",
         "MR_small_jpeg_ls_lossless.dcm", "JPEG-lossy.dcm", "SC_rgb_jpeg_dcmtk.dcm", "rtplan.dcm"]
HOW = ["c-get", "c-move"]


# -- what Orthanc holds ---------------------------------------------------------------------


class Holdings:
    def __init__(self, folder: Path) -> None:
        self.study = generate_uid()
        self.mixed_series = generate_uid()
        self.files: dict[str, Path] = {}  # SOP Instance UID -> the file uploaded
        self.mixed: list[InstanceRef] = []
        for name in MIXED:
            ds = pydicom.dcmread(TEST_FILES / name)
            ds.StudyInstanceUID, ds.SeriesInstanceUID = self.study, self.mixed_series
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.PatientID, ds.PatientName = "RETRIEVE", "Retrieve^Test"
            written = folder / f"pydicom-{name}"
            ds.save_as(written, enforce_file_format=True)
            # In the form DCMTK (Orthanc's) sends a data set: explicit lengths of sequences
            # and items, no Data Set Trailing Padding (PS3.10 7.2: for media), encapsulated
            # Pixel Data as OB. Orthanc keeps a file as it was uploaded, and what it holds
            # is then what it sends.
            path = folder / name
            converted = run_dcmtk("dcmconv", "-p", "+e", str(written), str(path))
            assert converted.returncode == 0, converted.stderr
            self.mixed.append(self._add(path))
        self.ct = [self._add(p) for p in ct_series(folder / "ct", 6, 256, study_uid=self.study)]

    def _add(self, path: Path) -> InstanceRef:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        self.files[ds.SOPInstanceUID] = path
        return InstanceRef(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.SOPClassUID)


def upload(orthanc: Orthanc, path: Path) -> str:
    request = urllib.request.Request(orthanc.url + "/instances", data=path.read_bytes(), method="POST",
                                     headers={"Content-Type": "application/dicom"})
    with urllib.request.urlopen(request, timeout=30) as response:
        import json

        return str(json.loads(response.read())["ID"])


class Bridge:
    """The daemon in this process, its configuration, and Orthanc as its node."""

    def __init__(self, daemon: Daemon, config: Config, orthanc: Orthanc, ids: dict[str, str]) -> None:
        self.daemon, self.config, self.orthanc, self.ids = daemon, config, orthanc, ids
        self.metrics = Metrics()
        self.temp_dir = temp_dir(config)

    def source(self, name: str) -> Any:
        return build(name, self.config, self.metrics)

    def queued(self) -> int:
        assert self.daemon.queue is not None
        return sum(self.daemon.queue.counts().values())

    def leftovers(self, name: str) -> list[Path]:
        return sorted(self.temp_dir.glob(f"retrieved-{name}-*"))

    def connections_to_orthanc(self) -> int:
        """Established TCP connections to Orthanc's DICOM port (this machine's /proc/net/tcp)."""
        port = f"{self.orthanc.dicom_port:04X}"
        count = 0
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[2].endswith(f":{port}") and fields[3] == "01":
                count += 1
        return count


@pytest.fixture(scope="module")
def holdings(tmp_path_factory: pytest.TempPathFactory) -> Holdings:
    return Holdings(tmp_path_factory.mktemp("retrieve-holdings"))


@pytest.fixture(scope="module")
def bridge(tmp_path_factory: pytest.TempPathFactory, holdings: Holdings,
           pynetdicom_restored_after_module: None) -> Iterator[Bridge]:
    work = tmp_path_factory.mktemp("retrieve")
    port = free_port()
    modalities = {"bridge": {"AET": BRIDGE_AE, "Host": "127.0.0.1", "Port": port},
                  "moved": {"AET": MOVE_AE, "Host": "127.0.0.1", "Port": port}}
    orthanc = Orthanc(work / "orthanc", extra={"DicomModalities": modalities, "DicomAlwaysAllowFind": True}).start()
    node = {"ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}
    raw: dict[str, Any] = {
        "ae_title": BRIDGE_AE,
        "data_dir": str(work / "data"),
        "listen": {"host": "127.0.0.1", "port": port},
        "spool": {"min_free": "16MiB"},
        "accept": {"check_called_ae": True},
        "nodes": {"pacs": node},
        "destinations": {"kept": {"type": "folder", "path": str(work / "kept")}},
        "sources": {
            "got": {"type": "dimse", "node": "pacs", "retrieve": "c-get", "retrieve_timeout": "10s"},
            "moved": {"type": "dimse", "node": "pacs", "retrieve": "c-move", "retrieve_timeout": "10s"},
            "elsewhere": {"type": "dimse", "node": "pacs", "retrieve": "c-move", "move_destination_ae": MOVE_AE,
                          "retrieve_timeout": "10s"},
        },
        "rules": [{"name": "keep", "store": ["kept"]}],
    }
    config = validate(raw, base=work)
    daemon = Daemon(config)
    try:
        daemon.start()
        ids = {uid: upload(orthanc, path) for uid, path in holdings.files.items()}
        yield Bridge(daemon, config, orthanc, ids)
    finally:
        daemon.stop()
        orthanc.stop()


def fetched(results: Iterator[Retrieved | None], deadline: float = 60) -> list[Retrieved]:
    """Every ``Retrieved`` the generator yields (heartbeats skipped), within ``deadline`` seconds."""
    end = time.monotonic() + deadline
    found = []
    for result in results:
        assert time.monotonic() < end, "retrieve took too long"
        if result is not None:
            found.append(result)
    return found


def held_by_orthanc(bridge: Bridge, sop_instance: str) -> bytes:
    """The data set of the file Orthanc holds (after its File Meta Information)."""
    path = bridge.temp_dir.parent / f"orthanc-{sop_instance}.dcm"
    path.write_bytes(bridge.orthanc.get_bytes(f"/instances/{bridge.ids[sop_instance]}/file"))
    try:
        return data_set_bytes(path)
    finally:
        path.unlink()


# -- tests --------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", HOW)
def test_a_series_in_many_syntaxes_arrives_byte_identical(bridge: Bridge, holdings: Holdings, how: str) -> None:
    source = bridge.source("got" if how == "c-get" else "moved")
    queued = bridge.queued()
    results = fetched(source.retrieve(holdings.mixed))
    try:
        assert sorted(r.ref.sop_instance_uid for r in results) == sorted(r.sop_instance_uid for r in holdings.mixed)
        for result in results:
            assert not result.failure and result.temporary and result.path is not None
            assert result.path.parent == bridge.temp_dir and result.path.name.startswith(f"retrieved-{source.name}-")
            uid = result.ref.sop_instance_uid
            original = pydicom.dcmread(holdings.files[uid], stop_before_pixels=True)
            got = pydicom.dcmread(result.path, stop_before_pixels=True)
            assert got.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID, uid
            assert got.file_meta.MediaStorageSOPInstanceUID == uid
            assert data_set_bytes(result.path) == held_by_orthanc(bridge, uid) == data_set_bytes(holdings.files[uid])
    finally:
        for result in results:
            if result.path is not None:
                result.path.unlink()
    assert bridge.queued() == queued  # a retrieval's instances never reach the queue
    assert bridge.leftovers(source.name) == []


@pytest.mark.parametrize("how", HOW)
def test_some_instances_of_a_series_and_only_those(bridge: Bridge, holdings: Holdings, how: str) -> None:
    source = bridge.source("got" if how == "c-get" else "moved")
    wanted = [holdings.ct[1], holdings.ct[4], holdings.mixed[0]]  # two series
    results = fetched(source.retrieve(wanted))
    assert sorted(r.ref.sop_instance_uid for r in results) == sorted(r.sop_instance_uid for r in wanted)
    for result in results:
        assert result.path is not None
        assert data_set_bytes(result.path) == data_set_bytes(holdings.files[result.ref.sop_instance_uid])
        result.path.unlink()
    assert bridge.leftovers(source.name) == []


@pytest.mark.parametrize("how", HOW)
def test_a_reference_the_node_does_not_hold_fails_naming_it(bridge: Bridge, holdings: Holdings, how: str) -> None:
    source = bridge.source("got" if how == "c-get" else "moved")
    missing = InstanceRef(holdings.study, holdings.ct[0].series_uid, generate_uid(), holdings.ct[0].sop_class_uid)
    started = time.monotonic()
    results = fetched(source.retrieve([holdings.ct[0], missing, holdings.ct[2]]))
    assert time.monotonic() - started < 8  # not the retrieve_timeout (10 s)
    by_uid = {r.ref.sop_instance_uid: r for r in results}
    assert set(by_uid) == {holdings.ct[0].sop_instance_uid, missing.sop_instance_uid, holdings.ct[2].sop_instance_uid}
    failed = by_uid.pop(missing.sop_instance_uid)
    assert failed.path is None and missing.sop_instance_uid in failed.failure and how.upper() in failed.failure
    for result in by_uid.values():
        assert result.path is not None and not result.failure
        result.path.unlink()


@pytest.mark.parametrize("how", HOW)
def test_the_node_down_fails_at_once(bridge: Bridge, holdings: Holdings, how: str) -> None:
    down = bridge.config.nodes["pacs"].model_copy(update={"port": free_port()})
    config = bridge.config.model_copy(update={"nodes": {"pacs": down}})
    metrics = Metrics()
    source = build("got" if how == "c-get" else "moved", config, metrics)
    started = time.monotonic()
    with pytest.raises(UpstreamUnavailable, match="cannot connect"):
        fetched(source.retrieve(holdings.ct[:2]))
    assert time.monotonic() - started < 5
    assert metrics.registry.get_sample_value("dicom_bridge_upstream_errors_total",
                                             {"source": source.name, "operation": how}) == 1
    assert bridge.leftovers(source.name) == []


@pytest.mark.parametrize("how", HOW)
def test_closed_early_cancels_and_leaves_no_temporary_file(bridge: Bridge, holdings: Holdings, how: str) -> None:
    source = bridge.source("got" if how == "c-get" else "moved")
    queued = bridge.queued()
    results = source.retrieve(holdings.ct)
    first = next(r for r in results if r is not None)
    results.close()  # as a C-CANCEL of the requester does
    assert first.path is not None and first.path.exists()  # handed over: the caller's
    first.path.unlink()
    wait_for(lambda: bridge.connections_to_orthanc() == 0, 10, "the association to Orthanc to end")
    assert bridge.leftovers(source.name) == []
    # C-STOREs the node had in flight are refused, not stored: nothing reaches the queue.
    time.sleep(0.5)
    assert bridge.leftovers(source.name) == [] and bridge.queued() == queued


def test_c_move_to_another_destination_ae_title_of_the_listener(bridge: Bridge, holdings: Holdings) -> None:
    """``move_destination_ae`` other than ae_title, with accept.check_called_ae on."""
    queued = bridge.queued()
    results = fetched(bridge.source("elsewhere").retrieve(holdings.ct[:3]))
    assert sorted(r.ref.sop_instance_uid for r in results) == sorted(r.sop_instance_uid for r in holdings.ct[:3])
    for result in results:
        assert result.path is not None and not result.failure
        result.path.unlink()
    assert bridge.queued() == queued


def test_a_c_store_no_retrieval_waits_for_takes_the_normal_store_path(bridge: Bridge, holdings: Holdings) -> None:
    """The node stores to the move destination AE title on its own (Orthanc's REST
    /modalities/.../store: a plain C-STORE): ingest, the rules and the queue take it."""
    queued = bridge.queued()
    uid = holdings.ct[5].sop_instance_uid
    request = urllib.request.Request(f"{bridge.orthanc.url}/modalities/bridge/store", data=bridge.ids[uid].encode(),
                                     method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200
    wait_for(lambda: bridge.queued() == queued + 1, 10, "the instance to be queued")
    assert bridge.leftovers("moved") == []


def test_check_warns_when_a_c_move_source_node_would_be_refused(tmp_path: Path) -> None:
    raw: dict[str, Any] = {
        "ae_title": BRIDGE_AE,
        "data_dir": str(tmp_path / "data"),
        "accept": {"calling_ae": ["CT*"], "hosts": ["10.0.0.0/8"]},
        "nodes": {"pacs": {"ae_title": "PACS1", "host": "192.168.1.20", "port": 104},
                  "near": {"ae_title": "CT7", "host": "10.1.2.3", "port": 104}},
        "destinations": {"kept": {"type": "folder", "path": str(tmp_path / "kept")}},
        "sources": {"moved": {"type": "dimse", "node": "pacs"},
                    "got": {"type": "dimse", "node": "pacs", "retrieve": "c-get"},
                    "fine": {"type": "dimse", "node": "near"}},
        "rules": [{"name": "keep", "store": ["kept"]}],
    }
    found = [w for w in report.warnings(validate(raw, base=tmp_path), None) if "sources." in w]
    assert len(found) == 2, found
    assert any("sources.moved" in w and "accept.calling_ae" in w and "PACS1" in w for w in found), found
    assert any("sources.moved" in w and "accept.hosts" in w and "192.168.1.20" in w for w in found), found
