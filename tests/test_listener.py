"""The listener: associations (who may ask, how many, how long), and its services side by
side on one association."""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path

import pytest
from corpus import ct_series
from peers import echoscu, wait_for
from rawpeer import IMPLICIT_LE, VERIFICATION, RawPeer, command_set, element, p_data
from test_store import dcm_files, folder_config


@pytest.fixture(scope="module")
def shared_config(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return folder_config(tmp_path_factory.mktemp("listener") / "out")


def test_echo_and_the_embedded_listener_settings(bridge_factory):
    bridge = bridge_factory(folder_config(Path("/nonexistent-never-written")))
    result = echoscu(bridge.port)
    assert result.returncode == 0
    assert "Success" in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("accept", "calling", "called", "reason"),
    [
        ({"calling_ae": ["CT*", "MR1"]}, "US1", "BRIDGE", "Calling AE Title Not Recognized"),
        ({"check_called_ae": True}, "CT1", "OTHER", "Called AE Title Not Recognized"),
        ({"hosts": ["10.0.0.0/8"]}, "CT1", "BRIDGE", "No Reason"),
    ],
)
def test_association_rejections(tmp_path, bridge_factory, accept, calling, called, reason):
    bridge = bridge_factory(folder_config(tmp_path / "out", accept=accept))
    result = echoscu(bridge.port, calling_ae=calling, called_ae=called)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Association Rejected" in output
    assert reason.lower() in output.lower(), output
    assert "Permanent" in output
    wait_for(lambda: "rejected association from" in bridge.log(), 10, "the rejection in the log")
    # the allowed case still works
    if "calling_ae" in accept:
        assert echoscu(bridge.port, calling_ae="CT7", called_ae="BRIDGE").returncode == 0


def test_a_peer_that_stops_in_the_middle_of_a_pdu_is_cut_off(tmp_path, bridge_factory):
    """Between PDUs pynetdicom's timers end a silent association; within one, nothing would."""
    bridge = bridge_factory(folder_config(tmp_path / "out", listen={"timeouts": {"network": "1s"}}))
    stalled = socket.create_connection(("127.0.0.1", bridge.port))
    try:
        stalled.sendall(struct.pack(">BBL", 0x01, 0, 1000) + bytes(10))  # an A-ASSOCIATE-RQ's first bytes
        stalled.settimeout(20)
        started = time.monotonic()
        try:
            assert stalled.recv(100) == b""  # closed by the bridge
        except ConnectionResetError:
            pass
        assert time.monotonic() - started < 10
    finally:
        stalled.close()
    assert echoscu(bridge.port, called_ae="BRIDGE").returncode == 0


def test_too_many_associations_are_refused_transiently(tmp_path, bridge_factory):
    from pynetdicom import AE

    bridge = bridge_factory(folder_config(tmp_path / "out", listen={"max_associations": 1}))
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context("1.2.840.10008.1.1")
    # The start-up check's echo association may still be counted for a moment after its
    # release (pynetdicom counts association threads until they end): try again until
    # the one slot is ours.
    held = wait_for(lambda: (a := ae.associate("127.0.0.1", bridge.port)).is_established and a, 10,
                    "the one association slot")
    try:
        result = echoscu(bridge.port)
        output = result.stdout + result.stderr
        assert result.returncode != 0
        assert "Rejected Transient" in output and "Local Limit Exceeded" in output, output
    finally:
        held.release()
    wait_for(lambda: echoscu(bridge.port).returncode == 0, 10, "a free slot again")
    assert "too many associations (A-ASSOCIATE-RJ 2/3/2)" in bridge.log()


def test_echoes_and_stores_interleaved_on_one_association(tmp_path, shared_bridge, raw_scu):
    """C-ECHO is served by the association's own thread, C-STORE by its network thread
    (bridge.dimse.pynetdicom_overrides): taking turns on one association, each gets its answer."""
    bridge = shared_bridge
    files = ct_series(tmp_path / "ct", 3)
    raw_scu.add_requested_context("1.2.840.10008.1.1")
    raw_scu.add_requested_context("1.2.840.10008.5.1.4.1.1.2", ["1.2.840.10008.1.2.1"])
    assoc = raw_scu.associate("127.0.0.1", bridge.port, ae_title="BRIDGE")
    try:
        statuses = []
        for path in files:
            statuses += [assoc.send_c_echo().Status, assoc.send_c_store(path).Status]
        assert statuses == [0] * 6
    finally:
        assoc.release()
    wait_for(lambda: len(dcm_files(bridge.data_dir / "archive")) == 3, 30, "the archive")


# (Command Field, its elements besides Affected SOP Class UID and Command Data Set Type)
_UNSERVED = {
    "C-FIND-RQ": (0x0020, {0x0110: 1, 0x0700: 0}),  # with an identifier (below)
    "C-ECHO-RSP": (0x8030, {0x0120: 1, 0x0900: 0}),
    "C-STORE-RSP": (0x8001, {0x0110: 1, 0x0900: 0}),  # a Message ID where the response's belongs
}


@pytest.mark.parametrize("message", list(_UNSERVED))
def test_a_message_no_service_of_the_listener_answers_is_aborted(shared_bridge, message):
    """On an accepted context, a request of a service the listener does not provide (or a
    response, which nothing asked for) gets an A-ABORT, not silence; the listener goes on."""
    bridge = shared_bridge
    command_field, values = _UNSERVED[message]
    peer = RawPeer(bridge.port)
    try:
        assert peer.associate([(1, VERIFICATION, IMPLICIT_LE)]) == [1]
        with_identifier = command_field == 0x0020
        elements = {0x0002: b"1.2.840.10008.1.1\x00", 0x0100: struct.pack("<H", command_field),
                    0x0800: struct.pack("<H", 0x0000 if with_identifier else 0x0101)}
        elements |= {key: struct.pack("<H", value) for key, value in values.items()}
        peer.send(p_data(1, 0x03, command_set(elements)))
        if with_identifier:  # (0008,0052) Query/Retrieve Level
            peer.send(p_data(1, 0x02, element(0x0008, 0x0052, b"STUDY ")))
        assert peer.answer().kind in ("abort", "closed")
    finally:
        peer.close()
    wait_for(lambda: "is not a service the listener provides" in bridge.log(), 10, "the abort in the log")
    assert echoscu(bridge.port, called_ae="BRIDGE").returncode == 0
