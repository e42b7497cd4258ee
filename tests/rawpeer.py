"""A DICOM peer made of bytes: PDUs and DIMSE commands built by hand (PS3.8 9.3, PS3.7 E),
for tests that send what no well-behaved tool would."""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass

APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
VERIFICATION = "1.2.840.10008.1.1"

A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, P_DATA_TF, A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = range(1, 8)


def _even(uid: str | bytes) -> bytes:
    data = uid.encode() if isinstance(uid, str) else uid
    return data + b"\x00" if len(data) % 2 else data


def _item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBL", pdu_type, 0, len(body)) + body


def associate_rq(contexts: list[tuple[int, str, str]], called: str = "BRIDGE", calling: str = "RAWPEER",
                 max_pdu: int = 16384) -> bytes:
    """An A-ASSOCIATE-RQ PDU proposing ``(context id, abstract syntax, transfer syntax)``."""
    items = _item(0x10, APPLICATION_CONTEXT)
    for context_id, abstract, transfer in contexts:
        items += _item(0x20, struct.pack(">BBBB", context_id, 0, 0, 0) + _item(0x30, _even(abstract))
                       + _item(0x40, _even(transfer)))
    items += _item(0x50, _item(0x51, struct.pack(">L", max_pdu)) + _item(0x52, _even("1.2.826.0.1.3680043.9.7")))
    head = struct.pack(">HH16s16s32x", 1, 0, called.encode().ljust(16), calling.encode().ljust(16))
    return pdu(A_ASSOCIATE_RQ, head + items)


def p_data(context_id: int, control: int, fragment: bytes) -> bytes:
    """A P-DATA-TF PDU of one PDV (control: bit 0 command, bit 1 last fragment)."""
    return pdu(P_DATA_TF, struct.pack(">LBB", len(fragment) + 2, context_id, control) + fragment)


def element(group: int, elem: int, value: bytes) -> bytes:
    """An implicit VR little endian element, as in a command set."""
    return struct.pack("<HHL", group, elem, len(value)) + value


def command_set(elements: dict[int, bytes]) -> bytes:
    """A command set of (0000,eeee) elements, its group length first."""
    body = b"".join(element(0, e, v) for e, v in sorted(elements.items()))
    return element(0, 0x0000, struct.pack("<L", len(body))) + body


def store_command(sop_class: str, sop_instance: str, message_id: int = 1) -> dict[int, bytes]:
    """The elements of a C-STORE-RQ (PS3.7 9.3.1.1) with a data set."""
    return {
        0x0002: _even(sop_class), 0x0100: struct.pack("<H", 0x0001), 0x0110: struct.pack("<H", message_id),
        0x0700: struct.pack("<H", 0x0000), 0x0800: struct.pack("<H", 0x0000), 0x1000: _even(sop_instance),
    }


@dataclass
class Answer:
    """How the listener answered: a command set (status), an A-ABORT, a close, or nothing."""

    kind: str  # "status", "abort", "closed", "timeout", "release", "other"
    status: int | None = None
    comment: str = ""


def read_exactly(sock: socket.socket, n: int, deadline: float) -> bytes:
    data = b""
    while len(data) < n:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def read_pdu(sock: socket.socket, deadline: float) -> tuple[int, bytes] | None:
    """(type, body) of the next PDU; None if the connection closed (or was reset)."""
    try:
        head = read_exactly(sock, 6, deadline)
        if len(head) < 6:
            return None
        pdu_type, _, length = struct.unpack(">BBL", head)
        body = read_exactly(sock, length, deadline)
    except (ConnectionResetError, BrokenPipeError):
        return None
    return pdu_type, body


def command_values(command: bytes) -> dict[int, bytes]:
    values, offset = {}, 0
    while offset + 8 <= len(command):
        group, elem, length = struct.unpack_from("<HHL", command, offset)
        values[elem] = command[offset + 8:offset + 8 + length]
        offset += 8 + length
    return values


def answer(sock: socket.socket, timeout: float) -> Answer:
    """Wait for the listener's answer to what was sent: the first command it sends back
    (its Status and ErrorComment), an A-ABORT, or the connection closing."""
    deadline = time.monotonic() + timeout
    command = b""
    try:
        while True:
            got = read_pdu(sock, deadline)
            if got is None:
                return Answer("closed")
            pdu_type, body = got
            if pdu_type == A_ABORT:
                return Answer("abort")
            if pdu_type == A_RELEASE_RP:
                return Answer("release")
            if pdu_type != P_DATA_TF:
                return Answer("other")
            offset = 0
            while offset + 6 <= len(body):
                length, _, control = struct.unpack_from(">LBB", body, offset)
                if control & 1:
                    command += body[offset + 6:offset + 4 + length]
                    if control & 2:
                        values = command_values(command)
                        status = struct.unpack("<H", values[0x0900])[0] if len(values.get(0x0900, b"")) == 2 else None
                        return Answer("status", status, values.get(0x0902, b"").decode("ascii", "replace").strip())
                offset += 4 + length
    except TimeoutError:
        return Answer("timeout")


class RawPeer:
    """One connection to the listener."""

    def __init__(self, port: int, timeout: float = 10) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.timeout = timeout

    def send(self, data: bytes) -> bool:
        """False if the listener has closed the connection already."""
        try:
            self.sock.sendall(data)
        except OSError:
            return False
        return True

    def associate(self, contexts: list[tuple[int, str, str]], max_pdu: int = 16384) -> list[int]:
        """Negotiate; the ids of the accepted contexts."""
        self.send(associate_rq(contexts, max_pdu=max_pdu))
        got = read_pdu(self.sock, time.monotonic() + self.timeout)
        assert got is not None and got[0] == A_ASSOCIATE_AC, f"no A-ASSOCIATE-AC: {got!r:.200}"
        body, accepted, offset = got[1], [], 68
        while offset + 4 <= len(body):
            item_type, _, length = struct.unpack_from(">BBH", body, offset)
            if item_type == 0x21 and body[offset + 6] == 0:
                accepted.append(body[offset + 4])
            offset += 4 + length
        return accepted

    def answer(self, timeout: float | None = None) -> Answer:
        return answer(self.sock, self.timeout if timeout is None else timeout)

    def release(self) -> Answer:
        self.send(pdu(A_RELEASE_RQ, bytes(4)))
        return self.answer()

    def close(self) -> None:
        self.sock.close()
