"""Watched folders: files dropped into a folder reach Orthanc by STOW-RS through a real
daemon (a subprocess), as a user would drop them: copied, written slowly, zipped, as a
CD with a DICOMDIR, before the daemon starts and while it is killed.

What arrived is asked of Orthanc's REST API; what is left is read from the folders.
"""

from __future__ import annotations

import io
import shutil
import signal
import threading
import time
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

import pydicom
import pytest
from corpus import TEST_FILES, ct_series
from peers import free_port, spool_data, wait_for
from pydicom.fileset import FileSet

from bridge.config import validate
from bridge.errors import ConfigError

FAST = {"settle": "1s", "rescan": "2s", "incomplete_timeout": "4s"}


def config(url: str, *watches: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "ae_title": "BRIDGE",
        "destinations": {"web": {"type": "dicomweb", "url": url}, "archive": {"type": "archive"}},
        "rules": [
            {"name": "archive-only", "when": {"calling_ae": "ARCHIVE_ONLY"}, "store": ["archive"]},
            {"name": "everything-else", "store": ["web"]},
        ],
        "retry": {"initial": "1s", "max": "2s"},
        "watch": [{**FAST, **w} for w in watches],
        **extra,
    }


def uid_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True, force=True).SOPInstanceUID)


def files_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def emptied(folder: Path) -> bool:
    """Nothing left in ``folder``: no file, no subfolder."""
    return not any(folder.iterdir())


def arrived(orthanc: Any, uids: set[str], timeout: float = 120) -> dict[str, str]:
    wait_for(lambda: orthanc.count() >= len(uids), timeout, f"Orthanc to hold {len(uids)} instances",
             interval=0.5)
    held = orthanc.instance_uids()
    assert set(held) == uids
    return held


def write_slowly(path: Path, data: bytes, chunks: int, pause: float) -> None:
    step = -(-len(data) // chunks)
    with open(path, "wb") as f:
        for start in range(0, len(data), step):
            f.write(data[start:start + step])
            f.flush()
            time.sleep(pause)


def metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return str(response.read().decode())


# -- configuration -----------------------------------------------------------------------


def test_watch_settings_that_cannot_work_are_errors(tmp_path):
    raw = {"watch": [
        {"path": "in", "failed": "in/failed"},
        {"path": "in/sub", "failed": "failed", "after": "move"},
        {"path": "other", "failed": "f2", "observer": "inotfy", "zip": {"max_ratio": 0}},
    ]}
    with pytest.raises(ConfigError) as caught:
        validate(raw, tmp_path)
    errors = "\n".join(caught.value.errors)
    assert "watch[1]: after: move needs move_to" in errors
    assert "watch[2].observer" in errors and "watch[2].zip.max_ratio" in errors
    # folders that feed each other are reported in the same run as the other errors
    assert "watch[0].failed" in errors
    raw["watch"] = raw["watch"][:1] + [{"path": "in/sub", "failed": "f3"}]
    with pytest.raises(ConfigError) as caught:
        validate(raw, tmp_path)
    assert {e.split(":")[0] for e in caught.value.errors} == {"watch[0].failed", "watch[1].path"}


# -- end to end --------------------------------------------------------------------------


@pytest.mark.slow
def test_dropped_files_reach_orthanc_and_the_rest_fail_with_reasons(tmp_path, corpus, orthanc_factory,
                                                                     bridge_factory):
    orthanc = orthanc_factory()
    watched, failed = tmp_path / "in", tmp_path / "failed"
    watched.mkdir()
    port = free_port()
    bridge = bridge_factory(config(orthanc.dicomweb, {"path": str(watched), "failed": str(failed), "name": "in"},
                                   http={"port": port}))
    series = ct_series(tmp_path / "series", 10, size=128)
    slow = [p.read_bytes() for p in series]

    def drop_series() -> None:  # 10 files, each written in 4 chunks over ~0.6 s
        (watched / "series").mkdir()
        for path, data in zip(series, slow, strict=True):
            write_slowly(watched / "series" / path.name, data, 4, 0.15)

    writer = threading.Thread(target=drop_series)
    writer.start()
    shutil.copytree(corpus[0].parent, watched / "pydicom")
    (watched / "notes.txt").write_text("not an image\n")
    shutil.copy(TEST_FILES / "no_meta.dcm", watched / "no_meta.dcm")
    shutil.copy(TEST_FILES / "MR_truncated.dcm", watched / "pydicom" / "MR_truncated.dcm")
    (watched / ".hidden.dcm").write_bytes(series[0].read_bytes())  # dot files are never taken
    (watched / "late.dcm.part").write_bytes(ct_series(tmp_path / "late", 1)[0].read_bytes())
    writer.join()
    # Once the series has been taken, the dot file and the .part file are still there:
    # temporary names are never taken.
    wait_for(lambda: not any((watched / "series").glob("*.dcm")), 60, "the series to be taken")
    assert (watched / ".hidden.dcm").exists() and (watched / "late.dcm.part").exists()
    (watched / ".hidden.dcm").unlink()
    (watched / "late.dcm.part").rename(watched / "late.dcm")  # the usual way to drop a file whole

    expected = {uid_of(p) for p in [*corpus, *series, tmp_path / "late" / "ct0000.dcm"]}
    held = arrived(orthanc, expected)
    for path in series:  # nothing was taken half-written
        got = pydicom.dcmread(io.BytesIO(orthanc.get_bytes(f"/instances/{held[uid_of(path)]}/file")))
        assert got.PixelData == pydicom.dcmread(path).PixelData, path.name

    wait_for(lambda: emptied(watched), 60, "the watched folder to be empty")
    reasons = {p.relative_to(failed).as_posix(): p.read_text() for p in failed.rglob("*.reason")}
    assert set(reasons) == {"notes.txt.reason", "no_meta.dcm.reason", "pydicom/MR_truncated.dcm.reason"}
    assert "not a DICOM file" in reasons["notes.txt.reason"]
    assert "truncated" in reasons["pydicom/MR_truncated.dcm.reason"]
    assert (failed / "notes.txt").read_text() == "not an image\n"
    assert (failed / "pydicom" / "MR_truncated.dcm").read_bytes() == (TEST_FILES / "MR_truncated.dcm").read_bytes()
    wait_for(lambda: bridge.queue_states() == {"done": len(expected)}, 60, "every row done")
    text = metrics(port)
    assert f'dicom_bridge_watch_files_total{{result="queued",watch="in"}} {len(expected)}.0' in text
    assert 'dicom_bridge_watch_files_total{result="failed",watch="in"} 3.0' in text
    assert 'dicom_bridge_watch_backlog{watch="in"} 0.0' in text
    assert "Traceback" not in bridge.log()


@pytest.mark.slow
def test_files_there_before_start_survive_a_kill_9(tmp_path, orthanc_factory, bridge_factory):
    orthanc = orthanc_factory()
    watched, failed = tmp_path / "in", tmp_path / "failed"
    files = ct_series(watched / "study", 120, size=32)
    expected = {uid_of(p) for p in files}
    settings = config(orthanc.dicomweb, {"path": str(watched), "failed": str(failed), "settle": "0s"})
    bridge = bridge_factory(settings)
    wait_for(lambda: len(files_in(watched)) < len(files), 60, "the bridge to take files", interval=0.01)
    bridge.kill()
    left = len(files_in(watched))
    restarted = bridge_factory(settings)
    arrived(orthanc, expected)
    wait_for(lambda: emptied(watched), 60, "the watched folder to be empty")
    wait_for(lambda: restarted.queue_states() == {"done": len(expected)}, 60, "every row done")
    wait_for(lambda: not spool_data(restarted.data_dir), 30, "no data left in the spool")
    assert not failed.exists()
    assert left < len(files)  # the kill came while files were being taken (or after all of them)


@pytest.mark.slow
def test_polling_two_folders_two_routes_and_a_reload(tmp_path, orthanc_factory, bridge_factory):
    orthanc = orthanc_factory()
    share, archive_in, failed = tmp_path / "share", tmp_path / "archive-in", tmp_path / "failed"
    done = tmp_path / "done"
    for folder in (share, archive_in):
        folder.mkdir()
    settings = config(
        orthanc.dicomweb,
        {"path": str(share), "failed": str(failed / "share"), "observer": "polling", "poll_interval": "0.5s",
         "rescan": "10m", "after": "move", "move_to": str(done)},
        {"path": str(archive_in), "failed": str(failed / "archive"), "calling_ae": "ARCHIVE_ONLY"},
    )
    to_web = ct_series(tmp_path / "web", 4)
    to_archive = ct_series(tmp_path / "arch", 3)
    (share / "a" / "b").mkdir(parents=True)
    shutil.copy(to_web[0], share / "a" / "b")  # there at start: only the first rescan takes it
    bridge = bridge_factory(settings)
    arrived(orthanc, {uid_of(to_web[0])})  # the first rescan has passed: only the observer sees what follows
    for path in to_web[1:]:
        shutil.copy(path, share / "a" / "b")
    shutil.copytree(tmp_path / "arch", archive_in / "x")

    arrived(orthanc, {uid_of(p) for p in to_web})
    wait_for(lambda: emptied(share), 60, "the share to be empty")
    assert sorted(p.relative_to(done).as_posix() for p in files_in(done)) == \
        [f"a/b/{p.name}" for p in to_web]
    archived = bridge.data_dir / "archive"
    wait_for(lambda: {p.stem for p in files_in(archived) if p.suffix == ".dcm"} == {uid_of(p) for p in to_archive},
             60, "the archive to hold the second folder's files")
    assert orthanc.count() == len(to_web)  # the archive-only folder sent nothing to Orthanc

    # SIGHUP: a third folder is watched from now on
    third = tmp_path / "third"
    third.mkdir()
    bridge.config["watch"].append({**FAST, "path": str(third), "failed": str(failed / "third")})
    bridge.write_config()
    bridge.signal(signal.SIGHUP)
    wait_for(lambda: f"watching {third}" in bridge.log(), 30, "the reload")
    late = ct_series(tmp_path / "late", 1)[0]
    shutil.copy(late, third / "late.dcm")
    arrived(orthanc, {uid_of(p) for p in [*to_web, late]})
    wait_for(lambda: emptied(third), 30, "the third folder to be empty")
    assert bridge.stop() == 0


def _encrypted_flag(data: bytes, name: str) -> bytes:
    """The zip ``data`` with ``name`` marked encrypted (zipfile cannot write encryption)."""
    out = bytearray(data)
    archive = zipfile.ZipFile(io.BytesIO(data))
    info = archive.getinfo(name)
    out[info.header_offset + 6] |= 0x01  # local file header: general purpose flags
    central = out.find(b"PK\x01\x02")  # central directory entries
    while central != -1:
        length = int.from_bytes(out[central + 28:central + 30], "little")
        if out[central + 46:central + 46 + length] == name.encode():
            out[central + 8] |= 0x01
        central = out.find(b"PK\x01\x02", central + 4)
    return bytes(out)


@pytest.mark.slow
def test_zip_archives_and_a_dicomdir(tmp_path, orthanc_factory, bridge_factory):
    orthanc = orthanc_factory()
    watched, failed = tmp_path / "in", tmp_path / "failed"
    watched.mkdir()
    bridge = bridge_factory(config(orthanc.dicomweb, {"path": str(watched), "failed": str(failed),
                                                      "zip": {"enabled": True, "max_ratio": 50}}))
    series = ct_series(tmp_path / "zipped", 4)
    escape = ct_series(tmp_path / "escape", 1)[0]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in series:
            archive.write(path, f"study/series/{path.name}")
        archive.write(escape, "../../escape.dcm")  # only a name: never a path
        archive.writestr("DICOMDIR", b"ignored")
    (watched / "good.zip").write_bytes(buffer.getvalue())

    locked = ct_series(tmp_path / "locked", 2)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.write(locked[0], "plain.dcm")
        archive.write(locked[1], "secret.dcm")
    (watched / "locked.zip").write_bytes(_encrypted_flag(buffer.getvalue(), "secret.dcm"))

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("zeros.dcm", bytes(8 << 20))
    (watched / "bomb.zip").write_bytes(buffer.getvalue())

    # a CD: DICOMDIR with uppercase File IDs, the files themselves in lowercase
    cd_files = ct_series(tmp_path / "cd-source", 3)
    fileset = FileSet()
    for path in cd_files:
        ds = pydicom.dcmread(path)
        ds.StudyTime, ds.StudyID = "120000", "1"
        fileset.add(ds)
    staging = tmp_path / "staging" / "CD"
    fileset.write(staging)
    for path in sorted(staging.rglob("*"), key=lambda p: -len(p.parts)):
        if path.name != "DICOMDIR":
            path.rename(path.with_name(path.name.lower()))
    extra = ct_series(tmp_path / "extra", 1)[0]  # on the CD but not in its DICOMDIR
    shutil.copy(extra, staging / "extra.dcm")
    staging.rename(watched / "CD")

    expected = {uid_of(p) for p in [*series, escape, locked[0], *cd_files, extra]}
    arrived(orthanc, expected)
    wait_for(lambda: emptied(watched), 60, "the watched folder to be empty")
    assert not (tmp_path / "escape.dcm").exists() and not (tmp_path.parent / "escape.dcm").exists()
    reasons = {p.name: p.read_text() for p in failed.glob("*.reason")}
    assert set(reasons) == {"locked.zip.reason", "bomb.zip.reason"}
    assert "'secret.dcm': encrypted" in reasons["locked.zip.reason"]
    assert "expands to" in reasons["bomb.zip.reason"]
    assert (failed / "locked.zip").exists() and (failed / "bomb.zip").exists()
    assert "same content already queued" not in bridge.log()  # the CD's files were taken once


@pytest.mark.slow
def test_files_renamed_into_the_folder_are_taken_at_once(tmp_path, bridge_factory):
    """mv from outside (inotify: a move with no move-from), an rsync-style temporary name
    renamed within the folder, a zip moved in and a folder moved in: each taken within
    seconds: a renamed file is complete, so neither the rescan (10 minutes here) nor
    ``settle`` (5 s here) is waited for; a folder moved in is looked at after ``settle``."""
    watched, outside = tmp_path / "in", tmp_path / "outside"
    watched.mkdir()
    outside.mkdir()
    bridge = bridge_factory({
        "destinations": {"archive": {"type": "archive"}},
        "rules": [{"name": "all", "store": ["archive"]}],
        "watch": [{"path": str(watched), "failed": str(tmp_path / "failed"), "settle": "5s", "rescan": "10m",
                   "zip": {"enabled": True}}],
    })
    wait_for(lambda: f"watching {watched}" in bridge.log(), 30, "the folder to be watched")
    files = ct_series(tmp_path / "series", 6, size=32)
    shutil.copy(files[0], outside / "moved.dcm")
    shutil.copy(files[1], watched / ".rsync.dcm.Xa83Bq")  # a dot file: never taken as it is
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.write(files[2], "zipped.dcm")
    (outside / "moved.zip").write_bytes(buffer.getvalue())
    (outside / "study").mkdir()
    shutil.copy(files[3], outside / "study" / "a.dcm")
    shutil.copy(files[4], outside / "study" / "b.dcm")

    shutil.copy(files[5], watched / "first.dcm")  # taken once the first rescan has passed
    wait_for(lambda: len(bridge.queue_rows()) == 1, 15, "the first file to be queued", interval=0.1)
    (outside / "moved.dcm").rename(watched / "moved.dcm")
    (watched / ".rsync.dcm.Xa83Bq").rename(watched / "rsynced.dcm")
    (outside / "moved.zip").rename(watched / "moved.zip")
    # settle is 5 s and the rescan 10 minutes: only the renames themselves are seen this soon
    wait_for(lambda: len(bridge.queue_rows()) == 4, 3, "the renamed files to be queued", interval=0.1)
    (outside / "study").rename(watched / "study")  # a whole folder
    wait_for(lambda: len(bridge.queue_rows()) == len(files), 20, "the folder's files to be queued", interval=0.1)
    assert {r["sop_instance_uid"] for r in bridge.queue_rows()} == {uid_of(p) for p in files}
    wait_for(lambda: emptied(watched), 15, "the watched folder to be empty")


@pytest.mark.slow
def test_a_zip_in_a_folder_without_zip_enabled_fails_saying_so(tmp_path, bridge_factory):
    watched, failed = tmp_path / "in", tmp_path / "failed"
    watched.mkdir()
    bridge_factory({
        "destinations": {"archive": {"type": "archive"}},
        "rules": [{"name": "all", "store": ["archive"]}],
        "watch": [{"path": str(watched), "failed": str(failed), "settle": "0.5s", "rescan": "1s"}],
    })
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.write(ct_series(tmp_path / "series", 1)[0], "ct.dcm")
    (watched / "study.zip").write_bytes(buffer.getvalue())
    reason = failed / "study.zip.reason"
    wait_for(lambda: reason.exists() and "reason:" in reason.read_text(), 30, "the zip to fail")
    assert "reason: a zip archive, and this folder does not take zip archives apart (zip.enabled is off" \
        in reason.read_text()
