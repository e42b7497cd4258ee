"""`dicom-bridge queue` as an administrator runs it, against a real daemon and DCMTK's storescu;
and what SIGHUP does with changed and removed destinations.

Dead rows are made the way they are made in production: a destination that cannot take
anything for longer than its ``max_age``. Here it is a folder destination whose path
runs through a file (a file is in the way of the folder), which is also a cause an
administrator can fix: remove the file.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path
from typing import Any

import forkserver
from corpus import ct_series, with_uid
from peers import Bridge, dcmtk, free_port, storescu, wait_for

FAST_RETRY = {"initial": "100ms", "max": "500ms"}


def queue_cli(bridge: Bridge, *args: str) -> subprocess.CompletedProcess[str]:
    """``dicom-bridge queue ...`` with the daemon's configuration file."""
    return forkserver.run(["queue", *args, "--config", str(bridge.config_path)], timeout=60)


def listing(bridge: Bridge, *filters: str) -> dict[str, Any]:
    result = queue_cli(bridge, "list", "--json", *filters)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def in_the_way(tmp_path: Path) -> Path:
    """A file where the destination's folder should be."""
    blocker = tmp_path / "blocked"
    blocker.write_text("a file, not a folder")
    return blocker


def folder(path: Path, **settings: Any) -> dict[str, Any]:
    return {"type": "folder", "path": f"{path}/{{SeriesInstanceUID}}", **settings}


def config(destinations: dict[str, Any]) -> dict[str, Any]:
    return {"destinations": destinations, "rules": [{"name": "all", "store": list(destinations)}]}


def delivered(path: Path) -> list[Path]:
    return list(path.rglob("*.dcm")) if path.is_dir() else []


def spool_files(bridge: Bridge) -> list[Path]:
    return list((bridge.data_dir / "spool").glob("[0-9a-f][0-9a-f]/*.dcm"))


def dead_rows(bridge: Bridge, count: int) -> None:
    wait_for(lambda: bridge.queue_states().get("dead") == count, 30, f"{count} dead rows")


def test_dead_rows_are_listed_retried_and_delivered_after_a_restart(tmp_path, bridge_factory):
    blocker = in_the_way(tmp_path)
    bridge = bridge_factory(config({"out": folder(blocker, retry={**FAST_RETRY, "max_age": "1s"})}))
    files = ct_series(tmp_path / "ct", 3)
    assert storescu(bridge.port, files).statuses == [0] * 3
    dead_rows(bridge, 3)
    assert bridge.stop() == 0

    shown = queue_cli(bridge, "list", "--state", "dead")
    assert shown.returncode == 0, shown.stderr
    lines = [line for line in shown.stdout.splitlines() if line.split()[:2][-1:] == ["out"]]
    assert len(lines) == 3, shown.stdout
    for line in lines:
        assert line.split()[1:4] == ["out", "dead", "0"]
        assert "expired" in line and "PID-TEST" in line and "ACC1" in line  # the error may be cut to fit
    assert "out: dead 3" in shown.stdout
    assert "daemon: not running" in shown.stdout
    rows = listing(bridge, "--state", "dead")["rows"]
    assert {r["sop_instance_uid"] for r in rows} == {str(_uid(f)) for f in files}
    assert all(r["last_error"].endswith("a file is in the way)") for r in rows), rows

    refused = queue_cli(bridge, "retry")
    assert refused.returncode == 2 and "--all" in refused.stderr
    retried = queue_cli(bridge, "retry", "--destination", "out")
    assert retried.returncode == 0, retried.stderr
    assert "retried 3 dead row(s)" in retried.stdout and "not running" in retried.stdout
    assert bridge.queue_states() == {"pending": 3}

    out = tmp_path / "out"
    bridge.config["destinations"]["out"] = folder(out)
    bridge.write_config()
    bridge.start()
    wait_for(lambda: len(delivered(out)) == 3, 30, "3 files in the fixed folder")
    wait_for(lambda: bridge.queue_states() == {"done": 3}, 10, "3 rows done")
    assert bridge.stop() == 0


def test_a_running_daemon_delivers_retried_rows_once_the_cause_is_fixed(tmp_path, bridge_factory):
    blocker = in_the_way(tmp_path)
    bridge = bridge_factory(config({"out": folder(blocker, retry={**FAST_RETRY, "max_age": "3s"})}))
    assert storescu(bridge.port, ct_series(tmp_path / "ct", 4)).statuses == [0] * 4
    dead_rows(bridge, 4)
    assert listing(bridge)["daemon"]["running"] is True
    blocker.unlink()  # the administrator fixes the cause
    retried = queue_cli(bridge, "retry", "--all")
    assert retried.returncode == 0, retried.stderr
    assert "retried 4 dead row(s): out 4" in retried.stdout and "running daemon" in retried.stdout
    wait_for(lambda: len(delivered(blocker)) == 4, 15, "the 4 retried rows delivered")
    wait_for(lambda: bridge.queue_states() == {"done": 4}, 10, "4 rows done")
    assert bridge.proc.poll() is None  # no restart


def test_resume_ends_a_long_back_off_now(tmp_path, bridge_factory):
    blocker = in_the_way(tmp_path)
    # no probes: the fixed folder would otherwise end the back-off by itself, before the resume
    bridge = bridge_factory(config({"out": folder(blocker, retry={"initial": "1h", "max": "1h"}, probe_every="0s")}))
    assert storescu(bridge.port, ct_series(tmp_path / "ct", 2)).statuses == [0, 0]
    wait_for(lambda: listing(bridge)["destinations"]["out"]["state"] == "backing_off", 15, "the back-off")
    shown = queue_cli(bridge, "list").stdout
    assert "out: pending 2; destination backing_off for" in shown and "a file is in the way" in shown
    blocker.unlink()
    resumed = queue_cli(bridge, "resume", "out")
    assert resumed.returncode == 0, resumed.stderr
    assert "asked the running daemon" in resumed.stdout
    wait_for(lambda: len(delivered(blocker)) == 2, 15, "delivery right after the resume, not in an hour")
    wait_for(lambda: listing(bridge)["destinations"]["out"]["state"] == "up", 10, "the destination up")
    assert "destination out resumed (was backing_off" in bridge.log()


def test_resume_and_reload_lift_a_suspension(tmp_path, bridge_factory):
    """A PACS that refuses us outright: the destination is suspended, rows wait, uncharged."""
    port = free_port()
    refusing = subprocess.Popen([dcmtk("storescp"), "--refuse", str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        bridge = bridge_factory({
            "nodes": {"PACS": {"host": "127.0.0.1", "port": port}},
            **config({"pacs": {"type": "dimse", "node": "PACS"}}),
        })
        assert storescu(bridge.port, ct_series(tmp_path / "ct", 2)).statuses == [0, 0]
        wait_for(lambda: listing(bridge)["destinations"]["pacs"]["state"] == "suspended", 15, "the suspension")
        assert "pacs: pending 2; destination suspended (" in queue_cli(bridge, "list").stdout

        def suspensions() -> int:
            return bridge.log().count("destination pacs suspended")

        assert suspensions() == 1
        assert queue_cli(bridge, "resume", "pacs").returncode == 0
        wait_for(lambda: "destination pacs resumed (was suspended" in bridge.log(), 10, "the resume")
        wait_for(lambda: suspensions() == 2, 10, "a new attempt (suspended again: the cause is still there)")
        bridge.signal(signal.SIGHUP)
        wait_for(lambda: suspensions() == 3, 10, "a new attempt after the reload")
        assert all(r["attempts"] == 0 for r in listing(bridge)["rows"])
        unknown = queue_cli(bridge, "resume", "nowhere")
        assert unknown.returncode == 1 and "no destination 'nowhere'" in unknown.stderr
    finally:
        refusing.kill()
        refusing.wait(10)


def test_purge_removes_rows_and_the_spool_files_no_row_needs(tmp_path, bridge_factory):
    """One spool file serves both destinations: it goes only with the last row that needs it."""
    good = tmp_path / "good"
    bridge = bridge_factory(config({
        "good": folder(good),
        "bad": folder(in_the_way(tmp_path), retry={**FAST_RETRY, "max_age": "1s"}),
    }))
    assert storescu(bridge.port, ct_series(tmp_path / "ct", 3)).statuses == [0] * 3
    dead_rows(bridge, 3)
    wait_for(lambda: bridge.queue_states() == {"done": 3, "dead": 3}, 15, "good done, bad dead")
    assert len(spool_files(bridge)) == 3

    refused = queue_cli(bridge, "purge", "--state", "pending")
    assert refused.returncode == 2 and "--force" in refused.stderr
    purged = queue_cli(bridge, "purge", "--destination", "good", "--state", "done")
    assert purged.returncode == 0, purged.stderr
    assert "purged 3 row(s): good done 3" in purged.stdout
    assert bridge.queue_states() == {"dead": 3}
    assert len(spool_files(bridge)) == 3  # the dead rows of bad still need them

    purged = queue_cli(bridge, "purge", "--destination", "bad")
    assert "purged 3 row(s): bad dead 3" in purged.stdout and "deleted 3 spool file(s)" in purged.stdout
    assert bridge.queue_states() == {}
    assert spool_files(bridge) == []
    assert len(delivered(good)) == 3


def test_list_filters_by_study_accession_patient_and_age(tmp_path, bridge_factory):
    out = tmp_path / "out"
    bridge = bridge_factory(config({"out": folder(out)}))
    first = ct_series(tmp_path / "one", 2)
    second = [with_uid(f, tmp_path / f"two-{f.name}", PatientID="PID-TWO", AccessionNumber="ACC2")
              for f in ct_series(tmp_path / "two", 3)]
    assert storescu(bridge.port, first + second).statuses == [0] * 5
    wait_for(lambda: bridge.queue_states() == {"done": 5}, 30, "5 rows done")

    study = str(_uid(second[0], "StudyInstanceUID"))
    assert {r["study_uid"] for r in listing(bridge, "--study", study)["rows"]} == {study}
    assert len(listing(bridge, "--study", study)["rows"]) == 3
    assert len(listing(bridge, "--accession", "ACC1")["rows"]) == 2
    assert len(listing(bridge, "--patient", "PID-TWO")["rows"]) == 3
    nobody = listing(bridge, "--patient", "nobody")
    assert nobody["rows"] == [] and nobody["matching"] == 0
    assert listing(bridge, "--older-than", "1h")["rows"] == []
    assert len(listing(bridge, "--older-than", "0s", "--state", "done")["rows"]) == 5
    limited = listing(bridge, "--limit", "2")
    assert len(limited["rows"]) == 2 and limited["matching"] == 5
    shown = queue_cli(bridge, "list", "--patient", "PID-TWO").stdout
    assert "3 of 3 matching row(s) shown" in shown and "out: done 3" in shown
    assert "..." + study[-14:] in shown
    bad = queue_cli(bridge, "list", "--older-than", "soon")
    assert bad.returncode == 2 and "not a duration" in bad.stderr


def test_sighup_applies_a_changed_destination_path(tmp_path, bridge_factory):
    before, after = tmp_path / "before", tmp_path / "after"
    bridge = bridge_factory(config({"out": folder(before)}))
    assert storescu(bridge.port, ct_series(tmp_path / "one", 2)).statuses == [0, 0]
    wait_for(lambda: len(delivered(before)) == 2, 20, "2 files in the first folder")
    bridge.config["destinations"]["out"] = folder(after, workers=2)
    bridge.write_config()
    bridge.signal(signal.SIGHUP)
    wait_for(lambda: "destination out changed" in bridge.log(), 10, "the reload")
    assert storescu(bridge.port, ct_series(tmp_path / "two", 3)).statuses == [0] * 3
    wait_for(lambda: len(delivered(after)) == 3, 20, "the next 3 files in the new folder")
    assert len(delivered(before)) == 2


def test_sighup_removing_a_destination_keeps_its_rows(tmp_path, bridge_factory):
    kept = tmp_path / "kept"
    bridge = bridge_factory(config({
        "kept": folder(kept),
        "gone": folder(in_the_way(tmp_path), retry={"initial": "1h", "max": "1h"}),
    }))
    assert storescu(bridge.port, ct_series(tmp_path / "ct", 2)).statuses == [0, 0]
    wait_for(lambda: len(delivered(kept)) == 2, 20, "2 files in the kept folder")
    bridge.config = {**bridge.config, **config({"kept": folder(kept)})}
    bridge.write_config()
    bridge.signal(signal.SIGHUP)
    wait_for(lambda: "destination gone is not in the configuration: its 2 undelivered row(s)" in bridge.log(),
             10, "the warning naming the removed destination")
    gone = listing(bridge, "--destination", "gone")
    assert [(r["state"], r["in_config"]) for r in gone["rows"]] == [("pending", False)] * 2
    shown = queue_cli(bridge, "list", "--destination", "gone").stdout
    assert shown.count("gone (not in config)") == 3  # two rows and the summary line
    assert storescu(bridge.port, ct_series(tmp_path / "more", 1)).statuses == [0]
    wait_for(lambda: len(delivered(kept)) == 3, 20, "the kept destination goes on")
    # The file lands before its row is recorded done: wait for the record, not just the file.
    wait_for(lambda: bridge.queue_states() == {"done": 3, "pending": 2}, 10, "3 rows done, 2 pending")


def _uid(path: Path, keyword: str = "SOPInstanceUID") -> object:
    import pydicom

    return pydicom.dcmread(path, stop_before_pixels=True)[keyword].value



def test_list_shows_a_long_error_on_one_line_and_show_gives_it_whole(tmp_path, bridge_factory):
    """A reason with a newline and hundreds of characters (here a folder path) is one
    readable line of ``queue list``, cut with an ellipsis; ``queue show`` and ``--json``
    give it whole."""
    blocker = tmp_path / ("a-long-folder-name-" * 8) / ("and-another-one-" * 8) / "two\nlines"
    blocker.parent.mkdir(parents=True)
    blocker.write_text("a file, not a folder")
    bridge = bridge_factory(config({"out": folder(blocker, retry={"initial": "1h", "max": "1h"})}))
    assert storescu(bridge.port, ct_series(tmp_path / "ct", 2)).statuses == [0, 0]
    wait_for(lambda: listing(bridge)["destinations"]["out"]["state"] == "backing_off", 15, "the back-off")
    reason = f"cannot create folder {blocker}: a file is in the way"
    rows = listing(bridge)["rows"]
    assert [r["last_error"] for r in rows] == [reason, reason]

    shown = queue_cli(bridge, "list", "--destination", "out")
    assert shown.returncode == 0, shown.stderr
    table = shown.stdout.splitlines()[:3]
    assert table[0].startswith("ID") and [line.split()[0] for line in table[1:]] == [str(r["id"]) for r in rows]
    for line in table[1:]:
        error = line[table[0].index("LAST ERROR"):]
        assert error.startswith("cannot create folder ") and error.endswith("\u2026") and "'" not in error
        assert " ".join(reason.split()).startswith(error[:-1])

    whole = queue_cli(bridge, "show", str(rows[0]["id"]))
    assert whole.returncode == 0, whole.stderr
    first, second = reason.split("\n")
    assert f"  last error:      {first}\n                   {second}\n" in whole.stdout  # continued, indented
    assert "state:           pending" in whole.stdout and rows[0]["sop_instance_uid"] in whole.stdout
    missing = queue_cli(bridge, "show", "999999")
    assert missing.returncode == 1 and "row 999999: not in the queue" in missing.stdout
