"""`ack: delivered`: the C-STORE answer waits for the destinations of the rule."""

from __future__ import annotations

import time

from peers import storescu, wait_for


def test_ack_delivered_answers_once_the_destination_holds_it(tmp_path, series, bridge_factory):
    out = tmp_path / "out"
    bridge = bridge_factory({
        "destinations": {"pacs": {"type": "folder", "path": str(out)}},
        "rules": [{"name": "all", "store": ["pacs"], "ack": "delivered", "ack_timeout": "20s"}],
    })
    files = series[:3]
    result = storescu(bridge.port, files)
    assert result.statuses == [0, 0, 0]
    # answered only after delivery: the files are there the moment storescu returns
    assert len(list(out.glob("*.dcm"))) == 3


def test_ack_delivered_with_the_destination_down_is_delivery_pending_then_delivered(tmp_path, series,
                                                                                     bridge_factory):
    blocker = tmp_path / "blocked"
    blocker.write_text("a file where the destination wants a folder")  # the destination cannot write
    bridge = bridge_factory({
        "destinations": {"pacs": {"type": "folder", "path": str(blocker / "out")}},
        "rules": [{"name": "all", "store": ["pacs"], "ack": "delivered", "ack_timeout": "2s"}],
        "retry": {"initial": "1s", "max": "1s"},
    })
    started = time.monotonic()
    result = storescu(bridge.port, series[:1])
    assert result.statuses == [0xA700]
    assert time.monotonic() - started < 15  # 2 s of waiting, well inside any modality's DIMSE timeout
    assert "not yet delivered to pacs" in bridge.log()
    assert bridge.queue_states() == {"pending": 1}  # the row stays queued
    blocker.unlink()  # the destination comes back
    wait_for(lambda: len(list((blocker / "out").glob("*.dcm"))) == 1, 30, "the delivery")
    assert storescu(bridge.port, series[:1]).statuses == [0]  # the resend: already delivered
    assert bridge.queue_states() == {"done": 1}
