"""Nothing acknowledged is lost: crashes, unavailable destinations, a full spool."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pydicom
import pytest
from corpus import ct_series
from peers import dcmtk, dcmtk_env, storescu, wait_for

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
def tiny_tmpfs(tmp_path):
    mountpoint = tmp_path / "tmpfs"
    mountpoint.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; this machine runs the tests as another user")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mountpoint)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"this machine forbids mounting a tmpfs: {result.stderr.strip()}")
    yield mountpoint
    subprocess.run(["umount", "-l", str(mountpoint)], check=False)


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
