"""C-STORE requests whose data set is a file, written to the socket by the thread that sends them.

pynetdicom sends a data set read from a file (``STORE_SEND_CHUNKED_DATASET``) as one
``P_DATA`` object per PDU, each queued for the network thread, which takes it through the
state machine, encodes it and writes it: with a Storage SCP that takes 16 KiB PDUs
(DCMTK's default), a 512 KiB image is 32 such trips between two threads that share one
interpreter lock, most of the bridge's time per C-STORE sub-operation of a C-MOVE
(docs/performance.md, bench/move). On the associations the bridge requests, where its
sending thread is the only one with anything to send while a C-STORE is going out, the
request is written here instead, PDU by PDU, straight from the file: the command, then
the data set in fragments of the peer's maximum PDU length, as pynetdicom would cut
them (PS3.8 9.3.5, E.2).

What keeps it safe: it waits until the network thread has sent everything queued
before (nothing is normally: the previous request's response has come); every write to
the socket, its own and the network thread's (``AssociationSocket.send``), holds the
socket's lock, so an A-ABORT or A-RELEASE never lands inside a PDU; a write that fails
(the peer gone, no progress within the socket's timeout) is reported to the state
machine as pynetdicom's own send reports it (Evt17: the connection closed), and the
request's response then never comes, as after any lost connection.
"""

from __future__ import annotations

import struct
import threading
import time
from pathlib import Path
from typing import Any

import pynetdicom.association
import pynetdicom.transport
from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dsutils import encode

_pynetdicom_socket_send = pynetdicom.transport.AssociationSocket.send

FLUSH_WAIT = 30.0  # the longest to wait for the network thread to send what was queued before


def _socket_send(self: Any, bytestream: bytes) -> None:
    """``AssociationSocket.send``: under the socket's lock, where the fast path may write too."""
    lock = self.__dict__.get("_bridge_lock")
    if lock is None:
        _pynetdicom_socket_send(self, bytestream)
        return
    with lock:
        _pynetdicom_socket_send(self, bytestream)


def enable(assoc: Any) -> None:
    """Let C-STORE requests with a file data set be written directly on ``assoc`` (one the
    bridge requested: from its ``EVT_CONN_OPEN``)."""
    sock = assoc.dul.socket
    if sock is not None:
        sock._bridge_lock = threading.Lock()


def send_file_request(dimse: Any, primitive: Any, context_id: int) -> bool:
    """Write the C-STORE request ``primitive`` (its data set a file: ``_dataset_path``)
    directly, if ``enable`` was called for its association; False if not (the caller
    sends it the usual way)."""
    dul = dimse.dul
    sock = dul.socket
    lock = getattr(sock, "_bridge_lock", None) if sock is not None else None
    if lock is None:
        return False
    path, offset = primitive._dataset_path
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    command = encode(message.command_set, True, True)
    if command is None:
        return False
    size = (dimse.maximum_pdu_size or 0) - 6
    if size <= 0:
        size = 1 << 20
    deadline = time.monotonic() + FLUSH_WAIT
    while not dul.to_provider_queue.empty():  # what was queued before goes first
        if time.monotonic() > deadline or not dul.is_alive():
            return True  # the network thread is stuck or gone: the response will not come
        time.sleep(0.0005)
    with lock:
        try:
            raw = sock.socket
            for start in range(0, len(command), size):
                last = start + size >= len(command)
                raw.sendall(_pdv(context_id, 0x03 if last else 0x01, command[start:start + size]))
            with open(path, "rb") as f:
                f.seek(offset)
                chunk = f.read(size)
                while True:
                    following = f.read(size)
                    raw.sendall(_pdv(context_id, 0x00 if following else 0x02, chunk))
                    if not following:
                        break
                    chunk = following
        except OSError:
            sock.event_queue.put("Evt17")  # as AssociationSocket.send reports a failed write
    return True


def _pdv(context_id: int, control: int, data: bytes) -> bytes:
    """A P-DATA-TF PDU of one PDV (PS3.8 9.3.5, E.2)."""
    return struct.pack(">BBLLBB", 0x04, 0, 6 + len(data), 2 + len(data), context_id, control) + data


_pynetdicom_split_dataset = pynetdicom.association.split_dataset  # type: ignore[attr-defined]
_META_KEYWORDS = {0x00020002: "MediaStorageSOPClassUID", 0x00020003: "MediaStorageSOPInstanceUID",
                  0x00020010: "TransferSyntaxUID"}
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT"}


def _split_dataset(path: Path) -> tuple[Dataset, int]:
    """``pynetdicom.dsutils.split_dataset`` as ``send_c_store`` uses it for a file: the
    File Meta Information's three UIDs it needs, and where the data set begins. Read
    directly from the file's first bytes (explicit VR little endian, PS3.10 7.1) instead
    of by pydicom's reader, a sixth of a C-STORE sub-operation's time; a file that does
    not read so (no preamble, a meta group in another shape) goes to pynetdicom's."""
    try:
        with open(path, "rb") as f:
            head = f.read(_HEAD)
        found = _meta_uids(head)
    except OSError:
        found = None
    if found is None:
        return _pynetdicom_split_dataset(path)  # type: ignore[no-any-return]
    values, offset = found
    meta = Dataset()
    for tag, value in values.items():
        setattr(meta, _META_KEYWORDS[tag], UID(value))
    return meta, offset


_HEAD = 4096


def _meta_uids(head: bytes) -> tuple[dict[int, str], int] | None:
    """The UIDs of ``_META_KEYWORDS`` and the offset after group 0002, or None."""
    if len(head) < 132 or head[128:132] != b"DICM":
        return None
    position, values = 132, {}
    while position + 8 <= len(head):
        group, element = struct.unpack_from("<HH", head, position)
        if group != 0x0002:
            break
        vr = head[position + 4:position + 6]
        if vr in _LONG_VRS:
            if position + 12 > len(head):
                return None
            length = struct.unpack_from("<L", head, position + 8)[0]
            start = position + 12
        else:
            length = struct.unpack_from("<H", head, position + 6)[0]
            start = position + 8
        if length == 0xFFFFFFFF or start + length > len(head):
            return None
        tag = group << 16 | element
        if tag in _META_KEYWORDS:
            values[tag] = head[start:start + length].rstrip(b"\0 ").decode("ascii", "replace")
        position = start + length
    else:
        return None  # the meta group runs past what was read
    if len(values) != len(_META_KEYWORDS):
        return None
    return values, position
