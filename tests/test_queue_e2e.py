"""The queue in a running daemon, against DCMTK's storescu: superseded content, SQLite
locked under the workers, destinations that come back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from corpus import ct_series, with_uid
from peers import spool_data, storescu, wait_for


def blocked_folder(tmp_path: Path, **settings: Any) -> tuple[dict[str, Any], Path]:
    """A folder destination under a plain file (ENOTDIR even for root): it backs off
    until the test replaces the file by a folder."""
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    destination = {"type": "folder", "path": f"{blocker}/out/{{SeriesInstanceUID}}", **settings}
    return {"destinations": {"out": destination}, "rules": [{"name": "all", "store": ["out"]}]}, blocker


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
