"""The daemon in-process (metrics, pynetdicom's switches) and as a process (signals)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from corpus import ct_series, with_uid
from peers import dcmtk, dcmtk_env, echoscu, free_port, storescu, wait_for
from pydicom.encaps import encapsulate
from pydicom.uid import generate_uid

from bridge.config import validate
from bridge.daemon import Daemon
from bridge.metrics import MAX_CALLING_AES, Metrics


@pytest.fixture
def daemon(tmp_path, pynetdicom_restored):
    config = validate({
        "listen": {"port": free_port()},
        "data_dir": str(tmp_path / "data"),
        "spool": {"min_free": "16MiB"},
        "accept": {"calling_ae": ["CT*", "STORESCU", "ECHOSCU", "RAWSCU"]},
        "destinations": {"archive": {"type": "archive"}},
        "rules": [{"name": "all", "store": ["archive"]}],
    }, base=tmp_path)
    d = Daemon(config)
    d.start()
    yield d
    d.stop()


def sample(daemon: Daemon, name: str, **labels: str) -> float:
    return daemon.metrics.registry.get_sample_value(name, labels) or 0.0


def test_metrics_count_what_happened(tmp_path, daemon):
    files = ct_series(tmp_path / "ct", 5)
    assert storescu(daemon.port, files, calling_ae="CT1").statuses == [0] * 5
    assert echoscu(daemon.port, calling_ae="MR1").returncode != 0  # not allowed
    wait_for(lambda: sample(daemon, "dicom_bridge_delivered_instances_total",
                            destination="archive", outcome="done") == 5, 20, "5 deliveries")
    assert sample(daemon, "dicom_bridge_received_instances_total", calling_ae="CT1") == 5
    size = sum(f.stat().st_size for f in files)
    assert sample(daemon, "dicom_bridge_received_bytes_total", calling_ae="CT1") >= size
    assert sample(daemon, "dicom_bridge_dimse_requests_total", service="C-STORE", status="0x0000") == 5
    assert sample(daemon, "dicom_bridge_associations_total", result="accepted") >= 1
    assert sample(daemon, "dicom_bridge_associations_total", result="rejected") == 1
    assert sample(daemon, "dicom_bridge_destination_state", destination="archive", state="up") == 1
    daemon.housekeeping()
    assert sample(daemon, "dicom_bridge_queue_depth", destination="archive") == 0
    assert sample(daemon, "dicom_bridge_spool_free_bytes") > 0
    # no label carries a UID or patient data
    text = "\n".join(str(m) for m in daemon.metrics.registry.collect())
    assert "PID-TEST" not in text and not re.search(r"\d+\.\d+\.\d+\.\d+\.\d+", text)


def test_calling_ae_labels_are_bounded():
    metrics = Metrics()
    labels = {metrics.calling_ae(f"AE{n}") for n in range(MAX_CALLING_AES + 20)}
    assert len(labels) == MAX_CALLING_AES + 1
    assert "other" in labels


def test_the_chunked_receive_override_takes_effect(tmp_path, daemon):
    """pynetdicom writes received data sets into the spool's incoming/ folder (see intake)."""
    files = ct_series(tmp_path / "ct", 1, size=512)
    assert storescu(daemon.port, files).statuses == [0]
    wait_for(lambda: sample(daemon, "dicom_bridge_delivered_instances_total",
                            destination="archive", outcome="done") == 1, 20, "the delivery")
    archived = list((daemon.config.data_dir / "archive").rglob("*.dcm"))
    assert len(archived) == 1
    assert pydicom.dcmread(archived[0]).PixelData == pydicom.dcmread(files[0]).PixelData
    assert not list((daemon.config.data_dir / "spool" / "incoming").iterdir())


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.203",
                                    "1.2.840.10008.1.2.4.102", "1.2.840.10008.1.2.4.107"])
def test_syntaxes_dcmtk_cannot_send_are_accepted_undecoded(tmp_path, daemon, raw_scu, syntax):
    """HTJ2K and video: nothing is decoded, the bytes are kept as they came."""
    source = ct_series(tmp_path / "ct", 1)[0]
    ds = pydicom.dcmread(source)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([b"\x00\x01" * 100 + b"not really compressed"])
    ds["PixelData"].VR = "OB"
    path = tmp_path / "x.dcm"
    ds.save_as(path, enforce_file_format=True)
    raw_scu.add_requested_context(ds.SOPClassUID, [syntax])
    assoc = raw_scu.associate("127.0.0.1", daemon.port, ae_title="BRIDGE")
    assert assoc.is_established
    try:
        assert assoc.send_c_store(path).Status == 0x0000
    finally:
        assoc.release()
    archived = wait_for(lambda: list(daemon.config.data_dir.joinpath("archive").rglob(f"{ds.SOPInstanceUID}.dcm")),
                        20, "the instance in the archive")[0]
    kept = pydicom.dcmread(archived)
    assert kept.file_meta.TransferSyntaxUID == syntax
    assert kept.PixelData == ds.PixelData


def test_sigterm_lets_the_association_finish_then_exits_0(tmp_path, bridge_factory):
    out = tmp_path / "out"
    bridge = bridge_factory({
        "destinations": {"out": {"type": "folder", "path": f"{out}/{{SeriesInstanceUID}}"}},
        "rules": [{"name": "all", "store": ["out"]}],
    })
    files = ct_series(tmp_path / "ct", 60, size=256)
    log = tmp_path / "storescu.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen([dcmtk("storescu"), "-v", "127.0.0.1", str(bridge.port), *map(str, files)],
                                env=dcmtk_env(), stdout=sink, stderr=subprocess.STDOUT)
        wait_for(lambda: "Received Store Response (Success)" in log.read_text(), 30, "the first C-STORE")
        bridge.signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    assert log.read_text().count("Received Store Response (Success)") == 60
    assert bridge.proc.wait(60) == 0
    assert echoscu(bridge.port).returncode != 0  # no longer listening
    bridge.start()  # whatever was not yet delivered goes out after the restart
    wait_for(lambda: len(list(out.rglob("*.dcm"))) == 60, 60, "all 60 files")
    assert bridge.stop() == 0


def test_the_archive_indexes_what_it_keeps_with_text_decoded(tmp_path, daemon):
    """The index holds the keys C-FIND will answer from, decoded from each file's character set."""
    import sqlite3

    from pydicom.data import get_charset_files

    files = ct_series(tmp_path / "ct", 3)
    for name in ("chrGerm.dcm", "chrX2.dcm", "chrRuss.dcm"):
        files.append(with_uid(Path(get_charset_files(name)[0]), tmp_path / name, StudyInstanceUID=generate_uid(),
                              SeriesInstanceUID=generate_uid(), SOPInstanceUID=generate_uid()))
    assert storescu(daemon.port, files, calling_ae="CT1").statuses == [0] * 6
    archive = Path(daemon.config.data_dir) / "archive"
    wait_for(lambda: sample(daemon, "dicom_bridge_delivered_instances_total",
                            destination="archive", outcome="done") == 6, 30, "6 deliveries")
    db = sqlite3.connect(archive / "index.sqlite")
    try:
        names = {row[0] for row in db.execute("SELECT patient_name FROM patients")}
        assert names == {"Test^Patient", "Äneas^Rüdiger", "Wang^XiaoDong=王^小东", "Люкceмбypг"}
        ct = db.execute("SELECT s.modality, st.accession, st.study_date, count(*) FROM instances i"
                        " JOIN series s USING (series_uid) JOIN studies st USING (study_uid)"
                        " WHERE s.modality = 'CT' GROUP BY s.series_uid").fetchall()
        assert ct == [("CT", "ACC1", "20261122", 3)]
        for path, size in db.execute("SELECT path, size FROM instances"):
            assert Path(path).stat().st_size == size
    finally:
        db.close()


def test_the_embedded_default_runs_with_no_config(tmp_path):
    """`dicom-bridge run` alone: AE DICOM_BRIDGE on 127.0.0.1:11112, data in ./dicom-bridge-data."""
    import socket
    import sys

    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", 11112))
        except OSError:
            pytest.skip("port 11112 is in use on this machine: the embedded default cannot listen")
    proc = subprocess.Popen([sys.executable, "-m", "bridge", "run"], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**dcmtk_env(), "PYTHONPATH": str(Path(__file__).parent.parent)})
    try:
        wait_for(lambda: echoscu(11112, called_ae="DICOM_BRIDGE").returncode == 0, 30, "the default listener")
        files = ct_series(tmp_path / "ct", 3)
        assert storescu(11112, files, called_ae="DICOM_BRIDGE").statuses == [0, 0, 0]
        archive = tmp_path / "dicom-bridge-data" / "archive"
        wait_for(lambda: len(list(archive.rglob("*.dcm"))) == 3, 30, "3 files in the archive")
        assert (archive / "index.sqlite").exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0


def test_an_address_in_use_is_named_and_nothing_is_written(tmp_path, bridge_factory):
    """The listening socket is bound before anything is written: a port already taken
    fails the start at once, naming host:port and the likely cause, with no data_dir."""
    import socket

    def run(settings: dict, name: str) -> tuple[int, str]:
        bridge = bridge_factory({**settings, "destinations": {"archive": {"type": "archive"}},
                                 "rules": [{"name": "all", "store": ["archive"]}]}, name=name, start=False)
        proc = subprocess.run([sys.executable, "-m", "bridge", "run", "--config", str(bridge.config_path)],
                              cwd=Path(__file__).parent.parent, capture_output=True, text=True, timeout=60)
        assert not bridge.data_dir.exists()
        return proc.returncode, proc.stdout + proc.stderr

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        code, output = run({"listen": {"port": port}}, "listen")
        assert code == 1, output
        assert f"cannot listen on 127.0.0.1:{port} (listen.host, listen.port): address already in use: another " \
               "dicom-bridge or a PACS is probably listening there" in output
        code, output = run({"http": {"port": port}}, "http")
        assert code == 1, output
        assert f"cannot listen on 127.0.0.1:{port} (http.host, http.port): address already in use" in output
    assert "Traceback" not in output
