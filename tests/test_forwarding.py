"""Forwarding through outages and crashes: a modality sends to the bridge, the bridge
delivers by STOW-RS to a real Orthanc that is down, comes back, or outlives a bridge
killed with SIGKILL. What the bridge decided is read from its queue database."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from corpus import ct_series
from peers import Orthanc, storescu, wait_for

pytestmark = pytest.mark.slow


def stow_config(orthanc: Orthanc, **destination: object) -> dict:
    return {
        "ae_title": "BRIDGE",
        "destinations": {"web": {"type": "dicomweb", "url": orthanc.dicomweb, **destination}},
        "rules": [{"name": "everything", "store": ["web"]}],
        "retry": {"initial": "1s", "max": "2s"},
    }


def uids(files: list[Path]) -> list[str]:
    return [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files]


def stored_order(orthanc: Orthanc) -> list[str]:
    """SOP Instance UIDs in the order Orthanc stored them (its change log)."""
    order, since = [], 0
    for _ in range(100):  # pages of 100 changes; bounded
        page = orthanc.get(f"/changes?since={since}&limit=100")
        for change in page["Changes"]:
            if change["ChangeType"] == "NewInstance":
                order.append(orthanc.get(f"/instances/{change['ID']}/simplified-tags")["SOPInstanceUID"])
        since = page["Last"]
        if page["Done"]:
            return order
    raise AssertionError("Orthanc's change log did not end")


def test_orthanc_down_costs_no_attempt_and_the_backlog_arrives_in_order(tmp_path, orthanc_factory,
                                                                         bridge_factory):
    orthanc = Orthanc(tmp_path / "orthanc")  # configured, not started: the server is down
    bridge = bridge_factory(stow_config(orthanc, workers=1, batch={"max_instances": 10}))
    files = ct_series(tmp_path / "ct", 100, size=64)

    result = storescu(bridge.port, files)
    assert result.statuses == [0] * 100, result.output[-2000:]  # the modality never notices
    wait_for(lambda: bridge.destination_state("web")[0] == "backing_off", 30, "the destination to back off")
    wait_for(lambda: "destination web unavailable" in bridge.log(), 10, "the log to say why")
    rows = bridge.queue_rows("web")
    assert len(rows) == 100
    assert {(r["state"], r["attempts"]) for r in rows} == {("pending", 0)}  # nobody charged

    orthanc.start()
    try:
        wait_for(lambda: orthanc.count() == 100, 90, "Orthanc to hold the backlog")
        wait_for(lambda: {r["state"] for r in bridge.queue_rows("web")} == {"done"}, 30, "every row done")
        rows = bridge.queue_rows("web")
        # one attempt each (the one that succeeded): the outage charged nothing
        assert {r["attempts"] for r in rows} == {1}
        assert [r["sop_instance_uid"] for r in rows] == uids(files)
        assert stored_order(orthanc) == uids(files)  # drained in arrival order
        assert bridge.destination_state("web")[0] == "up"
    finally:
        orthanc.stop()
    assert bridge.stop() == 0


def test_kill_9_mid_delivery_then_restart_delivers_everything_once(tmp_path, orthanc_factory, bridge_factory):
    orthanc = Orthanc(tmp_path / "orthanc")
    bridge = bridge_factory(stow_config(orthanc, workers=1, batch={"max_instances": 5}))
    files = ct_series(tmp_path / "ct", 100, size=128)
    assert storescu(bridge.port, files).statuses == [0] * 100
    wait_for(lambda: bridge.destination_state("web")[0] == "backing_off", 30, "the destination to back off")

    orthanc.start()  # the backlog starts to drain; the bridge dies in the middle of it
    try:
        wait_for(lambda: orthanc.count() >= 5, 60, "the first instances in Orthanc", interval=0.01)
        bridge.kill()
        assert orthanc.count() < 100, "delivery finished before the kill: the test proves nothing"
        # Orthanc holds instances whose rows are not all done: those are resent after the restart
        assert {r["state"] for r in bridge.queue_rows("web")} & {"pending", "in_flight"}

        bridge.start()
        wait_for(lambda: orthanc.count() == 100, 90, "every instance after the restart")
        wait_for(lambda: {r["state"] for r in bridge.queue_rows("web")} == {"done"}, 30, "every row done")
        assert sorted(orthanc.instance_uids()) == sorted(uids(files))  # each once
        assert "dead" not in bridge.log().lower()
    finally:
        orthanc.stop()
    assert bridge.stop() == 0
