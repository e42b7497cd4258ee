"""The queue in a running daemon, against DCMTK's storescu: superseded content, SQLite
locked under the workers, destinations that come back."""

from __future__ import annotations

import sqlite3
import urllib.request
from pathlib import Path
from typing import Any

import pydicom
from corpus import ct_series, with_uid
from peers import free_port, spool_data, storescu, wait_for


def blocked_folder(tmp_path: Path, **settings: Any) -> tuple[dict[str, Any], Path]:
    """A folder destination under a plain file (ENOTDIR even for root): it backs off
    until the test replaces the file by a folder."""
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    destination = {"type": "folder", "path": f"{blocker}/out/{{SeriesInstanceUID}}", **settings}
    return {"destinations": {"out": destination}, "rules": [{"name": "all", "store": ["out"]}]}, blocker


def delivered(out: Path) -> list[str]:
    return sorted(p.name for p in out.rglob("*.dcm")) if out.exists() else []


def sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_a_superseded_row_frees_its_spool_file_at_once(tmp_path, bridge_factory):
    """New content for a pending SOP Instance UID cancels the older row (supersede); the
    older file, which no row needs any more, leaves the spool then, not at the next purge."""
    config, _ = blocked_folder(tmp_path, retry={"initial": "1h", "max": "1h"})
    bridge = bridge_factory(config)
    [first] = ct_series(tmp_path / "ct", 1)
    second = with_uid(first, tmp_path / "second.dcm", PatientName="Corrected^Name")
    assert storescu(bridge.port, [first]).statuses == [0]
    wait_for(lambda: bridge.destination_state("out")[0] == "backing_off", 15, "the destination to back off")
    [kept] = spool_data(bridge.data_dir)
    assert storescu(bridge.port, [second]).statuses == [0]
    assert [r["state"] for r in bridge.queue_rows("out")] == ["cancelled", "pending"]
    [now] = spool_data(bridge.data_dir)
    assert now != kept and b"Corrected^Name" in now.read_bytes()


def metric(port: int, name: str) -> float:
    """A sample of the daemon's /metrics, named with its labels as exposed (0 if absent)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.rsplit(" ", 1)[0] == name)


def test_delivery_goes_on_by_itself_after_the_queue_was_locked(tmp_path, bridge_factory):
    """Another connection holds the queue's write lock for longer than the busy timeout
    while images arrive: intake answers 0xA700 meanwhile (not acknowledged), the delivery
    workers meet "database is locked" and do not end; once the lock is gone every
    acknowledged image reaches the destination, with no restart and no administrator."""
    out = tmp_path / "out"
    http_port = free_port()
    bridge = bridge_factory({
        "destinations": {"out": {"type": "folder", "path": f"{out}/{{SeriesInstanceUID}}"}},
        "rules": [{"name": "all", "store": ["out"]}],
        "queue": {"busy_timeout": "500ms"},
        "http": {"host": "127.0.0.1", "port": http_port},
    })
    files = ct_series(tmp_path / "ct", 12)
    before = storescu(bridge.port, files[:5])
    locker = sqlite3.connect(bridge.data_dir / "queue.sqlite", isolation_level=None, timeout=30)
    try:
        locker.execute("BEGIN IMMEDIATE")
        wait_for(lambda: metric(http_port, 'dicom_bridge_queue_errors_total{worker="deliver-out"}') >= 2, 30,
                 "the workers to meet the lock")
        during = storescu(bridge.port, files[5:8])
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    after = storescu(bridge.port, files[8:])
    statuses = before.statuses + during.statuses + after.statuses
    assert set(during.statuses) <= {0x0000, 0xA700}, during.output
    assert before.statuses == [0] * 5 and after.statuses == [0] * 4, statuses
    acknowledged = sorted(f"{sop_uid(f)}.dcm" for f, status in zip(files, statuses, strict=True) if status == 0)
    wait_for(lambda: delivered(out) == acknowledged, 30, "every acknowledged image in the folder")
    wait_for(lambda: bridge.queue_states() == {"done": len(acknowledged)}, 15, "every row done")
    assert "queue error" in bridge.log() and "the queue answers again" in bridge.log()
    assert bridge.proc.poll() is None
    assert bridge.stop() == 0


def test_a_destination_that_comes_back_is_probed_and_delivered_to_within_seconds(tmp_path, orthanc_factory,
                                                                                 bridge_factory):
    """Orthanc is down while images arrive: its DICOMweb and DIMSE destinations back off
    for a minute. Probed every second (OPTIONS, C-ECHO), both deliver within seconds of
    Orthanc's return, not when the back-off ends."""
    orthanc = orthanc_factory(aet="PACS")
    orthanc.stop()
    bridge = bridge_factory({
        "nodes": {"PACS": {"host": "127.0.0.1", "port": orthanc.dicom_port}},
        "destinations": {"web": {"type": "dicomweb", "url": orthanc.dicomweb, "probe_every": "1s"},
                         "pacs": {"type": "dimse", "node": "PACS", "probe_every": "1s"}},
        "rules": [{"name": "all", "store": ["web", "pacs"]}],
        "retry": {"initial": "60s", "max": "60s"},
    })
    files = ct_series(tmp_path / "ct", 5)
    assert storescu(bridge.port, files).statuses == [0] * 5
    for name in ("web", "pacs"):
        wait_for(lambda n=name: bridge.destination_state(n)[0] == "backing_off", 30, f"{name} to back off")
    orthanc.start()
    wait_for(lambda: bridge.queue_states() == {"done": 10}, 15, "every row done soon after Orthanc's return")
    assert orthanc.count() == 5
    assert "web answers again (probe)" in bridge.log() and "pacs answers again (probe)" in bridge.log()


def test_a_folder_that_can_be_written_again_is_delivered_to_within_seconds(tmp_path, bridge_factory):
    """The folder probe writes a small file where the destination writes: once the file in
    the way is gone, delivery resumes within seconds, not after the hour of back-off."""
    config, blocker = blocked_folder(tmp_path, retry={"initial": "1h", "max": "1h"}, probe_every="1s")
    bridge = bridge_factory(config)
    files = ct_series(tmp_path / "ct", 3)
    assert storescu(bridge.port, files).statuses == [0] * 3
    wait_for(lambda: bridge.destination_state("out")[0] == "backing_off", 15, "the destination to back off")
    blocker.unlink()
    blocker.mkdir()
    wait_for(lambda: delivered(blocker / "out") == sorted(f"{sop_uid(f)}.dcm" for f in files), 12,
             "the files delivered soon after the folder can be written")
    assert not [p for p in (blocker / "out").iterdir() if p.name.startswith(".probe-")]
