"""Hostile and broken peers: what they send cannot take the listener's memory, its
association slots or its answers (docs/conformance.md, "Hostile and broken peers").

The fuzz runs are seeded (the same bytes every run) and last ``--fuzz-seconds`` each
(a few seconds by default; longer runs: ``pytest --fuzz-seconds 300 tests/test_hostile_peers.py``).
"""

from __future__ import annotations

import random
import socket
import struct
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from corpus import ct_series, data_set_bytes
from peers import Bridge, echoscu, wait_for
from rawpeer import (
    A_ABORT,
    A_ASSOCIATE_AC,
    A_ASSOCIATE_RQ,
    A_RELEASE_RP,
    A_RELEASE_RQ,
    CT_IMAGE,
    EXPLICIT_LE,
    P_DATA_TF,
    VERIFICATION,
    RawPeer,
    associate_rq,
    command_set,
    p_data,
    pdu,
    store_command,
)

MEMORY_CEILING = 300 * 1024 * 1024  # bytes, resident, whatever the peers send
MAX_PDU = 16384


def config(**listen: object) -> dict:
    return {
        "ae_title": "BRIDGE",
        "destinations": {"archive": {"type": "archive"}},
        "rules": [{"name": "everything", "store": ["archive"]}],
        "listen": {"max_pdu": MAX_PDU, **listen},
    }


@pytest.fixture(scope="module")
def shared_config() -> dict:
    return config()


@pytest.fixture
def bridge(shared_bridge: Bridge) -> Bridge:
    """The daemon of the tests that need no setting of their own: one for the module, the
    peers are what each test brings."""
    return shared_bridge


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in bytes."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0]) * 1024
    return found


def assert_serving(port: int) -> None:
    started = time.monotonic()
    result = echoscu(port, called_ae="BRIDGE", timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert time.monotonic() - started < 10


def a_ct(tmp_path: Path) -> tuple[str, bytes]:
    """(SOP Instance UID, data set bytes in explicit VR little endian) of a small CT."""
    path = ct_series(tmp_path / "ct", 1, size=16)[0]
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID), data_set_bytes(path)


def send_store(peer: RawPeer, command: bytes, data_set: bytes, context_id: int = 1) -> None:
    peer.send(p_data(context_id, 0x03, command))
    for offset in range(0, len(data_set), MAX_PDU - 12):
        last = offset + MAX_PDU - 12 >= len(data_set)
        if not peer.send(p_data(context_id, 0x02 if last else 0x00, data_set[offset:offset + MAX_PDU - 12])):
            return


# -- point 4: PDU lengths --------------------------------------------------------------


def test_an_association_request_announcing_4_gib_is_aborted_unread(bridge):
    peer = RawPeer(bridge.port)
    try:
        rq = associate_rq([(1, VERIFICATION, EXPLICIT_LE)])
        peer.send(struct.pack(">BBL", A_ASSOCIATE_RQ, 0, 0xFFFFFFF0) + rq[6:])  # 182 bytes, 4 GiB announced
        got = peer.answer(timeout=10)
        assert got.kind in ("abort", "closed"), got
    finally:
        peer.close()
    assert memory(bridge.proc.pid)["VmHWM"] < MEMORY_CEILING
    assert_serving(bridge.port)
    wait_for(lambda: "A-ASSOCIATE-RQ PDU of 4294967280 bytes announced" in bridge.log(), 10, "the log line")
    assert "127.0.0.1" in next(line for line in bridge.log().splitlines() if "4294967280" in line)


def test_a_p_data_longer_than_the_announced_maximum_is_aborted_unread(tmp_path, bridge):
    peer = RawPeer(bridge.port)
    try:
        assert peer.associate([(1, CT_IMAGE, EXPLICIT_LE)]) == [1]
        announced = 8 * 1024 * 1024
        peer.send(struct.pack(">BBL", P_DATA_TF, 0, announced) + bytes(65536))
        assert peer.answer(timeout=10).kind in ("abort", "closed")
        # a miscount by a few bytes is forgiven
        other = RawPeer(bridge.port)
        try:
            assert other.associate([(1, CT_IMAGE, EXPLICIT_LE)]) == [1]
            uid, data_set = a_ct(tmp_path)
            other.send(p_data(1, 0x03, command_set(store_command(CT_IMAGE, uid))))
            fragment = data_set[:MAX_PDU]
            other.send(p_data(1, 0x00, fragment) + p_data(1, 0x02, data_set[MAX_PDU:]))
            got = other.answer()
            assert got.kind == "status" and got.status == 0x0000, got
        finally:
            other.close()
    finally:
        peer.close()
    assert memory(bridge.proc.pid)["VmHWM"] < MEMORY_CEILING
    assert_serving(bridge.port)
    assert "P-DATA-TF PDU of 8388608 bytes announced, more than the" in bridge.log()


def test_an_a_abort_with_a_source_out_of_range_ends_the_association(bridge):
    """pynetdicom decoded it, then failed to convert it in the state machine, which ended
    the network thread: the association stayed open with nobody reading it."""
    peer = RawPeer(bridge.port)
    try:
        assert peer.associate([(1, CT_IMAGE, EXPLICIT_LE)]) == [1]
        peer.send(pdu(A_ABORT, bytes([0, 0, 122, 0])))
        assert peer.answer(timeout=10).kind in ("abort", "closed")
    finally:
        peer.close()
    wait_for(lambda: "association aborted after" in bridge.log(), 10, "the association to end as aborted")
    assert "Exception in thread" not in bridge.log()
    assert_serving(bridge.port)


def _pdu_fuzz_case(rng: random.Random, port: int) -> list[bytes]:
    """What one fuzzing connection sends: PDUs with lying lengths, random bytes,
    truncated PDUs and PDUs out of order, before or after a real negotiation."""
    good_rq = associate_rq([(1, CT_IMAGE, EXPLICIT_LE), (3, VERIFICATION, EXPLICIT_LE)])
    huge = rng.choice([0xFFFFFFFF, 0xFFFFFFF0, 0x80000000, 512 * 1024 * 1024, 65537, MAX_PDU + 2048, 70000])
    kind = rng.randrange(8)
    if kind == 0:  # a header announcing a huge PDU of any type, then a little
        return [struct.pack(">BBL", rng.randint(1, 7), 0, huge) + rng.randbytes(rng.randrange(0, 300))]
    if kind == 1:  # noise
        return [rng.randbytes(rng.randrange(1, 5000))]
    if kind == 2:  # a request cut short
        return [good_rq[:rng.randrange(1, len(good_rq))]]
    if kind == 3:  # a request with bytes flipped
        data = bytearray(good_rq)
        for _ in range(rng.randrange(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return [bytes(data)]
    if kind == 4:  # a PDU that has no place before an association
        return [pdu(rng.choice([A_ASSOCIATE_AC, P_DATA_TF, A_RELEASE_RQ, A_RELEASE_RP, A_ABORT]),
                    rng.randbytes(rng.randrange(0, 200)))]
    # after a real negotiation: out-of-order PDUs, lying lengths, random P-DATA items
    after = [
        good_rq,
        pdu(A_ASSOCIATE_AC, rng.randbytes(100)),
        struct.pack(">BBL", P_DATA_TF, 0, huge) + rng.randbytes(rng.randrange(0, 2000)),
        pdu(P_DATA_TF, rng.randbytes(rng.randrange(0, MAX_PDU))),
        pdu(P_DATA_TF, struct.pack(">LBB", rng.choice([0, 1, 0xFFFFFFFF, 5000]), 1, rng.randrange(4))
            + rng.randbytes(rng.randrange(0, 100))),
        p_data(1, rng.randrange(4), rng.randbytes(rng.randrange(0, 4000))),
        pdu(A_RELEASE_RP, bytes(4)),
        pdu(rng.randint(1, 7), rng.randbytes(rng.randrange(0, 100)))[:rng.randrange(1, 50)],
    ]
    return [good_rq, *rng.sample(after, rng.randrange(1, 4))]


def test_pdu_fuzz_keeps_memory_bounded_and_the_daemon_serving(bridge_factory, fuzz_seconds):
    bridge = bridge_factory(config(max_associations=64, max_pending_connections=64))
    pid = bridge.proc.pid
    rng = random.Random(20261205)
    open_peers: list[socket.socket] = []
    deadline = time.monotonic() + fuzz_seconds
    cases = 0
    try:
        while time.monotonic() < deadline and cases < 100_000:
            cases += 1
            try:
                sock = socket.create_connection(("127.0.0.1", bridge.port), timeout=5)
            except OSError:
                continue  # refused while at max_pending_connections: what the bound is for
            for chunk in _pdu_fuzz_case(rng, bridge.port):
                try:
                    sock.sendall(chunk)
                    sock.settimeout(0.05)
                    sock.recv(65536)
                except OSError:
                    break
            open_peers.append(sock)  # some stay open: concurrent liars
            if len(open_peers) > 16:
                open_peers.pop(rng.randrange(len(open_peers))).close()
            used = memory(pid)
            assert used["VmRSS"] < MEMORY_CEILING, f"after {cases} cases: {used}"
    finally:
        for sock in open_peers:
            sock.close()
    assert memory(pid)["VmHWM"] < MEMORY_CEILING
    assert cases > 20
    assert_serving(bridge.port)
    assert "Exception in thread" not in bridge.log()  # no network thread ended by what a peer sent


# -- point 5: idle connections -----------------------------------------------------------


def test_idle_connections_take_no_association_slot(bridge):
    """50 connections that never ask for an association (more than the 32 associations
    allowed): a modality's echo is still answered at once."""
    idle = [socket.create_connection(("127.0.0.1", bridge.port), timeout=5) for _ in range(50)]
    try:
        for _ in range(3):
            started = time.monotonic()
            result = echoscu(bridge.port, called_ae="BRIDGE", timeout=30)
            assert result.returncode == 0, result.stdout + result.stderr
            assert time.monotonic() - started < 2
    finally:
        for sock in idle:
            sock.close()


def test_the_listen_backlog_takes_a_burst_of_modalities(bridge):
    """The kernel's queue of connections waiting for accept() (ss shows its size as
    Send-Q of a listening socket): 128, not socketserver's 5, with which 300 modalities
    connecting at once took 47 s to be accepted."""
    listening = subprocess.run(["ss", "-Hltn", f"sport = :{bridge.port}"], capture_output=True, text=True,
                               check=True).stdout.split()
    assert int(listening[2]) >= 128, listening


def assert_closed_by_the_bridge(sock: socket.socket, within: float) -> None:
    """The bridge closes ``sock`` (or resets it), having sent nothing, within ``within`` seconds."""
    started = time.monotonic()
    try:
        assert sock.recv(100) == b""
    except ConnectionResetError:
        pass
    assert time.monotonic() - started < within


def test_an_idle_connection_is_closed_after_the_association_request_deadline(bridge_factory):
    bridge = bridge_factory(config(timeouts={"association_request": "1s"}))
    with socket.create_connection(("127.0.0.1", bridge.port), timeout=20) as idle:
        assert_closed_by_the_bridge(idle, within=5)


def test_connections_beyond_the_pending_bound_are_closed_at_once(bridge_factory):
    bridge = bridge_factory(config(max_pending_connections=5))
    idle = [socket.create_connection(("127.0.0.1", bridge.port), timeout=5) for _ in range(5)]
    try:
        assert "closed at once" not in bridge.log()
        with socket.create_connection(("127.0.0.1", bridge.port), timeout=5) as extra:
            assert_closed_by_the_bridge(extra, within=2)
        wait_for(lambda: "connection from 127.0.0.1 closed at once" in bridge.log(), 10, "the log line")
    finally:
        for sock in idle:
            sock.close()
    wait_for(lambda: echoscu(bridge.port, called_ae="BRIDGE").returncode == 0, 10, "service once they are gone")


# -- point 6: every C-STORE request gets an answer ------------------------------------------


def _store(tmp_path: Path, bridge, elements: dict[int, bytes] | None = None, command: bytes | None = None,
           data_set: bytes | None = None):
    uid, ct = a_ct(tmp_path)
    peer = RawPeer(bridge.port)
    try:
        assert peer.associate([(1, CT_IMAGE, EXPLICIT_LE)]) == [1]
        send_store(peer, command if command is not None else command_set(
            {**store_command(CT_IMAGE, uid), **(elements or {})}), ct if data_set is None else data_set)
        got = peer.answer(timeout=10)
        if got.kind == "status":
            assert peer.release().kind in ("release", "closed")
        return got
    finally:
        peer.close()


def test_a_non_ascii_sop_instance_uid_gets_a_status(tmp_path, bridge):
    got = _store(tmp_path, bridge, {0x1000: "1.2.3.\u00e9".encode("latin-1") + b"4"})
    assert got.kind == "status" and got.status == 0xC000, got
    assert "Affected SOP Instance UID is not ASCII" in got.comment
    assert "C-STORE from 127.0.0.1" in bridge.log() and "not ASCII" in bridge.log()
    assert_serving(bridge.port)


def test_a_uid_longer_than_64_characters_gets_a_status(tmp_path, bridge):
    got = _store(tmp_path, bridge, {0x1000: ("1." * 40)[:-1].encode() + b"\x00"})
    assert got.kind == "status" and got.status == 0xC000, got
    assert "longer than 64" in got.comment
    assert_serving(bridge.port)


def test_a_zero_filled_command_is_aborted_and_logged_with_the_peer(tmp_path, bridge):
    got = _store(tmp_path, bridge, command=bytes(120))
    assert got.kind in ("abort",), got
    wait_for(lambda: "A-ABORT to 127.0.0.1:" in bridge.log(), 10, "the log line naming the peer")
    assert "cannot decode the DIMSE message" in bridge.log()
    assert_serving(bridge.port)


_US_VALUES = [b"", b"\x00", b"\x00\x00", b"\x01\x00", b"\x02\x00", b"\x03\x00", b"\xff\xff", b"\x01\x00\x00",
              b"\x00" * 8]
_UID_VALUES = [b"", b"\x00", b"1", b"1.2.840.10008.1.1\x00", b"1.2.840.10008.5.1.4.1.1.4\x00", b"1.2..3\x00",
               b"1.2.abc\x00", ("1." * 40).encode()[:-1] + b"\x00", ("9" * 64).encode(), "1.\u00e9".encode(),
               b"\xff" * 10, b"\x00" * 64, b"1.2.3 " * 20]
# Command Field values; not 0x0FFF: a C-CANCEL has no answer (PS3.7 9.3.2.3).
_COMMAND_FIELDS = [b"\x01\x00", b"\x01\x80", b"\x30\x00", b"\x20\x00", b"\x10\x00", b"\x00\x01", b"\x34\x12",
                   b"\x00\x00", b"\xff\xff", b"\x01"]


def _mutated_command(rng: random.Random, uid: str) -> bytes:
    elements = store_command(CT_IMAGE, uid, message_id=rng.randrange(1, 0x10000))
    for _ in range(rng.randrange(1, 3)):
        target = rng.choice([0x0002, 0x0100, 0x0110, 0x0700, 0x0800, 0x1000, 0x0030, 0x1030, 0x1031, None])
        if target is None:
            elements.pop(rng.choice(list(elements)), None)
        elif target == 0x0100:
            elements[target] = rng.choice(_COMMAND_FIELDS)
        elif target in (0x0002, 0x1000):
            elements[target] = rng.choice(_UID_VALUES + [rng.randbytes(rng.randrange(0, 80))])
        elif target == 0x1030:  # Move Originator AE Title
            elements[target] = rng.choice([b"MOVER ", b"", b"\xff" * 16, b"A" * 40])
        else:
            elements[target] = rng.choice(_US_VALUES + [rng.randbytes(rng.randrange(0, 6))])
    command = command_set(elements)
    if rng.random() < 0.15:  # a group length that lies, or a command cut or padded
        command = rng.choice([command[:8] + rng.randbytes(4) + command[12:], command[:rng.randrange(len(command))],
                              command + rng.randbytes(rng.randrange(1, 20))])
    return command


def test_command_fuzz_every_store_gets_a_status_or_an_abort(tmp_path, bridge, fuzz_seconds):
    rng = random.Random(14)
    uid, ct = a_ct(tmp_path)
    deadline = time.monotonic() + fuzz_seconds
    outcomes: dict[str, int] = {}
    cases = 0
    while time.monotonic() < deadline and cases < 10_000:
        cases += 1
        command = _mutated_command(rng, uid)
        peer = RawPeer(bridge.port)
        try:
            assert peer.associate([(1, CT_IMAGE, EXPLICIT_LE)]) == [1]
            send_store(peer, command, ct)
            got = peer.answer(timeout=10)
            assert got.kind in ("status", "abort"), f"case {cases}: {command!r} -> {got}"
            outcomes[got.kind] = outcomes.get(got.kind, 0) + 1
            if got.kind == "status":
                assert got.status is not None
                if got.status != 0x0000:
                    assert got.comment, f"case {cases}: {command!r}: a failure without a reason"
                assert peer.release().kind in ("release", "closed")
        finally:
            peer.close()
    assert cases > 10 and outcomes.get("status"), outcomes
    assert_serving(bridge.port)


def test_a_well_formed_store_still_succeeds_over_the_raw_peer(tmp_path, bridge):
    """The fuzz's own baseline: its unmutated request is stored."""
    got = _store(tmp_path, bridge)
    assert got.kind == "status" and got.status == 0x0000, got
