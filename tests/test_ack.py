"""`ack: delivered`: the C-STORE answer waits for the destinations of the rule."""

from __future__ import annotations

import time

import pytest
from peers import storescu, wait_for
from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AE, evt

VERIFICATION = "1.2.840.10008.1.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
ALL_TRANSFER_SYNTAXES = [str(uid) for uid in AllTransferSyntaxes]


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


@pytest.mark.parametrize(("refused_with", "answered"), [(0xA900, 0xA900), (0x0107, 0xC000)])
def test_ack_delivered_answers_a_refused_delivery_with_the_destinations_failure(tmp_path, series, bridge_factory,
                                                                                 raw_scu, refused_with, answered):
    """A PACS that refuses the instance for good: the C-STORE is answered with the PACS's
    own status when it means failure to a modality too, else 0xC000; its comment says why."""
    pacs = AE(ae_title="PACS")
    pacs.add_supported_context(VERIFICATION)
    pacs.add_supported_context(CT_IMAGE, ALL_TRANSFER_SYNTAXES)
    server = pacs.start_server(("127.0.0.1", 0), block=False,
                               evt_handlers=[(evt.EVT_C_STORE, lambda event: refused_with)])
    try:
        bridge = bridge_factory({
            "ae_title": "BRIDGE",
            "nodes": {"PACS": {"ae_title": "PACS", "host": "127.0.0.1", "port": server.server_address[1]}},
            "destinations": {"pacs": {"type": "dimse", "node": "PACS"}},
            "rules": [{"name": "all", "store": ["pacs"], "ack": "delivered", "ack_timeout": "20s"}],
        })
        raw_scu.add_requested_context(CT_IMAGE, ["1.2.840.10008.1.2.1"])
        assoc = raw_scu.associate("127.0.0.1", bridge.port, ae_title="BRIDGE")
        try:
            rsp = assoc.send_c_store(series[0])
        finally:
            assoc.release()
    finally:
        server.shutdown()
    assert rsp.Status == answered
    assert rsp.ErrorComment.startswith(f"delivery to pacs failed: 0x{refused_with:04X}")
    assert bridge.queue_states() == {"dead": 1}
