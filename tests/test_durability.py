"""Nothing acknowledged is lost: crashes, unavailable destinations, a full spool."""

from __future__ import annotations

import re
import sqlite3
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from corpus import ct_series, data_set_bytes
from peers import dcmtk, dcmtk_env, fill, spool_data, storescu, wait_for

from bridge.config import ArchiveDestination as ArchiveConfig
from bridge.config import DataDir, validate
from bridge.dataset.dicomfile import attributes
from bridge.destinations.archive import ArchiveDestination
from bridge.dimse.listener import ruleset
from bridge.dimse.store import refusal
from bridge.errors import InboundError, UpstreamUnavailable
from bridge.forward.ingest import Ingest, IngestSettings
from bridge.forward.queue import Queue
from bridge.forward.spool import Spool, sha256_file
from bridge.metrics import Metrics
from bridge.model import Done, SpooledInstance
from bridge.routing.rules import Context

FAST_RETRY = {"initial": "200ms", "max": "1s", "max_attempts": 50}


def blocked_folder_config(tmp_path: Path) -> tuple[dict, Path, Path]:
    """A folder destination under ``blocker``, a plain file: the folder cannot be created
    (ENOTDIR, even for root) until the test replaces the file by a directory."""
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    out = blocker / "out"
    config = {
        "destinations": {"out": {"type": "folder", "path": f"{out}/{{SeriesInstanceUID}}"}},
        "rules": [{"name": "all", "store": ["out"]}],
        "retry": FAST_RETRY,
    }
    return config, blocker, out


def unblock(blocker: Path) -> None:
    blocker.unlink()
    blocker.mkdir()


def delivered(out: Path) -> list[str]:
    return sorted(p.name for p in out.rglob("*.dcm")) if out.exists() else []


def sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_kill_9_while_the_destination_is_down(tmp_path, bridge_factory):
    config, blocker, out = blocked_folder_config(tmp_path)
    bridge = bridge_factory(config)
    files = ct_series(tmp_path / "ct", 20)
    assert storescu(bridge.port, files).statuses == [0] * 20
    wait_for(lambda: "destination out unavailable" in bridge.log(), 20, "the destination to back off")
    assert bridge.queue_states().get("done", 0) == 0

    bridge.kill()
    bridge.start()
    unblock(blocker)
    wait_for(lambda: len(delivered(out)) == 20, 60, "all 20 instances after the restart")
    assert delivered(out) == sorted(f"{sop_uid(f)}.dcm" for f in files)
    wait_for(lambda: bridge.queue_states() == {"done": 20}, 20, "every row done")
    assert bridge.stop() == 0


def test_kill_9_in_the_middle_of_an_association(tmp_path, bridge_factory):
    """Every instance that got 0x0000 before the crash arrives after the restart, once."""
    out = tmp_path / "out"
    config = {
        "destinations": {"out": {"type": "folder", "path": f"{out}/{{SeriesInstanceUID}}"}},
        "rules": [{"name": "all", "store": ["out"]}],
        "retry": FAST_RETRY,
    }
    bridge = bridge_factory(config)
    files = ct_series(tmp_path / "ct", 150, size=256)
    log = tmp_path / "storescu.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen(
            [dcmtk("storescu"), "-v", "127.0.0.1", str(bridge.port), *map(str, files)],
            env=dcmtk_env(), stdout=sink, stderr=subprocess.STDOUT,
        )
        wait_for(lambda: log.read_text().count("Received Store Response (Success)") >= 20, 60,
                 "20 acknowledged instances")
        bridge.kill()
        proc.wait(60)

    acknowledged = []
    sending = None
    for line in log.read_text().splitlines():
        if m := re.search(r"Sending file: (\S+)", line):
            sending = m.group(1)
        elif "Received Store Response (Success)" in line and sending:
            acknowledged.append(Path(sending))
    assert 20 <= len(acknowledged) < len(files)

    bridge.start()
    expected = {f"{sop_uid(f)}.dcm" for f in acknowledged}
    wait_for(lambda: expected <= set(delivered(out)), 60, "every acknowledged instance")
    names = delivered(out)
    assert len(names) == len(set(names))
    # at most the one instance in flight at the crash arrives beyond those acknowledged
    assert len(names) - len(expected) <= 1
    assert bridge.stop() == 0


@pytest.fixture
def tiny_tmpfs(tmpfs_factory):
    return tmpfs_factory("tmpfs")


def test_full_spool_answers_a700_and_loses_nothing(tmp_path, tiny_tmpfs, bridge_factory):
    config, blocker, out = blocked_folder_config(tmp_path)
    config["data_dir"] = str(tiny_tmpfs / "data")
    config["spool"] = {"min_free": "1MiB"}
    bridge = bridge_factory(config)
    files = ct_series(tmp_path / "ct", 30, size=362)  # ~256 KiB each: 30 do not fit in 6 MiB
    result = storescu(bridge.port, files)
    assert len(result.statuses) == 30, result.output[-2000:]
    stored = [f for f, s in zip(files, result.statuses, strict=True) if s == 0]
    refused = [s for s in result.statuses if s != 0]
    assert stored and refused
    assert set(refused) == {0xA700}
    assert "out of resources" in result.output or "a700" in result.output.lower()
    assert not list((tiny_tmpfs / "data" / "spool" / "incoming").iterdir())  # nothing half-written

    unblock(blocker)
    expected = sorted(f"{sop_uid(f)}.dcm" for f in stored)
    wait_for(lambda: delivered(out) == expected, 60, "every acknowledged instance")
    assert bridge.stop() == 0


def test_a_row_whose_spool_file_was_lost_does_not_swallow_the_resend(tmp_path, bridge_factory):
    """The queue's commit reached the disk, the file's folder entry did not (a crash
    between the two, before the answer): the modality resends, and that resend must be
    queued, not taken for a duplicate of the row whose file is gone."""
    config, blocker, out = blocked_folder_config(tmp_path)
    bridge = bridge_factory(config)
    files = ct_series(tmp_path / "ct", 3)
    assert storescu(bridge.port, files).statuses == [0] * 3
    bridge.kill()
    lost = next(p for p in (bridge.data_dir / "spool").glob("[0-9a-f][0-9a-f]/*.dcm")
                if sop_uid(p) == sop_uid(files[1]))
    lost.unlink()

    bridge.start()
    wait_for(lambda: "lost their spool file" in bridge.log(), 20, "the lost file noticed at start-up")
    assert bridge.queue_states() == {"pending": 2, "dead": 1}
    assert storescu(bridge.port, [files[1]]).statuses == [0]
    unblock(blocker)
    wait_for(lambda: len(delivered(out)) == 3, 60, "all three, the resend included")
    assert delivered(out) == sorted(f"{sop_uid(f)}.dcm" for f in files)
    wait_for(lambda: bridge.queue_states() == {"done": 3, "dead": 1}, 20, "every row settled")


def test_a_moved_data_dir_keeps_its_spool(tmp_path, bridge_factory):
    """The queue names spool files by their full path: after data_dir is moved, none of
    them is where the rows say, and none of the files here is named by a row. Neither
    is to be removed or given up for lost."""
    config, blocker, out = blocked_folder_config(tmp_path)
    bridge = bridge_factory(config)
    assert storescu(bridge.port, ct_series(tmp_path / "ct", 3)).statuses == [0] * 3
    assert bridge.stop() == 0
    moved = tmp_path / "moved"
    bridge.data_dir.rename(moved)
    bridge.config["data_dir"] = str(moved)
    bridge.write_config()

    bridge.start()
    wait_for(lambda: "was data_dir moved?" in bridge.log(), 20, "the move noticed at start-up")
    assert len(list((moved / "spool").glob("[0-9a-f][0-9a-f]/*.dcm"))) == 3
    assert bridge.queue_states() == {"pending": 3}


def test_disk_full_while_receiving_answers_a700_and_recovers(tmp_path, tiny_tmpfs, bridge_factory):
    """A real ENOSPC in the middle of a C-STORE's data set (the free-space floor at 0, so
    it does not answer first): 0xA700 with a reason, the partial file gone at once, the
    association and the daemon still serving; the same instance is taken once space is back."""
    out = tmp_path / "out"  # another file system: unaffected by the full one
    config = {
        "data_dir": str(tiny_tmpfs / "data"),
        "spool": {"min_free": "0"},
        "destinations": {"archive": {"type": "archive"},
                         "out": {"type": "folder", "path": f"{out}/{{SeriesInstanceUID}}"}},
        "rules": [{"name": "all", "store": ["archive", "out"]}],
        "retry": FAST_RETRY,
    }
    bridge = bridge_factory(config)
    big = ct_series(tmp_path / "big", 1, size=1100)  # ~2.4 MB
    small = ct_series(tmp_path / "small", 2)
    filler = fill(tiny_tmpfs, 1 << 20)

    # big, then small on the same association: the refusal leaves it in step
    result = storescu(bridge.port, [big[0], small[0]], extra=["-d"])  # -d: the responses in full
    statuses = [int(s, 16) for s in re.findall(r"DIMSE Status\s*: 0x([0-9a-fA-F]{4})", result.output)]
    assert statuses == [0xA700, 0x0000], result.output[-3000:]
    assert re.search(r"\(0000,0902\) LO \[out of resources: out of space on the spool\]", result.output)
    assert not list((tiny_tmpfs / "data" / "spool" / "incoming").iterdir())  # removed at once
    assert storescu(bridge.port, [small[1]]).statuses == [0x0000]  # another association
    wait_for(lambda: delivered(out) == sorted(f"{sop_uid(f)}.dcm" for f in small), 30, "the small ones")

    filler.unlink()
    assert storescu(bridge.port, big).statuses == [0x0000]
    expected = sorted(f"{sop_uid(f)}.dcm" for f in big + small)
    wait_for(lambda: delivered(out) == expected, 30, "every acknowledged instance in the folder")
    wait_for(lambda: delivered(tiny_tmpfs / "data" / "archive") == expected, 30, "and in the archive")
    assert bridge.stop() == 0


def test_a_full_archive_disk_backs_the_archive_off_and_it_catches_up(tmp_path, tmpfs_factory, bridge_factory):
    """The archive's own disk full (files and index.sqlite): the archive backs off without
    charging its rows, the folder destination delivers meanwhile, and the archive takes
    everything once space is back."""
    disk = tmpfs_factory("archive-disk")
    archive, out = disk / "archive", tmp_path / "out"
    config = {
        "destinations": {"archive": {"type": "archive", "path": str(archive)},
                         "out": {"type": "folder", "path": f"{out}/{{SeriesInstanceUID}}"}},
        "rules": [{"name": "all", "store": ["archive", "out"]}],
        "retry": FAST_RETRY,
    }
    bridge = bridge_factory(config)
    filler = fill(disk, 0)
    files = ct_series(tmp_path / "ct", 3)
    assert storescu(bridge.port, files).statuses == [0] * 3
    expected = sorted(f"{sop_uid(f)}.dcm" for f in files)
    wait_for(lambda: delivered(out) == expected, 30, "the folder destination, unaffected")
    wait_for(lambda: bridge.destination_state("archive")[0] == "backing_off", 30, "the archive to back off")
    assert "space" in bridge.destination_state("archive")[1]
    assert all(r["state"] == "pending" and r["attempts"] == 0 for r in bridge.queue_rows("archive"))

    filler.unlink()
    wait_for(lambda: bridge.queue_states() == {"done": 6}, 30, "the archive to catch up")
    assert delivered(archive) == expected
    index = sqlite3.connect(archive / "index.sqlite")
    try:
        assert index.execute("SELECT count(*) FROM instances").fetchone()[0] == 3
    finally:
        index.close()
    assert bridge.stop() == 0


def spooled(path: Path) -> SpooledInstance:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return SpooledInstance(
        spool_path=path, size=path.stat().st_size, sha256=sha256_file(path), sop_class_uid=ds.SOPClassUID,
        sop_instance_uid=ds.SOPInstanceUID, study_uid=ds.StudyInstanceUID, series_uid=ds.SeriesInstanceUID,
        transfer_syntax=ds.file_meta.TransferSyntaxUID, calling_ae="CT1", called_ae="BRIDGE", peer="127.0.0.1",
        received_at=datetime.now(UTC), patient_id=str(ds.PatientID), attributes=attributes(ds),
    )


def test_a_keep_first_archive_whose_index_is_full_places_the_batch_again_and_indexes_it(tmp_path, tmpfs_factory):
    """The index cannot be written (a full disk) after the batch's files were linked: the
    batch fails as a whole, and its retry must index those instances, not take the
    files it left for duplicates (keep-first)."""
    disk = tmpfs_factory("disk")
    files = ct_series(disk / "spool", 3)
    archive = ArchiveDestination("archive", ArchiveConfig(type="archive", duplicates="keep-first"), disk / "archive")
    try:
        archive.open()
        assert archive.send([spooled(files[0])]) == [Done()]
        filler = fill(disk, 0)
        with pytest.raises(UpstreamUnavailable, match="space"):
            archive.send([spooled(f) for f in files[1:]])
        archive.close()
        filler.unlink()
        archive.open()
        assert archive.send([spooled(f) for f in files[1:]]) == [Done(), Done()]
    finally:
        archive.close()
    index = sqlite3.connect(disk / "archive" / "index.sqlite")
    try:
        indexed = {r[0] for r in index.execute("SELECT sop_instance_uid FROM instances")}
    finally:
        index.close()
    assert indexed == {sop_uid(f) for f in files}


@dataclass
class Answer:
    status: int
    comment: str = ""
    rows: int = 0


class Intake:
    """The durable path of a C-STORE (``bridge.forward.ingest``) on its own, over a spool and a
    queue in ``data_dir``: what intake does once pynetdicom has received a data set."""

    def __init__(self, data_dir: Path, out: Path) -> None:
        self.config = validate({"data_dir": str(data_dir), "spool": {"min_free": "0"},
                                "destinations": {"out": {"type": "folder", "path": str(out)}},
                                "rules": [{"name": "all", "store": ["out"]}]}, base=out.parent)
        self.spool = Spool(DataDir(data_dir))
        self.spool.open()
        self.queue = Queue(data_dir / "queue.sqlite")
        self.ingest = Ingest(self.spool, self.queue, Metrics())

    def receive(self, source: Path) -> Path:
        """``source``'s bytes written into the spool's incoming/, as pynetdicom writes them."""
        temp = self.spool.new_temp()
        temp.write(source.read_bytes())
        temp.close()
        return Path(temp.name)

    def store(self, path: Path) -> Answer:
        """What a C-STORE of ``path`` is answered."""
        try:
            stored = self.ingest.store(path, Context("CT1", "BRIDGE", "127.0.0.1"), IngestSettings.of(self.config),
                                       ruleset(self.config))
        except InboundError as exc:
            return Answer(*refusal(exc))
        finally:
            path.unlink(missing_ok=True)  # as the store service does
        return Answer(0x0000, "", stored.rows)

    def close(self) -> None:
        self.ingest.close()
        self.queue.close()


@pytest.fixture
def intake_on(tmp_path):
    made: list[Intake] = []

    def make(data_dir: Path) -> Intake:
        made.append(Intake(data_dir, tmp_path / "out"))
        return made[-1]

    yield make
    for intake in made:
        intake.close()


def test_a_full_disk_at_the_queue_commit_answers_a700_and_keeps_nothing(tmp_path, tmpfs_factory, intake_on):
    """The instance's file is complete and durable, but the queue's commit finds the disk
    full (SQLITE_FULL): 0xA700 saying so, the spool file removed, and the same instance
    queued once space is back (the queue's connection was not left in a transaction)."""
    disk = tmpfs_factory("disk", "4m")
    intake = intake_on(disk)
    (source,) = ct_series(tmp_path / "ct", 1)
    path = intake.receive(source)
    # room for nothing but what the free-space check counts (the file's size again)
    filler = fill(disk, source.stat().st_size + 4096)
    stored = intake.store(path)
    assert (stored.status, stored.comment) == (0xA700, "out of resources: out of space for the queue database")
    assert spool_data(disk) == []

    filler.unlink()
    stored = intake.store(intake.receive(source))
    assert stored.status == 0x0000 and stored.rows == 1


def test_a_full_spool_gives_back_the_blocks_it_keeps_for_reuse(tmp_path, tmpfs_factory, intake_on):
    """Delivered files kept in spool/free keep their blocks for the next instances; when
    the disk is full, that space goes to the instances instead."""
    disk = tmpfs_factory("disk", "8m")
    intake = intake_on(disk)
    received = [intake.receive(f) for f in ct_series(tmp_path / "kept", 2, size=724)]  # ~1 MiB each
    for path in received:  # delivered
        intake.spool.recycle(intake.spool.take(path))
    (big,) = ct_series(tmp_path / "big", 1, size=1024)
    fill(disk, 256 << 10)
    stored = intake.store(intake.receive(big))
    assert (stored.status, stored.comment) == (0xA700, "out of resources: out of space on the spool")
    assert intake.spool.free_bytes() > 2 << 20  # the failed file's blocks, and the other kept file's
    (next_one,) = ct_series(tmp_path / "next", 1, size=724)
    assert intake.store(intake.receive(next_one)).status == 0x0000


@pytest.mark.parametrize("how", ["abort", "close"])
def test_an_association_ended_in_the_middle_of_a_data_set_leaves_no_partial_file(tmp_path, bridge_factory,
                                                                                   raw_scu, how):
    """A peer that aborts, or drops its connection, half-way through a C-STORE's data set:
    the half-received file is removed when the association ends, not at the next start
    (on a bridge that runs for months, those would fill the disk)."""
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom.dimse_messages import C_STORE_RQ
    from pynetdicom.dimse_primitives import C_STORE

    config, _, _ = blocked_folder_config(tmp_path)
    bridge = bridge_factory(config)
    (source,) = ct_series(tmp_path / "ct", 1, size=512)
    incoming = bridge.data_dir / "spool" / "incoming"
    raw_scu.add_requested_context("1.2.840.10008.5.1.4.1.1.2", [ExplicitVRLittleEndian])
    assoc = raw_scu.associate("127.0.0.1", bridge.port, ae_title="BRIDGE")
    assert assoc.is_established
    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    request.AffectedSOPInstanceUID = sop_uid(source)
    request.DataSet = BytesIO(data_set_bytes(source))
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    context_id = assoc.accepted_contexts[0].context_id
    fragments = list(message.encode_msg(context_id, 16384))
    for primitive in fragments[:len(fragments) // 2]:
        assoc.dul.send_pdu(primitive)
    wait_for(lambda: any(p.stat().st_size > 64 << 10 for p in incoming.iterdir()), 20, "half a data set received")
    if how == "abort":
        assoc.abort()
    else:
        assoc.dul.socket.socket.close()
    wait_for(lambda: not list(incoming.iterdir()), 20, "the partial file removed")
    assert storescu(bridge.port, [source]).statuses == [0x0000]  # and the resend is taken
