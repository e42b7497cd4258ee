"""Reading PDUs: whole PDUs at once, each one's length bounded before its body is read.

``AssociationSocket.recv`` reads a PDU 4096 bytes at a time, each read a Python loop
turn: a 128 KiB PDU costs 32 ``recv`` calls. ``_recv`` reads it with ``recv_into`` a
buffer of the PDU's size (up to ``_RECV_CHUNK``; beyond, it grows with what arrives).

For hostile and broken peers (docs/conformance.md): every PDU's announced length is
checked against a bound before its body is read (``_read_pdu_data``: A-ABORT beyond it),
nothing is read once an abort is decided or sent, and an action of the state machine
that fails aborts the association instead of ending the network thread (``_do_action``).
Each costs the happy path a comparison or two.
"""

from __future__ import annotations

import logging
import struct
from typing import Any

import pynetdicom.dul
import pynetdicom.fsm
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import A_P_ABORT

from bridge.dimse.pynetdicom_overrides.fast_path import _may_take, _take_data_set_pdu, _take_store_command_pdu

LOGGER = logging.getLogger("pynetdicom.dul")  # pynetdicom's messages, under its name


# A PDU body is read into a buffer that grows by at most this much ahead of what has
# arrived: a peer that announces a long PDU and sends little costs little.
_RECV_CHUNK = 1024 * 1024


def _recv(self: Any, nr_bytes: int) -> bytearray:
    """``AssociationSocket.recv``: exactly ``nr_bytes`` unless the peer closes first."""
    sock = self.socket
    buffer = bytearray(min(nr_bytes, _RECV_CHUNK))
    read = 0
    while read < nr_bytes:
        if read == len(buffer):  # only PDUs longer than _RECV_CHUNK come here
            buffer.extend(bytes(min(nr_bytes - read, len(buffer))))
        with memoryview(buffer) as view:
            n = sock.recv_into(view[read:])
        if not n:
            del buffer[read:]
            return buffer
        read += n
    return buffer


_pynetdicom_read_pdu_data = pynetdicom.dul.DULServiceProvider._read_pdu_data


# PDU lengths read from the network are checked before anything is allocated for them
# (docs/conformance.md, "Hostile and broken peers"). Every PDU but P-DATA-TF carries a few AE
# titles, UIDs and contexts: 64 KiB is generous. A P-DATA-TF may be as long as the
# maximum this side announced, plus a margin for peers that miscount their item headers;
# with no maximum announced (0), as long as _UNANNOUNCED_PDU.
MAX_CONTROL_PDU = 64 * 1024
PDU_MARGIN = 1024
_UNANNOUNCED_PDU = 64 * 1024 * 1024
_PDU_NAMES = {0x01: "A-ASSOCIATE-RQ", 0x02: "A-ASSOCIATE-AC", 0x03: "A-ASSOCIATE-RJ", 0x04: "P-DATA-TF",
              0x05: "A-RELEASE-RQ", 0x06: "A-RELEASE-RP", 0x07: "A-ABORT"}


def _data_pdu_limit(dul: Any) -> int:
    """The longest P-DATA-TF ``dul`` reads (see ``MAX_CONTROL_PDU``), kept on it."""
    assoc = dul.assoc
    announced = (assoc.acceptor if assoc.is_acceptor else assoc.requestor).maximum_length
    dul._bridge_data_limit = announced + PDU_MARGIN if announced else _UNANNOUNCED_PDU
    return int(dul._bridge_data_limit)


def awaiting_request(assoc: Any) -> bool:
    """Whether ``assoc`` is an acceptor's connection still open and waiting for its
    A-ASSOCIATE-RQ: ARTIM not stopped (AE-5 starts it on the connection; it is stopped
    when the request arrives, AE-6, or the connection ends before it, AA-2, AA-5).
    Once its connection has ended, the association thread may still wait out its
    ``acse_timeout`` for a request that cannot come: it holds no connection."""
    return bool(assoc.is_acceptor and assoc.requestor.primitive is None and assoc.dul.artim_timer._end_time is None)


def peer_name(assoc: Any) -> str:
    """``host:port`` of the other side of ``assoc``, for log lines."""
    try:
        peer = assoc.requestor if assoc.is_acceptor else assoc.acceptor
        return f"{peer.address}:{peer.port}"
    except Exception:
        return "?"


def _abort(dul: Any, reason: str) -> None:
    """A-ABORT the association for ``reason`` (logged with the peer's address): the state
    machine sends it (Evt19, an invalid PDU) and nothing more is read (``_read_pdu_data``)."""
    LOGGER.error("A-ABORT to %s: %s", peer_name(dul.assoc), reason)
    dul._bridge_aborted = True
    dul.event_queue.put("Evt19")


def _read_pdu_data(self: Any) -> None:
    """``DULServiceProvider._read_pdu_data`` (pynetdicom 3.0) with a fast path for the
    P-DATA-TF PDUs that carry a C-STORE data set (``fast_path``). Reads,
    errors and events are pynetdicom's otherwise, in the same order, except that:

    - a PDU longer than allowed (``MAX_CONTROL_PDU``, ``_data_pdu_limit``) is answered
      with A-ABORT before its body is read;
    - once an abort is decided or sent (Sta13), nothing more is read: the connection is
      closed (pynetdicom reads on in Sta13, each PDU as long as its header says);
    - failures are logged in one line that names the peer, without a traceback (a
      hostile peer should not be able to fill the log).
    """
    sock = self.socket
    if self._bridge_aborted or self.state_machine.current_state == "Sta13":
        if self.state_machine.current_state == "Sta13":
            sock.close()  # Evt17: the state machine ends the association
        return
    try:
        head = sock.recv(6)
    except (OSError, TimeoutError) as exc:
        _lost(self, exc)
        return
    try:
        pdu_type, _, pdu_length = struct.unpack(">BBL", head)
    except struct.error:
        self.event_queue.put("Evt17")
        return
    if pdu_type not in (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07):
        _abort(self, f"unknown PDU type 0x{pdu_type:02X}")
        return
    limit = (self._bridge_data_limit or _data_pdu_limit(self)) if pdu_type == 0x04 else MAX_CONTROL_PDU
    if pdu_length > limit:
        _abort(self, f"{_PDU_NAMES[pdu_type]} PDU of {pdu_length} bytes announced, more than the {limit} allowed")
        return
    try:
        body = sock.recv(pdu_length)
    except (OSError, TimeoutError) as exc:
        _lost(self, exc)
        return
    if len(body) != pdu_length:
        LOGGER.error("connection from %s closed within a PDU (%d of %d bytes received)", peer_name(self.assoc),
                     6 + len(body), 6 + pdu_length)
        self.event_queue.put("Evt17")
        return
    if pdu_type == 0x04 and _may_take(self) and (_take_data_set_pdu(self, body) or
                                                  _take_store_command_pdu(self, body)):
        return
    try:
        pdu, event = self._decode_pdu(head + body)
        self.event_queue.put(event)
    except Exception as exc:
        _abort(self, f"cannot decode the {_PDU_NAMES[pdu_type]} PDU: {_describe(exc)}")
        return
    self._recv_pdu.put(pdu)


_pynetdicom_do_action = pynetdicom.fsm.StateMachine.do_action


def _do_action(self: Any, event: str) -> None:
    """``StateMachine.do_action``, which lets an action's exception end the network
    thread (pynetdicom logs it and stops the reactor), leaving the connection open, the
    peer unanswered and the association thread without an end: a PDU that decodes but
    whose values its action cannot convert (an A-ABORT with source 122, say) did that.
    Here the association is aborted instead, as pynetdicom's reactor does when reading
    fails: A-ABORT sent, the connection closed, and, on an established association, an
    A-P-ABORT for the association thread, which then ends it as it ends any abort."""
    try:
        _pynetdicom_do_action(self, event)
    except Exception as exc:
        dul = self.dul
        if dul._bridge_aborted and self.current_state == "Sta1":
            return
        LOGGER.error("A-ABORT to %s: %s in %s failed: %s", peer_name(dul.assoc), event, self.current_state,
                     _describe(exc))
        dul._bridge_aborted = True
        abort = A_ABORT_RQ()
        abort.source, abort.reason_diagnostic = 0x02, 0x00
        try:
            dul.socket.send(abort.encode())
            dul.socket.close()
        except Exception:
            pass
        self.current_state = "Sta1"  # what AA-3 leaves: the connection closed
        if dul.assoc.is_established:
            primitive = A_P_ABORT()
            primitive.provider_reason = 0x00
            dul.to_user_queue.put(primitive)


def _lost(dul: Any, exc: BaseException) -> None:
    """The connection failed or timed out while a PDU was read (Evt17)."""
    LOGGER.error("connection from %s lost within a PDU: %s", peer_name(dul.assoc), _describe(exc))
    dul.event_queue.put("Evt17")


def _describe(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:200] if text else type(exc).__name__
